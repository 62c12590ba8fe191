"""The mixed search: per unit the agent chooses channel pruning or low rank, and its ratio."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rlrank.envs.evaluation import Evaluator
from rlrank.envs.rank_search import RankSearchEnv
from rlrank.envs.spaces import action_space
from rlrank.layers import LayerInfo
from rlrank.mixed_units import LOW_RANK, PRUNE, UnitPlan, search_units, unit_family, unit_plan
from rlrank.planning import MIXED, LayerPlan, largest_ratio_within


class MixedSearchEnv(RankSearchEnv):
    """:class:`RankSearchEnv` over the units of ``--decomposition mixed`` (:mod:`rlrank.mixed_units`).

    ## Description

    One step per unit: a *pair* (a layer ``C`` whose input channels one convolution ``P`` alone
    makes, with ``P``: the inner convolutions of a residual block) or a *single* layer that only
    low rank compresses (stem, classifier, shortcut convolutions). A pair is either channel-pruned
    (``C`` keeps a fraction of its input channels, ``P`` as many outputs, He et al.'s selection and
    refit) or factorized (Tucker-2 of ``P`` and ``C`` at the same rank ratio; SVD for 1x1
    convolutions); a single layer is factorized. Everything else is :class:`RankSearchEnv`'s.

    ## Action Space

    ``Box(-1, 1, (2,), float32)``. ``action[0]`` is the ratio action, mapped as
    :class:`RankSearchEnv` maps its one action, but on the *chosen family's* fair ratio: the ratio
    at which this unit in that family costs what the uniform low-rank strategy would give it, so
    action 0 spends the same budget in both families. ``action[1]`` is the family: ``> 0`` prunes
    a pair, ``<= 0`` factorizes it (ignored for a single layer; an action of one entry factorizes).
    Random actions near 0 thus try both families equally; action 0 plays the low-rank center. The
    walls are the chosen family's; the reserve kept for later units is each unit's most expensive
    family at its lowest ratio, so every family stays affordable at every step and the FLOP budget
    holds for every episode.

    ## Observation Space

    :class:`RankSearchEnv`'s 18 features of the unit's head layer ``C``; the walls and the fair
    ratio are the low-rank family's, the MACs removed count both layers of a pair.

    ## Rewards, Starting State, Episode End

    As :class:`RankSearchEnv`. Each step's ``info`` holds its ``family``; the last step's ``plans``
    are per layer (a factorized pair: two plans; a pruned pair: ``C``'s, owning ``P``'s cost).

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
        super().__init__(layers, evaluator, decomposition=MIXED, **kwargs)
        self.action_space = action_space(2)

    def _search_steps(self) -> tuple[list[LayerInfo], set[str]]:
        self.units = search_units(self.layers, self.exclude)
        return [unit.head for unit in self.units], {u.partner.name for u in self.units if u.partner}

    def families(self, index: int) -> tuple[str, ...]:
        return self.units[index].families

    def plan_step(self, index: int, ratio: float, family: str | None = None) -> UnitPlan:  # type: ignore[override]
        ratio = float(np.clip(ratio, self._low[index], self._upper[index]))
        return unit_plan(self.units[index], ratio, family or LOW_RANK)

    def layer_plans(self, plans: Sequence[UnitPlan]) -> list[LayerPlan]:  # type: ignore[override]
        return [plan for unit in plans for plan in unit.plans]

    def strategy_of(self, layers: dict[str, dict[str, Any]]) -> list[UnitPlan]:  # type: ignore[override]
        return [
            self.plan_step(i, layers[unit.head.name]["ratio"], unit_family(unit, layers))
            for i, unit in enumerate(self.units)
        ]

    def fair_ratio(self, index: int, spent: float, spent_ms: float = 0.0, family: str | None = None) -> float:
        """The low-rank fair ratio, or, for pruning, the ratio costing what that one does."""
        fair = super().fair_ratio(index, spent, spent_ms)
        if family in (None, LOW_RANK):
            return fair
        macs = self.plan_step(index, fair, LOW_RANK).macs
        return largest_ratio_within(
            lambda r: self.plan_step(index, r, family).macs, macs, self._low[index], self._upper[index]
        )

    def _family_and_ratio_action(self, index: int, action: np.ndarray) -> tuple[str, float]:
        prune = action.size > 1 and action[1] > 0 and PRUNE in self.families(index)
        return (PRUNE if prune else LOW_RANK), float(action[0])
