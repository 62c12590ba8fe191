"""Exact multiply-accumulate (MAC) and parameter counts of dense and factorized layers.

"FLOPs" in rlrank means multiply-accumulates of convolution and linear layers, counted over the
whole model, exactly what ``torch.utils.flop_counter.FlopCounterMode`` reports divided by two
(batch norm, activations, pooling and additions are not counted, by it or by us). A budget
``--flops 0.5`` keeps at most half of the dense model's total.

The formulas below price every factorized form from the dense layer's geometry, so the
environment can account for a strategy before anything is built; :func:`count_model` measures a
built model with forward hooks, and the tests prove that both agree with ``FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

METHODS = ("tucker2", "svd", "cp")


@dataclass(frozen=True)
class LayerInfo:
    """One compressible-or-not conv / linear layer, described by its dense geometry.

    For a layer that is already factorized (an earlier compression stage), the geometry is that of
    the dense layer it stands for, and ``method`` / ``ranks`` say how it is factorized now.

    Attributes:
        name: Qualified module name in the model (``layer1.0.conv1``).
        kind: ``"conv"`` or ``"linear"``.
        in_channels: Input channels (features for linear layers).
        out_channels: Output channels (features).
        kernel: Kernel height and width (1, 1 for linear).
        stride: Stride (1, 1 for linear).
        padding: Padding (0, 0 for linear).
        dilation: Dilation (1, 1 for linear).
        groups: Convolution groups (1 for linear).
        bias: Whether the layer adds a bias.
        in_hw: Input feature-map height and width (1, 1 for linear).
        out_hw: Output feature-map height and width (1, 1 for linear).
        macs: MACs of the dense layer for one input.
        params: Parameters of the dense layer.
        method: Current factorization (``None``: dense).
        ranks: Current ranks when factorized.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    macs: int
    params: int
    method: str | None = None
    ranks: tuple[int, ...] | None = None

    @property
    def is_pointwise(self) -> bool:
        """A linear layer or a 1x1 convolution: these are factorized by SVD."""
        return self.kind == "linear" or self.kernel == (1, 1)

    @property
    def current_macs(self) -> int:
        """MACs of the layer as it is now (factorized or dense)."""
        if self.method is None or self.ranks is None:
            return self.macs
        return factorized_macs(self, self.method, self.ranks)

    @property
    def current_params(self) -> int:
        if self.method is None or self.ranks is None:
            return self.params
        return factorized_params(self, self.method, self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerInfo:
        data = dict(data)
        for key in ("kernel", "stride", "padding", "dilation", "in_hw", "out_hw"):
            data[key] = tuple(data[key])
        if data.get("ranks") is not None:
            data["ranks"] = tuple(data["ranks"])
        return cls(**data)


def conv_macs(
    in_channels: int, out_channels: int, kernel: tuple[int, int], groups: int, out_hw: tuple[int, int]
) -> int:
    """MACs of a convolution: every output element takes ``in/groups * kh * kw`` products."""
    return out_channels * (in_channels // groups) * kernel[0] * kernel[1] * out_hw[0] * out_hw[1]


def dense_macs(layer: LayerInfo) -> int:
    if layer.kind == "linear":
        return layer.in_channels * layer.out_channels
    return conv_macs(layer.in_channels, layer.out_channels, layer.kernel, layer.groups, layer.out_hw)


def dense_params(layer: LayerInfo) -> int:
    weights = layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel[0] * layer.kernel[1]
    return weights + (layer.out_channels if layer.bias else 0)


def _cp_mid_width(layer: LayerInfo) -> int:
    """Width of the feature map after CP's vertical (kh x 1, stride sh x 1) depthwise convolution."""
    return layer.in_hw[1]


def factorized_macs(layer: LayerInfo, method: str, ranks: tuple[int, ...]) -> int:
    """MACs of ``layer`` factorized by ``method`` at ``ranks``.

    * ``tucker2`` (ranks ``(r_out, r_in)``): 1x1 ``in -> r_in`` at the input resolution, the k x k
      core ``r_in -> r_out`` with the layer's stride, 1x1 ``r_out -> out``.
    * ``svd`` (rank ``(r,)``): k x k ``in -> r`` with the layer's stride, 1x1 ``r -> out``;
      for linear layers two linear layers ``in -> r -> out``.
    * ``cp`` (rank ``(r,)``): 1x1 ``in -> r`` at the input resolution, depthwise kh x 1, depthwise
      1 x kw, 1x1 ``r -> out``.
    """
    hin, win = layer.in_hw
    hout, wout = layer.out_hw
    kh, kw = layer.kernel
    cin, cout = layer.in_channels, layer.out_channels
    if method == "svd":
        (r,) = ranks
        if layer.kind == "linear":
            return r * (cin + cout)
        return r * cin * kh * kw * hout * wout + r * cout * hout * wout
    if method == "tucker2":
        r_out, r_in = ranks
        return cin * r_in * hin * win + r_in * r_out * kh * kw * hout * wout + r_out * cout * hout * wout
    if method == "cp":
        (r,) = ranks
        return (
            cin * r * hin * win
            + r * kh * hout * _cp_mid_width(layer)
            + r * kw * hout * wout
            + r * cout * hout * wout
        )
    raise ValueError(f"unknown decomposition method {method!r}; known: {', '.join(METHODS)}")


def factorized_params(layer: LayerInfo, method: str, ranks: tuple[int, ...]) -> int:
    """Parameters of ``layer`` factorized by ``method`` at ``ranks`` (bias on the last factor)."""
    kh, kw = layer.kernel
    cin, cout = layer.in_channels, layer.out_channels
    bias = cout if layer.bias else 0
    if method == "svd":
        (r,) = ranks
        return r * cin * kh * kw + r * cout + bias
    if method == "tucker2":
        r_out, r_in = ranks
        return cin * r_in + r_in * r_out * kh * kw + r_out * cout + bias
    if method == "cp":
        (r,) = ranks
        return cin * r + r * kh + r * kw + r * cout + bias
    raise ValueError(f"unknown decomposition method {method!r}; known: {', '.join(METHODS)}")


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
    was_training = model.training
    try:
        model.eval()
        model(_example_input(model, input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ModelCost(macs=total, params=sum(p.numel() for p in model.parameters()))


def flop_counter_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """MACs as PyTorch's ``FlopCounterMode`` counts them (its FLOPs / 2): the reference for tests."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_example_input(model, input_shape))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
