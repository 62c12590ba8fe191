"""Offline analysis of a search's episode logs: one frame, summary tables, plots, Markdown reports.

Reads a run folder (see :mod:`rlrank.run_folder`) that is complete, still being written, or left
behind by a crash: a torn last log row is skipped with a warning, a stage without rows is fine.
Nothing here imports torch, so logs can be studied on any machine with pandas and matplotlib.

Typical use::

    from rlrank.analysis import load_episodes, pareto_front, write_run_report

    df = load_episodes("runs/resnet18-flops0.5-20261122-101500")
    front = pareto_front(df[~df.failed])
    write_run_report("runs/resnet18-flops0.5-20261122-101500")  # -> RUN/analysis/report.md

The episode frame has one row per logged episode, in run, stage and episode order:

* ``run`` (the run folder's name), ``stage``, ``episode`` (int64), ``agent``, ``phase`` (strings);
* ``budget`` (the episode's FLOP target), ``stage_budget`` (the stage's target, from
  ``result.json`` or ``config.json``; NaN if unknown), ``reward``, ``accuracy``, ``loss``,
  ``flops_ratio``, ``params_ratio`` (float64), ``failed`` (bool) and ``failure`` (its reason);
* ``time_decompose``, ``time_finetune``, ``time_evaluate``, ``time_agent``, ``time_env``,
  ``time_total`` (seconds) and ``timestamp``;
* per layer, in network order, ``ratio/<layer>`` (float64, the kept rank ratio) and
  ``rank/<layer>`` (string: ``"32x16"`` for Tucker-2 ranks, ``"24"`` for SVD, ``"dense"`` when the
  layer is kept whole).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlrank.config import SearchConfig
from rlrank.run_folder import RunFolder, RunFolderError
from rlrank.runlog import EPISODES_FILE, read_rows

logger = logging.getLogger(__name__)

RunPath = str | os.PathLike
RATIO = "ratio/"
RANK = "rank/"
DENSE = "dense"
TIME_KEYS = ("decompose", "finetune", "evaluate", "agent", "env", "total")
ANALYSIS_DIR = "analysis"
REPORT = "report.md"
PLOTS = {
    "reward": "reward.png",
    "ratios": "ratios.png",
    "pareto": "pareto.png",
    "best": "best_strategy.png",
}
COMPARE_PLOT = "running_best.png"
EXPORT_FORMATS = ("csv", "parquet")

_INT_COLUMNS = ("stage", "episode")
_STRING_COLUMNS = ("run", "agent", "phase", "failure")
_METRICS = ("budget", "stage_budget", "reward", "accuracy", "loss", "flops_ratio", "params_ratio")
_TIMES = (*(f"time_{key}" for key in TIME_KEYS), "timestamp")
_FLOAT_COLUMNS = (*_METRICS, *_TIMES)
BASE_COLUMNS = ("run", "stage", "episode", "agent", "phase", *_METRICS, "failed", "failure", *_TIMES)
_STAGE_DIR = re.compile(r"stage-(\d+)")


class AnalysisError(ValueError):
    """A folder that is not a run, an unreadable log, or a missing optional dependency."""


# ============================================================================================
# Reading a run
# ============================================================================================


@dataclass
class StageInfo:
    """One ``stage-K`` folder: its log rows and, once the stage is complete, its ``result.json``."""

    number: int
    path: Path
    rows: list[dict[str, Any]]
    result: dict[str, Any] | None
    budget: float


@dataclass
class RunInfo:
    """A run folder as read from disk: configuration, stages and (when complete) the report."""

    path: Path
    name: str
    config: dict[str, Any]
    stages: list[StageInfo] = field(default_factory=list)
    report: dict[str, Any] | None = None
    dense: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """Whether the run finished (``report.json`` exists)."""
        return self.report is not None


def read_run(run: RunPath | RunInfo) -> RunInfo:
    """Read a run folder (complete, in progress or crashed).

    Args:
        run: The run folder (the one holding ``config.json``), or an already read run.

    Raises:
        AnalysisError: The folder is missing, is not a run, or a log line other than the last is
            not an episode row.
    """
    if isinstance(run, RunInfo):
        return run
    path = _open_run(Path(run))
    config = _read_json(path / "config.json", required=True)
    info = RunInfo(path=path, name=path.resolve().name, config=config)
    budgets = _stage_budgets(config)
    info.stages = [_read_stage(k, p, budgets.get(k, math.nan)) for k, p in _stage_dirs(path)]
    info.report = _read_json(path / "report.json")
    info.dense = _read_json(path / "dense.json")
    return info


def _open_run(path: Path) -> Path:
    try:
        return RunFolder.open(path).path
    except RunFolderError as exc:
        runs = sorted(p.parent.name for p in path.glob("*/config.json")) if path.is_dir() else []
        if runs:
            shown = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
            raise AnalysisError(f"{exc}; it holds {len(runs)} run folder(s) ({shown}): pass those") from None
        raise AnalysisError(str(exc)) from None


def _read_json(path: Path, required: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if required:
            raise AnalysisError(f"cannot read {path}: {exc}") from None
        logger.warning("%s: unreadable, ignored (%s)", path, exc)
        return None
    if not isinstance(data, dict):
        if required:
            raise AnalysisError(f"{path} does not hold a JSON object")
        return None
    return data


def _stage_budgets(config: dict[str, Any]) -> dict[int, float]:
    try:
        budgets = SearchConfig.from_dict(config).budgets_of_stages()
    except (TypeError, ValueError, ZeroDivisionError):
        return {}
    return {k: float(b) for k, b in enumerate(budgets, start=1)}


def _stage_dirs(path: Path) -> list[tuple[int, Path]]:
    found = []
    for child in path.iterdir():
        match = _STAGE_DIR.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _read_stage(k: int, path: Path, planned_budget: float) -> StageInfo:
    try:
        rows = read_rows(path / EPISODES_FILE)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None
    result = _read_json(path / "result.json")
    budget = float(result["budget"]) if result and "budget" in result else planned_budget
    return StageInfo(number=k, path=path, rows=rows, result=result, budget=budget)


# ============================================================================================
# The episode frame
# ============================================================================================


def format_ranks(ranks: Sequence[int] | None) -> str:
    """A layer's ranks as text: ``[32, 16]`` -> ``"32x16"``, ``[24]`` -> ``"24"``, ``None`` -> ``"dense"``."""
    if not ranks:
        return DENSE
    return "x".join(str(int(r)) for r in ranks)


