"""A Ctrl-C swallowed on its way (by a C extension's callback) still stops the episode loop."""

from __future__ import annotations

import signal

import pytest

from rlrank.interrupts import interrupt_latch


def swallowing_callback() -> None:
    """What a C extension's ignored-exception callback does to a KeyboardInterrupt raised in it."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check() -> None:
    with interrupt_latch() as latch:
        latch.check()  # nothing yet
        swallowing_callback()
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        latch.check()  # raised once


def test_ctrl_c_still_interrupts_at_once_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupt_latch():
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_sigint_stays_ignored() -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt_latch() as latch:
            signal.raise_signal(signal.SIGINT)
            latch.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
