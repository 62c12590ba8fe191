"""Compression methods, by name: the registry behind ``--decomposition``.

Each method is one file implementing :class:`~rlrank.methods.base.CompressionMethod`; adding one is
a new file plus :func:`register_method` (and its tests: full-rank equivalence, MACs against
``FlopCounterMode``, save and reload). See ``ARCHITECTURE.md``.
"""

from __future__ import annotations

from rlrank.methods.base import (
    GEOMETRY_KEYS,
    CompressionMethod,
    DecompositionError,
    FactorizedLayer,
    FactorSettings,
    LayerSpectrum,
    LayerWeights,
)
from rlrank.methods.cp import CP, CPConv
from rlrank.methods.prune import ChannelPruning, PrunedLayer
from rlrank.methods.sparse_residual import SparseResidualLayer
from rlrank.methods.svd import SVD, SVDConv, SVDLinear
from rlrank.methods.tr import TR, TRConv
from rlrank.methods.tt import TT, TTConv
from rlrank.methods.tucker2 import Tucker2, Tucker2Conv

_REGISTRY: dict[str, CompressionMethod] = {}

POINTWISE_METHOD = "svd"
"""The method of every 1x1 convolution and linear layer when ``--decomposition`` names a method that is
not :attr:`~rlrank.methods.base.CompressionMethod.pointwise` (tucker2, cp)."""


def register_method(method: CompressionMethod) -> CompressionMethod:
    """Make ``method`` available as ``--decomposition method.name``."""
    _REGISTRY[method.name] = method
    return method


def list_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> CompressionMethod:
    """The registered method ``name``.

    Raises:
        DecompositionError: Unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DecompositionError(
            f"unknown decomposition {name!r}; known: {', '.join(list_methods())}"
        ) from None


for _method in (Tucker2(), SVD(), CP(), TT(), TR(), ChannelPruning()):
    register_method(_method)

__all__ = [
    "CP",
    "GEOMETRY_KEYS",
    "POINTWISE_METHOD",
    "SVD",
    "CPConv",
    "ChannelPruning",
    "CompressionMethod",
    "DecompositionError",
    "FactorSettings",
    "FactorizedLayer",
    "LayerSpectrum",
    "LayerWeights",
    "PrunedLayer",
    "SVDConv",
    "SVDLinear",
    "SparseResidualLayer",
    "TR",
    "TRConv",
    "TT",
    "TTConv",
    "Tucker2",
    "Tucker2Conv",
    "get_method",
    "list_methods",
    "register_method",
]
