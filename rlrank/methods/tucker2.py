"""Tucker-2: a k x k convolution as 1x1 ``in -> r_in``, k x k core ``r_in -> r_out``, 1x1 ``r_out -> out``.

The layer's stride, padding and dilation sit on the core, its bias on the last factor. A rank ratio
scales both ranks (``r_out = ratio * out``, ``r_in = ratio * in``, each capped by the rank of its
unfolding). The factors are the leading left singular vectors of the mode-0 (output) and mode-1
(input) unfoldings, computed once per layer, and since they are orthonormal the truncated core is a
slice of the full core, also computed once (truncated HOSVD). With ``hooi_iters > 0`` a few HOOI
sweeps (tensorly's ``partial_tucker``) refine each truncation, memoized per ranks; with
``--data-aware`` the output factor comes from the layer's output covariance instead.
"""

from __future__ import annotations

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
    conv_geometry,
    spatial_conv2d,
)


class Tucker2Conv(FactorizedLayer):
    """1x1 ``in -> r_in``, k x k core ``r_in -> r_out`` (stride, padding, dilation), 1x1 ``r_out -> out`` (bias)."""

    method = "tucker2"

    def __init__(
        self, conv: Geometry, ranks: tuple[int, int], device: torch.device | str | None = None
    ) -> None:
        r_out, r_in = ranks
        super().__init__(
            OrderedDict(
                first=conv2d(conv["in_channels"], r_in, (1, 1), device=device),
                core=spatial_conv2d(r_in, r_out, conv, device=device),
                last=conv2d(r_out, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> Geometry:
        return conv_geometry(
            self.core, self.first.in_channels, self.last.out_channels, self.last.bias is not None
        )

    def effective_weight(self) -> torch.Tensor:
        return torch.einsum(
            "or,rskl,si->oikl", self.last.weight[:, :, 0, 0], self.core.weight, self.first.weight[:, :, 0, 0]
        )


class Tucker2(CompressionMethod):
    """Tucker-2 (truncated HOSVD of the two channel modes, optionally refined by HOOI)."""

    name = "tucker2"
    data_aware = True

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        kh, kw = layer.kernel
        return (  # the ranks of the mode-0 and mode-1 unfoldings
            min(layer.out_channels, layer.in_channels * kh * kw),
            min(layer.in_channels, layer.out_channels * kh * kw),
        )

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        r_out, r_in = ranks
        hin, win = layer.in_hw
        hout, wout = layer.out_hw
        kh, kw = layer.kernel
        return (
            layer.in_channels * r_in * hin * win
            + r_in * r_out * kh * kw * hout * wout
            + r_out * layer.out_channels * hout * wout
        )

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        r_out, r_in = ranks
        kh, kw = layer.kernel
        bias = layer.out_channels if layer.bias else 0
        return layer.in_channels * r_in + r_in * r_out * kh * kw + r_out * layer.out_channels + bias

    def unfoldings(self, entry: LayerWeights) -> list[torch.Tensor]:
        w = entry.weight
        if w.dim() == 2:
            return [w]
        return [w.flatten(1), w.transpose(0, 1).flatten(1)]  # mode-0 (out) and mode-1 (in)

    def after_prepare(self, entry: LayerWeights, settings: FactorSettings) -> None:
        if entry.weight.dim() == 4:
            self._full_core(entry)

    def _full_core(self, entry: LayerWeights) -> torch.Tensor:
        """The core at full ranks, computed once per layer."""
        if "core" not in entry.store:
            (u_out, _, _), (u_in, _, _) = entry.store["svd"]
            u_out = entry.store.get("out_basis", u_out)
            entry.store["core"] = torch.einsum("oikl,or,is->rskl", entry.weight, u_out, u_in)
        return entry.store["core"]

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.check_ranks(entry.layer, ranks)
        if settings.hooi_iters > 0 and "out_basis" not in entry.store:
            memo = entry.store.setdefault("memo", {})
            if ranks not in memo:
                memo[ranks] = self._factors(entry, ranks, settings)
            return memo[ranks]
        return self._factors(entry, ranks, settings)

    def _factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.prepare(entry, settings)
        r_out, r_in = ranks
        (u_out, _, _), (u_in, _, _) = entry.store["svd"]
        u_out = entry.store.get("out_basis", u_out)
        u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
        w = entry.weight
        if settings.hooi_iters > 0 and "out_basis" not in entry.store:
            from tensorly.decomposition import partial_tucker

            init_core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
            (_, factors), _ = partial_tucker(
                w.numpy(),
                rank=[r_out, r_in],
                modes=[0, 1],
                n_iter_max=settings.hooi_iters,
                init=(init_core.numpy(), [u_out.numpy().copy(), u_in.numpy().copy()]),
                tol=0,
            )
            u_out, u_in = (
                torch.from_numpy(np.ascontiguousarray(factors[0])),
                torch.from_numpy(np.ascontiguousarray(factors[1])),
            )
            core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
        else:
            # the factors are orthonormal: the truncated core is a slice of the full one
            core = self._full_core(entry)[:r_out, :r_in]
        return [
            u_in.T.contiguous()[:, :, None, None],
            core.contiguous(),
            u_out.contiguous()[:, :, None, None],
        ]

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        if geometry["kind"] != "conv" or tuple(geometry["kernel"]) == (1, 1):
            raise DecompositionError(f"{self.name} factorizes k x k convolutions only; use svd")
        return Tucker2Conv(geometry, ranks, device=device)
