"""Which layer's output channels are another layer's input channels and nothing else's.

Channel pruning removes input channels of a layer *B* together with the output channels of the
convolution *A* that makes them. That is only possible where *A*'s output reaches *B* alone, through
per-channel operations: BatchNorm (sliced with the channels), ReLU-like activations, pooling,
dropout, identity. A residual block's inner convolutions are such pairs; a block's input is not (the shortcut
reads it too). :func:`channel_producers` finds every pair by tracing the model with ``torch.fx``; a
model that cannot be traced has none.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from rlrank.methods import FactorizedLayer

logger = logging.getLogger(__name__)

_PER_CHANNEL_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.SiLU,
    nn.GELU,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
_PER_CHANNEL_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.silu,
    F.gelu,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
}
_PER_CHANNEL_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class Producer:
    """The layer making a layer's input channels, and the BatchNorm layers between them.

    Attributes:
        name: The producing convolution / linear layer.
        batchnorms: BatchNorm layers on the way, in order (sliced with the channels).
    """

    name: str
    batchnorms: tuple[str, ...] = ()


class _LayerLeafTracer(fx.Tracer):
    """Keeps every convolution, linear and factorized layer as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, FactorizedLayer)) or super().is_leaf_module(
            m, module_qualified_name
        )


def _prunable(module: nn.Module | None) -> bool:
    """A plain (not factorized) ungrouped convolution or a linear layer."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def channel_producers(model: nn.Module) -> dict[str, Producer]:
    """``{consumer: Producer}`` for every layer whose input channels one other layer makes alone.

    Both layers are plain convolutions (ungrouped) or both linear, each called once; every node
    between them is a per-channel operation with no other user.
    """
    try:
        graph = _LayerLeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any model torch.fx cannot trace simply has no pairs
        logger.debug("torch.fx cannot trace %s (%s): no channel can be pruned", type(model).__name__, exc)
        return {}
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    found: dict[str, Producer] = {}
    for node in graph.nodes:
        consumer = modules.get(node.target) if node.op == "call_module" else None
        if not _prunable(consumer) or calls[node.target] != 1 or not node.args:
            continue
        producer = _walk_back(node.args[0], modules, calls)
        if producer is None:
            continue
        source = modules[producer.name]
        if type(source) is not type(consumer) and not (
            isinstance(source, nn.Conv2d) and isinstance(consumer, nn.Conv2d)
        ):
            continue  # a convolution feeding a linear layer goes through a reshape
        width = source.out_channels if isinstance(source, nn.Conv2d) else source.out_features
        if all(modules[bn].num_features == width for bn in producer.batchnorms):
            found[str(node.target)] = producer
    return found


def _walk_back(node: object, modules: dict[str, nn.Module], calls: Counter) -> Producer | None:
    """Follow per-channel single-user nodes back from a consumer's input to a prunable producer."""
    batchnorms: list[str] = []
    while isinstance(node, fx.Node) and len(node.users) == 1 and node.args:
        if node.op == "call_module":
            module = modules.get(node.target)
            if _prunable(module) and calls[node.target] == 1:
                return Producer(str(node.target), tuple(reversed(batchnorms)))
            if not isinstance(module, _PER_CHANNEL_MODULES):
                return None
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):  # stateful: sliced, so used once
                if module.running_mean is None or calls[node.target] != 1:
                    return None
                batchnorms.append(str(node.target))
        elif node.op == "call_function" and node.target in _PER_CHANNEL_FUNCTIONS:
            pass
        elif node.op == "call_method" and node.target in _PER_CHANNEL_METHODS:
            pass
        else:
            return None
        node = node.args[0]
    return None
