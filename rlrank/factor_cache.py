"""The factor cache: every layer's factorization computed once per search, truncated for any ranks.

The expensive part of a strategy (the SVDs of each layer's unfoldings, Tucker-2's core, CP's ALS) is
done once per layer by the layer's :class:`~rlrank.methods.base.CompressionMethod`, on a copy of the
layer's effective weight kept here; every episode then builds its factorized modules from
truncations of it. :func:`output_covariances` observes the layers' responses on training images for
data-aware factorization, :func:`input_grams` their inputs for channel pruning.

A layer that is already factorized (a later stage of multi-stage compression) stays compressible:
its factors are multiplied back into the effective kernel, which is factorized again at the lower
ranks, so the model keeps its depth (this equals MUSCO's re-factorization of the core with the new
1x1 factors folded into the old ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rlrank.describe import effective_bias, effective_weight
from rlrank.layers import LayerInfo
from rlrank.methods import (
    GEOMETRY_KEYS,
    CompressionMethod,
    FactorizedLayer,
    FactorSettings,
    LayerSpectrum,
    LayerWeights,
    get_method,
)
from rlrank.methods.sparse_residual import scatter_filters, top_filters, with_sparse_residual
from rlrank.mixed_units import PRUNE
from rlrank.modes import preserved_modes
from rlrank.planning import MIXED, check_decomposition, method_for


class FactorCache:
    """Factorizations of a model's layers, computed once and truncated for any ranks.

    Args:
        model: The model whose layers are factorized (its weights are copied; later changes to the
            model do not reach the cache).
        layers: The layers to cache (normally the compressible ones of
            :func:`~rlrank.describe.describe_layers`).
        decomposition: The method of k x k convolutions (``tucker2``, ``svd``, ``cp``, ...).
        hooi_iters: HOOI sweeps refining each Tucker-2 truncation (0: plain truncated HOSVD).
        cp_iters: ALS iterations of each CP factorization.
        seed: Seed of CP's initialization.
        output_covariances: Data-aware factorization: per layer, the covariance of its outputs on
            training data (:func:`output_covariances`). For SVD and Tucker-2 the output factor is
            then the leading eigenvectors of that covariance rather than of the weights, which
            keeps the directions the layer's responses actually use (Zhang et al., 2016); the rest
            of the factorization is fitted to the weights. HOOI is skipped for those layers.
        weights: Per layer, a dense weight to factorize instead of the layer's own (ADMM projects
            ``W + U`` this way, :mod:`rlrank.admm`).
        alternations: How a sparse + low-rank layer (``build(..., filters=k)``) splits its weight
            ``W`` into ``L + S``: ``L`` = the truncation of ``W``, ``S`` = the ``k`` filters of
            ``W - L`` with the largest norm; each further alternation re-factorizes ``W - S`` for
            ``L`` and picks ``S`` again (1, the search's default: the cached truncation only, no new
            factorization; ADMM's projection alternates more, :class:`~rlrank.admm.AdmmConfig`).
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
        weights: Mapping[str, torch.Tensor] | None = None,
        alternations: int = 1,
        input_grams: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.decomposition = check_decomposition(decomposition)
        self.alternations = max(1, int(alternations))
        self.settings = FactorSettings(hooi_iters=hooi_iters, cp_iters=cp_iters, seed=seed)
        self.layers = {layer.name: layer for layer in layers}
        covariances = {k: v.to("cpu", torch.float64) for k, v in (output_covariances or {}).items()}
        self._entries: dict[str, LayerWeights] = {}
        self._other_methods: dict[tuple[str, str], LayerWeights] = {}  # mixed: pruning of a pair's head
        with torch.no_grad():
            for name, layer in self.layers.items():
                module = model.get_submodule(name)
                bias = effective_bias(module)
                weight = (
                    weights[name] if weights is not None and name in weights else effective_weight(module)
                )
                self._entries[name] = LayerWeights(
                    layer=layer,
                    weight=weight.detach().to("cpu", torch.float64).clone(),
                    bias=None if bias is None else bias.detach().to("cpu", torch.float64).clone(),
                    covariance=covariances.get(name),
                    input_gram=(input_grams or {}).get(name),
                )

    @property
    def hooi_iters(self) -> int:
        return self.settings.hooi_iters

    @property
    def cp_iters(self) -> int:
        return self.settings.cp_iters

    @property
    def seed(self) -> int:
        return self.settings.seed

    def method(self, name: str) -> str:
        """The method that factorizes layer ``name`` (its current one if factorized, SVD if pointwise)."""
        return method_for(self.layers[name], self.decomposition)

    def entry(self, name: str, method: str | None = None) -> LayerWeights:
        """What the cache keeps of layer ``name``: its weights and its method's precomputations;
        ``method``: another method than the layer's own (the mixed decomposition prunes a pair's
        head with the same weights and input Gram matrix), with its own precomputations."""
        if method is None or method == self.method(name):
            return self._entries[name]
        key = (name, method)
        if key not in self._other_methods:
            own = self._entries[name]
            self._other_methods[key] = LayerWeights(
                own.layer, own.weight, own.bias, own.covariance, input_gram=own.input_gram
            )
        return self._other_methods[key]

    def _method(self, name: str, method: str | None = None) -> CompressionMethod:
        return get_method(method or self.method(name))

    def prepare(self, name: str, method: str | None = None) -> None:
        """Compute (once) what any truncation of layer ``name`` (by ``method``) needs."""
        self._method(name, method).prepare(self.entry(name, method), self.settings)

    def prepare_all(self, progress: bool = False) -> None:
        """Factorize every cached layer now (otherwise each is done on first use); with the mixed
        decomposition, also rank the channels of every layer given an input Gram matrix."""
        from tqdm.auto import tqdm

        for name in tqdm(self.layers, desc="factorizing layers", unit="layer", disable=not progress):
            self.prepare(name)
            if self.decomposition == MIXED and self._entries[name].input_gram is not None:
                self.prepare(name, PRUNE)

    def spectra(self, name: str) -> list[LayerSpectrum]:
        """Singular values of the layer's unfoldings (Tucker-2: output then input mode)."""
        return self._method(name).spectra(self._entries[name], self.settings)

    def factors(self, name: str, ranks: tuple[int, ...], method: str | None = None) -> list[torch.Tensor]:
        """Weights of the factor layers of ``name`` at ``ranks`` (float64, CPU), by the layer's
        method or ``method``.

        Raises:
            DecompositionError: Ranks out of the layer's range.
        """
        ranks = tuple(int(r) for r in ranks)
        return self._method(name, method).factors(self.entry(name, method), ranks, self.settings)

    def build(
        self,
        name: str,
        ranks: tuple[int, ...],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        filters: int = 0,
        method: str | None = None,
    ) -> FactorizedLayer:
        """A factorized module for layer ``name`` at ``ranks``, weights from the cache; with
        ``filters`` > 0 a :class:`~rlrank.methods.sparse_residual.SparseResidualLayer` that also keeps
        that many whole filters of the residual (see ``alternations``); ``method``: another method
        than the layer's own (the mixed decomposition's pruning)."""
        if not filters or (method is not None and method != self.method(name)):
            ranks = tuple(int(r) for r in ranks)
            empty = self._empty(name, ranks, device, dtype, method)
            module = self._load(name, empty, self.factors(name, ranks, method))
            self._method(name, method).finish(module, self.entry(name, method), ranks)
            return module
        factors, index, sparse = self._split(name, tuple(int(r) for r in ranks), filters)
        low_rank = self._load(name, self._empty(name, ranks, device, dtype), factors)
        return with_sparse_residual(low_rank, index, sparse.to(device, dtype))

    def _empty(
        self,
        name: str,
        ranks: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype,
        method_name: str | None = None,
    ) -> FactorizedLayer:
        """The factorized module of layer ``name`` at ``ranks`` (by its method or ``method_name``),
        weights unset."""
        layer = self.layers[name]
        method = self._method(name, method_name)
        geometry = {k: getattr(layer, k) for k in GEOMETRY_KEYS}
        if layer.params > 16384:  # skip the random initialization of large factors: they are overwritten
            return method.build_module(geometry, ranks, device="meta").to_empty(device=device).to(dtype=dtype)
        return method.build_module(geometry, ranks).to(device=device, dtype=dtype)  # cheaper when small

    def _load(self, name: str, module: FactorizedLayer, factors: list[torch.Tensor]) -> FactorizedLayer:
        """``module`` with ``factors`` and the bias of layer ``name`` copied in."""
        with torch.no_grad():
            for child, weight in zip(module.children(), factors, strict=True):
                child.weight.copy_(weight)
            bias = self._entries[name].bias
            if bias is not None:
                module[-1].bias.copy_(bias)
        return module

    def _split(
        self, name: str, ranks: tuple[int, ...], filters: int
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``W = L + S + residual``: ``L``'s factors at ``ranks``, ``S``'s filter indices and weights
        (float64, CPU), alternating ``self.alternations`` times."""
        entry = self._entries[name]
        method = self._method(name)
        factors = self.factors(name, ranks)
        index, sparse = top_filters(entry.weight - self._dense(name, ranks, factors), filters)
        for _ in range(self.alternations - 1):
            rest = entry.weight - scatter_filters(entry.weight.shape, index, sparse)
            shifted = LayerWeights(entry.layer, rest, entry.bias, entry.covariance)
            factors = method.factors(shifted, ranks, self.settings)
            index, sparse = top_filters(entry.weight - self._dense(name, ranks, factors), filters)
        return factors, index, sparse

    def _dense(self, name: str, ranks: tuple[int, ...], factors: list[torch.Tensor]) -> torch.Tensor:
        """The effective weight of ``factors`` (float64, CPU)."""
        with torch.no_grad():
            return self._load(
                name, self._empty(name, ranks, "cpu", torch.float64), factors
            ).effective_weight()


@torch.no_grad()
def input_grams(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable[torch.Tensor],
    positions: int = 10,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of each named layer's input patches (float64, CPU), for channel pruning.

    A convolution's input is unfolded into the patches its kernel reads (channel-major, as its
    flattened weight), and ``positions`` of them are sampled per image (He et al. sample 10); a
    linear layer's inputs are its rows.

    Args:
        model: The model; run in eval mode.
        names: Layers to observe (conv or linear modules).
        batches: Input batches (normalized images), e.g. a few training batches.
        positions: Patches sampled per image.
        seed: Seed of the sampled positions.
    """
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                patches = F.unfold(
                    x, module.kernel_size, module.dilation, module.padding, module.stride
                )  # (N, c * kk, L)
                count = min(positions, patches.shape[-1])
                picks = torch.rand(patches.shape[0], patches.shape[-1], generator=generator).argsort(dim=1)
                picks = picks[:, :count].to(patches.device)
                rows = patches.gather(2, picks.unsqueeze(1).expand(-1, patches.shape[1], -1))
                rows = rows.transpose(1, 2).reshape(-1, patches.shape[1])
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.double()
            sums[name] = sums.get(name, 0) + (rows.T @ rows).cpu()
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return hook

    _observe(model, [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names], batches)
    return {name: sums[name] / counts[name] for name in sums}


def _observe(model: nn.Module, handles: list, batches: Iterable[torch.Tensor]) -> None:
    """Run ``batches`` through ``model`` in eval mode, then remove the hooks ``handles``."""
    try:
        with preserved_modes(model):
            model.eval()
            for images in batches:
                model(images)
    finally:
        for h in handles:
            h.remove()


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

    _observe(model, [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names], batches)
    return {name: (sums[name] / counts[name]).cpu() for name in sums}
