"""What rlrank knows about one conv / linear layer: :class:`LayerInfo` and the dense MAC formulas.

A :class:`LayerInfo` is made once per model by :func:`rlrank.describe.describe_layers` and travels
everywhere: the planner prices strategies from it, the environment builds observations from it, the
factor cache and the episode log name layers by it. It holds no tensor, so it is cheap to copy and
to write as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerInfo:
    """One compressible-or-not conv / linear layer, described by its dense geometry.

    For a layer that is already factorized (an earlier compression stage), the geometry is that of
    the dense layer it stands for, and ``method`` / ``ranks`` say how it is factorized now.

    Attributes:
        name: Qualified module name in the model (``layer1.0.conv1``).
        kind: ``"conv"`` or ``"linear"``.
        in_channels: Input channels (features for linear layers).
        out_channels: Output channels (features).
        kernel: Kernel height and width (1, 1 for linear).
        stride: Stride (1, 1 for linear).
        padding: Padding (0, 0 for linear).
        dilation: Dilation (1, 1 for linear).
        groups: Convolution groups (1 for linear).
        bias: Whether the layer adds a bias.
        in_hw: Input feature-map height and width (1, 1 for linear).
        out_hw: Output feature-map height and width (1, 1 for linear).
        macs: MACs of the dense layer for one input.
        params: Parameters of the dense layer.
        method: Current factorization (``None``: dense).
        ranks: Current ranks when factorized.
        filters: Whole output filters kept dense beside the low-rank factors (a sparse + low-rank
            layer, ``--sparse``; 0 for any other).
        producer: The convolution whose output channels are this layer's input channels and nothing
            else's (through BatchNorm and activations only, :mod:`rlrank.channel_coupling`), or
            ``None``. Channel pruning (``--decomposition prune``) removes input channels of this
            layer together with the producer's output channels.
        producer_macs: MACs of the producer (0 without one).
        producer_params: Parameters of the producer, its bias included (0 without one).
        producer_batchnorms: The BatchNorm layers between the producer and this layer.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    macs: int
    params: int
    method: str | None = None
    ranks: tuple[int, ...] | None = None
    filters: int = 0
    producer: str | None = None
    producer_macs: int = 0
    producer_params: int = 0
    producer_batchnorms: tuple[str, ...] = ()

    @property
    def is_pointwise(self) -> bool:
        """A linear layer or a 1x1 convolution: SVD factorizes these unless the method is ``pointwise``."""
        return self.kind == "linear" or self.kernel == (1, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerInfo:
        data = dict(data)
        data.setdefault("producer_batchnorms", ())
        for key in ("kernel", "stride", "padding", "dilation", "in_hw", "out_hw", "producer_batchnorms"):
            data[key] = tuple(data[key])
        if data.get("ranks") is not None:
            data["ranks"] = tuple(data["ranks"])
        return cls(**data)


def conv_macs(
    in_channels: int, out_channels: int, kernel: tuple[int, int], groups: int, out_hw: tuple[int, int]
) -> int:
    """MACs of a convolution: every output element takes ``in/groups * kh * kw`` products."""
    return out_channels * (in_channels // groups) * kernel[0] * kernel[1] * out_hw[0] * out_hw[1]


def dense_macs(layer: LayerInfo) -> int:
    """MACs of the dense layer ``layer`` describes."""
    if layer.kind == "linear":
        return layer.in_channels * layer.out_channels
    return conv_macs(layer.in_channels, layer.out_channels, layer.kernel, layer.groups, layer.out_hw)


def dense_params(layer: LayerInfo) -> int:
    """Parameters of the dense layer ``layer`` describes."""
    weights = layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel[0] * layer.kernel[1]
    return weights + (layer.out_channels if layer.bias else 0)
