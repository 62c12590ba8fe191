"""The queue: start queued jobs (oldest first, at most ``max_running`` at once), notice when they
end, cancel and resume them, and carry them over a server restart.

One background thread does every start and every state change of a running job, so a job's
process is always a child of that thread (it dies with the server, see
:mod:`~rlrank.service.launchers`). At start-up a job the table still calls ``running`` (the server
died under it) goes back to the queue with ``resume``: its next start continues its run folder
(``rlrank-search --resume``), so every episode it had logged is kept and none is repeated.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from rlrank.errors import UserError
from rlrank.service.job_progress import has_run, is_complete
from rlrank.service.job_store import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job, JobStore
from rlrank.service.launchers import EXIT_INTERRUPTED, JobHandle, Launcher

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
SHUTDOWN_GRACE = 60.0
"""Seconds a running job gets to checkpoint and exit when the server stops."""


class JobStateError(UserError):
    """A cancel or resume that the job's state does not allow (HTTP 409)."""


class Scheduler:
    """Runs the job table's queue.

    Args:
        store: The job table.
        launcher: Starts a job (a process or a Ray task).
        logs: Folder of the jobs' output logs (``job-<id>.log``).
        max_running: Jobs running at once.
        threads: ``--threads`` of every job.
        poll_seconds: How often running jobs are checked (a submit or cancel wakes the loop at once).
    """

    def __init__(
        self,
        store: JobStore,
        launcher: Launcher,
        logs: Path,
        max_running: int = 1,
        threads: int = 1,
        poll_seconds: float = 0.5,
    ) -> None:
        self.store, self.launcher, self.logs = store, launcher, logs
        self.max_running, self.threads, self.poll_seconds = max_running, threads, poll_seconds
        self.handles: dict[int, JobHandle] = {}
        self._interrupted: set[int] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rlrank-scheduler", daemon=True)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Put jobs left running by a dead server back in the queue, then start the loop."""
        for job in self.store.list((RUNNING,)):
            logger.info("job %d was running when the server stopped: it resumes from its run folder", job.id)
            self.store.update(job.id, state=QUEUED, resume=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; running jobs are interrupted (they checkpoint) and queued to resume next start."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.launcher.close()

    def _shutdown(self) -> None:
        """Interrupt the running jobs and wait for them: in the loop's own thread, which started their
        processes (they die with that thread, see :mod:`~rlrank.service.launchers`)."""
        for handle in self.handles.values():
            handle.interrupt()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for job_id, handle in list(self.handles.items()):
            while handle.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if handle.poll() is None:
                handle.kill()
            job, code = self.store.get(job_id), handle.poll()
            if job is not None and job.state == RUNNING:
                stopped_by_us = code is None or code == EXIT_INTERRUPTED or code < 0
                self._finish(job, code, requeue=stopped_by_us and not job.cancel_requested)
        self.handles.clear()

    def wake(self) -> None:
        """Look at the queue now (a job was submitted, cancelled or resumed)."""
        self._wake.set()

    # ------------------------------------------------------------------ requests

    def cancel(self, job_id: int) -> None:
        """Cancel a queued job, or interrupt a running one (its run folder stays resumable).

        Raises:
            JobStateError: The job has already ended.
        """
        if self.store.transition(job_id, (QUEUED,), state=CANCELLED, finished=time.time(), resume=False):
            return
        if not self.store.transition(job_id, (RUNNING,), cancel_requested=True):
            raise JobStateError("the job has already ended; nothing to cancel")
        self.wake()

    def resume(self, job_id: int) -> None:
        """Queue a failed or cancelled job again; it continues its run folder when it has one.

        Raises:
            JobStateError: The job is queued, running or done.
        """
        job = self.store.get(job_id)
        ok = job is not None and self.store.transition(
            job_id,
            (FAILED, CANCELLED),
            state=QUEUED,
            resume=True,
            cancel_requested=False,
            exit_code=None,
            error=None,
            finished=None,
        )
        if not ok:
            state = job.state if job else "missing"
            raise JobStateError(f"the job is {state}: only a failed or cancelled job can be resumed")
        self.wake()

    def log_path(self, job_id: int) -> Path:
        return self.logs / f"job-{job_id}.log"

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # keep the queue alive (a job that cannot start is failed in _tick)
                logger.exception("scheduler step failed")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
        self._shutdown()

    def _tick(self) -> None:
        for job_id, handle in list(self.handles.items()):
            job = self.store.get(job_id)
            if job is None:
                continue
            if job.cancel_requested and job_id not in self._interrupted:
                handle.interrupt()
                self._interrupted.add(job_id)
            code = handle.poll()
            if code is not None:
                del self.handles[job_id]
                self._interrupted.discard(job_id)
                self._finish(job, code)
        while len(self.handles) < self.max_running and not self._stop.is_set():
            queued = self.store.list((QUEUED,), limit=1)
            if not queued:
                break
            try:
                self._launch(queued[0])
            except Exception as exc:  # noqa: BLE001 - this job fails, the queue goes on
                logger.exception("job %d could not start", queued[0].id)
                self.store.update(
                    queued[0].id, state=FAILED, finished=time.time(), error=f"cannot start: {exc}"
                )

    def _launch(self, job: Job) -> None:
        now = time.time()
        if not self.store.transition(
            job.id,
            (QUEUED,),
            state=RUNNING,
            started=now,
            finished=None,
            starts=job.starts + 1,
            exit_code=None,
        ):
            return  # cancelled meanwhile
        run_dir = Path(job.run_dir)
        if job.resume and is_complete(run_dir):
            self.store.update(job.id, state=DONE, exit_code=0, finished=now, resume=False)
            return
        if job.resume and has_run(run_dir):
            argv = ["--resume", str(run_dir)]
        else:
            if run_dir.exists():
                if job.starts == 0:
                    self.store.update(
                        job.id, state=FAILED, finished=now, error=f"run folder {run_dir.name} exists"
                    )
                    return
                shutil.rmtree(run_dir)  # this job's own folder from a start that never wrote config.json
            argv = [*job.argv, "--out", str(run_dir.parent), "--name", run_dir.name]
        argv += ["--quiet", "--threads", str(self.threads)]
        self.handles[job.id] = self.launcher.start(argv, self.log_path(job.id))
        logger.info("job %d started (%s)", job.id, "resumed" if argv[0] == "--resume" else "new")

    def _finish(self, job: Job, code: int | None, requeue: bool = False) -> None:
        now = time.time()
        ran = job.run_seconds + (now - job.started if job.started else 0.0)
        if requeue:
            self.store.update(job.id, state=QUEUED, resume=True, run_seconds=ran, exit_code=code)
            return
        if code == 0:
            state, error = DONE, None
        elif code == EXIT_INTERRUPTED or job.cancel_requested:
            state, error = CANCELLED, f"cancelled; POST /jobs/{job.id}/resume continues it"
        else:
            state, error = FAILED, self._error_line(job.id, code)
        self.store.update(
            job.id,
            state=state,
            exit_code=code,
            error=error,
            finished=now,
            run_seconds=ran,
            cancel_requested=False,
            resume=False,
        )
        logger.info("job %d %s (exit code %s)", job.id, state, code)

    def _error_line(self, job_id: int, code: int | None) -> str:
        """The job's one-line error: the command's own ``rlrank-search: ...`` line when it wrote one."""
        try:
            lines = self.log_path(job_id).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        own = [line for line in lines if line.startswith("rlrank-search:")]
        if own:
            return own[-1][:500]
        if code is not None and code < 0:
            return f"the search was killed by signal {-code}"
        tail = [line for line in lines if line.strip()]
        return (tail[-1] if tail else f"the search exited with code {code}")[:500]
