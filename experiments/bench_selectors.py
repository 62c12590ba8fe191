"""Benchmark: DDPG ranks vs the standard rank selectors on real CIFAR-10 (``../shared``).

For each budget (0.5 and 0.3 of the dense FLOPs) every method searches Tucker-2 ranks for the
same dense model with the same cheap-fine-tune reward, then gets the same final fine-tune:

* ``uniform``, ``energy``, ``vbmf``, ``alds``: rules, each hitting the budget by bisection on its own knob
  (one reward evaluation);
* ``random``: random search with DDPG's number of reward evaluations, over ``seeds``;
* ``ddpg``: the agent (AMC settings), over ``seeds``;
* ``ddpg-energy``, ``random-energy``: the same with ``--action-center energy`` (action 0 plays the
  energy rule's strategy instead of the uniform one); ``ddpg-alds``, ``random-alds``: centered on
  the ALDS rule;
* ablations on the uniform rule: ``+distill`` (knowledge distillation from the dense model in the
  final fine-tune) and ``+data-aware`` (output factors fitted to the layers' responses on
  training images), so that each gain is visible on its own.

Rewards and selection use the validation split (5,000 images held out from train); the test split
(10,000 images) is read once per run, for the report. Writes ``experiments/results/
selectors-<scale>.csv`` and appends three Markdown tables to ``experiments/RESULTS.md``: the
results, the search cost per episode, and the correlation between the cheap-fine-tune reward and
the accuracy after the final fine-tune.

Presets: ``--scale cpu`` (ResNet-20, AMC-length searches of 200 episodes over 3 seeds: about an hour
per budget on 2 CPU cores, so run one ``--budgets`` per invocation; completed runs are reused) and
``--scale gpu`` (ResNet-56, more episodes, full validation rewards, a 10-epoch final fine-tune).

Run from the repository root::

    python experiments/bench_selectors.py --scale cpu
    python experiments/bench_selectors.py --scale gpu --device cuda
    python experiments/bench_selectors.py --dataset digits --model tiny --methods uniform random \
        --budgets 0.5 --seeds 0 --episodes 2 --no-ablations --csv-dir /tmp --no-append   # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import recording

CSV_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Scale:
    """One preset: what is searched and how long every phase runs."""

    model: str
    checkpoint: str
    budgets: list[float]
    episodes: int
    warmup: int
    finetune_steps: int
    reward_val_images: int
    final_epochs: float
    batch_size: int
    seeds: list[int]
    ablations: list[str] = field(default_factory=lambda: ["distill", "data-aware"])

    def search_args(self, dataset: str = "cifar10") -> list[str]:
        """The ``rlrank.search`` options every run of this preset shares (``--dataset`` as given)."""
        return [
            *recording.cifar_search_args(
                self.model, self.finetune_steps, self.reward_val_images, self.batch_size, dataset=dataset
            ),
            "--episodes", str(self.episodes),
            "--warmup", str(self.warmup),
            "--final-epochs", str(self.final_epochs),
        ]  # fmt: skip


SCALES = {
    "cpu": Scale(
        model="resnet20",
        checkpoint="resnet20-jpeg.pt",
        budgets=[0.5, 0.3],
        episodes=200,
        warmup=50,
        finetune_steps=0,
        reward_val_images=1000,
        final_epochs=1.0,
        batch_size=128,
        seeds=[0, 1, 2],
    ),
    "gpu": Scale(
        model="resnet56",
        checkpoint="resnet56-jpeg.pt",
        budgets=[0.5, 0.3],
        episodes=200,
        warmup=50,
        finetune_steps=0,
        reward_val_images=0,
        final_epochs=10.0,
        batch_size=128,
        seeds=[0, 1, 2],
    ),
}
METHODS = (
    "uniform", "energy", "vbmf", "alds", "random", "ddpg", "surrogate", "ddpg-energy", "random-energy",
    "ddpg-alds", "random-alds",
)  # fmt: skip
METHOD_ARGS = {
    "ddpg-energy": ["--agent", "ddpg", "--action-center", "energy"],
    "random-energy": ["--agent", "random", "--action-center", "energy"],
    "ddpg-alds": ["--agent", "ddpg", "--action-center", "alds"],
    "random-alds": ["--agent", "random", "--action-center", "alds"],
}
"""Methods that are an agent with options; any other method is ``--agent METHOD``."""
SEARCHED = ("random", "ddpg", "surrogate", "ddpg-energy", "random-energy", "ddpg-alds", "random-alds")
ABLATION_ARGS = {"distill": ["--distill", "0.5"], "data-aware": ["--data-aware"]}
EPISODE_TIMES = ("decompose", "finetune", "evaluate", "agent", "env", "total")
"""The parts of an episode's time in a stage's ``time_per_episode`` (and the CSV's ``episode_*_s``)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="preset (default: %(default)s)")
    recording.add_dataset_option(p)
    p.add_argument("--device", default="auto", help="device of every search (default: %(default)s)")
    p.add_argument("--out", type=Path, help="run folders (default: bench-runs/selectors-<scale>)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="(default: all)")
    p.add_argument("--budgets", type=float, nargs="+", help="override the preset's budgets")
    p.add_argument("--finetune-steps", type=int, help="override the preset's SGD steps of the reward")
    p.add_argument("--model", help="override the preset's model")
    p.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds (searched methods)")
    p.add_argument("--episodes", type=int, help="override the preset's episodes (warm-up: a quarter of them)")
    p.add_argument("--final-epochs", type=float, help="override the preset's final fine-tune epochs")
    p.add_argument("--reward-val-images", type=int, help="override the preset's reward images (0: all)")
    p.add_argument("--no-ablations", action="store_true", help="skip the distill / data-aware rows")
    p.add_argument(
        "--search-args",
        default="",
        help="extra rlrank.search options for the searched methods (random, ddpg ...), e.g. "
        "'--spread 0.5 --noise 0.25'",
    )
    p.add_argument(
        "--tag", default="", help="suffix of the CSV name and run folder (selectors-<scale>-<tag>)"
    )
    p.add_argument(
        "--csv-dir",
        type=Path,
        default=CSV_DIR,
        help="folder of the per-run CSV (default: experiments/results)",
    )
    p.add_argument("--no-append", action="store_true", help="print the tables instead of appending them")
    return p.parse_args(argv)


def scale_of(args: argparse.Namespace) -> Scale:
    """The preset of ``--scale`` with the overrides given on the command line."""
    scale = SCALES[args.scale]
    overrides = {
        "model": args.model,
        "finetune_steps": args.finetune_steps,
        "seeds": args.seeds,
        "final_epochs": args.final_epochs,
        "reward_val_images": args.reward_val_images,
    }
    if args.model is not None:
        overrides["checkpoint"] = f"{args.model}-jpeg.pt"
    if args.episodes is not None:
        overrides.update(episodes=args.episodes, warmup=args.episodes // 4)
    return dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = scale_of(args)
    budgets = args.budgets or scale.budgets
    label = f"{args.scale}-{args.tag}" if args.tag else args.scale
    out = args.out or Path(f"bench-runs/selectors-{label}")
    search_extra = shlex.split(args.search_args)
    session = recording.Session(argv)
    base = [*scale.search_args(args.dataset), "--device", args.device]

    rows = []
    reused = 0  # runs already complete in --out, read instead of run again
    for budget in budgets:
        for method in args.methods:
            seeds = scale.seeds if method in SEARCHED else [scale.seeds[0]]
            agent = METHOD_ARGS.get(method, ["--agent", method])
            if method in SEARCHED:
                agent = [*agent, *search_extra]
            for seed in seeds:
                name = f"flops{budget:g}-{method}-seed{seed}"
                run = recording.run_search(
                    name, [*base, "--flops", str(budget), *agent, "--seed", str(seed)], out
                )
                rows.append(_row(run, budget, method, seed))
                reused += run.reused
        if not args.no_ablations:
            for ablation in scale.ablations:
                seed = scale.seeds[0]
                name = f"flops{budget:g}-uniform+{ablation}-seed{seed}"
                extra = ABLATION_ARGS[ablation]
                run = recording.run_search(
                    name,
                    [*base, "--flops", str(budget), "--agent", "uniform", "--seed", str(seed), *extra],
                    out,
                )
                rows.append(_row(run, budget, f"uniform+{ablation}", seed))
                reused += run.reused

    frame = pd.DataFrame(rows)
    args.csv_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.csv_dir / f"selectors-{label}.csv"
    frame.to_csv(csv_path, index=False)
    shown_csv = f"experiments/results/{csv_path.name}" if args.csv_dir == CSV_DIR else str(csv_path)

    dense = frame.iloc[0]
    if args.dataset == "cifar10":
        dense_from = f"`../shared/models/cifar-resnet/{scale.checkpoint}`"
        val_images = f"{scale.reward_val_images or 5000} of the 5,000"
    else:
        dense_from = f"trained by each search on {recording.DATASETS[args.dataset]}"
        val_images = f"{scale.reward_val_images or 'all'} of the"
    section = "\n".join(
        [
            *session.header(
                f"Rank selectors on {recording.DATASETS[args.dataset]} ({scale.model}, scale {args.scale})",
                str(dense["device"]),
                str(dense["device"]),
            ),
            f"- runs: {len(rows) - reused} made, {reused} complete runs of an earlier invocation read "
            f"from `{out}` (every run's own wall time is in the CSV); per-run CSV: `{shown_csv}`",
            f"- dense {scale.model} ({dense_from}): test accuracy "
            f"{dense['dense_test']:.4f}, val {dense['dense_val']:.4f} (the dense model has seen the val images)",
            f"- every method: Tucker-2, reward = val accuracy on {val_images} "
            f"held-out images after BN re-estimation + {scale.finetune_steps} SGD steps (batch "
            f"{scale.batch_size}, common batches); DDPG {scale.episodes} episodes ({scale.warmup} warm-up), "
            f"random search {scale.episodes}; final fine-tune {scale.final_epochs:g} epoch(s), one-cycle, "
            f"lr 0.01; DDPG and random rows: mean ± std over seeds {scale.seeds}"
            + (f"; searched methods also got `{args.search_args}`" if args.search_args else ""),
            "",
            results_table(frame),
            "",
            "Search cost per episode (means over each method's episodes, seconds; env + agent share "
            "is the environment's and agent's own time over the whole episode):",
            "",
            cost_table(frame),
            "",
            correlation_text(frame),
            "",
        ]
    )
    recording.publish(section, append=not args.no_append)
    return 0


def _row(run: recording.SearchRun, budget: float, method: str, seed: int) -> dict:
    report = run.report
    stage = report["stages"][-1]
    times = stage["time_per_episode"]
    latency = report.get("latency_ms", {})
    row = {
        "budget": budget,
        "method": method,
        "seed": seed,
        "device": report["device"],
        "dense_val": report["dense"]["val_accuracy"],
        "dense_test": report["dense"]["test_accuracy"],
        "best_val_reward": stage["best_reward"],
        "val_after_finetune": stage["val_accuracy"],
        "test_accuracy": report["compressed"]["test_accuracy"],
        "delta_test": report["test_accuracy_delta"],
        "flops_ratio": report["compressed"]["flops_ratio"],
        "params_ratio": report["compressed"]["params_ratio"],
        "reward_evaluations": report["reward_evaluations"],
        "search_seconds": report["search_seconds"],
        "finetune_seconds": stage["finetune_seconds"],
        "run_wall_seconds": run.wall_s,
    }
    for key in EPISODE_TIMES:
        row[f"episode_{key}_s"] = times.get(key, 0.0)
    for batch in ("batch1", "batch64"):
        entry = latency.get(batch, {})
        row[f"latency_{batch}_dense_ms"] = entry.get("dense", float("nan"))
        row[f"latency_{batch}_ms"] = entry.get("compressed", float("nan"))
        row[f"latency_{batch}_speedup"] = entry.get("speedup", float("nan"))
    return row


def _latency(group: pd.DataFrame, batch: str, digits: int) -> str | None:
    """Median latency and speed-up at one batch size, ``"1.23 (1.45x)"`` (None when not measured)."""
    ms, speedup = group[f"latency_{batch}_ms"].median(), group[f"latency_{batch}_speedup"].median()
    if pd.isna(ms):
        return None
    return f"{ms:.{digits}f} ({speedup:.2f}x)"


def results_table(frame: pd.DataFrame) -> str:
    """One row per budget and method: reward, test accuracy, cost, latency, search time (mean ± std)."""
    rows = [
        {
            "budget": budget,
            "method": method,
            "seeds": len(group),
            "best val reward": recording.mean_spread(group.best_val_reward),
            "test acc": recording.mean_spread(group.test_accuracy),
            "Δ test": recording.mean_spread(group.delta_test, signed=True),
            "FLOP ratio": group.flops_ratio.mean(),
            "param ratio": group.params_ratio.mean(),
            "latency b1 ms (speed-up)": _latency(group, "batch1", 2),
            "latency b64 ms (speed-up)": _latency(group, "batch64", 1),
            "FLOP speed-up": 1 / group.flops_ratio.mean(),
            "search s": group.search_seconds.mean(),
            "reward evals": int(group.reward_evaluations.mean()),
        }
        for (budget, method), group in frame.groupby(["budget", "method"], sort=False)
    ]
    formats = {
        "budget": "g",
        "FLOP ratio": ".3f",
        "param ratio": ".3f",
        "FLOP speed-up": lambda x: f"{x:.2f}x",
        "search s": ".0f",
    }
    return recording.markdown(pd.DataFrame(rows), formats)


def cost_table(frame: pd.DataFrame) -> str:
    """One row per budget and method: mean seconds per episode by phase, and the env + agent share."""
    rows = []
    for (budget, method), group in frame.groupby(["budget", "method"], sort=False):
        mean = {k: group[f"episode_{k}_s"].mean() for k in EPISODE_TIMES}
        rows.append(
            {
                "budget": budget,
                "method": method,
                "episodes": int(group.reward_evaluations.mean()),
                "decompose": mean["decompose"],
                "BN + fine-tune": mean["finetune"],
                "evaluate": mean["evaluate"],
                "agent": mean["agent"],
                "env": mean["env"],
                "total": mean["total"],
                "env + agent share": (mean["agent"] + mean["env"]) / mean["total"] if mean["total"] else None,
            }
        )
    return recording.markdown(pd.DataFrame(rows), {"budget": "g", "env + agent share": ".1%"}, digits=3)


def correlation_text(frame: pd.DataFrame) -> str:
    """Across all runs: does the cheap-fine-tune reward rank strategies like the final fine-tune?"""
    if len(frame) < 3:
        return "Too few runs for a reward / final-accuracy correlation."
    plain = frame[~frame.method.str.contains(r"\+")]
    parts = ["Reward vs accuracy after the final fine-tune (one point per run without ablation):", ""]
    for budget, group in plain.groupby("budget", sort=False):
        if len(group) >= 3:
            parts.append(
                f"- budget {budget:g}: Spearman ρ(best val reward, val acc after fine-tune) = "
                f"{group.best_val_reward.corr(group.val_after_finetune, method='spearman'):.2f}, "
                f"ρ(best val reward, test acc) = "
                f"{group.best_val_reward.corr(group.test_accuracy, method='spearman'):.2f} over {len(group)} runs"
            )
    parts.append(
        f"- all budgets: Pearson r(best val reward, test acc) = "
        f"{plain.best_val_reward.corr(plain.test_accuracy):.2f} over {len(plain)} runs"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
