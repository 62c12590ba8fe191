"""Benchmark: the compression methods side by side (Tucker-2, CP, tensor train, tensor ring, pruning, mixed).

A pretrained CIFAR ResNet (``--model``) on ``../shared`` CIFAR-10 at ``--flops 0.5``: the same search
for every ``--decomposition`` (DDPG, the same episodes, warm-up, cheap-fine-tune reward and seed),
then the same final fine-tune. One table: best validation reward (the selection criterion), test
accuracy after the final fine-tune, FLOP and parameter ratios, the latency the search measured
(batch 1 and 64, with the speed-up over the dense model), the batch-64 speed-up of both models in
their fastest inference form and its ratio to the FLOP speed-up (issue 17's measure), the residual
blocks the chosen strategy prunes (``pruned / pairs``: how ``mixed`` split them), appended to
``experiments/RESULTS.md`` with a line naming the best method for each goal.

Run from the repository root::

    python experiments/bench_methods.py
    python experiments/bench_methods.py --episodes 100 --final-epochs 5 --device cuda
    python experiments/bench_methods.py --model resnet56 --methods tucker2 prune mixed --episodes 200
    python experiments/bench_methods.py --dataset digits --model tiny --methods tucker2 tt \
        --episodes 2 --final-epochs 0.1 --no-append   # a smoke test on the embedded data
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
import recording

METHODS = ("tucker2", "cp", "tt", "tr")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flops", type=float, default=0.5, help="budget (default: %(default)s)")
    p.add_argument(
        "--methods", nargs="+", default=list(METHODS), help="decompositions (default: %(default)s)"
    )
    p.add_argument("--agent", default="ddpg", help="(default: %(default)s)")
    p.add_argument(
        "--episodes", type=int, default=40, help="reward evaluations per run (default: %(default)s)"
    )
    p.add_argument("--warmup", type=int, help="DDPG warm-up episodes (default: a quarter of the episodes)")
    p.add_argument("--final-epochs", type=float, default=1.0, help="final fine-tune (default: %(default)s)")
    recording.add_cifar_options(p, out="bench-runs/methods")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.episodes // 4)
    base = [
        *recording.cifar_run_args(args),
        "--flops", str(args.flops),
        "--agent", args.agent,
        "--episodes", str(args.episodes),
        "--warmup", str(warmup),
        "--final-epochs", str(args.final_epochs),
    ]  # fmt: skip
    runs = {
        method: recording.run_search(
            f"flops{args.flops:g}-{method}-seed{args.seed}", [*base, "--decomposition", method], args.out
        )
        for method in args.methods
    }
    reused = sum(run.reused for run in runs.values())
    first = next(iter(runs.values()))
    dense = first.report["dense"]
    table = results_frame(runs)
    lines = [
        *session.header(
            f"Compression methods ({args.model}, {recording.DATASETS[args.dataset]}, --flops {args.flops:g})",
            args.device,
            first.report["device"],
        ),
        f"- runs: {len(runs) - reused} made, {reused} complete runs of an earlier invocation read from "
        f"`{args.out}`",
        f"- every method: {args.agent}, {args.episodes} episodes ({warmup} warm-up), reward = val accuracy on "
        f"{args.reward_val_images or 'all'} held-out images after BN re-estimation + {args.finetune_steps} "
        f"SGD steps, final fine-tune {args.final_epochs:g} epoch(s), seed {args.seed}"
        + (f", `{args.search_args}`" if args.search_args else "")
        + f"; dense test accuracy {dense['test_accuracy']:.4f}, {dense['macs'] / 1e6:.2f} M MACs, "
        f"{dense['params'] / 1e6:.3f} M parameters",
        "",
        results_table(table),
        "",
        goals_line(table),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


def results_frame(runs: dict[str, recording.SearchRun]) -> pd.DataFrame:
    """One row per method: the figures of its run (NaN latency when the run measured none)."""
    rows = []
    for method, run in runs.items():
        report = run.report
        latency = report.get("latency_ms", {})
        row = {
            "method": method,
            "best val reward": recording.best_val_reward(run),
            "test acc": report["compressed"]["test_accuracy"],
            "Δ test vs dense": report["test_accuracy_delta"],
            "FLOP ratio": report["compressed"]["flops_ratio"],
            "param ratio": report["compressed"]["params_ratio"],
            "pruned / pairs": pruned_pairs(run),
        }
        for batch in ("batch1", "batch64"):
            entry = latency.get(batch, {})
            row[f"{batch} ms"] = entry.get("compressed", float("nan"))
            row[f"{batch} speed-up"] = entry.get("speedup", float("nan"))
        fast = latency.get("batch64", {}).get("speedup_fast", float("nan"))
        row["b64 speed-up fast"] = fast
        row["b64 fast / FLOP speed-up"] = fast * report["compressed"]["flops_ratio"]
        row["search s"] = report["search_seconds"]
        row["run wall s"] = run.wall_s
        rows.append(row)
    return pd.DataFrame(rows)


def pruned_pairs(run: recording.SearchRun) -> str:
    """``k / n``: residual blocks (prunable pairs) whose channels the chosen strategy prunes, of all."""
    from rlrank.describe import describe_layers
    from rlrank.models import ModelSpec, build_model
    from rlrank.planning import searched_layers

    best = json.loads((run.run_dir / "stage-1" / "best_strategy.json").read_text())
    config = run.config
    channels, size = (1, 8) if config["dataset"] == "digits" else (3, 32)
    spec = ModelSpec(config["model"], 10, channels, size)
    pairs = len(searched_layers(describe_layers(build_model(spec), (channels, size, size)), "prune"))
    pruned = sum(layer["method"] == "prune" for layer in best["layers"])
    return f"{pruned} / {pairs}"


def _latency(ms: float, speedup: float, digits: int) -> str | None:
    return None if pd.isna(ms) else f"{ms:.{digits}f} ({speedup:.2f}x)"


def results_table(frame: pd.DataFrame) -> str:
    """The Markdown table of :func:`results_frame`, latency as ``ms (speed-up)``."""
    shown = frame.drop(columns=["batch1 ms", "batch1 speed-up", "batch64 ms", "batch64 speed-up"])
    for batch, digits in (("batch1", 2), ("batch64", 1)):
        column = f"latency b{batch[5:]} ms (speed-up)"
        pairs = zip(frame[f"{batch} ms"], frame[f"{batch} speed-up"], strict=True)
        cells = [_latency(ms, speedup, digits) for ms, speedup in pairs]
        shown.insert(shown.columns.get_loc("b64 speed-up fast"), column, pd.Series(cells, dtype=object))
    formats = {
        "Δ test vs dense": "+.4f",
        "FLOP ratio": ".3f",
        "param ratio": ".3f",
        "b64 speed-up fast": ".2f",
        "b64 fast / FLOP speed-up": ".2f",
        "search s": ".0f",
        "run wall s": ".0f",
    }
    return recording.markdown(shown, formats)


def goals_line(frame: pd.DataFrame) -> str:
    """Which method wins each goal in this table (accuracy, parameters, latency)."""
    picks = [
        f"test accuracy: {frame.loc[frame['test acc'].idxmax(), 'method']}",
        f"fewest parameters: {frame.loc[frame['param ratio'].idxmin(), 'method']}",
    ]
    for batch in ("batch1", "batch64"):
        if frame[f"{batch} ms"].notna().any():
            picks.append(f"lowest latency at {batch}: {frame.loc[frame[f'{batch} ms'].idxmin(), 'method']}")
    return "- best in this table for " + "; ".join(picks) + " (one seed each)"


if __name__ == "__main__":
    raise SystemExit(main())
