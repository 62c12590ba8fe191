"""Atomic file writes: a temporary file in the same folder, flushed, fsynced, then renamed.

A reader (or a resumed search after ``kill -9``) sees either the old file or the complete new one,
never a torn one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from rlrank.errors import StorageError

TEMP_SUFFIX = ".tmp"
"""Temporary files are ``.<name>.<random>.tmp`` next to their target (removed on resume)."""


def current_umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(path: Path, exc: BaseException) -> StorageError:
    """A :class:`StorageError` naming ``path`` and what to do, for an ``OSError`` (or torch's
    "unexpected pos" when a disk fills during ``torch.save``)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "unexpected pos" in str(exc):
        reason = "no space left on the device"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = str(exc).strip().splitlines()[0]
    return StorageError(f"cannot write {path}: {reason}; free space (or fix the folder) and resume the run")


def is_storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write (``OSError``, or torch's serializer on a full disk)."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "unexpected pos" in str(exc))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, then rename it to ``path``.

    The file gets the mode a plain ``open`` would give it (``0666`` less the umask).

    Raises:
        StorageError: The file could not be written (e.g. no space left); the old file is intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise storage_error(path, exc) from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_storage_failure(exc):
            raise storage_error(path, exc) from exc
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write(path, lambda h: h.write(text.encode()))


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically; keep ``obj`` to tensors and plain containers so that it loads with
    ``weights_only=True``.

    The object is serialized in memory first: torch's writer calls back into Python for every chunk
    it writes to a file object and turns any exception raised there, a Ctrl-C's
    ``KeyboardInterrupt`` included, into a ``RuntimeError`` ("unexpected pos"), which would read as a
    full disk. In memory no Python runs inside ``torch.save``, so a Ctrl-C is raised after it.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    return atomic_write(path, lambda h: h.write(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
