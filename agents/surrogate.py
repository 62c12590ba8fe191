"""A model-based search: a learned model of the reward of whole strategies picks each episode.

Random search draws every episode blindly; DDPG learns a per-layer policy whose exploration noise
dies within a few dozen episodes. This agent learns the map from an episode's actions (one per
layer) to its reward, a random forest over every finished episode, and plays the strategy that
looks best to it among many candidates near the best strategies found so far and a few drawn
anywhere in the search region: an upper confidence bound (the forest's mean plus ``kappa`` times
the spread of its trees) chooses, so what the model has not seen still gets tried.

The first ``warmup`` episodes are random search itself (the same draws as ``--agent random`` and
DDPG's warm-up with the same seed, so the three runs differ only after it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from rlrank.agents.base import Agent, Transition


@dataclass
class SurrogateConfig:
    """Settings of :class:`SurrogateAgent`.

    Attributes:
        warmup: Random episodes before the model chooses (episode 0 plays the center when
            ``start_at_center``).
        spread: Every action stays in ``[-spread, spread]``, random search's region.
        start_at_center: Episode 0 plays action 0 at every step.
        trees: Trees of the forest.
        min_leaf: Smallest leaf of a tree (larger: smoother model).
        candidates: Strategies scored per episode.
        elites: Best strategies so far that candidates are drawn around.
        local_std: Std of a candidate's move around an elite, as a fraction of ``spread``.
        move_fraction: Each action of an elite moves with this probability.
        global_fraction: Fraction of candidates drawn uniformly in the whole region.
        kappa: Weight of the trees' spread in the score (0: the model's mean alone).
    """

    warmup: int = 50
    spread: float = 1.0
    start_at_center: bool = True
    trees: int = 50
    min_leaf: int = 2
    candidates: int = 1000
    elites: int = 5
    local_std: float = 0.25
    move_fraction: float = 0.5
    global_fraction: float = 0.2
    kappa: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.spread <= 1:
            raise ValueError(f"spread must be in (0, 1], got {self.spread}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be at least 1, got {self.warmup}")


def propose(
    rng: np.random.Generator, actions: np.ndarray, rewards: np.ndarray, config: SurrogateConfig
) -> np.ndarray:
    """Candidate strategies (``config.candidates`` rows of one action per step): moves around the
    best ``config.elites`` strategies in ``actions`` and uniform draws, all within the spread."""
    n_steps = actions.shape[1]
    n_global = int(round(config.global_fraction * config.candidates))
    n_local = config.candidates - n_global
    elites = actions[np.argsort(-rewards, kind="stable")[: config.elites]]
    parents = elites[rng.integers(0, len(elites), size=n_local)]
    moves = rng.normal(0.0, config.local_std * config.spread, size=(n_local, n_steps))
    moves *= rng.random((n_local, n_steps)) < config.move_fraction
    local = parents + moves
    uniform = rng.uniform(-config.spread, config.spread, size=(n_global, n_steps))
    return np.clip(np.vstack([local, uniform]), -config.spread, config.spread)


def upper_bound(
    model: RandomForestRegressor, candidates: np.ndarray, kappa: float
) -> tuple[np.ndarray, np.ndarray]:
    """The forest's mean and the spread of its trees for each candidate: ``(mean, std)``; the score
    is ``mean + kappa * std``."""
    per_tree = np.stack([tree.predict(candidates) for tree in model.estimators_])
    return per_tree.mean(axis=0), per_tree.std(axis=0)


class SurrogateAgent(Agent):
    """Model-based search over whole strategies (see the module docstring).

    Args:
        n_steps: Steps (compressible layers) of an episode.
        config: Settings.
        seed: Seed of the warm-up draws, the candidates and the forest.
        dims: Entries of an action (2 with ``--decomposition mixed``: a strategy is then the
            ``n_steps * dims`` entries, step by step, that the forest models).
    """

    name = "surrogate"

    def __init__(
        self, n_steps: int, config: SurrogateConfig | None = None, seed: int = 0, dims: int = 1
    ) -> None:
        self.n_steps = n_steps
        self.dims = int(dims)
        self.config = config or SurrogateConfig()
        self.rng = np.random.default_rng(seed)
        self.episode = 0
        self.actions: list[list[float]] = []  # one row per finished episode
        self.rewards: list[float] = []
        self._plans: dict[int, list[float]] = {}  # episode -> actions played (or planned)
        self._step = 0
        self._stats: dict[int, dict[str, float]] = {}
        self._drawn_late: set[int] = set()  # episodes after warm-up played at random

    @property
    def start_at_center(self) -> bool:  # type: ignore[override]
        return self.config.start_at_center

    def phase(self, episode: int) -> str:
        if episode == 0 and self.config.start_at_center:
            return "center"
        return "warmup" if episode < self.config.warmup or episode in self._drawn_late else "model"

    def begin_episode(self, episode: int) -> None:
        self.episode = episode
        self._step = 0
        if episode >= self.config.warmup and self.rewards:
            self._plans[episode] = self._plan(episode)
        else:
            # filled step by step: random draws, the same stream as RandomAgent's (also when, with
            # several episodes in flight, none has finished yet to fit the model on)
            self._plans[episode] = []
            if episode >= self.config.warmup:
                self._drawn_late.add(episode)

    def act(self, obs: np.ndarray) -> np.ndarray:
        plan = self._plans[self.episode]
        start = self._step * self.dims
        if start < len(plan):
            action = plan[start : start + self.dims]
        else:
            if self.config.start_at_center and self.episode == 0:
                action = [0.0] * self.dims
            else:
                spread = self.config.spread
                action = [float(self.rng.uniform(-spread, spread)) for _ in range(self.dims)]
            plan.extend(action)
        self._step += 1
        return np.array(action, dtype=np.float32)

    def _plan(self, episode: int) -> list[float]:
        started = time.perf_counter()
        x = np.asarray(self.actions, dtype=np.float64)
        y = np.asarray(self.rewards, dtype=np.float64)
        model = RandomForestRegressor(
            n_estimators=self.config.trees,
            min_samples_leaf=self.config.min_leaf,
            random_state=int(self.rng.integers(2**31 - 1)),
            n_jobs=1,
        ).fit(x, y)
        candidates = propose(self.rng, x, y, self.config)
        mean, std = upper_bound(model, candidates, self.config.kappa)
        best = int(np.argmax(mean + self.config.kappa * std))
        self._stats[episode] = {
            "predicted_reward": float(mean[best]),
            "predicted_std": float(std[best]),
            "plan_seconds": time.perf_counter() - started,
        }
        return [float(a) for a in candidates[best]]

    def end_episode(self, transitions: Sequence[Transition], reward: float, episode: int) -> dict[str, float]:
        plan = self._plans.pop(episode, None)
        if plan is None or len(plan) != self.n_steps * self.dims:
            plan = [float(a) for tr in transitions for a in np.asarray(tr.action).reshape(-1)[: self.dims]]
        self.actions.append(plan)
        self.rewards.append(float(reward))
        return self._stats.pop(episode, {})

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "actions": self.actions, "rewards": self.rewards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.actions = [list(map(float, row)) for row in state["actions"]]
        self.rewards = [float(r) for r in state["rewards"]]
