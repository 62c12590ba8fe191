"""The fair ratio: the one ratio (or the center strategy's common scale) that spends exactly the
budget left; what relative actions scale. A mixin of :class:`~rlrank.envs.rank_search.RankSearchEnv`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FAIR_GRID = 512
"""Ratios at which each layer's MACs are tabulated for the fair ratio (linear in [min_ratio, 1])."""


class FairShare:
    """The fair ratio and the center strategy of the rank-search environment (its attributes:
    ``steps``, ``min_ratio``, ``budget``, ``dense_macs``, ``fixed_macs``, ``latency``, the steps'
    ratio ranges, and :meth:`plan_step`)."""

    def _tabulate_macs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ratio grid, every step's MACs on it, and those summed over the step and all later ones.

        Computed once per environment, so that :meth:`fair_ratio` costs one binary search.
        """
        grid = np.linspace(self.min_ratio, 1.0, FAIR_GRID)
        macs = np.empty((len(self.steps), FAIR_GRID), dtype=np.float64)
        for i in range(len(self.steps)):
            row = [self.plan_step(i, float(r)).macs for r in grid]
            macs[i] = np.maximum.accumulate(row)  # monotone in the ratio, for the binary search
        suffix = np.cumsum(macs[::-1], axis=0)[::-1]
        return grid, macs, suffix

    def set_center(self, ratios: Sequence[float] | None) -> None:
        """Center relative actions on a reference strategy instead of the uniform one.

        Args:
            ratios: One ratio per step (a rule's strategy, e.g. the energy rule's), or ``None``
                for the uniform strategy. Action 0 at every step then plays this strategy,
                rescaled as a whole to the budget left at each step.
        """
        if ratios is None:
            self._center = None
        else:
            center = np.asarray(ratios, dtype=np.float64)
            if center.shape != (len(self.steps),) or not np.all(center > 0):
                raise ValueError(f"the center needs one positive ratio per step ({len(self.steps)})")
            self._center = center
        self._reserved = self._reserved_macs()

    def fair_ratio(self, index: int, spent: float, spent_ms: float = 0.0, family: str | None = None) -> float:
        """The ratio of step ``index`` in the strategy that spends exactly the budget left: the
        largest single ratio for this and every later step (uniform center), or, with a center
        (:meth:`set_center`), the center's ratios scaled by the largest common factor; within the
        latency budget too when there is one."""
        allowed = self.budget * self.dense_macs - self.fixed_macs - spent
        if self._center is None:
            g = int(np.searchsorted(self._suffix_macs[index], allowed + 1e-6, side="right")) - 1
            fair = float(self._fair_grid[max(g, 0)])
            return fair if self.latency is None else min(fair, self.latency.fair(index, spent_ms))
        return float(
            np.clip(
                self._center_scale(index, spent, spent_ms) * self._center[index],
                self._low[index],
                self._upper[index],
            )
        )

    def _center_scale(self, index: int, spent: float, spent_ms: float = 0.0) -> float:
        """The largest factor scaling the center's ratios of steps ``index`` and later to fit the
        budget left (and the latency budget)."""
        assert self._center is not None
        allowed = self.budget * self.dense_macs - self.fixed_macs - spent
        center = self._center[index:]
        rows = np.arange(index, len(self.steps))

        def fits(scale: float) -> bool:
            g = np.searchsorted(self._fair_grid, np.minimum(scale * center, 1.0), side="right") - 1
            macs = float(self._grid_macs[rows, np.clip(g, 0, FAIR_GRID - 1)].sum())
            latency = self.latency is None or self.latency.fits(index, scale * center, spent_ms)
            return macs <= allowed + 1e-6 and latency

        lo, hi = 0.0, 1.0 / float(center.min())
        for _ in range(30):  # bisection on the common scale
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
