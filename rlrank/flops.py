"""Exact multiply-accumulate (MAC) and parameter counts of dense and factorized layers.

"FLOPs" in rlrank means multiply-accumulates of convolution and linear layers, counted over the
whole model, exactly what ``torch.utils.flop_counter.FlopCounterMode`` reports divided by two
(batch norm, activations, pooling and additions are not counted, by it or by us). A budget
``--flops 0.5`` keeps at most half of the dense model's total.

Every compression method prices its factorized form from the dense layer's geometry
(:meth:`CompressionMethod.macs`), so the environment can account for a strategy before anything is
built; :func:`count_model` measures a built model with forward hooks, and the tests prove that both
agree with ``FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlrank.layers import LayerInfo, conv_macs
from rlrank.methods import get_method
from rlrank.modes import preserved_modes


def factorized_macs(layer: LayerInfo, method: str, ranks: tuple[int, ...]) -> int:
    """MACs of ``layer`` factorized by ``method`` at ``ranks`` (the method's own formula)."""
    return get_method(method).macs(layer, ranks)


def factorized_params(layer: LayerInfo, method: str, ranks: tuple[int, ...]) -> int:
    """Parameters of ``layer`` factorized by ``method`` at ``ranks`` (bias on the last factor)."""
    return get_method(method).params(layer, ranks)


# --------------------------------------------------------------------------------------------
# Measuring built models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """MACs and parameters of a whole model for one input."""

    macs: int
    params: int


def _example_input(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros((1, *input_shape), device=device, dtype=dtype)


@torch.no_grad()
def count_model(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelCost:
    """Count the conv / linear MACs and all parameters of ``model`` with forward hooks.

    Args:
        model: Any model (dense or with factorized layers).
        input_shape: ``(channels, height, width)`` of one input.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += conv_macs(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.groups,
                tuple(output.shape[-2:]),
            )
        else:
            total += module.in_features * module.out_features * (output.numel() // output.shape[-1])

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with preserved_modes(model):
            model.eval()
            model(_example_input(model, input_shape))
    finally:
        for h in handles:
            h.remove()
    return ModelCost(macs=total, params=sum(p.numel() for p in model.parameters()))


def flop_counter_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs as PyTorch's ``FlopCounterMode`` counts them (its FLOPs / 2): the reference for tests."""
    from torch.utils.flop_counter import FlopCounterMode

    with preserved_modes(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        model(_example_input(model, input_shape))
    return counter.get_total_flops() // 2
