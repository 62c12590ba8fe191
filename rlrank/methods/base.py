"""The interface one compression method implements, and what every method shares.

A :class:`CompressionMethod` answers four questions about a layer, given its
:class:`~rlrank.layers.LayerInfo`:

* what ranks stand for rank ratio 1 (:meth:`~CompressionMethod.full_ranks`);
* what the replaced layer costs at given ranks (:meth:`~CompressionMethod.macs`,
  :meth:`~CompressionMethod.params`), priced from the dense geometry before anything is built;
* how its factors are computed once and truncated for any ranks (:meth:`~CompressionMethod.prepare`,
  :meth:`~CompressionMethod.factors`, on a :class:`LayerWeights` kept by the factor cache);
* which module replaces the layer (:meth:`~CompressionMethod.module`, a :class:`FactorizedLayer`
  whose children take the factors in order).

Methods register by name in :mod:`rlrank.methods`; ``--decomposition NAME`` picks one for the k x k
convolutions, and for the 1x1 convolutions and linear layers when the method is
:attr:`~CompressionMethod.pointwise` (else these use ``svd``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rlrank.errors import UserError
from rlrank.layers import LayerInfo

Geometry = dict[str, Any]
"""The dense geometry of a layer: ``kind``, ``in_channels``, ``out_channels``, ``kernel``,
``stride``, ``padding``, ``dilation`` and ``bias`` (the fields :class:`LayerInfo` shares)."""

GEOMETRY_KEYS = ("kind", "in_channels", "out_channels", "kernel", "stride", "padding", "dilation", "bias")


def conv_geometry(spatial: nn.Conv2d, in_channels: int, out_channels: int, bias: bool) -> Geometry:
    """The geometry of a convolution ``in_channels -> out_channels`` whose kernel, stride, padding and
    dilation are those of ``spatial`` (the layer itself, or the factor that carries them)."""
    return dict(
        kind="conv",
        in_channels=in_channels,
        out_channels=out_channels,
        kernel=tuple(spatial.kernel_size),
        stride=tuple(spatial.stride),
        padding=tuple(spatial.padding),
        dilation=tuple(spatial.dilation),
        bias=bias,
    )


def linear_geometry(in_features: int, out_features: int, bias: bool) -> Geometry:
    """The geometry of a linear layer (a 1 x 1 "kernel" on a 1 x 1 map)."""
    return dict(
        kind="linear",
        in_channels=in_features,
        out_channels=out_features,
        kernel=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        bias=bias,
    )


class DecompositionError(UserError):
    """A bad ratio, rank, decomposition name or layer."""


def conv2d(
    cin: int,
    cout: int,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = False,
    device: torch.device | str | None = None,
) -> nn.Conv2d:
    """An ``nn.Conv2d`` with the factor layers' defaults (no bias)."""
    return nn.Conv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        device=device,
    )


def spatial_conv2d(
    cin: int, cout: int, geometry: Geometry, device: torch.device | str | None = None
) -> nn.Conv2d:
    """The factor that carries a layer's kernel, stride, padding and dilation (no bias)."""
    return conv2d(
        cin,
        cout,
        geometry["kernel"],
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
        device=device,
    )


class FactorizedLayer(nn.Sequential):
    """Base of the factorized forms: a sequence of factor layers plus what it stands for."""

    method: str = ""

    def __init__(self, factors: OrderedDict[str, nn.Module], ranks: tuple[int, ...]) -> None:
        super().__init__(factors)
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"

    def dense_geometry(self) -> Geometry:
        """Kind, channels, kernel, stride, padding, dilation and bias of the dense layer it replaces."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this factorization computes (exactly, since the factors are linear)."""
        raise NotImplementedError

    def effective_bias(self) -> torch.Tensor | None:
        return self[-1].bias


@dataclass
class LayerSpectrum:
    """Singular values of one unfolding of a layer's weight, for rank selectors.

    Attributes:
        values: Singular values, descending.
        shape: ``(rows, cols)`` of the unfolded matrix.
    """

    values: np.ndarray
    shape: tuple[int, int]


@dataclass
class FactorSettings:
    """Options of the factor computations (shared by every layer of a cache).

    Attributes:
        hooi_iters: HOOI sweeps refining each Tucker-2 truncation (0: plain truncated HOSVD).
        cp_iters: ALS iterations of each CP factorization.
        seed: Seed of CP's initialization.
    """

    hooi_iters: int = 0
    cp_iters: int = 50
    seed: int = 0


