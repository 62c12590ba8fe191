"""Reward evaluation on Ray: ``--workers N`` actors price strategies, several episodes at once.

Each worker is a Ray actor that builds one reward evaluator from objects put once into Ray's object
store (:func:`ray.put`: the model, its factor cache, the data) and passed by reference, so a
machine's workers share one stored copy and only deserialize their own. A strategy (a list of
layer plans, a few kilobytes) is all that travels per episode.

Ray is started here for the run (``ray.init`` with this machine's CPUs and GPUs) unless it is
already running in this process, or joins a running cluster (``--ray-address``). A worker that
dies (killed, out of memory, its node lost) is replaced and its episode evaluated again, up to
:data:`MAX_ATTEMPTS` times per episode. :meth:`RayPool.close` kills the workers and, when the pool
started Ray, shuts it down (also on Ctrl-C and on errors: the stage closes its pool in a
``finally``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from rlrank.envs import Evaluation
from rlrank.errors import RunFailure
from rlrank.evaluator_pool import EvaluatedEpisode, check_capacity, evaluate_episode, threads_per_worker
from rlrank.planning import LayerPlan

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Evaluations of one episode started before a search gives up on dying workers."""


class WorkerLost(RunFailure):
    """Ray workers kept dying on one episode; the run can be resumed once the cause is fixed."""


@dataclass
class RayWorkers:
    """How many workers, where, and what each one gets.

    Attributes:
        count: Number of workers (Ray actors).
        address: A running Ray cluster's address (``ray://host:10001``, ``auto``), or ``None`` to
            start Ray on this machine.
        gpus: GPUs per worker (fractions share a GPU); 0 runs the workers on CPUs.
        threads: CPU threads (and Ray CPUs) per worker; 0: this machine's cores divided among the
            workers (at least 1).
    """

    count: int
    address: str | None = None
    gpus: float = 0.0
    threads: int = 0

    def threads_each(self) -> int:
        """Threads per worker, ``threads`` or the machine's cores shared out."""
        return threads_per_worker(self.count, self.threads)


def start_ray(address: str | None) -> bool:
    """Start Ray on this machine, or connect to ``address``; returns whether this call started it."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RunFailure(f"cannot join the Ray cluster at {address}: {_first_line(exc)}") from exc
    else:
        ray.init(
            address="local",  # a new Ray for the run, even when `ray start` left one on this machine
            num_cpus=os.cpu_count() or 1,
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            **quiet,
        )
    return True


def check_resources(workers: RayWorkers) -> None:
    """Raise :class:`UserError` when the Ray cluster cannot hold every worker at once."""
    total = ray.cluster_resources()
    check_capacity(
        workers.count,
        workers.threads_each(),
        workers.gpus,
        total.get("CPU", 0),
        total.get("GPU", 0),
        "the Ray cluster",
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@ray.remote(max_restarts=0, max_task_retries=0)
class EvaluationWorker:
    """A Ray actor holding one reward evaluator.

    Args:
        build: Builds the evaluator from ``args`` (object refs are resolved by Ray first).
        threads: CPU threads of torch in this worker.
        args: What ``build`` takes.
    """

    def __init__(self, build: Callable[..., Any], threads: int, *args: Any) -> None:
        torch.set_num_threads(threads)
        self.evaluator = build(*args)

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def evaluate(self, stage: int, episode: int, plans: Sequence[LayerPlan]) -> Evaluation:
        """Price one episode's strategy with the episode's random stream."""
        return evaluate_episode(self.evaluator, stage, episode, plans)


@dataclass
class _Task:
    worker: int
    stage: int
    episode: int
    plans: list[LayerPlan]
    attempt: int = 1


class RayPool:
    """``workers.count`` Ray actors pricing strategies; up to one episode in flight per worker.

    Args:
        build: Builds a worker's evaluator from ``args`` (a module-level function, run in the worker).
        args: The evaluator's inputs; each is put once into Ray's object store.
        workers: How many workers, where, and their threads and GPUs.
    """

    def __init__(self, build: Callable[..., Any], args: Sequence[Any], workers: RayWorkers) -> None:
        self.workers = workers
        self.capacity = workers.count
        self._started_ray = start_ray(workers.address)
        try:
            check_resources(workers)
            self._build = build
            self._refs = [ray.put(arg) for arg in args]
            self._actors = [self._start_worker() for _ in range(workers.count)]
            self._idle = list(range(workers.count))
            self._running: dict[ray.ObjectRef, _Task] = {}
            try:
                self.worker_pids()  # every worker is up, its evaluator built
            except RayActorError as exc:
                raise RunFailure(
                    f"the Ray workers could not start ({_first_line(exc)}); on a cluster every node "
                    "needs rlrank installed"
                ) from exc
        except BaseException:
            self._shutdown()
            raise
        logger.info(
            "%d Ray workers x %d threads%s",
            workers.count,
            workers.threads_each(),
            f", {workers.gpus:g} GPU each" if workers.gpus else "",
        )

    def _start_worker(self) -> Any:
        options = {"num_cpus": self.workers.threads_each(), "num_gpus": self.workers.gpus}
        return EvaluationWorker.options(**options).remote(
            self._build, self.workers.threads_each(), *self._refs
        )

    def worker_pids(self) -> list[int]:
        """Each worker's process id (waits for the workers to be up; a busy worker answers when its
        evaluation ends)."""
        return ray.get([actor.pid.remote() for actor in self._actors])

    def submit(self, stage: int, episode: int, plans: Sequence[LayerPlan]) -> None:
        if not self._idle:
            raise RuntimeError("every worker is busy: take a result back first")
        self._launch(_Task(self._idle.pop(0), stage, episode, list(plans)))

    def _launch(self, task: _Task) -> None:
        actor = self._actors[task.worker]
        self._running[actor.evaluate.remote(task.stage, task.episode, task.plans)] = task

    def next_result(self) -> EvaluatedEpisode:
        while True:
            if not self._running:
                raise RuntimeError("no episode is being evaluated")
            (ready,), _ = ray.wait(list(self._running), num_returns=1)
            task = self._running.pop(ready)
            try:
                evaluation = ray.get(ready)
            except RayActorError as exc:
                self._replace_worker(task, exc)
                continue
            self._idle.append(task.worker)
            return EvaluatedEpisode(task.episode, evaluation, task.worker)

    def _replace_worker(self, task: _Task, exc: RayActorError) -> None:
        if task.attempt >= MAX_ATTEMPTS:
            raise WorkerLost(
                f"Ray worker {task.worker} died {task.attempt} times evaluating episode {task.episode} "
                f"of stage {task.stage} (last: {_first_line(exc)})"
            ) from exc
        logger.warning(
            "Ray worker %d died evaluating episode %d (%s); restarting it and evaluating the episode again",
            task.worker,
            task.episode,
            _first_line(exc),
        )
        ray.kill(self._actors[task.worker], no_restart=True)
        self._actors[task.worker] = self._start_worker()
        task.attempt += 1
        self._launch(task)

    def cancel(self) -> None:
        # an evaluation that is running finishes on its worker and is dropped (close() kills them)
        self._idle.extend(task.worker for task in self._running.values())
        self._running.clear()

    def close(self) -> None:
        self._running.clear()
        for actor in getattr(self, "_actors", []):
            ray.kill(actor, no_restart=True)
        self._actors = []
        self._shutdown()

    def _shutdown(self) -> None:
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
