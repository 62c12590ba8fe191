"""Ctrl-C that is never lost: a latch that remembers SIGINT until the episode loop looks.

Python raises ``KeyboardInterrupt`` at the next bytecode the main thread runs after SIGINT. When
that bytecode belongs to a callback that a C extension calls and whose exceptions it ignores (Ray's
core worker calls into Python while it submits tasks, and prints "Exception ignored in ..."), the
interrupt is swallowed and the search runs on. Inside :func:`interrupt_latch` the signal is also
recorded, and :meth:`InterruptLatch.check` raises ``KeyboardInterrupt`` at a point of the loop where
nothing can swallow it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class InterruptLatch:
    """Whether SIGINT arrived since the latch was installed (see :func:`interrupt_latch`)."""

    def __init__(self) -> None:
        self.signalled = False

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if SIGINT arrived (and was perhaps swallowed on its way)."""
        if self.signalled:
            self.signalled = False
            raise KeyboardInterrupt


@contextmanager
def interrupt_latch() -> Iterator[InterruptLatch]:
    """While inside, SIGINT raises ``KeyboardInterrupt`` as usual and also sets the latch.

    Outside the main thread, or where SIGINT is ignored or handled by C code, nothing is installed
    and the latch never fires. The previous handler is restored on exit.
    """
    latch = InterruptLatch()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield latch
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        latch.signalled = True
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL would end the process without its run folder's note: interrupt instead
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield latch
    finally:
        signal.signal(signal.SIGINT, previous)
