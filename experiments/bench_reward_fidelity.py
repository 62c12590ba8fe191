"""Benchmark: which cheap reward best predicts a strategy's accuracy after a real fine-tune?

ResNet-20 on ``../shared`` CIFAR-10 (Tucker-2), one budget. A fixed set of diverse strategies -- the
centers of the rank rules (uniform, energy, VBMF, ALDS), random strategies around each center at two
spreads, and random strategies around the env's own fair ratio -- each gets a **reference**: test
accuracy after a 2-epoch one-cycle fine-tune with distillation from the dense model (one recipe for
all). References are expensive (minutes each), so each is stored once in
``experiments/results/reward-fidelity-references.csv`` and reused by every later invocation; an
invocation may compute only some of them (``--max-new-references``) and the next one goes on.

Every **candidate reward** (today's BN re-estimation + 10 SGD steps on 1,000 validation images, BN
only, distillation steps, more / fewer steps, more validation images, validation loss, training-free
scores: the compressed layers' output reconstruction error on a fixed batch and the KL divergence to
the dense model's logits) is computed per strategy and stored in
``experiments/results/reward-fidelity-candidates.csv``. The section appended to
``experiments/RESULTS.md`` gives each candidate's Spearman and Kendall correlation with the
reference (95 % bootstrap intervals over strategies) and its seconds per evaluation.

Run from the repository root::

    python experiments/bench_reward_fidelity.py --phase references --max-new-references 12
    python experiments/bench_reward_fidelity.py            # the rest, then candidates and the table
    python experiments/bench_reward_fidelity.py --dataset digits --model tiny --strategies 6 \
        --reference-epochs 0.2 --results /tmp/fid --no-append   # a smoke test on the embedded data
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import recording
import torch
import torch.nn.functional as F
from scipy import stats

from rlrank.agents.base import RandomAgent
from rlrank.envs import RankSearchEnv
from rlrank.factor_cache import FactorCache
from rlrank.finetune import (
    FinetuneConfig,
    TrainConfig,
    evaluate,
    finetune_steps,
    reestimate_bn,
    train_epochs,
)
from rlrank.planning import LayerPlan
from rlrank.preflight import Setup
from rlrank.search_loop import play_actions
from rlrank.stage import rule_strategy
from rlrank.surgery import decompose_model

RESULTS_DIR = Path(__file__).parent / "results"
RULES = ("uniform", "energy", "vbmf", "alds")
TODAY = "bn+10 steps, 1000 val (today)"


@dataclass
class Strategy:
    """One strategy of the benchmark: its name, the ratios played and the plans they became."""

    name: str
    ratios: list[float]
    plans: list[LayerPlan]

    @property
    def ranks(self) -> str:
        return json.dumps([list(p.ranks) if p.ranks else None for p in self.plans])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recording.add_dataset_option(p)
    p.add_argument("--model", default="resnet20", help="(default: %(default)s)")
    p.add_argument("--flops", type=float, default=0.5, help="budget (default: %(default)s)")
    p.add_argument("--strategies", type=int, default=24, help="strategies in all (default: %(default)s)")
    p.add_argument("--reference-epochs", type=float, default=2.0, help="(default: %(default)s)")
    p.add_argument(
        "--phase", choices=("references", "all"), default="all",
        help="'references': only compute missing references (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--max-new-references", type=int, default=None, help="stop after this many new ones")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="CSV folder (default: %(default)s)")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def make_strategies(env: RankSearchEnv, cache: FactorCache, min_ratio: float, n: int) -> list[Strategy]:
    """The benchmark's strategies, the same for every invocation: each rule's center, then random
    ones around the centers (spreads 0.25 and 0.5) and around the env's fair ratio (spread 1)."""
    centers = {rule: rule_strategy(rule, env, cache, min_ratio) for rule in RULES}
    out = [Strategy(rule, list(map(float, r)), env.plan(r)) for rule, r in centers.items()]
    kinds = [(rule, spread) for spread in (0.25, 0.5) for rule in RULES] + [(None, 1.0)] * 2
    k = 0
    while len(out) < n:
        center, spread = kinds[k % len(kinds)]
        env.set_center(centers[center] if center else None)
        agent = RandomAgent(seed=1000 + k, spread=spread, start_at_center=False)
        played = play_actions(env, agent, k, None)
        ratios = [p.ratio for p in played.plans]
        out.append(Strategy(f"{center or 'fair'}-s{spread:g}-{k}", ratios, list(played.plans)))
        k += 1
    env.set_center(None)
    return out[:n]


