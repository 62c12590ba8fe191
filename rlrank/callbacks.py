"""Hooks of the episode loop: logging, best tracking, progress, checkpoints, the failure limit.

The loop (:func:`rlrank.search_loop.run_episodes`) only plays episodes; everything done *around* an
episode is a :class:`SearchCallback`, as in stable-baselines3 (``BaseCallback``,
``CheckpointCallback``). They run in the order given, after every episode, so a checkpoint always
follows the log row and the best episode it records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlrank.agents.base import Agent
from rlrank.checkpoint import SearchProgress, save_checkpoint
from rlrank.errors import SearchError
from rlrank.records import EpisodeRow
from rlrank.runlog import append_row

MAX_FAILURES_WITHOUT_SUCCESS = 10
"""A search stops when this many episodes (or all of them, if fewer) failed and none succeeded."""


class SearchCallback:
    """Base class: override the hooks you need."""

    def on_search_start(self, progress: SearchProgress) -> None:
        """Before the first episode the loop plays (after a resume: the first one left)."""

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        """After every episode; ``progress`` already counts it."""

    def on_search_end(self, progress: SearchProgress) -> None:
        """After the last episode, or when the loop stops on an error."""


class CallbackList(SearchCallback):
    """Several callbacks, called in order."""

    def __init__(self, callbacks: Sequence[SearchCallback]) -> None:
        self.callbacks = list(callbacks)

    def on_search_start(self, progress: SearchProgress) -> None:
        for callback in self.callbacks:
            callback.on_search_start(progress)

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        for callback in self.callbacks:
            callback.on_episode_end(row, progress)

    def on_search_end(self, progress: SearchProgress) -> None:
        for callback in self.callbacks:
            callback.on_search_end(progress)


class EpisodeLog(SearchCallback):
    """Appends every episode's row to the stage's ``episodes.jsonl`` (flushed and fsynced)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        append_row(self.path, row.to_dict())


class BestTracker(SearchCallback):
    """Keeps ``progress.best``: the successful episode with the highest reward at the stage's budget
    (episodes of other budgets, when one policy trains over several, never count)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        counts = abs(row.budget - self.budget) < 1e-9 and not row.failed
        if counts and (progress.best is None or row.reward > progress.best.reward):
            progress.best = row


class ProgressBar(SearchCallback):
    """A tqdm bar over the stage's episodes with the best reward and accuracy so far."""

    def __init__(self, stage: int, total: int, enabled: bool = True) -> None:
        self.stage, self.total, self.enabled = stage, total, enabled
        self.bar = None

    def on_search_start(self, progress: SearchProgress) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.total,
            initial=progress.episodes_done,
            desc=f"stage {self.stage} episodes",
            unit="ep",
            disable=not self.enabled,
        )

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        self.bar.update(1)
        if progress.best is not None:
            self.bar.set_postfix(
                best_reward=f"{progress.best.reward:.4f}", best_acc=f"{progress.best.accuracy:.4f}"
            )

    def on_search_end(self, progress: SearchProgress) -> None:
        if self.bar is not None:
            self.bar.close()


class Checkpointer(SearchCallback):
    """Writes a resume checkpoint every ``every`` episodes and after the last one."""

    def __init__(self, stage_dir: Path, agent: Agent, every: int, total: int) -> None:
        self.stage_dir, self.agent, self.every, self.total = stage_dir, agent, every, total

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        done = progress.episodes_done
        if done % self.every == 0 or done == self.total:
            save_checkpoint(self.stage_dir, self.agent, progress)


class FailureLimit(SearchCallback):
    """Stops the search with :class:`SearchError` when episodes keep failing and none succeeded.

    Args:
        stage: The stage (for the message).
        total: Episodes of the stage (the limit is at most this).
        successes: Successful episodes already logged (when resuming).
    """

    def __init__(self, stage: int, total: int, successes: int = 0) -> None:
        self.stage, self.total, self.successes = stage, total, successes

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        if not row.failed:
            self.successes += 1
        if self.successes == 0 and progress.failures >= min(MAX_FAILURES_WITHOUT_SUCCESS, self.total):
            raise SearchError(
                f"every episode of stage {self.stage} failed ({progress.failures} so far); "
                f"last reason: {row.failed}"
            )
