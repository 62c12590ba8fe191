"""Figures of an episode frame (matplotlib, Agg backend): reward and running best, kept rank ratio
per layer, accuracy vs cost with the Pareto front, and each stage's best strategy.

Each figure has a builder that returns the :class:`~matplotlib.figure.Figure` (``*_figure``, to
show in a notebook or inspect) and a ``plot_*`` function that writes it as a PNG and closes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rlrank.analysis.runs import RANK, RATIO, RunPath, layer_names
from rlrank.analysis.tables import best_episodes, eligible, pareto_front, running_best

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS = {
    "reward": "reward.png",
    "ratios": "ratios.png",
    "pareto": "pareto.png",
    "best": "best_strategy.png",
}
"""The file names of a run report's plots."""
COMPARE_PLOT = "running_best.png"
"""The file name of a comparison report's plot."""
FLAT_SPAN = 0.01
"""FLOP ratios spanning less than this (1 % of the dense FLOPs) are "flat": every episode spent the
whole budget, and the Pareto plot uses another x-axis (see :func:`pareto_axis`)."""
WIDENED_SPAN = 0.1
"""The width of a flat FLOP axis once widened (:func:`pareto_figure`)."""
GRAY = "0.35"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: RunPath) -> Path:
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
    """``what``, after the run's name when there is one run (on a line of its own when long)."""
    runs = df["run"].unique()
    if len(runs) != 1:
        return what
    return f"{runs[0]}: {what}" if len(runs[0]) + len(what) <= 60 else f"{runs[0]}\n{what}"


def _between(values: pd.Series) -> str:
    """``"0.49987 to 0.5"``, or ``"0.5"`` when all equal."""
    low, high = f"{values.min():.5g}", f"{values.max():.5g}"
    return low if low == high else f"{low} to {high}"


def reward_figure(df: pd.DataFrame) -> Figure:
    """Reward per episode with the running best, one colour per run and stage.

    Markers (explained in the legend, in gray, shown only when drawn): ``o`` an episode that
    competes for the stage's best (at the stage's budget, not failed); ``x`` a failed episode
    (fine-tune fault or non-finite validation loss: logged with accuracy 0, never the best); ``+``
    an episode at another budget than the stage's (a policy trained on several budgets; not ranked).
    The coloured step line is the running best of the ``o`` episodes.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).

    Returns:
        The figure (one Axes); close it with ``matplotlib.pyplot.close`` when done.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    best = running_best(df)
    drawn = {"o": False, "x": False, "+": False}
    for i, (label, part) in enumerate(_groups(df)):
        ok, failed = eligible(part), part["failed"]
        episodes, rewards, color = part["episode"], part["reward"], f"C{i % 10}"
        for marker, rows in {"o": ok, "x": failed, "+": ~ok & ~failed}.items():
            shown = rows & rewards.notna()
            if shown.any():
                drawn[marker] = True
                size = 16 if marker == "o" else 24
                ax.scatter(episodes[shown], rewards[shown], s=size, marker=marker, color=color, alpha=0.6)
        ax.step(episodes, best[part.index], where="post", color=color, lw=2, label=f"{label}: running best")
    keys = {
        "o": "episode at the stage's budget (competes for the best)",
        "x": "failed episode (diverged fine-tune or NaN loss; never the best)",
        "+": "episode at another budget (not ranked)",
    }
    for marker, text in keys.items():
        if drawn[marker]:
            ax.scatter([], [], s=24, marker=marker, color=GRAY, label=text)
    ax.set(xlabel="episode", ylabel="reward", title=_title(df, "reward per episode and running best"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_reward(df: pd.DataFrame, path: RunPath) -> Path:
    """Write :func:`reward_figure` as a PNG.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    return _save(reward_figure(df), path)


