"""Per-layer latency tables: what each layer costs in milliseconds, dense and factorized at a grid of
rank ratios, measured on the run's device at one batch size; the latency budget's price list.

The whole model's latency is modelled as the sum of its layers' plus a fixed rest (normalization,
activations, pooling, the layers not searched): ``fixed_ms = measured model - sum of its layers``.
Between grid points a layer's latency is interpolated linearly; each curve is made non-decreasing
in the ratio (running maximum of the measurements), so that budgets can be bisected. Tables are
cached per model structure, method, batch size, device, threads and torch version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rlrank.atomic import write_json
from rlrank.describe import geometry_of
from rlrank.errors import StorageError
from rlrank.inference import ChannelsLast, faster_layout, groupings, is_chain
from rlrank.layers import LayerInfo
from rlrank.methods import get_method
from rlrank.methods.prune import sliced_outputs
from rlrank.modes import preserved_modes
from rlrank.planning import current_ratio, method_for, plan_layer
from rlrank.timing import time_interleaved

logger = logging.getLogger(__name__)

LATENCY_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
"""Rank ratios at which every layer's factorized form is timed (those below ``min_ratio`` are skipped)."""
TABLE_FORMAT = "rlrank-latency/3"
ROUNDS = 25
"""Timed forward passes of each form of a layer (after a warm-up)."""


@dataclass
class LayerLatency:
    """One layer's latency: as it is now (``dense_ms``) and factorized at each of ``ratios``.

    Attributes:
        name: The layer's module name.
        dense_ms: Milliseconds of the layer as it is now.
        ratios: The grid of rank ratios, increasing.
        factorized_ms: Milliseconds of its factorized form at each ratio (non-decreasing).
    """

    name: str
    dense_ms: float
    ratios: list[float]
    factorized_ms: list[float]

    def factorized(self, ratio: float) -> float:
        """Milliseconds of the factorized form at ``ratio`` (linear between grid points)."""
        return float(np.interp(ratio, self.ratios, self.factorized_ms))


@dataclass
class LatencyTable:
    """The latency of a model's searched layers, and of the model, on one device at one batch size.

    Attributes:
        device: The device measured (``cpu``, ``cuda``).
        batch: The batch size measured.
        model_ms: The whole model's measured latency, or the sum of its searched layers' (plus
            ``fixed_ms``) when that is larger (timing noise, on a model made almost only of its
            searched layers), so that the dense strategy predicts exactly the dense latency.
        fixed_ms: What the model costs beyond its searched layers (``model_ms`` minus their sum, at
            least 0).
        layers: One :class:`LayerLatency` per searched layer, by name.
        channels_last: Whether everything was timed in ``channels_last`` layout (the model's faster
            one at this batch size and device, measured).
    """

    device: str
    batch: int
    model_ms: float
    fixed_ms: float
    layers: dict[str, LayerLatency]
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.model_ms = max(
            self.model_ms, self.fixed_ms + sum(entry.dense_ms for entry in self.layers.values())
        )

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        layers = {name: LayerLatency(**value) for name, value in data["layers"].items()}
        return cls(
            data["device"], data["batch"], data["model_ms"], data["fixed_ms"], layers, data["channels_last"]
        )


def measure_table(
    model: nn.Module,
    steps: Sequence[LayerInfo],
    decomposition: str,
    input_shape: tuple[int, int, int],
    batch: int,
    device: torch.device,
    min_ratio: float = 0.05,
    rounds: int = ROUNDS,
    progress: bool = False,
) -> LatencyTable:
    """Time every layer in ``steps`` as it is and factorized at :data:`LATENCY_GRID` (each ratio in
    its fastest grouping of factors, :func:`rlrank.inference.groupings`), and the model.

    A layer's forms are timed in interleaved rounds (one forward pass of each per round) and each
    keeps the lower quartile of its times, so that a slow spell of a shared machine lands on all of
    them alike instead of on one. Weights do not change latency: factorized forms get random factors.
    """
    device = torch.device(device)
    grid = sorted({min_ratio, *[r for r in LATENCY_GRID if r >= min_ratio]})
    layers: dict[str, LayerLatency] = {}
    bar = tqdm(steps, desc=f"timing layers (batch {batch})", unit="layer", disable=not progress, leave=False)
    with torch.no_grad(), preserved_modes(model):
        model.eval()
        x = torch.randn((batch, *input_shape), device=device)
        runner = faster_layout(model, x, rounds)  # the layout the model runs fastest in
        channels_last = isinstance(runner, ChannelsLast)
        inputs = _input_shapes(model, x, [str(s.producer) for s in steps if s.producer is not None])
        for layer in bar:
            module = model.get_submodule(layer.name)
            shape = (layer.in_channels,) if layer.kind == "linear" else (layer.in_channels, *layer.in_hw)
            method = method_for(layer, decomposition)
            forms, owners = [module], [-1]
            if method == "prune":  # the layer and its producer, narrower together
                producer = model.get_submodule(str(layer.producer))
                forms = [_PrunedPair(producer, module, torch.randn((batch, *shape), device=device))]
                shape = inputs[str(layer.producer)]
            for index, ratio in enumerate(grid):
                ranks = plan_layer(layer, ratio, decomposition, allow_dense=False).ranks
                factorized = get_method(method).build_module(geometry_of(module), ranks).to(device).eval()
                for param in factorized.parameters():  # uninitialized memory may hold slow denormals
                    nn.init.normal_(param, std=0.05)
                if method == "prune":
                    narrower = torch.randn((batch, ranks[0], *_map_shape(layer)), device=device)
                    kept = torch.arange(ranks[0], device=device)
                    grouped = [_PrunedPair(sliced_outputs(producer, kept), factorized.layer, narrower)]
                else:
                    grouped = groupings(factorized) if is_chain(factorized) else [factorized]
                forms += grouped
                owners += [index] * len(grouped)
            if channels_last and layer.kind != "linear":
                forms = [ChannelsLast(copy.deepcopy(form)) for form in forms]
            times = time_interleaved(forms, torch.randn((batch, *shape), device=device), rounds)
            fastest = [
                min(t for t, owner in zip(times, owners, strict=True) if owner == i) for i in range(len(grid))
            ]
            layers[layer.name] = LayerLatency(
                layer.name, times[0], grid, np.maximum.accumulate(fastest).tolist()
            )
        (model_ms,) = time_interleaved([runner], x, rounds)
    fixed = max(0.0, model_ms - sum(entry.dense_ms for entry in layers.values()))
    return LatencyTable(device.type, batch, model_ms, fixed, layers, channels_last)


