"""SVD: a layer as two factors through ``r`` channels (the method of every 1x1 conv and linear layer).

* conv: k x k ``in -> r`` (the layer's stride, padding, dilation), then 1x1 ``r -> out`` (bias);
* linear: linear ``in -> r`` (no bias), then linear ``r -> out`` (bias).

Ratio 1 is the rank of the weight flattened per output, ``min(out, in * kh * kw)``; the factors of
any rank are truncations of one SVD, each side scaled by the square root of the singular values.
With ``--data-aware`` the output factor is the leading eigenvectors of the layer's output covariance
instead (Zhang et al., 2016) and the input factor is fitted to it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    CompressionMethod,
    FactorizedLayer,
    FactorSettings,
    Geometry,
    LayerWeights,
    conv2d,
    conv_geometry,
    linear_geometry,
    spatial_conv2d,
)


class SVDConv(FactorizedLayer):
    """k x k ``in -> r`` (stride, padding, dilation), then 1x1 ``r -> out`` (bias)."""

    method = "svd"

    def __init__(self, conv: Geometry, ranks: tuple[int], device: torch.device | str | None = None) -> None:
        (r,) = ranks
        super().__init__(
            OrderedDict(
                first=spatial_conv2d(conv["in_channels"], r, conv, device=device),
                last=conv2d(r, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> Geometry:
        return conv_geometry(
            self.first, self.first.in_channels, self.last.out_channels, self.last.bias is not None
        )

    def effective_weight(self) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", self.last.weight[:, :, 0, 0], self.first.weight)


class SVDLinear(FactorizedLayer):
    """Linear ``in -> r`` (no bias), then linear ``r -> out`` (bias)."""

    method = "svd"

    def __init__(self, linear: Geometry, ranks: tuple[int], device: torch.device | str | None = None) -> None:
        (r,) = ranks
        super().__init__(
            OrderedDict(
                first=nn.Linear(linear["in_channels"], r, bias=False, device=device),
                last=nn.Linear(r, linear["out_channels"], bias=linear["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> Geometry:
        return linear_geometry(self.first.in_features, self.last.out_features, self.last.bias is not None)

    def effective_weight(self) -> torch.Tensor:
        return self.last.weight @ self.first.weight


class SVD(CompressionMethod):
    """Truncated SVD of the weight flattened per output channel."""

    name = "svd"
    data_aware = True

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        kh, kw = layer.kernel
        return (min(layer.out_channels, layer.in_channels * kh * kw),)

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (r,) = ranks
        if layer.kind == "linear":
            return r * (layer.in_channels + layer.out_channels)
        kh, kw = layer.kernel
        hout, wout = layer.out_hw
        return r * layer.in_channels * kh * kw * hout * wout + r * layer.out_channels * hout * wout

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (r,) = ranks
        kh, kw = layer.kernel
        bias = layer.out_channels if layer.bias else 0
        return r * layer.in_channels * kh * kw + r * layer.out_channels + bias

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.check_ranks(entry.layer, ranks)
        self.prepare(entry, settings)
        (r,) = ranks
        ((u, s, vh),) = entry.store["svd"]
        w = entry.weight
        if "out_basis" in entry.store:  # data-aware: project the outputs onto their principal subspace
            last = entry.store["out_basis"][:, :r]
            first = last.T @ w.flatten(1)
        else:
            root = s[:r].sqrt()
            first = root[:, None] * vh[:r]
            last = u[:, :r] * root[None, :]
        if w.dim() == 4:
            first = first.reshape(r, *w.shape[1:])
            last = last[:, :, None, None]
        return [first, last]

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        if geometry["kind"] == "linear":
            return SVDLinear(geometry, ranks, device=device)
        return SVDConv(geometry, ranks, device=device)
