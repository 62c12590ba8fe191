"""Channel pruning (``--decomposition prune``): a layer keeps some of its input channels, and the
layer making them (its *producer*) loses the matching output channels, so both really shrink.

He et al. 2017 ("Channel Pruning for Accelerating Very Deep Neural Networks"), as this project
prices and applies it:

* **Which layers.** A layer ``B`` whose input channels one convolution ``A`` makes alone
  (:attr:`~rlrank.layers.LayerInfo.producer`, found by :mod:`rlrank.channel_coupling`): the inner
  convolutions of residual blocks, never the channels a shortcut reads. The plan of ``B`` at keep
  ratio ``rho`` owns both layers' cost: ``k = round(rho * c)`` of ``c`` channels keep
  ``k / c`` of ``A``'s and of ``B``'s MACs and parameters, exactly, so the FLOP budget the
  environment guarantees holds for the pruned model.
* **Which channels.** Channel ``i``'s contribution to ``B``'s output is ``Z_i = X_i W_i^T`` (its
  input patches times its slice of the kernel) on sampled training data; the LASSO problem
  ``min ||Y - sum_i beta_i Z_i||^2 + lambda ||beta||_1`` keeps fewer channels as ``lambda`` grows.
  Its whole path is computed once per layer (``sklearn``'s LARS on the Gram matrix of the ``Z_i``,
  which follows from the input patches' Gram matrix and ``W``), and channels are ranked by where
  they enter it; a keep count ``k`` keeps the first ``k``.
* **Reconstruction.** ``B``'s kernel on the kept channels is refit by least squares to the dense
  layer's output on the same data: ``W_S = (X_S^T X_S)^-1 X_S^T X W^T``, from the same Gram matrix.
* Without data (no Gram matrix: a cache built without training batches) channels are ranked by the
  norm of their kernel slices (Li et al. 2017) and the kept slices are used unchanged.

:class:`PrunedLayer` exists only between the factor cache and :meth:`ChannelPruning.apply`, which
puts its plain layer into the model and slices the producer and the BatchNorm layers between.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from rlrank.layers import LayerInfo
from rlrank.methods.base import (
    CompressionMethod,
    DecompositionError,
    FactorizedLayer,
    FactorSettings,
    Geometry,
    LayerSpectrum,
    LayerWeights,
    conv2d,
    replace_module,
)


class PrunedLayer(FactorizedLayer):
    """A convolution / linear layer reading ``k`` of its dense input channels (``kept_channels``),
    with the names of the producer and BatchNorm layers that :meth:`ChannelPruning.apply` slices."""

    method = "prune"

    def __init__(self, geometry: Geometry, kept: int, device: torch.device | str | None = None) -> None:
        if geometry["kind"] == "linear":
            layer: nn.Module = nn.Linear(kept, geometry["out_channels"], bias=geometry["bias"], device=device)
        else:
            layer = conv2d(
                kept,
                geometry["out_channels"],
                geometry["kernel"],
                geometry["stride"],
                geometry["padding"],
                geometry["dilation"],
                bias=geometry["bias"],
                device=device,
            )
        super().__init__(OrderedDict(layer=layer), (kept,))
        self.geometry = dict(geometry)
        self.register_buffer("kept_channels", torch.arange(kept, device=device))
        self.producer: str | None = None
        self.batchnorms: tuple[str, ...] = ()

    def dense_geometry(self) -> Geometry:
        return dict(self.geometry)

    def effective_weight(self) -> torch.Tensor:
        weight = self.layer.weight
        dense = weight.new_zeros((weight.shape[0], self.geometry["in_channels"], *weight.shape[2:]))
        dense[:, self.kept_channels] = weight
        return dense


class ChannelPruning(CompressionMethod):
    """Remove input channels of a layer and the output channels of its producer (see the module)."""

    name = "prune"
    pointwise = True  # 1x1 convolutions and linear layers are pruned alike

    def can_compress(self, layer: LayerInfo) -> bool:
        return layer.producer is not None and layer.method is None and layer.groups == 1

    def full_ranks(self, layer: LayerInfo) -> tuple[int, ...]:
        return (layer.in_channels,)

    def dense_macs(self, layer: LayerInfo) -> int:
        return layer.macs + layer.producer_macs

    def dense_params(self, layer: LayerInfo) -> int:
        return layer.params + layer.producer_params

    def macs(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (kept,) = ranks
        return (layer.macs + layer.producer_macs) // layer.in_channels * kept

    def params(self, layer: LayerInfo, ranks: tuple[int, ...]) -> int:
        (kept,) = ranks
        bias = layer.out_channels if layer.bias else 0
        weights = layer.params - bias  # proportional to the input channels
        return weights // layer.in_channels * kept + bias + layer.producer_params // layer.in_channels * kept

    # ------------------------------------------------------------------ channel selection

    def prepare(self, entry: LayerWeights, settings: FactorSettings) -> None:
        """Rank the input channels once: by their entry into the LASSO path, or by kernel norm."""
        if "order" in entry.store:
            return
        weight = entry.weight.reshape(entry.weight.shape[0], entry.weight.shape[1], -1)  # out, c, kk
        if entry.input_gram is None:
            importance = weight.pow(2).sum(dim=(0, 2)).sqrt()
            order = torch.argsort(importance, descending=True, stable=True)
        else:
            gram_z = contribution_gram(entry.input_gram, weight)
            importance = gram_z.diagonal().clamp_min(0).sqrt()
            order = lasso_order(gram_z, importance)
        entry.store["order"] = order
        entry.store["importance"] = importance
        entry.store["factors"] = {}

    def spectra(self, entry: LayerWeights, settings: FactorSettings) -> list[LayerSpectrum]:
        """The channels' importances (norms of their contributions), descending, for the rules."""
        self.prepare(entry, settings)
        values = entry.store["importance"].sort(descending=True).values.numpy().copy()
        rows, cols = entry.weight.shape[1], entry.weight.shape[0] * entry.weight[0, 0].numel()
        return [LayerSpectrum(values, (int(rows), int(cols)))]

    def kept_channels(self, entry: LayerWeights, kept: int, settings: FactorSettings) -> torch.Tensor:
        """The ``kept`` channels this layer keeps, ascending."""
        self.prepare(entry, settings)
        return entry.store["order"][:kept].sort().values

    def factors(
        self, entry: LayerWeights, ranks: tuple[int, ...], settings: FactorSettings
    ) -> list[torch.Tensor]:
        self.check_ranks(entry.layer, ranks)
        (kept,) = ranks
        self.prepare(entry, settings)
        memo = entry.store["factors"]
        if kept not in memo:
            channels = self.kept_channels(entry, kept, settings)
            memo[kept] = refit(entry.weight, entry.input_gram, channels)
        return [memo[kept]]

    def finish(self, module: FactorizedLayer, entry: LayerWeights, ranks: tuple[int, ...]) -> None:
        assert isinstance(module, PrunedLayer)
        with torch.no_grad():
            channels = self.kept_channels(entry, ranks[0], FactorSettings())
            module.kept_channels.copy_(channels.to(module.kept_channels.device))
        module.producer = entry.layer.producer
        module.batchnorms = entry.layer.producer_batchnorms

    # ------------------------------------------------------------------ modules

    def module(
        self, geometry: Geometry, ranks: tuple[int, ...], device: torch.device | str | None = None
    ) -> FactorizedLayer:
        return PrunedLayer(geometry, int(ranks[0]), device=device)

    def apply(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Put the pruned layer at ``name`` and remove the same channels from its producer's output
        and from the BatchNorm layers between."""
        if not isinstance(module, PrunedLayer) or module.producer is None:
            raise DecompositionError(f"layer {name} was not built for pruning by the factor cache")
        kept = module.kept_channels.long()
        producer = model.get_submodule(module.producer)
        replace_module(model, module.producer, sliced_outputs(producer, kept))
        for bn in module.batchnorms:
            replace_module(model, bn, sliced_batchnorm(model.get_submodule(bn), kept))
        replace_module(model, name, module.layer)


# ---------------------------------------------------------------------- pure functions


def contribution_gram(input_gram: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``G_Z[i, j] = <Z_i, Z_j>`` of the channels' output contributions ``Z_i = X_i W_i^T``.

    Args:
        input_gram: ``X^T X`` of the input patches, ``(c * kk, c * kk)``, channel-major.
        weight: The kernel as ``(out, c, kk)``.
    """
    out, channels, kk = weight.shape
    flat = weight.reshape(out, channels * kk)
    kernel_gram = flat.T @ flat  # sum over outputs of W[o, i, a] W[o, j, b]
    return (input_gram * kernel_gram).reshape(channels, kk, channels, kk).sum(dim=(1, 3))


def lasso_order(gram_z: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Channels in the order they enter the LASSO path of ``min ||Y - Z beta||^2 + lambda |beta|_1``
    with ``Y = sum_i Z_i`` (the dense output); channels that never enter follow by ``importance``."""
    from sklearn.linear_model import lars_path_gram

    gram = gram_z.numpy()
    scale = max(float(np.trace(gram)) / len(gram), 1e-300)
    gram = gram / scale
    _, _, coefs = lars_path_gram(
        Xy=gram.sum(axis=1), Gram=gram, n_samples=1, method="lasso", max_iter=4 * len(gram)
    )
    nonzero = np.abs(coefs) > 0
    entered = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), coefs.shape[1])
    keys = np.lexsort((-importance.numpy(), entered))  # first by entry, then by importance
    return torch.as_tensor(keys, dtype=torch.long)


def refit(weight: torch.Tensor, input_gram: torch.Tensor | None, channels: torch.Tensor) -> torch.Tensor:
    """The kernel on ``channels`` that best reproduces the dense layer's output (least squares on
    the input patches' Gram matrix); the kept slices themselves without a Gram matrix or when every
    channel is kept."""
    sliced = weight[:, channels]
    if input_gram is None or len(channels) == weight.shape[1]:
        return sliced.clone()
    out, total = weight.shape[0], weight.shape[1]
    kk = weight[0, 0].numel()
    index = (channels.view(-1, 1) * kk + torch.arange(kk).view(1, -1)).flatten()
    flat = weight.reshape(out, total * kk)
    gram_ss = input_gram[index][:, index]
    ridge = 1e-6 * gram_ss.diagonal().mean().clamp_min(1e-12)
    rhs = input_gram[index] @ flat.T  # X_S^T X W^T
    solution = torch.linalg.solve(gram_ss + ridge * torch.eye(len(index), dtype=gram_ss.dtype), rhs)
    return solution.T.reshape(sliced.shape).contiguous()


def sliced_outputs(layer: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a convolution / linear layer with only the output channels ``kept``."""
    weight = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = nn.Conv2d(
            layer.in_channels,
            len(kept),
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(
            layer.in_features,
            len(kept),
            bias=layer.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
    else:
        raise DecompositionError(f"cannot prune the outputs of a {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(weight[kept.to(weight.device)])
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach()[kept.to(weight.device)])
    new.train(layer.training)
    return new


def sliced_batchnorm(bn: nn.Module, kept: torch.Tensor) -> nn.Module:
    """A copy of a BatchNorm layer with only the channels ``kept``."""
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
        raise DecompositionError(f"cannot slice a {type(bn).__name__} by channels")
    ref = bn.running_mean
    new = type(bn)(
        len(kept), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device=ref.device, dtype=ref.dtype,
    )  # fmt: skip
    index = kept.to(ref.device)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[index])
            new.bias.copy_(bn.bias.detach()[index])
        new.running_mean.copy_(bn.running_mean[index])
        new.running_var.copy_(bn.running_var[index])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new
