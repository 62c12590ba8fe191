"""Reading a model: its conv / linear layers (dense or factorized) in forward order, as :class:`LayerInfo`.

:func:`describe_layers` runs the model once on a zero input to learn every layer's feature-map size
and forward order; :func:`geometry_of`, :func:`effective_weight` and :func:`effective_bias` see a
factorized layer as the dense layer it stands for, so a later compression stage treats both alike.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rlrank.channel_coupling import channel_producers
from rlrank.layers import LayerInfo, conv_macs
from rlrank.methods import DecompositionError, FactorizedLayer
from rlrank.methods.base import conv_geometry, linear_geometry
from rlrank.methods.sparse_residual import SparseResidualLayer
from rlrank.modes import preserved_modes


def geometry_of(module: nn.Module) -> dict[str, Any]:
    """Dense geometry of a conv, linear or factorized module."""
    if isinstance(module, FactorizedLayer):
        return module.dense_geometry()
    if isinstance(module, nn.Conv2d):
        return conv_geometry(module, module.in_channels, module.out_channels, module.bias is not None)
    if isinstance(module, nn.Linear):
        return linear_geometry(module.in_features, module.out_features, module.bias is not None)
    raise DecompositionError(f"cannot factorize a {type(module).__name__}")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """Dense weight of a conv, linear or factorized module."""
    if isinstance(module, FactorizedLayer):
        return module.effective_weight()
    return module.weight


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """Bias of a conv, linear or factorized module (``None`` when it has none)."""
    if isinstance(module, FactorizedLayer):
        return module.effective_bias()
    return module.bias


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Conv, linear and factorized modules, the factors inside factorized ones excluded."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, FactorizedLayer):
            found[name] = module
            inside.append(name)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            found[name] = module
    return found


@torch.no_grad()
def describe_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Describe every conv / linear (or factorized) layer of ``model`` in forward order.

    Args:
        model: The model; it is run once on a zero input of ``input_shape``.
        input_shape: ``(channels, height, width)`` of one input.
    """
    modules = layer_modules(model)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    order: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if name not in shapes:
                shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))
                order.append(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    param = next(model.parameters())
    try:
        with preserved_modes(model):
            model.eval()
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()

    layers = []
    for name in order:
        module = modules[name]
        geometry = geometry_of(module)
        in_shape, out_shape = shapes[name]
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        if geometry["kind"] == "conv":
            in_hw, out_hw = tuple(in_shape[-2:]), tuple(out_shape[-2:])
            macs = conv_macs(
                geometry["in_channels"], geometry["out_channels"], geometry["kernel"], groups, out_hw
            )
        else:
            in_hw = out_hw = (1, 1)
            macs = geometry["in_channels"] * geometry["out_channels"]
        kh, kw = geometry["kernel"]
        params = geometry["out_channels"] * (geometry["in_channels"] // groups) * kh * kw
        params += geometry["out_channels"] if geometry["bias"] else 0
        factorized = isinstance(module, FactorizedLayer)
        layers.append(
            LayerInfo(
                name=name,
                groups=groups,
                in_hw=in_hw,
                out_hw=out_hw,
                macs=macs,
                params=params,
                method=module.method if factorized else None,
                ranks=module.ranks if factorized else None,
                filters=module.filters if isinstance(module, SparseResidualLayer) else 0,
                **geometry,
            )
        )
    return _with_producers(layers, model)


def _with_producers(layers: list[LayerInfo], model: nn.Module) -> list[LayerInfo]:
    """``layers`` with each one's channel producer (:func:`~rlrank.channel_coupling.channel_producers`)."""
    by_name = {layer.name: layer for layer in layers}
    producers = channel_producers(model)
    out = []
    for layer in layers:
        producer = producers.get(layer.name) if layer.method is None else None
        source = by_name.get(producer.name) if producer is not None else None
        if source is not None and source.method is None and source.out_channels == layer.in_channels:
            layer = replace(
                layer,
                producer=source.name,
                producer_macs=source.macs,
                producer_params=source.params,
                producer_batchnorms=producer.batchnorms,
            )
        out.append(layer)
    return out
