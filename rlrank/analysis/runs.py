"""Reading run folders: a run's configuration, stages and report, and its episodes as one frame.

Reads a run folder (see :mod:`rlrank.run_folder`) that is complete, still being written, or left
behind by a crash: a torn last log row is skipped with a warning, a stage without rows is fine.

The episode frame has one row per logged episode, in run, stage and episode order:

* ``run`` (the run folder's name), ``stage``, ``episode`` (int64), ``agent``, ``phase`` (strings);
* ``budget`` (the episode's FLOP target), ``stage_budget`` (the stage's target, from
  ``result.json`` or ``config.json``; NaN if unknown), ``reward``, ``accuracy``, ``loss``,
  ``flops_ratio``, ``params_ratio`` (float64), ``failed`` (bool) and ``failure`` (its reason);
* ``time_decompose``, ``time_finetune``, ``time_evaluate``, ``time_agent``, ``time_env``,
  ``time_total`` (seconds) and ``timestamp``;
* ``worker`` (nullable int: the Ray worker that priced the episode, ``<NA>`` without ``--workers``);
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

import pandas as pd

from rlrank.config import SearchConfig
from rlrank.errors import UserError
from rlrank.run_folder import (
    CONFIG_FILE,
    DENSE_INFO_FILE,
    EPISODES_FILE,
    REPORT_FILE,
    STAGE_DIR_PREFIX,
    STAGE_RESULT_FILE,
    RunFolder,
    RunFolderError,
)
from rlrank.runlog import read_rows

logger = logging.getLogger(__name__)

RunPath = str | os.PathLike
RATIO = "ratio/"
RANK = "rank/"
DENSE = "dense"
TIME_KEYS = ("decompose", "finetune", "evaluate", "agent", "env", "total")

_INT_COLUMNS = ("stage", "episode")
_STRING_COLUMNS = ("run", "agent", "phase", "failure")
_METRICS = ("budget", "stage_budget", "reward", "accuracy", "loss", "flops_ratio", "params_ratio")
_TIMES = (*(f"time_{key}" for key in TIME_KEYS), "timestamp")
_FLOAT_COLUMNS = (*_METRICS, *_TIMES)
BASE_COLUMNS = (
    "run", "stage", "episode", "agent", "phase", *_METRICS, "failed", "failure", *_TIMES, "worker"
)  # fmt: skip
_STAGE_DIR = re.compile(re.escape(STAGE_DIR_PREFIX) + r"(\d+)")


class AnalysisError(UserError):
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

    Returns:
        The run as read from disk.

    Raises:
        AnalysisError: The folder is missing, is not a run, or a log line other than the last is
            not an episode row.
    """
    if isinstance(run, RunInfo):
        return run
    path = _open_run(Path(run))
    config = _read_config(path / CONFIG_FILE)
    info = RunInfo(path=path, name=path.resolve().name, config=config)
    budgets = _stage_budgets(config)
    info.stages = [_read_stage(k, p, budgets.get(k, math.nan)) for k, p in _stage_dirs(path)]
    info.report = _read_json(path / REPORT_FILE)
    info.dense = _read_json(path / DENSE_INFO_FILE)
    return info


def read_runs(runs: RunPath | RunInfo | Sequence[RunPath | RunInfo]) -> list[RunInfo]:
    """Read several runs; runs whose folder names collide are named ``parent/name``.

    Args:
        runs: A run folder, or a list of them (or of :class:`RunInfo`).

    Returns:
        The runs, in the order given.

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


def describe_run(info: RunInfo) -> str:
    """One line: model, data set, decomposition, agent, budget, stages and whether the run is complete."""
    c = info.config
    status = "complete" if info.complete else "incomplete (in progress or stopped)"
    return (
        f"{c.get('model')} on {c.get('dataset')}, {c.get('decomposition')}, agent {c.get('agent')}, "
        f"FLOP budget {c.get('flops')}, {len(info.stages)} stage(s), {status}"
    )


def _open_run(path: Path) -> Path:
    try:
        return RunFolder.open(path).path
    except RunFolderError as exc:
        runs = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_FILE}")) if path.is_dir() else []
        if runs:
            shown = ", ".join(runs[:3]) + (", ..." if len(runs) > 3 else "")
            raise AnalysisError(f"{exc}; it holds {len(runs)} run folder(s) ({shown}): pass those") from None
        raise AnalysisError(str(exc)) from None


def _read_config(path: Path) -> dict[str, Any]:
    config = _read_json(path, required=True)
    if config is None:  # removed since the folder was opened
        raise AnalysisError(f"cannot read {path}: not found")
    return config


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
    result = _read_json(path / STAGE_RESULT_FILE)
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


def episodes_frame(infos: Iterable[RunInfo]) -> pd.DataFrame:
    """The episode frame of runs already read with :func:`read_run`."""
    frames = [_stage_frame(info.name, stage) for info in infos for stage in info.stages]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return _coerce(pd.DataFrame({column: [] for column in BASE_COLUMNS}))
    return _coerce(pd.concat(frames, ignore_index=True, sort=False))


def layer_names(df: pd.DataFrame) -> list[str]:
    """The layers of an episode frame, in network order."""
    return [c[len(RATIO) :] for c in df.columns if c.startswith(RATIO)]


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
    out["worker"] = row.get("worker")
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
    frame["worker"] = pd.to_numeric(frame["worker"]).astype("Int64")
    for column in (*_STRING_COLUMNS, *ranks):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame
