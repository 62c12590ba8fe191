"""Command line: ``python -m rlrank.search --model resnet18 --flops 0.5`` (also ``rlrank-search``).

The options are generated from :class:`~rlrank.config.SearchConfig` (:mod:`rlrank.options`); this
module adds ``--resume`` and ``--quiet``, calls :func:`rlrank.pipeline.run` and prints the dense vs
compressed result. Bad input (any :class:`~rlrank.errors.UserError`) exits with code 2 and one line
on stderr, without a traceback and without a run folder; a run that fails after it started
(:class:`~rlrank.errors.RunFailure`) exits with code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rlrank.config import RUN, SearchConfig
from rlrank.errors import Interrupted, RunFailure, UserError
from rlrank.options import EXIT_USAGE, OneLineParser, add_config_options, cli_fields, flag_of
from rlrank.options import config_from_args as _config_from_args
from rlrank.threads import choose_openmp_wait

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
PROG = "rlrank-search"


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The ``rlrank-search`` parser: one option per :class:`SearchConfig` field, plus ``--resume`` and
    ``--quiet`` (``suppress_defaults``: options not given stay out of the namespace)."""
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Compress a CNN to a FLOP budget with low-rank decomposition; a DDPG agent (or a baseline "
            "selector) chooses every layer's rank, rewarded by validation accuracy after a cheap fine-tune."
        ),
        epilog=(
            "examples:\n"
            "  rlrank-search --model resnet18 --flops 0.5                       # embedded digits data\n"
            "  rlrank-search --model resnet20 --flops 0.5 --dataset imagefolder \\\n"
            "      --data-dir ../shared/data/cifar10-jpeg.tar.gz --checkpoint ../shared/models/cifar-resnet/resnet20-jpeg.pt\n"
            "  rlrank-search --resume runs/resnet18-tucker2-ddpg-flops0.5-20261122-101500   # continue a killed search"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = add_config_options(parser, SearchConfig, suppress_defaults=suppress_defaults)
    groups[RUN].add_argument(
        "--resume",
        metavar="RUN",
        help="continue a killed or failed search in run folder RUN; its other options come from its "
        "config.json, except those given here that may change (" + ", ".join(_resume_safe()) + ")",
    )
    groups[RUN].add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    groups[RUN].add_argument(
        "--dry-run",
        action="store_true",
        help="check the options, load data and model, list the layers (MACs, params, what the search "
        "would do with each) and the smallest reachable budget; search nothing, write nothing",
    )
    return parser


def _resume_safe() -> list[str]:
    defaults = SearchConfig()
    return [
        flag_of(f, getattr(defaults, f.name)) for f in cli_fields(SearchConfig) if f.metadata["resume_safe"]
    ]


def given_options(argv: Sequence[str] | None) -> dict[str, object]:
    """The config options a command line sets explicitly (``--resume`` and ``--quiet`` excluded)."""
    given = vars(build_parser(suppress_defaults=True).parse_args(argv))
    return {k: v for k, v in given.items() if k not in ("resume", "quiet", "dry_run")}


def config_from_args(args: argparse.Namespace, argv: Sequence[str] | None = None) -> SearchConfig:
    """The :class:`SearchConfig` that parsed options describe; with ``--latency`` and no ``--flops`` on
    the command line ``argv``, the latency budget alone (``--flops 1``)."""
    config = _config_from_args(SearchConfig, args)
    if config.latency_budget is not None and "flops" not in given_options(argv):
        config.flops = 1.0
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    choose_openmp_wait()  # before torch is imported
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported in one line
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlrank.pipeline import run
    from rlrank.report import summarize

    try:
        if args.dry_run:
            from rlrank.dry_run import layer_listing
            from rlrank.preflight import prepare

            print(layer_listing(prepare(config_from_args(args, argv))))  # noqa: T201 - the command's result
            return 0
        with logging_redirect_tqdm():
            if args.resume:
                overrides = given_options(argv)
                report = run(resume=args.resume, progress=not args.quiet, overrides=overrides)
            else:
                report = run(config_from_args(args, argv), progress=not args.quiet)
    except UserError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except RunFailure as exc:
        if exc.run_dir and exc.resumable:
            where = f" (run folder {exc.run_dir}: continue with --resume {exc.run_dir})"
        elif exc.run_dir:
            where = f" (run folder {exc.run_dir}; start a new run with other options)"
        else:
            where = ""
        sys.stderr.write(f"{PROG}: search failed: {exc}{where}\n")
        return EXIT_FAILED
    except Interrupted as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted before a run folder was created; nothing to resume\n")
        return EXIT_INTERRUPTED
    print(summarize(report))  # noqa: T201 - the command's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
