"""Learning curves of a selectors benchmark: mean reward of the last 10 episodes vs episode.

Reads the run folders ``bench_selectors.py`` wrote (``<out>/flops<B>-<method>-seed<S>/``), and for
each budget draws one line per searched method (DDPG, random search, ...): the rolling mean of the
reward over the last ``--window`` episodes, averaged over the seeds, with a band of ± one standard
deviation over the seeds. One panel per budget, one PNG.

Run from the repository root::

    python experiments/plot_learning_curves.py --runs bench-runs/selectors-cpu \\
        --out experiments/results/learning-curves-cpu.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd
import recording

from rlrank.analysis import load_episodes

RUN_NAME = re.compile(r"^flops(?P<budget>[0-9.]+)-(?P<method>.+)-seed(?P<seed>\d+)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the benchmark's --out folder")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--window", type=int, default=10, help="episodes per rolling mean (default: %(default)s)")
    p.add_argument("--min-episodes", type=int, default=20, help="skip runs with fewer episodes (the rules)")
    return p.parse_args(argv)


def curves(runs: Path, window: int, min_episodes: int) -> pd.DataFrame:
    """One row per (budget, method, seed, episode): the rolling mean reward of the last ``window``."""
    frames = []
    for folder in sorted(runs.iterdir()):
        match = RUN_NAME.match(folder.name)
        run = recording.complete_run(folder) if match else None
        if run is None:  # not a benchmark run, or interrupted (the next invocation runs it again)
            continue
        episodes = load_episodes(run)
        if len(episodes) < min_episodes:
            continue
        rewards = episodes.sort_values("episode")["reward"].reset_index(drop=True)
        frames.append(
            pd.DataFrame(
                {
                    "budget": float(match["budget"]),
                    "method": match["method"],
                    "seed": int(match["seed"]),
                    "episode": range(len(rewards)),
                    "rolling": rewards.rolling(window, min_periods=1).mean(),
                }
            )
        )
    if not frames:
        raise SystemExit(f"no searched run (>= {min_episodes} episodes) under {runs}")
    return pd.concat(frames, ignore_index=True)


def plot(table: pd.DataFrame, out: Path, window: int) -> Path:
    """Write the figure: a panel per budget, mean ± std over seeds per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(table["budget"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        part = table[table["budget"] == budget]
        for i, (method, rows) in enumerate(part.groupby("method", sort=True)):
            stats = rows.groupby("episode")["rolling"].agg(["mean", "std"]).fillna(0.0)
            seeds = rows["seed"].nunique()
            ax.plot(stats.index, stats["mean"], color=f"C{i}", lw=1.8, label=f"{method} ({seeds} seeds)")
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=f"C{i}",
                alpha=0.2,
            )
        ax.set(
            xlabel="episode",
            ylabel=f"mean reward of the last {window} episodes",
            title=f"budget {budget:g} of the FLOPs",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(plot(curves(args.runs, args.window, args.min_episodes), args.out, args.window))


if __name__ == "__main__":
    main()
