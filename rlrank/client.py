"""A Python client of ``rlrank-serve`` (standard library only)::

from rlrank.client import Client

client = Client("http://127.0.0.1:8321", token="...")   # or $RLRANK_TOKEN
job = client.submit(model="resnet18", flops=0.5, episodes=40)
job = client.wait(job["id"])                            # polls until done, failed or cancelled
frame = client.episodes(job["id"])                      # the episode frame (pandas)
client.download(job["id"], "model.pt", "model.pt")
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pandas as pd

from rlrank.errors import UserError

ENDED = ("done", "failed", "cancelled")


class ServiceError(UserError):
    """The server refused a request; ``status`` is the HTTP status, the message the server's reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """Talks to one ``rlrank-serve``.

    Args:
        url: The server, e.g. ``http://127.0.0.1:8321``.
        token: The bearer token (default: ``$RLRANK_TOKEN``).
        timeout: Seconds per request.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token or os.environ.get("RLRANK_TOKEN", "")
        self.timeout = timeout

    def submit(self, **options: Any) -> dict[str, Any]:
        """Queue a search with ``rlrank-search``'s options (``flops=0.5``, ``agent="random"``, ...)."""
        return json.loads(self._request("POST", "/jobs", options))

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self._request("GET", "/jobs"))["jobs"]

    def job(self, job_id: int) -> dict[str, Any]:
        return json.loads(self._request("GET", f"/jobs/{job_id}"))

    def episodes(self, job_id: int) -> pd.DataFrame:
        """The job's episode frame, as :func:`rlrank.analysis.load_episodes` gives it."""
        return pd.read_csv(io.BytesIO(self._request("GET", f"/jobs/{job_id}/episodes?format=csv")))

    def artifacts(self, job_id: int) -> list[dict[str, Any]]:
        return json.loads(self._request("GET", f"/jobs/{job_id}/artifacts"))["artifacts"]

    def download(self, job_id: int, path: str, dest: str | os.PathLike) -> Path:
        """Save the run folder's file ``path`` (e.g. ``report.json``, ``model.pt``) to ``dest``."""
        quoted = urllib.parse.quote(path)
        data = self._request("GET", f"/jobs/{job_id}/artifacts/{quoted}")
        out = Path(dest)
        out.write_bytes(data)
        return out

    def log(self, job_id: int) -> str:
        return self._request("GET", f"/jobs/{job_id}/log").decode("utf-8", errors="replace")

    def cancel(self, job_id: int) -> dict[str, Any]:
        return json.loads(self._request("POST", f"/jobs/{job_id}/cancel"))

    def resume(self, job_id: int) -> dict[str, Any]:
        return json.loads(self._request("POST", f"/jobs/{job_id}/resume"))

    def wait(self, job_id: int, poll: float = 2.0, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; returns its last status.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ENDED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout} s")
            time.sleep(poll)

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", exc.reason)
            except (json.JSONDecodeError, AttributeError):
                detail = exc.reason
            raise ServiceError(exc.code, str(detail)) from exc