def load_episodes(runs: RunPath | RunInfo | Sequence[RunPath | RunInfo]) -> pd.DataFrame:
    """One row per logged episode of every stage of one run or of several (concatenated).

    Args:
        runs: A run folder, or a list of them (or of :class:`RunInfo`).

    Returns:
        The episode frame (columns in the module docstring).

    Raises:
        AnalysisError: A folder is missing or is not a run.
    """
    return episodes_frame(read_runs(runs))


def read_runs(runs: RunPath | RunInfo | Sequence[RunPath | RunInfo]) -> list[RunInfo]:
    """Read several runs; runs whose folder names collide are named ``parent/name``.

    Raises:
        AnalysisError: A folder is missing or is not a run.
    """
    items = [runs] if isinstance(runs, (str, os.PathLike, RunInfo)) else list(runs)
    infos = [read_run(run) for run in items]
    names = [info.name for info in infos]
    return [
        dataclasses.replace(info, name=f"{info.path.resolve().parent.name}/{info.name}")
        if names.count(info.name) > 1
        else info
        for info in infos
    ]


def episodes_frame(infos: Iterable[RunInfo]) -> pd.DataFrame:
    """The episode frame of runs already read with :func:`read_run`."""
    frames = [_stage_frame(info.name, stage) for info in infos for stage in info.stages]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return _coerce(pd.DataFrame({column: [] for column in BASE_COLUMNS}))
    return _coerce(pd.concat(frames, ignore_index=True, sort=False))


