"""What a job's run folder says: episodes done of how many, the best reward so far, the result, the
files it holds. Reads the folder as ``rlrank-analyze`` does (complete, being written, or crashed)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from rlrank.analysis.runs import AnalysisError, load_episodes, read_run
from rlrank.run_folder import CONFIG_FILE, EPISODES_FILE, LOCK_FILE, REPORT_FILE, read_json

logger = logging.getLogger(__name__)

MAX_ARTIFACTS = 500


def has_run(run_dir: Path) -> bool:
    """Whether the search got far enough to create its run folder (``config.json`` written)."""
    return (run_dir / CONFIG_FILE).is_file()


def is_complete(run_dir: Path) -> bool:
    return (run_dir / REPORT_FILE).is_file()


_PROGRESS_CACHE: dict[Path, tuple[tuple, dict[str, Any]]] = {}
CACHE_SIZE = 1024


def _signature(run_dir: Path) -> tuple:
    """What changes when a run folder's progress can: its episode logs' and report's sizes and times."""
    files = [run_dir / CONFIG_FILE, run_dir / REPORT_FILE, *sorted(run_dir.glob(f"*/{EPISODES_FILE}"))]
    out = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path.name, path.parent.name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def progress(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Episodes done and planned (over every stage), the stage being searched and the best reward;
    the logs are read again only when they changed (the status of many jobs is asked for often)."""
    planned = int(config.get("episodes", 0)) * int(config.get("stages", 1))
    out: dict[str, Any] = {
        "episodes_done": 0,
        "episodes_planned": planned,
        "stage": None,
        "best_reward": None,
    }
    if not has_run(run_dir):
        return out
    signature = _signature(run_dir)
    cached = _PROGRESS_CACHE.get(run_dir)
    if cached is not None and cached[0] == signature:
        return {**out, **cached[1]}
    try:
        info = read_run(run_dir)
    except AnalysisError:
        return out
    done = [row for stage in info.stages for row in stage.rows]
    rewards = [row["reward"] for row in done if _finite(row.get("reward")) and not row.get("failed")]
    found = {
        "episodes_done": len(done),
        "stage": info.stages[-1].number if info.stages else None,
        "best_reward": max(rewards) if rewards else None,
    }
    if len(_PROGRESS_CACHE) >= CACHE_SIZE:
        _PROGRESS_CACHE.clear()
    _PROGRESS_CACHE[run_dir] = (signature, found)
    return {**out, **found}


def result(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's report (dense and compressed accuracy, FLOP and parameter ratios)."""
    if not is_complete(run_dir):
        return None
    report = read_json(run_dir / REPORT_FILE)
    dense, compressed = report.get("dense") or {}, report.get("compressed") or {}
    return {
        "dense_test_accuracy": dense.get("test_accuracy"),
        "test_accuracy": compressed.get("test_accuracy"),
        "test_accuracy_delta": report.get("test_accuracy_delta"),
        "flops_ratio": compressed.get("flops_ratio"),
        "params_ratio": compressed.get("params_ratio"),
        "reward_evaluations": report.get("reward_evaluations"),
        "search_seconds": report.get("search_seconds"),
        "wall_seconds": report.get("wall_seconds"),
    }


def episodes(run_dir: Path) -> pd.DataFrame:
    """The job's episode frame (:func:`rlrank.analysis.load_episodes`); empty before the first row."""
    if has_run(run_dir):
        try:
            return load_episodes(run_dir)
        except AnalysisError as exc:  # a damaged log: the status says so, the episodes are empty
            logger.warning("cannot read the episodes of %s: %s", run_dir, exc)
    return load_episodes([])


def artifacts(run_dir: Path) -> list[dict[str, Any]]:
    """The files of the run folder (relative paths and sizes), sorted; the lock file left out."""
    if not run_dir.is_dir():
        return []
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE)
    return [
        {"path": p.relative_to(run_dir).as_posix(), "bytes": p.stat().st_size} for p in files[:MAX_ARTIFACTS]
    ]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
