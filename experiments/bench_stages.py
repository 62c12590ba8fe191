"""Benchmark: one stage vs several stages at the same total search and fine-tune effort.

ResNet-20 on ``../shared`` CIFAR-10 at ``--flops 0.3`` (Tucker-2, DDPG): one stage with
``episodes`` episodes and ``epochs`` of final fine-tune, against ``stages`` stages (geometric
budgets ending at 0.3) with ``episodes / stages`` episodes each and ``epochs / stages`` of
fine-tune after each stage -- the same number of reward evaluations and fine-tune epochs in all.
Appends the test accuracy of each (and every stage's) to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_stages.py
    python experiments/bench_stages.py --episodes 90 --epochs 6 --device cuda
    python experiments/bench_stages.py --dataset digits --model tiny --episodes 2 --stages 2 \
        --epochs 0.2 --no-append   # a smoke test on the embedded data
"""

from __future__ import annotations

import argparse

import pandas as pd
import recording


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flops", type=float, default=0.3, help="final budget (default: %(default)s)")
    p.add_argument(
        "--stages", type=int, default=3, help="stages of the multi-stage run (default: %(default)s)"
    )
    p.add_argument(
        "--episodes", type=int, default=36, help="reward evaluations in all (default: %(default)s)"
    )
    p.add_argument("--epochs", type=float, default=1.5, help="fine-tune epochs in all (default: %(default)s)")
    recording.add_cifar_options(p, out="bench-runs/stages")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    base = [*recording.cifar_run_args(args), "--flops", str(args.flops)]
    per_stage = args.episodes // args.stages
    single = recording.run_search(
        "stages1",
        [*base, "--episodes", str(args.episodes), "--warmup", str(max(1, args.episodes // 4)),
         "--final-epochs", str(args.epochs)],
        args.out,
    )  # fmt: skip
    multi = recording.run_search(
        f"stages{args.stages}",
        [*base, "--stages", str(args.stages), "--episodes", str(per_stage), "--warmup", str(max(1, per_stage // 4)),
         "--stage-epochs", str(args.epochs / args.stages), "--final-epochs", str(args.epochs / args.stages)],
        args.out,
    )  # fmt: skip

    dense = single.report["dense"]
    lines = [
        *session.header(
            f"Multi-stage vs one stage ({args.model}, {recording.DATASETS[args.dataset]}, --flops {args.flops:g})",
            args.device,
            single.report["device"],
        ),
        f"- both: DDPG, Tucker-2, reward = val accuracy on {args.reward_val_images} held-out images after "
        f"{args.finetune_steps} SGD steps; {args.episodes} reward evaluations and {args.epochs:g} fine-tune "
        f"epochs in all (multi-stage: {per_stage} episodes and {args.epochs / args.stages:g} epochs per stage, "
        "geometric budgets); dense test accuracy "
        f"{dense['test_accuracy']:.4f}",
        "",
        stage_table([single, multi]),
        "",
        final_table([single, multi]),
    ]
    section = "\n".join(lines) + "\n"
    recording.publish(section, append=not args.no_append)
    return 0


def stage_table(runs: list[recording.SearchRun]) -> str:
    """One row per run and stage: budget, cost, best reward, val accuracy after the fine-tune, time."""
    rows = [
        {
            "run": run.name,
            "stage": stage["stage"],
            "budget": stage["budget"],
            "FLOP ratio": stage["flops_ratio"],
            "param ratio": stage["params_ratio"],
            "best val reward": stage["best_reward"],
            "val acc after fine-tune": stage["val_accuracy"],
            "episodes": stage["episodes"],
            "stage wall s": stage["search_seconds"] + stage["finetune_seconds"],
        }
        for run in runs
        for stage in run.report["stages"]
    ]
    formats = {"budget": ".3f", "FLOP ratio": ".3f", "param ratio": ".3f", "stage wall s": ".0f"}
    return recording.markdown(pd.DataFrame(rows), formats)


def final_table(runs: list[recording.SearchRun]) -> str:
    """One row per run: test accuracy of the final model, its cost, reward evaluations, wall time."""
    rows = [
        {
            "run": run.name,
            "test acc": run.report["compressed"]["test_accuracy"],
            "Δ test vs dense": run.report["test_accuracy_delta"],
            "FLOP ratio": run.report["compressed"]["flops_ratio"],
            "reward evals": run.report["reward_evaluations"],
            "run wall s": run.wall_s,
        }
        for run in runs
    ]
    formats = {"Δ test vs dense": "+.4f", "FLOP ratio": ".3f", "run wall s": ".0f"}
    return recording.markdown(pd.DataFrame(rows), formats)


if __name__ == "__main__":
    raise SystemExit(main())
