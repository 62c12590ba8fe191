"""Rule-based rank selectors: each turns one knob until the strategy meets the FLOP budget.

* **uniform**: the same rank ratio for every layer.
* **energy**: per layer, the smallest rank keeping a fraction ``e`` of the squared singular values
  of each unfolding.
* **VBMF**: per layer, the rank that empirical variational Bayesian matrix factorization
  (Nakajima et al., 2013) finds in each unfolding, weakened towards full rank by a factor ``w``
  as in MUSCO (``rank = full - w * (full - vbmf)``; ``w = 1`` is plain VBMF, ``w > 1`` goes below).
* **ALDS** (after Liebenwein et al., NeurIPS 2021): the ranks that minimise the largest per-layer
  relative approximation error in operator norm, ``sigma_{r+1} / sigma_1`` of each unfolding, under
  the budget: one error level ``eps`` for every layer, the smallest that meets it. (ALDS also splits
  a layer's channels into several subspaces, each factorized on its own; rlrank's methods do not,
  so this is the rank allocation of ALDS on rlrank's factorizations.) Where ``energy`` bounds the
  Frobenius error (every discarded singular value counts), ALDS bounds the worst direction only.

The selectors only see numbers: the singular values of each layer's unfoldings and a cost function
(ratios -> kept FLOP fraction) given by the caller, so they never touch a network.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from rlrank.errors import UserError

CostFn = Callable[[np.ndarray], float]
"""Maps one rank ratio per layer to the fraction of the dense model's FLOPs kept."""

SELECTORS = ("uniform", "energy", "vbmf", "alds")

logger = logging.getLogger(__name__)


class SelectorError(UserError):
    """No setting of the selector's knob meets the budget."""


