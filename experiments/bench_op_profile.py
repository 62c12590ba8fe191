"""Benchmark: where a forward pass spends its time, convolutions vs the rest (issue 17's ceiling).

For each model (the dense CIFAR ResNet of ``../shared``, and the ``model.pt`` of any run folders
given), in its fastest inference form (``rlrank.inference.fastest_form``: BatchNorm folded, factor
groupings and memory layout as measured fastest), ``torch.profiler`` records ``--passes`` forward
passes at ``--batch`` (and they are timed again without it, in interleaved rounds: the profiler's
per-operator cost inflates its totals); each operator's self CPU time is summed into *convolution* (every
``aten::*conv*`` operator) and *the rest* (additions, ReLUs, pooling, layout copies, the linear
layer). If convolution time fell exactly with convolution FLOPs and the rest stayed, a model at
FLOP ratio ``f`` would run at best ``1 / (rest + conv * f)`` times faster than dense (shares of the
dense pass): the ceiling of "measured / FLOP speed-up" for that runtime. Appended to
``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_op_profile.py --runs RUN_FOLDER [RUN_FOLDER ...]
    python experiments/bench_op_profile.py --dataset digits --model tiny --passes 3 --no-append  # smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import recording


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recording.add_dataset_option(p)
    p.add_argument("--model", default="resnet20", help="the dense model (default: %(default)s)")
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders whose model.pt to profile")
    p.add_argument("--batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--passes", type=int, default=30, help="profiled forward passes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def dense_model(args: argparse.Namespace):  # noqa: ANN201 - torch is imported lazily
    """The dense model: the ``../shared`` checkpoint of ``--model``, or an untrained one (digits)."""
    from rlrank.models import ModelSpec, build_model, load_checkpoint

    if args.dataset == "digits":
        return build_model(ModelSpec(args.model, 10, 1, 8)), (1, 8, 8)
    model = build_model(ModelSpec(args.model, 10, 3, 32))
    load_checkpoint(model, str(recording.SHARED / "models" / "cifar-resnet" / f"{args.model}-jpeg.pt"))
    return model, (3, 32, 32)


def profile(model, input_shape: tuple[int, ...], batch: int, passes: int) -> dict[str, float]:  # noqa: ANN001
    """Milliseconds per forward pass in convolution operators and in the rest (self CPU time)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(batch, *input_shape)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                model(x)
    conv = rest = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000.0 / passes
        if "conv" in event.key:
            conv += ms
        else:
            rest += ms
    return {"conv ms": conv, "rest ms": rest}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from rlrank.flops import count_model
    from rlrank.inference import fastest_form
    from rlrank.model_file import load
    from rlrank.timing import time_interleaved

    torch.set_num_threads(args.threads)
    session = recording.Session(argv)
    dense, shape = dense_model(args)
    dense_macs = count_model(dense.eval(), shape).macs
    models = [("dense", dense)] + [(str(run), load(_model_file(run))) for run in args.runs]
    rows, fast_models = [], []
    for name, model in models:
        fast = fastest_form(model.eval(), shape, batch=args.batch)
        fast_models.append(fast)
        times = profile(fast, shape, args.batch, args.passes)
        rows.append({"model": name, "FLOP ratio": count_model(model, shape).macs / dense_macs, **times})
    with torch.inference_mode():  # without the profiler, whose per-operator cost distorts the totals
        plain = time_interleaved(fast_models, torch.randn(args.batch, *shape), args.passes)
    table = pd.DataFrame(rows)
    table["total ms"] = table["conv ms"] + table["rest ms"]
    table["conv share"] = table["conv ms"] / table["total ms"]
    base = table.iloc[0]
    table["conv speed-up"] = base["conv ms"] / table["conv ms"]
    table["ms unprofiled"] = plain
    table["measured speed-up"] = plain[0] / table["ms unprofiled"]
    ceiling = 1.0 / (base["rest ms"] / base["total ms"] + base["conv share"] * table["FLOP ratio"])
    table["ceiling speed-up"] = ceiling
    table["ceiling / FLOP speed-up"] = ceiling * table["FLOP ratio"]
    table["measured / FLOP speed-up"] = table["measured speed-up"] * table["FLOP ratio"]
    lines = [
        *session.header(f"Where a forward pass spends its time ({args.model}, batch {args.batch})", "cpu"),
        f"- every model in its fastest inference form; self CPU time of {args.passes} profiled passes "
        f"(`torch.profiler`), {args.threads} torch threads; 'conv' = every operator named `*conv*`; ceiling = "
        "dense time / (dense rest + dense conv x FLOP ratio), i.e. convolutions as much faster as their "
        "FLOPs and the rest unchanged; 'ms unprofiled' and the measured speed-up: the same models timed "
        "without the profiler (interleaved rounds, lower quartile), the profiler's own per-operator cost "
        "inflating its totals",
        "",
        recording.markdown(
            table,
            {
                "FLOP ratio": ".3f",
                "conv ms": ".2f",
                "rest ms": ".2f",
                "total ms": ".2f",
                "conv share": ".1%",
                "conv speed-up": ".2f",
                "ms unprofiled": ".2f",
                "measured speed-up": ".2f",
                "ceiling speed-up": ".2f",
                "ceiling / FLOP speed-up": ".2f",
                "measured / FLOP speed-up": ".2f",
            },
        ),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


def _model_file(run: Path) -> Path:
    """The final model of a run folder (its newest complete run when given a benchmark's folder)."""
    found = recording.complete_run(run) if not (run / "model.pt").is_file() else run
    if found is None or not (found / "model.pt").is_file():
        raise SystemExit(f"bench_op_profile: no finished run with a model.pt in {run}")
    return found / "model.pt"


if __name__ == "__main__":
    raise SystemExit(main())