def running_best_figure(df: pd.DataFrame) -> Figure:
    """The running best reward of several runs (and stages), overlaid.

    Every curve ends in a marker at its last episode. A run or stage with a single episode (a
    rule-based run) has no curve to step along: its reward is drawn as a diamond and a dotted
    horizontal line across the plot, to compare the searches with.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`), usually of several runs.

    Returns:
        The figure (one Axes); close it with ``matplotlib.pyplot.close`` when done.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    best = running_best(df)
    for i, (label, part) in enumerate(_groups(df)):
        color = f"C{i % 10}"
        curve = best[part.index]
        points = curve.notna()
        if points.sum() == 1 and len(part) == 1:
            x, y = part["episode"][points].iat[0], curve[points].iat[0]
            ax.axhline(y, color=color, ls=":", lw=1.5)
            ax.plot([x], [y], marker="D", ms=8, ls=":", color=color, label=f"{label} (one episode)")
            continue
        ax.step(part["episode"], curve, where="post", lw=2, color=color, label=label)
        if points.any():
            last = curve[points].index[-1]
            ax.plot([part["episode"][last]], [curve[last]], marker="o", ms=6, ls="", color=color)
    ax.set(xlabel="episode", ylabel="best reward so far", title=_title(df, "running best reward"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_running_best(df: pd.DataFrame, path: RunPath) -> Path:
    """Write :func:`running_best_figure` as a PNG.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`), usually of several runs.
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    return _save(running_best_figure(df), path)


def ratios_figure(df: pd.DataFrame) -> Figure:
    """Heatmap of every layer's kept rank ratio (rows) over the episodes (columns), stage after stage.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).

    Returns:
        The figure; close it with ``matplotlib.pyplot.close`` when done.
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
    return fig


def plot_ratios(df: pd.DataFrame, path: RunPath) -> Path:
    """Write :func:`ratios_figure` as a PNG.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    return _save(ratios_figure(df), path)


def _span(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.max() - values.min()) if len(values) else 0.0


def pareto_axis(df: pd.DataFrame) -> str:
    """The cost column of the Pareto plot: ``"flops_ratio"``, or ``"params_ratio"`` when flat.

    When the FLOP ratios of the successful episodes span less than :data:`FLAT_SPAN` (every episode
    spent the whole budget, as the environment makes them), the FLOP axis shows only rounding noise
    (say 0.49987 to 0.50000); the parameter ratio still varies with the ranks chosen (a layer's
    parameters and FLOPs differ by its output size), so the plot uses it, when it spans at least
    :data:`FLAT_SPAN` itself.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
    """
    ok = df[~df["failed"]]
    if _span(ok["flops_ratio"]) >= FLAT_SPAN or _span(ok["params_ratio"]) < FLAT_SPAN:
        return "flops_ratio"
    return "params_ratio"


def pareto_figure(df: pd.DataFrame) -> Figure:
    """Validation accuracy vs cost of every successful episode, the Pareto front highlighted.

    The cost is the FLOP ratio, with each stage's budget as a dashed line, unless the FLOP ratios
    are flat (:func:`pareto_axis`): then it is the parameter ratio, and the title and axis label say
    that every episode spent the FLOP budget and give the FLOP ratios' range. When both are flat
    (one episode, say), the FLOP axis is widened to :data:`WIDENED_SPAN` around the episodes and its
    label says so, instead of magnifying rounding noise.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).

    Returns:
        The figure (one Axes); close it with ``matplotlib.pyplot.close`` when done.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ok = df[~df["failed"]]
    x = pareto_axis(df)
    for i, (label, part) in enumerate(_groups(ok)):
        color = f"C{i % 10}"
        ax.scatter(part[x], part["accuracy"], s=16, color=color, alpha=0.35, label=f"{label} episodes")
        front = pareto_front(part, x=x)
        ax.plot(front[x], front["accuracy"], drawstyle="steps-post", color=color, lw=1.5)
        ax.scatter(front[x], front["accuracy"], s=46, color=color, edgecolor="black", zorder=3)
        budget = part["stage_budget"].dropna()
        if len(budget) and x == "flops_ratio":
            ax.axvline(budget.iat[0], color=color, ls="--", lw=1, label=f"{label} budget")
    ax.set_ylabel("validation accuracy (cheap fine-tune)")
    _label_cost_axis(ax, ok, x)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _label_cost_axis(ax: Axes, ok: pd.DataFrame, x: str) -> None:
    flops = ok["flops_ratio"].dropna()
    if x == "params_ratio":
        ax.set_xlabel(f"parameter ratio (of dense)\n(FLOP ratio of every episode: {_between(flops)})")
        ax.set_title(
            _title(ok, "accuracy vs parameters, Pareto front\n(every episode spent the FLOP budget)")
        )
        return
    ax.set_title(_title(ok, "accuracy vs FLOPs, Pareto front"))
    if len(flops) and _span(flops) < FLAT_SPAN:
        budgets = ok["stage_budget"].dropna()
        values = pd.concat([flops, budgets])
        middle = (values.min() + values.max()) / 2
        half = max(WIDENED_SPAN, _span(values) * 1.2) / 2
        ax.set_xlim(middle - half, middle + half)
        ax.set_xlabel(f"FLOP ratio (of dense)\n(every episode at {_between(flops)}: axis widened)")
    else:
        ax.set_xlabel("FLOP ratio (of dense)")


def plot_pareto(df: pd.DataFrame, path: RunPath) -> Path:
    """Write :func:`pareto_figure` as a PNG.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    return _save(pareto_figure(df), path)


def best_strategy_figure(df: pd.DataFrame) -> Figure:
    """Each stage's best strategy: kept rank ratio per layer as bars, labelled with the ranks.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).

    Returns:
        The figure (one Axes); close it with ``matplotlib.pyplot.close`` when done.
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
    return fig


def plot_best_strategy(df: pd.DataFrame, path: RunPath) -> Path:
    """Write :func:`best_strategy_figure` as a PNG.

    Args:
        df: An episode frame (:func:`rlrank.analysis.load_episodes`).
        path: The PNG file to write (its folder is created).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    return _save(best_strategy_figure(df), path)