@dataclass
class LayerWeights:
    """What the factor cache keeps of one layer, and where its method stores what it computed once.

    Attributes:
        layer: The layer's description.
        weight: Its effective dense weight (float64, CPU; a copy).
        bias: Its bias (float64, CPU), or ``None``.
        covariance: Covariance of its outputs on training data (data-aware factorization), or ``None``.
        input_gram: ``X^T X`` of its input patches on training data (channel pruning's selection and
            least-squares refit, :func:`rlrank.factor_cache.input_grams`), or ``None``.
        store: The method's own precomputations (SVDs, cores, memoized factors), filled by
            :meth:`CompressionMethod.prepare` and :meth:`CompressionMethod.factors`.
    """

    layer: LayerInfo
    weight: torch.Tensor
    bias: torch.Tensor | None
    covariance: torch.Tensor | None = None
    store: dict[str, Any] = field(default_factory=dict)
    input_gram: torch.Tensor | None = None


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin ``U, S, Vh`` of ``matrix``, computed on its tall orientation.

    LAPACK's SVD is several times slower on a wide matrix (such as the ``512 x 4608`` unfoldings of
    a 3x3 convolution with 512 channels) than on its transpose, and far slower still when the
    cores are shared.
    """
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


class CompressionMethod(ABC):
    """One way of replacing a conv / linear layer by a cheaper one, chosen by a rank ratio.

    Subclasses set :attr:`name` and implement the abstract methods; the default :meth:`prepare`
    computes (once per layer) the SVDs of :meth:`unfoldings`, which also serve the rank selectors
    through :meth:`spectra`.

    Attributes:
        name: The ``--decomposition`` name (and the ``method`` saved with a factorized layer).
        data_aware: Whether the method uses a layer's output covariance (``--data-aware``) to
            choose its output factor.
        pointwise: Whether the method also factorizes 1x1 convolutions and linear layers (tt, tr);
            with any other method these get ``svd``, whatever ``--decomposition`` says.
    """

    name: str = ""
    data_aware: bool = False
    pointwise: bool = False

    # ------------------------------------------------------------------ pricing

    @abstractmethod
    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        """The ranks that rank ratio 1 stands for."""

    @abstractmethod
    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        """MACs of ``layer`` replaced at ``ranks`` (one input)."""

    @abstractmethod
    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        """Parameters of ``layer`` replaced at ``ranks`` (bias included)."""

    def dense_macs(self, layer: LayerInfo) -> int:
        """MACs this method's plans of ``layer`` stand in for: the layer's own (channel pruning adds
        the producer whose output channels it removes, :attr:`LayerInfo.producer`)."""
        return layer.macs

    def dense_params(self, layer: LayerInfo) -> int:
        """Parameters this method's plans of ``layer`` stand in for (see :meth:`dense_macs`)."""
        return layer.params

    def can_compress(self, layer: LayerInfo) -> bool:
        """Whether this method applies to ``layer`` at all (pruning: only where it has a producer)."""
        return True

    # ------------------------------------------------------------------ factors

    def unfoldings(self, entry: LayerWeights) -> list[torch.Tensor]:
        """The matrices whose SVDs :meth:`prepare` computes: the weight flattened per output."""
        w = entry.weight
        return [w] if w.dim() == 2 else [w.flatten(1)]

    def prepare(self, entry: LayerWeights, settings: FactorSettings) -> None:
        """Compute, once per layer, what any truncation needs (by default the unfoldings' SVDs)."""
        if "svd" in entry.store:
            return
        entry.store["svd"] = [thin_svd(m) for m in self.unfoldings(entry)]
        if entry.covariance is not None and self.data_aware:
            _, vectors = torch.linalg.eigh(entry.covariance)
            rank = entry.store["svd"][0][0].shape[1]
            entry.store["out_basis"] = vectors.flip(-1)[:, :rank].contiguous()
        self.after_prepare(entry, settings)

    def after_prepare(self, entry: LayerWeights, settings: FactorSettings) -> None:  # noqa: B027 - optional hook
        """Further precomputation once the SVDs exist (e.g. Tucker-2's full core)."""

    def spectra(self, entry: LayerWeights, settings: FactorSettings) -> list[LayerSpectrum]:
        """Singular values of the layer's unfoldings, for the rank selectors."""
        self.prepare(entry, settings)
        return [
            LayerSpectrum(s.numpy().copy(), (int(m.shape[0]), int(m.shape[1])))
            for (_, s, _), m in zip(entry.store["svd"], self.unfoldings(entry), strict=True)
        ]

    @abstractmethod
    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        """Weights of the factor layers at ``ranks`` (float64, CPU), in the module's child order."""

    def finish(self, module: FactorizedLayer, entry: LayerWeights, ranks: tuple[int, ...]) -> None:  # noqa: B027 - optional hook
        """Give a built module at ``ranks`` what its factors do not carry (pruning: the kept channels)."""

    def check_ranks(self, layer: LayerInfo, ranks: tuple[int, ...]) -> None:
        """Raise :class:`DecompositionError` unless every rank lies in ``1..full``."""
        full = self.full_ranks(layer)
        if any(not 1 <= r <= f for r, f in zip(ranks, full, strict=True)):
            raise DecompositionError(f"ranks {ranks} out of range 1..{full} for layer {layer.name}")

    # ------------------------------------------------------------------ modules

    def apply(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Put ``module``, the built replacement of layer ``name``, into ``model``.

        The default replaces that one layer. A method that changes what the layer outputs (channel
        pruning removes output channels) overrides this to also adapt the layers that read it.
        """
        replace_module(model, name, module)

    def build_module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        """:meth:`module`, labelled with this method's name (what the model file records)."""
        module = self.module(geometry, ranks, device=device)
        module.method = self.name
        return module

    @abstractmethod
    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        """A module of the right shapes replacing a layer of ``geometry`` at ``ranks`` (weights unset).

        Raises:
            DecompositionError: The method does not apply to this kind of layer.
        """