def reference(setup: Setup, cache: FactorCache, plans: list[LayerPlan], epochs: float) -> dict[str, float]:
    """Test and validation accuracy after the reference fine-tune (BN re-estimation, then ``epochs``
    one-cycle epochs with distillation weight 0.5 from the dense model, seed 0)."""
    config = setup.config
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    model = decompose_model(setup.model, plans, cache)
    reestimate_bn(model, setup.data, config.bn_batches, config.batch_size, generator)
    train = TrainConfig(epochs=epochs, lr=config.final_lr, batch_size=config.batch_size, distill=0.5)
    train_epochs(model, setup.data, train, generator, teacher=setup.model, progress=False)
    test, _ = evaluate(model, setup.data, setup.data.test)
    val, _ = evaluate(model, setup.data, setup.data.val)
    return {"test_acc": test, "val_acc": val, "seconds": time.perf_counter() - began}


class Candidates:
    """Every candidate reward of one strategy: ``name -> (score, seconds)``; higher is better."""

    def __init__(self, setup: Setup, cache: FactorCache) -> None:
        self.setup, self.cache = setup, cache
        data = setup.data
        self.val_1000 = data.held(data.val.subset(1000))
        self.val_all = data.held(data.val)
        images, _ = next(data.batches(self.val_1000, 256))
        self.batch = images
        self.inputs = _layer_inputs(setup.model, list(cache.layers), images)
        with torch.no_grad():
            setup.model.eval()
            self.dense_logits = setup.model(images)

    def all(self, plans: list[LayerPlan]) -> dict[str, tuple[float, float]]:
        c = self.setup.config
        out: dict[str, tuple[float, float]] = {}
        for steps, val, distill in ((0, 1000, False), (10, 1000, False), (40, 1000, False), (5, 1000, False),
                                    (0, 0, False), (10, 0, False), (10, 1000, True)):  # fmt: skip
            name = f"bn+{steps} {'distill ' if distill else ''}steps, {val or 'all'} val"
            began = time.perf_counter()
            model = self._priced(plans, FinetuneConfig(steps, c.finetune_lr, batch_size=c.finetune_batch_size,
                                                       bn_batches=c.bn_batches), distill)  # fmt: skip
            acc, loss = evaluate(model, self.setup.data, self.val_1000 if val else self.val_all)
            seconds = time.perf_counter() - began
            label = TODAY if (steps, val, distill) == (10, 1000, False) else name
            out[label] = (acc, seconds)
            out[f"-val loss: {name}"] = (-loss, seconds)
            if steps == 0 and val == 1000:
                out["-KL to dense logits after BN, 256 images"] = (-self._kl(model), seconds)
        began = time.perf_counter()
        model = decompose_model(self.setup.model, plans, self.cache)
        errors = self._reconstruction(model, plans)
        seconds = time.perf_counter() - began
        out["-mean layer output error, 256 images"] = (-float(np.mean(errors)), seconds)
        out["-max layer output error, 256 images"] = (-float(np.max(errors)), seconds)
        out["-KL to dense logits, no BN, 256 images"] = (-self._kl(model), seconds)
        return out

    def _priced(self, plans: list[LayerPlan], config: FinetuneConfig, distill: bool) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(0)
        model = decompose_model(self.setup.model, plans, self.cache)
        reestimate_bn(model, self.setup.data, config.bn_batches, config.batch_size, generator)
        if config.steps:
            finetune_steps(model, self.setup.data, config, generator, self.setup.model if distill else None)
        return model

    @torch.no_grad()
    def _kl(self, model: torch.nn.Module) -> float:
        model.eval()
        logits = model(self.batch)
        return float(
            F.kl_div(F.log_softmax(logits, 1), F.softmax(self.dense_logits, 1), reduction="batchmean")
        )

    @torch.no_grad()
    def _reconstruction(self, model: torch.nn.Module, plans: list[LayerPlan]) -> list[float]:
        model.eval()
        errors = []
        dense = dict(self.setup.model.named_modules())
        modules = dict(model.named_modules())
        for plan in plans:
            if plan.dense:
                errors.append(0.0)
                continue
            x = self.inputs[plan.name]
            want = dense[plan.name](x)
            errors.append(float((modules[plan.name](x) - want).norm() / want.norm().clamp_min(1e-12)))
        return errors


