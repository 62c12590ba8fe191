"""Offline analysis of a search's episode logs: one frame, summary tables, plots, Markdown reports.

Reads a run folder (see :mod:`rlrank.run_folder`) that is complete, still being written, or left
behind by a crash: a torn last log row is skipped with a warning, a stage without rows is fine.
Nothing here imports torch, so logs can be studied on any machine with pandas and matplotlib.

Typical use::

    from rlrank.analysis import load_episodes, pareto_front, write_run_report

    df = load_episodes("runs/resnet18-tucker2-ddpg-flops0.5-20261122-101500")
    front = pareto_front(df[~df.failed])
    write_run_report("runs/resnet18-tucker2-ddpg-flops0.5-20261122-101500")  # -> RUN/analysis/report.md

The package's rooms (this module re-exports their public names, so import from here):

* :mod:`rlrank.analysis.runs`: reading run folders into :class:`RunInfo` and the episode frame
  (its columns are listed there);
* :mod:`rlrank.analysis.tables`: best episodes, Pareto front, distinct strategies, summary
  tables and :func:`markdown_table`;
* :mod:`rlrank.analysis.plots`: the matplotlib figures (``*_figure`` returns one, ``plot_*``
  writes it as a PNG);
* :mod:`rlrank.analysis.report`: the Markdown reports, where they go by default, and the CSV /
  parquet export.
"""

from __future__ import annotations

from rlrank.analysis.plots import (
    COMPARE_PLOT,
    FLAT_SPAN,
    PLOTS,
    best_strategy_figure,
    pareto_axis,
    pareto_figure,
    plot_best_strategy,
    plot_pareto,
    plot_ratios,
    plot_reward,
    plot_running_best,
    ratios_figure,
    reward_figure,
    running_best_figure,
)
from rlrank.analysis.report import (
    ANALYSIS_DIR,
    COMPARE_DIR,
    EXPORT_FORMATS,
    REPORT,
    comparison_dir,
    export_episodes,
    is_analysis_folder,
    require_pyarrow,
    write_comparison_report,
    write_run_report,
)
from rlrank.analysis.runs import (
    BASE_COLUMNS,
    DENSE,
    RANK,
    RATIO,
    TIME_KEYS,
    AnalysisError,
    RunInfo,
    RunPath,
    StageInfo,
    describe_run,
    episodes_frame,
    format_ranks,
    layer_names,
    load_episodes,
    read_run,
    read_runs,
)
from rlrank.analysis.tables import (
    best_episodes,
    best_strategy_table,
    eligible,
    markdown_table,
    pareto_front,
    running_best,
    stage_table,
    strategy_key,
    time_table,
    top_strategies,
)

__all__ = [
    "ANALYSIS_DIR",
    "BASE_COLUMNS",
    "COMPARE_DIR",
    "COMPARE_PLOT",
    "DENSE",
    "EXPORT_FORMATS",
    "FLAT_SPAN",
    "PLOTS",
    "RANK",
    "RATIO",
    "REPORT",
    "TIME_KEYS",
    "AnalysisError",
    "RunInfo",
    "RunPath",
    "StageInfo",
    "best_episodes",
    "best_strategy_figure",
    "best_strategy_table",
    "comparison_dir",
    "describe_run",
    "eligible",
    "episodes_frame",
    "export_episodes",
    "format_ranks",
    "is_analysis_folder",
    "layer_names",
    "load_episodes",
    "markdown_table",
    "pareto_axis",
    "pareto_figure",
    "pareto_front",
    "plot_best_strategy",
    "plot_pareto",
    "plot_ratios",
    "plot_reward",
    "plot_running_best",
    "ratios_figure",
    "read_run",
    "read_runs",
    "require_pyarrow",
    "reward_figure",
    "running_best",
    "running_best_figure",
    "stage_table",
    "strategy_key",
    "time_table",
    "top_strategies",
    "write_comparison_report",
    "write_run_report",
]
