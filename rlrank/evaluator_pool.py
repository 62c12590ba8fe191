"""Where strategies are priced: in this process, one at a time, or on Ray workers, several at once.

The search loop hands every finished episode's strategy to a pool (:meth:`EvaluatorPool.submit`)
and takes evaluations back as they finish (:meth:`EvaluatorPool.next_result`), keeping up to
``capacity`` episodes in flight. :class:`InProcessPool` (capacity 1) prices each strategy when its
result is asked for, in this process: exactly the search without ``--workers``.
:func:`open_pool` picks the pool of a run; Ray is imported only when ``--workers`` is given
(:mod:`rlrank.ray_pool`).
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from rlrank.data import DataSplits
from rlrank.envs import Evaluation
from rlrank.errors import UserError
from rlrank.factor_cache import FactorCache
from rlrank.finetune import FinetuneConfig
from rlrank.planning import LayerPlan
from rlrank.reward import RewardEvaluator

if TYPE_CHECKING:
    from rlrank.config import SearchConfig

RAY_INSTALL = 'pip install "rlrank[ray]"'


@dataclass
class EvaluatedEpisode:
    """A priced strategy as a pool returns it.

    Attributes:
        episode: The episode the strategy came from.
        evaluation: What the evaluator reported.
        worker: The Ray worker that priced it (0-based), ``None`` in this process.
    """

    episode: int
    evaluation: Evaluation
    worker: int | None = None


class EvaluatorPool(Protocol):
    """Prices strategies; up to ``capacity`` of them may be submitted and not yet returned."""

    capacity: int

    def submit(self, stage: int, episode: int, plans: Sequence[LayerPlan]) -> None:
        """Price episode ``episode``'s strategy (its random stream is derived from stage and episode)."""

    def next_result(self) -> EvaluatedEpisode:
        """The next evaluation to finish (blocks); any submitted episode may come back first."""

    def cancel(self) -> None:
        """Forget every submitted episode not yet returned (the search stops)."""

    def close(self) -> None:
        """Release the workers (no more submissions)."""


def evaluate_episode(
    evaluator: RewardEvaluator, stage: int, episode: int, plans: Sequence[LayerPlan]
) -> Evaluation:
    """Price one episode's strategy with the episode's random stream (in this process or a worker)."""
    evaluator.set_episode(stage, episode)
    return evaluator(plans)


class InProcessPool:
    """Prices one strategy at a time in this process, when its result is asked for.

    Args:
        evaluator: The stage's reward evaluator.
    """

    capacity = 1

    def __init__(self, evaluator: RewardEvaluator) -> None:
        self.evaluator = evaluator
        self._queue: deque[tuple[int, int, list[LayerPlan]]] = deque()

    def submit(self, stage: int, episode: int, plans: Sequence[LayerPlan]) -> None:
        self._queue.append((stage, episode, list(plans)))

    def next_result(self) -> EvaluatedEpisode:
        stage, episode, plans = self._queue.popleft()
        return EvaluatedEpisode(episode, evaluate_episode(self.evaluator, stage, episode, plans))

    def cancel(self) -> None:
        self._queue.clear()

    def close(self) -> None:
        self._queue.clear()


def build_reward_evaluator(
    model: nn.Module,
    cache: FactorCache,
    data: DataSplits,
    config: FinetuneConfig,
    seed: int,
    device: str,
) -> RewardEvaluator:
    """A reward evaluator on ``device`` (what a Ray worker builds from the objects it is sent)."""
    target = torch.device(device)
    return RewardEvaluator(model.to(target), cache, data.to(target), config, seed=seed)