def _largest_within(
    make: Callable[[float], np.ndarray], cost: CostFn, budget: float, lo: float, hi: float
) -> float:
    """Largest knob in ``[lo, hi]`` whose strategy costs at most ``budget`` (cost non-decreasing in knob)."""
    if cost(make(hi)) <= budget:
        return hi
    if cost(make(lo)) > budget:
        raise SelectorError(
            f"even the smallest setting keeps {cost(make(lo)):.4f} of the FLOPs > budget {budget:g}"
        )
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if cost(make(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def uniform_ratios(n_layers: int, cost: CostFn, budget: float, min_ratio: float) -> tuple[np.ndarray, float]:
    """One ratio for all layers, the largest within budget. Returns ``(ratios, ratio)``."""

    def make(r: float) -> np.ndarray:
        return np.full(n_layers, r)

    r = _largest_within(make, cost, budget, min_ratio, 1.0)
    return make(r), r


Spectra = Sequence[Sequence[tuple[np.ndarray, tuple[int, int]]]]
"""Per layer, per unfolding: ``(singular values descending, (rows, cols))``."""


def energy_rank(values: np.ndarray, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the total squared sum."""
    squared = np.asarray(values, dtype=np.float64) ** 2
    total = squared.sum()
    if total <= 0:
        return 1
    cumulative = np.cumsum(squared) / total
    return int(min(len(values), np.searchsorted(cumulative, energy - 1e-12) + 1))


def _ratio_from_ranks(spectra: Sequence[tuple[np.ndarray, tuple[int, int]]], ranks: Sequence[float]) -> float:
    return max(r / len(values) for (values, _), r in zip(spectra, ranks, strict=True))


def _per_unfolding_ratios(spectra: Spectra, rank: Callable[[np.ndarray], int]) -> np.ndarray:
    """Per layer, the ratio that keeps ``rank(singular values)`` in every unfolding."""
    return np.array([_ratio_from_ranks(layer, [rank(values) for values, _ in layer]) for layer in spectra])


def energy_ratios(spectra: Spectra, cost: CostFn, budget: float) -> tuple[np.ndarray, float]:
    """Per-layer ratios keeping energy ``e`` in every unfolding, ``e`` the largest within budget."""

    def make(e: float) -> np.ndarray:
        return _per_unfolding_ratios(spectra, lambda values: energy_rank(values, e))

    e = _largest_within(make, cost, budget, 0.0, 1.0)
    return make(e), e


def spectral_rank(values: np.ndarray, error: float) -> int:
    """Smallest rank whose relative error in operator norm, ``sigma_{r+1} / sigma_1``, is at most
    ``error`` (at least 1)."""
    s = np.asarray(values, dtype=np.float64)
    if len(s) == 0 or s[0] <= 0:
        return 1
    return max(1, int(np.sum(s / s[0] > error)))


def alds_ratios(spectra: Spectra, cost: CostFn, budget: float) -> tuple[np.ndarray, float]:
    """Per-layer ratios with relative operator-norm error at most ``eps`` in every unfolding, ``eps``
    the smallest within budget (the min-max error allocation of ALDS). Returns ``(ratios, eps)``."""

    def make(keep: float) -> np.ndarray:  # cost is non-decreasing in keep = 1 - eps, as the bisection wants
        return _per_unfolding_ratios(spectra, lambda values: spectral_rank(values, 1.0 - keep))

    keep = _largest_within(make, cost, budget, 0.0, 1.0)
    return make(keep), 1.0 - keep


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(
    sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float, xubar: float
) -> float:
    h = len(s)
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (cols * sigma2) + (rows - h) * np.log(sigma2))


def vbmf_rank(values: np.ndarray, shape: tuple[int, int]) -> int:
    """Rank that empirical VBMF (noise variance estimated) keeps, from a matrix's singular values.

    Follows the analytic global solution of Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013),
    as used for CNN ranks by Kim et al. (2016) and MUSCO (Gusak et al., 2019). At least 1.
    """
    rows, cols = sorted(shape)
    s = np.sort(np.asarray(values, dtype=np.float64))[::-1][:rows]
    s = np.maximum(s, 1e-300)
    if len(s) < 2:
        return 1
    alpha = rows / cols
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0  # the full spectrum is given
    eh_ub = int(min(math.ceil(rows / (1 + alpha)) - 1, len(s))) - 1
    eh_ub = max(0, min(eh_ub, len(s) - 2))
    upper = (np.sum(s**2) + residual) / (rows * cols)
    lower = max(s[eh_ub + 1] ** 2 / (cols * xubar), np.mean(s[eh_ub + 1 :] ** 2) / cols)
    if not lower < upper:
        return 1
    sigma2 = minimize_scalar(
        _evb_objective, args=(rows, cols, s, residual, xubar), bounds=(lower, upper), method="bounded"
    ).x
    threshold = math.sqrt(cols * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


def vbmf_ratios(spectra: Spectra, cost: CostFn, budget: float) -> tuple[np.ndarray, float]:
    """Weakened-VBMF ratios; ``w`` the smallest weakening (closest to full rank) within budget."""
    vbmf = [[vbmf_rank(v, shape) for v, shape in layer] for layer in spectra]
    full = [[len(v) for v, _ in layer] for layer in spectra]
    # w beyond 1 moves below the VBMF rank; at w_max every rank is 1
    w_max = max(
        f / max(f - r, 1)
        for layer_f, layer_r in zip(full, vbmf, strict=True)
        for f, r in zip(layer_f, layer_r, strict=True)
    )

    def make(w_complement: float) -> np.ndarray:
        w = w_max - w_complement  # non-decreasing cost in the complement, as the bisection wants
        return np.array(
            [
                _ratio_from_ranks(layer, [max(1.0, f - w * (f - r)) for f, r in zip(lf, lr, strict=True)])
                for layer, lf, lr in zip(spectra, full, vbmf, strict=True)
            ]
        )

    complement = _largest_within(make, cost, budget, 0.0, w_max)
    return make(complement), w_max - complement


def rule_ratios(
    rule: str, n_layers: int, cost: CostFn, budget: float, min_ratio: float, spectra: Callable[[], Spectra]
) -> tuple[np.ndarray, float]:
    """A rule's per-layer ratios at ``budget``: its one knob turned until the budget is met.

    Args:
        rule: ``uniform``, ``energy``, ``vbmf`` or ``alds``.
        n_layers: Layers (steps) to choose ratios for.
        cost: Ratios -> kept FLOP fraction.
        budget: The FLOP fraction to keep at most.
        min_ratio: The smallest ratio (``uniform``'s lower end).
        spectra: Called once by the spectral rules: per layer, per unfolding, the singular values
            and the matrix shape.

    Returns:
        The ratios and the knob's value.

    Raises:
        SelectorError: Unknown rule, or no knob setting meets the budget.
    """
    spectral = {"energy": energy_ratios, "vbmf": vbmf_ratios, "alds": alds_ratios}
    if rule == "uniform":
        ratios, knob = uniform_ratios(n_layers, cost, budget, min_ratio)
    elif rule in spectral:
        ratios, knob = spectral[rule](spectra(), cost, budget)
    else:
        raise SelectorError(f"unknown rule {rule!r}; known: {', '.join(SELECTORS)}")
    logger.info("%s selector: knob %.4f keeps %.4f of the FLOPs", rule, knob, cost(ratios))
    return ratios, knob
