"""Resume checkpoints of a stage's search: ``checkpoint-<n>/`` folders and the pointer to the latest.

After every ``--checkpoint-every`` episodes a complete checkpoint is written into a fresh
``checkpoint-<n>/`` folder (the agent's learned state via :meth:`Agent.save`, the global random
generators, the search counters and the best episode so far), then ``checkpoint.json`` is pointed
at it atomically and older folders are removed. A search killed at any moment resumes from the
latest complete one, with the same random streams as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlrank.agents.base import Agent
from rlrank.atomic import save_torch, write_json
from rlrank.envs import OBSERVATION_FEATURES
from rlrank.records import EpisodeRow
from rlrank.run_folder import CHECKPOINT_POINTER_FILE, RunFolderError, read_json
from rlrank.safe_load import read_tensors

AGENT_DIR = "agent"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"


@dataclass
class SearchProgress:
    """The counters of a stage's search that a checkpoint keeps.

    Attributes:
        episodes_done: Episodes completed (and logged).
        best: The best episode at the stage's budget so far.
        failures: Failed episodes.
        seconds: Wall time spent in episodes.
        last_row: The row of the last episode done, kept so that a log whose last row was torn
            after the checkpoint counted it can be repaired on resume.
    """

    episodes_done: int = 0
    best: EpisodeRow | None = None
    failures: int = 0
    seconds: float = 0.0
    last_row: EpisodeRow | None = None


def save_checkpoint(stage_dir: Path, agent: Agent, progress: SearchProgress) -> Path:
    """Write a complete checkpoint of the search in ``stage_dir`` and point ``checkpoint.json`` at it."""
    target = stage_dir / f"checkpoint-{progress.episodes_done}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    agent.save(target / AGENT_DIR, {"checkpoint": True, "observation_features": list(OBSERVATION_FEATURES)})
    save_torch(target / RNG_FILE, {"torch": torch.get_rng_state()})
    write_json(
        target / STATE_FILE,
        {
            "episodes_done": progress.episodes_done,
            "best": progress.best.to_dict() if progress.best is not None else None,
            "last_row": progress.last_row.to_dict() if progress.last_row is not None else None,
            "failures": progress.failures,
            "seconds": progress.seconds,
            "agent": agent.state_dict(),
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
        },
    )
    write_json(
        stage_dir / CHECKPOINT_POINTER_FILE,
        {"latest": target.name, "episodes_done": progress.episodes_done},
    )
    for old in stage_dir.glob("checkpoint-*"):
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def restore_checkpoint(stage_dir: Path, agent: Agent) -> SearchProgress:
    """Restore the agent and the random generators from the latest checkpoint of ``stage_dir``.

    Returns:
        The search's counters (all zero when the stage has no checkpoint yet).
    """
    pointer = stage_dir / CHECKPOINT_POINTER_FILE
    if not pointer.is_file():
        return SearchProgress()
    latest = read_json(pointer).get("latest")
    target = stage_dir / str(latest)
    if not isinstance(latest, str) or not (target / STATE_FILE).is_file():
        raise RunFolderError(
            f"{pointer} names checkpoint {latest!r}, which is missing: the run folder was damaged "
            f"outside rlrank; delete {pointer} to search stage {stage_dir.name} again from its start"
        )
    state = read_json(target / STATE_FILE)
    try:
        if (target / AGENT_DIR).is_dir():
            agent.restore(target / AGENT_DIR)
        agent.load_state_dict(state["agent"])
        torch.set_rng_state(read_tensors(target / RNG_FILE, "random state", RunFolderError)["torch"])
        random.setstate(_tuples(state["python_rng"]))
        np.random.set_state(
            tuple(state["numpy_rng"][:1])
            + (np.array(state["numpy_rng"][1], dtype=np.uint32),)
            + tuple(state["numpy_rng"][2:])
        )
        best, last = state.get("best"), state.get("last_row")
        return SearchProgress(
            episodes_done=int(state["episodes_done"]),
            best=EpisodeRow.from_dict(best) if best is not None else None,
            failures=int(state.get("failures", 0)),
            seconds=float(state.get("seconds", 0.0)),
            last_row=EpisodeRow.from_dict(last) if last is not None else None,
        )
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        if isinstance(exc, RunFolderError):
            raise
        raise RunFolderError(
            f"checkpoint {target} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"delete {pointer} to search stage {stage_dir.name} again from its start"
        ) from exc


@contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the body, then put Python's, NumPy's and torch's global random generators back as they were
    (for work that seeds them as a side effect, such as building a stable-baselines3 model)."""
    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)


def _python_rng_state() -> list:
    return json.loads(json.dumps(random.getstate()))


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
