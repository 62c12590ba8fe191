"""A real ``rlrank-serve`` on a loopback port for the service tests, and tiny jobs on the embedded data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlrank.client import Client

EVENT_LIMIT = 600.0
"""Seconds after which a wait for an event gives up: only a failsafe against a hung test, far beyond
what a loaded 2-core machine needs."""

TINY_JOB = {
    "model": "tiny",
    "dataset": "digits",
    "dense_epochs": 1,
    "agent": "random",
    "episodes": 6,
    "final_epochs": 0.2,
    "latency": False,
}


def tiny_job(**changes: Any) -> dict[str, Any]:
    """Options of a search of a few seconds on the embedded digits data."""
    return {**TINY_JOB, **changes}


def wait_for(predicate: Callable[[], Any], what: str, limit: float = EVENT_LIMIT) -> Any:
    """Poll ``predicate`` until it returns something truthy; returns it."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


class Server:
    """``python -m rlrank.serve`` on a free loopback port, its runs folder under ``runs``."""

    def __init__(self, runs: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.runs = runs
        self.extra = list(extra)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.token = ""

    def start(self) -> Server:
        address = self.runs / ".service" / "address.json"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rlrank.serve", "--runs", str(self.runs), "--port", "0", "--threads", "1",
             *self.extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            text=True,
        )  # fmt: skip
        pid = self.process.pid

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"rlrank-serve exited: {self.process.stdout.read()}")
            try:
                info = json.loads(address.read_text())
            except (OSError, json.JSONDecodeError):
                return False
            return info["pid"] == pid and info["url"]

        self.url = wait_for(
            lambda: ready() and json.loads(address.read_text())["url"], "the server to listen"
        )
        self.token = self.env.get("RLRANK_TOKEN") or (self.runs / ".service" / "token").read_text().strip()
        wait_for(self._answers, "the server to answer")
        return self

    def _answers(self) -> bool:
        try:
            self.client().jobs()
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def client(self) -> Client:
        return Client(self.url, self.token)

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = ""
    ) -> tuple[int, Any]:
        """One raw request; ``token=None`` sends none, ``""`` the server's. Returns status and body."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def kill(self) -> None:
        """``kill -9`` the server alone (its jobs die with it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


def episode_numbers(run_dir: Path) -> list[int]:
    """The episode numbers of every row in a run folder's stage-1 log, in file order."""
    lines = (run_dir / "stage-1" / "episodes.jsonl").read_text().splitlines()
    return [json.loads(line)["episode"] for line in lines if line.strip()]
