"""Benchmark: episodes per hour with reward evaluation on Ray workers (``--workers``).

The same random search (``--agent random``: its strategies do not depend on rewards, so every
configuration prices the same strategies) of a pretrained CIFAR ResNet on ``../shared`` CIFAR-10,
run once per ``--configs`` entry:

* ``inproc:T``: one episode at a time in the search's own process, ``--threads T`` (no Ray);
* ``W:T``: ``--workers W --threads-per-worker T``;
* ``W:T:G``: the same with ``--gpus-per-worker G`` (``4:2:0.25``: four workers sharing one GPU).

Per configuration: the search's wall time and episodes per hour (from the stage's search time, so
data loading, the factor cache and Ray's start are counted apart, as "setup"), the mean time of one
evaluation on a worker, and the largest reward difference to the first configuration (the same
strategy priced with another thread count differs only in float rounding). Then, on paper, the
wall time of a 400-episode search on a cluster of ``--paper-workers`` workers from the measured
costs: the driver's serial share per episode (agent + env) and one evaluation's cost, those of the
first configuration, or, with ``--paper-model``, of a short in-process probe search of that model
(untrained weights: the cost of an episode does not depend on them). Appended to
``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_workers.py
    python experiments/bench_workers.py --device cuda --configs inproc:4 4:2:0.25 8:1:0.125  # one GPU
    python experiments/bench_workers.py --dataset digits --model tiny --episodes 6 --no-append  # smoke
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import recording


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=40, help="(default: %(default)s)")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["inproc:2", "1:2", "2:1"],
        help="inproc:THREADS, WORKERS:THREADS_PER_WORKER or WORKERS:THREADS_PER_WORKER:GPUS_PER_WORKER "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--paper-episodes",
        type=int,
        default=400,
        help="episodes of the on-paper search (default: %(default)s)",
    )
    p.add_argument(
        "--paper-workers",
        type=int,
        nargs="+",
        default=[1, 8, 32],
        help="worker counts of the on-paper cluster (default: %(default)s)",
    )
    p.add_argument(
        "--paper-model",
        default=None,
        help="price the on-paper search with this model's measured episode cost (a probe search of "
        "--probe-episodes in process, untrained weights), e.g. resnet18",
    )
    p.add_argument("--probe-episodes", type=int, default=4, help="(default: %(default)s)")
    recording.add_cifar_options(p, out="bench-runs/workers")
    return p.parse_args(argv)


def probe_args(args: argparse.Namespace) -> list[str]:
    """A short in-process search of ``--paper-model`` on the benchmark's data, for its episode cost."""
    search = recording.cifar_search_args(
        args.paper_model, args.finetune_steps, args.reward_val_images, dataset=args.dataset
    )
    if "--checkpoint" in search:  # no pretrained weights for it: an episode costs the same untrained
        at = search.index("--checkpoint")
        del search[at : at + 2]
    return [
        *search,
        "--dense-epochs", "0",
        "--agent", "random",
        "--episodes", str(args.probe_episodes),
        "--final-epochs", "0",
        "--no-latency",
        "--seed", str(args.seed),
        "--threads", "2",
    ]  # fmt: skip


def config_args(config: str) -> list[str]:
    """``rlrank.search`` options of one ``--configs`` entry."""
    where, threads, *gpus = config.split(":")
    if where == "inproc":
        return ["--threads", threads]
    return [
        "--workers",
        where,
        "--threads-per-worker",
        threads,
        *(["--gpus-per-worker", *gpus] if gpus else []),
    ]


def describe(config: str) -> str:
    where, threads, *gpus = config.split(":")
    if where == "inproc":
        return f"in process, {threads} thread(s), no Ray"
    shared = f", {gpus[0]} GPU each" if gpus else ""
    return f"{where} worker(s) x {threads} thread(s){shared}"


FORMATS = {
    "episodes": "d",
    "setup s": ".0f",
    "search s": ".0f",
    "episodes / hour": ".0f",
    "speed-up": ".2f",
    "evaluation s": ".2f",
    "driver s / episode": ".3f",
    "largest Δ reward": ".1e",
    "best reward": ".4f",
}


