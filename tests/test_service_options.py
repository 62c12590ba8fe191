"""A job request's options become the rlrank-search command, checked by the command's own code; the
token file; the job table (no server needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rlrank.service.auth import TokenError, is_authorized, load_token
from rlrank.service.job_main import run_folder_of
from rlrank.service.job_options import JobOptionError, confined_path, job_command
from rlrank.service.job_store import CANCELLED, QUEUED, RUNNING, JobStore


def test_options_become_the_commands_arguments(tmp_path: Path) -> None:
    command = job_command(
        {
            "model": "resnet20",
            "flops": 0.3,
            "train-budgets": [0.3, 0.5],
            "start_at_center": False,
            "data_aware": True,
            "exclude": ["fc", "conv1"],
            "seed": None,
        },
        tmp_path,
    )
    assert command.argv == [
        "--model", "resnet20", "--flops", "0.3", "--train-budgets", "0.3,0.5", "--no-start-at-center",
        "--data-aware", "--exclude", "fc,conv1",
    ]  # fmt: skip
    assert command.config["flops"] == 0.3 and command.config["train_budgets"] == [0.3, 0.5]
    assert command.config["start_at_center"] is False and command.config["seed"] == 0
    assert job_command({}, tmp_path).config["model"] == "resnet18"  # every default


@pytest.mark.parametrize(
    "options, message",
    [
        ({"flops": 0}, "--flops"),
        ({"flops": "half"}, "--flops"),
        ({"flops": float("inf")}, "finite"),
        ({"data_aware": "yes"}, "true or false"),
        ({"episodes": [1, 2]}, "one value"),
        ({"exclude": {"a": 1}}, "one value"),
        ({"train_budgets": []}, "non-empty list"),
        ({"decomposition": "magic"}, "--decomposition"),
        ({"stages": 2, "latency_budget": 0.8}, "--latency works with one stage"),
        ({"threads": 4}, "chosen by the server"),
        ({"quiet": True}, "unknown option"),
        ({"resume": "job-1"}, "unknown option"),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(JobOptionError) as refused:
        job_command(options, tmp_path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_paths_stay_inside_the_runs_folder_or_a_readable_one(tmp_path: Path) -> None:
    runs, data = tmp_path / "runs", tmp_path / "data"
    (runs / "job-1").mkdir(parents=True)
    data.mkdir()
    assert (
        confined_path("job-1/model.pt", runs, [], "--checkpoint") == (runs / "job-1" / "model.pt").resolve()
    )
    assert confined_path(str(data / "cifar"), runs, [data], "--data-dir") == (data / "cifar").resolve()
    (runs / "sneaky").symlink_to(data)
    for value in ("../data/cifar", str(data), "sneaky/cifar", "job-1/../../data", "", 3, "a\x00b"):
        with pytest.raises(JobOptionError):
            confined_path(value, runs, [], "--data-dir")
    command = job_command({"checkpoint": "job-1/model.pt"}, runs)
    assert command.argv == ["--checkpoint", str((runs / "job-1" / "model.pt").resolve())]


def test_token_file_is_created_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLRANK_TOKEN", raising=False)
    path = tmp_path / "service" / "token"
    token = load_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(path) == token
    os.chmod(path, 0o640)
    with pytest.raises(TokenError, match="readable by others"):
        load_token(path)
    monkeypatch.setenv("RLRANK_TOKEN", "short")
    with pytest.raises(TokenError, match="shorter than"):
        load_token(path)
    monkeypatch.setenv("RLRANK_TOKEN", "x" * 20)
    assert load_token(path) == "x" * 20


def test_is_authorized() -> None:
    token = "t" * 20
    assert is_authorized(token, f"Bearer {token}", None)
    assert is_authorized(token, None, token)
    assert not is_authorized(token, None, None)
    assert not is_authorized(token, "Bearer " + "u" * 20, None)
    assert not is_authorized(token, f"Basic {token}", None)
    assert not is_authorized(token, "Bearer ", None)


def test_job_table_survives_reopening_and_guards_transitions(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.add({"flops": 0.5}, ["--flops", "0.5"], {"flops": 0.5}, tmp_path)
    assert job.state == QUEUED and job.run_dir == str(tmp_path / "job-1")
    assert store.transition(job.id, (QUEUED,), state=RUNNING, started=1.0)
    assert not store.transition(job.id, (QUEUED,), state=CANCELLED)
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")
    again = reopened.get(job.id)
    assert again is not None and again.state == RUNNING and again.argv == ["--flops", "0.5"]
    assert reopened.count((QUEUED, RUNNING)) == 1 and reopened.get(99) is None
    assert reopened.add({}, [], {}, tmp_path).id == 2


def test_run_folder_of_a_jobs_arguments() -> None:
    assert run_folder_of(["--model", "tiny", "--out", "/r", "--name", "job-3", "--quiet"]) == Path("/r/job-3")
    assert run_folder_of(["--resume", "/r/job-3", "--threads", "1"]) == Path("/r/job-3")
    assert run_folder_of(["--model", "tiny"]) is None
