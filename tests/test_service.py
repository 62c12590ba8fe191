"""rlrank-serve end to end: a real server on a loopback port, real jobs on the embedded digits data."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_server import Server, episode_numbers, tiny_job, wait_for

from rlrank.client import ServiceError
from rlrank.search import main as search_main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    server = Server(tmp_path_factory.mktemp("serve") / "runs", "--max-jobs", "3").start()
    yield server
    server.stop()


def ended(client, job_id: int) -> dict | None:
    job = client.job(job_id)
    return job if job["state"] in ("done", "failed", "cancelled") else None


def test_submit_poll_fetch_episodes_and_artifacts(server: Server, tmp_path: Path) -> None:
    client = server.client()
    job = client.submit(**tiny_job())
    assert job["state"] in ("queued", "running") and job["episodes_planned"] == 6
    done = wait_for(lambda: ended(client, job["id"]), "the job to end")
    assert done["state"] == "done", client.log(job["id"])
    assert done["episodes_done"] == 6 and done["exit_code"] == 0 and done["starts"] == 1
    assert done["best_reward"] is not None and done["result"]["flops_ratio"] <= 0.5
    assert done["run_seconds"] > 0 and done["budget"]["flops"] == 0.5

    status, body = server.request("GET", f"/jobs/{job['id']}/episodes")
    rows = json.loads(body)
    assert status == 200 and [row["episode"] for row in rows] == list(range(6))
    assert max(row["reward"] for row in rows) == pytest.approx(done["best_reward"])
    assert any(key.startswith("ratio/") for key in rows[0])
    frame = client.episodes(job["id"])  # CSV
    assert list(frame["episode"]) == list(range(6))

    paths = {a["path"] for a in client.artifacts(job["id"])}
    assert {"report.json", "model.pt", "config.json", "stage-1/episodes.jsonl", "analysis/report.md"} <= paths
    assert any(path.startswith("analysis/") and path.endswith(".png") for path in paths)  # the plots
    saved = client.download(job["id"], "report.json", tmp_path / "report.json")
    run_dir = server.runs / done["run_dir"]
    assert saved.read_bytes() == (run_dir / "report.json").read_bytes()
    listing = client.jobs()
    assert job["id"] in [j["id"] for j in listing]


def test_every_request_needs_the_token(server: Server) -> None:
    assert server.request("GET", "/jobs", token=None)[0] == 401
    assert server.request("GET", "/jobs", token="not-the-token-but-long-enough")[0] == 401
    assert server.request("POST", "/jobs", json.dumps(tiny_job()).encode(), token=None)[0] == 401
    assert server.request("GET", "/", token=None)[0] == 401
    assert server.request("GET", "/jobs/1/episodes", token=None)[0] == 401
    assert server.client().jobs() is not None
    # the dashboard link: ?token= sets an HttpOnly cookie, which then authorizes the page's requests
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", f"/?token={server.token}")
    response = connection.getresponse()
    response.read()
    cookie = response.getheader("set-cookie")
    assert response.status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
    connection.request("GET", "/jobs", headers={"Cookie": cookie.split(";")[0]})
    assert connection.getresponse().status == 200


def test_a_bad_option_is_422_with_the_commands_message_and_queues_nothing(
    server: Server, capsys: pytest.CaptureFixture
) -> None:
    before = len(server.client().jobs())
    cases = [
        ({"flops": 2}, ["--flops", "2"]),
        ({"agent": "nope"}, ["--agent", "nope"]),
        ({"episodes": -3}, ["--episodes", "-3"]),
        ({"spread": 1.5}, ["--spread", "1.5"]),
    ]
    for options, argv in cases:
        status, body = server.request("POST", "/jobs", json.dumps(options).encode())
        assert status == 422, body
        capsys.readouterr()
        assert search_main([*argv, "--dry-run"]) == 2
        line = capsys.readouterr().err.strip()
        expected = line.removeprefix("rlrank-search: error: ").removesuffix(" (see --help)")
        assert json.loads(body)["detail"] == expected
    for options in ({"out": "/tmp"}, {"name": "x"}, {"unknown_option": 1}, {"download": "yes"}, [1, 2]):
        status, body = server.request("POST", "/jobs", json.dumps(options).encode())
        assert status == 422 and json.loads(body)["detail"].count("\n") == 0, body
    assert server.request("POST", "/jobs", b"{not json")[0] == 400
    assert len(server.client().jobs()) == before


def test_no_path_in_a_request_escapes_the_runs_folder(server: Server) -> None:
    outside = server.runs.parent / "outside.pt"
    outside.write_bytes(b"secret")
    (server.runs / "link.pt").symlink_to(outside)
    for value in ("../outside.pt", str(outside), "link.pt", "job-1/../../outside.pt"):
        status, body = server.request("POST", "/jobs", json.dumps(tiny_job(checkpoint=value)).encode())
        assert status == 422 and "outside the server's runs folder" in json.loads(body)["detail"], body
    status, _ = server.request("POST", "/jobs", json.dumps(tiny_job(data_dir="/etc")).encode())
    assert status == 422

    client = server.client()
    job = client.submit(**tiny_job())
    wait_for(lambda: ended(client, job["id"]), "the job to end")
    run_dir = server.runs / client.job(job["id"])["run_dir"]
    (run_dir / "escape.txt").symlink_to(outside)
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    for path in (
        "../.service/token",
        "..%2F.service%2Ftoken",
        "%2e%2e/%2e%2e/outside.pt",
        "escape.txt",
        "/etc/passwd",
    ):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request(
            "GET", f"/jobs/{job['id']}/artifacts/{path}", headers={"Authorization": f"Bearer {server.token}"}
        )
        response = connection.getresponse()
        body = response.read()
        assert response.status == 404 and b"secret" not in body and server.token.encode() not in body, path
    with pytest.raises(ServiceError) as refused:
        client.download(job["id"], "../../outside.pt", server.runs.parent / "copy")
    assert refused.value.status == 404


def test_request_size_and_job_count_are_bounded(server: Server) -> None:
    big = json.dumps({"model": "tiny", "exclude": ["x" * 100] * 1000}).encode()
    assert server.request("POST", "/jobs", big)[0] == 413
    client = server.client()
    jobs = []
    try:
        with pytest.raises(ServiceError) as full:
            for _ in range(4):  # --max-jobs 3 queued or running
                jobs.append(client.submit(**tiny_job(episodes=400, finetune_steps=20)))
        assert full.value.status == 429 and len(jobs) == 3
    finally:
        for job in jobs:
            with contextlib.suppress(ServiceError):
                client.cancel(job["id"])
    for job in jobs:
        assert wait_for(lambda job=job: ended(client, job["id"]), "the cancel")["state"] == "cancelled"


def test_cancel_then_resume_runs_every_episode_once(server: Server) -> None:
    client = server.client()
    job = client.submit(**tiny_job(episodes=60, finetune_steps=20))
    wait_for(lambda: client.job(job["id"])["episodes_done"] >= 2, "two episodes")
    client.cancel(job["id"])
    cancelled = wait_for(lambda: ended(client, job["id"]), "the cancel")
    assert cancelled["state"] == "cancelled" and cancelled["exit_code"] == 130
    assert cancelled["episodes_done"] < 60
    with pytest.raises(ServiceError) as wrong:
        client.cancel(job["id"])
    assert wrong.value.status == 409
    client.resume(job["id"])
    done = wait_for(lambda: ended(client, job["id"]), "the resumed job")
    assert done["state"] == "done" and done["starts"] == 2, client.log(job["id"])
    assert episode_numbers(server.runs / done["run_dir"]) == list(range(60))
    with pytest.raises(ServiceError) as again:
        client.resume(job["id"])
    assert again.value.status == 409


def test_fifty_concurrent_status_requests_while_a_job_runs(server: Server) -> None:
    client = server.client()
    job = client.submit(**tiny_job(episodes=200, finetune_steps=20))
    wait_for(lambda: client.job(job["id"])["state"] == "running", "the job to run")

    def status(_: int) -> int:
        return server.request("GET", f"/jobs/{job['id']}")[0]

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(status, range(50)))
    assert codes == [200] * 50
    assert client.job(job["id"])["state"] == "running"  # answered while it ran
    client.cancel(job["id"])
    wait_for(lambda: ended(client, job["id"]), "the cancel")


def test_killed_server_restarts_and_its_jobs_complete_with_every_episode_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    server = Server(runs).start()
    try:
        client = server.client()
        first = client.submit(**tiny_job(episodes=80, finetune_steps=20))
        second = client.submit(**tiny_job(episodes=5))  # queued behind the first (one at a time)
        wait_for(lambda: client.job(first["id"])["episodes_done"] >= 3, "three episodes")
        server.kill()
    finally:
        server.stop()
    server = Server(runs).start()
    try:
        client = server.client()
        for job, episodes in ((first, 80), (second, 5)):
            done = wait_for(lambda job=job: ended(client, job["id"]), "the job after the restart")
            assert done["state"] == "done", client.log(job["id"])
            assert episode_numbers(runs / done["run_dir"]) == list(range(episodes))
        assert client.job(first["id"])["starts"] == 2
    finally:
        server.stop()


def test_token_file_is_private_and_the_environment_wins(tmp_path: Path) -> None:
    server = Server(tmp_path / "runs").start()
    server.stop()
    token_file = tmp_path / "runs" / ".service" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    again = Server(tmp_path / "runs").start()
    assert again.token == token and again.client().jobs() == []
    again.stop()
    mine = "a-token-of-my-own-1234567890"
    env_server = Server(tmp_path / "runs", env={"RLRANK_TOKEN": mine}).start()
    try:
        assert env_server.request("GET", "/jobs", token=token)[0] == 401
        assert env_server.request("GET", "/jobs", token=mine)[0] == 200
    finally:
        env_server.stop()


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlrank.serve", *args], capture_output=True, text=True, timeout=300
    )


def test_serve_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = _serve("--runs", str(tmp_path / "a"), "--port", str(port))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot listen" in result.stderr
    result = _serve("--runs", str(tmp_path / "b"), "--max-running", "0")
    assert result.returncode == 2 and result.stderr.startswith("rlrank-serve: error: --max-running")
    result = _serve("--allow-read", str(tmp_path / "missing"))
    assert result.returncode == 2 and "no such folder" in result.stderr
    server = Server(tmp_path / "c").start()
    try:
        result = _serve("--runs", str(tmp_path / "c"), "--port", "0")
        assert result.returncode == 2 and "another rlrank-serve" in result.stderr
    finally:
        server.stop()
    (tmp_path / "d" / ".service").mkdir(parents=True)
    (tmp_path / "d" / ".service" / "token").write_text("x" * 40)
    os.chmod(tmp_path / "d" / ".service" / "token", 0o644)
    result = _serve("--runs", str(tmp_path / "d"), "--port", "0")
    assert result.returncode == 2 and "readable by others" in result.stderr
    assert "--max-running" in _serve("--help").stdout


def test_client_reports_refusals(server: Server) -> None:
    with pytest.raises(ServiceError) as missing:
        server.client().job(10_000)
    assert missing.value.status == 404
    bad = type(server.client())(server.url, token="wrong-token-wrong-token")
    with pytest.raises(ServiceError) as refused:
        bad.jobs()
    assert refused.value.status == 401
    with pytest.raises(ServiceError) as invalid:
        server.client().submit(flops=5)
    assert invalid.value.status == 422 and "--flops" in str(invalid.value)


def test_jobs_as_ray_tasks(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    server = Server(tmp_path / "runs", "--ray-address", "local").start()
    try:
        client = server.client()
        job = client.submit(**tiny_job())
        done = wait_for(lambda: ended(client, job["id"]), "the Ray job to end")
        assert done["state"] == "done" and done["where"] == "ray", client.log(job["id"])
        assert episode_numbers(server.runs / done["run_dir"]) == list(range(6))
        long = client.submit(**tiny_job(episodes=300, finetune_steps=20))
        wait_for(lambda: client.job(long["id"])["episodes_done"] >= 2, "two episodes on Ray")
        client.cancel(long["id"])
        assert wait_for(lambda: ended(client, long["id"]), "the cancel")["state"] == "cancelled"
    finally:
        server.stop()


def test_a_stopped_server_interrupts_its_jobs_and_resumes_them_at_the_next_start(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    server = Server(runs).start()
    client = server.client()
    job = client.submit(**tiny_job(episodes=80, finetune_steps=20))
    wait_for(lambda: client.job(job["id"])["episodes_done"] >= 2, "two episodes")
    server.stop()  # SIGTERM: uvicorn's graceful shutdown (then it re-raises the signal: exit -15)
    log = (runs / ".service" / "logs" / f"job-{job['id']}.log").read_text()
    assert "interrupted" in log  # Ctrl-C'd by the server: checkpointed, not killed
    server = Server(runs).start()
    try:
        client = server.client()
        done = wait_for(lambda: ended(client, job["id"]), "the job after the restart")
        assert done["state"] == "done" and done["starts"] == 2, client.log(job["id"])
        assert episode_numbers(runs / done["run_dir"]) == list(range(80))
    finally:
        server.stop()
