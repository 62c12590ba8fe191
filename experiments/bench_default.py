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
    python experiments/bench_default.py --model tiny --baselines uniform --no-append \\
        --search-args '--episodes 2 --dense-epochs 1 --final-epochs 0.1'   # a smoke test
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

import pandas as pd
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
    p.add_argument("--model", default="resnet18", help="(default: %(default)s, the README's)")
    p.add_argument(
        "--search-args",
        default="",
        help="extra rlrank.search options for every run (default: none, the README's main job), "
        "e.g. '--episodes 2 --dense-epochs 1' for a smoke test",
    )
    p.add_argument("--no-append", action="store_true", help="print the section instead of appending it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    common = ["--model", args.model, "--flops", "0.5", *shlex.split(args.search_args)]

    main_job = recording.run_search("main-job", common, args.out)
    with_dense = [*common, "--checkpoint", str(main_job.dense_model)]
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
    config = main_job.config
    command = " ".join(["python -m rlrank.search", *map(shlex.quote, common)])
    lines = [
        *session.header(
            f"Embedded default: DDPG vs baselines ({args.model}, digits, --flops 0.5)",
            "cpu",
            main_job.report["device"],
        ),
        f"- README main job (`{command}`, dense training "
        f"included): **{main_job.wall_s / 60:.1f} min** wall, dense test accuracy "
        f"{dense_report['test_accuracy']:.2%} -> compressed "
        f"{main_job.report['compressed']['test_accuracy']:.2%} at "
        f"{main_job.report['compressed']['flops_ratio']:.3f} of the FLOPs",
        f"- every other row starts from the main job's dense model (`--checkpoint .../{main_job.dense_model.name}`), same "
        f"split (`--split-seed {config['split_seed']}`), reward ({config['finetune_steps']} SGD steps, "
        f"common batches), Tucker-2 and final fine-tune ({config['final_epochs']:g} epochs); rules get one "
        f"reward evaluation, DDPG and random search {main_job.report['reward_evaluations']} each",
        "",
        results_table(runs, dense_report["test_accuracy"]),
    ]
    section = "\n".join(lines) + "\n"
    recording.publish(section, append=not args.no_append)
    return 0


def results_table(runs: dict[str, list[recording.SearchRun]], dense_test: float) -> str:
    """One row per agent (mean ± std over its seeds)."""
    rows = []
    for agent, agent_runs in runs.items():
        tests = [r.report["compressed"]["test_accuracy"] for r in agent_runs]
        rows.append(
            {
                "agent": agent,
                "seeds": ",".join(str(r.config["seed"]) for r in agent_runs),
                "best val reward": recording.mean_spread([recording.best_val_reward(r) for r in agent_runs]),
                "test acc": recording.mean_spread(tests),
                "Δ test vs dense": statistics.mean(tests) - dense_test,
                "FLOP ratio": statistics.mean(r.report["compressed"]["flops_ratio"] for r in agent_runs),
                "param ratio": statistics.mean(r.report["compressed"]["params_ratio"] for r in agent_runs),
                "reward evals": agent_runs[0].report["reward_evaluations"],
                "search s": statistics.mean(r.report["search_seconds"] for r in agent_runs),
                "run wall s": statistics.mean(r.wall_s for r in agent_runs),
            }
        )
    formats = {"Δ test vs dense": "+.4f", "FLOP ratio": ".3f", "param ratio": ".3f", "search s": ".0f"}
    return recording.markdown(pd.DataFrame(rows), {**formats, "run wall s": ".0f"})


if __name__ == "__main__":
    raise SystemExit(main())
