"""Planning: what a rank ratio does to a layer, and the bisections that fit ratios to a MAC budget.

A *rank ratio* in (0, 1] picks integer ranks through :func:`ratio_to_ranks`, the one mapping used
everywhere; what ratio 1 stands for is the method's (:meth:`CompressionMethod.full_ranks`). A ratio
whose factorized form costs at least as much as the dense layer leaves it dense. Everything here is
priced from :class:`~rlrank.layers.LayerInfo` alone: no tensor is touched, so the environment plans
every step of every episode for free.

With a sparse fraction ``F > 0`` (``--sparse``), a layer that ratio ``rho`` factorizes spends its
cost at ``rho`` (``M``, the plan's MACs with ``F = 0``) on a sparse + low-rank form
(:mod:`rlrank.methods.sparse_residual`): ``k`` whole output filters, as many as ``F * M`` pays for
(never so many that the low-rank part could not keep rank 1), and the low-rank part at the largest
ranks of a ratio ``<= rho`` that fit in the rest. The plan's MACs (``L + S``) never exceed ``M``, so
every budget the env guarantees with ``F = 0`` it guarantees with ``F > 0``; and they never fall as
``rho`` rises (the low-rank part's share is reserved even where it buys no whole filter), which the
walls' bisections rely on. Layers left dense stay dense.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlrank.layers import LayerInfo
from rlrank.methods import POINTWISE_METHOD, DecompositionError, get_method, list_methods
from rlrank.methods.sparse_residual import filter_macs, filter_params, filters_within

__all__ = [
    "MIXED",
    "MIXED_LOW_RANK",
    "LayerPlan",
    "check_decomposition",
    "check_ratio",
    "current_macs",
    "current_params",
    "current_ratio",
    "full_ranks",
    "is_compressible",
    "is_excluded",
    "largest_ratio_within",
    "searched_layers",
    "list_decompositions",
    "list_methods",
    "max_ratio_within",
    "method_for",
    "min_ratio_reaching",
    "owned_layers",
    "plan_layer",
    "ratio_to_ranks",
    "single_method",
    "smallest_ratio_reaching",
    "sparse_plan",
]


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float if it lies in (0, 1], else raise :class:`DecompositionError`."""
    if isinstance(ratio, (str, bytes, bool)):  # float() would accept "0.5" and True
        raise DecompositionError(f"rank ratio must be a number in (0, 1], got {ratio!r}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise DecompositionError(f"rank ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise DecompositionError(f"rank ratio must be in (0, 1], got {ratio!r}")
    return value


def ratio_to_ranks(ratio: float, full_ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Integer ranks for a rank ratio: ``round(ratio * full)`` per mode, at least 1, at most full.

    Args:
        ratio: Rank ratio in (0, 1].
        full_ranks: The ranks that ratio 1 stands for (see :func:`full_ranks`).

    Raises:
        DecompositionError: ``ratio`` outside (0, 1].
    """
    value = check_ratio(ratio)
    return tuple(max(1, min(f, math.floor(value * f + 0.5))) for f in full_ranks)


MIXED = "mixed"
"""``--decomposition mixed``: per step, channel pruning or low rank, the agent's choice
(:mod:`rlrank.mixed_units`); everywhere a single method is meant, it stands for its low-rank family."""
MIXED_LOW_RANK = "tucker2"
"""The low-rank family of ``mixed`` (SVD for 1x1 convolutions and linear layers)."""


def list_decompositions() -> list[str]:
    """What ``--decomposition`` accepts: the registered methods, then ``mixed``."""
    return [*list_methods(), MIXED]


def check_decomposition(decomposition: str) -> str:
    """Return ``decomposition`` if it names a registered method or ``mixed``, else raise
    :class:`DecompositionError`."""
    if decomposition == MIXED:
        return decomposition
    if decomposition not in list_methods():
        raise DecompositionError(
            f"unknown decomposition {decomposition!r}; known: {', '.join(list_decompositions())}"
        )
    return decomposition


def single_method(decomposition: str) -> str:
    """The registered method that ``decomposition`` stands for where one is meant (``mixed``: its
    low-rank family)."""
    return MIXED_LOW_RANK if check_decomposition(decomposition) == MIXED else decomposition


def method_for(layer: LayerInfo, decomposition: str) -> str:
    """The factorization a layer gets: its current one if factorized; for a 1x1 convolution or a
    linear layer, ``decomposition`` if that method is ``pointwise`` (tt, tr), else SVD; for a
    k x k convolution, ``decomposition``."""
    decomposition = single_method(decomposition)
    if layer.method is not None:
        return layer.method
    if layer.is_pointwise and not get_method(decomposition).pointwise:
        return POINTWISE_METHOD
    return decomposition


def full_ranks(layer: LayerInfo, method: str) -> tuple[int, ...]:
    """The ranks that rank ratio 1 stands for."""
    return get_method(method).full_ranks(layer)


def is_excluded(name: str, exclude: Sequence[str] | None) -> bool:
    """Whether layer ``name`` matches one of the ``--exclude`` shell-style globs (``layer1.*``)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude or ())


def searched_layers(
    layers: Sequence[LayerInfo], decomposition: str, exclude: Sequence[str] | None = None
) -> list[LayerInfo]:
    """The layers a search chooses ranks for: compressible by ``decomposition`` and not excluded.

    A layer whose plan owns its producer's cost (channel pruning) is not searched when that producer
    is searched too (both would price the producer; in a chain ``A -> B -> C`` the later layer, ``C``,
    is kept): every layer's cost then belongs to exactly one plan or to none.
    """
    candidates = [
        layer
        for layer in layers
        if is_compressible(layer, decomposition) and not is_excluded(layer.name, exclude)
    ]
    chosen: set[str] = set()
    owned: set[str] = set()
    for layer in reversed(candidates):
        if layer.name in owned or (_owns_producer(layer, decomposition) and layer.producer in chosen):
            continue
        chosen.add(layer.name)
        if _owns_producer(layer, decomposition):
            owned.add(str(layer.producer))
    return [layer for layer in candidates if layer.name in chosen]


def _owns_producer(layer: LayerInfo, decomposition: str) -> bool:
    """Whether ``layer``'s plans price its producer too (channel pruning)."""
    method = get_method(method_for(layer, decomposition))
    return layer.producer is not None and method.dense_macs(layer) != layer.macs


def owned_layers(steps: Sequence[LayerInfo], decomposition: str) -> set[str]:
    """Layers that are not searched but whose cost the searched layers' plans include (the producers
    whose output channels pruning removes): left out of a search's fixed cost."""
    return {str(layer.producer) for layer in steps if _owns_producer(layer, decomposition)}


def current_macs(layer: LayerInfo) -> int:
    """MACs of a layer as it is now (factorized, with its sparse filters if any, or dense)."""
    if layer.method is None or layer.ranks is None:
        return layer.macs
    return get_method(layer.method).macs(layer, layer.ranks) + layer.filters * filter_macs(layer)


def current_params(layer: LayerInfo) -> int:
    """Parameters of a layer as it is now (factorized, with its sparse filters if any, or dense)."""
    if layer.method is None or layer.ranks is None:
        return layer.params
    return get_method(layer.method).params(layer, layer.ranks) + layer.filters * filter_params(layer)


def rank_ratio(layer: LayerInfo, method: str, ranks: Sequence[int]) -> float:
    """The rank ratio that ``ranks`` of ``method`` stand for on ``layer``: the largest rank over
    full rank (at most 1)."""
    full = full_ranks(layer, method)
    return min(1.0, max(r / f for r, f in zip(ranks, full, strict=True)))


def current_ratio(layer: LayerInfo) -> float:
    """Rank ratio of a layer as it is now: 1 for dense, else its largest rank over full rank."""
    if layer.method is None or layer.ranks is None:
        return 1.0
    return rank_ratio(layer, layer.method, layer.ranks)


def is_compressible(layer: LayerInfo, decomposition: str) -> bool:
    """True when some rank makes the layer cheaper (grouped / depthwise convs never are here)."""
    if layer.groups != 1:
        return False
    if layer.method is not None:
        return any(r > 1 for r in layer.ranks or ())
    method = get_method(method_for(layer, decomposition))
    if not method.can_compress(layer):
        return False
    return method.macs(layer, tuple(1 for _ in method.full_ranks(layer))) < method.dense_macs(layer)


@dataclass(frozen=True)
class LayerPlan:
    """What a rank ratio does to one layer: its factorization (``None``: dense) and its cost.

    Attributes:
        name: The layer.
        ratio: The rank ratio played.
        method: The factorization, or ``None`` (the layer stays dense).
        ranks: The low-rank part's ranks (``None`` when dense).
        macs: MACs of the planned layer, the sparse filters included.
        params: Parameters of the planned layer, the sparse filters included.
        filters: Whole output filters kept dense beside the low-rank part (``--sparse``; 0: none).
    """

    name: str
    ratio: float
    method: str | None
    ranks: tuple[int, ...] | None
    macs: int
    params: int
    filters: int = 0

    @property
    def dense(self) -> bool:
        return self.method is None


def plan_layer(
    layer: LayerInfo,
    ratio: float,
    decomposition: str,
    allow_dense: bool = True,
    dense_from: float | None = None,
    sparse: float = 0.0,
) -> LayerPlan:
    """Ranks and cost of ``layer`` at ``ratio``.

    A dense layer whose factorized form would not save MACs stays dense, or, with
    ``allow_dense=False`` (multi-stage compression, where every layer is factorized in the first
    stage so that later stages never add depth), gets the largest ranks that still save MACs. With
    ``allow_dense``, a dense layer also stays dense from ratio ``dense_from`` up: where its
    factorized form is no faster (a latency budget's :meth:`~rlrank.latency_table.LayerLatency.dense_from`).
    A factorized layer never grows back (its new ranks are at most its current ones). With
    ``sparse`` > 0 a factorized plan becomes sparse + low-rank within the same MACs
    (:func:`sparse_plan`).
    """
    method = method_for(layer, decomposition)
    priced = get_method(method)
    dense = LayerPlan(layer.name, ratio, None, None, priced.dense_macs(layer), priced.dense_params(layer))
    if allow_dense and dense_from is not None and layer.method is None and ratio >= dense_from:
        return dense
    ranks = _ranks_at(layer, method, ratio)
    macs = priced.macs(layer, ranks)
    if layer.method is None and macs >= dense.macs:
        if allow_dense or not is_compressible(layer, decomposition):
            return dense
        ratio = max_ratio_within(layer, decomposition, dense.macs - 1, min(ratio, 1e-6), ratio)
        return plan_layer(layer, ratio, decomposition, sparse=sparse)
    plan = LayerPlan(layer.name, ratio, method, ranks, macs, priced.params(layer, ranks))
    return sparse_plan(layer, plan, sparse) if sparse > 0 else plan


def _ranks_at(layer: LayerInfo, method: str, ratio: float) -> tuple[int, ...]:
    """:func:`ratio_to_ranks` of ``method``'s full ranks, capped by the layer's current ranks."""
    ranks = ratio_to_ranks(ratio, full_ranks(layer, method))
    if layer.ranks is not None:
        ranks = tuple(min(r, c) for r, c in zip(ranks, layer.ranks, strict=True))
    return ranks


def sparse_plan(layer: LayerInfo, plan: LayerPlan, sparse: float) -> LayerPlan:
    """``plan`` (factorized, ``sparse = 0``) as a sparse + low-rank plan of at most its MACs ``M``.

    The filters get ``min(sparse * M, M - L1)`` MACs (``L1``: the low-rank part at rank 1), and
    ``k`` = as many whole filters as that pays for; the low-rank part gets the rest, at the ranks of
    the largest ratio ``<= plan.ratio`` that fit. Both shares are non-decreasing in ``M``, so the
    plan's MACs are non-decreasing in the ratio (bisections over ratios stay valid).
    """
    priced = get_method(plan.method)
    lowest = priced.macs(layer, _ranks_at(layer, plan.method, 1e-9))
    share = min(sparse * plan.macs, plan.macs - lowest)
    filters = filters_within(layer, share)
    room = plan.macs - share

    def low_rank_macs(ratio: float) -> int:
        return priced.macs(layer, _ranks_at(layer, plan.method, ratio))

    lo, hi = 1e-9, plan.ratio
    if low_rank_macs(hi) <= room:
        lo = hi
    else:
        for _ in range(32):  # the low-rank MACs are non-decreasing in the ratio: bisect
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if low_rank_macs(mid) <= room else (lo, mid)
    ranks = _ranks_at(layer, plan.method, lo)
    return LayerPlan(
        plan.name,
        plan.ratio,
        plan.method,
        ranks,
        priced.macs(layer, ranks) + filters * filter_macs(layer),
        priced.params(layer, ranks) + filters * filter_params(layer),
        filters,
    )


def max_ratio_within(
    layer: LayerInfo,
    decomposition: str,
    max_macs: float,
    lo: float,
    hi: float,
    allow_dense: bool = True,
    dense_from: float | None = None,
    sparse: float = 0.0,
) -> float:
    """Largest ratio in ``[lo, hi]`` whose plan costs at most ``max_macs`` (``lo`` if none does)."""

    def cost(ratio: float) -> int:
        return plan_layer(layer, ratio, decomposition, allow_dense, dense_from, sparse).macs

    return largest_ratio_within(cost, max_macs, lo, hi)


def min_ratio_reaching(
    layer: LayerInfo,
    decomposition: str,
    min_macs: float,
    lo: float,
    hi: float,
    allow_dense: bool = True,
    dense_from: float | None = None,
    sparse: float = 0.0,
) -> float:
    """Smallest ratio in ``[lo, hi]`` whose plan costs at least ``min_macs`` (``hi`` if none does)."""

    def cost(ratio: float) -> int:
        return plan_layer(layer, ratio, decomposition, allow_dense, dense_from, sparse).macs

    return smallest_ratio_reaching(cost, min_macs, lo, hi)


def largest_ratio_within(cost: Callable[[float], float], max_macs: float, lo: float, hi: float) -> float:
    """Largest ratio in ``[lo, hi]`` with ``cost(ratio) <= max_macs`` (``lo`` if none), for a
    ``cost`` non-decreasing in the ratio (bisection)."""
    if cost(hi) <= max_macs:
        return hi
    if cost(lo) > max_macs:
        return lo
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if cost(mid) <= max_macs:
            lo = mid
        else:
            hi = mid
    return lo


def smallest_ratio_reaching(cost: Callable[[float], float], min_macs: float, lo: float, hi: float) -> float:
    """Smallest ratio in ``[lo, hi]`` with ``cost(ratio) >= min_macs`` (``hi`` if none), for a
    ``cost`` non-decreasing in the ratio (bisection)."""
    if cost(lo) >= min_macs:
        return lo
    if cost(hi) < min_macs:
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if cost(mid) >= min_macs:
            hi = mid
        else:
            lo = mid
    return hi
