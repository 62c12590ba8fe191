"""Inference fusion: fold every BatchNorm that directly follows a convolution into that convolution.

:func:`fuse_for_inference` returns an eval-mode copy of a model (dense or compressed) in which each
``BatchNorm2d`` whose input is the output of an ``nn.Conv2d`` (and of nothing else) is folded into
the convolution's weight and bias and replaced by ``nn.Identity``. In a factorized layer
(:mod:`rlrank.methods`) the convolution before the BatchNorm is the layer's last factor
(Tucker-2's ``last``, CP's ``last``, SVD's second conv, a tensor network's last
:class:`~rlrank.methods.tensor_network.SharedConv`), so the fold lands there. In a sparse + low-rank
layer (:class:`~rlrank.methods.sparse_residual.SparseResidualLayer`, ``--sparse``) the fold lands in
its low-rank part's last factor (scale and shift) and its sparse filters are scaled by the
BatchNorm's scale at their output channels: ``BN(L x + S x) = BN(L x) + scale * S x``.

The pairs are found on the graph ``torch.fx`` traces (the pattern of
``torch.fx.experimental.optimization.fuse``), with every ``nn.Conv2d`` subclass kept as one node,
and the fold itself is ``torch.nn.utils.fusion.fuse_conv_bn_eval``. The returned model keeps its
own class and ``forward`` (the modules are swapped in place in the copy; no ``GraphModule`` is
returned), so it saves, scripts and exports as the original does. A model that ``torch.fx`` cannot
trace (data-dependent control flow, say) is returned unfused, in eval mode, with a warning.

Memory format, measured with torch 2.14.1 on this project's 2-core CPU, shared with other jobs (so
noisy): a Tucker-2 ResNet-20 at 0.48 of the FLOPs (uniform ratio 0.594), BN folded, median of 5
rounds of the median of 200 (batch 1) or 30 (batch 64) passes. Batch 64: ``channels_last`` took
51 ms against 88 ms contiguous in eager PyTorch and 49 against 74 ms as TorchScript (2 threads),
82 against 197 ms and 97 against 190 ms (1 thread). Batch 1: no consistent gain (eager 3.06
against 2.98 ms, TorchScript 2.12 against 2.23 ms with 2 threads; 4.15 against 3.16 ms and 2.60
against 1.83 ms with 1 thread; an earlier 2-thread run at ratio 0.5: 1.57 against 1.88 ms). So
``channels_last`` is an option, off by default and worth it for large batches, of
:func:`rlrank.export.export_model` (TorchScript; ``rlrank-export --channels-last``) and
:func:`rlrank.export.measure_latency`; ONNX has no memory format (onnxruntime chooses).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rlrank.methods.base import FactorizedLayer, replace_module
from rlrank.methods.sparse_residual import SparseResidualLayer
from rlrank.methods.tensor_network import SharedConv, TensorNetworkConv

log = logging.getLogger(__name__)

MEMORY_FORMATS = ("contiguous", "channels_last")
"""Memory formats the export and latency helpers accept."""


@dataclass
class FusionResult:
    """What :func:`fuse_model` did.

    Attributes:
        model: The eval-mode copy (fused, or unfused when the model did not trace).
        fused: Names of the BatchNorm layers folded into the convolution before them.
        traced: Whether ``torch.fx`` traced the model.
    """

    model: nn.Module
    fused: list[str]
    traced: bool


class _ConvLeafTracer(fx.Tracer):
    """A tracer that keeps every ``nn.Conv2d`` (subclasses included) and every factorized layer with a
    ``forward`` of its own (a tensor network's reshapes need concrete shapes) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or _own_forward(m) or super().is_leaf_module(m, module_qualified_name)


def _own_forward(m: nn.Module) -> bool:
    """Whether ``m`` is a factorized layer whose ``forward`` is not ``nn.Sequential``'s."""
    return isinstance(m, FactorizedLayer) and type(m).forward is not nn.Sequential.forward


def _output_conv(name: str, m: nn.Module) -> str | None:
    """The name of the convolution whose output is ``m``'s output: ``m`` itself for a convolution, the
    last child of a tensor network on a feature map or of a plain chain of factors (their ``forward``
    ends with that child); for a sparse + low-rank layer, its low-rank part's (the sparse filters are
    scaled besides, :func:`_scale_sparse_filters`); ``None`` for anything else (a factorized layer of
    another kind with a ``forward`` of its own is opaque)."""
    if isinstance(m, nn.Conv2d):
        return name
    if isinstance(m, SparseResidualLayer):
        return _output_conv(f"{name}.low_rank", m.low_rank)
    chain = isinstance(m, FactorizedLayer) and not _own_forward(m)
    if (chain or (isinstance(m, TensorNetworkConv) and not m.linear)) and isinstance(m[-1], nn.Conv2d):
        last = list(m._modules)[-1]
        return f"{name}.{last}"
    return None


def _scale_sparse_filters(layer: SparseResidualLayer, bn: nn.BatchNorm2d) -> None:
    """Scale ``layer``'s sparse filters by ``bn``'s eval-mode scale at their output channels (the
    shift is folded into the low-rank part's bias)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    with torch.no_grad():
        factor = scale[layer.filter_index].to(layer.sparse.weight.dtype)
        layer.sparse.weight.mul_(factor.view(-1, *[1] * (layer.sparse.weight.dim() - 1)))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every BatchNorm that follows a convolution folded into it.

    Args:
        model: Any model (not changed; its train / eval flags stay as they are).

    Returns:
        The fused copy, in eval mode, on the device of ``model``. Its outputs equal the eval-mode
        outputs of ``model`` up to floating-point rounding. A model that ``torch.fx`` cannot trace
        comes back unfused (a warning is logged).
    """
    return fuse_model(model).model


def fuse_model(model: nn.Module) -> FusionResult:
    """:func:`fuse_for_inference`, also saying which BatchNorm layers were folded and whether it traced."""
    fused_model = copy.deepcopy(model).eval()
    try:
        graph = _ConvLeafTracer().trace(fused_model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... on untraceable code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning(
            "%s cannot be traced by torch.fx (%s: %s); BatchNorm left unfused",
            type(model).__name__,
            type(exc).__name__,
            reason[:200],
        )
        return FusionResult(fused_model, [], traced=False)
    pairs = _conv_bn_pairs(graph, dict(fused_model.named_modules()))
    for source, conv_name, bn_name in pairs:
        conv = fused_model.get_submodule(conv_name)
        bn = fused_model.get_submodule(bn_name)
        if isinstance(fused_model.get_submodule(source), SparseResidualLayer):
            _scale_sparse_filters(fused_model.get_submodule(source), bn)
        replace_module(fused_model, conv_name, fuse_conv_bn_eval(_plain_conv(conv), bn))
        replace_module(fused_model, bn_name, nn.Identity())
    left = [n for n, m in fused_model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    log.info(
        "folded %d BatchNorm layer(s) into convolutions%s",
        len(pairs),
        f"; {len(left)} left (not directly after a convolution): {', '.join(left)}" if left else "",
    )
    return FusionResult(fused_model.eval(), [bn for _, _, bn in pairs], traced=True)


def count_batchnorm(model: nn.Module) -> int:
    """How many ``nn.BatchNorm2d`` modules ``model`` holds."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def torch_memory_format(memory_format: str) -> torch.memory_format:
    """The ``torch.memory_format`` named ``contiguous`` or ``channels_last``.

    Raises:
        ValueError: Any other name.
    """
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if memory_format not in formats:
        raise ValueError(f"unknown memory format {memory_format!r}; expected one of {', '.join(formats)}")
    return formats[memory_format]


def _conv_bn_pairs(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[str, str, str]]:
    """``(source, conv, bn)`` module names where the BatchNorm's only input is the output of
    ``source``, a convolution (then ``conv`` is ``source``) or a layer whose output ``conv`` makes
    (:func:`_output_conv`), that output goes nowhere else, and each module is called once."""
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or source.target not in modules:
            continue
        conv_name = _output_conv(str(source.target), modules[source.target])
        if conv_name is None:
            continue
        conv, bn = modules[conv_name], modules[node.target]
        if (
            len(source.users) != 1
            or calls[source.target] != 1
            or calls[node.target] != 1
            or bn.running_mean is None
            or bn.running_var is None
            or bn.num_features != conv.out_channels
        ):
            continue
        pairs.append((str(source.target), conv_name, str(node.target)))
    return pairs


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a module whose ``weight`` is the one it applies: a :class:`SharedConv` with several
    groups repeats one weight per group, which a per-channel BatchNorm cannot scale, so it becomes a
    plain grouped ``nn.Conv2d`` with the weight repeated; any other convolution is returned as is."""
    if not isinstance(conv, SharedConv) or conv.groups == 1:
        return conv
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        plain.weight.copy_(conv.weight.repeat(conv.groups, 1, 1, 1))
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain.eval()
