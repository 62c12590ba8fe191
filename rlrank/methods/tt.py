"""Tensor train (TT): a convolution or a linear layer as a chain of small cores (Garipov et al., 2016).

The kernel is reshaped into the tensor ``(n_1..n_d, kh*kw, m_1..m_e)`` of
:mod:`rlrank.methods.tensor_network` (input channels factored into ``d`` modes, the kernel
positions into one, output channels into ``e``; a prime channel count is a single mode) and
factorized as a tensor train with ranks ``r_1 .. r_{d+e}`` (boundary ranks 1). The layer runs as
``d`` 1x1 convolutions over the input channel modes, one k x k convolution ``r_d -> r_{d+1}`` (the
layer's stride, padding and dilation) and ``e`` 1x1 convolutions building the output channels (the
last with the bias); e.g. a 64 -> 64 3x3 convolution (modes ``8, 8 | 9 | 8, 8``) becomes a 1x1
``8 -> r_1`` on each of 8 channel groups, a 1x1 ``8 r_1 -> r_2``, a 3x3 ``r_2 -> r_3``, a 1x1
``r_3 -> 8 r_4`` and a 1x1 ``r_4 -> 8`` on each of 8 groups (the groups share their weight).
MACs and parameters: :func:`~rlrank.methods.tensor_network.chain_macs` and ``chain_params`` with
ring rank 1, e.g. ``HW_in (64 r_1 + 8 r_1 r_2) + HW_out (9 r_2 r_3 + 8 r_3 r_4 + 64 r_4)``.
The method is ``pointwise``: a 1x1 convolution is the same chain with a spatial mode of size 1 (a
1x1 ``core``), and a linear layer ``(out, in)`` the chain of the kernel ``(out, in, 1, 1)`` run on a
1 x 1 map (``HW_in = HW_out = 1``; :class:`TTConv` with ``linear`` set reshapes its input and output).

Ratio 1 is the ranks of the sequential unfoldings, ``r_k = min(n_1..n_k, n_{k+1}..n_D)``, at which
TT-SVD reproduces the kernel exactly (a factorized layer at ratio 1 costs more than the dense one,
so the planner never builds it). Truncating a full TT-SVD is not the TT-SVD of the lower ranks, so
the factors are a fresh TT-SVD per ranks (sequential SVDs of small unfoldings; the first
unfolding's SVD is computed once per layer and reused), memoized per ranks in a small LRU.
:meth:`spectra` gives the singular values of the sequential unfoldings, whose sizes are the full
ranks. Not data-aware.
"""

from __future__ import annotations

import torch

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    CompressionMethod,
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
    train_full_ranks,
    unfoldings,
)


class TTConv(TensorNetworkConv):
    """A tensor-train convolution (or linear layer): :class:`TensorNetworkConv` with ring rank 1,
    ``ranks = r_1 .. r_{d+e}``."""

    method = "tt"

    def __init__(
        self, conv: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> None:
        super().__init__(conv, 1, tuple(ranks), ranks, device=device)


class TT(CompressionMethod):
    """Tensor-train decomposition of the reshaped kernel (TT-SVD per ranks); also for 1x1 convs and linear layers."""

    name = "tt"
    pointwise = True

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        ins, spatial, outs = mode_sizes(layer)
        return train_full_ranks((*ins, spatial, *outs))

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        return chain_macs(layer, 1, ranks)

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        return chain_params(layer, 1, ranks)

    def unfoldings(self, entry: LayerWeights) -> list[torch.Tensor]:
        return unfoldings(kernel_tensor(entry.weight, entry.layer))

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.check_ranks(entry.layer, ranks)
        self.prepare(entry, settings)

        def compute() -> list[torch.Tensor]:
            tensor = kernel_tensor(entry.weight, entry.layer)
            chain = tensor.reshape(1, *tensor.shape, 1)
            cores = svd_sweep(chain, ranks, first=entry.store["svd"][0])
            return cores_to_weights(cores, len(mode_sizes(entry.layer)[0]), entry.layer.kernel)

        return memoized(entry.store, tuple(ranks), compute)

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        return TTConv(geometry, ranks, device=device)
