"""Benchmark: applying a rank strategy from a cold vs a warm factor cache.

For each model (built for 32x32 inputs, i.e. ResNet-18 with its CIFAR stem; random initialization,
since the weights do not change the cost of an SVD or of building modules):

* **cold**: construct a :class:`rlrank.factor_cache.FactorCache`, ``prepare_all()`` (every layer's
  SVDs), plan a random rank vector (one ratio per layer, uniform in [0.1, 0.9]) and
  ``decompose_model`` -- what the first episode of a search pays;
* **warm**: plan a new random rank vector and ``decompose_model`` with the same cache -- what every
  later episode pays.

Each figure is the median over ``--repeats`` runs, each with a fresh random rank vector (and, for
cold, a fresh cache). The goal is warm >= 20x faster than cold. A Markdown section with the command,
date, device, torch version and wall time is appended to ``--results``.

Run from the repository root::

    python experiments/bench_decompose.py
    python experiments/bench_decompose.py --models resnet20 --repeats 5 --no-append --profile
    python experiments/bench_decompose.py --models tiny --repeats 1 --no-append   # a smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import recording
import torch

from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache
from rlrank.models import ModelSpec, build_model
from rlrank.planning import is_compressible, plan_layer
from rlrank.surgery import decompose_model

INPUT_SIZE = 32
RATIO_RANGE = (0.1, 0.9)


@dataclass
class Result:
    model: str
    layers: int
    compressible: int
    cold_s: float
    warm_s: float
    cold_runs: list[float]
    warm_runs: list[float]

    @property
    def speedup(self) -> float:
        return self.cold_s / self.warm_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet56"], help="registered model names"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median is reported)")
    parser.add_argument("--decomposition", default="tucker2", choices=["tucker2", "svd", "cp"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rank vectors")
    parser.add_argument(
        "--results",
        type=Path,
        default=recording.RESULTS,
        help="results file (default: experiments/RESULTS.md)",
    )
    parser.add_argument("--no-append", action="store_true", help="print only; leave the results file alone")
    parser.add_argument(
        "--profile", action="store_true", help="after timing, cProfile one warm application per model"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def random_plans(layers, decomposition: str, generator: torch.Generator):
    ratios = torch.empty(len(layers), dtype=torch.float64).uniform_(*RATIO_RANGE, generator=generator)
    return [plan_layer(layer, float(r), decomposition) for layer, r in zip(layers, ratios, strict=True)]


def bench_model(name: str, decomposition: str, repeats: int, seed: int, profile: bool) -> Result:
    model = build_model(ModelSpec(name, num_classes=10, in_channels=3, input_size=INPUT_SIZE)).eval()
    all_layers = describe_layers(model, (3, INPUT_SIZE, INPUT_SIZE))
    layers = [layer for layer in all_layers if is_compressible(layer, decomposition)]
    generator = torch.Generator().manual_seed(seed)

    cold_runs, cache = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        cache = FactorCache(model, layers, decomposition)
        cache.prepare_all()
        decompose_model(model, random_plans(layers, decomposition, generator), cache)
        cold_runs.append(time.perf_counter() - start)

    warm_runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        decompose_model(model, random_plans(layers, decomposition, generator), cache)
        warm_runs.append(time.perf_counter() - start)

    if profile:
        profiler = cProfile.Profile()
        plans = random_plans(layers, decomposition, generator)
        profiler.runcall(decompose_model, model, plans, cache)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(f"\n--- cProfile of one warm application, {name} ---\n{out.getvalue()}")

    return Result(
        name,
        len(all_layers),
        len(layers),
        statistics.median(cold_runs),
        statistics.median(warm_runs),
        cold_runs,
        warm_runs,
    )


def table(results: list[Result]) -> str:
    """One row per model: layers, median cold and warm times, speed-up, and every run's time."""
    rows = [
        {
            "model": r.model,
            "layers (compressible / all)": f"{r.compressible} / {r.layers}",
            "cold s": r.cold_s,
            "warm s": r.warm_s,
            "speed-up": r.speedup,
            "cold runs s": ", ".join(f"{t:.3f}" for t in r.cold_runs),
            "warm runs s": ", ".join(f"{t:.3f}" for t in r.warm_runs),
        }
        for r in results
    ]
    return recording.markdown(pd.DataFrame(rows), {"speed-up": lambda x: f"{x:.1f}x"}, digits=3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    load_before = recording.load_average()
    command = recording.command_line(argv)
    date = recording.utc_now()
    results = []
    for name in args.models:
        result = bench_model(name, args.decomposition, args.repeats, args.seed, args.profile)
        print(
            f"{name}: {result.compressible}/{result.layers} layers, cold {result.cold_s:.3f} s, "
            f"warm {result.warm_s:.3f} s, speed-up {result.speedup:.1f}x",
            flush=True,
        )
        results.append(result)
    wall = time.perf_counter() - began

    goal = "all meet" if all(r.speedup >= 20 for r in results) else "NOT all meet"
    section = "\n".join(
        [
            f"## Factor cache: cold vs warm strategy application ({args.decomposition}) — {date}",
            "",
            f"- command: `{command}`",
            f"- device: {recording.device_line()}",
            f"- torch {torch.__version__}, Python {platform.python_version()}",
            f"- load average (1 / 5 / 15 min) before: {load_before}, after: {recording.load_average()}",
            f"- total wall time of the script: {wall:.1f} s",
            f"- models built for {INPUT_SIZE}x{INPUT_SIZE} inputs (ResNet-18 with its CIFAR stem), random "
            "initialization (weights do not change the timing); rank ratios uniform in "
            f"[{RATIO_RANGE[0]}, {RATIO_RANGE[1]}] per layer; medians over {args.repeats} runs, each with "
            "a fresh random rank vector (cold: also a fresh cache). Cold = FactorCache construction + "
            "prepare_all + plan + decompose_model; warm = plan + decompose_model with the same cache.",
            "",
            table(results),
            "",
            f"Goal warm >= 20x faster than cold: {goal}.",
            "",
        ]
    )
    print()
    recording.publish(section, append=not args.no_append, results=args.results)
    if not args.no_append:
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