def row_of(config: str, run: recording.SearchRun, reference: pd.DataFrame | None) -> dict:
    stage = run.report["stages"][-1]
    frame = run.episodes
    search_s = float(stage["search_seconds"])
    evaluation = frame[["time_decompose", "time_finetune", "time_evaluate"]].sum(axis=1)
    row = {
        "configuration": describe(config),
        "episodes": len(frame),
        "setup s": run.wall_s - search_s - float(stage["finetune_seconds"]),
        "search s": search_s,
        "episodes / hour": 3600 * len(frame) / search_s,
        "evaluation s": float(evaluation.mean()),
        "driver s / episode": float((frame["time_agent"] + frame["time_env"]).mean()),
        "best reward": float(stage["best_reward"]),
        "workers seen": ", ".join(str(w) for w in sorted(frame["worker"].dropna().unique())),
        "device": run.report["device"],
    }
    if reference is not None:
        difference = frame["reward"].to_numpy() - reference["reward"].to_numpy()
        row["largest Δ reward"] = float(np.abs(difference).max())
    return row


def on_paper(rows: pd.DataFrame, episodes: int, workers: list[int]) -> pd.DataFrame:
    """Wall time of an ``episodes``-episode search on ``workers`` workers, from measured costs.

    The driver plays episodes one after another (agent + env, serial); each worker prices one
    strategy at a time. With ``W`` workers the search takes about
    ``max(episodes * driver, episodes / W * evaluation)`` plus the setup measured here.
    """
    measured = rows.iloc[0]
    out = []
    for w in workers:
        search = max(episodes * measured["driver s / episode"], episodes / w * measured["evaluation s"])
        out.append({"workers": w, "search h": search / 3600, "episodes / hour": 3600 * episodes / search})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    base = [
        *recording.cifar_run_args(args),
        "--agent", "random",
        "--episodes", str(args.episodes),
        "--final-epochs", "0",
        "--no-latency",
    ]  # fmt: skip
    rows, reference = [], None
    for config in args.configs:
        on = "" if args.device in ("auto", "cpu") else f"-{args.device}"
        name = f"{args.model}-{config.replace(':', 'x')}{on}-seed{args.seed}"
        run = recording.run_search(name, [*base, *config_args(config)], args.out)
        rows.append(row_of(config, run, reference))
        if reference is None:
            reference = run.episodes
    table = pd.DataFrame(rows)
    table.insert(4, "speed-up", table["episodes / hour"] / table["episodes / hour"].iloc[0])
    costs, priced = table, f"the first row's ({args.model})"
    if args.paper_model:
        probe = recording.run_search(f"{args.paper_model}-probe-seed{args.seed}", probe_args(args), args.out)
        costs = pd.DataFrame([row_of("inproc:2", probe, None)])
        priced = f"{args.paper_model}'s (a {args.probe_episodes}-episode probe in process, 2 threads)"
    paper = on_paper(costs, args.paper_episodes, args.paper_workers)
    lines = [
        *session.header(
            f"Episodes per hour on Ray workers ({args.model}, {recording.DATASETS[args.dataset]})",
            args.device,
            ", ".join(sorted({str(r["device"]) for r in rows})),
        ),
        f"- every search: random search, Tucker-2, {args.episodes} episodes, {args.finetune_steps} SGD steps "
        f"per reward on {args.reward_val_images} held-out images, no final fine-tune, seed {args.seed}; "
        "episodes / hour from the stage's search time (setup: data, factor cache, Ray start, apart)",
        "",
        recording.markdown(table.drop(columns="device"), FORMATS),
        "",
        f"On paper, {args.paper_episodes} episodes at {priced} measured costs (driver "
        f"{costs['driver s / episode'].iloc[0]:.3f} s serial per episode, one evaluation "
        f"{costs['evaluation s'].iloc[0]:.2f} s per worker, each worker as fast as this machine):",
        "",
        recording.markdown(paper, {"workers": "d", "search h": ".2f", "episodes / hour": ".0f"}),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
