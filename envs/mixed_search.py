"""The mixed search: per residual block the agent chooses channel pruning or low rank."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from rlrank.envs.evaluation import Evaluator
from rlrank.envs.rank_search import RankSearchEnv
from rlrank.envs.spaces import action_space
from rlrank.layers import LayerInfo
from rlrank.mixed_units import (
    LOW_RANK,
    PRUNE,
    PRUNED_WITH_PRODUCER,
    StepPlan,
    logged_families,
    prunable_pairs,
    step_plan,
)
from rlrank.planning import MIXED, LayerPlan, largest_ratio_within


class MixedSearchEnv(RankSearchEnv):
    """:class:`RankSearchEnv` for ``--decomposition mixed`` (:mod:`rlrank.mixed_units`).

    ## Description

    The steps are those of the low-rank search (Tucker-2; SVD for 1x1 convolutions and linear
    layers): one per layer, each factorized at its own ratio. At the step of a *producer* ``P`` (a
    convolution whose outputs only the next convolution ``C`` of its residual block reads) the agent
    may instead prune the pair: ``C`` keeps a fraction of its input channels and ``P`` as many
    outputs (He et al.'s selection and least-squares refit); ``C``'s step then has nothing to choose
    (its action is ignored, its plan empty). A strategy that never prunes is exactly one of the
    low-rank search, its center strategy included (action 0 plays it).

    ## Action Space

    ``Box(-1, 1, (2,), float32)``. ``action[0]`` is the ratio action, mapped as
    :class:`RankSearchEnv` maps its one action, on the *chosen family's* fair ratio: for pruning,
    the keep ratio at which the pair costs what the fair (or center) low-rank ratios of ``P`` and
    ``C`` cost, so action 0 spends the same budget in both families. ``action[1]`` is the family at
    a producer's step: ``> 0`` prunes the pair, ``<= 0`` factorizes ``P`` (ignored at other steps;
    an action of one entry factorizes). Random actions near 0 thus try both families equally. The
    walls are the chosen family's; the reserve kept for later steps is each step's most expensive
    family at its lowest ratio, so every family stays affordable and the FLOP budget holds for
    every episode.

    ## Observation Space, Rewards, Starting State, Episode End

    As :class:`RankSearchEnv` (the walls and fair ratio observed are the low-rank family's; a pruned
    head observes its step with nothing to spend). Each step's ``info`` holds its ``family``; the
    last step's ``plans`` are per layer (a pruned pair: ``C``'s plan, owning ``P``'s cost).

    ## Arguments

    Those of :class:`RankSearchEnv` but ``decomposition`` (always ``mixed``); refused for now:
    a latency budget, ``sparse`` and ``allow_dense=False`` (multi-stage).
    """

    def __init__(self, layers: Sequence[LayerInfo], evaluator: Evaluator | None, **kwargs: Any) -> None:
        refused = {
            "a latency budget": kwargs.get("latency_budget") is not None,
            "sparse": kwargs.get("sparse", 0.0) > 0,
            "allow_dense=False": not kwargs.get("allow_dense", True),
        }
        if any(refused.values()):
            raise ValueError(
                f"the mixed search does not work with {', '.join(k for k, v in refused.items() if v)}"
            )
        kwargs.pop("decomposition", None)
        self._plans: list[StepPlan] = []
        super().__init__(layers, evaluator, decomposition=MIXED, **kwargs)
        self.action_space = action_space(2)

    def _search_steps(self) -> tuple[list[LayerInfo], set[str]]:
        steps, owned = super()._search_steps()
        self.pairs = prunable_pairs(self.layers, self.exclude)  # producer name -> head
        index = {layer.name: i for i, layer in enumerate(steps)}
        self._head_index = {index[p]: index[head.name] for p, head in self.pairs.items()}
        self._producer_of = {c: p for p, c in self._head_index.items()}
        return steps, owned

    def families(self, index: int) -> tuple[str, ...]:
        return (LOW_RANK, PRUNE) if index in self._head_index else (LOW_RANK,)

    def plan_step(self, index: int, ratio: float, family: str | None = None) -> StepPlan:  # type: ignore[override]
        ratio = float(np.clip(ratio, self._low[index], self._upper[index]))
        producer = self._producer_of.get(index)
        if producer is not None and producer < len(self._plans) and self._plans[producer].family == PRUNE:
            family = PRUNED_WITH_PRODUCER
        layer = self.steps[index]
        return step_plan(layer, ratio, family or LOW_RANK, self.pairs.get(layer.name))

    @contextmanager
    def _outside_the_episode(self) -> Iterator[list[StepPlan]]:
        """Plan steps as in a fresh episode (no pair pruned yet; the list yielded is the episode's
        plans meanwhile), leaving the episode being played as it is."""
        played, self._plans = self._plans, []
        try:
            yield self._plans
        finally:
            self._plans = played

    def plan(self, ratios: Sequence[float]) -> list[StepPlan]:  # type: ignore[override]
        """Low-rank plans for one ratio per step, whatever the episode being played."""
        with self._outside_the_episode():
            return [self.plan_step(i, r) for i, r in enumerate(ratios)]

    def layer_plans(self, plans: Sequence[StepPlan]) -> list[LayerPlan]:  # type: ignore[override]
        return [plan for step in plans for plan in step.plans]

    def strategy_of(self, layers: dict[str, dict[str, Any]]) -> list[StepPlan]:  # type: ignore[override]
        with self._outside_the_episode() as plans:
            for i, (family, ratio) in enumerate(logged_families(self.steps, self.pairs, layers)):
                plans.append(self.plan_step(i, ratio, family))
            return plans

    def fair_ratio(self, index: int, spent: float, spent_ms: float = 0.0, family: str | None = None) -> float:
        """The low-rank fair ratio, or, for pruning, the keep ratio costing what the low-rank fair
        ratios of the pair's two layers cost."""
        fair = super().fair_ratio(index, spent, spent_ms)
        if family != PRUNE:
            return fair
        head = self._head_index[index]
        head_fair = fair if self._center is None else fair / self._center[index] * self._center[head]
        low_rank = self.plan_step(index, fair, LOW_RANK).macs + self.plan_step(head, head_fair, LOW_RANK).macs
        return largest_ratio_within(
            lambda r: self.plan_step(index, r, PRUNE).macs, low_rank, self._low[index], self._upper[index]
        )

    def _family_and_ratio_action(self, index: int, action: np.ndarray) -> tuple[str, float]:
        prune = action.size > 1 and action[1] > 0 and PRUNE in self.families(index)
        return (PRUNE if prune else LOW_RANK), float(action[0])
