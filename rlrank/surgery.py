"""Model surgery: apply a strategy to a model, record and restore its structure.

:func:`decompose_model` applies a strategy (one :class:`~rlrank.planning.LayerPlan` per layer) with
factors from the :class:`~rlrank.factor_cache.FactorCache`, each through its method's
:meth:`~rlrank.methods.base.CompressionMethod.apply` (by default: replace the layer; a method that
changes channel counts, such as pruning, also adapts the layers reading it there);
:func:`factorization_of` and :func:`apply_factorization` describe a compressed model's structure and
rebuild it on a fresh dense model (what the model file stores; a sparse + low-rank layer's filter
count too, its filter indices being a buffer of the state dict); :func:`channel_counts_of` and
:func:`apply_channel_counts` do the same for the narrower layers of a pruned model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from rlrank.describe import geometry_of
from rlrank.methods import POINTWISE_METHOD, DecompositionError, FactorizedLayer, get_method, list_methods
from rlrank.methods.base import replace_module
from rlrank.methods.sparse_residual import SparseResidualLayer
from rlrank.planning import LayerPlan

if TYPE_CHECKING:
    from rlrank.factor_cache import FactorCache


def empty_factorized(
    module: nn.Module, method: str, ranks: tuple[int, ...], filters: int = 0
) -> FactorizedLayer:
    """A factorized module of the right shapes for ``module`` (weights still to be set); with
    ``filters`` > 0 a :class:`SparseResidualLayer` keeping that many whole filters besides."""
    geometry = geometry_of(module)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise DecompositionError("grouped and depthwise convolutions are left dense")
    pointwise = method == POINTWISE_METHOD or (method in list_methods() and get_method(method).pointwise)
    if geometry["kind"] == "linear" and not pointwise:
        raise DecompositionError(f"linear layers are factorized by {POINTWISE_METHOD}, not {method!r}")
    if geometry["kernel"] == (1, 1) and not pointwise:
        raise DecompositionError(f"1x1 convolutions are factorized by {POINTWISE_METHOD}, not {method!r}")
    low_rank = get_method(method).build_module(geometry, ranks)
    return SparseResidualLayer(low_rank, filters) if filters else low_rank


def decompose_model(
    model: nn.Module, plans: Iterable[LayerPlan], cache: FactorCache, inplace: bool = False
) -> nn.Module:
    """Apply a strategy: replace every planned layer by its factorization from ``cache``.

    Args:
        model: The model the cache was built from (dense or partly factorized).
        plans: One plan per layer to change; dense plans and unchanged ranks are skipped.
        cache: The factor cache of ``model``.
        inplace: Modify ``model`` instead of a deep copy.

    Returns:
        The decomposed model, on the device of ``model``.
    """
    changes = [
        plan
        for plan in plans
        if not plan.dense
        and not (
            cache.layers[plan.name].method == plan.method
            and cache.layers[plan.name].ranks == plan.ranks
            and cache.layers[plan.name].filters == plan.filters
        )
    ]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if inplace:
        target = model
    else:
        # copy everything but the layers about to be replaced (their weights would be thrown away)
        memo = {id(model.get_submodule(plan.name)): nn.Identity() for plan in changes}
        target = copy.deepcopy(model, memo)
    for plan in changes:
        module = cache.build(plan.name, plan.ranks, device, dtype, plan.filters, plan.method)
        get_method(plan.method).apply(target, plan.name, module)
    return target


def factorization_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: {"method", "ranks"}}`` for every factorized layer of ``model``, with
    ``"filters"`` (their count) for a sparse + low-rank one; which filters is in its state dict
    (the ``filter_index`` buffer)."""
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, FactorizedLayer) or any(name.startswith(f"{outer}.") for outer in found):
            continue  # (the low-rank part inside a sparse + low-rank layer is that layer's)
        found[name] = {"method": module.method, "ranks": list(module.ranks)}
        if isinstance(module, SparseResidualLayer):
            found[name]["filters"] = module.filters
    return found


def channel_counts_of(model: nn.Module) -> dict[str, list[int]]:
    """``{name: [in, out]}`` of every plain convolution and linear layer and ``{name: [features]}`` of
    every BatchNorm outside factorized layers: what a pruned model's file needs to rebuild its
    narrower layers (:func:`apply_channel_counts`)."""
    counts: dict[str, list[int]] = {}
    factorized = [name for name, m in model.named_modules() if isinstance(m, FactorizedLayer)]
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in factorized):
            continue
        if (found := _counts(module)) is not None:
            counts[name] = found
    return counts


def _counts(module: nn.Module) -> list[int] | None:
    """``[in, out]`` of a convolution or linear layer, ``[features]`` of a BatchNorm, else ``None``."""
    if isinstance(module, nn.Conv2d):
        return [module.in_channels, module.out_channels]
    if isinstance(module, nn.Linear):
        return [module.in_features, module.out_features]
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return [module.num_features]
    return None


def apply_channel_counts(model: nn.Module, counts: Mapping[str, list[int]]) -> nn.Module:
    """Give the layers of ``model`` (freshly built) the channel counts recorded (weights unset)."""
    for name, recorded in counts.items():
        module = _saved_layer(model, name, "channel counts")
        if _counts(module) != list(recorded):
            replace_module(model, name, _resized(module, [int(c) for c in recorded]))
    return model


def _saved_layer(model: nn.Module, name: str, what: str) -> nn.Module:
    """The layer ``name`` of ``model`` that a model file's ``what`` names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise DecompositionError(f"layer {name!r} of the saved {what} is not in the model") from None


def _resized(module: nn.Module, counts: list[int]) -> nn.Module:
    """An empty layer like ``module`` with other channel counts."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            counts[0],
            counts[1],
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(counts[0], counts[1], bias=module.bias is not None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(module)(counts[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    raise DecompositionError(f"cannot give a {type(module).__name__} other channel counts")


def apply_factorization(model: nn.Module, factorization: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Give ``model`` (freshly built, dense) the factorized structure described (weights unset)."""
    for name, entry in factorization.items():
        dense = _saved_layer(model, name, "factorization")
        ranks = tuple(int(r) for r in entry["ranks"])
        filters = int(entry.get("filters", 0))
        replace_module(model, name, empty_factorized(dense, str(entry["method"]), ranks, filters))
    return model
