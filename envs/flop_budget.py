"""The FLOP budget's reachable minimum and the error for a budget below it."""

from __future__ import annotations

from collections.abc import Sequence

from rlrank.errors import UserError
from rlrank.layers import LayerInfo
from rlrank.mixed_units import FAMILIES, LOW_RANK, prunable_pairs, step_plan
from rlrank.planning import MIXED, current_macs, current_ratio, owned_layers, plan_layer, searched_layers


class BudgetError(UserError):
    """The FLOP budget cannot be met even with every layer at its minimum rank ratio.

    Attributes:
        smallest: The smallest budget (fraction of the dense model's MACs) that can be reached.
    """

    def __init__(self, budget: float, smallest: float) -> None:
        super().__init__(
            f"--flops {budget:g} cannot be reached: with every compressible layer at its minimum rank "
            f"the model keeps {smallest:.4f} of the dense FLOPs; the smallest reachable budget is {smallest:.4f}"
        )
        self.budget = budget
        self.smallest = smallest


def smallest_budget(
    layers: Sequence[LayerInfo],
    decomposition: str,
    min_ratio: float,
    exclude: Sequence[str] | None = None,
    sparse: float = 0.0,
) -> float:
    """Fraction of the dense MACs left with every compressible layer (not excluded) at ``min_ratio``
    (with ``sparse``: as sparse + low-rank plans, :func:`rlrank.planning.sparse_plan`; ``mixed``:
    every step in its most expensive family there, what the walls reserve)."""
    dense = sum(layer.macs for layer in layers)
    if decomposition == MIXED:  # each step's most expensive family at its lowest ratio (the env's reserve)
        steps = {layer.name for layer in searched_layers(layers, decomposition, exclude)}
        pairs = prunable_pairs(layers, exclude)
        kept = 0
        for layer in layers:
            if layer.name not in steps:
                kept += current_macs(layer)
                continue
            low = min(min_ratio, current_ratio(layer))
            families = FAMILIES if layer.name in pairs else (LOW_RANK,)
            kept += max(step_plan(layer, low, f, pairs.get(layer.name)).macs for f in families)
        return kept / dense
    steps = searched_layers(layers, decomposition, exclude)
    step_names = {layer.name for layer in steps}
    owned = owned_layers(steps, decomposition)
    kept = 0
    for layer in layers:
        if layer.name in step_names:
            kept += plan_layer(layer, min(min_ratio, current_ratio(layer)), decomposition, sparse=sparse).macs
        elif layer.name not in owned:
            kept += current_macs(layer)
    return kept / dense
