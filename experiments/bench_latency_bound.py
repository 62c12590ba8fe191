"""Benchmark: the best "measured / FLOP speed-up" any strategy can reach, from the latency table.

Issue 17 asks a latency-aware search for a batch-64 speed-up of at least 0.8x its FLOP speed-up.
Whether any strategy at all gets there is a property of the device and the method, not of the
search: for each ``--models`` and ``--decompositions`` this script takes the run's own per-layer
latency table (:mod:`rlrank.latency_table`, measured on this device at ``--batch`` or read from the
cache the searches fill) and, for each FLOP ratio in ``--flop-ratios``, solves exactly (a knapsack
over every searched layer's ratio, ``--points`` ratios each, or dense) for the strategy with the
lowest predicted latency among those keeping about that fraction of the FLOPs, and for the
strategy with the best predicted "speed-up / FLOP speed-up" among those keeping at most it. Predicted, not measured: the
table's sum-of-layers model read 0.75 where re-timing measured 0.71-0.90 (RESULTS.md, "Latency vs
FLOPs"); the accuracy of these strategies is not priced (they are the latency optimum, not the
accuracy one). Appended to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_latency_bound.py
    python experiments/bench_latency_bound.py --dataset digits --models tiny --points 8 --no-append  # smoke
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import recording

NEAR = 0.02
"""Strategies within this much below a FLOP ratio count as "at" it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recording.add_dataset_option(p)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"], help="(default: %(default)s)")
    p.add_argument("--decompositions", nargs="+", default=["tucker2", "prune"], help="(default: %(default)s)")
    p.add_argument(
        "--flop-ratios", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8], help="(default: %(default)s)"
    )
    p.add_argument("--batch", type=int, default=64, help="latency batch (default: %(default)s)")
    p.add_argument("--points", type=int, default=64, help="ratios per layer (default: %(default)s)")
    p.add_argument("--min-ratio", type=float, default=0.05, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def fewest_ms(ms: np.ndarray, macs: np.ndarray, max_macs: float, buckets: int = 4096) -> np.ndarray:
    """The knapsack: for each total of MACs kept (in ``max_macs / buckets`` units, rounded up), the
    fewest milliseconds of one choice per step (row) reaching it, ``inf`` where none does.

    Args:
        ms: ``(steps, choices)`` milliseconds of each step at each choice.
        macs: ``(steps, choices)`` MACs of each step at each choice.
        max_macs: The largest MAC total of interest.
        buckets: MAC units.
    """
    unit = max(float(max_macs), 1.0) / buckets
    cost = np.ceil(np.asarray(macs, dtype=np.float64) / unit - 1e-9).astype(np.int64)
    fewest = np.full(buckets + 1, np.inf)
    fewest[0] = 0.0
    for step_cost, step_ms in zip(cost, np.asarray(ms, dtype=np.float64), strict=True):
        best = np.full(buckets + 1, np.inf)
        for c, t in zip(step_cost, step_ms, strict=True):
            if c <= buckets:
                best[c:] = np.minimum(best[c:], fewest[: buckets + 1 - c] + t)
        fewest = best
    return fewest


def choices(steps, decomposition: str, table, points: int, min_ratio: float):  # noqa: ANN001
    """Per searched layer, the milliseconds and MACs of each ratio it may play (and of staying dense),
    priced as the environment prices them (:func:`rlrank.envs.latency_budget.plan_ms`)."""
    from rlrank.envs.latency_budget import plan_ms
    from rlrank.planning import plan_layer

    ms, macs = [], []
    for step in steps:
        entry = table.layers[step.name]
        row_ms, row_macs = [entry.dense_ms], [plan_layer(step, 1.0, decomposition).macs]
        for ratio in np.linspace(min_ratio, 1.0, points):
            plan = plan_layer(step, float(ratio), decomposition)
            row_ms.append(plan_ms(entry, step, plan))
            row_macs.append(plan.macs)
        ms.append(row_ms)
        macs.append(row_macs)
    return np.asarray(ms), np.asarray(macs)


def bounds(args: argparse.Namespace, model_name: str, decomposition: str) -> list[dict]:
    import torch

    from rlrank.cache_dir import cache_dir
    from rlrank.describe import describe_layers
    from rlrank.flops import count_model
    from rlrank.latency_table import latency_table
    from rlrank.models import ModelSpec, build_model
    from rlrank.planning import searched_layers

    shape = (1, 8, 8) if args.dataset == "digits" else (3, 32, 32)
    model = build_model(ModelSpec(model_name, 10, shape[0], shape[1])).eval()  # weights do not time
    layers = describe_layers(model, shape)
    steps = searched_layers(layers, decomposition)
    table = latency_table(
        model, steps, decomposition, shape, args.batch, torch.device("cpu"), cache_dir(), args.min_ratio
    )
    ms, macs = choices(steps, decomposition, table, args.points, args.min_ratio)
    total = count_model(model, shape).macs
    fixed_macs = total - float(macs[:, 0].sum())
    fewest = fewest_ms(ms, macs, total - fixed_macs)
    unit = (total - fixed_macs) / (len(fewest) - 1)
    kept = (fixed_macs + unit * np.arange(len(fewest))) / total  # FLOP ratio of each bucket (an upper bound)
    latency = (table.fixed_ms + fewest) / table.model_ms
    rows = []
    for flops in args.flop_ratios:
        within = np.flatnonzero((kept <= flops + 1e-9) & np.isfinite(latency))
        if len(within) == 0:
            continue  # below every strategy's FLOPs
        near = within[kept[within] > kept[within].max() - NEAR]  # strategies at about this FLOP ratio
        at = near[np.argmin(latency[near])]
        efficiency = kept[within] / latency[within]  # speed-up / FLOP speed-up
        best = within[np.argmax(efficiency)]
        rows.append(
            {
                "model": model_name,
                "method": decomposition,
                "FLOP ratio": flops,
                "fastest latency there": latency[at],
                "its speed-up / FLOP speed-up": kept[at] / latency[at],
                "best speed-up / FLOP speed-up at most there": float(efficiency.max()),
                "at FLOP ratio": kept[best],
                "and latency": latency[best],
                "dense ms": table.model_ms,
                "fixed ms": table.fixed_ms,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    session = recording.Session(argv)
    rows = [row for m in args.models for d in args.decompositions for row in bounds(args, m, d)]
    lines = [
        *session.header(f"The best latency per FLOP any strategy reaches ({', '.join(args.models)})", "cpu"),
        f"- predicted from each model's latency table at batch {args.batch} ({args.threads} torch threads; "
        "measured once per model, method and device, or read from the cache), fastest inference form; "
        f"knapsack over {args.points} ratios per layer in [{args.min_ratio:g}, 1] and dense; latency as a "
        f"fraction of the dense model's; 'fastest latency there': the fastest strategy keeping at most the "
        f"FLOP ratio and within {NEAR:g} of it; 'best ... at most there': the strategy with the best "
        "speed-up / FLOP speed-up among all keeping at most that FLOP ratio (its FLOP ratio and latency)",
        "",
        recording.markdown(pd.DataFrame(rows), FORMATS),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


FORMATS = {
    "FLOP ratio": ".2f",
    "fastest latency there": ".3f",
    "its speed-up / FLOP speed-up": ".2f",
    "best speed-up / FLOP speed-up at most there": ".2f",
    "at FLOP ratio": ".3f",
    "and latency": ".3f",
    "dense ms": ".1f",
    "fixed ms": ".1f",
}


if __name__ == "__main__":
    raise SystemExit(main())
