"""Tensor ring (TR): a convolution or a linear layer as a ring of small cores (Wang et al., 2018; Zhao et al., 2016).

The kernel tensor and the layer that runs it are those of the tensor train
(:mod:`rlrank.methods.tensor_network`, :mod:`rlrank.methods.tt`), with the chain closed into a
ring: the first and last cores share a ring rank ``r_0 = g``, and the kernel is the trace of the
core product. The ring index travels through the whole layer: the first 1x1 convolution produces
``g * r_1`` channels per group, every later factor runs once per ring slice (the k x k core is a
grouped convolution of ``g`` groups sharing one weight), and the last 1x1 convolution contracts
``(g, R)`` into the output channels. MACs and parameters:
:func:`~rlrank.methods.tensor_network.chain_macs` and ``chain_params`` with ring rank ``g``, so
every factor but the first and the last costs ``g`` times its tensor-train counterpart; ranks are
``(r_0, r_1, .., r_{d+e})``. Like TT, the method is ``pointwise``: 1x1 convolutions and linear
layers (the kernel ``(out, in, 1, 1)`` on a 1 x 1 map) run as the same ring with a 1x1 ``core``.

Factors: TR-SVD (Zhao et al., 2016): the first unfolding ``n_1 x rest`` is cut at rank
``r_0 * r_1`` and its left factor split into the first core ``(r_0, n_1, r_1)``; the rest, with the
ring index moved last, is a TT-SVD. Ratio 1 is exact: with ``q = min(n_1, rest)`` (the first
unfolding's rank), ``r_0 = ceil(sqrt(q))``, ``r_1 = q`` and ``r_k = min(r_{k-1} n_k,
r_0 n_{k+1}..n_D)`` (bounds on the ranks of the sweep's unfoldings). ``r_1 = q`` rather than
``q / r_0`` keeps the first bond as wide as a tensor train's when the ratio shrinks both ``r_0`` and
``r_1``; where ``r_0 r_1 > q`` the slices beyond ``q`` are zero. The first unfolding's SVD is computed once per
layer; every other ranks vector gets its own sweep (TR-SVD is not nested across ranks), memoized
per ranks in a small LRU. No ALS refinement: at lower ranks TR-SVD is quasi-optimal only, as TT-SVD.
:meth:`spectra` gives the singular values of the sequential unfoldings, as for TT. Not data-aware.
"""

from __future__ import annotations

import math

import torch

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    CompressionMethod,
    DecompositionError,
    FactorizedLayer,
    FactorSettings,
    Geometry,
    LayerWeights,
)
from rlrank.methods.tensor_network import (
    TensorNetworkConv,
    chain_macs,
    chain_params,
    cores_to_weights,
    kernel_tensor,
    memoized,
    mode_sizes,
    svd_sweep,
    truncate,
    unfoldings,
)


class TRConv(TensorNetworkConv):
    """A tensor-ring convolution (or linear layer): :class:`TensorNetworkConv` with
    ``ranks = (r_0, r_1, .., r_{d+e})``."""

    method = "tr"

    def __init__(
        self, conv: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> None:
        super().__init__(conv, *_split(ranks), ranks, device=device)


def ring_full_ranks(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """``(r_0, .., r_{D-1})`` at which TR-SVD of a tensor of ``sizes`` is exact (see the module docstring)."""
    q = min(sizes[0], math.prod(sizes[1:]))
    ring = math.isqrt(q - 1) + 1 if q > 1 else 1  # ceil(sqrt(q))
    ranks = [ring, q]
    for k in range(1, len(sizes) - 1):
        ranks.append(min(ranks[-1] * sizes[k], ring * math.prod(sizes[k + 1 :])))
    return tuple(ranks)


def ring_svd(
    tensor: torch.Tensor,
    ranks: tuple[int, ...],
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> list[torch.Tensor]:
    """TR-SVD of ``tensor`` (shape ``(n_1, .., n_D)``) at ``ranks = (r_0, .., r_{D-1})``.

    Args:
        tensor: The tensor.
        ranks: The ring rank and the bond ranks.
        first: The SVD of the first unfolding ``n_1 x (n_2 .. n_D)``.
    """
    ring, r1 = ranks[0], ranks[1]
    left, rest = truncate(first, ring * r1)
    head = left.reshape(tensor.shape[0], ring, r1).permute(1, 0, 2)
    rest = rest.reshape(ring, r1, -1).permute(1, 2, 0)  # (r_1, n_2 .. n_D, r_0)
    tail = svd_sweep(rest.reshape(r1, *tensor.shape[1:], ring), ranks[2:])
    return [head.contiguous(), *tail]


def _split(ranks: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """The ring rank and the bond ranks of ``ranks``."""
    if not ranks:
        raise DecompositionError("tr needs a ring rank and bond ranks, got no ranks")
    return ranks[0], tuple(ranks[1:])


class TR(CompressionMethod):
    """Tensor-ring decomposition of the reshaped kernel (TR-SVD per ranks); also for 1x1 convs and linear layers."""

    name = "tr"
    pointwise = True

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        ins, spatial, outs = mode_sizes(layer)
        return ring_full_ranks((*ins, spatial, *outs))

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        return chain_macs(layer, *_split(ranks))

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        return chain_params(layer, *_split(ranks))

    def unfoldings(self, entry: LayerWeights) -> list[torch.Tensor]:
        return unfoldings(kernel_tensor(entry.weight, entry.layer))

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.check_ranks(entry.layer, ranks)
        self.prepare(entry, settings)

        def compute() -> list[torch.Tensor]:
            cores = ring_svd(kernel_tensor(entry.weight, entry.layer), ranks, entry.store["svd"][0])
            return cores_to_weights(cores, len(mode_sizes(entry.layer)[0]), entry.layer.kernel)

        return memoized(entry.store, tuple(ranks), compute)

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        return TRConv(geometry, ranks, device=device)
