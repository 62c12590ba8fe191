"""CP: a k x k convolution as 1x1 ``in -> r``, depthwise kh x 1, depthwise 1 x kw, 1x1 ``r -> out``.

The factors come from tensorly's PARAFAC (ALS, SVD initialization) of the 4-way kernel. CP has no
nested structure, so nothing truncates: the factors are computed and memoized per rank. No rank is
"full" either: ratio 1 is the rank at which the factorized layer costs as many MACs as the dense one.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    CompressionMethod,
    DecompositionError,
    FactorizedLayer,
    FactorSettings,
    Geometry,
    LayerWeights,
    conv2d,
)


class CPConv(FactorizedLayer):
    """1x1 ``in -> r``, depthwise kh x 1, depthwise 1 x kw, 1x1 ``r -> out`` (bias)."""

    method = "cp"

    def __init__(self, conv: Geometry, ranks: tuple[int], device: torch.device | str | None = None) -> None:
        (r,) = ranks
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            conv["kernel"],
            conv["stride"],
            conv["padding"],
            conv["dilation"],
        )
        super().__init__(
            OrderedDict(
                first=conv2d(conv["in_channels"], r, (1, 1), device=device),
                vertical=conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, device=device),
                horizontal=conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, device=device),
                last=conv2d(r, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> Geometry:
        v, h = self.vertical, self.horizontal
        return dict(
            kind="conv",
            in_channels=self.first.in_channels,
            out_channels=self.last.out_channels,
            kernel=(v.kernel_size[0], h.kernel_size[1]),
            stride=(v.stride[0], h.stride[1]),
            padding=(v.padding[0], h.padding[1]),
            dilation=(v.dilation[0], h.dilation[1]),
            bias=self.last.bias is not None,
        )

    def effective_weight(self) -> torch.Tensor:
        return torch.einsum(
            "or,ri,rk,rl->oikl",
            self.last.weight[:, :, 0, 0],
            self.first.weight[:, :, 0, 0],
            self.vertical.weight[:, 0, :, 0],
            self.horizontal.weight[:, 0, 0, :],
        )


class CP(CompressionMethod):
    """CP (PARAFAC) decomposition of the kernel into four rank-``r`` factors."""

    name = "cp"

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        return (max(1, layer.macs // self.macs(layer, (1,))),)

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (r,) = ranks
        hin, win = layer.in_hw
        hout, wout = layer.out_hw
        kh, kw = layer.kernel
        mid_width = win  # width after the vertical (kh x 1, stride sh x 1) depthwise convolution
        return (
            layer.in_channels * r * hin * win
            + r * kh * hout * mid_width
            + r * kw * hout * wout
            + r * layer.out_channels * hout * wout
        )

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (r,) = ranks
        kh, kw = layer.kernel
        bias = layer.out_channels if layer.bias else 0
        return layer.in_channels * r + r * kh + r * kw + r * layer.out_channels + bias

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        ranks = tuple(int(r) for r in ranks)
        memo = entry.store.setdefault("memo", {})
        if ranks not in memo:
            memo[ranks] = self._parafac(entry, ranks[0], settings)
        return memo[ranks]

    def _parafac(self, entry: LayerWeights, r: int, settings: FactorSettings) -> list[torch.Tensor]:
        import tensorly as tl
        from tensorly.decomposition import parafac

        w = entry.weight.numpy()
        with tl.backend_context("numpy"), warnings.catch_warnings():
            # tensorly's SVD initialization warns whenever r exceeds a mode's size; it then uses
            # the mode's size, which is what we want
            warnings.filterwarnings("ignore", "Trying to compute SVD with n_eigenvecs", UserWarning)
            cp = parafac(
                w,
                rank=r,
                init="svd",
                n_iter_max=settings.cp_iters,
                normalize_factors=True,
                random_state=settings.seed,
            )
        weights, (a, b, c, d) = cp.weights, cp.factors
        to = torch.from_numpy
        last = to(np.ascontiguousarray(a * weights[None, :]))[:, :, None, None]
        first = to(np.ascontiguousarray(b.T))[:, :, None, None]
        vertical = to(np.ascontiguousarray(c.T))[:, None, :, None]
        horizontal = to(np.ascontiguousarray(d.T))[:, None, None, :]
        return [first, vertical, horizontal, last]

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        if geometry["kind"] != "conv" or tuple(geometry["kernel"]) == (1, 1):
            raise DecompositionError(f"{self.name} factorizes k x k convolutions only; use svd")
        return CPConv(geometry, ranks, device=device)
