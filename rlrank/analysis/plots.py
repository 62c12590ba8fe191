"""Figures of an episode frame (matplotlib, Agg backend): reward and running best, kept rank ratio
per layer, accuracy vs FLOPs with the Pareto front, and each stage's best strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlrank.analysis.runs import RANK, RATIO, RunPath, layer_names
from rlrank.analysis.tables import best_episodes, eligible, pareto_front, running_best

PLOTS = {
    "reward": "reward.png",
    "ratios": "ratios.png",
    "pareto": "pareto.png",
    "best": "best_strategy.png",
}
"""The file names of a run report's plots."""
COMPARE_PLOT = "running_best.png"
"""The file name of a comparison report's plot."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: RunPath) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per run and stage; the label names only what varies."""
    runs, stages = df["run"].nunique(), df["stage"].nunique()
    out = []
    for (run, stage), part in df.groupby(["run", "stage"], sort=False):
        label = " / ".join(
            ([str(run)] if runs > 1 else []) + ([f"stage {stage}"] if stages > 1 or runs == 1 else [])
        )
        out.append((label, part))
    return out


def _title(df: pd.DataFrame, what: str) -> str:
    runs = df["run"].unique()
    return f"{runs[0]}: {what}" if len(runs) == 1 else what


def plot_reward(df: pd.DataFrame, path: RunPath) -> Path:
    """Reward per episode (crosses: failed or at another budget) with the running best, per stage.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    best = running_best(df)
    for i, (label, part) in enumerate(_groups(df)):
        ok = eligible(part)
        color = f"C{i % 10}"
        ax.scatter(part["episode"][ok], part["reward"][ok], s=16, color=color, alpha=0.6)
        ax.scatter(part["episode"][~ok], part["reward"][~ok], s=20, marker="x", color=color, alpha=0.6)
        ax.step(part["episode"], best[part.index], where="post", color=color, lw=2, label=f"{label} best")
    ax.set(xlabel="episode", ylabel="reward", title=_title(df, "reward per episode and running best"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_running_best(df: pd.DataFrame, path: RunPath) -> Path:
    """The running best reward of several runs (and stages), overlaid.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`), usually of several runs.
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    best = running_best(df)
    for i, (label, part) in enumerate(_groups(df)):
        ax.step(part["episode"], best[part.index], where="post", lw=2, color=f"C{i % 10}", label=label)
    ax.set(xlabel="episode", ylabel="best reward so far", title=_title(df, "running best reward"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_ratios(df: pd.DataFrame, path: RunPath) -> Path:
    """Heatmap of every layer's kept rank ratio (rows) over the episodes (columns), stage after stage.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    layers = layer_names(df)
    matrix = df[[RATIO + layer for layer in layers]].to_numpy(dtype=float).T
    fig, ax = plt.subplots(figsize=(min(5 + 0.06 * len(df), 16), 1.6 + 0.28 * len(layers)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(layers)), labels=layers, fontsize=8)
    ticks = np.unique(np.linspace(0, len(df) - 1, min(len(df), 12)).round().astype(int))
    ax.set_xticks(ticks, labels=[str(e) for e in df["episode"].to_numpy()[ticks]])
    groups = _groups(df)
    if len(groups) > 1:
        sizes = np.cumsum([0] + [len(part) for _, part in groups])
        for edge in sizes[1:-1]:
            ax.axvline(edge - 0.5, color="white", lw=2)
        top = ax.secondary_xaxis("top")
        top.set_xticks((sizes[:-1] + sizes[1:] - 1) / 2, labels=[label for label, _ in groups], fontsize=8)
        top.tick_params(length=0)
    ax.set_xlabel("episode")
    ax.set_title(_title(df, "kept rank ratio per layer"), pad=18 if len(groups) > 1 else 6)
    fig.colorbar(image, ax=ax, label="kept rank ratio")
    return _save(fig, path)


def plot_pareto(df: pd.DataFrame, path: RunPath) -> Path:
    """Validation accuracy vs FLOP ratio of every successful episode, the Pareto front highlighted.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (label, part) in enumerate(_groups(df[~df["failed"]])):
        color = f"C{i % 10}"
        ax.scatter(
            part["flops_ratio"], part["accuracy"], s=16, color=color, alpha=0.35, label=f"{label} episodes"
        )
        front = pareto_front(part)
        ax.plot(front["flops_ratio"], front["accuracy"], drawstyle="steps-post", color=color, lw=1.5)
        ax.scatter(front["flops_ratio"], front["accuracy"], s=46, color=color, edgecolor="black", zorder=3)
        budget = part["stage_budget"].dropna()
        if len(budget):
            ax.axvline(budget.iat[0], color=color, ls="--", lw=1, label=f"{label} budget")
    ax.set(xlabel="FLOP ratio (of dense)", ylabel="validation accuracy (cheap fine-tune)")
    ax.set_title(_title(df, "accuracy vs FLOPs, Pareto front"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_best_strategy(df: pd.DataFrame, path: RunPath) -> Path:
    """Each stage's best strategy: kept rank ratio per layer as bars, labelled with the ranks.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    plt = _pyplot()
    layers = layer_names(df)
    best = best_episodes(df)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(layers) * max(len(best), 1) + 2), 4.5))
    width = 0.8 / max(len(best), 1)
    x = np.arange(len(layers))
    for i, (_, row) in enumerate(best.iterrows()):
        ratios = [row[RATIO + layer] for layer in layers]
        label = f"stage {row['stage']} ep {row['episode']}" + (
            f" ({row['run']})" if best["run"].nunique() > 1 else ""
        )
        bars = ax.bar(x + (i - (len(best) - 1) / 2) * width, ratios, width, label=label, color=f"C{i % 10}")
        ranks = ["" if r is None else str(r) for r in (row[RANK + layer] for layer in layers)]
        ax.bar_label(bars, labels=ranks, fontsize=7, rotation=90 if len(layers) > 8 else 0, padding=2)
    ax.set_xticks(
        x, labels=layers, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center"
    )
    ax.set(ylim=(0, 1.2), ylabel="kept rank ratio", title=_title(df, "best strategy (bar labels: ranks)"))
    ax.legend(fontsize=8)
    return _save(fig, path)
