"""Reliability: bad input, one writer per run folder, resume after kill -9, numerical faults, torn rows."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlrank.agents.ddpg import save_policy
from rlrank.finetune import NumericalFault
from rlrank.models import ModelSpec, build_model
from rlrank.run_folder import RunFolder
from rlrank.runlog import append_row, read_rows, truncate_rows
from rlrank.search import main

FAST = [
    "--model", "tiny", "--episodes", "3", "--warmup", "1", "--dense-epochs", "0.5", "--final-epochs", "0",
    "--finetune-steps", "1", "--bn-batches", "1", "--quiet", "--no-latency",
]  # fmt: skip


def complete_runs(out: Path) -> list[Path]:
    return [p for p in out.rglob("report.json")] if out.exists() else []


def assert_refused(capsys, args, out: Path, *fragments: str) -> str:
    code = main([*args, "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert complete_runs(out) == []
    return lines[0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("flops", "fragment"),
    [("0", "(0, 1]"), ("-0.5", "(0, 1]"), ("1.5", "(0, 1]"), ("abc", "'abc'"), ("nan", "(0, 1]")],
)
def test_bad_flops(flops, fragment, tmp_path, capsys):
    assert_refused(capsys, [*FAST, "--flops", flops], tmp_path, "--flops", fragment)


def test_budget_below_the_smallest_reachable(tmp_path, capsys):
    line = assert_refused(capsys, [*FAST, "--flops", "0.001"], tmp_path, "smallest reachable budget")
    assert "0.001" in line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--model", "resnet1000"),
        ("--dataset", "mnist"),
        ("--decomposition", "tensor-magic"),
        ("--agent", "ppo"),
    ],
)
def test_unknown_names(option, value, tmp_path, capsys):
    assert_refused(capsys, [*FAST, option, value], tmp_path, option, value)


def test_missing_and_empty_data_folders(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_refused(
        capsys, [*FAST, "--dataset", "imagefolder", "--data-dir", str(missing)], tmp_path / "o1", str(missing)
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(
        capsys, [*FAST, "--dataset", "imagefolder", "--data-dir", str(empty)], tmp_path / "o2", str(empty)
    )
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test").mkdir()
    assert_refused(
        capsys, [*FAST, "--dataset", "imagefolder", "--data-dir", str(empty)], tmp_path / "o3", "no images"
    )


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    path = tmp_path / "resnet20.pt"
    torch.save(build_model(ModelSpec("resnet20", 10, 1, 8)).state_dict(), path)
    assert_refused(capsys, [*FAST, "--checkpoint", str(path)], tmp_path / "out", "does not fit")


def test_corrupt_checkpoint(tmp_path, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(os.urandom(2048))
    assert_refused(capsys, [*FAST, "--checkpoint", str(path)], tmp_path / "out", str(path))


def test_crafted_pickle_checkpoint_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    assert_refused(capsys, [*FAST, "--checkpoint", str(path)], tmp_path / "out", str(path))
    assert not marker.exists()


def test_policy_for_another_observation_layout(tmp_path, capsys):
    import gymnasium as gym
    import numpy as np

    from rlrank.agents.ddpg import DDPGAgent

    agent = DDPGAgent(gym.spaces.Box(0, 1, (5,), np.float32), gym.spaces.Box(-1, 1, (1,), np.float32))
    save_policy(
        tmp_path / "policy",
        agent,
        {"model": "tiny", "decomposition": "tucker2", "observation_features": ["a", "b", "c", "d", "e"]},
    )
    assert_refused(
        capsys, [*FAST, "--policy", str(tmp_path / "policy")], tmp_path / "out", "observation layout"
    )


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main([*FAST, "--out", str(blocker / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(blocker) in err[0]


def test_bad_counts(tmp_path, capsys):
    assert_refused(capsys, [*FAST, "--episodes", "-3"], tmp_path, "--episodes")
    assert_refused(capsys, [*FAST, "--stages", "0"], tmp_path, "--stages")
    assert_refused(capsys, [*FAST, "--stage-budgets", "0.5,x"], tmp_path, "--stage-budgets")


# ----------------------------------------------------------------------------- one writer per run folder


def test_second_search_on_a_run_in_use_is_refused(tmp_path, capsys):
    assert main([*FAST, "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (run / "report.json").unlink()  # pretend it is unfinished
    holder = RunFolder.open(run)
    holder.acquire()
    try:
        code = main(["--resume", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            code == 2
            and len(err) == 1
            and "in use by another search" in err[0]
            and f"pid {os.getpid()}" in err[0]
        )
    finally:
        holder.release()
    assert main(["--resume", str(run)]) == 0  # released: the lock is not held forever
    assert (run / "report.json").is_file()


# ----------------------------------------------------------------------------- resume after kill -9

RESUME_ARGS = [
    "--model", "tiny", "--flops", "0.5", "--episodes", "10", "--warmup", "3", "--dense-epochs", "0.5",
    "--final-epochs", "0", "--finetune-steps", "25", "--bn-batches", "1", "--quiet", "--no-latency",
    "--seed", "3",
]  # fmt: skip


def wait_for_rows(log: Path, n: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and len(read_rows(log)) >= n:
            return
        if process.poll() is not None:
            raise AssertionError(f"search ended early with code {process.returncode}")
        time.sleep(0.05)
    raise AssertionError("search made no progress")


def test_resume_after_sigkill_keeps_every_episode_once(tmp_path):
    reference = tmp_path / "reference"
    assert main([*RESUME_ARGS, "--out", str(reference)]) == 0
    (ref_run,) = [p for p in reference.iterdir() if p.is_dir()]
    ref_rows = read_rows(ref_run / "stage-1" / "episodes.jsonl")

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "rlrank.search", *RESUME_ARGS, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out.exists() and any(out.iterdir())) and time.time() < deadline:
            time.sleep(0.05)
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        wait_for_rows(run / "stage-1" / "episodes.jsonl", 4, process)
        time.sleep(0.1)  # inside the next episode
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run / "report.json").exists()
    killed_rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert 4 <= len(killed_rows) < 10

    assert main(["--resume", str(run)]) == 0
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["episode"] for r in rows] == list(range(10))  # each once, none lost
    assert len(rows) == len(ref_rows)
    # the rows kept from before the kill are untouched, and the search repeats itself exactly
    assert rows[: len(killed_rows) - 1] == killed_rows[: len(killed_rows) - 1]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in ref_rows])
    assert json.loads((run / "report.json").read_text())["reward_evaluations"] == 10


def test_resume_of_a_complete_run_changes_nothing(tmp_path):
    assert main([*FAST, "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    before = (run / "report.json").read_text()
    assert main(["--resume", str(run)]) == 0
    assert (run / "report.json").read_text() == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code = main(["--resume", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not an rlrank run folder" in err[0]


# ----------------------------------------------------------------------------- numerical faults


def test_failed_episodes_are_logged_and_the_search_goes_on(tmp_path, monkeypatch):
    import rlrank.reward as reward_module

    real = reward_module.finetune_steps
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            raise NumericalFault("fine-tune loss became nan")
        return real(*args, **kwargs)

    monkeypatch.setattr(reward_module, "finetune_steps", sometimes_nan)
    assert main([*FAST, "--episodes", "4", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    failed = [r for r in rows if r["failed"]]
    assert len(rows) == 4 and len(failed) == 2
    assert all(r["reward"] == 0.0 and "nan" in r["failed"] for r in failed)
    best = json.loads((run / "stage-1" / "best_strategy.json").read_text())
    assert best["episode"] in {r["episode"] for r in rows if not r["failed"]}


def test_every_episode_failing_stops_with_a_clear_error(tmp_path, capsys):
    code = main([*FAST, "--finetune-lr", "1e12", "--finetune-steps", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "every episode of stage 1 failed" in err[0]
    assert complete_runs(tmp_path) == []


# ----------------------------------------------------------------------------- the episode log


def test_torn_last_row_is_dropped(tmp_path, caplog):
    log = tmp_path / "episodes.jsonl"
    for i in range(3):
        append_row(log, {"episode": i, "reward": 0.1 * i})
    with open(log, "a") as handle:
        handle.write('{"episode": 3, "rew')
    with caplog.at_level("WARNING"):
        rows = read_rows(log)
    assert [r["episode"] for r in rows] == [0, 1, 2]
    assert "partial last row" in caplog.text
    kept = truncate_rows(log, 2)
    assert [r["episode"] for r in kept] == [0, 1]
    assert log.read_text().count("\n") == 2 and log.read_text().endswith("\n")


def test_a_torn_row_in_the_middle_is_an_error(tmp_path):
    log = tmp_path / "episodes.jsonl"
    log.write_text('{"episode": 0}\n{"epis\n{"episode": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(log)