def _stage_frame(run: str, stage: StageInfo) -> pd.DataFrame:
    records = [_flatten(row, i, run, stage) for i, row in enumerate(stage.rows)]
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    return frame.sort_values("episode", kind="stable") if records else frame


def _flatten(row: dict[str, Any], index: int, run: str, stage: StageInfo) -> dict[str, Any]:
    failed = row.get("failed")
    out: dict[str, Any] = {
        "run": run,
        "stage": stage.number,
        "episode": row.get("episode", index),
        "agent": row.get("agent"),
        "phase": row.get("phase"),
        "budget": row.get("budget"),
        "stage_budget": stage.budget,
        **{key: row.get(key) for key in ("reward", "accuracy", "loss", "flops_ratio", "params_ratio")},
        "failed": bool(failed),
        "failure": failed if isinstance(failed, str) else None,
    }
    times = row.get("time") or {}
    out.update({f"time_{key}": times.get(key) for key in TIME_KEYS})
    out["timestamp"] = row.get("timestamp")
    for name, layer in (row.get("layers") or {}).items():
        out[RATIO + name] = layer.get("ratio")
        out[RANK + name] = format_ranks(layer.get("ranks"))
    return out


def _coerce(frame: pd.DataFrame) -> pd.DataFrame:
    """Column order (base, ratios, ranks, anything else) and dtypes of the episode frame."""
    ratios = [c for c in frame.columns if c.startswith(RATIO)]
    ranks = [RANK + c[len(RATIO) :] for c in ratios if RANK + c[len(RATIO) :] in frame.columns]
    ranks += [c for c in frame.columns if c.startswith(RANK) and c not in ranks]
    rest = [c for c in frame.columns if c not in BASE_COLUMNS and c not in ratios and c not in ranks]
    frame = frame.reindex(columns=[*BASE_COLUMNS, *ratios, *ranks, *rest])
    for column in _INT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column]).astype("int64")
    for column in (*_FLOAT_COLUMNS, *ratios):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    frame["failed"] = frame["failed"].fillna(False).astype(bool)
    for column in (*_STRING_COLUMNS, *ranks):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def layer_names(df: pd.DataFrame) -> list[str]:
    """The layers of an episode frame, in network order."""
    return [c[len(RATIO) :] for c in df.columns if c.startswith(RATIO)]


# ============================================================================================
# Best episodes, running best, Pareto front, distinct strategies
# ============================================================================================


def eligible(df: pd.DataFrame) -> pd.Series:
    """Episodes that compete for a stage's best: not failed, and at the stage's budget.

    (A policy trained over several budgets also plays episodes at other budgets; like the search,
    the analysis only ranks those at the stage's own budget.)
    """
    at_budget = np.isclose(df["budget"], df["stage_budget"], rtol=0.0, atol=1e-9)
    return ~df["failed"] & df["reward"].notna() & (df["stage_budget"].isna() | at_budget)


def running_best(df: pd.DataFrame) -> pd.Series:
    """The best eligible reward so far, per run and stage, in episode order (NaN before the first)."""
    rewards = df["reward"].where(eligible(df))
    best = rewards.groupby([df["run"], df["stage"]], sort=False).cummax()
    return best.groupby([df["run"], df["stage"]], sort=False).ffill()


