"""The job table: one SQLite file in the runs folder, so the queue survives a server restart.

A job moves ``queued -> running -> done | failed | cancelled``; ``resume`` puts a failed or cancelled
job (and, at start-up, one that was running when the server died) back to ``queued`` with
``resume=True``, so its next start continues its run folder. Every method is one short transaction
under a lock: the request threads and the scheduler share one connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    options TEXT NOT NULL,
    argv TEXT NOT NULL,
    config TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    starts INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    run_seconds REAL NOT NULL DEFAULT 0
)
"""


@dataclass
class Job:
    """One row of the job table (times are Unix seconds; ``run_seconds`` sums finished starts)."""

    id: int
    state: str
    options: dict[str, Any]
    argv: list[str]
    config: dict[str, Any]
    run_dir: str
    resume: bool = False
    cancel_requested: bool = False
    starts: int = 0
    exit_code: int | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    run_seconds: float = 0.0


class JobStore:
    """The SQLite job table at ``path`` (created if missing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, options: dict[str, Any], argv: list[str], config: dict[str, Any], runs: Path) -> Job:
        """Queue a new job; its run folder is ``runs/job-<id>``."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO jobs (state, options, argv, config, run_dir, created) VALUES (?, ?, ?, ?, '', ?)",
                (QUEUED, json.dumps(options), json.dumps(argv), json.dumps(config), time.time()),
            )
            job_id = int(cursor.lastrowid or 0)
            self._db.execute(
                "UPDATE jobs SET run_dir = ? WHERE id = ?", (str(runs / f"job-{job_id}"), job_id)
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, states: tuple[str, ...] = STATES, limit: int = 1000) -> list[Job]:
        """Jobs in the given states, oldest first."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id LIMIT ?", (*states, limit)
            ).fetchall()
        return [_job(row) for row in rows]

    def count(self, states: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(states))
        with self._lock:
            return int(
                self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states).fetchone()[0]
            )

    def update(self, job_id: int, **values: Any) -> None:
        """Set columns of one job (booleans stored as 0 / 1)."""
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [int(v) if isinstance(v, bool) else v for v in values.values()]
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*params, job_id))

    def transition(self, job_id: int, from_states: tuple[str, ...], **values: Any) -> bool:
        """Set columns only if the job is in one of ``from_states``; returns whether it was."""
        columns = ", ".join(f"{name} = ?" for name in values)
        params = [int(v) if isinstance(v, bool) else v for v in values.values()]
        marks = ",".join("?" * len(from_states))
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET {columns} WHERE id = ? AND state IN ({marks})",
                (*params, job_id, *from_states),
            )
        return cursor.rowcount == 1


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        state=row["state"],
        options=json.loads(row["options"]),
        argv=json.loads(row["argv"]),
        config=json.loads(row["config"]),
        run_dir=row["run_dir"],
        resume=bool(row["resume"]),
        cancel_requested=bool(row["cancel_requested"]),
        starts=row["starts"],
        exit_code=row["exit_code"],
        error=row["error"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        run_seconds=row["run_seconds"],
    )
