"""The HTTP API and the dashboard page (FastAPI).

Routes (every one needs the server's token: ``Authorization: Bearer <token>``, or the cookie the
dashboard link sets):

* ``POST /jobs`` -- the options of ``rlrank-search`` as a JSON object; 201 and the job, or 422 with
  the command's own one-line message (nothing queued), 413 for a body over the size limit, 429 when
  the queue is full;
* ``GET /jobs``, ``GET /jobs/{id}`` -- state, progress, best reward so far, budget, timings, result;
* ``GET /jobs/{id}/episodes`` -- the episode frame as JSON records, or CSV with ``?format=csv``;
* ``GET /jobs/{id}/artifacts`` (the run folder's files) and ``GET /jobs/{id}/artifacts/<path>``;
* ``GET /jobs/{id}/log`` -- the end of the job's output;
* ``POST /jobs/{id}/cancel``, ``POST /jobs/{id}/resume`` (409 when the state does not allow it);
* ``GET /`` -- the dashboard (``/?token=<token>`` sets the cookie and redirects).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

from rlrank.service import job_progress
from rlrank.service.auth import COOKIE, is_authorized
from rlrank.service.job_options import JobOptionError, job_command
from rlrank.service.job_store import ACTIVE, RUNNING, Job, JobStore
from rlrank.service.scheduler import JobStateError, Scheduler

LOG_TAIL_BYTES = 64 * 1024


@dataclass
class ServiceConfig:
    """What the app serves and its bounds.

    Attributes:
        runs: The runs folder: every job's run folder, the job table and the logs live in it.
        token: The bearer token.
        readable: Further folders jobs may read (data sets, checkpoints).
        max_request_bytes: Largest request body.
        max_jobs: Most jobs queued or running at once.
    """

    runs: Path
    token: str
    readable: list[Path] = field(default_factory=list)
    max_request_bytes: int = 64 * 1024
    max_jobs: int = 100


def create_app(config: ServiceConfig, store: JobStore, scheduler: Scheduler) -> FastAPI:
    """The FastAPI application; starts the scheduler with the app and stops it (running jobs
    interrupted and queued to resume) when the server shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="rlrank", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    runs = config.runs.resolve()

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_request_bytes):
            return JSONResponse({"detail": f"request body over {config.max_request_bytes} bytes"}, 413)
        if request.url.path == "/" and request.query_params.get("token"):
            if not is_authorized(config.token, f"Bearer {request.query_params['token']}", None):
                return JSONResponse({"detail": "wrong token"}, 401)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, config.token, httponly=True, samesite="strict")
            return response
        if not is_authorized(config.token, request.headers.get("authorization"), request.cookies.get(COOKIE)):
            return JSONResponse(
                {"detail": "missing or wrong token (Authorization: Bearer <token>)"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    def get_job(job_id: int) -> Job:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def describe(job: Job, detail: bool = True) -> dict[str, Any]:
        run_dir = Path(job.run_dir)
        running = job.state == RUNNING and job.started is not None
        out: dict[str, Any] = {
            "id": job.id,
            "state": job.state,
            "where": scheduler.launcher.where,
            "model": job.config.get("model"),
            "agent": job.config.get("agent"),
            "decomposition": job.config.get("decomposition"),
            "budget": {"flops": job.config.get("flops"), "latency": job.config.get("latency_budget")},
            "run_dir": run_dir.name,
            "created": _iso(job.created),
            "started": _iso(job.started),
            "finished": _iso(job.finished),
            "run_seconds": job.run_seconds + (time.time() - job.started if running else 0.0),
            "starts": job.starts,
            "exit_code": job.exit_code,
            "error": job.error,
            **job_progress.progress(run_dir, job.config),
        }
        if detail:
            out["options"] = job.options
            out["result"] = job_progress.result(run_dir)
        return out

    @app.post("/jobs", status_code=201)
    async def submit(request: Request) -> dict[str, Any]:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                raise HTTPException(413, f"request body over {config.max_request_bytes} bytes")
        try:
            options = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPException(400, f"the body is not JSON: {exc}") from exc
        try:
            command = job_command(options, runs, config.readable)
        except JobOptionError as exc:
            raise HTTPException(422, str(exc)) from exc
        if store.count(ACTIVE) >= config.max_jobs:
            raise HTTPException(429, f"{config.max_jobs} jobs are queued or running; wait or cancel some")
        job = store.add(options, command.argv, command.config, runs)
        scheduler.wake()
        return describe(job)

    @app.get("/jobs")
    def list_jobs() -> dict[str, Any]:
        return {"jobs": [describe(job, detail=False) for job in store.list()]}

    @app.get("/jobs/{job_id}")
    def job_status(job_id: int) -> dict[str, Any]:
        return describe(get_job(job_id))

    @app.get("/jobs/{job_id}/episodes")
    def episodes(job_id: int, format: str = "json") -> Response:  # noqa: A002 - the query parameter
        if format not in ("json", "csv"):
            raise HTTPException(422, "format must be json or csv")
        frame = job_progress.episodes(Path(get_job(job_id).run_dir))
        if format == "csv":
            return Response(frame.to_csv(index=False), media_type="text/csv")
        return Response(frame.to_json(orient="records"), media_type="application/json")

    @app.get("/jobs/{job_id}/artifacts")
    def artifacts(job_id: int) -> dict[str, Any]:
        return {"artifacts": job_progress.artifacts(Path(get_job(job_id).run_dir))}

    @app.get("/jobs/{job_id}/artifacts/{path:path}")
    def artifact(job_id: int, path: str) -> FileResponse:
        run_dir = Path(get_job(job_id).run_dir).resolve()
        target = (run_dir / path).resolve()
        if not target.is_relative_to(run_dir) or not target.is_file() or "\x00" in path:
            raise HTTPException(404, f"no artifact {path!r} in job {job_id}'s run folder")
        return FileResponse(target)

    @app.get("/jobs/{job_id}/log")
    def log(job_id: int) -> PlainTextResponse:
        get_job(job_id)
        path = scheduler.log_path(job_id)
        if not path.is_file():
            return PlainTextResponse("")
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return PlainTextResponse(f.read().decode("utf-8", errors="replace"))

    def change(job_id: int, action: Callable[[int], None]) -> dict[str, Any]:
        get_job(job_id)
        try:
            action(job_id)
        except JobStateError as exc:
            raise HTTPException(409, str(exc)) from exc
        return describe(get_job(job_id))

    @app.post("/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> dict[str, Any]:
        return change(job_id, scheduler.cancel)

    @app.post("/jobs/{job_id}/resume")
    def resume(job_id: int) -> dict[str, Any]:
        return change(job_id, scheduler.resume)

    @app.get("/", response_class=HTMLResponse)
    def dashboard() -> str:
        return resources.files("rlrank.service").joinpath("dashboard.html").read_text(encoding="utf-8")

    return app


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")
