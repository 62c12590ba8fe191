"""Low-rank factorization of conv and linear layers, cached per layer, and model surgery.

Forms (all exact at full rank for SVD and Tucker-2; the layer's stride, padding, dilation sit on the
spatial factor and its bias on the last one):

* **Tucker-2** (k x k conv, default): 1x1 ``in -> r_in``, k x k core ``r_in -> r_out``, 1x1 ``r_out -> out``.
* **SVD**: k x k conv ``in -> r``, then 1x1 ``r -> out``; 1x1 convs and linear layers always use it.
* **CP**: 1x1 ``in -> r``, depthwise k x 1, depthwise 1 x k, 1x1 ``r -> out`` (tensorly's PARAFAC).

A *rank ratio* in (0, 1] picks integer ranks through :func:`ratio_to_ranks`, the one mapping used
everywhere. For Tucker-2 the ratio scales both ranks (``r_out = ratio * out``, ``r_in = ratio * in``),
for SVD the rank ``ratio * min(out, in * kh * kw)``; for CP, where no rank is "full", ratio 1 is the
rank at which the factorized layer costs as many MACs as the dense one. A ratio whose factorized form
costs at least as much as the dense layer leaves it dense.

The expensive part (the SVDs of each layer's unfoldings) is computed once per layer by
:class:`FactorCache`; factors for any ranks are then truncations of it (and, with
``hooi_iters > 0``, a few HOOI sweeps started from that truncation). CP has no nested structure, so
its factors are memoized per rank instead.

A layer that is already factorized (a later stage of multi-stage compression) stays compressible:
its factors are multiplied back into the effective kernel, which is factorized again at the lower
ranks, so the model keeps its depth (this equals MUSCO's re-factorization of the core with the new
1x1 factors folded into the old ones).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlrank.atomic import save_torch
from rlrank.flops import LayerInfo, conv_macs, factorized_macs, factorized_params
from rlrank.models import ModelSpec, build_model, load_state_into

logger = logging.getLogger(__name__)

DECOMPOSITIONS = ("tucker2", "svd", "cp")
MODEL_FORMAT = "rlrank-model/1"


class DecompositionError(ValueError):
    """A bad ratio, rank, decomposition name or layer."""


# --------------------------------------------------------------------------------------------
# Ratios and ranks
# --------------------------------------------------------------------------------------------


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float if it lies in (0, 1], else raise :class:`DecompositionError`."""
    if isinstance(ratio, (str, bytes, bool)):  # float() would accept "0.5" and True
        raise DecompositionError(f"rank ratio must be a number in (0, 1], got {ratio!r}")
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise DecompositionError(f"rank ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise DecompositionError(f"rank ratio must be in (0, 1], got {ratio!r}")
    return value


def ratio_to_ranks(ratio: float, full_ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Integer ranks for a rank ratio: ``round(ratio * full)`` per mode, at least 1, at most full.

    Args:
        ratio: Rank ratio in (0, 1].
        full_ranks: The ranks that ratio 1 stands for (see :func:`full_ranks`).

    Raises:
        DecompositionError: ``ratio`` outside (0, 1].
    """
    value = check_ratio(ratio)
    return tuple(max(1, min(f, math.floor(value * f + 0.5))) for f in full_ranks)


def check_decomposition(decomposition: str) -> str:
    if decomposition not in DECOMPOSITIONS:
        raise DecompositionError(
            f"unknown decomposition {decomposition!r}; known: {', '.join(DECOMPOSITIONS)}"
        )
    return decomposition


def method_for(layer: LayerInfo, decomposition: str) -> str:
    """The factorization a layer gets: its current one if factorized, SVD if pointwise."""
    check_decomposition(decomposition)
    if layer.method is not None:
        return layer.method
    return "svd" if layer.is_pointwise else decomposition


def _cp_unit_macs(layer: LayerInfo) -> int:
    return factorized_macs(layer, "cp", (1,))


def full_ranks(layer: LayerInfo, method: str) -> tuple[int, ...]:
    """The ranks that rank ratio 1 stands for."""
    kh, kw = layer.kernel
    if method == "tucker2":  # the ranks of the mode-0 and mode-1 unfoldings
        return (
            min(layer.out_channels, layer.in_channels * kh * kw),
            min(layer.in_channels, layer.out_channels * kh * kw),
        )
    if method == "svd":
        return (min(layer.out_channels, layer.in_channels * kh * kw),)
    if method == "cp":
        return (max(1, layer.macs // _cp_unit_macs(layer)),)
    raise DecompositionError(f"unknown decomposition {method!r}; known: {', '.join(DECOMPOSITIONS)}")


def current_ratio(layer: LayerInfo) -> float:
    """Rank ratio of a layer as it is now: 1 for dense, else its largest rank over full rank."""
    if layer.method is None or layer.ranks is None:
        return 1.0
    full = full_ranks(layer, layer.method)
    return min(1.0, max(r / f for r, f in zip(layer.ranks, full, strict=True)))


def is_compressible(layer: LayerInfo, decomposition: str) -> bool:
    """True when some rank makes the layer cheaper (grouped / depthwise convs never are here)."""
    if layer.groups != 1:
        return False
    if layer.method is not None:
        return any(r > 1 for r in layer.ranks or ())
    method = method_for(layer, decomposition)
    return factorized_macs(layer, method, tuple(1 for _ in full_ranks(layer, method))) < layer.macs


@dataclass(frozen=True)
class LayerPlan:
    """What a rank ratio does to one layer: its factorization (``None``: dense) and its cost."""

    name: str
    ratio: float
    method: str | None
    ranks: tuple[int, ...] | None
    macs: int
    params: int

    @property
    def dense(self) -> bool:
        return self.method is None


def plan_layer(layer: LayerInfo, ratio: float, decomposition: str, allow_dense: bool = True) -> LayerPlan:
    """Ranks and cost of ``layer`` at ``ratio``.

    A dense layer whose factorized form would not save MACs stays dense, or, with
    ``allow_dense=False`` (multi-stage compression, where every layer is factorized in the first
    stage so that later stages never add depth), gets the largest ranks that still save MACs.
    A factorized layer never grows back (its new ranks are at most its current ones).
    """
    method = method_for(layer, decomposition)
    ranks = ratio_to_ranks(ratio, full_ranks(layer, method))
    if layer.ranks is not None:
        ranks = tuple(min(r, c) for r, c in zip(ranks, layer.ranks, strict=True))
    macs = factorized_macs(layer, method, ranks)
    if layer.method is None and macs >= layer.macs:
        if allow_dense or not is_compressible(layer, decomposition):
            return LayerPlan(layer.name, ratio, None, None, layer.macs, layer.params)
        ratio = max_ratio_within(layer, decomposition, layer.macs - 1, min(ratio, 1e-6), ratio)
        return plan_layer(layer, ratio, decomposition)
    return LayerPlan(layer.name, ratio, method, ranks, macs, factorized_params(layer, method, ranks))


def max_ratio_within(
    layer: LayerInfo, decomposition: str, max_macs: float, lo: float, hi: float, allow_dense: bool = True
) -> float:
    """Largest ratio in ``[lo, hi]`` whose plan costs at most ``max_macs`` (``lo`` if none does)."""

    def cost(ratio: float) -> int:
        return plan_layer(layer, ratio, decomposition, allow_dense).macs

    if cost(hi) <= max_macs:
        return hi
    if cost(lo) > max_macs:
        return lo
    for _ in range(40):  # MACs are non-decreasing in the ratio: bisect
        mid = 0.5 * (lo + hi)
        if cost(mid) <= max_macs:
            lo = mid
        else:
            hi = mid
    return lo


def min_ratio_reaching(
    layer: LayerInfo, decomposition: str, min_macs: float, lo: float, hi: float, allow_dense: bool = True
) -> float:
    """Smallest ratio in ``[lo, hi]`` whose plan costs at least ``min_macs`` (``hi`` if none does)."""

    def cost(ratio: float) -> int:
        return plan_layer(layer, ratio, decomposition, allow_dense).macs

    if cost(lo) >= min_macs:
        return lo
    if cost(hi) < min_macs:
        return hi
    for _ in range(40):  # MACs are non-decreasing in the ratio: bisect
        mid = 0.5 * (lo + hi)
        if cost(mid) >= min_macs:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------------------------
# Factorized modules
# --------------------------------------------------------------------------------------------


class FactorizedLayer(nn.Sequential):
    """Base of the factorized forms: a sequence of factor layers plus what it stands for."""

    method: str = ""

    def __init__(self, factors: OrderedDict[str, nn.Module], ranks: tuple[int, ...]) -> None:
        super().__init__(factors)
        self.ranks = tuple(int(r) for r in ranks)

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={self.ranks}"

    def dense_geometry(self) -> dict[str, Any]:
        """Kind, channels, kernel, stride, padding, dilation and bias of the dense layer it replaces."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """The dense weight this factorization computes (exactly, since the factors are linear)."""
        raise NotImplementedError

    def effective_bias(self) -> torch.Tensor | None:
        return self[-1].bias


def _conv(
    cin: int,
    cout: int,
    kernel: tuple[int, int],
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups=1,
    bias=False,
    device=None,
) -> nn.Conv2d:
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


class Tucker2Conv(FactorizedLayer):
    """1x1 ``in -> r_in``, k x k core ``r_in -> r_out`` (stride, padding, dilation), 1x1 ``r_out -> out`` (bias)."""

    method = "tucker2"

    def __init__(
        self, conv: dict[str, Any], ranks: tuple[int, int], device: torch.device | str | None = None
    ) -> None:
        r_out, r_in = ranks
        super().__init__(
            OrderedDict(
                first=_conv(conv["in_channels"], r_in, (1, 1), device=device),
                core=_conv(
                    r_in,
                    r_out,
                    conv["kernel"],
                    conv["stride"],
                    conv["padding"],
                    conv["dilation"],
                    device=device,
                ),
                last=_conv(r_out, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> dict[str, Any]:
        core = self.core
        return dict(
            kind="conv",
            in_channels=self.first.in_channels,
            out_channels=self.last.out_channels,
            kernel=tuple(core.kernel_size),
            stride=tuple(core.stride),
            padding=tuple(core.padding),
            dilation=tuple(core.dilation),
            bias=self.last.bias is not None,
        )

    def effective_weight(self) -> torch.Tensor:
        return torch.einsum(
            "or,rskl,si->oikl", self.last.weight[:, :, 0, 0], self.core.weight, self.first.weight[:, :, 0, 0]
        )


class SVDConv(FactorizedLayer):
    """k x k ``in -> r`` (stride, padding, dilation), then 1x1 ``r -> out`` (bias)."""

    method = "svd"

    def __init__(
        self, conv: dict[str, Any], ranks: tuple[int], device: torch.device | str | None = None
    ) -> None:
        (r,) = ranks
        super().__init__(
            OrderedDict(
                first=_conv(
                    conv["in_channels"],
                    r,
                    conv["kernel"],
                    conv["stride"],
                    conv["padding"],
                    conv["dilation"],
                    device=device,
                ),
                last=_conv(r, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> dict[str, Any]:
        first = self.first
        return dict(
            kind="conv",
            in_channels=first.in_channels,
            out_channels=self.last.out_channels,
            kernel=tuple(first.kernel_size),
            stride=tuple(first.stride),
            padding=tuple(first.padding),
            dilation=tuple(first.dilation),
            bias=self.last.bias is not None,
        )

    def effective_weight(self) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", self.last.weight[:, :, 0, 0], self.first.weight)


class CPConv(FactorizedLayer):
    """1x1 ``in -> r``, depthwise kh x 1, depthwise 1 x kw, 1x1 ``r -> out`` (bias)."""

    method = "cp"

    def __init__(
        self, conv: dict[str, Any], ranks: tuple[int], device: torch.device | str | None = None
    ) -> None:
        (r,) = ranks
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            conv["kernel"],
            conv["stride"],
            conv["padding"],
            conv["dilation"],
        )
        super().__init__(
            OrderedDict(
                first=_conv(conv["in_channels"], r, (1, 1), device=device),
                vertical=_conv(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, device=device),
                horizontal=_conv(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, device=device),
                last=_conv(r, conv["out_channels"], (1, 1), bias=conv["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> dict[str, Any]:
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


class SVDLinear(FactorizedLayer):
    """Linear ``in -> r`` (no bias), then linear ``r -> out`` (bias)."""

    method = "svd"

    def __init__(
        self, linear: dict[str, Any], ranks: tuple[int], device: torch.device | str | None = None
    ) -> None:
        (r,) = ranks
        super().__init__(
            OrderedDict(
                first=nn.Linear(linear["in_channels"], r, bias=False, device=device),
                last=nn.Linear(r, linear["out_channels"], bias=linear["bias"], device=device),
            ),
            ranks,
        )

    def dense_geometry(self) -> dict[str, Any]:
        return dict(
            kind="linear",
            in_channels=self.first.in_features,
            out_channels=self.last.out_features,
            kernel=(1, 1),
            stride=(1, 1),
            padding=(0, 0),
            dilation=(1, 1),
            bias=self.last.bias is not None,
        )

    def effective_weight(self) -> torch.Tensor:
        return self.last.weight @ self.first.weight


FORMS: dict[str, type[FactorizedLayer]] = {"tucker2": Tucker2Conv, "svd": SVDConv, "cp": CPConv}
"""Factorized forms of a k x k convolution, by decomposition name."""


def _geometry(module: nn.Module) -> dict[str, Any]:
    """Dense geometry of a conv, linear or factorized module."""
    if isinstance(module, FactorizedLayer):
        return module.dense_geometry()
    if isinstance(module, nn.Conv2d):
        return dict(
            kind="conv",
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
            bias=module.bias is not None,
        )
    if isinstance(module, nn.Linear):
        return dict(
            kind="linear",
            in_channels=module.in_features,
            out_channels=module.out_features,
            kernel=(1, 1),
            stride=(1, 1),
            padding=(0, 0),
            dilation=(1, 1),
            bias=module.bias is not None,
        )
    raise DecompositionError(f"cannot factorize a {type(module).__name__}")


def empty_factorized(module: nn.Module, method: str, ranks: tuple[int, ...]) -> FactorizedLayer:
    """A factorized module of the right shapes for ``module`` (weights still to be set)."""
    geometry = _geometry(module)
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise DecompositionError("grouped and depthwise convolutions are left dense")
    if geometry["kind"] == "linear":
        if method != "svd":
            raise DecompositionError(f"linear layers are factorized by svd, not {method!r}")
        return SVDLinear(geometry, ranks)
    if geometry["kernel"] == (1, 1) and method != "svd":
        raise DecompositionError(f"1x1 convolutions are factorized by svd, not {method!r}")
    if method not in FORMS:
        raise DecompositionError(f"unknown decomposition {method!r}; known: {', '.join(DECOMPOSITIONS)}")
    return FORMS[method](geometry, ranks)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """Dense weight of a conv, linear or factorized module."""
    if isinstance(module, FactorizedLayer):
        return module.effective_weight()
    return module.weight


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, FactorizedLayer):
        return module.effective_bias()
    return module.bias


# --------------------------------------------------------------------------------------------
# Describing a model's layers
# --------------------------------------------------------------------------------------------


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Conv, linear and factorized modules, the factors inside factorized ones excluded."""
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, FactorizedLayer):
            found[name] = module
            inside.append(name)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            found[name] = module
    return found


@torch.no_grad()
def describe_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Describe every conv / linear (or factorized) layer of ``model`` in forward order.

    Args:
        model: The model; it is run once on a zero input of ``input_shape``.
        input_shape: ``(channels, height, width)`` of one input.
    """
    modules = _layer_modules(model)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    order: list[str] = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if name not in shapes:
                shapes[name] = (tuple(inputs[0].shape), tuple(output.shape))
                order.append(name)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    layers = []
    for name in order:
        module = modules[name]
        geometry = _geometry(module)
        in_shape, out_shape = shapes[name]
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        if geometry["kind"] == "conv":
            in_hw, out_hw = tuple(in_shape[-2:]), tuple(out_shape[-2:])
            macs = conv_macs(
                geometry["in_channels"], geometry["out_channels"], geometry["kernel"], groups, out_hw
            )
        else:
            in_hw = out_hw = (1, 1)
            macs = geometry["in_channels"] * geometry["out_channels"]
        kh, kw = geometry["kernel"]
        params = geometry["out_channels"] * (geometry["in_channels"] // groups) * kh * kw
        params += geometry["out_channels"] if geometry["bias"] else 0
        factorized = isinstance(module, FactorizedLayer)
        layers.append(
            LayerInfo(
                name=name,
                groups=groups,
                in_hw=in_hw,
                out_hw=out_hw,
                macs=macs,
                params=params,
                method=module.method if factorized else None,
                ranks=module.ranks if factorized else None,
                **geometry,
            )
        )
    return layers


# --------------------------------------------------------------------------------------------
# The factor cache
# --------------------------------------------------------------------------------------------


@dataclass
class LayerSpectrum:
    """Singular values of one unfolding of a layer's weight, for rank selectors.

    Attributes:
        values: Singular values, descending.
        shape: ``(rows, cols)`` of the unfolded matrix.
    """

    values: np.ndarray
    shape: tuple[int, int]


def _thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class FactorCache:
    """Factorizations of a model's layers, computed once and truncated for any ranks.

    Args:
        model: The model whose layers are factorized (its weights are copied; later changes to the
            model do not reach the cache).
        layers: The layers to cache (normally the compressible ones of :func:`describe_layers`).
        decomposition: ``tucker2``, ``svd`` or ``cp`` for k x k convolutions.
        hooi_iters: HOOI sweeps refining each Tucker-2 truncation (0: plain truncated HOSVD).
        cp_iters: ALS iterations of each CP factorization.
        seed: Seed of CP's initialization.
        output_covariances: Data-aware factorization: per layer, the covariance of its outputs on
            training data (:func:`output_covariances`). For SVD and Tucker-2 the output factor is
            then the leading eigenvectors of that covariance rather than of the weights, which
            keeps the directions the layer's responses actually use (Zhang et al., 2016); the rest
            of the factorization is fitted to the weights. HOOI is skipped for those layers.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[LayerInfo],
        decomposition: str = "tucker2",
        hooi_iters: int = 0,
        cp_iters: int = 50,
        seed: int = 0,
        output_covariances: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.decomposition = check_decomposition(decomposition)
        self.hooi_iters = hooi_iters
        self.cp_iters = cp_iters
        self.seed = seed
        self.layers = {layer.name: layer for layer in layers}
        self._weights: dict[str, torch.Tensor] = {}
        self._bias: dict[str, torch.Tensor | None] = {}
        with torch.no_grad():
            for name in self.layers:
                module = model.get_submodule(name)
                self._weights[name] = effective_weight(module).detach().to("cpu", torch.float64).clone()
                bias = effective_bias(module)
                self._bias[name] = None if bias is None else bias.detach().to("cpu", torch.float64).clone()
        self._svd: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._memo: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = {}
        self._cores: dict[str, torch.Tensor] = {}
        self._covariances = {k: v.to("cpu", torch.float64) for k, v in (output_covariances or {}).items()}
        self._out_basis: dict[str, torch.Tensor] = {}

    def method(self, name: str) -> str:
        return method_for(self.layers[name], self.decomposition)

    def _unfoldings(self, name: str) -> list[torch.Tensor]:
        w = self._weights[name]
        if w.dim() == 2:  # linear
            return [w]
        if self.method(name) == "tucker2":
            return [w.flatten(1), w.transpose(0, 1).flatten(1)]  # mode-0 (out) and mode-1 (in)
        return [w.flatten(1)]

    def prepare(self, name: str) -> None:
        """Compute (once) the SVDs of a layer's unfoldings."""
        if name not in self._svd:
            self._svd[name] = [_thin_svd(m) for m in self._unfoldings(name)]
            if name in self._covariances and self.method(name) in ("svd", "tucker2"):
                values, vectors = torch.linalg.eigh(self._covariances[name])
                rank = self._svd[name][0][0].shape[1]
                self._out_basis[name] = vectors.flip(-1)[:, :rank].contiguous()
            if self.method(name) == "tucker2" and self._weights[name].dim() == 4:
                self._full_core(name)

    def prepare_all(self, progress: bool = False) -> None:
        """Factorize every cached layer now (otherwise each is done on first use)."""
        from tqdm.auto import tqdm

        for name in tqdm(
            self.layers, desc="factorizing layers", unit="layer", disable=not progress, leave=False
        ):
            self.prepare(name)

    def spectra(self, name: str) -> list[LayerSpectrum]:
        """Singular values of the layer's unfoldings (Tucker-2: output then input mode)."""
        self.prepare(name)
        unfoldings = self._unfoldings(name)
        return [
            LayerSpectrum(s.numpy().copy(), (int(m.shape[0]), int(m.shape[1])))
            for (_, s, _), m in zip(self._svd[name], unfoldings, strict=True)
        ]

    def factors(self, name: str, ranks: tuple[int, ...]) -> list[torch.Tensor]:
        """Weights of the factor layers of ``name`` at ``ranks`` (float64, CPU)."""
        method = self.method(name)
        ranks = tuple(int(r) for r in ranks)
        full = full_ranks(self.layers[name], method)
        if method != "cp" and any(not 1 <= r <= f for r, f in zip(ranks, full, strict=True)):
            raise DecompositionError(f"ranks {ranks} out of range 1..{full} for layer {name}")
        if method == "cp" or (method == "tucker2" and self.hooi_iters > 0 and name not in self._out_basis):
            key = (name, ranks)
            if key not in self._memo:
                self._memo[key] = self._cp(name, ranks[0]) if method == "cp" else self._tucker2(name, ranks)
            return self._memo[key]
        return self._tucker2(name, ranks) if method == "tucker2" else self._svd_factors(name, ranks[0])

    def _svd_factors(self, name: str, r: int) -> list[torch.Tensor]:
        self.prepare(name)
        ((u, s, vh),) = self._svd[name]
        w = self._weights[name]
        if name in self._out_basis:  # data-aware: project the outputs onto their principal subspace
            last = self._out_basis[name][:, :r]
            first = last.T @ w.flatten(1)
        else:
            root = s[:r].sqrt()
            first = root[:, None] * vh[:r]
            last = u[:, :r] * root[None, :]
        if w.dim() == 4:
            first = first.reshape(r, *w.shape[1:])
            last = last[:, :, None, None]
        return [first, last]

    def _tucker2(self, name: str, ranks: tuple[int, ...]) -> list[torch.Tensor]:
        self.prepare(name)
        r_out, r_in = ranks
        (u_out, _, _), (u_in, _, _) = self._svd[name]
        u_out = self._out_basis.get(name, u_out)
        u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
        w = self._weights[name]
        if self.hooi_iters > 0 and name not in self._out_basis:
            from tensorly.decomposition import partial_tucker

            init_core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
            (_, factors), _ = partial_tucker(
                w.numpy(),
                rank=[r_out, r_in],
                modes=[0, 1],
                n_iter_max=self.hooi_iters,
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
            core = self._full_core(name)[:r_out, :r_in]
        return [
            u_in.T.contiguous()[:, :, None, None],
            core.contiguous(),
            u_out.contiguous()[:, :, None, None],
        ]

    def _full_core(self, name: str) -> torch.Tensor:
        """The Tucker-2 core at full ranks, computed once per layer."""
        if name not in self._cores:
            (u_out, _, _), (u_in, _, _) = self._svd[name]
            u_out = self._out_basis.get(name, u_out)
            self._cores[name] = torch.einsum("oikl,or,is->rskl", self._weights[name], u_out, u_in)
        return self._cores[name]

    def _cp(self, name: str, r: int) -> list[torch.Tensor]:
        import tensorly as tl
        from tensorly.decomposition import parafac

        w = self._weights[name].numpy()
        with tl.backend_context("numpy"):
            cp = parafac(
                w,
                rank=r,
                init="svd",
                n_iter_max=self.cp_iters,
                normalize_factors=True,
                random_state=self.seed,
            )
        weights, (a, b, c, d) = cp.weights, cp.factors
        to = torch.from_numpy
        last = to(np.ascontiguousarray(a * weights[None, :]))[:, :, None, None]
        first = to(np.ascontiguousarray(b.T))[:, :, None, None]
        vertical = to(np.ascontiguousarray(c.T))[:, None, :, None]
        horizontal = to(np.ascontiguousarray(d.T))[:, None, None, :]
        return [first, vertical, horizontal, last]

    def build(
        self,
        name: str,
        ranks: tuple[int, ...],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FactorizedLayer:
        """A factorized module for layer ``name`` at ``ranks``, weights from the cache."""
        layer = self.layers[name]
        geometry = {
            k: getattr(layer, k)
            for k in (
                "kind",
                "in_channels",
                "out_channels",
                "kernel",
                "stride",
                "padding",
                "dilation",
                "bias",
            )
        }
        form = SVDLinear if layer.kind == "linear" else FORMS[self.method(name)]
        if layer.params > 16384:  # skip the random initialization of large factors: they are overwritten
            module = form(geometry, ranks, device="meta").to_empty(device=device).to(dtype=dtype)
        else:  # (for small ones, plain construction is cheaper than the meta device)
            module = form(geometry, ranks).to(device=device, dtype=dtype)
        factors = self.factors(name, ranks)
        with torch.no_grad():
            for child, weight in zip(module.children(), factors, strict=True):
                child.weight.copy_(weight)
            bias = self._bias[name]
            if bias is not None:
                module[-1].bias.copy_(bias)
        return module


@torch.no_grad()
def output_covariances(
    model: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Uncentered covariance ``E[y y^T]`` of each named layer's outputs (bias removed), per channel.

    Args:
        model: The model (dense or factorized layers alike); run in eval mode.
        names: Layers to observe.
        batches: Input batches (normalized images), e.g. a few training batches.

    Returns:
        ``{name: (out, out) float64 tensor}``, averaged over every output position seen.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            bias = effective_bias(module)
            y = output.detach().double()
            if output.dim() == 4:
                if bias is not None:
                    y = y - bias.double().view(1, -1, 1, 1)
                y = y.transpose(0, 1).flatten(1)
            else:
                if bias is not None:
                    y = y - bias.double()
                y = y.T
            sums[name] = sums.get(name, 0) + y @ y.T
            counts[name] = counts.get(name, 0) + y.shape[1]

        return hook

    handles = [model.get_submodule(name).register_forward_hook(make_hook(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        for images in batches:
            model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


# --------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def decompose_model(
    model: nn.Module, plans: Iterable[LayerPlan], cache: FactorCache, inplace: bool = False
) -> nn.Module:
    """Apply a strategy: replace every planned layer by its factorization from ``cache``.

    Args:
        model: The model the cache was built from (dense or partly factorized).
        plans: One plan per layer to change; dense plans and unchanged ranks are skipped.
        cache: The factor cache of ``model``.
        inplace: Modify ``model`` instead of a deep copy.

    Returns:
        The decomposed model, on the device of ``model``.
    """
    changes = [
        plan
        for plan in plans
        if not plan.dense
        and not (
            cache.layers[plan.name].method == plan.method and cache.layers[plan.name].ranks == plan.ranks
        )
    ]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if inplace:
        target = model
    else:
        # copy everything but the layers about to be replaced (their weights would be thrown away)
        memo = {id(model.get_submodule(plan.name)): nn.Identity() for plan in changes}
        target = copy.deepcopy(model, memo)
    for plan in changes:
        replace_module(target, plan.name, cache.build(plan.name, plan.ranks, device, dtype))
    return target


def factorization_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: {"method", "ranks"}}`` for every factorized layer of ``model``."""
    return {
        name: {"method": module.method, "ranks": list(module.ranks)}
        for name, module in model.named_modules()
        if isinstance(module, FactorizedLayer)
    }


def apply_factorization(model: nn.Module, factorization: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Give ``model`` (freshly built, dense) the factorized structure described (weights unset)."""
    for name, entry in factorization.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise DecompositionError(
                f"layer {name!r} of the saved factorization is not in the model"
            ) from None
        replace_module(
            model, name, empty_factorized(dense, str(entry["method"]), tuple(int(r) for r in entry["ranks"]))
        )
    return model


def save(
    path: str | Path, model: nn.Module, spec: ModelSpec, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save ``model`` with what :func:`load` needs to rebuild it (architecture, factorization).

    The file holds only tensors and plain containers, so it loads with ``weights_only=True``.
    """
    payload = {
        "format": MODEL_FORMAT,
        "arch": spec.to_dict(),
        "factorized": factorization_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    return save_torch(path, payload)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by rlrank (dense or compressed) and return it ready to run (eval mode).

    Raises:
        ModelError: The file is missing, unreadable or not an rlrank model.
    """
    from rlrank.models import ModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read model file {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not an rlrank model file (expected format {MODEL_FORMAT})")
    model = build_model(ModelSpec.from_dict(payload["arch"]))
    apply_factorization(model, payload["factorized"])
    load_state_into(model, payload["state_dict"], source=str(path))
    return model.to(map_location).eval()


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Architecture, factorization and metadata of a saved model, without building it."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {k: payload[k] for k in ("format", "arch", "factorized", "metadata") if k in payload}
