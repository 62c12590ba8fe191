"""The interface every rank-choosing agent implements, and the simple ones.

An agent sees observations and returns actions in [-1, 1]; it never touches the network being
compressed. The search loop calls, per episode::

    agent.begin_episode(episode)
    action = agent.act(obs)            # once per layer
    stats = agent.end_episode(transitions, reward, episode)
    row.phase = agent.phase(episode)

With several episodes in flight (``--workers``) later episodes begin before earlier ones end:
``begin_episode`` / ``act`` of episode ``e + 1`` may come before ``end_episode`` of episode ``e``,
so ``end_episode`` is told which episode it ends; ``end_episode`` calls still come in episode
order.

and, around the episodes, :meth:`Agent.save` / :meth:`Agent.restore` (a learned policy and what a
resume needs beyond :meth:`Agent.state_dict`) and :meth:`Agent.greedy` (the deterministic roll-out of
a learned policy). The defaults fit an agent that learns nothing, so the loop never asks which kind
of agent it drives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Transition:
    """One step of an episode as the agent saw it."""

    obs: np.ndarray
    action: np.ndarray
    next_obs: np.ndarray
    done: bool


class Agent(ABC):
    """Base class of rank-choosing agents.

    Attributes:
        name: The ``--agent`` name.
        episodes_needed: Episodes the agent needs (``None``: as many as the search gives it; 1 for a
            fixed strategy, which gains nothing from re-evaluating itself).
        start_at_center: Whether episode 0 plays action 0 at every step (the center strategy).
    """

    name: str = ""
    episodes_needed: int | None = None
    start_at_center: bool = False

    def begin_episode(self, episode: int) -> None:  # noqa: B027 - optional hook
        """Called before the first ``act`` of every episode."""

    @abstractmethod
    def act(self, obs: np.ndarray) -> np.ndarray:
        """The action (the env's action shape, ``(1,)`` but with ``--decomposition mixed``, in
        [-1, 1]) for the current step; an action of one entry is the ratio action alone."""

    def end_episode(self, transitions: Sequence[Transition], reward: float, episode: int) -> dict[str, float]:
        """Learn from finished episode ``episode``; returns statistics worth logging (may be empty)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state needed to resume (RNG states, counters)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""

    def phase(self, episode: int) -> str:
        """What ``episode`` is for this agent, for the episode log (``center``, ``random``, ...)."""
        return "search"

    def greedy(self) -> Agent | None:
        """A player of the agent's learned deterministic policy (no exploration, no learning), or
        ``None`` when the agent has no policy to roll out."""
        return None

    def save(self, directory: str | Path, metadata: dict[str, Any]) -> bool:
        """Write what the agent learned (networks, replay buffer) into ``directory``.

        Returns:
            Whether anything was written (agents that learn nothing write nothing).
        """
        return False

    def restore(self, directory: str | Path) -> None:  # noqa: B027 - optional hook
        """Load what :meth:`save` wrote into this agent (resuming a search)."""


class RandomAgent(Agent):
    """Random search: every action uniform in ``[-spread, spread]`` (the env's action wall keeps the
    budget).

    Args:
        seed: Seed of the actions.
        spread: Half-width of the action range, in (0, 1].
        start_at_center: Play action 0 at every step of episode 0 (with relative actions: the
            center strategy), so the search never ends below it.
        dims: Entries of an action (the env's action space: 2 with ``--decomposition mixed``).
    """

    name = "random"

    def __init__(
        self, seed: int = 0, spread: float = 1.0, start_at_center: bool = False, dims: int = 1
    ) -> None:
        if not 0 < spread <= 1:
            raise ValueError(f"spread must be in (0, 1], got {spread}")
        self.rng = np.random.default_rng(seed)
        self.spread = spread
        self.start_at_center = start_at_center
        self.dims = int(dims)
        self.episode = 0

    def begin_episode(self, episode: int) -> None:
        self.episode = episode

    def phase(self, episode: int) -> str:
        return "center" if episode == 0 and self.start_at_center else "random"

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.start_at_center and self.episode == 0:
            return np.zeros(self.dims, dtype=np.float32)
        return self.rng.uniform(-self.spread, self.spread, size=(self.dims,)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class FixedStrategyAgent(Agent):
    """Plays one precomputed action per layer: the rule-based selectors (uniform, energy, VBMF).

    Args:
        name: The selector's name.
        actions: One action in [-1, 1] per layer, in step order.
        knob: The selector's own parameter that hit the budget (for the log).
    """

    episodes_needed = 1

    def __init__(self, name: str, actions: Sequence[float], knob: float | None = None) -> None:
        self.name = name
        self.actions = [float(a) for a in actions]
        self.knob = knob
        self._step = 0

    def begin_episode(self, episode: int) -> None:
        self._step = 0

    def phase(self, episode: int) -> str:
        return "rule"

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.actions[min(self._step, len(self.actions) - 1)]
        self._step += 1
        return np.array([action], dtype=np.float32)
