"""Reward evaluation on Ray workers (``--workers``): same rewards as one worker, resume after
kill -9, a worker killed mid-episode, Ctrl-C, and no Ray at all without ``--workers``.

The tests start one local Ray with 2 CPUs for the module; searches run in this process join it,
searches run in a subprocess start (and must stop) their own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlrank.data import DataConfig, load_data
from rlrank.describe import describe_layers
from rlrank.evaluator_pool import InProcessPool, build_reward_evaluator
from rlrank.factor_cache import FactorCache
from rlrank.finetune import FinetuneConfig
from rlrank.models import ModelSpec, build_model
from rlrank.planning import plan_layer
from rlrank.runlog import read_rows
from rlrank.search import main

ray = pytest.importorskip("ray")

from rlrank.ray_pool import MAX_ATTEMPTS, RayPool, RayWorkers, WorkerLost  # noqa: E402

ARGS = [
    "--model", "tiny", "--flops", "0.5", "--episodes", "8", "--warmup", "3", "--dense-epochs", "0.5",
    "--final-epochs", "0", "--finetune-steps", "25", "--bn-batches", "1", "--quiet", "--no-latency",
    "--seed", "3", "--threads-per-worker", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_search_joins_a_running_ray_cluster(tmp_path):
    """``--ray-address``: a search joins a head node started with ``ray start``, uses it and leaves
    it running (the test stops the head by its process group)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's token authentication, with a token of the test's own (never the user's ~/.ray)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        status = [ray_cli, "status", f"--address={address}"]
        while subprocess.run(status, capture_output=True, env=env).returncode:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        search = [sys.executable, "-m", "rlrank.search", *ARGS, "--agent", "random", "--workers", "2"]
        result = subprocess.run(
            [*search, "--ray-address", address, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        still_up = subprocess.run(status, capture_output=True, env=env)
        assert still_up.returncode == 0, "the search shut down a cluster it did not start"
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    _, rows = run_rows(tmp_path)
    assert [r["episode"] for r in rows] == list(range(8)) and {r["worker"] for r in rows} == {0, 1}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module (searches in this process join it)."""
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )
    yield
    ray.shutdown()


def run_rows(out: Path) -> tuple[Path, list[dict]]:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run, read_rows(run / "stage-1" / "episodes.jsonl")


def test_random_search_gets_the_same_rewards_on_one_and_two_workers(local_ray, tmp_path):
    assert main([*ARGS, "--agent", "random", "--workers", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*ARGS, "--agent", "random", "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    _, one = run_rows(tmp_path / "one")
    _, two = run_rows(tmp_path / "two")
    assert [r["episode"] for r in one] == [r["episode"] for r in two] == list(range(8))
    assert [r["reward"] for r in one] == [r["reward"] for r in two]  # same seed, same strategies
    assert [r["layers"] for r in one] == [r["layers"] for r in two]
    assert {r["worker"] for r in one} == {0} and {r["worker"] for r in two} == {0, 1}


def test_ddpg_keeps_several_episodes_in_flight_and_learns_in_order(local_ray, tmp_path):
    assert main([*ARGS, "--agent", "ddpg", "--workers", "2", "--out", str(tmp_path)]) == 0
    run, rows = run_rows(tmp_path)
    assert [r["episode"] for r in rows] == list(range(8))
    assert [r["phase"] for r in rows] == ["center", "warmup", "warmup"] + ["explore"] * 5
    assert all("critic_loss" in r["agent_stats"] for r in rows[3:])  # learned from every explored one
    assert {r["worker"] for r in rows} == {0, 1}
    assert (run / "stage-1" / "policy" / "policy.pt").is_file()
    assert json.loads((run / "report.json").read_text())["reward_evaluations"] == 8


def test_without_workers_ray_is_never_imported(tmp_path):
    code = (
        "import sys\nfrom rlrank.search import main\n"
        f"assert main({[*ARGS[:-2], '--out', str(tmp_path)]!r}) == 0\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    _, rows = run_rows(tmp_path)
    assert len(rows) == 8 and all("worker" not in r for r in rows)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--gpus-per-worker", "0.5"], "--gpus-per-worker needs --workers"),
        (["--workers", "3", "--threads-per-worker", str((os.cpu_count() or 1) + 1)], "CPU cores"),
        (["--workers", "1", "--gpus-per-worker", "1.5"], "fraction in [0, 1] or a whole number"),
        (["--workers", "2", "--ray-address", f"127.0.0.1:{free_port()}"], "nothing answers there"),
    ],
)
def test_bad_worker_options_are_one_line_errors(extra, fragment, tmp_path, capsys):
    assert main([*ARGS[:-2], *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_workers_without_ray_installed_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    assert main([*ARGS, "--workers", "2", "--out", str(tmp_path)]) == 2
    assert 'pip install "rlrank[ray]"' in capsys.readouterr().err


# ----------------------------------------------------------------------------- a worker killed


@pytest.fixture(scope="module")
def tiny_stage():
    """The objects a worker's evaluator is built from, and one strategy at ratio 0.5."""
    torch.manual_seed(0)
    data = load_data(DataConfig("digits", val_size=0.2))
    model = build_model(ModelSpec("tiny", data.num_classes, data.in_channels, data.input_size))
    layers = describe_layers(model, (data.in_channels, data.input_size, data.input_size))
    cache = FactorCache(model, layers)
    cache.prepare_all()
    plans = [plan_layer(layer, 0.5, "tucker2") for layer in layers]
    config = FinetuneConfig(steps=5, bn_batches=1)
    return (model, cache, data, config, 7, "cpu"), plans


def test_a_worker_killed_mid_episode_is_replaced_and_the_episode_evaluated_again(
    local_ray, tiny_stage, tmp_path, caplog
):
    args, plans = tiny_stage
    started = tmp_path / "started"

    def build(*evaluator_args):  # defined here, so Ray ships it by value
        evaluator = build_reward_evaluator(*evaluator_args)

        def first_attempt_hangs(plans_):
            if not started.exists():  # the first attempt says it began, then never ends
                started.write_text(str(os.getpid()))
                while True:
                    time.sleep(0.05)
            return evaluator(plans_)

        first_attempt_hangs.set_episode = evaluator.set_episode
        return first_attempt_hangs

    expected = InProcessPool(build_reward_evaluator(*args))
    expected.submit(1, 4, plans)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker
    try:
        want = expected.next_result().evaluation
    finally:
        torch.set_num_threads(threads)

    with RayPool(build, args, RayWorkers(count=2, threads=1)) as pool:
        pids = pool.worker_pids()
        pool.submit(1, 4, plans)
        deadline = time.time() + 120
        while not started.exists() and time.time() < deadline:  # the evaluation is under way
            time.sleep(0.05)
        pid = int(started.read_text())
        assert pid in pids
        os.kill(pid, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, logger="rlrank.ray_pool"):
            result = pool.next_result()
    assert result.episode == 4 and result.worker is not None
    assert result.evaluation.accuracy == want.accuracy and result.evaluation.loss == want.loss
    assert "died evaluating episode 4" in caplog.text


def test_a_worker_that_keeps_dying_stops_the_search_with_a_clear_error(local_ray, tiny_stage):
    args, plans = tiny_stage

    def build(*evaluator_args):
        evaluator = build_reward_evaluator(*evaluator_args)

        def dies(plans_):
            os._exit(1)

        dies.set_episode = evaluator.set_episode
        return dies

    with RayPool(build, args, RayWorkers(count=1, threads=1)) as pool:
        pool.submit(1, 0, plans)
        with pytest.raises(WorkerLost, match=f"died {MAX_ATTEMPTS} times evaluating episode 0"):
            pool.next_result()


# ----------------------------------------------------------------------------- kill -9 and Ctrl-C


def start_search(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlrank.search", *ARGS, "--workers", "2", *extra, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ray's processes with it
        preexec_fn=default_sigint,
    )


def default_sigint() -> None:
    """Give the search Python's own Ctrl-C handling even when pytest runs in the background.

    A shell starts background jobs with SIGINT ignored and children inherit that, so a search
    started from such a pytest would ignore the Ctrl-C this test sends, as it should under nohup.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_rows(out: Path, n: int, process: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        log = runs[0] / "stage-1" / "episodes.jsonl" if runs else None
        if log is not None and log.is_file() and len(read_rows(log)) >= n:
            return runs[0]
        if process.poll() is not None:
            raise AssertionError(
                f"search ended early with code {process.returncode}: {process.stderr.read()}"
            )
        time.sleep(0.05)
    raise AssertionError("search made no progress")


def test_resume_after_sigkill_with_workers_keeps_every_episode_once(local_ray, tmp_path):
    process = start_search(tmp_path)
    try:
        run = wait_for_rows(tmp_path, 3, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        process.wait()
    killed = read_rows(run / "stage-1" / "episodes.jsonl")
    assert 3 <= len(killed) < 8 and not (run / "report.json").exists()

    assert main(["--resume", str(run)]) == 0  # joins this module's Ray
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["episode"] for r in rows] == list(range(8))  # in-flight ones re-run, none twice
    assert rows[: len(killed) - 1] == killed[: len(killed) - 1]
    assert all(r["worker"] in (0, 1) for r in rows)
    assert json.loads((run / "report.json").read_text())["reward_evaluations"] == 8


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state and parent, or ``None`` when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (Ray's raylet, GCS, agents and workers below a search)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] != "Z":
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (stat := _stat(pid)) is not None and stat[0] != "Z"}


def test_ctrl_c_stops_the_search_and_shuts_ray_down(local_ray, tmp_path):
    process = start_search(tmp_path, "--episodes", "5000")  # far more than it can finish before Ctrl-C
    try:
        run = wait_for_rows(tmp_path, 2, process)
        ray_of_the_search = descendants(process.pid)  # raylet, GCS, agents, the two workers
        assert len(ray_of_the_search) >= 3
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert f"--resume {run}" in err
    deadline = time.time() + 60
    while alive(ray_of_the_search) and time.time() < deadline:  # Ray's processes exit
        time.sleep(0.1)
    assert not alive(ray_of_the_search), "Ray processes were left running"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_gpu_workers_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main([*ARGS, "--workers", "2", "--gpus-per-worker", "0.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "need 1 GPUs; this machine has 0" in err[0], err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_workers_share_one_gpu(local_ray, tmp_path):
    args = [*ARGS, "--agent", "random", "--device", "cuda", "--workers", "2", "--gpus-per-worker", "0.5"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    _, rows = run_rows(tmp_path)
    assert [r["episode"] for r in rows] == list(range(8)) and {r["worker"] for r in rows} == {0, 1}
    assert not any(r["failed"] for r in rows)
