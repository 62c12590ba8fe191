"""Command-line options generated from a config dataclass: every option is declared once, as a field.

A field declared with :func:`option` carries its help, group, value type, choices and flag in its
metadata; :func:`build_parser` turns every such field into an ``argparse`` argument (booleans that
default to ``True`` become ``--no-NAME`` switches), and :func:`config_from_args` turns the parsed
namespace back into the dataclass. ``--help`` shows each option's default. cleanrl's ``Args``
dataclass is the model.

The value types below reject bad values with one line (``argparse`` exits with code 2).
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any, NoReturn

EXIT_USAGE = 2


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1]."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return [fraction(v) for v in values]


def count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


SEED_MAX = 2**32 - 1
"""Seeds go to NumPy's legacy generator too, which takes 0 .. 2**32 - 1."""


def seed_number(text: str) -> int:
    """A random seed: a whole number in 0 .. 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number in 0..{SEED_MAX}, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in 0..{SEED_MAX}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def weight(text: str) -> float:
    """A finite number in [0, 1] (a mixing weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def size_or_fraction(text: str) -> float:
    """A fraction in (0, 1) or a whole number of items >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a count, got {text!r}") from None
    if not (math.isfinite(value) and value > 0) or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) or a whole count >= 1, got {text}")
    return value


def globs(text: str) -> list[str]:
    """Comma-separated shell-style patterns (``layer1.*,linear``)."""
    patterns = [part.strip() for part in text.split(",") if part.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer names or patterns, got {text!r}")
    return patterns


def thread_count(text: str) -> int:
    """A number of threads >= 0 (0: automatic)."""
    return count(text)


def epochs(text: str) -> float:
    """A number of epochs >= 0 (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# --------------------------------------------------------------------------------------------
# Declaring options
# --------------------------------------------------------------------------------------------


def option(
    default: Any = MISSING,
    *,
    help: str,
    group: str,
    type: Callable[[str], Any] | None = None,
    choices: Sequence[str] | str | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    resume_safe: bool = False,
) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: The default value (also the option's).
        help: One line for ``--help``; ``{choices}`` in it is replaced by the allowed values, and
            ``(default: ...)`` is appended unless the text mentions it.
        group: The ``--help`` section the option belongs to.
        type: Parses the option's text (one of the value types above, ``int``, ``float``, ``str``).
        choices: Allowed values, or ``"module:function"`` returning them (resolved when the parser
            is built, so that a torch-free config module can name registries that import torch).
        flag: The option's flag (default ``--field-name``; ``--no-field-name`` for booleans that
            default to ``True``).
        metavar: Placeholder of the value in ``--help``.
        default_factory: For mutable defaults, as in :func:`dataclasses.field`.
        resume_safe: The option may be given again with ``--resume`` to change a run that failed
            or stopped (e.g. the final fine-tune's settings); the others are fixed once a run started.
    """
    metadata = {
        "cli": True,
        "help": help,
        "group": group,
        "type": type,
        "choices": choices,
        "flag": flag,
        "metavar": metavar,
        "resume_safe": resume_safe,
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _resolve_choices(choices: Sequence[str] | str | None) -> list[str] | None:
    if choices is None or not isinstance(choices, str):
        return list(choices) if choices is not None else None
    module, _, name = choices.partition(":")
    found = getattr(importlib.import_module(module), name)
    return list(found() if callable(found) else found)


def cli_fields(config_class: type) -> list[Field]:
    """The fields of ``config_class`` declared with :func:`option`, in declaration order."""
    return [f for f in fields(config_class) if f.metadata.get("cli")]


def flag_of(f: Field, default: Any) -> str:
    """The command-line flag of an :func:`option` field (``--no-NAME`` for a boolean that defaults to true)."""
    name = f.name.replace("_", "-")
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return f"--no-{name}" if default is True else f"--{name}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_config_options(
    parser: argparse.ArgumentParser, config_class: type, suppress_defaults: bool = False
) -> dict[str, argparse._ArgumentGroup]:
    """Add one option per :func:`option` field of ``config_class``, grouped as declared.

    Args:
        parser: The parser to add to.
        config_class: The dataclass whose :func:`option` fields become options.
        suppress_defaults: Leave options that are not given out of the parsed namespace (to learn
            which options a command line sets explicitly).

    Returns:
        The argument groups by title, so that a command can add its own options to them.
    """
    defaults = config_class()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(config_class):
        meta = f.metadata
        group = groups.get(meta["group"]) or parser.add_argument_group(meta["group"])
        groups[meta["group"]] = group
        default = getattr(defaults, f.name)
        help_text = meta["help"]
        flag = flag_of(f, default)
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            given_default = argparse.SUPPRESS if suppress_defaults else default
            group.add_argument(flag, dest=f.name, action=action, default=given_default, help=help_text)
            continue
        choices = _resolve_choices(meta["choices"])
        if choices is not None:
            help_text = help_text.replace("{choices}", ", ".join(choices))
        if default is not None and "%(default)s" not in help_text:
            help_text = f"{help_text} (default: %(default)s)"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS if suppress_defaults else default,
            "help": help_text,
        }
        if meta["type"] is not None:
            kwargs["type"] = meta["type"]
        if choices is not None:
            kwargs["choices"] = choices
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        group.add_argument(flag, **kwargs)
    return groups


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """The ``config_class`` instance holding what :func:`add_config_options`' options parsed."""
    names = {f.name for f in cli_fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})
