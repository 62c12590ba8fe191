"""What a job process runs: ``rlrank-search`` with the job's arguments, then, when it finished,
``rlrank-analyze`` on its run folder, so the job's artifacts hold the analysis plots and report
(``analysis/``) as well as the model and ``report.json``. The exit code is the search's."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def run_folder_of(argv: Sequence[str]) -> Path | None:
    """The run folder a job's arguments name: ``--resume RUN``, or ``--out`` / ``--name``."""
    args = list(argv)

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None

    if value("--resume"):
        return Path(value("--resume"))
    out, name = value("--out"), value("--name")
    return Path(out) / name if out and name else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search, then its analysis (a failed analysis is logged, the job still succeeds)."""
    from rlrank.search import main as search

    argv = list(sys.argv[1:] if argv is None else argv)
    code = search(argv)
    run_dir = run_folder_of(argv)
    if code == 0 and run_dir is not None:
        from rlrank.analyze import main as analyze

        try:
            analyzed = analyze([str(run_dir)])
        except Exception:  # noqa: BLE001 - the plots are a bonus; the job's result stands
            logger.exception("the analysis of %s failed", run_dir)
            analyzed = 1
        if analyzed != 0:
            sys.stderr.write(f"rlrank-serve: the analysis of {run_dir} failed; the search's result stands\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
