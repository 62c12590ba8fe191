"""Benchmark: DDPG ranks vs the standard rank selectors on real CIFAR-10 (``../shared``).

For each budget (0.5 and 0.3 of the dense FLOPs) every method searches Tucker-2 ranks for the
same dense model with the same cheap-fine-tune reward, then gets the same final fine-tune:

* ``uniform``, ``energy``, ``vbmf``: rules, each hitting the budget by bisection on its own knob
  (one reward evaluation);
* ``random``: random search with DDPG's number of reward evaluations, over ``seeds``;
* ``ddpg``: the agent (AMC settings), over ``seeds``;
* ``ddpg-energy``, ``random-energy``: the same with ``--action-center energy`` (action 0 plays the
  energy rule's strategy instead of the uniform one);
* ablations on the uniform rule: ``+distill`` (knowledge distillation from the dense model in the
  final fine-tune) and ``+data-aware`` (output factors fitted to the layers' responses on
  training images), so that each gain is visible on its own.

Rewards and selection use the validation split (5,000 images held out from train); the test split
(10,000 images) is read once per run, for the report. Writes ``experiments/results/
selectors-<scale>.csv`` and appends three Markdown tables to ``experiments/RESULTS.md``: the
results, the search cost per episode, and the correlation between the cheap-fine-tune reward and
the accuracy after the final fine-tune.

Presets: ``--scale cpu`` (ResNet-20, sized to finish within 90 minutes on 2 CPU cores) and
``--scale gpu`` (ResNet-56, more episodes, full validation rewards, a 10-epoch final fine-tune).

Run from the repository root::

    python experiments/bench_selectors.py --scale cpu
    python experiments/bench_selectors.py --scale gpu --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import recording

CSV_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Scale:
    """One preset: what is searched and how long every phase runs."""

    model: str
    checkpoint: str
    budgets: list[float]
    episodes: int
    warmup: int
    finetune_steps: int
    reward_val_images: int
    final_epochs: float
    batch_size: int
    seeds: list[int]
    ablations: list[str] = field(default_factory=lambda: ["distill", "data-aware"])

    def search_args(self) -> list[str]:
        return [
            *recording.cifar_search_args(self.model, self.finetune_steps, self.reward_val_images, self.batch_size),
            "--episodes", str(self.episodes),
            "--warmup", str(self.warmup),
            "--final-epochs", str(self.final_epochs),
        ]  # fmt: skip


SCALES = {
    "cpu": Scale(
        model="resnet20",
        checkpoint="resnet20-jpeg.pt",
        budgets=[0.5, 0.3],
        episodes=40,
        warmup=10,
        finetune_steps=10,
        reward_val_images=1000,
        final_epochs=1.0,
        batch_size=128,
        seeds=[0, 1],
    ),
    "gpu": Scale(
        model="resnet56",
        checkpoint="resnet56-jpeg.pt",
        budgets=[0.5, 0.3],
        episodes=200,
        warmup=50,
        finetune_steps=50,
        reward_val_images=0,
        final_epochs=10.0,
        batch_size=128,
        seeds=[0, 1, 2],
    ),
}
METHODS = ("uniform", "energy", "vbmf", "random", "ddpg", "ddpg-energy", "random-energy")
METHOD_ARGS = {
    "ddpg-energy": ["--agent", "ddpg", "--action-center", "energy"],
    "random-energy": ["--agent", "random", "--action-center", "energy"],
}
"""Methods that are an agent with options; any other method is ``--agent METHOD``."""
SEARCHED = ("random", "ddpg", "ddpg-energy", "random-energy")
ABLATION_ARGS = {"distill": ["--distill", "0.5"], "data-aware": ["--data-aware"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="preset (default: %(default)s)")
    p.add_argument("--device", default="auto", help="device of every search (default: %(default)s)")
    p.add_argument("--out", type=Path, help="run folders (default: bench-runs/selectors-<scale>)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="(default: all)")
    p.add_argument("--budgets", type=float, nargs="+", help="override the preset's budgets")
    p.add_argument("--finetune-steps", type=int, help="override the preset's SGD steps of the reward")
    p.add_argument("--no-ablations", action="store_true", help="skip the distill / data-aware rows")
    p.add_argument(
        "--search-args",
        default="",
        help="extra rlrank.search options for the searched methods (random, ddpg ...), e.g. "
        "'--spread 0.5 --noise 0.25'",
    )
    p.add_argument(
        "--tag", default="", help="suffix of the CSV name and run folder (selectors-<scale>-<tag>)"
    )
    p.add_argument("--no-append", action="store_true", help="print the tables instead of appending them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    if args.finetune_steps is not None:
        scale = dataclasses.replace(scale, finetune_steps=args.finetune_steps)
    budgets = args.budgets or scale.budgets
    label = f"{args.scale}-{args.tag}" if args.tag else args.scale
    out = args.out or Path(f"bench-runs/selectors-{label}")
    search_extra = shlex.split(args.search_args)
    session = recording.Session(argv)
    base = [*scale.search_args(), "--device", args.device]

    rows = []
    reused = 0  # runs already complete in --out, read instead of run again
    for budget in budgets:
        for method in args.methods:
            seeds = scale.seeds if method in SEARCHED else [scale.seeds[0]]
            agent = METHOD_ARGS.get(method, ["--agent", method])
            if method in SEARCHED:
                agent = [*agent, *search_extra]
            for seed in seeds:
                name = f"flops{budget:g}-{method}-seed{seed}"
                run = recording.run_search(
                    name, [*base, "--flops", str(budget), *agent, "--seed", str(seed)], out
                )
                rows.append(_row(run, budget, method, seed))
                reused += run.reused
        if not args.no_ablations:
            for ablation in scale.ablations:
                seed = scale.seeds[0]
                name = f"flops{budget:g}-uniform+{ablation}-seed{seed}"
                extra = ABLATION_ARGS[ablation]
                run = recording.run_search(
                    name,
                    [*base, "--flops", str(budget), "--agent", "uniform", "--seed", str(seed), *extra],
                    out,
                )
                rows.append(_row(run, budget, f"uniform+{ablation}", seed))
                reused += run.reused

    frame = pd.DataFrame(rows)
    CSV_DIR.mkdir(exist_ok=True)
    csv_path = CSV_DIR / f"selectors-{label}.csv"
    frame.to_csv(csv_path, index=False)

    dense = frame.iloc[0]
    section = "\n".join(
        [
            *session.header(
                f"Rank selectors on CIFAR-10 ({scale.model}, scale {args.scale})",
                str(dense["device"]),
                str(dense["device"]),
            ),
            f"- runs: {len(rows) - reused} made, {reused} complete runs of an earlier invocation read "
            f"from `{out}` (every run's own wall time is in the CSV); per-run CSV: "
            f"`experiments/results/{csv_path.name}`",
            f"- dense {scale.model} (`../shared/models/cifar-resnet/{scale.checkpoint}`): test accuracy "
            f"{dense['dense_test']:.4f}, val {dense['dense_val']:.4f} (the dense model has seen the val images)",
            f"- every method: Tucker-2, reward = val accuracy on {scale.reward_val_images or 5000} of the 5,000 "
            f"held-out images after BN re-estimation + {scale.finetune_steps} SGD steps (batch "
            f"{scale.batch_size}, common batches); DDPG {scale.episodes} episodes ({scale.warmup} warm-up), "
            f"random search {scale.episodes}; final fine-tune {scale.final_epochs:g} epoch(s), one-cycle, "
            f"lr 0.01; DDPG and random rows: mean ± std over seeds {scale.seeds}"
            + (f"; searched methods also got `{args.search_args}`" if args.search_args else ""),
            "",
            results_table(frame),
            "",
            "Search cost per episode (means over each method's episodes, seconds; env + agent share "
            "is the environment's and agent's own time over the whole episode):",
            "",
            cost_table(frame),
            "",
            correlation_text(frame),
            "",
        ]
    )
    recording.publish(section, append=not args.no_append)
    return 0


def _row(run: recording.SearchRun, budget: float, method: str, seed: int) -> dict:
    report = run.report
    stage = report["stages"][-1]
    times = stage["time_per_episode"]
    latency = report.get("latency_ms", {})
    row = {
        "budget": budget,
        "method": method,
        "seed": seed,
        "device": report["device"],
        "dense_val": report["dense"]["val_accuracy"],
        "dense_test": report["dense"]["test_accuracy"],
        "best_val_reward": stage["best_reward"],
        "val_after_finetune": stage["val_accuracy"],
        "test_accuracy": report["compressed"]["test_accuracy"],
        "delta_test": report["test_accuracy_delta"],
        "flops_ratio": report["compressed"]["flops_ratio"],
        "params_ratio": report["compressed"]["params_ratio"],
        "reward_evaluations": report["reward_evaluations"],
        "search_seconds": report["search_seconds"],
        "finetune_seconds": stage["finetune_seconds"],
        "run_wall_seconds": run.wall_s,
    }
    for key in ("decompose", "finetune", "evaluate", "agent", "env", "total"):
        row[f"episode_{key}_s"] = times.get(key, 0.0)
    for batch in ("batch1", "batch64"):
        entry = latency.get(batch, {})
        row[f"latency_{batch}_dense_ms"] = entry.get("dense", float("nan"))
        row[f"latency_{batch}_ms"] = entry.get("compressed", float("nan"))
        row[f"latency_{batch}_speedup"] = entry.get("speedup", float("nan"))
    return row


def _fmt(values: pd.Series, digits: int, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values.iloc[0]:{sign}.{digits}f}"
    return f"{values.mean():{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_table(frame: pd.DataFrame) -> str:
    lines = [
        "| budget | method | seeds | best val reward | test acc | Δ test | FLOP ratio | param ratio | "
        "latency b1 ms (speed-up) | latency b64 ms (speed-up) | FLOP speed-up | search s | reward evals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (budget, method), group in frame.groupby(["budget", "method"], sort=False):
        lines.append(
            f"| {budget:g} | {method} | {len(group)} | {_fmt(group.best_val_reward, 4)} | "
            f"{_fmt(group.test_accuracy, 4)} | {_fmt(group.delta_test, 4, signed=True)} | "
            f"{group.flops_ratio.mean():.3f} | {group.params_ratio.mean():.3f} | "
            f"{group.latency_batch1_ms.median():.2f} ({group.latency_batch1_speedup.median():.2f}x) | "
            f"{group.latency_batch64_ms.median():.1f} ({group.latency_batch64_speedup.median():.2f}x) | "
            f"{1 / group.flops_ratio.mean():.2f}x | {group.search_seconds.mean():.0f} | "
            f"{int(group.reward_evaluations.mean())} |"
        )
    return "\n".join(lines)


def cost_table(frame: pd.DataFrame) -> str:
    lines = [
        "| budget | method | episodes | decompose | BN + fine-tune | evaluate | agent | env | total | env + agent share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (budget, method), group in frame.groupby(["budget", "method"], sort=False):
        mean = {
            k: group[f"episode_{k}_s"].mean()
            for k in ("decompose", "finetune", "evaluate", "agent", "env", "total")
        }
        share = (mean["agent"] + mean["env"]) / mean["total"] if mean["total"] else float("nan")
        lines.append(
            f"| {budget:g} | {method} | {int(group.reward_evaluations.mean())} | {mean['decompose']:.3f} | "
            f"{mean['finetune']:.3f} | {mean['evaluate']:.3f} | {mean['agent']:.3f} | {mean['env']:.3f} | "
            f"{mean['total']:.3f} | {share:.1%} |"
        )
    return "\n".join(lines)


def correlation_text(frame: pd.DataFrame) -> str:
    """Across all runs: does the cheap-fine-tune reward rank strategies like the final fine-tune?"""
    if len(frame) < 3:
        return "Too few runs for a reward / final-accuracy correlation."
    plain = frame[~frame.method.str.contains(r"\+")]
    parts = ["Reward vs accuracy after the final fine-tune (one point per run without ablation):", ""]
    for budget, group in plain.groupby("budget", sort=False):
        if len(group) >= 3:
            parts.append(
                f"- budget {budget:g}: Spearman ρ(best val reward, val acc after fine-tune) = "
                f"{group.best_val_reward.corr(group.val_after_finetune, method='spearman'):.2f}, "
                f"ρ(best val reward, test acc) = "
                f"{group.best_val_reward.corr(group.test_accuracy, method='spearman'):.2f} over {len(group)} runs"
            )
    parts.append(
        f"- all budgets: Pearson r(best val reward, test acc) = "
        f"{plain.best_val_reward.corr(plain.test_accuracy):.2f} over {len(plain)} runs"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
