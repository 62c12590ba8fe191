"""The dashboard in headless Chromium (Debian's ``chromium``): it loads without console errors and
draws the job's reward curve while and after the job runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_server import Server, tiny_job, wait_for

pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

POINT = (0x1F, 0x77, 0xB4)  # the reward points' colour in dashboard.html
BEST = (0xD6, 0x27, 0x28)  # the running best's colour


def chromium(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={cwd / 'profile'}", "--virtual-time-budget=10000", "--window-size=1300,1100",
         *args, url],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )  # fmt: skip


def pixels_like(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels of the screenshot within ``tolerance`` of ``colour`` in every channel."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(rgb - np.array(colour, dtype=np.int16)) <= tolerance).all(axis=-1).sum())


@pytest.fixture(scope="module")
def served_job(tmp_path_factory: pytest.TempPathFactory):
    server = Server(tmp_path_factory.mktemp("dash") / "runs").start()
    client = server.client()
    job = client.submit(**tiny_job(episodes=12))
    wait_for(lambda: client.job(job["id"])["state"] in ("done", "failed"), "the job to end")
    assert client.job(job["id"])["state"] == "done", client.log(job["id"])
    yield server, job
    server.stop()


def test_dashboard_loads_without_console_errors_and_draws_the_curve(served_job, tmp_path: Path) -> None:
    server, job = served_job
    url = f"{server.url}/?token={server.token}#job={job['id']}"
    result = chromium(url, "--dump-dom", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-ready="1"' in dom, dom[-3000:]
    assert re.search(r'<pre id="errors"></pre>', dom), re.search(r'<pre id="errors">[^<]*', dom).group(0)
    assert 'data-points="12"' in dom  # one point per episode
    assert f"Job {job['id']}: tiny, random" in dom
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "error" in line.lower() or "Uncaught" in line], console


def test_dashboard_screenshot_shows_points_and_running_best(served_job, tmp_path: Path) -> None:
    server, job = served_job
    shot = tmp_path / "dashboard.png"
    result = chromium(
        f"{server.url}/?token={server.token}#job={job['id']}", f"--screenshot={shot}", cwd=tmp_path
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot)
    assert pixels_like(image, POINT) > 12 * 10  # 12 filled dots of radius 3
    assert pixels_like(image, BEST) > 100  # the running-best line


def test_dashboard_without_the_token_shows_nothing(served_job, tmp_path: Path) -> None:
    server, _ = served_job
    result = chromium(f"{server.url}/", "--dump-dom", cwd=tmp_path)
    assert "rlrank jobs" not in result.stdout and "missing or wrong token" in result.stdout


def test_dashboard_shows_a_running_job(served_job, tmp_path: Path) -> None:
    server, _ = served_job
    client = server.client()
    job = client.submit(**tiny_job(episodes=400, finetune_steps=20))
    try:
        wait_for(lambda: client.job(job["id"])["episodes_done"] >= 3, "three episodes")
        result = chromium(f"{server.url}/?token={server.token}#job={job['id']}", "--dump-dom", cwd=tmp_path)
        points = int(re.search(r'data-points="(\d+)"', result.stdout).group(1))
        assert points >= 3 and re.search(r'<div id="status">running · \d+ of 400 episodes', result.stdout)
    finally:
        client.cancel(job["id"])
    wait_for(lambda: client.job(job["id"])["state"] == "cancelled", "the cancel")
