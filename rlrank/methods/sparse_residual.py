"""Sparse + low-rank layers (``--sparse F``): ``W ~ L + S``, ``S`` a few whole output filters of ``W``.

A factorized layer may keep, besides its low-rank factors ``L``, a structured sparse residual ``S``:
``k`` whole output filters (rows of the dense kernel) that the low-rank part approximates worst. The
:class:`SparseResidualLayer` runs the low-rank layer and a small dense convolution ``in -> k`` (the
layer's kernel, stride, padding and dilation, no bias; a linear map for a linear layer) and adds the
latter's outputs into the ``k`` output channels named by its ``filter_index`` buffer. Its effective
weight is ``L``'s with ``S`` added into those rows, so a later stage, the model file and the FLOP
count see it as any factorized layer.

What is priced here from the dense geometry (:class:`~rlrank.layers.LayerInfo`) alone: one filter's
MACs and parameters, and how many filters a sparse budget buys (:func:`filters_within`); the planner
(:mod:`rlrank.planning`) decides the budget. Which filters, given a weight and its low-rank part:
:func:`top_filters` (largest Frobenius norm of the residual ``W - L``), and :func:`scatter_filters`
for ``S`` as a dense tensor.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from rlrank.layers import LayerInfo
from rlrank.methods.base import FactorizedLayer, Geometry, spatial_conv2d

MAX_SPARSE = 0.9
"""``--sparse F`` takes F in [0, MAX_SPARSE): the low-rank part always keeps some of the budget."""


def filter_macs(layer: LayerInfo) -> int:
    """MACs of one output filter of ``layer``'s dense kernel (the dense MACs over the output channels)."""
    return layer.macs // layer.out_channels


def filter_params(layer: LayerInfo) -> int:
    """Parameters of one output filter of ``layer``'s dense kernel (no bias: the low-rank part has it)."""
    return layer.in_channels // layer.groups * layer.kernel[0] * layer.kernel[1]


def filters_within(layer: LayerInfo, macs: float) -> int:
    """The most whole filters of ``layer`` that cost at most ``macs`` (never more than it has)."""
    return max(0, min(layer.out_channels, math.floor(macs / filter_macs(layer))))


def top_filters(residual: torch.Tensor, filters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``filters`` output filters of ``residual`` with the largest Frobenius norm.

    Args:
        residual: A dense weight ``(out, in[, kh, kw])``, typically ``W - L``.
        filters: How many to keep (0 .. out).

    Returns:
        Their indices (ascending, ``long``) and their weights ``(filters, in[, kh, kw])``.
    """
    norms = residual.flatten(1).norm(dim=1)
    index = torch.topk(norms, filters).indices.sort().values
    return index, residual[index]


def scatter_filters(shape: torch.Size, index: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """``S`` as a dense weight of ``shape``: ``filters`` at the rows ``index``, zeros elsewhere."""
    return filters.new_zeros(shape).index_add(0, index.to(filters.device), filters)


class SparseResidualLayer(FactorizedLayer):
    """``low_rank(x)``, plus ``sparse(x)`` added into the output channels ``filter_index``.

    Children: ``low_rank`` (a :class:`FactorizedLayer`; it holds the bias) and ``sparse`` (an
    ``nn.Conv2d`` ``in -> k`` of the layer's kernel, stride, padding and dilation, or an
    ``nn.Linear`` ``in -> k``, no bias). ``method`` and ``ranks`` are the low-rank part's, so the
    planner and the factor cache treat the layer as that factorization; :attr:`filters` is ``k``.

    Args:
        low_rank: The low-rank part.
        filters: ``k``, the number of whole output filters kept dense.
        device: Where to create the sparse part and the index.
    """

    def __init__(
        self, low_rank: FactorizedLayer, filters: int, device: torch.device | str | None = None
    ) -> None:
        geometry = low_rank.dense_geometry()
        if not 1 <= filters <= geometry["out_channels"]:
            raise ValueError(f"filters must be in 1..{geometry['out_channels']}, got {filters}")
        if geometry["kind"] == "linear":
            sparse: nn.Module = nn.Linear(geometry["in_channels"], filters, bias=False, device=device)
        else:
            sparse = spatial_conv2d(geometry["in_channels"], filters, geometry, device=device)
        super().__init__(OrderedDict(low_rank=low_rank, sparse=sparse), low_rank.ranks)
        self.method = low_rank.method
        self.geometry = dict(geometry)
        self.register_buffer("filter_index", torch.arange(filters, device=device))

    @property
    def filters(self) -> int:
        """``k``: how many whole output filters the sparse part holds."""
        return int(self.filter_index.numel())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, filters={self.filters}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low_rank(x).index_add(1, self.filter_index, self.sparse(x))

    def dense_geometry(self) -> Geometry:
        return dict(self.geometry)

    def effective_weight(self) -> torch.Tensor:
        dense = self.low_rank.effective_weight()
        return dense.index_add(
            0, self.filter_index, self.sparse.weight.reshape(self.filters, *dense.shape[1:])
        )

    def effective_bias(self) -> torch.Tensor | None:
        return self.low_rank.effective_bias()


def with_sparse_residual(
    low_rank: FactorizedLayer, index: torch.Tensor, filters: torch.Tensor
) -> SparseResidualLayer:
    """A :class:`SparseResidualLayer` of ``low_rank`` whose sparse part is ``filters`` at rows ``index``."""
    param = next(low_rank.parameters())
    layer = SparseResidualLayer(low_rank, int(index.numel()), device=param.device).to(param.dtype)
    with torch.no_grad():
        layer.sparse.weight.copy_(filters.reshape(layer.sparse.weight.shape))
        layer.filter_index.copy_(index)
    return layer
