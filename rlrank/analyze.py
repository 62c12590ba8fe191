"""Command line: ``python -m rlrank.analyze RUN [RUN ...]`` (also ``rlrank-analyze``).

One run: prints its summary tables and writes plots and ``report.md`` into ``RUN/analysis/``.
Several runs: prints one comparison table and writes it, the overlaid running-best curves and
``report.md`` into ``--out``, by default ``analysis-compare/`` in the runs' common parent folder
(``runs/a runs/b`` -> ``runs/analysis-compare/``), never the current folder; the output folder is
printed first. Among several folders, one holding an earlier report and no run (what
``runs/*/`` also matches) is skipped with a note. Bad input (a missing folder, a folder that is not
a run, parquet without pyarrow) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from rlrank import analysis
from rlrank.errors import UserError
from rlrank.options import EXIT_USAGE, OneLineParser, positive

PROG = "rlrank-analyze"
COMPARE_DIR = analysis.COMPARE_DIR


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description=(
            "Analyse the episode logs of rlrank searches (complete, in progress or crashed): summary "
            "tables, plots and a Markdown report for one run, or a comparison of several runs."
        ),
        epilog=(
            "examples:\n"
            "  rlrank-analyze runs/resnet18-tucker2-ddpg-flops0.5-20261122-101500  # -> RUN/analysis/report.md\n"
            f"  rlrank-analyze runs/*/ --top 5                                      # -> runs/{COMPARE_DIR}/report.md\n"
            "  rlrank-analyze runs/a runs/b --out compare                          # -> compare/report.md\n"
            "  rlrank-analyze RUN --export parquet                                 # + RUN/analysis/episodes.parquet\n"
            "\n"
            f"Several runs are compared in {COMPARE_DIR}/ in their common parent folder, not in the\n"
            "current folder, unless --out DIR is given; the folder is printed first. A folder holding\n"
            f"an earlier report and no run (runs/{COMPARE_DIR}/, matched by runs/*/) is skipped."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s), each holding config.json")
    p.add_argument(
        "--out",
        metavar="DIR",
        help=(
            f"output folder (default: RUN/analysis for one run; for several, {COMPARE_DIR}/ in the runs' "
            f"common parent folder, e.g. runs/{COMPARE_DIR} for runs/a runs/b)"
        ),
    )
    p.add_argument(
        "--top", type=positive, default=0, metavar="K", help="also list the K best distinct strategies"
    )
    p.add_argument(
        "--export",
        choices=analysis.EXPORT_FORMATS,
        help="also write the joined episode frame as episodes.csv or episodes.parquet (needs pyarrow)",
    )
    return p


def _print_table(title: str, table: pd.DataFrame) -> None:
    print(f"\n{title}")  # noqa: T201 - the command's result
    if table.empty:
        print("  (none yet)")  # noqa: T201
    else:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))  # noqa: T201


def _analyse_one(info: analysis.RunInfo, out: str | None, top: int, export: str | None) -> Path:
    df = analysis.episodes_frame([info])
    print(f"run {info.name}: {analysis.describe_run(info)}")  # noqa: T201
    _print_table("stages", analysis.stage_table([info], df).drop(columns="run"))
    _print_table("best strategy per layer", analysis.best_strategy_table(df).drop(columns="run"))
    _print_table("mean time per episode (s)", analysis.time_table(df).drop(columns="run"))
    if top:
        _print_table(f"top {top} distinct strategies", analysis.top_strategies(df, top).drop(columns="run"))
    return analysis.write_run_report(info, out, top=top, export=export)


def _analyse_many(infos: list[analysis.RunInfo], out: str | None, top: int, export: str | None) -> Path:
    folder = Path(out) if out else analysis.comparison_dir(infos)
    how = "--out" if out else "the runs' common parent folder; --out DIR to choose"
    print(f"comparing {len(infos)} runs into {folder}/ ({how})")  # noqa: T201
    df = analysis.episodes_frame(infos)
    _print_table("runs and stages", analysis.stage_table(infos, df))
    if top:
        _print_table(f"top {top} distinct strategies", analysis.top_strategies(df, top))
    return analysis.write_comparison_report(infos, folder, top=top, export=export)


def _runs_only(paths: list[str]) -> list[str]:
    """Drop, among several folders, those holding an earlier report rather than a run."""
    if len(paths) < 2:
        return paths
    kept = []
    for path in paths:
        if analysis.is_analysis_folder(path):
            print(f"skipping {path}: the report of an earlier analysis, not a run")  # noqa: T201
        else:
            kept.append(path)
    return kept or paths


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.export == "parquet":
            analysis.require_pyarrow()
        infos = analysis.read_runs(_runs_only(args.runs))
        if len(infos) == 1:
            report = _analyse_one(infos[0], args.out, args.top, args.export)
        else:
            report = _analyse_many(infos, args.out, args.top, args.export)
    except UserError as exc:  # AnalysisError and every other bad input
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"{PROG}: error: {where}{exc.strerror or exc} (choose another --out DIR?)\n")
        return EXIT_USAGE
    print(f"\nwrote {report}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
