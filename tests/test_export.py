"""Inference fusion (BatchNorm folded into the convolution before it) and ``rlrank-export``: ONNX and
TorchScript files checked against PyTorch, runnable without rlrank, and bad input refused in one line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rlrank
from rlrank import export as export_module
from rlrank.describe import describe_layers
from rlrank.export import ExportMismatch, export_model, load_exported
from rlrank.export import main as export_main
from rlrank.factor_cache import FactorCache
from rlrank.fusion import count_batchnorm, fuse_for_inference, fuse_model
from rlrank.methods.tensor_network import SharedConv
from rlrank.models import ModelSpec, build_model
from rlrank.planning import is_compressible, plan_layer
from rlrank.search import main as search_main
from rlrank.surgery import decompose_model

FAST = [
    "--model", "tiny", "--episodes", "2", "--warmup", "1", "--dense-epochs", "0.3", "--final-epochs", "0",
    "--finetune-steps", "1", "--bn-batches", "1", "--quiet", "--no-latency",
]  # fmt: skip


def _random_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm statistics and affine parameters far from the identity, so a fold that
    forgets one of them shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
    return model


def _compressed(name: str, method: str, size: int) -> nn.Module:
    """``name`` with every compressible layer factorized by ``method`` at ratio 0.5 (no search)."""
    torch.manual_seed(0)
    model = _random_batchnorm(build_model(ModelSpec(name, 10, 3, size)))
    layers = [layer for layer in describe_layers(model, (3, size, size)) if is_compressible(layer, method)]
    plans = [plan_layer(layer, 0.5, method) for layer in layers]
    return decompose_model(model, plans, FactorCache(model, layers, method)).train()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


# ------------------------------------------------------------------------------------------ fusion


@pytest.mark.parametrize(
    ("name", "method", "size"),
    [("tiny", "tucker2", 8), ("tiny", "cp", 8), ("resnet20", "tucker2", 32), ("resnet20", "tt", 32),
     ("resnet20", "svd", 32)],
)  # fmt: skip
def test_fusion_folds_every_batchnorm_and_keeps_the_outputs(name, method, size):
    model = _compressed(name, method, size)
    bns = count_batchnorm(model)
    fused = fuse_for_inference(model)
    assert bns > 0 and count_batchnorm(fused) == 0  # every BN of these models follows a conv
    assert model.training and count_batchnorm(model) == bns  # the original is untouched
    assert not any(m.training for m in fused.modules())
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        expected, got = model.eval()(x), fused(x)
    assert _relative_error(expected, got) < 1e-5
    # the fold lands in the factorized layer's last factor, which now carries a bias
    block = fused.layer1[0].conv1 if name == "resnet20" else fused.conv2
    assert block.method == method and block[-1].bias is not None


def test_a_shared_tensor_network_factor_becomes_a_plain_grouped_conv():
    fused = fuse_for_inference(_compressed("resnet20", "tt", 32))
    last = fused.layer2[0].conv2[-1]
    assert type(last) is nn.Conv2d and last.groups > 1  # one BN scale per output channel, not per copy
    assert not isinstance(last, SharedConv) and last.weight.shape[0] == last.out_channels


class BatchNormAfterRelu(nn.Module):
    """A BN after a ReLU, a BN after a conv whose output is also used elsewhere, and one that folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1, bias=True), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(torch.relu(self.conv1(x)))
        y = self.conv2(x)
        return self.bn3(self.conv3(self.bn2(y) + y))


