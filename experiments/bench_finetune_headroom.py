"""Benchmark: how far apart are a search's strategies after the final fine-tune?

Issue 14 asks the learned search for test accuracy, after the benchmark's one-epoch fine-tune, at
least 0.5 points above random search's. A search can only win by choosing a strategy that is better
*after* that fine-tune; this measures how much room there is. Per budget it runs (or reuses) the
selectors benchmark's random search (``bench_selectors.py --scale cpu``, same options and seed, same
run-folder name, so ``--out`` may point at that benchmark's runs), then gives the final fine-tune of
the run itself (same recipe, same generator seed) to: the ``--top`` best distinct strategies of its
episode log by reward, ``--quantiles`` strategies at evenly spaced quantiles of the rest (so that the
correlations span the range), and the center strategy the actions scale (the ALDS rule's, the log's
``center`` episode). The best strategy is fine-tuned again with ``--ft-seeds`` - 1 other generator
seeds: the fine-tune's own noise. Each fine-tuned model is measured on the test split (measured,
never used to choose) and on the validation images the reward never scored.

The first fine-tune of the best strategy repeats what the search run itself did, so its test accuracy
must match the run's report: the check that this script fine-tunes as the pipeline does.

Run from the repository root::

    python experiments/bench_finetune_headroom.py --budgets 0.5 0.3 --out /work/bench/headroom
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import recording
from bench_selectors import scale_of
from bench_top_strategies import logged_plans, prepared, run_config, top_rows, unseen_images
from scipy import stats

RESULTS_DIR = Path(__file__).parent / "results"
PICK = re.compile(r"top 1( \(center\))?")
"""The role of the strategy the search itself kept."""
FT_SEED_STRIDE = 104729
"""Added to the stage's fine-tune seed per extra fine-tune seed (a prime, far from the stage stride)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3], help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the random search's seed (default: %(default)s)")
    p.add_argument("--top", type=int, default=6, help="best distinct strategies (default: %(default)s)")
    p.add_argument(
        "--quantiles", type=int, default=3, help="strategies spread over the rest (default: %(default)s)"
    )
    p.add_argument(
        "--ft-seeds", type=int, default=3, help="fine-tunes of the best strategy (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    recording.add_dataset_option(p)
    p.add_argument("--model", help="override the preset's model")
    p.add_argument("--episodes", type=int, help="override the preset's episodes (warm-up: a quarter)")
    p.add_argument("--final-epochs", type=float, help="override the preset's final fine-tune epochs")
    p.add_argument("--finetune-steps", type=int, help="override the preset's SGD steps of the reward")
    p.add_argument("--reward-val-images", type=int, help="override the preset's reward images")
    p.add_argument("--out", type=Path, default=Path("bench-runs/headroom"), help="run folders")
    p.add_argument("--tag", default="", help="suffix of the CSV name")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the CSV goes")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def picked_rows(rows: list[dict], top: int, quantiles: int) -> list[tuple[str, dict]]:
    """The strategies to fine-tune: ``(role, row)`` for the best ``top``, ``quantiles`` of the rest at
    evenly spaced reward quantiles, and the center episode (when the log has one)."""
    best = top_rows(rows, top)
    center = next((r for r in rows if r.get("phase") == "center" and not r.get("failed")), None)
    chosen = {row["episode"] for row in best}
    picked = [
        (f"top {i + 1}" + (" (center)" if center is not None and row is center else ""), row)
        for i, row in enumerate(best)
    ]
    if center is not None and center["episode"] in chosen:
        center = None  # fine-tuned once, as a top strategy
    elif center is not None:
        chosen.add(center["episode"])
    rest = sorted(
        (r for r in rows if not r.get("failed") and r["episode"] not in chosen), key=lambda r: -r["reward"]
    )
    if rest and quantiles > 0:
        indices = {int(round(q * (len(rest) - 1))): q for q in np.linspace(0, 1, quantiles + 2)[1:-1]}
        picked += [(f"quantile {q:.2f}", rest[i]) for i, q in sorted(indices.items())]
    if center is not None:
        picked.append(("center", center))
    return picked


def finetune_strategies(run: Path, picks: list[tuple[str, dict]], ft_seeds: int) -> pd.DataFrame:
    """Fine-tune every picked strategy of ``run`` as its last stage does; one row per fine-tune."""
    import torch

    from rlrank.finetune import TrainConfig, evaluate, reestimate_bn, train_epochs
    from rlrank.planning import searched_layers
    from rlrank.stage import stage_factor_cache
    from rlrank.surgery import decompose_model

    config = run_config(run)
    setup = prepared(run, config)
    data = setup.data
    steps = searched_layers(setup.layers, config.decomposition, config.exclude)
    cache = stage_factor_cache(setup.model, steps, config, data)  # the search's own cache
    unseen = unseen_images(run, data.val.load(), config.reward_val_images)
    train = TrainConfig(
        epochs=config.final_epochs, lr=config.final_lr, batch_size=config.batch_size, distill=config.distill
    )
    records = []
    for role, row in picks:
        plans = logged_plans(row, steps)
        for ft_seed in range(ft_seeds if PICK.fullmatch(role) else 1):
            began = time.perf_counter()
            # the stage's generator (stage 1), or another one per extra fine-tune seed
            generator = torch.Generator().manual_seed(config.seed + 7919 + FT_SEED_STRIDE * ft_seed)
            model = decompose_model(setup.model, plans, cache)
            reestimate_bn(model, data, max(config.bn_batches, 1) * 4, config.batch_size, generator)
            before, _ = evaluate(model, data, unseen)
            train_epochs(model, data, train, generator, progress=False, keep_best=data.val)
            records.append(
                {
                    "role": role,
                    "episode": row["episode"],
                    "ft_seed": ft_seed,
                    "reward": row["reward"],
                    "params_ratio": row["params_ratio"],
                    "unseen val before": before,
                    "unseen val after": evaluate(model, data, unseen)[0],
                    "test after": evaluate(model, data, data.test)[0],
                    "seconds": time.perf_counter() - began,
                }
            )
            print(
                f"[{recording.utc_now()}] {role} (episode {row['episode']}, fine-tune seed {ft_seed}): "
                f"reward {row['reward']:.4f}, test after {records[-1]['test after']:.4f}, "
                f"{records[-1]['seconds']:.0f} s",
                flush=True,
            )
    return pd.DataFrame(records)


def summarize(frame: pd.DataFrame, reported: dict[float, float]) -> pd.DataFrame:
    """Per budget: the search's pick, the center, the top strategies' range after the fine-tune, the
    fine-tune's own noise and the rank correlations of the figures known before it with the test."""
    rows = []
    for budget, group in frame.groupby("budget", sort=False):
        first = group[group["ft_seed"] == 0]
        top = first[first["role"].str.startswith("top")]
        pick = group[group["role"].str.fullmatch(PICK.pattern)]
        center = first[first["role"].str.contains("center")]["test after"]
        rows.append(
            {
                "budget": budget,
                "search's pick (its report)": reported[budget],
                "search's pick (here)": pick[pick["ft_seed"] == 0]["test after"].iloc[0],
                "pick, fine-tune seeds": recording.mean_spread(pick["test after"]),
                "center": center.iloc[0] if len(center) else float("nan"),
                "top mean": top["test after"].mean(),
                "top best": top["test after"].max(),
                "best − pick": top["test after"].max() - pick[pick["ft_seed"] == 0]["test after"].iloc[0],
                "ρ(reward, test)": stats.spearmanr(first["reward"], first["test after"])[0],
                "ρ(unseen before, test)": stats.spearmanr(first["unseen val before"], first["test after"])[0],
                "ρ(params, test)": stats.spearmanr(first["params_ratio"], first["test after"])[0],
                "fine-tunes": len(group),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    from rlrank.run_folder import EPISODES_FILE
    from rlrank.runlog import read_rows

    scale = scale_of(argparse.Namespace(**{**vars(args), "scale": "cpu", "seeds": None}))
    frames, reported = [], {}
    for budget in args.budgets:
        cli = [
            *scale.search_args(args.dataset), "--device", args.device, "--flops", str(budget),
            "--agent", "random", "--seed", str(args.seed),
        ]  # fmt: skip
        run = recording.run_search(f"flops{budget}-random-seed{args.seed}", cli, args.out)
        reported[budget] = run.report["compressed"]["test_accuracy"]
        rows = read_rows(run.run_dir / "stage-1" / EPISODES_FILE)
        frame = finetune_strategies(run.run_dir, picked_rows(rows, args.top, args.quantiles), args.ft_seeds)
        frame.insert(0, "budget", budget)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    csv = recording.write_csv(
        frame, args.results / recording.tagged("finetune-headroom", args.tag), not args.no_append
    )
    lines = [
        *session.header(
            f"How far apart strategies are after the final fine-tune ({scale.model}, "
            f"{recording.DATASETS[args.dataset]})"
        ),
        f"- runs: `bench_selectors.py --scale cpu`'s random search, seed {args.seed} ({scale.episodes} "
        f"episodes, reward on {scale.reward_val_images} validation images), under `{args.out}`; "
        f"fine-tuned: its {args.top} best distinct strategies, {args.quantiles} at quantiles of the "
        f"rest, the center (ALDS) strategy, the best one with {args.ft_seeds} fine-tune seeds; the "
        f"run's final fine-tune "
        f"({scale.final_epochs:g} epoch, one-cycle, lr 0.01); test measured, never used to choose; "
        f"per-fine-tune CSV: `{csv}`",
        "",
        recording.markdown(summarize(frame, reported), {"budget": "g", "fine-tunes": "d"}),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
