"""The run folder: where a search keeps everything, and the lock that gives it one writer.

Layout::

    runs/<model>-flops<x>-<YYYYmmdd-HHMMSS>/
        config.json           resolved configuration
        dense.pt / dense.json the dense model trained here (when no checkpoint was given) and its accuracy
        stage-1/              one folder per compression stage
            episodes.jsonl    the episode log
            best_strategy.json
            policy/           the DDPG policy (policy.pt, policy.json, replay.npz)
            checkpoint.json   pointer to the latest resume checkpoint (checkpoint-<n>/)
            model.pt          the model after this stage's fine-tune
            result.json       written last: the stage is complete
        model.pt              the final compressed model (rlrank.load)
        report.json           written last: the run is complete

A run is complete only when ``report.json`` exists; everything is written atomically.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from rlrank.errors import UserError

# The names of everything a run folder holds: the one place they are spelled (the pipeline, the
# analysis and the experiments all use these).
CONFIG_FILE = "config.json"
DENSE_MODEL_FILE = "dense.pt"
DENSE_INFO_FILE = "dense.json"
MODEL_FILE = "model.pt"
REPORT_FILE = "report.json"
EPISODES_FILE = "episodes.jsonl"
BEST_STRATEGY_FILE = "best_strategy.json"
POLICY_DIR = "policy"
STAGE_RESULT_FILE = "result.json"
CHECKPOINT_POINTER_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
STAGE_DIR_PREFIX = "stage-"


def stage_dir_name(k: int) -> str:
    """The folder of stage ``k`` (1-based) inside a run folder."""
    return f"{STAGE_DIR_PREFIX}{k}"


class RunFolderError(UserError):
    """A run folder that cannot be created, is in use, is not a run, or is damaged."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file of the run folder.

    Raises:
        RunFolderError: The file is missing, unreadable or not a JSON object (a damaged run folder).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: the run folder is incomplete or damaged") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is damaged ({exc}); the run cannot be resumed from it") from exc
    if not isinstance(data, dict):
        raise RunFolderError(f"{path} is damaged (not a JSON object); the run cannot be resumed from it")
    return data


class RunFolder:
    """A run folder and, while held, its exclusive lock (``flock``, released when the process dies)."""

    LOCK = LOCK_FILE

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: IO[str] | None = None

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, out: str | Path, name: str) -> RunFolder:
        """Create a new, empty run folder ``out/name`` (a suffix is added if the name is taken).

        Raises:
            RunFolderError: ``out`` cannot be created or written.
        """
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
        if not os.access(out, os.W_OK | os.X_OK):
            raise RunFolderError(f"output folder {out} is not writable")
        for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
            path = out / f"{name}{suffix}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise RunFolderError(f"cannot create run folder {path}: {exc.strerror or exc}") from exc
            return cls(path)
        raise RunFolderError(f"too many runs named {name} in {out}")

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """An existing run folder (to resume or analyse).

        Raises:
            RunFolderError: Not a folder, or no ``config.json`` in it.
        """
        path = Path(path)
        if not path.is_dir():
            raise RunFolderError(f"run folder not found: {path}")
        if not (path / CONFIG_FILE).is_file():
            raise RunFolderError(f"{path} is not an rlrank run folder (no {CONFIG_FILE})")
        return cls(path)

    # ------------------------------------------------------------------ lock

    def acquire(self) -> None:
        """Take the folder's lock, or raise :class:`RunFolderError` if another process holds it."""
        handle = open(self.path / self.LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(
                    f"run folder {self.path} is in use by another search ({holder})"
                ) from None
            raise RunFolderError(f"cannot lock run folder {self.path}: {exc}") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ paths

    def stage(self, k: int) -> Path:
        path = self.path / stage_dir_name(k)
        path.mkdir(exist_ok=True)
        return path

    def remove_temp_files(self) -> list[Path]:
        """Delete the temporary files that a kill during an atomic write left behind (``.*.tmp``);
        returns them. Call only while holding the lock."""
        removed = []
        for path in self.path.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    @property
    def complete(self) -> bool:
        return (self.path / REPORT_FILE).is_file()

    def __truediv__(self, name: str) -> Path:
        return self.path / name
