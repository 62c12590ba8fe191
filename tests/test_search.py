"""End to end: the search command line, in-process, on the tiny model and the embedded digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rlrank
from rlrank.flops import count_model
from rlrank.runlog import read_rows
from rlrank.search import main

FAST = [
    "--model", "tiny", "--flops", "0.5", "--episodes", "5", "--warmup", "2", "--dense-epochs", "1",
    "--final-epochs", "0.5", "--finetune-steps", "2", "--bn-batches", "1", "--quiet",
]  # fmt: skip


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []


@pytest.fixture(scope="module")
def ddpg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code = main([*FAST, "--out", str(out)])
    assert code == 0
    (run,) = run_dirs(out)
    return run


def test_cli_leaves_every_artifact(ddpg_run, capsys):
    run = ddpg_run
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "tiny" and config["flops"] == 0.5 and config["episodes"] == 5
    assert run.name.startswith("tiny-tucker2-ddpg-flops0.5-")

    # the dense model was trained here, since no checkpoint was given
    assert (run / "dense.pt").is_file() and json.loads((run / "dense.json").read_text())["trained_here"]

    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["episode"] for r in rows] == list(range(5))
    layer_names = set(rows[0]["layers"])
    for row in rows:
        assert row["flops_ratio"] <= 0.5 + 1e-12
        assert set(row["time"]) == {"decompose", "finetune", "evaluate", "agent", "env", "total"}
        assert set(row["layers"]) == layer_names
        for entry in row["layers"].values():
            assert 0 < entry["ratio"] <= 1 and (entry["ranks"] is None or all(r >= 1 for r in entry["ranks"]))
        assert 0 <= row["accuracy"] <= 1 and row["params_ratio"] > 0
    assert [r["phase"] for r in rows] == ["center", "warmup", "explore", "explore", "explore"]

    best = json.loads((run / "stage-1" / "best_strategy.json").read_text())
    assert best["reward"] == max(r["reward"] for r in rows)
    assert best["flops_ratio"] <= 0.5 and {entry["name"] for entry in best["layers"]} == layer_names

    assert {p.name for p in (run / "stage-1" / "policy").iterdir()} == {
        "policy.pt",
        "policy.json",
        "replay.npz",
    }

    model = rlrank.load(run / "model.pt")
    assert not model.training
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    dense = rlrank.load(run / "dense.pt")
    assert count_model(model, (1, 8, 8)).macs <= 0.5 * count_model(dense, (1, 8, 8)).macs

    report = json.loads((run / "report.json").read_text())
    for key in ("test_accuracy", "val_accuracy", "macs", "params"):
        assert key in report["dense"] and key in report["compressed"]
    assert report["compressed"]["flops_ratio"] <= 0.5
    assert report["latency_ms"]["batch1"]["dense"] > 0 and report["latency_ms"]["batch64"]["compressed"] > 0
    assert report["stages"][0]["episodes"] == 5 and report["reward_evaluations"] == 5
    assert report["device"].startswith("cpu")


def test_cli_prints_dense_and_compressed_accuracy(tmp_path, ddpg_run, capsys):
    code = main(
        [*FAST, "--agent", "uniform", "--checkpoint", str(ddpg_run / "dense.pt"), "--out", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "dense      test accuracy" in out and "compressed test accuracy" in out
    (run,) = run_dirs(tmp_path)
    assert not (run / "dense.pt").exists()  # a checkpoint was given: nothing trained
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert len(rows) == 1 and rows[0]["agent"] == "uniform" and rows[0]["phase"] == "rule"
    ratios = {entry["ratio"] for entry in rows[0]["layers"].values()}
    assert max(ratios) - min(ratios) < 1e-6  # one ratio for every layer


@pytest.mark.parametrize("agent", ["random", "surrogate", "energy", "vbmf", "alds"])
def test_every_agent_meets_the_budget(agent, tmp_path, ddpg_run):
    args = [*FAST, "--flops", "0.35", "--agent", agent, "--episodes", "3", "--warmup", "1", "--final-epochs", "0"]  # fmt: skip
    assert (
        main([*args, "--checkpoint", str(ddpg_run / "dense.pt"), "--out", str(tmp_path), "--no-latency"]) == 0
    )
    (run,) = run_dirs(tmp_path)
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert len(rows) == (3 if agent in ("random", "surrogate") else 1)
    assert all(r["flops_ratio"] <= 0.35 + 1e-12 for r in rows)
    if agent == "surrogate":  # one warm-up episode (the center), then the model chooses
        assert [r["phase"] for r in rows] == ["center", "model", "model"]
        assert set(rows[2]["agent_stats"]) == {"predicted_reward", "predicted_std", "plan_seconds"}
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.35


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_device_runs_the_same_code(tmp_path):
    assert main([*FAST, "--device", "cuda", "--out", str(tmp_path)]) == 0
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "report.json").read_text())["device"].startswith("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main([*FAST, "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]
    assert run_dirs(tmp_path) == []


def test_data_aware_search(tmp_path, ddpg_run):
    args = [*FAST, "--agent", "uniform", "--data-aware", "--data-aware-batches", "2", "--final-epochs", "0"]
    assert (
        main([*args, "--checkpoint", str(ddpg_run / "dense.pt"), "--out", str(tmp_path), "--no-latency"]) == 0
    )
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "config.json").read_text())["data_aware"] is True
    assert json.loads((run / "report.json").read_text())["compressed"]["flops_ratio"] <= 0.5


def test_search_starts_at_the_center_strategy(ddpg_run, tmp_path):
    rows = read_rows(ddpg_run / "stage-1" / "episodes.jsonl")
    assert rows[0]["phase"] == "center"
    # relative actions centered on the ALDS rule (the default): episode 0 plays the rule's strategy
    # rescaled to the budget left at each step, i.e. (up to rank rounding) the rule's own strategy;
    # the last step differs: the lower wall makes it spend what the rule leaves unused
    assert json.loads((ddpg_run / "config.json").read_text())["action_center"] == "alds"
    args = [*FAST, "--agent", "alds", "--checkpoint", str(ddpg_run / "dense.pt"), "--final-epochs", "0"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (rule_row,) = read_rows(run_dirs(tmp_path)[0] / "stage-1" / "episodes.jsonl")
    differences = [abs(a - b) for a, b in zip(_ratios(rows[0]), _ratios(rule_row), strict=True)]
    assert max(differences[:-1]) < 0.07
    assert not any(
        max(abs(a - b) for a, b in zip(_ratios(rows[0]), _ratios(r), strict=True)) < 1e-9 for r in rows[1:]
    )


def _ratios(row: dict) -> list[float]:
    return [entry["ratio"] for entry in row["layers"].values()]


def test_spread_bounds_random_actions(tmp_path, ddpg_run):
    args = [*FAST, "--agent", "random", "--episodes", "4", "--spread", "0.2", "--final-epochs", "0"]
    assert (
        main([*args, "--checkpoint", str(ddpg_run / "dense.pt"), "--out", str(tmp_path), "--no-latency"]) == 0
    )
    (run,) = run_dirs(tmp_path)
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["phase"] for r in rows] == ["center", "random", "random", "random"]
    center = _ratios(rows[0])
    for row in rows[
        1:
    ]:  # about x 3**0.2 per layer at most (the fair ratio moves a little with what was spent)
        assert all(
            b / a <= 3**0.2 + 0.05 and a / b <= 3**0.2 + 0.05
            for a, b in zip(center, _ratios(row), strict=True)
        )
    config = json.loads((run / "config.json").read_text())
    assert config["spread"] == 0.2 and config["start_at_center"] is True


def test_split_seed_is_kept_apart_from_the_search_seed():
    from rlrank.config import SearchConfig
    from rlrank.preflight import prepare

    def val_images(**kwargs) -> torch.Tensor:
        return prepare(SearchConfig(model="tiny", **kwargs)).data.val.images

    same = val_images(seed=1)
    assert torch.equal(same, val_images(seed=2))  # other search seeds, one validation set
    assert not torch.equal(same, val_images(seed=1, split_seed=1))


def test_relative_action_space_is_recorded_with_the_policy(ddpg_run):
    meta = json.loads((ddpg_run / "stage-1" / "policy" / "policy.json").read_text())
    assert meta["action_space"] == "relative"
    config = json.loads((ddpg_run / "config.json").read_text())
    assert config["action_space"] == "relative" and config["distill"] == 0.5


def test_action_center_on_a_rule(tmp_path, capsys):
    assert main([*FAST, "--episodes", "3", "--action-center", "energy", "--out", str(tmp_path)]) == 0
    (run,) = run_dirs(tmp_path)
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.5
    meta = json.loads((run / "stage-1" / "policy" / "policy.json").read_text())
    assert meta["action_center"] == "energy"
    # absolute actions have no center: --action-center (here the default) is ignored
    assert main([*FAST, "--episodes", "2", "--action-space", "absolute", "--out", str(tmp_path / "x")]) == 0
    (run,) = run_dirs(tmp_path / "x")
    meta = json.loads((run / "stage-1" / "policy" / "policy.json").read_text())
    assert meta["action_space"] == "absolute" and meta["action_center"] == "uniform"


def test_run_names_tell_runs_apart_and_name_overrides(tmp_path, ddpg_run):
    args = [*FAST, "--agent", "uniform", "--checkpoint", str(ddpg_run / "dense.pt"), "--final-epochs", "0"]
    assert main([*args, "--decomposition", "cp", "--no-latency", "--out", str(tmp_path / "a")]) == 0
    (run,) = run_dirs(tmp_path / "a")
    assert run.name.startswith("tiny-cp-uniform-flops0.5-")
    assert main([*args, "--name", "my-run", "--no-latency", "--out", str(tmp_path / "b")]) == 0
    assert [p.name for p in run_dirs(tmp_path / "b")] == ["my-run"]


def test_latency_measured_on_a_busy_machine_is_marked(tmp_path, ddpg_run, monkeypatch, capsys):
    from rlrank import threads

    monkeypatch.setattr(threads.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    args = [*FAST, "--agent", "uniform", "--checkpoint", str(ddpg_run / "dense.pt"), "--final-epochs", "0"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (run,) = run_dirs(tmp_path)
    report = json.loads((run / "report.json").read_text())
    assert report["latency_unreliable"].startswith("the machine was busy (load average 50.0")
    assert "(unreliable: the machine was busy" in capsys.readouterr().out


def test_final_fine_tune_length_follows_the_training_set_size():
    from rlrank.finetune import final_epochs_for

    assert final_epochs_for(45_000) == 12.0  # CIFAR-10: the 12 epochs that met issue 16's goals
    assert final_epochs_for(100_000) == 5.0
    assert final_epochs_for(1_281_167) == 1.0  # ImageNet: one pass
    assert final_epochs_for(1_437) == 12.0  # digits: no more than CIFAR-10's


def test_default_final_epochs_is_resolved_and_recorded(tmp_path, ddpg_run):
    at = FAST.index("--final-epochs")
    args = [*FAST[:at], *FAST[at + 2 :], "--agent", "uniform", "--checkpoint", str(ddpg_run / "dense.pt")]
    args.append("--no-latency")
    assert main([*args, "--out", str(tmp_path)]) == 0
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "config.json").read_text())["final_epochs"] == 12.0
    result = json.loads((run / "stage-1" / "result.json").read_text())
    assert result["finetune_epochs"] == 12.0
