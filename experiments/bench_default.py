"""Benchmark: the README's main job, and DDPG vs the baselines on the embedded default.

1. Runs the README's main command as it stands (``python -m rlrank.search --model resnet18
   --flops 0.5``: trains the dense ResNet-18 on digits, 100 DDPG episodes, final fine-tune) and
   times it.
2. Runs every baseline (``uniform``, ``energy``, ``vbmf``, ``random`` with DDPG's number of
   episodes) and, with ``--seeds``, more DDPG seeds, all on the dense model the main job trained
   (``--checkpoint``), with the same split, budget, decomposition, reward and final fine-tune.

Appends a table to ``experiments/RESULTS.md``: best validation reward (the selection criterion),
test accuracy after the final fine-tune (reported, never used for selection), FLOP and parameter
ratios, reward evaluations, search and total wall time.

Run from the repository root::

    python experiments/bench_default.py
    python experiments/bench_default.py --seeds 0 1 --out /tmp/bench-default
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import recording


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", type=Path, default=Path("bench-runs/default"), help="run folders (default: %(default)s)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the DDPG and random rows")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=["uniform", "energy", "vbmf", "random"],
        help="baseline agents to run",
    )
    p.add_argument("--no-append", action="store_true", help="print the section instead of appending it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    common = ["--model", "resnet18", "--flops", "0.5"]

    main_job = recording.run_search("main-job", common, args.out)
    dense = main_job.run_dir / "dense.pt"
    with_dense = [*common, "--checkpoint", str(dense)]
    runs: dict[str, list[recording.SearchRun]] = {"ddpg": [main_job]}
    for seed in args.seeds:
        if seed != 0:
            runs["ddpg"].append(
                recording.run_search(f"ddpg-seed{seed}", [*with_dense, "--seed", str(seed)], args.out)
            )
    for agent in args.baselines:
        seeds = args.seeds if agent == "random" else [0]
        runs[agent] = [
            recording.run_search(
                f"{agent}-seed{s}", [*with_dense, "--agent", agent, "--seed", str(s)], args.out
            )
            for s in seeds
        ]

    dense_report = main_job.report["dense"]
    lines = [
        *session.header(
            "Embedded default: DDPG vs baselines (resnet18, digits, --flops 0.5)",
            "cpu",
            main_job.report["device"],
        ),
        f"- README main job (`python -m rlrank.search --model resnet18 --flops 0.5`, dense training "
        f"included): **{main_job.wall_s / 60:.1f} min** wall, dense test accuracy "
        f"{dense_report['test_accuracy']:.2%} -> compressed "
        f"{main_job.report['compressed']['test_accuracy']:.2%} at "
        f"{main_job.report['compressed']['flops_ratio']:.3f} of the FLOPs",
        "- every other row starts from the main job's dense model (`--checkpoint .../dense.pt`), same "
        "split (`--split-seed 0`), reward (10 SGD steps, common batches), Tucker-2 and final fine-tune "
        "(5 epochs); rules get one reward evaluation, DDPG and random search 100 each",
        "",
        "| agent | seeds | best val reward | test acc | Δ test vs dense | FLOP ratio | param ratio | "
        "reward evals | search s | run wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for agent, agent_runs in runs.items():
        rewards = [recording.best_val_reward(r) for r in agent_runs]
        tests = [r.report["compressed"]["test_accuracy"] for r in agent_runs]
        lines.append(
            f"| {agent} | {','.join(str(r.config['seed']) for r in agent_runs)} | "
            f"{_mean_spread(rewards, 4)} | {_mean_spread(tests, 4)} | "
            f"{statistics.mean(tests) - dense_report['test_accuracy']:+.4f} | "
            f"{statistics.mean(r.report['compressed']['flops_ratio'] for r in agent_runs):.3f} | "
            f"{statistics.mean(r.report['compressed']['params_ratio'] for r in agent_runs):.3f} | "
            f"{agent_runs[0].report['reward_evaluations']} | "
            f"{statistics.mean(r.report['search_seconds'] for r in agent_runs):.0f} | "
            f"{statistics.mean(r.wall_s for r in agent_runs):.0f} |"
        )
    section = "\n".join(lines) + "\n"
    recording.publish(section, append=not args.no_append)
    return 0


def _mean_spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