def best_episodes(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's and stage's best eligible episode (the first one, on a tie), as the search chose it."""
    ok = df[eligible(df)]
    if ok.empty:
        return df.iloc[0:0]
    return df.loc[ok.groupby(["run", "stage"], sort=False)["reward"].idxmax()]


def pareto_front(df: pd.DataFrame, x: str = "flops_ratio", y: str = "accuracy") -> pd.DataFrame:
    """The rows on the Pareto front: the most ``y`` for at most a given ``x``.

    A row is on the front when every row with a smaller or equal ``x`` has a smaller ``y``
    (of rows with the same ``x`` and ``y`` only the first is kept). Rows with a missing ``x`` or
    ``y`` are ignored; failed episodes are not dropped here, filter them first.

    Args:
        df: Any frame with the two columns.
        x: The cost column (smaller is better).
        y: The quality column (larger is better).

    Returns:
        The rows on the front, with their original index, sorted by ``x`` (``y`` rises with it).
    """
    for column in (x, y):
        if column not in df.columns:
            raise KeyError(f"pareto_front: no column {column!r}")
    data = df.dropna(subset=[x, y])
    ordered = data.sort_values([x, y], ascending=[True, False], kind="mergesort")
    best_before = ordered[y].cummax().shift(1, fill_value=-np.inf)
    return ordered[ordered[y] > best_before]


def strategy_key(df: pd.DataFrame) -> pd.Series:
    """A text key per row naming its strategy: stage and every layer's ranks."""
    ranks = [c for c in df.columns if c.startswith(RANK)]
    parts = [df["stage"].astype(str)] + [df[c].fillna("-").astype(str) for c in ranks]
    key = parts[0]
    for part in parts[1:]:
        key = key + "|" + part
    return key


def top_strategies(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` best distinct strategies (different rank tuples, per stage) by best reward.

    Each strategy is shown with its best eligible episode and how often it was evaluated.
    """
    ok = df[eligible(df)]
    key = strategy_key(ok)
    ordered = ok.assign(evaluations=key.map(key.value_counts()), _key=key).sort_values(
        "reward", ascending=False, kind="stable"
    )
    best = ordered.drop_duplicates("_key").head(k)
    columns = ["run", "stage", "budget", "episode", "reward", "accuracy", "flops_ratio", "params_ratio"]
    columns.append("evaluations")
    ranks = [c for c in df.columns if c.startswith(RANK)]
    return best[columns + ranks].reset_index(drop=True)


# ============================================================================================
# Summary tables
# ============================================================================================


def stage_table(infos: Sequence[RunInfo], df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage: agent, budget, episodes, best reward and its accuracy and cost,
    the stage's val accuracy after fine-tuning, and the run's final test accuracy (last stage).

    Args:
        infos: The runs, as read by :func:`read_runs`.
        df: Their episode frame.
    """
    best = best_episodes(df).set_index(["run", "stage"])
    rows = [_stage_row(info, stage, df, best) for info in infos for stage in info.stages]
    return pd.DataFrame(rows, columns=_STAGE_TABLE_COLUMNS)


_STAGE_TABLE_COLUMNS = [
    "run",
    "stage",
    "agent",
    "budget",
    "status",
    "episodes",
    "failed",
    "best_episode",
    "best_reward",
    "best_accuracy",
    "flops_ratio",
    "params_ratio",
    "val_accuracy",
    "test_accuracy",
]


def _stage_row(info: RunInfo, stage: StageInfo, df: pd.DataFrame, best: pd.DataFrame) -> dict[str, Any]:
    rows = df[(df["run"] == info.name) & (df["stage"] == stage.number)]
    top = best.loc[(info.name, stage.number)] if (info.name, stage.number) in best.index else None
    last = stage is info.stages[-1]
    test = (info.report or {}).get("compressed", {}).get("test_accuracy") if last else None
    return {
        "run": info.name,
        "stage": stage.number,
        "agent": info.config.get("agent") or (rows["agent"].mode().iat[0] if len(rows) else None),
        "budget": stage.budget,
        "status": "complete" if stage.result is not None else "incomplete",
        "episodes": len(rows),
        "failed": int(rows["failed"].sum()),
        "best_episode": int(top["episode"]) if top is not None else None,
        "best_reward": top["reward"] if top is not None else math.nan,
        "best_accuracy": top["accuracy"] if top is not None else math.nan,
        "flops_ratio": top["flops_ratio"] if top is not None else math.nan,
        "params_ratio": top["params_ratio"] if top is not None else math.nan,
        "val_accuracy": (stage.result or {}).get("val_accuracy", math.nan),
        "test_accuracy": math.nan if test is None else test,
    }


def best_strategy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each stage's best strategy per layer: ``run``, ``stage``, ``episode``, ``layer``, ``ratio``, ``ranks``."""
    rows = []
    for _, best in best_episodes(df).iterrows():
        for layer in layer_names(df):
            if not pd.isna(best[RATIO + layer]):
                rows.append(
                    {
                        "run": best["run"],
                        "stage": best["stage"],
                        "episode": best["episode"],
                        "layer": layer,
                        "ratio": best[RATIO + layer],
                        "ranks": best[RANK + layer],
                    }
                )
    return pd.DataFrame(rows, columns=["run", "stage", "episode", "layer", "ratio", "ranks"])


def time_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per episode, per run and stage, split into decompose / fine-tune / evaluate /
    agent / env (the rest of the environment step) and their total."""
    columns = [f"time_{key}" for key in TIME_KEYS]
    table = df.groupby(["run", "stage"], sort=False)[columns].mean().reset_index()
    table.insert(2, "episodes", df.groupby(["run", "stage"], sort=False).size().to_numpy())
    return table.rename(columns={c: c[len("time_") :] for c in columns})


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (floats rounded to ``digits``; missing values blank)."""
    header = "| " + " | ".join(_cell(c, digits) for c in df.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


# ============================================================================================
# Plots (matplotlib, Agg backend)
# ============================================================================================


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
    """Reward per episode (crosses: failed or at another budget) with the running best, per stage."""
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
    """The running best reward of several runs (and stages), overlaid."""
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
    """Heatmap of every layer's kept rank ratio (rows) over the episodes (columns), stage after stage."""
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
    """Validation accuracy vs FLOP ratio of every successful episode, the Pareto front highlighted."""
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
    """Each stage's best strategy: kept rank ratio per layer as bars, labelled with the ranks."""
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


# ============================================================================================
# Reports and export
# ============================================================================================


def export_episodes(df: pd.DataFrame, out: RunPath, fmt: str) -> Path:
    """Write the episode frame as ``out/episodes.csv`` or ``out/episodes.parquet``.

    Raises:
        AnalysisError: Unknown format, or parquet without pyarrow installed.
    """
    _check_export(fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"episodes.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False, engine="pyarrow")
    return path


def _check_export(fmt: str | None) -> None:
    if fmt is not None and fmt not in EXPORT_FORMATS:
        raise AnalysisError(f"unknown export format {fmt!r} (use csv or parquet)")
    if fmt == "parquet":
        require_pyarrow()


def require_pyarrow() -> None:
    """Raise :class:`AnalysisError` with the fix when pyarrow (parquet export) is missing."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise AnalysisError(
            "parquet export needs pyarrow: pip install pyarrow (or pip install 'rlrank[parquet]')"
        ) from None


def write_run_report(
    run: RunPath | RunInfo, out: RunPath | None = None, top: int = 0, export: str | None = None
) -> Path:
    """Analyse one run: plots and ``report.md`` in ``out`` (default ``RUN/analysis``).

    Args:
        run: The run folder, or the run as read by :func:`read_run`.
        out: The output folder.
        top: Also list the ``top`` best distinct strategies (0: no).
        export: Also write the episode frame (``"csv"`` or ``"parquet"``).

    Returns:
        The path of ``report.md``.

    Raises:
        AnalysisError: Not a run, or a missing dependency for ``export``.
        OSError: The output folder cannot be written.
    """
    _check_export(export)
    info = read_run(run)
    df = episodes_frame([info])
    out = Path(out) if out is not None else info.path / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Analysis of run `{info.name}`", "", *_run_header(info, df), ""]
    lines += _section("Stages", stage_table([info], df).drop(columns="run"))
    lines += _section("Best strategy per layer", best_strategy_table(df).drop(columns="run"))
    lines += _section("Mean time per episode (seconds)", time_table(df).drop(columns="run"))
    if top > 0:
        lines += _section(f"Top {top} distinct strategies", top_strategies(df, top).drop(columns="run"))
    lines += _plot_section(df, out)
    lines += _export_section(df, out, export)
    return _write_report(out, lines)


def write_comparison_report(
    runs: Sequence[RunPath | RunInfo], out: RunPath, top: int = 0, export: str | None = None
) -> Path:
    """Compare several runs: one table per run and stage, overlaid running-best curves, ``report.md``.

    Args:
        runs: The run folders (or runs as read by :func:`read_runs`).
        out: The output folder.
        top: Also list the ``top`` best distinct strategies over all runs (0: no).
        export: Also write the joined episode frame (``"csv"`` or ``"parquet"``).

    Returns:
        The path of ``report.md``.
    """
    _check_export(export)
    infos = read_runs(runs)
    df = episodes_frame(infos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Comparison of runs", ""]
    lines += [f"- [`{info.name}`]({_relative(info.path, out)}): {describe_run(info)}" for info in infos]
    lines.append("")
    lines += _section("Runs and stages", stage_table(infos, df))
    if top > 0:
        lines += _section(f"Top {top} distinct strategies", top_strategies(df, top))
    if df.empty:
        lines += ["No episode logged yet: no plot.", ""]
    else:
        plot_running_best(df, out / COMPARE_PLOT)
        lines += ["## Running best reward", "", f"![running best reward]({COMPARE_PLOT})", ""]
    lines += _export_section(df, out, export)
    return _write_report(out, lines)


def describe_run(info: RunInfo) -> str:
    """One line: model, data set, decomposition, agent, budget, stages and whether the run is complete."""
    c = info.config
    status = "complete" if info.complete else "incomplete (in progress or stopped)"
    return (
        f"{c.get('model')} on {c.get('dataset')}, {c.get('decomposition')}, agent {c.get('agent')}, "
        f"FLOP budget {c.get('flops')}, {len(info.stages)} stage(s), {status}"
    )


def _run_header(info: RunInfo, df: pd.DataFrame) -> list[str]:
    lines = [f"- run: {describe_run(info)}", f"- episodes logged: {len(df)}"]
    dense = (info.report or {}).get("dense") or info.dense or {}
    compressed = (info.report or {}).get("compressed") or {}
    if isinstance(dense.get("test_accuracy"), (int, float)):
        lines.append(f"- dense test accuracy: {dense['test_accuracy']:.4f}")
    if isinstance(compressed.get("test_accuracy"), (int, float)):
        flops = compressed.get("flops_ratio", math.nan)
        lines.append(
            f"- compressed test accuracy: {compressed['test_accuracy']:.4f} at {flops:.4f} of the FLOPs"
        )
    return lines


def _section(title: str, table: pd.DataFrame) -> list[str]:
    body = markdown_table(table) if len(table) else "(none yet)"
    return [f"## {title}", "", body, ""]


def _plot_section(df: pd.DataFrame, out: Path) -> list[str]:
    if df.empty:
        logger.warning("no episode logged yet: no plots")
        return ["## Plots", "", "No episode logged yet: no plot.", ""]
    plots = [
        ("Reward per episode", PLOTS["reward"], plot_reward, True),
        ("Kept rank ratio per layer over the episodes", PLOTS["ratios"], plot_ratios, bool(layer_names(df))),
        ("Accuracy vs FLOP ratio, Pareto front", PLOTS["pareto"], plot_pareto, bool((~df["failed"]).any())),
        ("Best strategy", PLOTS["best"], plot_best_strategy, not best_episodes(df).empty),
    ]
    lines = ["## Plots", ""]
    for title, name, plot, possible in plots:
        if possible:
            plot(df, out / name)
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
        else:
            lines += [f"### {title}", "", "Not enough data for this plot yet.", ""]
    return lines


def _export_section(df: pd.DataFrame, out: Path, export: str | None) -> list[str]:
    if not export:
        return []
    path = export_episodes(df, out, export)
    return ["## Data", "", f"Episode frame: [{path.name}]({path.name})", ""]


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path)


def _write_report(out: Path, lines: list[str]) -> Path:
    path = out / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path
