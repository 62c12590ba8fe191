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


def _number(kind: type, description: str, accept: Callable[[float], bool]) -> Callable[[str], Any]:
    """A value type: ``kind(text)`` (``int`` or ``float``) that is finite and passes ``accept``; a bad
    value is refused with one line naming ``description``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    parse.__doc__ = description[0].upper() + description[1:] + "."
    return parse


SEED_MAX = 2**32 - 1
"""Seeds go to NumPy's legacy generator too, which takes 0 .. 2**32 - 1."""

fraction = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
count = _number(int, "a whole number >= 0", lambda v: v >= 0)
positive = _number(int, "a whole number >= 1", lambda v: v >= 1)
seed_number = _number(int, f"a whole number in 0..{SEED_MAX}", lambda v: 0 <= v <= SEED_MAX)
epochs = _number(float, "a number of epochs >= 0", lambda v: v >= 0)
positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
non_negative_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
weight = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
sparse_fraction = _number(float, "a number in [0, 0.9)", lambda v: 0 <= v < 0.9)
size_or_fraction = _number(
    float, "a fraction in (0, 1) or a whole count >= 1", lambda v: 0 < v < 1 or (v >= 1 and v == int(v))
)


def _items(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return items


def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1]."""
    return [fraction(v) for v in _items(text, "numbers in (0, 1]")]


def widths(text: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (layer widths: ``300,300``)."""
    return [positive(v) for v in _items(text, "whole numbers >= 1")]


def globs(text: str) -> list[str]:
    """Comma-separated shell-style patterns (``layer1.*,linear``)."""
    return _items(text, "layer names or patterns")


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
            shown = ",".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            help_text = f"{help_text} (default: {shown})"
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