def test_only_a_batchnorm_right_after_a_conv_is_folded():
    model = _random_batchnorm(BatchNormAfterRelu())
    result = fuse_model(model)
    assert result.traced and result.fused == ["bn3"]
    assert isinstance(result.model.bn3, nn.Identity) and isinstance(result.model.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert _relative_error(model.eval()(x), result.model(x)) < 1e-5


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # data-dependent control flow: torch.fx cannot trace it


def test_an_untraceable_model_comes_back_unfused_with_a_warning(caplog):
    model = _random_batchnorm(Untraceable()).train()
    with caplog.at_level(logging.WARNING, logger="rlrank.fusion"):
        fused = fuse_for_inference(model)
    assert any("cannot be traced" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert count_batchnorm(fused) == 1 and not fused.training and model.training
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fused(x))


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run folder from a quick search of the tiny model on the embedded digits (1x8x8)."""
    root = tmp_path_factory.mktemp("runs")
    assert search_main([*FAST, "--out", str(root)]) == 0
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def exported(run_dir) -> dict[str, Path]:
    """Both formats exported from the run folder by the command, at their default paths."""
    for fmt in ("onnx", "torchscript"):
        assert export_main([str(run_dir), "--format", fmt]) == 0
    return {"onnx": run_dir / "model.onnx", "torchscript": run_dir / "model.torchscript.pt"}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_command_exports_a_run_checked_against_pytorch(fmt, run_dir, exported, capsys):
    assert exported[fmt].is_file() and not list(run_dir.glob(".*.tmp"))
    model = rlrank.load(run_dir / "model.pt")
    run = load_exported(exported[fmt], fmt)
    x = torch.randn(7, 1, 8, 8)  # another batch size than the export's: the batch axis is dynamic
    with torch.no_grad():
        (got,) = run(x)
        assert _relative_error(model(x), got) < 1e-5
    # the printed result, from a second export to another file
    out = run_dir / f"again-{fmt}.bin"
    assert export_main([str(run_dir), "--format", fmt, "--out", str(out), "--batch", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out}") and "(batch, 1, 8, 8)" in lines[0]
    diff = float(lines[1].split(":")[1])
    assert 0 <= diff < 1e-4 and "latency at batch 1: PyTorch" in lines[2] and " ms" in lines[2]


def test_exported_files_run_without_rlrank(run_dir, exported, tmp_path):
    """A fresh interpreter without site (-S: no editable-install hook) or the working folder (-I):
    only torch's site-packages folder on the path, so rlrank cannot be imported."""
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = rlrank.load(run_dir / "model.pt")(torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    script = (
        "import sys, importlib.util\n"
        "sys.path.append(sys.argv[1])\n"
        "assert importlib.util.find_spec('rlrank') is None, 'rlrank is importable'\n"
        "import numpy as np, onnxruntime, torch\n"
        "x, expected = np.load(sys.argv[4]), np.load(sys.argv[5])\n"
        "session = onnxruntime.InferenceSession(sys.argv[2], providers=['CPUExecutionProvider'])\n"
        "a = session.run(None, {session.get_inputs()[0].name: x})[0]\n"
        "b = torch.jit.load(sys.argv[3])(torch.from_numpy(x)).detach().numpy()\n"
        "assert 'rlrank' not in sys.modules\n"
        "print(float(abs(a - expected).max()), float(abs(b - expected).max()))\n"
    )
    site = str(Path(torch.__file__).resolve().parents[1])
    args = [site, exported["onnx"], exported["torchscript"], tmp_path / "x.npy", tmp_path / "expected.npy"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    onnx_diff, script_diff = map(float, done.stdout.split())
    assert onnx_diff < 1e-4 and script_diff < 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_model_handles_a_compressed_resnet20_in_channels_last(fmt, tmp_path):
    model = _compressed("resnet20", "tucker2", 32).eval()
    result = export_model(model, tmp_path / "m", fmt, (3, 32, 32), batch=2, memory_format="channels_last")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.torch_ms > 0 and result.export_ms > 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert _relative_error(model(x), load_exported(result.path, fmt)(x)[0]) < 1e-5


def test_an_export_that_does_not_match_writes_nothing(run_dir, monkeypatch, capsys):
    real = export_module._runner_of

    def off_by_one(data, fmt):
        run = real(data, fmt)
        return lambda x: [y + 1 for y in run(x)]

    monkeypatch.setattr(export_module, "_runner_of", off_by_one)
    out = run_dir / "wrong.onnx"
    assert export_main([str(run_dir), "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from PyTorch" in err[0] and not out.exists()
    with pytest.raises(ExportMismatch):
        export_model(rlrank.load(run_dir / "model.pt"), out, "torchscript", (1, 8, 8))
    assert not out.exists() and not list(run_dir.glob(".*.tmp"))


def _refused(argv, capsys, folder: Path, fragment: str) -> None:
    before = sorted(p.name for p in folder.iterdir())
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert "Traceback" not in err[0] and sorted(p.name for p in folder.iterdir()) == before


def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):
    _refused([str(tmp_path / "missing"), "--format", "onnx"], capsys, tmp_path, "not found")
    _refused([str(tmp_path), "--format", "onnx"], capsys, tmp_path, "holds no model.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")  # a plain checkpoint, not an rlrank model
    _refused([str(tmp_path / "plain.pt"), "--format", "onnx"], capsys, tmp_path, "not an rlrank model file")
    (tmp_path / "notes.pt").write_text("not a torch file")
    _refused([str(tmp_path / "notes.pt"), "--format", "torchscript"], capsys, tmp_path, "notes.pt")
    _refused([str(run_dir), "--format", "tflite"], capsys, run_dir, "invalid choice: 'tflite'")
    _refused([str(run_dir), "--format", "onnx", "--batch", "0"], capsys, run_dir, "--batch")
    _refused([str(run_dir), "--format", "onnx", "--out", str(tmp_path)], capsys, tmp_path, "is a folder")
    _refused([str(run_dir)], capsys, run_dir, "--format")


def test_a_missing_onnxruntime_names_the_extra(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    _refused([str(run_dir), "--format", "onnx"], capsys, run_dir, 'pip install "rlrank[export]"')
    assert (
        export_main([str(run_dir), "--format", "onnx", "--no-check", "--out", str(run_dir / "u.onnx")]) == 0
    )
    assert (run_dir / "u.onnx").is_file()


def test_help_names_the_formats_and_the_extra(capsys):
    assert export_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "onnx,torchscript" in text and "--no-fuse" in text and "rlrank[export]" in text
