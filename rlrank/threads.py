"""CPU threads: a passive OpenMP wait policy for the commands, ``--threads``, and a busy-machine warning.

On a machine whose cores are shared (several searches, a CI runner, Ray workers), torch's OpenMP
threads spin while they wait for each other, and a step can take five times longer with two threads
than with one (measured in ``experiments/RESULTS.md``). ``OMP_WAIT_POLICY=PASSIVE`` makes waiting
threads sleep instead; it must be set before torch is first imported, so the commands call
:func:`prefer_passive_wait` first thing (a value the user set is kept).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

BUSY_FACTOR = 1.5
"""The machine counts as busy when its 1-minute load average exceeds this many times its CPUs."""


def prefer_passive_wait() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy (call before importing torch)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(threads: int) -> int:
    """Give torch ``threads`` intra-op threads (0: leave torch's default, one per core); warn when
    the machine is busy and several threads would wait on each other. Returns the threads in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    in_use = torch.get_num_threads()
    load = busy_load()
    if load is not None and in_use > 1:
        logger.warning(
            "the machine is busy (load average %.1f on %d CPUs): %d torch threads will wait for each "
            "other; --threads 1 is usually faster on a shared machine",
            load,
            available_cpus(),
            in_use,
        )
    return in_use


def busy_load() -> float | None:
    """The 1-minute load average when it exceeds :data:`BUSY_FACTOR` times the CPUs, else ``None``."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    return load if load > BUSY_FACTOR * os.cpu_count() else None
