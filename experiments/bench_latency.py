"""Benchmark: does latency follow the FLOPs? A FLOP-budget search against latency-aware searches.

For each ``--models`` (pretrained CIFAR ResNets on ``../shared`` CIFAR-10): the same DDPG search
(Tucker-2, or the method of ``--decomposition``, e.g. ``prune``) with ``--flops F`` alone, with
``--flops F --latency 1`` (the FLOP budget, and no layer left slower than dense where the FLOP
budget allows; ``--flops-latency`` gives another latency budget beside the FLOP one) and with
``--latency L`` alone (``--latency-targets``, each a fraction of the dense model's measured latency;
a target below what the method can reach on this device is reported as such, not run);
``--latency-center`` gives the searches with a latency budget another ``--action-center``. Every
compressed model is then timed again here, with the dense model and the other rows' models in the
same interleaved rounds (one dense baseline for all rows), at batch 1 and 64 (lower quartile of
``--rounds`` passes; all of it ``--timings`` times, medians reported with the range of the batch-64
ratio), as the search left it and in its fastest inference form
(:func:`rlrank.inference.fastest_form`: BatchNorm folded, each layer's factor convolutions grouped
as measured fastest). One table per model: FLOP speed-up, measured speed-ups, their ratio at batch
64 (the issue's goal: at least 0.8), test accuracy. Appended to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_latency.py
    python experiments/bench_latency.py --dataset digits --models tiny --episodes 2 \
        --final-epochs 0.1 --latency-targets 1.0 --rounds 3 --no-append   # smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import recording


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20"], help="(default: %(default)s)")
    p.add_argument("--flops", type=float, default=0.5, help="FLOP budget (default: %(default)s)")
    p.add_argument(
        "--decomposition",
        default="tucker2",
        help="method of every search, e.g. prune (default: %(default)s)",
    )
    p.add_argument(
        "--latency-targets",
        type=float,
        nargs="*",
        default=[0.9],
        help="latency budgets of the latency-only searches (default: %(default)s; none: no such search)",
    )
    p.add_argument(
        "--flops-latency",
        type=float,
        default=1.0,
        help="latency budget of the search given both budgets (default: %(default)s: no layer slower "
        "than dense)",
    )
    p.add_argument(
        "--latency-center",
        default=None,
        help="--action-center of the searches with a latency budget (default: the search's default)",
    )
    p.add_argument(
        "--timings",
        type=int,
        default=3,
        help="times the models are all timed again; figures are medians (default: %(default)s)",
    )
    p.add_argument("--episodes", type=int, default=40, help="(default: %(default)s)")
    p.add_argument("--final-epochs", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=60, help="timed passes per model and batch (default: %(default)s)"
    )
    recording.add_cifar_options(p, out="bench-runs/latency")
    return p.parse_args(argv)


def searches(args: argparse.Namespace) -> dict[str, list[str]]:
    """Run name suffix -> the budget options of that search."""
    center = ["--action-center", args.latency_center] if args.latency_center else []
    suffix = f"-center-{args.latency_center}" if args.latency_center else ""
    both = args.flops_latency
    runs = {
        f"flops{args.flops:g}": ["--flops", str(args.flops)],
        f"flops{args.flops:g}-latency{both:g}{suffix}": [
            "--flops",
            str(args.flops),
            "--latency",
            str(both),
            *center,
        ],
    }
    for target in args.latency_targets:
        runs[f"latency{target:g}{suffix}"] = ["--latency", str(target), *center]
    return runs


def time_models(runs: list[recording.SearchRun], rounds: int, timings: int = 1) -> list[dict]:
    """Per run, dense and compressed latency (ms) at batch 1 and 64, raw and in the fastest inference
    form: the dense model and every run's model timed in the same interleaved rounds, so that every
    row shares one dense baseline and a slow spell of the machine lands on all of them alike. The
    whole timing is done ``timings`` times: each figure is the median over them, and
    ``b64 fast speed-ups`` keeps every timing's batch-64 speed-up of the fastest forms."""
    import torch

    import rlrank
    from rlrank.inference import fastest_form
    from rlrank.timing import time_interleaved

    dense = _dense_of(runs[0])  # every run of one model starts from the same dense model
    shape = _input_shape(runs[0])
    compressed = [rlrank.load(run.run_dir / "model.pt") for run in runs]
    out: list[dict[str, float]] = [{} for _ in runs]
    n = len(runs)
    with torch.no_grad():
        for batch in (1, 64):
            x = torch.randn((batch, *shape))
            fast_dense = fastest_form(dense, shape, batch)
            fast = [fastest_form(model, shape, batch) for model in compressed]
            repeats = np.asarray(
                [time_interleaved([dense, fast_dense, *compressed, *fast], x, rounds) for _ in range(timings)]
            )
            times = np.median(repeats, axis=0)
            for i in range(n):
                out[i].update(
                    {
                        f"b{batch} dense": times[0],
                        f"b{batch} dense fast": times[1],
                        f"b{batch} compressed": times[2 + i],
                        f"b{batch} compressed fast": times[2 + n + i],
                    }
                )
                if batch == 64:
                    out[i]["b64 fast speed-ups"] = (repeats[:, 1] / repeats[:, 2 + n + i]).tolist()
    return out


