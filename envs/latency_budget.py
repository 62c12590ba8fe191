"""A latency budget for the rank-search environment, priced from a measured latency table.

Beside its FLOP budget, an episode may have to keep the model's predicted latency (the fixed rest
plus every layer's latency at its chosen ratio, :mod:`rlrank.latency_table`) within a fraction of the
dense model's measured latency. The environment enforces it as it enforces the FLOP budget: an upper
wall (the largest ratio that keeps the budget reachable with every later layer at its fastest), a
lower wall (the smallest ratio that still lets the episode spend the budget) and a fair ratio (the
one ratio that, given to this layer and every later one, spends exactly the budget left). A layer
whose factorized form is no faster than the dense one stays dense from that ratio up, so the agent
can choose to keep it dense (unless the FLOP budget needs it factorized: then it is priced at its
factorized latency, slower or not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rlrank.errors import UserError
from rlrank.layers import LayerInfo
from rlrank.planning import LayerPlan, plan_layer, rank_ratio, smallest_ratio_reaching

if TYPE_CHECKING:
    from rlrank.latency_table import LatencyTable, LayerLatency

GRID = 512
"""Ratios at which each layer's latency is tabulated for the fair ratio (linear in [min_ratio, 1])."""


class LatencyBudgetError(UserError):
    """The latency budget cannot be met even with every layer at its fastest ratio."""

    def __init__(self, budget: float, smallest: float) -> None:
        super().__init__(
            f"--latency {budget:g} cannot be reached: with every searched layer at its fastest rank the "
            f"model keeps {smallest:.4f} of the dense latency (measured); the smallest reachable "
            f"latency budget is {smallest:.4f}"
        )
        self.budget = budget
        self.smallest = smallest


class LatencyBudget:
    """Latency accounting of one environment's steps.

    Args:
        table: The measured latency table of the model (every step's layer in it).
        steps: The environment's steps (searched layers), in order.
        budget: Fraction of the dense model's measured latency an episode may keep.
        low: Per step, the smallest ratio.
        upper: Per step, the largest ratio.
        plan: ``plan(index, ratio)``: the environment's plan of a step at a ratio.
    """

    def __init__(
        self,
        table: LatencyTable,
        steps: Sequence[LayerInfo],
        budget: float,
        low: Sequence[float],
        upper: Sequence[float],
        plan: Callable[[int, float], LayerPlan],
    ) -> None:
        self.table = table
        self.steps = list(steps)
        self.layers = [table.layers[step.name] for step in steps]
        self.budget = float(budget)
        self.allowed_ms = self.budget * table.model_ms - table.fixed_ms
        self._low, self._upper, self._plan = list(low), list(upper), plan
        self._min_ms = [self.cost_at(i, r) for i, r in enumerate(self._low)]
        self._max_ms = [self.cost_at(i, r) for i, r in enumerate(self._upper)]
        self.smallest = (table.fixed_ms + sum(self._min_ms)) / table.model_ms
        if self.budget < self.smallest - 1e-9:
            raise LatencyBudgetError(self.budget, self.smallest)
        self.grid = np.linspace(min(self._low), 1.0, GRID)
        rows = [
            [self.cost_at(i, float(np.clip(r, lo, hi))) for r in self.grid]
            for i, (lo, hi) in enumerate(zip(self._low, self._upper, strict=True))
        ]
        self.grid_ms = np.maximum.accumulate(np.asarray(rows, dtype=np.float64), axis=1)
        self.suffix_ms = np.cumsum(self.grid_ms[::-1], axis=0)[::-1]

    def cost(self, index: int, plan: LayerPlan) -> float:
        """Milliseconds of step ``index`` under ``plan``."""
        return plan_ms(self.layers[index], self.steps[index], plan)

    def cost_at(self, index: int, ratio: float) -> float:
        """Milliseconds of step ``index`` at ``ratio`` (as the environment would plan it)."""
        return self.cost(index, self._plan(index, ratio))

    def ratio_of(self, plans: Sequence[LayerPlan]) -> float:
        """Predicted latency of a full strategy, as a fraction of the dense model's."""
        return (self.table.fixed_ms + self.spent(plans)) / self.table.model_ms

    def spent(self, plans: Sequence[LayerPlan]) -> float:
        """Milliseconds of the steps planned so far."""
        return sum(self.cost(i, plan) for i, plan in enumerate(plans))

    def wall(self, index: int, spent_ms: float) -> float:
        """Largest ratio of step ``index`` that keeps the budget reachable with every later step at
        its fastest."""
        allowed = self.allowed_ms - spent_ms - sum(self._min_ms[index + 1 :])
        return self._bisect(index, lambda ms: ms <= allowed + 1e-9, largest=True)

    def floor(self, index: int, spent_ms: float) -> float:
        """Smallest ratio of step ``index`` that still lets the episode spend its budget with every
        later step at its largest ratio."""
        needed = self.allowed_ms - spent_ms - sum(self._max_ms[index + 1 :])
        return self._bisect(index, lambda ms: ms >= needed - 1e-9, largest=False)

    def fair(self, index: int, spent_ms: float) -> float:
        """The largest single ratio for this step and every later one that fits the budget left."""
        allowed = self.allowed_ms - spent_ms
        g = int(np.searchsorted(self.suffix_ms[index], allowed + 1e-9, side="right")) - 1
        return float(self.grid[max(g, 0)])

    def fits(self, index: int, ratios: np.ndarray, spent_ms: float) -> bool:
        """Whether ``ratios`` for step ``index`` onwards fit the budget left (on the grid)."""
        rows = np.arange(index, index + len(ratios))
        g = np.clip(np.searchsorted(self.grid, np.minimum(ratios, 1.0), side="right") - 1, 0, GRID - 1)
        return float(self.grid_ms[rows, g].sum()) <= self.allowed_ms - spent_ms + 1e-9

    def _bisect(self, index: int, accept: Callable[[float], bool], largest: bool) -> float:
        lo, hi = self._low[index], self._upper[index]
        if largest:
            if accept(self.cost_at(index, hi)):
                return hi
            if not accept(self.cost_at(index, lo)):
                return lo
        else:
            if accept(self.cost_at(index, lo)):
                return lo
            if not accept(self.cost_at(index, hi)):
                return hi
        for _ in range(30):  # latency is non-decreasing in the ratio: bisect
            mid = 0.5 * (lo + hi)
            if accept(self.cost_at(index, mid)) == largest:
                lo = mid
            else:
                hi = mid
        return lo if largest else hi


