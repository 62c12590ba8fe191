"""Where a job runs: a separate ``rlrank-search`` process here, or the same process started by a Ray task.

A launcher starts a job's command with its output going to a log file and returns a
:class:`JobHandle`: ``poll()`` (the exit code once it ended), ``interrupt()`` (Ctrl-C: the search
checkpoints and exits with 130, resumable) and ``kill()``. The process dies with whatever started it
(Linux ``PR_SET_PDEATHSIG``): a server killed with ``kill -9`` leaves no orphan search writing into a
run folder that its restart will resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

EXIT_INTERRUPTED = 130


class JobHandle(Protocol):
    """A started job."""

    def poll(self) -> int | None:
        """The exit code once the job ended, else ``None``."""

    def interrupt(self) -> None:
        """Ask the job to stop as Ctrl-C would (it checkpoints and exits with 130)."""

    def kill(self) -> None:
        """Stop the job now."""


class Launcher(Protocol):
    """Starts jobs."""

    where: str

    def start(self, command: list[str], log: Path) -> JobHandle:
        """Start ``command`` (arguments of ``rlrank-search``) with its output appended to ``log``."""

    def close(self) -> None:
        """Release what the launcher holds."""


def search_command(argv: list[str]) -> list[str]:
    """The full command of a job: this Python running ``rlrank-search`` with ``argv``, then
    ``rlrank-analyze`` on its run folder (:mod:`rlrank.service.job_main`)."""
    return [sys.executable, "-m", "rlrank.service.job_main", *argv]


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Die with the parent (Linux), and take Ctrl-C even where the parent ignores or blocks it (a Ray
    worker's thread blocks it, and both the disposition and the mask survive exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])  # a Ray worker's thread blocks it
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def start_process(command: list[str], log: Path) -> subprocess.Popen:
    """``command`` as a child in its own session (a Ctrl-C at the server's terminal does not reach it)
    that is killed when this process dies, its stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


class ProcessHandle:
    """A job running as a child process of the server."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def poll(self) -> int | None:
        return self.process.poll()

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class ProcessLauncher:
    """Every job a separate ``rlrank-search`` process on this machine."""

    where = "process"

    def start(self, command: list[str], log: Path) -> JobHandle:
        return ProcessHandle(start_process(search_command(command), log))

    def close(self) -> None:
        pass


def run_job_process(command: list[str], log: str) -> int:
    """Run one job's process to its end (the body of the Ray task). A stop file next to the log
    (:func:`stop_file`, written by :meth:`RayHandle.interrupt`) interrupts it as Ctrl-C would."""
    stop = stop_file(Path(log))
    stop.unlink(missing_ok=True)
    process = start_process(search_command(command), Path(log))
    try:
        while process.poll() is None:
            if stop.exists():
                stop.unlink(missing_ok=True)
                process.send_signal(signal.SIGINT)
            time.sleep(0.2)
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
    return int(process.returncode)


def stop_file(log: Path) -> Path:
    """The file whose appearance asks a Ray task's job to stop (the runs folder is shared by every
    node, so the server can write it wherever the task runs)."""
    return log.with_suffix(".stop")


class RayHandle:
    """A job running inside a Ray task."""

    def __init__(self, ref: object, log: Path) -> None:
        self.ref = ref
        self.log = log
        self.code: int | None = None

    def poll(self) -> int | None:
        import ray

        if self.code is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.code = int(ray.get(self.ref))
            except ray.exceptions.TaskCancelledError:
                self.code = EXIT_INTERRUPTED
            except ray.exceptions.RayError:
                self.code = 1
        return self.code

    def interrupt(self) -> None:
        stop_file(self.log).touch()

    def kill(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


class RayLauncher:
    """Every job a Ray task (each needs ``threads`` CPUs of the cluster; the runs folder must be
    the same path on every node, e.g. a shared file system).

    Args:
        address: A Ray cluster's address, or ``local`` for a Ray started here.
        threads: CPUs each job's task reserves.
    """

    where = "ray"

    def __init__(self, address: str, threads: int) -> None:
        import ray

        from rlrank.ray_pool import start_ray

        self._started = start_ray(None if address == "local" else address)
        self._task = ray.remote(num_cpus=max(threads, 1), max_retries=0)(run_job_process)

    def start(self, command: list[str], log: Path) -> JobHandle:
        stop_file(log).unlink(missing_ok=True)
        return RayHandle(self._task.remote(command, str(log)), log)

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