def threads_per_worker(workers: int, threads: int) -> int:
    """CPU threads of each of ``workers`` workers: ``threads``, or 0 for this machine's cores shared
    out among them (at least 1)."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def check_capacity(
    workers: int, threads: int, gpus: float, cpus_there: float, gpus_there: float, where: str
) -> None:
    """Raise :class:`UserError` when ``workers`` workers of ``threads`` threads and ``gpus`` GPUs each
    do not fit at once into ``where`` (``this machine``, ``the Ray cluster``), which has
    ``cpus_there`` CPU cores and ``gpus_there`` GPUs."""
    if workers * threads > cpus_there:
        hint = ", or give --ray-address" if where == "this machine" else ""
        raise UserError(
            f"--workers {workers} x {threads} threads need {workers * threads} CPU cores; "
            f"{where} has {cpus_there:g} (lower --workers or --threads-per-worker{hint})"
        )
    if gpus > 0 and workers * gpus > gpus_there + 1e-9:
        raise UserError(
            f"--workers {workers} x --gpus-per-worker {gpus:g} need {workers * gpus:g} GPUs; "
            f"{where} has {gpus_there:g}"
        )


def check_ray_installed() -> None:
    """Raise :class:`UserError` when ``--workers`` is asked for and Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"--workers needs Ray, which is not installed: {RAY_INSTALL}")


def check_workers(config: SearchConfig) -> None:
    """Raise :class:`UserError` for ``--workers`` options that cannot work, before anything runs.

    On this machine (no ``--ray-address``) the workers must fit its cores and GPUs at once; a
    cluster's resources are checked when the pool starts.
    """
    given = {
        "--ray-address": config.ray_address is not None,
        "--gpus-per-worker": config.gpus_per_worker != 0,
        "--threads-per-worker": config.threads_per_worker != 0,
    }
    if config.workers < 0:
        raise UserError(f"--workers must be >= 0, got {config.workers}")
    if not config.workers:
        if any(given.values()):
            flag = next(name for name, on in given.items() if on)
            raise UserError(f"{flag} needs --workers N (N >= 1)")
        return
    check_ray_installed()
    gpus = config.gpus_per_worker
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise UserError(f"--gpus-per-worker must be a fraction in [0, 1] or a whole number, got {gpus:g}")
    if config.threads_per_worker < 0:
        raise UserError(f"--threads-per-worker must be >= 0, got {config.threads_per_worker}")
    if config.ray_address:
        check_reachable(config.ray_address)
        return
    threads = threads_per_worker(config.workers, config.threads_per_worker)
    cores = os.cpu_count() or 1
    check_capacity(config.workers, threads, gpus, cores, torch.cuda.device_count(), "this machine")


def check_reachable(address: str) -> None:
    """Raise :class:`UserError` when nothing listens at a ``--ray-address`` of the form
    ``[ray://]host:port`` (``auto`` and other forms are left to Ray)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the cluster "
            "first (ray start --head) or check the address"
        ) from exc


def open_pool(
    config: SearchConfig,
    model: nn.Module,
    cache: FactorCache,
    data: DataSplits,
    reward_config: FinetuneConfig,
) -> InProcessPool | EvaluatorPool:
    """The pool of a stage: in this process, or ``config.workers`` Ray workers.

    Args:
        config: The run's options (``workers``, ``ray_address``, ``gpus_per_worker``,
            ``threads_per_worker``, ``seed``).
        model: The model the stage compresses (on the run's device).
        cache: Its factor cache, every layer prepared.
        data: The data splits.
        reward_config: The cheap fine-tune.
    """
    if not config.workers:
        return InProcessPool(RewardEvaluator(model, cache, data, reward_config, seed=config.seed))
    check_ray_installed()
    from rlrank.ray_pool import RayPool, RayWorkers

    workers = RayWorkers(
        count=config.workers,
        address=config.ray_address,
        gpus=config.gpus_per_worker,
        threads=config.threads_per_worker,
    )
    device = "cuda" if config.gpus_per_worker > 0 else "cpu"
    on_cpu = all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))
    sent = model if on_cpu else copy.deepcopy(model).cpu()  # a worker may have no GPU
    return RayPool(
        build_reward_evaluator,
        (sent, cache, data.to("cpu"), reward_config, config.seed, device),
        workers,
    )