def built_ratio(layer: LayerInfo, plan: LayerPlan) -> float:
    """The ratio a factorized plan is built at: its largest rank over full rank (ranks are rounded,
    so it differs a little from the ratio played), as :func:`rlrank.latency_table.predicted_latency_ratio`
    reads it off the built model."""
    assert plan.method is not None and plan.ranks is not None
    return rank_ratio(layer, plan.method, plan.ranks)


def plan_ms(latency: LayerLatency, layer: LayerInfo, plan: LayerPlan) -> float:
    """Milliseconds of ``layer`` under ``plan``, from its latency-table entry: dense, or factorized
    at the ratio it is built at."""
    return latency.dense_ms if plan.dense else latency.factorized(built_ratio(layer, plan))


def played_dense_from(
    layer: LayerInfo, latency: LayerLatency, low: float, decomposition: str
) -> float | None:
    """The smallest ratio played from which ``layer``'s factorized form, priced at the ratio its
    rounded ranks are built at (:func:`built_ratio`), is no faster than the layer as it is; ``None``
    when it is faster at every ratio. (Read off the table's curve in played ratios instead, rounding
    would let a low ratio be priced above dense.)"""

    def built_ms(ratio: float) -> float:
        plan = plan_layer(layer, ratio, decomposition, allow_dense=False)
        return latency.factorized(built_ratio(layer, plan))

    if built_ms(low) < latency.dense_ms and built_ms(1.0) < latency.dense_ms:
        return None
    # built ratio and latency are non-decreasing in the ratio played
    return smallest_ratio_reaching(built_ms, latency.dense_ms, low, 1.0)


def fallback_ratios(
    table: LatencyTable,
    steps: Sequence[LayerInfo],
    lows: Sequence[float],
    decomposition: str,
    max_macs: float,
) -> list[float | None]:
    """Per step, the ratio from which the layer stays dense because its factorized form is no faster
    (``None``: never); dropped, for the layers whose staying dense costs the most MACs first, until
    the steps at their lowest ratios fit ``max_macs`` (the FLOP budget left for them)."""
    dense_from = [
        played_dense_from(step, table.layers[step.name], low, decomposition)
        for step, low in zip(steps, lows, strict=True)
    ]
    lowest = [plan_layer(step, low, decomposition).macs for step, low in zip(steps, lows, strict=True)]
    dense = [plan_layer(step, 1.0, decomposition).macs for step in steps]  # pruning: with its producer
    order = sorted(range(len(steps)), key=lambda i: lowest[i] - dense[i])
    for i in [None, *order]:
        if i is not None:
            dense_from[i] = None
        smallest = sum(
            plan_layer(step, low, decomposition, True, ratio).macs
            for step, low, ratio in zip(steps, lows, dense_from, strict=True)
        )
        if smallest <= max_macs:
            break
    return dense_from
