"""The episode log: one JSON object per line, appended and flushed as each episode ends.

Every row is written with a single ``write`` of a complete line followed by ``fsync``, so a search
killed at any moment leaves at most one torn last line; :func:`read_rows` drops it with a warning
(and :func:`truncate_rows` removes it, with any rows past a resume point, before a search goes on).

Row fields (see :func:`rlrank.pipeline.episode_row`): ``stage``, ``episode``, ``agent``,
``budget``, ``reward``, ``accuracy``, ``loss``, ``flops_ratio``, ``params_ratio``, ``failed``,
``phase`` (``center``, ``warmup``, ``explore``, ``random``, ``policy``, ``rule``), ``time`` (seconds: ``decompose``,
``finetune``, ``evaluate``, ``agent``, ``env``, ``total``), ``layers`` (per layer: ``ratio``,
``ranks``, ``method``), ``agent_stats`` (e.g. the DDPG critic loss and noise std) and ``timestamp``
(seconds since the epoch). Rows hold no NaN: missing values are ``null``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from rlrank.atomic import atomic_write, storage_error
from rlrank.errors import UserError
from rlrank.run_folder import EPISODES_FILE

logger = logging.getLogger(__name__)

__all__ = ["EPISODES_FILE", "EpisodeLogError", "append_row", "read_rows", "truncate_rows"]


class EpisodeLogError(UserError):
    """An episode log that is damaged beyond a torn last line."""


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row as a JSON line and force it to disk.

    Raises:
        StorageError: The row could not be written (e.g. no space left).
    """
    line = json.dumps(_finite(row), separators=(",", ":"), allow_nan=False) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise storage_error(Path(path), exc) from exc


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats replaced by ``None`` (strict JSON, readable by jq)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read every complete row; a torn or unreadable last line is skipped with a warning.

    Raises:
        EpisodeLogError: A line other than the last is not valid JSON (the file is not an episode log).
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        try:
            if not line.endswith("\n"):
                raise ValueError("line not terminated")
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            if last:
                logger.warning("%s: skipping a partial last row (%s)", path, exc)
                break
            raise EpisodeLogError(f"{path}: line {i + 1} is not a valid episode row: {exc}") from exc
        rows.append(row)
    return rows


def truncate_rows(path: str | Path, keep: int) -> list[dict[str, Any]]:
    """Keep only the first ``keep`` complete rows (atomically); returns them."""
    path = Path(path)
    rows = read_rows(path)[:keep]
    text = "".join(json.dumps(_finite(r), separators=(",", ":"), allow_nan=False) + "\n" for r in rows)
    if path.exists():
        atomic_write(path, lambda h: h.write(text.encode()))
    return rows
