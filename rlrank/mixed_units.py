"""The mixed decomposition (``--decomposition mixed``): per residual block, channel pruning or low rank.

A mixed search walks the same layers as a low-rank one (:data:`~rlrank.planning.MIXED_LOW_RANK`,
SVD for 1x1 convolutions and linear layers), one step each, and every layer can be factorized at
its own ratio. A **pair** is a layer ``C`` whose input channels one convolution ``P`` alone makes
(a step of ``--decomposition prune``: the inner convolutions of a residual block) with ``P``. At
``P``'s step the pair may instead be **pruned**: ``C`` keeps ``round(r * c)`` of its ``c`` input
channels and ``P`` as many outputs, one plan of ``C`` owning both layers' cost (as
:mod:`rlrank.methods.prune` prices it); ``C``'s own step then has nothing left to choose (an empty
plan). Every layer's cost belongs to one step's plan or to the fixed rest, so a strategy's MACs are
the sum of its steps' and the FLOP budget is guaranteed as for a single method. Priced from
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
"""The families of a pair's producer step: low rank (its own ratio) or pruning the pair."""
PRUNED_WITH_PRODUCER = "pruned-with-producer"
"""The family of a pair's head step once its producer's step pruned the pair: nothing to plan."""


@dataclass(frozen=True)
class StepPlan:
    """What one step of a mixed search plans: its layers' plans and their summed cost.

    Attributes:
        name: The step's layer.
        ratio: The ratio played.
        family: ``prune`` (a producer's step pruning its pair), the low-rank family, or
            :data:`PRUNED_WITH_PRODUCER` (a head whose pair is pruned: no plan).
        plans: The plans (pruning: one, the head's, owning the producer's cost; a pruned head: none).
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


def prunable_pairs(layers: Sequence[LayerInfo], exclude: Sequence[str] | None = None) -> dict[str, LayerInfo]:
    """``{producer name: head}`` of every pair a mixed search may prune: the head a step of
    ``--decomposition prune``, both layers compressible by low rank and not excluded."""
    names = {layer.name for layer in searched_layers(layers, LOW_RANK, exclude)}
    return {
        str(head.producer): head
        for head in searched_layers(layers, PRUNE, exclude)
        if head.name in names and str(head.producer) in names
    }


def step_plan(layer: LayerInfo, ratio: float, family: str, head: LayerInfo | None = None) -> StepPlan:
    """The plan of ``layer``'s step at ``ratio`` in ``family`` (``head``: the layer whose input
    channels ``layer`` makes, which pruning prunes with it). MACs are non-decreasing in the ratio
    in every family, which the walls' bisections rely on."""
    if family == PRUNE:
        if head is None:
            raise ValueError(f"layer {layer.name} makes no pair that pruning could take")
        return StepPlan(layer.name, float(ratio), PRUNE, (plan_layer(head, ratio, PRUNE),))
    if family == PRUNED_WITH_PRODUCER:
        return StepPlan(layer.name, float(ratio), family, ())
    return StepPlan(layer.name, float(ratio), LOW_RANK, (plan_layer(layer, ratio, LOW_RANK),))


def logged_families(
    steps: Sequence[LayerInfo], pairs: Mapping[str, LayerInfo], layers: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, float]]:
    """Per step, the family and ratio that a logged strategy (an episode row's per-layer entries)
    gave it: a pair is pruned when its producer has no entry of its own."""
    heads = {head.name for head in pairs.values()}
    pruned = {pairs[p].name for p in pairs if p not in layers}
    found = []
    for layer in steps:
        if layer.name in pairs and layer.name not in layers:
            found.append((PRUNE, float(layers[pairs[layer.name].name]["ratio"])))
        elif layer.name in heads and layer.name in pruned:
            found.append((PRUNED_WITH_PRODUCER, 1.0))
        else:
            found.append((LOW_RANK, float(layers[layer.name]["ratio"])))
    return found
