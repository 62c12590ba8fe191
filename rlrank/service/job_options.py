"""A job request's options -> the ``rlrank-search`` command line, checked by the command's own code.

``POST /jobs`` takes the options of ``rlrank-search`` as JSON (``{"model": "resnet18", "flops": 0.5}``;
names with ``_`` or ``-``; a boolean option as ``true`` / ``false``; a list option as a JSON list).
:func:`job_command` turns them into the command's arguments, parses them with the command's parser
and checks them with :func:`rlrank.preflight.validate`, so a bad option gets the very message the
command prints. The server chooses where a job writes (``--out``, ``--name``), and every path option
must resolve inside the server's runs folder (or a folder the server was told to read from).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlrank.config import SearchConfig
from rlrank.errors import ConfigError, UserError
from rlrank.options import cli_fields, flag_of

PATH_OPTIONS = ("data_dir", "checkpoint", "policy")
"""Options naming a file or folder: each must resolve inside the runs folder or a readable folder."""
SERVER_OPTIONS = ("out", "name", "threads")
"""Options the server sets for every job (``threads``: its cores shared among the jobs at once)."""
MAX_OPTIONS = 100


class JobOptionError(UserError):
    """A job request whose options cannot work (HTTP 422; nothing is queued)."""


@dataclass(frozen=True)
class JobCommand:
    """A validated job: the ``rlrank-search`` arguments (without ``--out`` / ``--name``) and the
    resolved configuration, as JSON-ready values."""

    argv: list[str]
    config: dict[str, Any]


def job_command(
    options: Mapping[str, Any], runs: Path, readable: Sequence[Path] = ()
) -> JobCommand:  # fmt: skip
    """Validate a request's options with ``rlrank-search``'s parser and checks.

    Args:
        options: The JSON object of the request.
        runs: The server's runs folder; relative paths are read from it.
        readable: Further folders whose files jobs may read (data sets, checkpoints).

    Raises:
        JobOptionError: An unknown, server-chosen, ill-typed or invalid option, or a path outside
            the allowed folders; the message is the one line ``rlrank-search`` would print.
    """
    from rlrank.preflight import validate
    from rlrank.search import build_parser, config_from_args

    if not isinstance(options, Mapping):
        raise JobOptionError("the request body must be a JSON object of rlrank-search options")
    if len(options) > MAX_OPTIONS:
        raise JobOptionError(f"at most {MAX_OPTIONS} options")
    fields = {f.name: f for f in cli_fields(SearchConfig)}
    defaults = SearchConfig()
    argv: list[str] = []
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name in SERVER_OPTIONS:
            raise JobOptionError(f"'{key}' is chosen by the server (every job writes into its runs folder)")
        if name not in fields:
            raise JobOptionError(f"unknown option '{key}' (the options of rlrank-search --help)")
        if value is None:
            continue
        if name in PATH_OPTIONS:
            value = str(confined_path(value, runs, readable, f"--{name.replace('_', '-')}"))
        argv += _arguments(fields[name], getattr(defaults, name), value, key)
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        raise JobOptionError(_one_line(stderr.getvalue(), parser.prog)) from exc
    config = config_from_args(args, argv)
    try:
        validate(config)
    except ConfigError as exc:
        raise JobOptionError(str(exc)) from exc
    return JobCommand(argv=argv, config=asdict(config))


def confined_path(value: Any, runs: Path, readable: Sequence[Path], option: str) -> Path:
    """``value`` as an absolute path that lies inside ``runs`` or one of ``readable`` (after
    resolving ``..`` and symbolic links); relative paths are read from ``runs``.

    Raises:
        JobOptionError: Not a string, or outside every allowed folder.
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise JobOptionError(f"{option} must be a path (a non-empty string)")
    path = (runs / value).resolve()
    allowed = [runs.resolve(), *(Path(r).resolve() for r in readable)]
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        raise JobOptionError(f"{option} {value!r} is outside the server's runs folder")
    return path


def _arguments(field: Any, default: Any, value: Any, key: str) -> list[str]:
    flag = flag_of(field, default)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise JobOptionError(f"'{key}' takes true or false, got {value!r}")
        return [flag] if value != default else []
    if isinstance(value, (bool, dict)) or isinstance(value, list) and "list[" not in str(field.type):
        raise JobOptionError(f"'{key}' takes one value, got {value!r}")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise JobOptionError(f"'{key}' takes a non-empty list of values, got {value!r}")
        value = ",".join(str(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        raise JobOptionError(f"'{key}' must be finite, got {value!r}")
    return [flag, str(value)]


def _one_line(message: str, prog: str) -> str:
    line = message.strip().splitlines()[-1] if message.strip() else "invalid options"
    return line.removeprefix(f"{prog}: error: ").removesuffix(" (see --help)")