def _input_shape(run: recording.SearchRun) -> tuple[int, int, int]:
    from rlrank.model_file import load_metadata

    arch = load_metadata(run.run_dir / "model.pt")["arch"]
    return (arch["in_channels"], arch["input_size"], arch["input_size"])


def _dense_of(run: recording.SearchRun):
    """The dense model the run started from (its checkpoint, or the one it trained)."""
    import rlrank
    from rlrank.model_file import load_metadata
    from rlrank.models import ModelSpec, build_model, load_checkpoint

    checkpoint = run.config.get("checkpoint")
    if not checkpoint:
        return rlrank.load(run.dense_model)
    model = build_model(ModelSpec.from_dict(load_metadata(run.run_dir / "model.pt")["arch"]))
    load_checkpoint(model, checkpoint)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    warmup = max(1, args.episodes // 4)
    sections = []
    for model in args.models:
        args.model = model
        base = [
            *recording.cifar_run_args(args),
            "--episodes", str(args.episodes),
            "--warmup", str(warmup),
            "--final-epochs", str(args.final_epochs),
            "--decomposition", args.decomposition,
        ]  # fmt: skip
        rows: list[dict | None] = []
        done: list[tuple[int, recording.SearchRun, list[str]]] = []
        for suffix, budget in searches(args).items():
            method = "" if args.decomposition == "tucker2" else f"{args.decomposition}-"
            name = f"{model}-{method}{suffix}-seed{args.seed}"
            try:
                run = recording.run_search(name, [*base, *budget], args.out)
            except RuntimeError as exc:
                log = Path(args.out) / f"{name}.log"
                reason = log.read_text().strip().splitlines()[-1] if log.is_file() else str(exc)
                rows.append({"search": " ".join(budget), "note": reason[-160:]})
                continue
            done.append((len(rows), run, budget))
            rows.append(None)
        if done:  # every finished run's model timed together, against one dense baseline
            timed = time_models([run for _, run, _ in done], args.rounds, args.timings)
            for (index, run, budget), times in zip(done, timed, strict=True):
                rows[index] = row_of(run, budget, times)
        sections.append((model, pd.DataFrame(rows)))
    lines = [
        *session.header(
            f"Latency vs FLOPs ({', '.join(args.models)}, {recording.DATASETS[args.dataset]})", "cpu"
        ),
        f"- every search: {METHOD_NAMES.get(args.decomposition, args.decomposition)}, DDPG, {args.episodes} episodes ({warmup} warm-up), {args.finetune_steps} "
        f"SGD steps per reward, final fine-tune {args.final_epochs:g} epoch(s), seed {args.seed}; latency "
        f"re-timed here, the dense model and every row's model in the same interleaved rounds (lower "
        f"quartile of {args.rounds} passes: one dense baseline for all rows), {args.timings} times: medians, "
        "and the range of the batch-64 ratio over the timings; 'fast' = "
        "`rlrank.inference.fastest_form` (BN folded, factor convolutions grouped as measured fastest)",
    ]
    for model, frame in sections:
        lines += ["", f"**{model}**", "", recording.markdown(frame, FORMATS)]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


METHOD_NAMES = {"tucker2": "Tucker-2", "prune": "channel pruning", "svd": "SVD", "cp": "CP"}

FORMATS = {
    "FLOP ratio": ".3f",
    "FLOP speed-up": ".2f",
    "predicted latency": ".3f",
    "b1 speed-up": ".2f",
    "b64 speed-up": ".2f",
    "b1 speed-up fast": ".2f",
    "b64 speed-up fast": ".2f",
    "b64 measured / FLOP speed-up (fast)": ".2f",
    "test acc": ".4f",
    "Δ test": "+.4f",
    "run wall s": ".0f",
}


def row_of(run: recording.SearchRun, budget: list[str], times: dict) -> dict:
    report = run.report
    flops = report["compressed"]["flops_ratio"]
    row = {
        "search": " ".join(budget),
        "FLOP ratio": flops,
        "FLOP speed-up": 1 / flops,
        "predicted latency": report.get("predicted_latency_ratio", float("nan")),
    }
    for batch in (1, 64):
        row[f"b{batch} speed-up"] = times[f"b{batch} dense"] / times[f"b{batch} compressed"]
        row[f"b{batch} speed-up fast"] = times[f"b{batch} dense fast"] / times[f"b{batch} compressed fast"]
    row["b64 measured / FLOP speed-up (fast)"] = row["b64 speed-up fast"] / row["FLOP speed-up"]
    each = [speedup * flops for speedup in times["b64 fast speed-ups"]]
    row["range over timings"] = f"{min(each):.2f}–{max(each):.2f}"
    row["b64 ms dense → compressed (fast)"] = (
        f"{times['b64 dense fast']:.1f} → {times['b64 compressed fast']:.1f}"
    )
    row["test acc"] = report["compressed"]["test_accuracy"]
    row["Δ test"] = report["test_accuracy_delta"]
    row["run wall s"] = run.wall_s
    row["note"] = ""
    return row


if __name__ == "__main__":
    raise SystemExit(main())
