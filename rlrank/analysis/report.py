"""Markdown reports of one run or a comparison of runs (tables, plots, links), where they go by
default (``RUN/analysis/``; ``analysis-compare/`` beside the runs), and the export of the episode
frame as CSV or parquet."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rlrank.analysis.plots import (
    COMPARE_PLOT,
    PLOTS,
    pareto_axis,
    plot_best_strategy,
    plot_pareto,
    plot_ratios,
    plot_reward,
    plot_running_best,
)
from rlrank.analysis.runs import (
    AnalysisError,
    RunInfo,
    RunPath,
    describe_run,
    episodes_frame,
    layer_names,
    read_run,
    read_runs,
)
from rlrank.analysis.tables import (
    best_episodes,
    best_strategy_table,
    markdown_table,
    stage_table,
    time_table,
    top_strategies,
)
from rlrank.run_folder import CONFIG_FILE

logger = logging.getLogger(__name__)

ANALYSIS_DIR = "analysis"
"""The folder of a run's report, inside the run folder."""
REPORT = "report.md"
COMPARE_DIR = "analysis-compare"
"""The default folder of a comparison report, in the runs' common parent folder."""
EXPORT_FORMATS = ("csv", "parquet")
_RUN_TITLE = "# Analysis of run "
_COMPARE_TITLE = "# Comparison of runs"


def comparison_dir(runs: Sequence[RunPath | RunInfo]) -> Path:
    """Where a comparison of ``runs`` goes by default: ``analysis-compare/`` in their common parent.

    Runs in ``runs/`` give ``runs/analysis-compare``; runs in different folders give that folder
    in the deepest folder holding them all (an absolute path either way).

    Args:
        runs: The run folders (or runs as read by :func:`read_runs`); at least one.

    Returns:
        The output folder (not created).
    """
    paths = [Path(run.path if isinstance(run, RunInfo) else run) for run in runs]
    parents = [os.path.dirname(os.path.abspath(path)) for path in paths]
    return Path(os.path.commonpath(parents)) / COMPARE_DIR


def is_analysis_folder(path: RunPath) -> bool:
    """Whether ``path`` holds a report written here (and is not a run), e.g. an earlier comparison.

    ``rlrank-analyze runs/*/`` also matches ``runs/analysis-compare/``; the command skips it.
    """
    path = Path(path)
    if (path / CONFIG_FILE).exists() or not (path / REPORT).is_file():
        return False
    try:
        with open(path / REPORT, encoding="utf-8") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return first.startswith((_RUN_TITLE, _COMPARE_TITLE))


def export_episodes(df: pd.DataFrame, out: RunPath, fmt: str) -> Path:
    """Write the episode frame as ``out/episodes.csv`` or ``out/episodes.parquet``.

    Args:
        df: The episode frame.
        out: The output folder (created if missing).
        fmt: ``"csv"`` or ``"parquet"``.

    Returns:
        The path of the written file.

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
    lines = [f"{_RUN_TITLE}`{info.name}`", "", *_run_header(info, df), ""]
    lines += _section("Stages", stage_table([info], df).drop(columns="run"))
    lines += _section("Best strategy per layer", best_strategy_table(df).drop(columns="run"))
    lines += _section("Mean time per episode (seconds)", time_table(df).drop(columns="run"))
    if top > 0:
        lines += _section(f"Top {top} distinct strategies", top_strategies(df, top).drop(columns="run"))
    lines += _plot_section(df, out)
    lines += _export_section(df, out, export)
    return _write_report(out, lines)


def write_comparison_report(
    runs: Sequence[RunPath | RunInfo], out: RunPath | None = None, top: int = 0, export: str | None = None
) -> Path:
    """Compare several runs: one table per run and stage, overlaid running-best curves, ``report.md``.

    Args:
        runs: The run folders (or runs as read by :func:`read_runs`).
        out: The output folder (default: :func:`comparison_dir`, ``analysis-compare/`` in the
            runs' common parent folder).
        top: Also list the ``top`` best distinct strategies over all runs (0: no).
        export: Also write the joined episode frame (``"csv"`` or ``"parquet"``).

    Returns:
        The path of ``report.md``.
    """
    _check_export(export)
    infos = read_runs(runs)
    df = episodes_frame(infos)
    out = Path(out) if out is not None else comparison_dir(infos)
    out.mkdir(parents=True, exist_ok=True)
    lines = [_COMPARE_TITLE, ""]
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
        (_pareto_title(df), PLOTS["pareto"], plot_pareto, bool((~df["failed"]).any())),
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


def _pareto_title(df: pd.DataFrame) -> str:
    if pareto_axis(df) == "params_ratio":
        return "Accuracy vs parameter ratio, Pareto front (every episode spent the FLOP budget)"
    return "Accuracy vs FLOP ratio, Pareto front"


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
