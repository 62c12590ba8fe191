"""CPU threads: how OpenMP threads wait, ``--threads``, and a busy-machine warning.

On a machine whose cores are shared (several searches, a CI runner, Ray workers), torch's OpenMP
threads spin while they wait for each other, and a step can take three times longer with two threads
than with one. Measured (``experiments/RESULTS.md``, "Under load"): ``OMP_WAIT_POLICY=PASSIVE``
(waiting threads sleep) is the fastest on a busy machine but about twice as slow as the default on an
idle one; ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep) keeps the idle speed and halves the
busy machine's cost. :func:`choose_openmp_wait` therefore picks the passive policy when the machine
is busy at start and the bounded spin otherwise. Both must be set before torch is first imported,
so the commands call it first thing; a setting of the user's is kept.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

BUSY_FACTOR = 1.5
"""The machine counts as busy when its 1-minute load average exceeds this many times its CPUs."""


OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BOUNDED_SPIN = "10000"
"""``GOMP_SPINCOUNT`` on an idle machine: as fast as OpenMP's default there, far better when busy."""


def choose_openmp_wait() -> str:
    """Set how OpenMP threads wait, unless the user did: ``OMP_WAIT_POLICY=PASSIVE`` on a busy
    machine, ``GOMP_SPINCOUNT=10000`` on an idle one. Call before torch is imported.

    Returns:
        The setting in force, as ``NAME=value`` (the user's own when they set one).
    """
    for name in OPENMP_VARIABLES:
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    if busy_load() is not None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "OMP_WAIT_POLICY=PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = BOUNDED_SPIN
    return f"GOMP_SPINCOUNT={BOUNDED_SPIN}"


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(threads: int) -> int:
    """Give torch ``threads`` intra-op threads (0: leave torch's default, one per core); returns the
    threads in use."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def warn_if_busy() -> None:
    """Warn when the machine is busy and torch's several threads would wait on each other."""
    import torch

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


def busy_load() -> float | None:
    """The 1-minute load average when it exceeds :data:`BUSY_FACTOR` times the CPUs, else ``None``."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    return load if load > BUSY_FACTOR * os.cpu_count() else None
