"""``rlrank-search --dry-run``: what a search would compress, without searching.

Lists every conv / linear layer of the model with its shape, MACs and parameters and what the search
would do with it (search its rank with the method named, leave it dense because no rank makes it
cheaper, or leave it as ``--exclude`` says), then the smallest budget the search could reach.
"""

from __future__ import annotations

from rlrank.envs import smallest_budget
from rlrank.layers import LayerInfo
from rlrank.methods import get_method
from rlrank.mixed_units import prunable_pairs
from rlrank.planning import MIXED, is_excluded, method_for, searched_layers, single_method
from rlrank.preflight import Setup


def layer_listing(setup: Setup) -> str:
    """The dry run's text: one line per layer, then totals and the smallest reachable budget."""
    config, layers = setup.config, setup.layers
    total_macs = sum(layer.macs for layer in layers)
    total_params = sum(p.numel() for p in setup.model.parameters())
    header = f"{'layer':<28} {'kind':<6} {'in -> out':>13} {'kernel':>6} {'stride':>6} {'map':>7} " \
             f"{'MACs':>12} {'share':>6} {'params':>10}  search"  # fmt: skip
    lines = [header, "-" * len(header)]
    steps = {layer.name: layer for layer in searched_layers(layers, config.decomposition, config.exclude)}
    owners = {str(step.producer): name for name, step in steps.items() if step.producer is not None}
    pruning = config.decomposition == "prune"
    mixed = mixed_roles(layers, config.exclude) if config.decomposition == MIXED else {}
    for layer in layers:
        if is_excluded(layer.name, config.exclude):
            what = "excluded (--exclude)"
        elif layer.name in mixed:
            what = mixed[layer.name]
        elif layer.name in steps:
            what = method_for(layer, config.decomposition)
            if pruning:
                what += f" (input channels, with {layer.producer}'s outputs)"
        elif pruning and layer.name in owners:
            what = f"pruned with {owners[layer.name]} (output channels)"
        elif pruning:
            what = "dense (its inputs are not one convolution's alone)"
        else:
            what = "dense (no rank makes it cheaper)"
        kernel = f"{layer.kernel[0]}x{layer.kernel[1]}"
        fmap = f"{layer.in_hw[0]}x{layer.in_hw[1]}"
        lines.append(
            f"{layer.name:<28} {layer.kind:<6} {f'{layer.in_channels} -> {layer.out_channels}':>13} "
            f"{kernel:>6} {layer.stride[0]:>6} {fmap:>7} {layer.macs:>12,} {layer.macs / total_macs:>6.1%} "
            f"{layer.params:>10,}  {what}"
        )
    smallest = smallest_budget(layers, config.decomposition, config.min_ratio, config.exclude)
    lines += [
        "",
        f"{config.model}: {len(layers)} conv / linear layers, {len(steps)} searched with {config.decomposition}"
        + (
            ""
            if get_method(single_method(config.decomposition)).pointwise
            else " (1x1 convs and linear layers: svd)"
        )
        + f"; {total_macs:,} MACs and {total_params:,} parameters in all",
        f"smallest reachable budget: --flops {smallest:.4f} (every searched layer at --min-ratio "
        f"{config.min_ratio:g}); asked: --flops {config.flops:g}",
    ]
    return "\n".join(lines)


def mixed_roles(layers: list[LayerInfo], exclude: list[str] | None) -> dict[str, str]:
    """What ``--decomposition mixed`` may do with the layers of its prunable pairs."""
    by_name = {layer.name: layer for layer in layers}
    roles = {}
    for producer, head in prunable_pairs(layers, exclude).items():
        roles[producer] = f"{method_for(by_name[producer], MIXED)}, or pruned outputs with {head.name}"
        roles[head.name] = f"{method_for(head, MIXED)}, or pruned input channels with {producer}"
    return roles
