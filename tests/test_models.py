"""Model registry and checkpoint loading (``rlrank.models``)."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from rlrank.models import (
    ModelError,
    ModelSpec,
    build_model,
    list_models,
    load_checkpoint,
    load_state_into,
    read_state_dict,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


ALL_MODELS = ["mobilenet_v2", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56", "tiny", "vgg16_bn"]


def test_registry_lists_every_model() -> None:
    assert list_models() == ALL_MODELS


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError, match="unknown model 'resnet19'") as info:
        build_model(ModelSpec("resnet19"))
    assert all(name in str(info.value) for name in ALL_MODELS)


def test_model_spec_round_trip() -> None:
    spec = ModelSpec("resnet20", num_classes=7, in_channels=1, input_size=8)
    assert ModelSpec.from_dict({**spec.to_dict(), "extra": 1}) == spec


def test_resnet18_small_input_stem() -> None:
    model = build_model(ModelSpec("resnet18", num_classes=10, input_size=32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_resnet18_imagenet_stem() -> None:
    model = build_model(ModelSpec("resnet18", num_classes=10, input_size=224))
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    gray = build_model(ModelSpec("resnet18", num_classes=10, in_channels=1, input_size=224))
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7)


def test_mobilenet_v2_small_input_stem_has_stride_1() -> None:
    small = build_model(ModelSpec("mobilenet_v2", input_size=32)).features[0][0]
    large = build_model(ModelSpec("mobilenet_v2", input_size=224)).features[0][0]
    assert small.stride == (1, 1) and large.stride == (2, 2)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shapes(name: str) -> None:
    """Every model runs on 8x8 and 32x32 inputs with 1 or 3 channels and gives (N, num_classes)."""
    for size in (8, 32):
        for channels in (1, 3):
            model = build_model(ModelSpec(name, num_classes=7, in_channels=channels, input_size=size)).eval()
            with torch.no_grad():
                out = model(torch.randn(2, channels, size, size))
            assert out.shape == (2, 7), (name, size, channels)
            assert torch.isfinite(out).all()


def test_tiny_has_no_pretrained_weights() -> None:
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model(ModelSpec("tiny"), pretrained=True)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


def _tiny(seed: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelSpec("tiny", num_classes=num_classes))
    with torch.no_grad():  # make the BN buffers differ between seeds as well
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: s, id="plain"),
        pytest.param(lambda s: {"state_dict": s, "best_prec1": 91.5}, id="state_dict"),
        pytest.param(lambda s: {"model": s, "epoch": 3}, id="model"),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="plain-module"),
        pytest.param(
            lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}}, id="state_dict-module"
        ),
    ],
)
def test_checkpoint_formats_load(tmp_path: Path, wrap) -> None:
    source = _tiny(seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    target = _tiny(seed=2)
    assert not torch.equal(target.conv1.weight, source.conv1.weight)
    load_checkpoint(target, path)
    _assert_same_state(target, source)
    assert all(not k.startswith("module.") for k in read_state_dict(path))


def test_shape_mismatch_names_first_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save(_tiny(seed=1, num_classes=5).state_dict(), path)
    with pytest.raises(ModelError, match=r"'fc\.weight' has shape \(5, 32\)"):
        load_checkpoint(_tiny(seed=2, num_classes=10), path)


def test_missing_and_unexpected_keys_are_named() -> None:
    state = _tiny(seed=1).state_dict()
    missing = {k: v for k, v in state.items() if k != "bn3.running_var"}
    with pytest.raises(ModelError, match="missing key 'bn3.running_var'"):
        load_state_into(_tiny(seed=2), missing)
    with pytest.raises(ModelError, match="unexpected key 'head.weight'"):
        load_state_into(_tiny(seed=2), {**state, "head.weight": torch.zeros(1)})


def test_legacy_checkpoint_without_num_batches_tracked(tmp_path: Path) -> None:
    source = _tiny(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    target = _tiny(seed=2)
    load_checkpoint(target, path)
    _assert_same_state(target, source)


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="cannot read checkpoint") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_checkpoint(_tiny(seed=0), tmp_path / "absent.pt")


@pytest.mark.parametrize("obj", [{"epoch": 3}, {}, [torch.zeros(2)]])
def test_checkpoint_without_tensors(tmp_path: Path, obj) -> None:
    path = tmp_path / "empty.pt"
    torch.save(obj, path)
    with pytest.raises(ModelError, match="holds no state dict of tensors"):
        read_state_dict(path)


class _RunsCode:
    """Unpickling this object runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "MARKER"
    payload = {"conv1.weight": torch.zeros(1), "evil": _RunsCode(f"touch {shlex.quote(str(marker))}")}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        read_state_dict(path)
    assert not marker.exists()
    # control: the file really runs code when unpickled unsafely
    if writer == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)  # noqa: S301 - the point of the control
    assert marker.exists()


# ------------------------------------------------------------------------------------------
# The real CIFAR ResNets in ../shared
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, filename",
    [
        ("resnet20", "resnet20.th"),
        ("resnet20", "resnet20-jpeg.pt"),
        ("resnet56", "resnet56.th"),
        ("resnet56", "resnet56-jpeg.pt"),
    ],
)
def test_shared_cifar_resnets_load_strictly(shared_dir: Path, name: str, filename: str) -> None:
    path = shared_dir / "models" / "cifar-resnet" / filename
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    state = read_state_dict(path)
    model = build_model(ModelSpec(name, num_classes=10, in_channels=3, input_size=32))
    load_checkpoint(model, path)
    own = model.state_dict()
    # the original .th files predate BatchNorm's num_batches_tracked; nothing else may be absent
    assert set(state) <= set(own)
    assert all(k.endswith("num_batches_tracked") for k in set(own) - set(state))
    assert all(torch.equal(own[k], state[k]) for k in state)
    # the other depth does not fit, and the error names the first key that differs
    other = "resnet56" if name == "resnet20" else "resnet20"
    with pytest.raises(ModelError, match="(unexpected|missing) key 'layer1.3"):
        load_checkpoint(build_model(ModelSpec(other)), path)


@pytest.mark.slow
def test_shared_resnet20_jpeg_accuracy(shared_dir: Path, cifar10_jpeg) -> None:
    """The fine-tuned ResNet-20 scores its published 88.00 % on the JPEG test split."""
    path = shared_dir / "models" / "cifar-resnet" / "resnet20-jpeg.pt"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    model = build_model(ModelSpec("resnet20", num_classes=10, in_channels=3, input_size=32))
    load_checkpoint(model, path)
    model.eval()
    data = cifar10_jpeg
    correct = 0
    with torch.no_grad():
        for x, y in data.batches(data.test, 500):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(data.test) == pytest.approx(0.88, abs=0.005)
