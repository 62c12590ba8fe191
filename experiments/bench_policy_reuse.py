"""Benchmark: one policy trained across budgets, reused on budgets it never saw.

ResNet-20 on ``../shared`` CIFAR-10 (Tucker-2). One DDPG agent is trained with
``--train-budgets 0.3,0.5,0.7``; then at each new budget (0.4, 0.6):

* **zero-shot**: ``--policy P --episodes 0`` -- the deterministic policy rolled out once;
* **few-shot**: ``--policy P --episodes N/10`` -- the saved policy's deterministic roll-out first,
  then training continued from the saved policy and replay buffer;
* **fresh**: a new DDPG search with the full ``N`` episodes;
* **center**: the search's episode 0 alone (``--episodes 1``): the strategy action 0 plays (the
  ``--action-center`` rule at this budget), what the policy's deviations are measured against.

All get the same reward settings and the same final fine-tune. Appends validation reward, test
accuracy and the number of reward evaluations of each to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_policy_reuse.py
    python experiments/bench_policy_reuse.py --dataset digits --model tiny --train-episodes 2 \
        --targets 0.5 --variants zero-shot --no-append   # a smoke test on the embedded data
"""

from __future__ import annotations

import argparse

import pandas as pd
import recording

VARIANTS = ("zero-shot", "few-shot", "fresh", "center")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-budgets", default="0.3,0.5,0.7", help="(default: %(default)s)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.6], help="(default: %(default)s)")
    p.add_argument("--train-episodes", type=int, default=60, help="episodes of the multi-budget training")
    p.add_argument(
        "--episodes", type=int, default=40, help="episodes of a fresh search (default: %(default)s)"
    )
    p.add_argument("--final-epochs", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="rows per budget (default: all)",
    )
    recording.add_cifar_options(p, out="bench-runs/policy-reuse")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    base = recording.cifar_run_args(args)
    budgets = [float(b) for b in args.train_budgets.split(",")]
    trained = recording.run_search(
        "train",
        [*base, "--flops", str(budgets[len(budgets) // 2]), "--train-budgets", args.train_budgets,
         "--episodes", str(args.train_episodes), "--warmup", str(args.train_episodes // 4),
         "--final-epochs", "0", "--no-latency"],
        args.out,
    )  # fmt: skip
    policy = trained.policy_dir(1)
    few = max(1, args.episodes // 10)
    rows = []
    reused = int(trained.reused)
    for target in args.targets:
        common = [*base, "--flops", str(target), "--final-epochs", str(args.final_epochs)]
        variants = {
            "zero-shot": ["--policy", str(policy), "--episodes", "0"],
            "few-shot": ["--policy", str(policy), "--episodes", str(few)],
            "fresh": ["--episodes", str(args.episodes), "--warmup", str(args.episodes // 4)],
            "center": ["--episodes", "1", "--warmup", "1"],
        }
        for variant in args.variants:
            extra = variants[variant]
            run = recording.run_search(f"flops{target:g}-{variant}", [*common, *extra], args.out)
            rows.append((target, variant, run))
            reused += int(run.reused)

    dense = trained.report["dense"]
    lines = [
        *session.header(
            f"Policy reuse across budgets ({args.model}, {recording.DATASETS[args.dataset]})",
            args.device,
            trained.report["device"],
        ),
        f"- policy: DDPG trained for {args.train_episodes} episodes cycling budgets {args.train_budgets} "
        f"(search {trained.report['search_seconds']:.0f} s); every row: Tucker-2, reward = val accuracy on "
        f"{args.reward_val_images} held-out images after {args.finetune_steps} SGD steps, final fine-tune "
        f"{args.final_epochs:g} epoch(s); dense test accuracy {dense['test_accuracy']:.4f}",
        "- reward evaluations count this budget's only (the shared training run's are not counted again); "
        "policy runs include the deterministic roll-out of the saved policy",
        f"- runs: {len(rows) + 1 - reused} made, {reused} complete runs of an earlier invocation read from "
        f"`{args.out}`",
        "",
        results_table(rows),
    ]
    section = "\n".join(lines) + "\n"
    recording.publish(section, append=not args.no_append)
    return 0


def results_table(rows: list[tuple[float, str, recording.SearchRun]]) -> str:
    """One row per budget and variant: reward, accuracies, cost, reward evaluations, search time."""
    table = pd.DataFrame(
        [
            {
                "budget": target,
                "variant": variant,
                "best val reward": run.report["stages"][-1]["best_reward"],
                "val acc after fine-tune": run.report["stages"][-1]["val_accuracy"],
                "test acc": run.report["compressed"]["test_accuracy"],
                "Δ test vs dense": run.report["test_accuracy_delta"],
                "FLOP ratio": run.report["compressed"]["flops_ratio"],
                "reward evals": run.report["reward_evaluations"],
                "search s": run.report["search_seconds"],
            }
            for target, variant, run in rows
        ]
    )
    formats = {"budget": "g", "Δ test vs dense": "+.4f", "FLOP ratio": ".3f", "search s": ".0f"}
    return recording.markdown(table, formats)


if __name__ == "__main__":
    raise SystemExit(main())
