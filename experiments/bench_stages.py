"""Benchmark: one stage vs several stages at the same total search and fine-tune effort.

ResNet-20 on ``../shared`` CIFAR-10 at ``--flops 0.3`` (Tucker-2, DDPG): one stage with
``episodes`` episodes and ``epochs`` of final fine-tune, against ``stages`` stages (geometric
budgets ending at 0.3) with ``episodes / stages`` episodes each and ``epochs / stages`` of
fine-tune after each stage -- the same number of reward evaluations and fine-tune epochs in all.
Appends the test accuracy of each (and every stage's) to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_stages.py
    python experiments/bench_stages.py --episodes 90 --epochs 6 --device cuda
"""

from __future__ import annotations

import argparse

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
            f"Multi-stage vs one stage ({args.model}, CIFAR-10, --flops {args.flops:g})",
            args.device,
            single.report["device"],
        ),
        f"- both: DDPG, Tucker-2, reward = val accuracy on {args.reward_val_images} held-out images after "
        f"{args.finetune_steps} SGD steps; {args.episodes} reward evaluations and {args.epochs:g} fine-tune "
        f"epochs in all (multi-stage: {per_stage} episodes and {args.epochs / args.stages:g} epochs per stage, "
        "geometric budgets); dense test accuracy "
        f"{dense['test_accuracy']:.4f}",
        "",
        "| run | stage | budget | FLOP ratio | param ratio | best val reward | val acc after fine-tune | "
        "episodes | stage wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in (single, multi):
        for stage in run.report["stages"]:
            lines.append(
                f"| {run.name} | {stage['stage']} | {stage['budget']:.3f} | {stage['flops_ratio']:.3f} | "
                f"{stage['params_ratio']:.3f} | {stage['best_reward']:.4f} | {stage['val_accuracy']:.4f} | "
                f"{stage['episodes']} | {stage['search_seconds'] + stage['finetune_seconds']:.0f} |"
            )
    lines += [
        "",
        "| run | test acc | Δ test vs dense | FLOP ratio | reward evals | run wall s |",
        "|---|---|---|---|---|---|",
    ]
    for run in (single, multi):
        c = run.report["compressed"]
        lines.append(
            f"| {run.name} | {c['test_accuracy']:.4f} | {run.report['test_accuracy_delta']:+.4f} | "
            f"{c['flops_ratio']:.3f} | {run.report['reward_evaluations']} | {run.wall_s:.0f} |"
        )
    section = "\n".join(lines) + "\n"
    recording.publish(section, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
