"""Multi-stage compression and reuse of a trained policy on new budgets (tiny model, digits)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import rlrank
from rlrank.agents.policy_files import read_policy_metadata
from rlrank.runlog import read_rows
from rlrank.search import main
from rlrank.surgery import factorization_of

BASE = [
    "--model", "tiny", "--warmup", "2", "--dense-epochs", "1", "--final-epochs", "0.5", "--stage-epochs", "0.5",
    "--finetune-steps", "2", "--bn-batches", "1", "--quiet", "--no-latency",
]  # fmt: skip


def only_run(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def conv_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    assert (
        main([*BASE, "--agent", "uniform", "--flops", "0.9", "--final-epochs", "0", "--out", str(out)]) == 0
    )
    return only_run(out) / "dense.pt"


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, dense_checkpoint):
    out = tmp_path_factory.mktemp("stages")
    args = [
        *BASE,
        "--flops",
        "0.4",
        "--stages",
        "2",
        "--episodes",
        "4",
        "--checkpoint",
        str(dense_checkpoint),
    ]
    assert main([*args, "--out", str(out)]) == 0
    return only_run(out)


def test_two_stages_end_within_budget_without_growing_depth(two_stage_run):
    run = two_stage_run
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.4
    budgets = [s["budget"] for s in report["stages"]]
    assert budgets == pytest.approx([0.4**0.5, 0.4])  # geometric schedule ending at --flops
    for stage in report["stages"]:
        assert stage["flops_ratio"] <= stage["budget"] + 1e-12
        for key in ("val_accuracy", "params_ratio", "best_reward"):
            assert key in stage
    for k in (1, 2):
        folder = run / f"stage-{k}"
        assert len(read_rows(folder / "episodes.jsonl")) == 4
        assert (folder / "best_strategy.json").is_file() and (folder / "model.pt").is_file()
    stage1 = rlrank.load(run / "stage-1" / "model.pt")
    stage2 = rlrank.load(run / "stage-2" / "model.pt")
    assert conv_count(stage2) == conv_count(stage1)
    assert stage2(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    # every layer factorized in stage 1 is re-factorized at ranks no larger in stage 2
    f1, f2 = factorization_of(stage1), factorization_of(stage2)
    assert set(f1) == set(f2)
    for name in f1:
        assert all(b <= a for a, b in zip(f1[name]["ranks"], f2[name]["ranks"], strict=True))
    # the stage-2 observation knew each layer's current ratio
    rows2 = read_rows(run / "stage-2" / "episodes.jsonl")
    assert all(entry["method"] is not None for entry in rows2[0]["layers"].values())


def test_explicit_stage_budgets(tmp_path, dense_checkpoint):
    args = [
        *BASE,
        "--flops",
        "0.5",
        "--stages",
        "2",
        "--stage-budgets",
        "0.8,0.5",
        "--episodes",
        "2",
        "--warmup",
        "1",
    ]
    assert (
        main(
            [
                *args,
                "--final-epochs",
                "0",
                "--stage-epochs",
                "0",
                "--checkpoint",
                str(dense_checkpoint),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert [s["budget"] for s in report["stages"]] == [0.8, 0.5]


def test_stage_budgets_must_end_at_flops(tmp_path, capsys):
    code = main(
        [*BASE, "--flops", "0.5", "--stages", "2", "--stage-budgets", "0.8,0.6", "--out", str(tmp_path)]
    )
    assert code == 2 and "--flops" in capsys.readouterr().err


def test_multi_stage_resumes_inside_the_current_stage(tmp_path, dense_checkpoint):
    args = [*BASE, "--flops", "0.4", "--stages", "2", "--episodes", "5", "--finetune-steps", "12"]
    args += ["--checkpoint", str(dense_checkpoint), "--out", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "rlrank.search", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        log = None
        while time.time() < deadline:
            runs = [p for p in tmp_path.iterdir() if p.is_dir()]
            if runs:
                log = runs[0] / "stage-2" / "episodes.jsonl"
                if log.is_file() and len(read_rows(log)) >= 2:
                    break
            assert process.poll() is None, "search ended before it could be killed"
            time.sleep(0.05)
        else:
            raise AssertionError("no progress in stage 2")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    run = only_run(tmp_path)
    stage1_model = (run / "stage-1" / "model.pt").stat().st_mtime_ns
    assert main(["--resume", str(run)]) == 0
    assert (run / "stage-1" / "model.pt").stat().st_mtime_ns == stage1_model  # stage 1 was not redone
    assert [r["episode"] for r in read_rows(run / "stage-2" / "episodes.jsonl")] == list(range(5))
    assert [r["episode"] for r in read_rows(run / "stage-1" / "episodes.jsonl")] == list(range(5))
    assert json.loads((run / "report.json").read_text())["compressed"]["flops_ratio"] <= 0.4


# ----------------------------------------------------------------------------- policy reuse


@pytest.fixture(scope="module")
def multi_budget_policy(tmp_path_factory, dense_checkpoint):
    out = tmp_path_factory.mktemp("policy")
    args = [*BASE, "--flops", "0.6", "--train-budgets", "0.3,0.6", "--episodes", "6", "--final-epochs", "0"]
    assert main([*args, "--checkpoint", str(dense_checkpoint), "--out", str(out)]) == 0
    return only_run(out)


def test_training_across_budgets(multi_budget_policy):
    run = multi_budget_policy
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["budget"] for r in rows[:6]] == [0.3, 0.6, 0.3, 0.6, 0.3, 0.6]
    assert all(r["flops_ratio"] <= r["budget"] + 1e-12 for r in rows)
    # after training, the deterministic policy is rolled out once at --flops
    assert len(rows) == 7 and rows[-1]["phase"] == "policy" and rows[-1]["budget"] == 0.6
    meta = read_policy_metadata(run / "stage-1" / "policy")
    assert meta["budgets"] == [0.3, 0.6] and meta["model"] == "tiny" and meta["decomposition"] == "tucker2"


def test_policy_applied_zero_shot_at_a_third_budget(multi_budget_policy, dense_checkpoint, tmp_path):
    policy = multi_budget_policy / "stage-1" / "policy"
    args = [*BASE, "--flops", "0.45", "--policy", str(policy), "--episodes", "0", "--final-epochs", "0"]
    assert main([*args, "--checkpoint", str(dense_checkpoint), "--out", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert len(rows) == 1 and rows[0]["phase"] == "policy" and rows[0]["budget"] == 0.45
    assert rows[0]["flops_ratio"] <= 0.45
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.45 and report["reward_evaluations"] == 1
    assert report["warnings"] == []  # same model: no warning


def test_policy_continues_training_from_its_buffer(multi_budget_policy, dense_checkpoint, tmp_path):
    policy = multi_budget_policy / "stage-1" / "policy"
    saved = read_policy_metadata(policy)
    args = [*BASE, "--flops", "0.45", "--policy", str(policy), "--episodes", "3", "--final-epochs", "0"]
    assert main([*args, "--checkpoint", str(dense_checkpoint), "--out", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    # the saved policy's roll-out comes first, so the continuation never ends below it; no warm-up
    assert [r["phase"] for r in rows] == ["policy", "explore", "explore", "explore"]
    zero_shot = tmp_path / "zero-shot"
    args_zero = [*args[: args.index("--episodes")], "--episodes", "0", "--final-epochs", "0"]
    assert main([*args_zero, "--checkpoint", str(dense_checkpoint), "--out", str(zero_shot)]) == 0
    (zero_row,) = read_rows(only_run(zero_shot) / "stage-1" / "episodes.jsonl")
    assert rows[0]["reward"] == zero_row["reward"] and rows[0]["layers"] == zero_row["layers"]
    report = json.loads((run / "report.json").read_text())
    assert report["stages"][-1]["best_reward"] >= zero_row["reward"]
    continued = read_policy_metadata(run / "stage-1" / "policy")
    assert continued["state"]["n_updates"] > saved["state"]["n_updates"]
    import numpy as np

    with np.load(run / "stage-1" / "policy" / "replay.npz") as new, np.load(policy / "replay.npz") as old:
        assert len(new["rewards"]) == len(old["rewards"]) + 3 * len(rows[0]["layers"])


def test_policy_on_another_model_with_the_same_layout_warns(multi_budget_policy, tmp_path):
    policy = multi_budget_policy / "stage-1" / "policy"
    args = [*BASE, "--model", "resnet20", "--flops", "0.5", "--policy", str(policy), "--episodes", "0"]
    assert main([*args, "--dense-epochs", "0.2", "--final-epochs", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert len(report["warnings"]) == 1 and "'tiny'" in report["warnings"][0]
    assert report["compressed"]["flops_ratio"] <= 0.5


def test_policy_with_another_decomposition_is_refused(multi_budget_policy, tmp_path, capsys):
    policy = multi_budget_policy / "stage-1" / "policy"
    code = main(
        [
            *BASE,
            "--flops",
            "0.5",
            "--decomposition",
            "svd",
            "--policy",
            str(policy),
            "--episodes",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "decomposition" in err[0]


@pytest.mark.parametrize("inside", ["policy.pt", "policy.json", "replay.npz"])
def test_policy_may_be_named_by_a_file_inside_its_folder(
    inside, multi_budget_policy, dense_checkpoint, tmp_path
):
    folder = multi_budget_policy / "stage-1" / "policy"
    args = [
        *BASE,
        "--flops",
        "0.45",
        "--policy",
        str(folder / inside),
        "--episodes",
        "0",
        "--final-epochs",
        "0",
    ]
    assert main([*args, "--checkpoint", str(dense_checkpoint), "--out", str(tmp_path)]) == 0
    by_file = read_rows(only_run(tmp_path) / "stage-1" / "episodes.jsonl")
    by_folder_out = tmp_path / "by-folder"
    args[args.index("--policy") + 1] = str(folder)
    assert main([*args, "--checkpoint", str(dense_checkpoint), "--out", str(by_folder_out)]) == 0
    by_folder = read_rows(only_run(by_folder_out) / "stage-1" / "episodes.jsonl")
    assert [r["layers"] for r in by_file] == [r["layers"] for r in by_folder]
    assert by_file[0]["reward"] == by_folder[0]["reward"]
