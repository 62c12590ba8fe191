"""Your own model from Python (``rlrank.compress``), reloading it in a fresh process, loading your own
checkpoints, ``--exclude`` and ``--dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from custom_models import MyNet

import rlrank
from rlrank.data import DataConfig, load_data
from rlrank.errors import ConfigError
from rlrank.models import ModelError
from rlrank.runlog import read_rows
from rlrank.search import main

TESTS = Path(__file__).resolve().parent
QUICK = dict(episodes=3, warmup=1, finetune_steps=1, bn_batches=1, final_epochs=0, latency=False)
FAST = [
    "--model", "tiny", "--episodes", "3", "--warmup", "1", "--dense-epochs", "0.3", "--final-epochs", "0",
    "--finetune-steps", "1", "--bn-batches", "1", "--quiet", "--no-latency",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def restore_model_registry():
    """``rlrank.compress`` registers the user's model by name; other test modules see the built-ins only."""
    from rlrank import models

    saved = dict(models._REGISTRY)
    yield
    models._REGISTRY.clear()
    models._REGISTRY.update(saved)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig("digits", val_size=0.2))


@pytest.fixture(scope="module")
def trained(digits) -> MyNet:
    from rlrank.finetune import TrainConfig, train_epochs

    torch.manual_seed(0)
    model = MyNet()
    train_epochs(
        model,
        digits,
        TrainConfig(epochs=1, lr=0.05, batch_size=64),
        torch.Generator().manual_seed(0),
        progress=False,
    )
    return model


@pytest.fixture(scope="module")
def compressed_run(trained, digits, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("api")
    return rlrank.compress(trained, digits, flops=0.5, out=str(out), progress=False, **QUICK)


def test_compress_your_own_model(compressed_run, trained):
    report = compressed_run
    run = Path(report["run_dir"])
    assert run.name.startswith("mynet-tucker2-ddpg-flops0.5-")
    assert report["compressed"]["flops_ratio"] <= 0.5 and report["reward_evaluations"] == 3
    assert not (run / "dense.pt").exists()  # the given model was trained: nothing trained here
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert set(rows[0]["layers"]) == {"body", "head"} or "body" in rows[0]["layers"]
    assert trained.training  # the caller's model is untouched (a copy was compressed)


def test_compress_logs_like_the_command(trained, digits, tmp_path, capfd):
    rlrank.compress(trained, digits, flops=0.6, out=str(tmp_path), progress=False, **QUICK)
    err = capfd.readouterr().err
    assert "run folder:" in err and "dense test accuracy" in err


def test_the_model_file_reloads_in_a_fresh_process(compressed_run):
    path = Path(compressed_run["run_dir"]) / "model.pt"
    code = (
        "import sys, torch, rlrank\n"
        f"model = rlrank.load({str(path)!r})\n"
        "print(type(model).__name__, tuple(model(torch.zeros(2, 1, 8, 8)).shape), model.training)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MyNet", "(2,", "10)", "False"]


def test_a_model_whose_code_is_gone_is_a_clear_error(compressed_run, tmp_path):
    path = Path(compressed_run["run_dir"]) / "model.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import rlrank\nrlrank.load({str(path)!r})\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "custom_models:MyNet, which cannot be built here" in done.stderr
    assert "register_model" in done.stderr


def test_load_your_own_checkpoint(trained, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": trained.state_dict()}, path)
    with pytest.raises(ModelError, match="rlrank.load\\(path, model="):
        rlrank.load(path)
    loaded = rlrank.load(path, model=MyNet())
    x = torch.randn(3, 1, 8, 8)
    assert not loaded.training and torch.equal(loaded(x), trained.eval()(x))
    trained.train()


def test_compress_refuses_unknown_options_and_taken_names(trained, digits, tmp_path):
    with pytest.raises(ConfigError, match="unknown option\\(s\\) epsiodes"):
        rlrank.compress(trained, digits, out=str(tmp_path), epsiodes=3)
    with pytest.raises(ConfigError, match="taken by a registered model"):
        rlrank.compress(trained, digits, model_name="resnet20", out=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --exclude, --dry-run


def test_exclude_leaves_layers_as_they_are(tmp_path):
    assert main([*FAST, "--exclude", "conv1,fc", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert set(rows[0]["layers"]) == {"conv2", "conv3"}
    assert all(r["flops_ratio"] <= 0.5 for r in rows)
    model = rlrank.load(run / "model.pt")
    assert type(model.conv1) is torch.nn.Conv2d and type(model.fc) is torch.nn.Linear


@pytest.mark.parametrize(
    ("exclude", "fragment"), [("layer9.*", "matches no layer"), ("*", "leaves no compressible")]
)
def test_bad_exclude_is_one_line(exclude, fragment, tmp_path, capsys):
    assert main([*FAST, "--exclude", exclude, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_the_layers_and_writes_nothing(tmp_path, capsys):
    assert main([*FAST, "--exclude", "fc", "--dry-run", "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["conv2"].endswith("tucker2") and lines["fc"].endswith("excluded (--exclude)")
    assert "smallest reachable budget: --flops" in out and "4 conv / linear layers" in out
    assert not (tmp_path / "runs").exists()
    json.dumps(out)  # plain text
