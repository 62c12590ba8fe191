"""Reliability, round two (issue 15): faults found by probing the search as a hostile user would.

Each test below failed on the code before these fixes: a committed episode lost on resume, run
folders left by refused policies, tracebacks instead of one line, runs that could never complete,
bad values accepted silently, small untidiness, and functions that changed the model they were given.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlrank.agents.ddpg import DDPGAgent, DDPGConfig
from rlrank.envs import OBSERVATION_FEATURES, action_space, observation_space
from rlrank.run_folder import RunFolder
from rlrank.runlog import read_rows
from rlrank.search import main

FAST = [
    "--model", "tiny", "--episodes", "3", "--warmup", "1", "--dense-epochs", "0.5", "--final-epochs", "0",
    "--finetune-steps", "1", "--bn-batches", "1", "--quiet", "--no-latency",
]  # fmt: skip


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def interrupt_after(monkeypatch, episode: int) -> None:
    """Make the search stop (as Ctrl-C would) right after ``episode`` was logged and checkpointed."""
    from rlrank import callbacks

    original = callbacks.FailureLimit.on_episode_end

    def stop(self, row, progress):
        original(self, row, progress)
        if row.episode == episode:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.FailureLimit, "on_episode_end", stop)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense")
    assert main([*FAST, "--agent", "uniform", "--out", str(out)]) == 0
    return only_run(out) / "dense.pt"


# ----------------------------------------------------------------------------- 1. no episode lost


def test_a_torn_last_committed_row_is_restored_on_resume(tmp_path, monkeypatch, capsys, dense):
    args = [*FAST, "--episodes", "8", "--warmup", "2", "--checkpoint", str(dense), "--out", str(tmp_path)]
    interrupt_after(monkeypatch, 5)
    assert main(args) == 130
    run = only_run(tmp_path)
    assert json.loads((run / "stage-1" / "checkpoint.json").read_text())["episodes_done"] == 6
    log = run / "stage-1" / "episodes.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    original = json.loads(lines[5])
    log.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # a torn write
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["--resume", str(run), "--quiet"]) == 0
    rows = read_rows(log)
    assert [r["episode"] for r in rows] == list(range(8))
    assert rows[5] == original
    assert json.loads((run / "report.json").read_text())["reward_evaluations"] == 8


def test_rows_lost_beyond_repair_are_refused(tmp_path, monkeypatch, capsys, dense):
    args = [*FAST, "--episodes", "6", "--warmup", "2", "--checkpoint", str(dense), "--out", str(tmp_path)]
    interrupt_after(monkeypatch, 3)
    assert main(args) == 130
    monkeypatch.undo()
    run = only_run(tmp_path)
    log = run / "stage-1" / "episodes.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    capsys.readouterr()
    assert main(["--resume", str(run), "--quiet"]) == 2
    assert "holds 2 complete episodes but its checkpoint counts 4" in one_line(capsys)


# ----------------------------------------------------------------------------- 2. refused policies leave nothing


def policy_folder(path: Path) -> Path:
    agent = DDPGAgent(observation_space(), action_space(), DDPGConfig(hidden=(8, 8)))
    agent.save(
        path,
        {
            "model": "tiny",
            "decomposition": "tucker2",
            "action_space": "relative",
            "action_center": "uniform",
            "observation_features": list(OBSERVATION_FEATURES),
        },
    )
    return path


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def spoil(kind: str, folder: Path, marker: Path) -> None:
    if kind == "missing":
        (folder / "policy.pt").unlink()
    elif kind == "garbage":
        (folder / "policy.pt").write_bytes(b"not a torch file at all")
    elif kind == "crafted":
        with open(folder / "policy.pt", "wb") as handle:
            pickle.dump({"actor": _RunsCode(marker)}, handle)
    elif kind == "objects":
        np.savez(folder / "replay.npz", observations=np.array([object()], dtype=object))
        (folder / "replay.npz.npz").rename(folder / "replay.npz") if (
            folder / "replay.npz.npz"
        ).exists() else None
    elif kind == "layout":
        meta = json.loads((folder / "policy.json").read_text())
        meta["observation_dim"] = 5
        (folder / "policy.json").write_text(json.dumps(meta))
    elif kind == "wrong-networks":
        torch.save({"actor": {"w": torch.zeros(2)}}, folder / "policy.pt")


@pytest.mark.parametrize("kind", ["missing", "garbage", "crafted", "objects", "layout", "wrong-networks"])
def test_a_bad_policy_is_refused_before_anything_is_written(kind, tmp_path, capsys):
    folder = policy_folder(tmp_path / "policy")
    marker = tmp_path / "executed"
    spoil(kind, folder, marker)
    out = tmp_path / "out"
    assert main([*FAST, "--policy", str(folder), "--out", str(out)]) == 2  # no checkpoint: dense not trained
    line = one_line(capsys)
    assert "rlrank-search: error:" in line and "weights_only=False" not in line
    assert not out.exists() or list(out.iterdir()) == []
    assert not marker.exists()


# ----------------------------------------------------------------------------- 3. one line, not a traceback


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed=-1"], "--seed"),
        (["--seed", "99999999999999999999"], "--seed"),
        (["--split-seed", "-3"], "--split-seed"),
        (["--val-size", "nan"], "--val-size"),
        (["--val-size", "1"], "at least one image per class"),
        (["--val-size", "2.5"], "--val-size"),
        (["--noise", "nan"], "--noise"),
        (["--noise", "inf"], "--noise"),
        (["--noise=-1"], "--noise"),
        (["--distill", "nan"], "--distill"),
        (["--distill=-1"], "--distill"),
        (["--stages=-2"], "must be a whole number >= 1, got -2"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(args, fragment, tmp_path, capsys):
    assert main([*FAST, *args, "--out", str(tmp_path)]) == 2
    assert fragment in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("agent", ["ddpg", "surrogate"])
def test_a_warmup_as_long_as_the_search_is_a_warning(agent, tmp_path, capsys, dense):
    args = [*FAST, "--agent", agent, "--warmup", "20", "--episodes", "4", "--checkpoint", str(dense)]
    args += ["--out", str(tmp_path)]
    assert main(args) == 0
    assert "never learns" in capsys.readouterr().err
    report = json.loads((only_run(tmp_path) / "report.json").read_text())
    assert any("--warmup 20 >= --episodes 4" in w for w in report["warnings"])


def test_a_one_class_image_folder_is_refused(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("RLRANK_CACHE", str(tmp_path / "cache"))

    for split in ("train", "test"):
        folder = tmp_path / "data" / split / "only"
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8, 3), i * 10, dtype=np.uint8)).save(folder / f"{i}.png")
    args = [*FAST, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--val-size", "2"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "at least two" in one_line(capsys)


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch, dense) -> Path:
    """A run stopped after its second episode (checkpoint, dense.json, config.json written)."""
    out = tmp_path / "runs"
    args = [*FAST, "--episodes", "4", "--warmup", "1", "--out", str(out)]
    interrupt_after(monkeypatch, 1)
    assert main(args) == 130
    monkeypatch.undo()
    return only_run(out)


def checkpoint_dir(run: Path) -> Path:
    pointer = json.loads((run / "stage-1" / "checkpoint.json").read_text())
    return run / "stage-1" / pointer["latest"]


@pytest.mark.parametrize("damage", ["rng.pt", "state.json", "config.json", "dense.json", "pointer"])
def test_resume_of_a_damaged_run_is_one_line(damage, interrupted_run, capsys):
    run = interrupted_run
    if damage == "rng.pt":
        (checkpoint_dir(run) / "rng.pt").write_bytes(b"garbage")
    elif damage == "state.json":
        (checkpoint_dir(run) / "state.json").write_text("{not json")
    elif damage == "config.json":
        (run / "config.json").write_text('{"model": "tiny", "flops": ')
    elif damage == "dense.json":
        (run / "dense.json").write_text("[1, 2")
    else:
        (run / "stage-1" / "checkpoint.json").write_text('{"latest": "checkpoint-99"}')
    capsys.readouterr()
    assert main(["--resume", str(run), "--quiet"]) == 2
    line = one_line(capsys)
    assert str(run) in line or damage in line, line


def test_a_diverging_dense_training_is_one_line_with_what_to_do(tmp_path, capsys):
    assert main([*FAST, "--dense-lr", "1e6", "--out", str(tmp_path)]) == 1
    line = one_line(capsys)
    assert "dense model diverged" in line and "--dense-lr" in line and "--resume" in line


# ----------------------------------------------------------------------------- 4. a run that can complete


def test_a_failed_final_fine_tune_resumes_with_a_new_learning_rate(tmp_path, capsys, dense):
    args = [*FAST, "--final-epochs", "0.5", "--final-lr", "1e6", "--checkpoint", str(dense)]
    assert main([*args, "--out", str(tmp_path)]) == 1
    line = one_line(capsys)
    assert "--final-lr" in line and "--resume" in line
    run = only_run(tmp_path)
    rows_before = read_rows(run / "stage-1" / "episodes.jsonl")
    assert main(["--resume", str(run), "--final-lr", "0.01", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["final_lr"] == 0.01
    assert read_rows(run / "stage-1" / "episodes.jsonl") == rows_before  # the search was kept
    assert (run / "report.json").is_file()


def test_resume_refuses_options_that_cannot_change(interrupted_run, capsys):
    capsys.readouterr()
    assert main(["--resume", str(interrupted_run), "--flops", "0.3", "--dense-lr", "0.1"]) == 2
    line = one_line(capsys)
    assert "--dense-lr, --flops cannot change" in line and "--final-lr" in line


# ----------------------------------------------------------------------------- 6. smaller things


def test_the_lock_is_taken_before_data_and_model_load(interrupted_run, monkeypatch, capsys):
    import rlrank.pipeline

    def never(config):
        raise AssertionError("prepare() ran although the run folder is in use")

    monkeypatch.setattr(rlrank.pipeline, "prepare", never)
    holder = RunFolder(interrupted_run)
    holder.acquire()
    try:
        capsys.readouterr()
        assert main(["--resume", str(interrupted_run)]) == 2
        assert "in use" in one_line(capsys)
    finally:
        holder.release()


def test_resume_removes_half_written_temp_files(interrupted_run):
    stray = [interrupted_run / ".report.json.k3j2.tmp", interrupted_run / "stage-1" / ".result.json.x.tmp"]
    for path in stray:
        path.write_text("half")
    assert main(["--resume", str(interrupted_run), "--quiet"]) == 0
    assert not any(path.exists() for path in stray)


def test_interrupt_message(tmp_path, monkeypatch, capsys, dense):
    interrupt_after(monkeypatch, 0)
    assert main([*FAST, "--checkpoint", str(dense), "--out", str(tmp_path)]) == 130
    line = one_line(capsys)
    run = only_run(tmp_path)
    assert f"--resume {run}" in line and "RUN_FOLDER" not in line


def test_files_keep_the_users_umask_also_after_resume(interrupted_run):
    previous = os.umask(0o022)
    try:
        assert main(["--resume", str(interrupted_run), "--quiet"]) == 0
    finally:
        os.umask(previous)
    for name in ("config.json", "report.json", "model.pt", "stage-1/episodes.jsonl", "stage-1/result.json"):
        mode = stat.S_IMODE((interrupted_run / name).stat().st_mode)
        assert mode == 0o644, (name, oct(mode))


def test_a_crafted_checkpoint_is_refused_without_torchs_hint(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"conv1.weight": _RunsCode(tmp_path / "x")}, handle)
    assert main([*FAST, "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    line = one_line(capsys)
    assert "refused" in line and "pickled code" in line and "weights_only=False" not in line


def test_a_finite_but_exploding_loss_is_a_failure():
    from rlrank.finetune import NumericalFault, check_loss

    assert check_loss(torch.tensor(2.0), None, 0, "fine-tune") == 2.0
    assert check_loss(torch.tensor(50.0), 2.3, 3, "fine-tune") == 50.0
    with pytest.raises(NumericalFault, match="exploded from 2.3 to 1e\\+17"):
        check_loss(torch.tensor(1e17), 2.3, 4, "fine-tune")


def test_a_search_whose_fine_tunes_explode_marks_episodes_failed(tmp_path, capsys, dense):
    args = [*FAST, "--finetune-lr", "1e4", "--finetune-steps", "4", "--checkpoint", str(dense)]
    assert main([*args, "--out", str(tmp_path)]) == 1
    line = one_line(capsys)
    assert "every episode of stage 1 failed" in line and "start a new run" in line and "--resume" not in line
    rows = read_rows(only_run(tmp_path) / "stage-1" / "episodes.jsonl")
    assert len(rows) == 3 and all("loss exploded" in r["failed"] for r in rows)


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, dense):
    import errno

    import rlrank.atomic
    import rlrank.runlog

    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rlrank.atomic.os, "fsync", fsync)
    monkeypatch.setattr(rlrank.runlog.os, "fsync", fsync)
    args = [*FAST, "--episodes", "6", "--warmup", "2", "--checkpoint", str(dense), "--out", str(tmp_path)]
    assert main(args) == 1
    line = one_line(capsys)
    assert "no space left" in line and "--resume" in line
    monkeypatch.undo()
    run = only_run(tmp_path)
    assert main(["--resume", str(run), "--quiet"]) == 0
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["episode"] for r in rows] == list(range(6))


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt_not_a_full_disk(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised while a file is written stays one (torch's writer would turn it into
    a RuntimeError that reads as a full disk); the temporary file goes, the old file stays."""
    import rlrank.atomic

    target = tmp_path / "policy.pt"
    rlrank.atomic.save_torch(target, {"w": torch.ones(3)})
    real_fdopen = os.fdopen

    class InterruptedHandle:
        def __init__(self, fd: int, mode: str) -> None:
            self.inner = real_fdopen(fd, mode)
            self.written = 0

        def __enter__(self) -> InterruptedHandle:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 1000:  # Ctrl-C arrives while the tensor's bytes are written
                raise KeyboardInterrupt
            return self.inner.write(data)

        def flush(self) -> None:
            self.inner.flush()

        def fileno(self) -> int:
            return self.inner.fileno()

    monkeypatch.setattr(rlrank.atomic.os, "fdopen", InterruptedHandle)
    with pytest.raises(KeyboardInterrupt):
        rlrank.atomic.save_torch(target, {"w": torch.zeros(100_000)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["policy.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))


def test_a_real_full_filesystem(tmp_path, dense):
    """On a 300 KiB tmpfs (needs root and mount; skipped otherwise) the search ends with one line."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        args = [*FAST, "--episodes", "4", "--warmup", "1", "--checkpoint", str(dense), "--out", str(mount)]
        # one thread: no busy-machine warning on a loaded test machine, so the one line is the error
        args += ["--threads", "1"]
        done = subprocess.run([sys.executable, "-m", "rlrank.search", *args], capture_output=True, text=True)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0], done.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ----------------------------------------------------------------------------- 7. models left as found


@pytest.fixture
def half_frozen():
    from rlrank.models import ModelSpec, build_model

    model = build_model(ModelSpec("resnet20")).train()
    model.bn1.eval()
    return model


def assert_as_found(model) -> None:
    assert model.training and not model.bn1.training and model.layer1[0].bn1.training


def test_counting_and_describing_leave_modes_alone(half_frozen):
    from rlrank.describe import describe_layers
    from rlrank.flops import count_model, flop_counter_macs

    count_model(half_frozen, (3, 32, 32))
    assert_as_found(half_frozen)
    flop_counter_macs(half_frozen, (3, 32, 32))
    assert_as_found(half_frozen)
    describe_layers(half_frozen, (3, 32, 32))
    assert_as_found(half_frozen)


def test_evaluate_latency_and_covariances_leave_modes_alone(half_frozen):
    from rlrank.data import DataConfig, load_data
    from rlrank.factor_cache import output_covariances
    from rlrank.finetune import evaluate, measure_latency

    assert measure_latency(half_frozen, (3, 32, 32), 2, torch.device("cpu"), warmup=1, repeats=2) > 0
    assert_as_found(half_frozen)
    output_covariances(half_frozen, ["conv1"], [torch.randn(2, 3, 32, 32)])
    assert_as_found(half_frozen)
    from rlrank.models import ModelSpec, build_model

    data = load_data(DataConfig("digits", val_size=0.2))
    small = build_model(ModelSpec("tiny", 10, 1, 8)).train()
    small.bn1.eval()
    evaluate(small, data, data.val)
    assert small.training and not small.bn1.training and small.bn2.training


# ----------------------------------------------------------------------------- under load


def test_openmp_wait_follows_the_load_unless_the_user_chose(monkeypatch):
    from rlrank import threads

    for name in threads.OPENMP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.choose_openmp_wait() == "GOMP_SPINCOUNT=10000"
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert threads.choose_openmp_wait() == "OMP_WAIT_POLICY=PASSIVE"
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.choose_openmp_wait() == "OMP_WAIT_POLICY=ACTIVE"
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_threads_option_and_busy_warning(monkeypatch, caplog):
    from rlrank import threads

    previous = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
        assert threads.configure_threads(2) == 2
        with caplog.at_level("WARNING"):
            threads.warn_if_busy()
        assert "machine is busy" in caplog.text and "--threads 1" in caplog.text
        caplog.clear()
        assert threads.configure_threads(1) == 1
        with caplog.at_level("WARNING"):
            threads.warn_if_busy()
        assert "busy" not in caplog.text
    finally:
        torch.set_num_threads(previous)


def test_the_command_sets_the_wait_before_torch_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import os, sys, rlrank.search\n"
        "assert 'torch' not in sys.modules\n"
        "rlrank.search.main(['--help'])\n"
        "assert 'torch' in sys.modules\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] in ("10000 None", "None PASSIVE")