class _PrunedPair(nn.Module):
    """What pruning a layer's input channels changes, for timing: its producer on the producer's
    input, then the layer on an input of its (narrower) width. The per-channel operations between
    them (BatchNorm, activation) are left in the fixed rest."""

    def __init__(self, producer: nn.Module, layer: nn.Module, layer_input: torch.Tensor) -> None:
        super().__init__()
        self.producer = producer
        self.layer = layer
        self.register_buffer("layer_input", layer_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.producer(x)
        return self.layer(self.layer_input)


def _map_shape(layer: LayerInfo) -> tuple[int, ...]:
    """A layer's input shape after its channels: its input map, or nothing for a linear layer."""
    return () if layer.kind == "linear" else tuple(layer.in_hw)


def _input_shapes(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Each named module's input shape (one input, batch left out) on ``x``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in names]
    try:
        model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def table_key(
    steps: Sequence[LayerInfo],
    decomposition: str,
    input_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
) -> str:
    """What a cached table depends on: the layers' geometry and current ranks, the method, the input,
    the batch, the device (and its name), torch's version and thread count."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    parts = [
        [
            (s.name, s.kind, s.in_channels, s.out_channels, s.kernel, s.stride, s.in_hw, s.ranks)
            for s in steps
        ],
        decomposition,
        list(input_shape),
        batch,
        name,
        torch.__version__,
        torch.get_num_threads(),
        LATENCY_GRID,
    ]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def latency_table(
    model: nn.Module,
    steps: Sequence[LayerInfo],
    decomposition: str,
    input_shape: tuple[int, int, int],
    batch: int,
    device: torch.device,
    cache_dir: Path,
    min_ratio: float = 0.05,
    progress: bool = False,
) -> LatencyTable:
    """The model's latency table from ``cache_dir`` when measured before, else measured and cached."""
    path = Path(cache_dir) / "latency" / f"{table_key(steps, decomposition, input_shape, batch, device)}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if (
                data.get("format") == TABLE_FORMAT
                and min(next(iter(data["layers"].values()))["ratios"]) <= min_ratio
            ):
                logger.info("latency table from the cache %s", path)
                return LatencyTable.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
            logger.warning("ignoring the damaged latency table %s (%s)", path, exc)
    logger.info(
        "timing %d layers at %d rank ratios (batch %d, %s), once per model and device",
        len(steps),
        len(LATENCY_GRID),
        batch,
        device,
    )
    table = measure_table(
        model, steps, decomposition, input_shape, batch, device, min_ratio, progress=progress
    )
    try:
        write_json(path, table.to_dict())
    except StorageError as exc:
        logger.warning("could not cache the latency table: %s", exc)
    return table


def predicted_latency_ratio(
    table: LatencyTable, layers: Sequence[LayerInfo], dense_layers: Sequence[LayerInfo] = ()
) -> float:
    """A model's latency as a fraction of the dense model's, predicted from ``table``: each of its
    layers in the table at its current ranks (dense or factorized) or, when narrower than in
    ``dense_layers`` (pruned), at its kept fraction of input channels; plus the fixed rest."""
    widths = {layer.name: layer.in_channels for layer in dense_layers}
    spent = 0.0
    for layer in layers:
        entry = table.layers.get(layer.name)
        if entry is None:
            continue
        if layer.method is not None:
            spent += entry.factorized(current_ratio(layer))
        elif layer.in_channels < widths.get(layer.name, layer.in_channels):
            spent += entry.factorized(layer.in_channels / widths[layer.name])
        else:
            spent += entry.dense_ms
    return (table.fixed_ms + spent) / table.model_ms