def _layer_inputs(model: torch.nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's input in the dense model on ``images``."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_pre_hook(lambda m, args, n=n: captured.__setitem__(n, args[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model.eval()
        model(images)
    for h in hooks:
        h.remove()
    return captured


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)


def correlations(
    scores: pd.DataFrame, refs: pd.Series, resamples: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Per candidate: Spearman and Kendall correlation with the reference, 95 % bootstrap
    intervals over strategies, and the mean seconds per evaluation."""
    rows = []
    for name, group in scores.groupby("candidate", sort=False):
        group = group.set_index("strategy").loc[refs.index]
        x, y = group["score"].to_numpy(), refs.to_numpy()
        boot_s, boot_k = [np.nan], [np.nan]
        for _ in range(resamples):
            i = rng.integers(0, len(x), len(x))
            if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
                boot_s.append(stats.spearmanr(x[i], y[i]).statistic)
                boot_k.append(stats.kendalltau(x[i], y[i]).statistic)
        rows.append({
            "candidate": name,
            "Spearman": stats.spearmanr(x, y).statistic,
            "Spearman 95% CI": f"{np.nanpercentile(boot_s, 2.5):.2f} – {np.nanpercentile(boot_s, 97.5):.2f}",
            "Kendall": stats.kendalltau(x, y).statistic,
            "Kendall 95% CI": f"{np.nanpercentile(boot_k, 2.5):.2f} – {np.nanpercentile(boot_k, 97.5):.2f}",
            "s / eval": group["seconds"].mean(),
        })  # fmt: skip
    return pd.DataFrame(rows).sort_values("Spearman", ascending=False)


def with_combinations(scores: pd.DataFrame, refs: pd.Series, top: int = 4) -> pd.DataFrame:
    """``scores`` plus pairs of the ``top`` best single candidates (by Spearman): a pair scores a
    strategy by the mean of its two ranks; its seconds are the sum (an upper bound when both come
    from one evaluation)."""
    ranked = correlations(scores, refs, 0, np.random.default_rng(0))["candidate"].tolist()[:top]
    wide = scores.pivot(index="strategy", columns="candidate", values="score").loc[refs.index]
    seconds = scores.groupby("candidate")["seconds"].mean()
    extra = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1 :]:
            score = (wide[a].rank() + wide[b].rank()) / 2
            extra += [
                {"strategy": k, "candidate": f"ranks of [{a}] + [{b}]", "score": v,
                 "seconds": seconds[a] + seconds[b]}
                for k, v in score.items()
            ]  # fmt: skip
    return pd.concat([scores, pd.DataFrame(extra)], ignore_index=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    session = recording.Session(argv)
    cli = recording.cifar_search_args(args.model, 10, 1000, dataset=args.dataset)
    priced = recording.priced_setup(cli, args.flops, args.device)
    config, setup, cache, env = priced.config, priced.setup, priced.cache, priced.env
    strategies = make_strategies(env, cache, config.min_ratio, args.strategies)
    tag = f"{args.dataset}-{args.model}-{args.flops:g}-{args.reference_epochs:g}ep"
    ref_path = args.results / "reward-fidelity-references.csv"
    cand_path = args.results / "reward-fidelity-candidates.csv"

    done = _read(ref_path)
    known = set(done.loc[done["tag"] == tag, "ranks"]) if len(done) else set()
    new = 0
    for s in strategies:
        if s.ranks in known or (args.max_new_references is not None and new >= args.max_new_references):
            continue
        row = reference(setup, cache, s.plans, args.reference_epochs)
        _append(ref_path, {"tag": tag, "strategy": s.name, "flops_ratio": env.flops_ratio(s.plans), **row,
                           "device": str(setup.device), "date": recording.utc_now(), "ranks": s.ranks})  # fmt: skip
        new += 1
        print(f"reference {s.name}: test {row['test_acc']:.4f} ({row['seconds']:.0f} s)", flush=True)
    refs = _read(ref_path)
    refs = refs[refs["tag"] == tag].drop_duplicates("ranks", keep="first").set_index("ranks")
    missing = [s.name for s in strategies if s.ranks not in refs.index]
    if args.phase == "references" or missing:
        print(f"{len(strategies) - len(missing)} of {len(strategies)} references stored; missing: {missing}")
        return 0

    scored = _read(cand_path)
    have = set(scored.loc[scored["tag"] == tag, "ranks"]) if len(scored) else set()
    candidates = Candidates(setup, cache)
    for s in strategies:
        if s.ranks in have:
            continue
        for name, (score, seconds) in candidates.all(s.plans).items():
            _append(cand_path, {"tag": tag, "strategy": s.name, "candidate": name, "score": score,
                                "seconds": seconds, "ranks": s.ranks})  # fmt: skip
        print(f"candidates {s.name} done", flush=True)
    scored = _read(cand_path)
    scored = scored[scored["tag"] == tag]
    by_name = {s.ranks: s.name for s in strategies}
    scored = scored[scored["ranks"].isin(by_name)].assign(strategy=lambda f: f["ranks"].map(by_name))
    scored = scored.drop_duplicates(["strategy", "candidate"], keep="first")
    reference_acc = pd.Series({s.name: refs.loc[s.ranks, "test_acc"] for s in strategies})
    scored = scored[["strategy", "candidate", "score", "seconds"]]
    table = correlations(with_combinations(scored, reference_acc), reference_acc, args.bootstrap,
                         np.random.default_rng(0))  # fmt: skip
    per_strategy = pd.DataFrame({
        "strategy": [s.name for s in strategies],
        "FLOP ratio": [env.flops_ratio(s.plans) for s in strategies],
        "reference test acc": reference_acc.to_numpy(),
        "today's reward": [scored.set_index(["strategy", "candidate"]).loc[(s.name, TODAY), "score"]
                           for s in strategies],
    })  # fmt: skip
    lines = [
        *session.header(
            f"Reward fidelity ({args.model}, {recording.DATASETS[args.dataset]}, --flops {args.flops:g})",
            args.device,
            str(setup.device),
        ),  # fmt: skip
        f"- {len(strategies)} strategies (each rule's center, random ones around the centers at spreads "
        f"0.25 and 0.5, random ones around the fair ratio); reference: test accuracy after BN "
        f"re-estimation + a {args.reference_epochs:g}-epoch one-cycle fine-tune (lr {config.final_lr}, "
        f"distillation 0.5), {refs['seconds'].mean():.0f} s each, stored in `{ref_path.name}`; reference "
        f"test accuracy {reference_acc.min():.4f} – {reference_acc.max():.4f}",
        "",
        recording.markdown(table, digits=3),
        "",
        "Per strategy:",
        "",
        recording.markdown(per_strategy, digits=4),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
