"""Benchmark: how noisy is the cheap-fine-tune reward, next to the differences it must rank?

ResNet-20 on ``../shared`` CIFAR-10 (Tucker-2). The strategies of the rules (uniform, energy,
VBMF) at one budget are each priced with the search's reward -- BN re-estimation, ``steps`` SGD
steps, accuracy on the reward's validation images -- under several fine-tune seeds (the seed picks
the fine-tune batches and augmentations; within a search every episode shares one seed, so this is
the noise a *search seed* adds, not noise between the episodes of one search). Everything runs in
one process on one factor cache, so only the reward is measured.

Appends a table to ``experiments/RESULTS.md``: per rule and step count, the mean, standard
deviation and range of the reward over seeds, and how often one seed ranks the rules as their means
do.

Run from the repository root::

    python experiments/bench_reward_noise.py
    python experiments/bench_reward_noise.py --dataset digits --model tiny --steps 1 --seeds 2 \
        --no-append   # a smoke test on the embedded data (an untrained model: only the plumbing)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import pandas as pd
import recording

from rlrank.reward import RewardEvaluator
from rlrank.stage import rule_strategy, stage_reward_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recording.add_dataset_option(p)
    p.add_argument("--model", default="resnet20", help="(default: %(default)s)")
    p.add_argument("--flops", type=float, default=0.5, help="budget (default: %(default)s)")
    p.add_argument("--rules", nargs="+", default=["uniform", "energy", "vbmf"], help="(default: %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="SGD steps (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=6, help="fine-tune seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--reward-val-images", type=int, default=1000, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    cli = recording.cifar_search_args(
        args.model, max(args.steps), args.reward_val_images, dataset=args.dataset
    )
    priced = recording.priced_setup(cli, args.flops, args.device)
    config, setup, cache, env = priced.config, priced.setup, priced.cache, priced.env

    rewards: dict[tuple[str, int], list[float]] = {}
    seconds = []
    for rule in args.rules:
        ratios = rule_strategy(rule, env, cache, config.min_ratio)
        plans = env.plan(ratios)
        for n_steps, seed in itertools.product(args.steps, range(args.seeds)):
            finetune = dataclasses.replace(stage_reward_config(config), steps=n_steps)
            evaluator = RewardEvaluator(setup.model, cache, setup.data, finetune, seed=seed)
            evaluator.set_episode(1, 0)
            began = time.perf_counter()
            rewards.setdefault((rule, n_steps), []).append(evaluator(plans).accuracy)
            seconds.append(time.perf_counter() - began)
            print(f"{rule} steps {n_steps} seed {seed}: {rewards[(rule, n_steps)][-1]:.4f}", flush=True)

    lines = [
        *session.header(
            f"Reward noise of the cheap fine-tune ({args.model}, {recording.DATASETS[args.dataset]}, "
            f"--flops {args.flops:g})",
            args.device,
            str(setup.device),
        ),
        f"- each rule's strategy priced {args.seeds} times (fine-tune seeds 0..{args.seeds - 1}): BN "
        f"re-estimation + N SGD steps (batch {config.finetune_batch_size}, lr {config.finetune_lr}), accuracy on "
        f"{args.reward_val_images} held-out validation images; {statistics.mean(seconds):.1f} s per pricing",
        "",
        noise_table(rewards, args.steps, args.rules),
    ]
    lines += ["", "How often one seed orders the rules as their means do:", ""]
    for n_steps in args.steps:
        by_mean = sorted(args.rules, key=lambda r: -statistics.mean(rewards[(r, n_steps)]))
        agree = sum(
            sorted(args.rules, key=lambda r: -rewards[(r, n_steps)][s]) == by_mean for s in range(args.seeds)
        )
        lines.append(
            f"- {n_steps} steps: {agree} of {args.seeds} seeds (order by mean: {' > '.join(by_mean)})"
        )
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


def noise_table(rewards: dict[tuple[str, int], list[float]], steps: list[int], rules: list[str]) -> str:
    """One row per step count and rule: mean, standard deviation, min and max of the reward over seeds."""
    table = pd.DataFrame(
        [
            {
                "SGD steps": n_steps,
                "rule": rule,
                "mean reward": statistics.mean(rewards[(rule, n_steps)]),
                "std over seeds": statistics.stdev(rewards[(rule, n_steps)]),
                "min": min(rewards[(rule, n_steps)]),
                "max": max(rewards[(rule, n_steps)]),
            }
            for n_steps in steps
            for rule in rules
        ]
    )
    return recording.markdown(table, digits=4)


if __name__ == "__main__":
    raise SystemExit(main())
