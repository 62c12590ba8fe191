"""Model registry (name -> builder) and checkpoint loading.

Every builder takes the same keyword arguments, so ``--model NAME`` works for any registered model
on any data set::

    model = build_model(ModelSpec("resnet20", num_classes=10, in_channels=3, input_size=32))

Models made for ImageNet-sized inputs (``resnet18``, ``mobilenet_v2``, ``vgg16_bn``) switch to the
usual small-image variant when ``input_size`` is small (below 64 pixels): a 3x3 stride-1 first
convolution without max-pool for ResNet-18, a stride-1 stem for MobileNetV2, and for VGG only as
many max-pools as the feature map allows and a single linear classifier on the pooled features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlrank.errors import UserError
from rlrank.safe_load import read_tensors

logger = logging.getLogger(__name__)

SMALL_INPUT = 64
"""Inputs below this many pixels per side get the small-image (CIFAR-style) variant of a model."""


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a registered architecture.

    Attributes:
        name: Registry name (see :func:`list_models`).
        num_classes: Number of output classes.
        in_channels: Number of input image channels.
        input_size: Height (= width) of the input images in pixels.
    """

    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{k: data[k] for k in ("name", "num_classes", "in_channels", "input_size")})


class ModelError(UserError):
    """A model name, checkpoint or set of weights that cannot be used."""


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, option-A shortcuts), key-compatible with Idelbayev's checkpoints
# --------------------------------------------------------------------------------------------


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: three stages of 16/32/64 channels, ``n`` blocks each."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


CIFAR_RESNET_URLS = {
    "resnet20": "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th",
    "resnet32": "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet32-d509ac18.th",
    "resnet44": "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet44-014dd654.th",
    "resnet56": "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet56-4bfd9763.th",
}


class TinyCNN(nn.Module):
    """Three convolutions and a linear classifier: the model the test suite compresses."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``fn(num_classes, in_channels, input_size, pretrained)``."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def builder_of(name: str) -> Builder | None:
    """The registered builder of ``name`` (``None`` when unknown)."""
    return _REGISTRY.get(name)


def list_models() -> list[str]:
    """Names accepted by :func:`build_model` (and ``--model``), sorted."""
    return sorted(_REGISTRY)


def _torchvision_weights(name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _load_torchvision_pretrained(model: nn.Module, name: str) -> None:
    """Load torchvision's published weights, keeping only tensors whose shapes fit ``model``."""
    weights = _torchvision_weights(name)
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # network errors come in many types
        raise ModelError(
            f"could not download torchvision's pretrained weights for {name!r} "
            f"({type(exc).__name__}: {exc}); are you offline? Pass --checkpoint PATH instead"
        ) from exc
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(fitting))
    model.load_state_dict(fitting, strict=False)
    if skipped:
        logger.warning(
            "pretrained %s: %d tensors do not fit this variant and stay freshly initialised (first: %s)",
            name,
            len(skipped),
            skipped[0],
        )


@register_model("resnet18")
def resnet18(
    num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, pretrained: bool = False
) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(num_classes=num_classes)
    if input_size < SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if pretrained:
        _load_torchvision_pretrained(model, "resnet18")
    return model


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, pretrained: bool = False
) -> nn.Module:
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    model = tv_mobilenet_v2(num_classes=num_classes)
    stem = model.features[0][0]
    if input_size < SMALL_INPUT or in_channels != 3:
        stride = 1 if input_size < SMALL_INPUT else 2
        model.features[0][0] = nn.Conv2d(
            in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False
        )
    if pretrained:
        _load_torchvision_pretrained(model, "mobilenet_v2")
    return model


@register_model("vgg16_bn")
def vgg16_bn(
    num_classes: int = 1000, in_channels: int = 3, input_size: int = 224, pretrained: bool = False
) -> nn.Module:
    from torchvision.models import vgg16_bn as tv_vgg16_bn

    model = tv_vgg16_bn(num_classes=num_classes)
    if in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    if input_size < SMALL_INPUT:
        size = input_size
        for i, layer in enumerate(model.features):
            if isinstance(layer, nn.MaxPool2d):
                if size >= 2:
                    size //= 2
                else:
                    model.features[i] = nn.Identity()
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(512, num_classes))
    if pretrained:
        _load_torchvision_pretrained(model, "vgg16_bn")
    return model


def _cifar_resnet_builder(name: str, n: int) -> Builder:
    def build(
        num_classes: int = 10, in_channels: int = 3, input_size: int = 32, pretrained: bool = False
    ) -> nn.Module:
        model = CifarResNet(n, num_classes=num_classes, in_channels=in_channels)
        if pretrained:
            try:
                state = torch.hub.load_state_dict_from_url(
                    CIFAR_RESNET_URLS[name], map_location="cpu", progress=False, weights_only=True
                )
            except Exception as exc:
                raise ModelError(
                    f"could not download pretrained {name} ({type(exc).__name__}: {exc}); are you offline? "
                    "Pass --checkpoint PATH (e.g. ../shared/models/cifar-resnet/resnet20.th) instead"
                ) from exc
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            load_state_into(model, state, source=f"pretrained {name}")
        return model

    build.__name__ = name
    build.__doc__ = f"CIFAR {name} (option-A shortcuts), {n} blocks per stage."
    return build


for _name, _n in (("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9)):
    register_model(_name)(_cifar_resnet_builder(_name, _n))


@register_model("tiny")
def tiny(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, pretrained: bool = False
) -> nn.Module:
    if pretrained:
        raise ModelError("the tiny test model has no pretrained weights")
    return TinyCNN(num_classes=num_classes, in_channels=in_channels)


def build_model(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """Build a registered architecture.

    Args:
        spec: Name and input/output shape of the model.
        pretrained: Load published weights (needs internet).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ModelError: Unknown name (the message lists the known ones), or weights unavailable.
    """
    if spec.name not in _REGISTRY:
        raise ModelError(f"unknown model {spec.name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[spec.name](
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        pretrained=pretrained,
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) and return a plain state dict.

    Accepts a plain state dict or a dict holding one under ``state_dict`` or ``model``, with or
    without the ``module.`` prefix that ``DataParallel`` adds.

    Raises:
        ModelError: The file is missing, unreadable, not a safe checkpoint, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    obj = read_tensors(path, "checkpoint", ModelError)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly, naming the first key that does not fit.

    Raises:
        ModelError: Missing or unexpected keys, or a tensor of the wrong shape.
    """
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise ModelError(f"{source} does not fit this model: unexpected key {key!r}")
        if own[key].shape != value.shape:
            raise ModelError(
                f"{source} does not fit this model: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in state]
    # checkpoints older than BatchNorm's ``num_batches_tracked`` buffer (PyTorch < 0.4.1, e.g. the
    # original CIFAR ResNets) lack it: keep the model's own value, as ``load_state_dict`` would
    legacy = [k for k in missing if k.endswith(".num_batches_tracked") or k == "num_batches_tracked"]
    if legacy:
        state = {**state, **{k: own[k] for k in legacy}}
        missing = [k for k in missing if k not in legacy]
    if missing:
        raise ModelError(
            f"{source} does not fit this model: missing key {missing[0]!r} ({len(missing)} missing)"
        )
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the weights at ``path`` into ``model`` (see :func:`read_state_dict`)."""
    load_state_into(model, read_state_dict(path), source=f"checkpoint {path}")
