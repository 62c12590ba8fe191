"""The mixed decomposition (``--decomposition mixed``): per unit, channel pruning or low rank.

A search with ``mixed`` walks *units*, not layers:

* a **pair**: a layer ``C`` whose input channels one convolution ``P`` alone makes (a step of
  ``--decomposition prune``: the inner convolutions of residual blocks) together with ``P``. Its two
  families at ratio ``r``: ``prune`` keeps ``round(r * c)`` of ``C``'s input channels and as many of
  ``P``'s outputs (one plan, of ``C``, owning ``P``'s cost, as :mod:`rlrank.methods.prune` prices
  it); low rank (:data:`~rlrank.planning.MIXED_LOW_RANK`, SVD for 1x1 convolutions) factorizes
  ``P`` and ``C`` at the same ratio ``r`` (two plans). At ratio 1 both families leave the pair dense.
* a **single** layer that only low rank compresses (the stem, the classifier, shortcut
  convolutions, and any layer whose input channels several layers make).

Every layer's cost belongs to one unit's plans or to the fixed rest, so a strategy's MACs are the
sum of its units' and the FLOP budget is guaranteed as for a single method. Priced from
:class:`~rlrank.layers.LayerInfo` alone, like :mod:`rlrank.planning`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlrank.layers import LayerInfo
from rlrank.planning import MIXED_LOW_RANK, LayerPlan, plan_layer, searched_layers

PRUNE = "prune"
LOW_RANK = MIXED_LOW_RANK
FAMILIES = (LOW_RANK, PRUNE)
"""A unit's families, in the order the action's two halves pick them (low rank, then pruning)."""


@dataclass(frozen=True)
class SearchUnit:
    """One step of a mixed search.

    Attributes:
        head: The layer naming the step (``C`` of a pair, else the single layer).
        partner: ``P`` of a pair (the producer of ``head``'s input channels), ``None`` for a single.
    """

    head: LayerInfo
    partner: LayerInfo | None = None

    @property
    def families(self) -> tuple[str, ...]:
        """The families this unit may take: both for a pair, low rank for a single layer."""
        return FAMILIES if self.partner is not None else (LOW_RANK,)

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """The unit's layers in forward order."""
        return (self.head,) if self.partner is None else (self.partner, self.head)


@dataclass(frozen=True)
class UnitPlan:
    """What a ratio and family do to one unit: its layers' plans and their summed cost.

    Attributes:
        name: The unit's head layer.
        ratio: The ratio played.
        family: ``prune`` or the low-rank family.
        plans: The layers' plans (a pruned pair: one, ``C``'s, owning ``P``'s cost).
    """

    name: str
    ratio: float
    family: str
    plans: tuple[LayerPlan, ...]

    @property
    def macs(self) -> int:
        return sum(p.macs for p in self.plans)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.plans)

    @property
    def dense(self) -> bool:
        return all(p.dense for p in self.plans)


def search_units(layers: Sequence[LayerInfo], exclude: Sequence[str] | None = None) -> list[SearchUnit]:
    """The units of a mixed search, in the forward order of their heads.

    A pair needs both of its layers compressible by low rank and not excluded, and ``C`` a step of
    ``--decomposition prune``; every other layer that low rank compresses is a single unit.
    """
    low_rank = searched_layers(layers, LOW_RANK, exclude)
    names = {layer.name for layer in low_rank}
    by_name = {layer.name: layer for layer in layers}
    partners = {
        head.name: by_name[str(head.producer)]
        for head in searched_layers(layers, PRUNE, exclude)
        if head.name in names and str(head.producer) in names
    }
    paired = {partner.name for partner in partners.values()}
    return [SearchUnit(layer, partners.get(layer.name)) for layer in low_rank if layer.name not in paired]


def unit_plan(unit: SearchUnit, ratio: float, family: str) -> UnitPlan:
    """The plans of ``unit`` at ``ratio`` in ``family`` (a family the unit cannot take is refused).

    Both families' MACs are non-decreasing in the ratio, which the walls' bisections rely on.
    """
    if family not in unit.families:
        raise ValueError(f"unit {unit.head.name} cannot take family {family!r}; it takes {unit.families}")
    if family == PRUNE:
        plans: tuple[LayerPlan, ...] = (plan_layer(unit.head, ratio, PRUNE),)
    else:
        plans = tuple(plan_layer(layer, ratio, LOW_RANK) for layer in unit.layers)
    return UnitPlan(unit.head.name, float(ratio), family, plans)


def unit_family(unit: SearchUnit, layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The family a logged strategy gave ``unit`` (``layers``: an episode row's per-layer entries)."""
    return PRUNE if unit.partner is not None and unit.partner.name not in layers else LOW_RANK
