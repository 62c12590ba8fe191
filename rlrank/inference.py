"""The fastest inference form of a model: BatchNorm folded, each layer's factor convolutions grouped
as measured fastest on the device.

A factorized layer is a chain of convolutions (or linear maps). Neighbouring factors can be merged
into one exactly when one of them is a plain 1x1 map: Tucker-2's ``1x1 -> kxk -> 1x1`` may also run
as ``(1x1 o kxk) -> 1x1``, ``1x1 -> (kxk o 1x1)`` or one ``kxk`` convolution of the same function.
Fewer, larger convolutions can be faster than more, smaller ones (thin channels at a large feature
map are memory-bound: measured in ``experiments/RESULTS.md``), so :func:`fastest_form` times every
grouping of every factorized layer on its real input shape and keeps the fastest; outputs are the
same up to floating-point rounding. A sparse + low-rank layer (``--sparse``) keeps its form; the
chain of its low-rank part is regrouped like any other.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence

import torch
from torch import nn

from rlrank.methods.base import replace_module
from rlrank.timing import time_interleaved

logger = logging.getLogger(__name__)

ROUNDS = 15
"""Timed forward passes of each grouping (interleaved, lower quartile kept)."""


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.groups == 1
        and conv.dilation == (1, 1)
    )


def merge_pair(a: nn.Module, b: nn.Module) -> nn.Module | None:
    """One layer computing ``b(a(x))``, or ``None`` when no single convolution / linear map does.

    Two convolutions merge when the second is a plain 1x1 one, or when the first is a plain 1x1
    one without bias (a bias would not reach the second's zero padding); two linear maps always.
    """
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        merged = nn.Linear(a.in_features, b.out_features, bias=a.bias is not None or b.bias is not None)
        merged = merged.to(a.weight.device, a.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(b.weight @ a.weight)
            if merged.bias is not None:
                bias = b.bias.clone() if b.bias is not None else torch.zeros_like(merged.bias)
                if a.bias is not None:
                    bias += b.weight @ a.bias
                merged.bias.copy_(bias)
        return merged
    if not (isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d)) or a.groups != 1 or b.groups != 1:
        return None
    if _is_pointwise(b):
        outer = a  # the merged layer has a's geometry
        weight = torch.einsum("oj,jihw->oihw", b.weight[:, :, 0, 0], a.weight)
        bias = None
        if a.bias is not None or b.bias is not None:
            bias = b.bias.clone() if b.bias is not None else weight.new_zeros(weight.shape[0])
            if a.bias is not None:
                bias = bias + b.weight[:, :, 0, 0] @ a.bias
    elif _is_pointwise(a) and a.bias is None:
        outer = b
        weight = torch.einsum("ojhw,ji->oihw", b.weight, a.weight[:, :, 0, 0])
        bias = None if b.bias is None else b.bias.clone()
    else:
        return None
    merged = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        outer.kernel_size,
        stride=outer.stride,
        padding=outer.padding,
        dilation=outer.dilation,
        bias=bias is not None,
        padding_mode=outer.padding_mode,
    ).to(weight.device, weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if bias is not None:
            merged.bias.copy_(bias)
    return merged


def groupings(chain: nn.Sequential) -> list[nn.Module]:
    """Every way to run ``chain`` with contiguous factors merged (``chain`` itself first)."""
    factors = list(chain)
    forms: list[nn.Module] = [chain]
    for cuts in itertools.product((False, True), repeat=len(factors) - 1):
        if all(cuts):
            continue  # every factor on its own: the chain itself
        groups: list[nn.Module] = []
        current: nn.Module | None = factors[0]
        for factor, cut in zip(factors[1:], cuts, strict=True):
            if cut:
                groups.append(current)
                current = factor
            else:
                current = merge_pair(current, factor) if current is not None else None
                if current is None:
                    break
        if current is None:
            continue
        groups.append(current)
        forms.append(groups[0] if len(groups) == 1 else nn.Sequential(*groups))
    return forms


def is_chain(module: nn.Module) -> bool:
    """A sequence of two or more convolutions, or of linear maps, and nothing else."""
    children = list(module.children())
    return (
        isinstance(module, nn.Sequential)
        and len(children) >= 2
        and (
            all(isinstance(c, nn.Conv2d) for c in children) or all(isinstance(c, nn.Linear) for c in children)
        )
    )


def fastest_grouping(chain: nn.Sequential, x: torch.Tensor, rounds: int = ROUNDS) -> tuple[nn.Module, float]:
    """The fastest of :func:`groupings` on input ``x``, and its milliseconds."""
    forms = groupings(chain)
    with torch.no_grad():
        times = time_interleaved(forms, x, rounds)
    best = min(range(len(forms)), key=times.__getitem__)
    return forms[best], times[best]


def fastest_form(
    model: nn.Module,
    input_shape: Sequence[int],
    batch: int = 1,
    device: torch.device | str | None = None,
    rounds: int = ROUNDS,
    fuse: bool = True,
) -> nn.Module:
    """An eval-mode copy of ``model`` in its fastest inference form at ``batch``: BatchNorm folded,
    every factorized layer in its fastest grouping, in the faster memory layout (:func:`faster_layout`).

    Args:
        model: Any model (not changed).
        input_shape: One input's shape, e.g. ``(3, 32, 32)``.
        batch: The batch size to be fast at.
        device: Where to time and return it (default: the model's device).
        rounds: Timed passes per grouping.
        fuse: Fold BatchNorm into the convolutions first (:func:`rlrank.fusion.fuse_for_inference`).
    """
    from rlrank.fusion import fuse_for_inference

    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else "cpu")
    fast = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
    fast = fast.to(device).eval()
    chains = {name: m for name, m in fast.named_modules() if name and is_chain(m)}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0].detach()))
        for name, m in chains.items()
    ]
    with torch.no_grad():
        fast(torch.randn((batch, *input_shape), device=device))
    for hook in hooks:
        hook.remove()
    changed = 0
    for name, chain in chains.items():
        if name not in inputs:
            continue
        best, _ = fastest_grouping(chain, inputs[name], rounds)
        if best is not chain:
            replace_module(fast, name, best)
            changed += 1
    logger.info(
        "fastest inference form at batch %d: %d of %d factorized layers regrouped",
        batch,
        changed,
        len(chains),
    )
    return faster_layout(fast, torch.randn((batch, *input_shape), device=device), rounds)


class ChannelsLast(nn.Module):
    """``module`` with its weights in ``channels_last`` layout, fed its input in that layout too."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def faster_layout(model: nn.Module, x: torch.Tensor, rounds: int = ROUNDS) -> nn.Module:
    """``model`` as it is, or :class:`ChannelsLast` of a copy when that times faster on ``x`` (the
    conversion of the input included): measured, since it depends on the batch size and device."""
    if x.dim() != 4:
        return model
    candidate = ChannelsLast(copy.deepcopy(model)).eval()
    with torch.no_grad():
        plain, last = time_interleaved([model, candidate], x, rounds)
    logger.info("contiguous %.2f ms, channels_last %.2f ms at batch %d", plain, last, x.shape[0])
    return candidate if last < plain else model
