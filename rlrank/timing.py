"""Timing forward passes fairly on a shared machine: several modules in interleaved rounds."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def time_interleaved(
    modules: Sequence[nn.Module], x: torch.Tensor, rounds: int, warmup: int = 3
) -> list[float]:
    """Lower-quartile milliseconds of one forward pass of each module on ``x``, timed in rounds that
    run every module once."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = [[] for _ in modules]
    with torch.no_grad():
        return _rounds(modules, x, rounds, warmup, sync, times)


def _rounds(modules, x, rounds, warmup, sync, times) -> list[float]:  # noqa: ANN001 - see time_interleaved
    for round_ in range(warmup + rounds):
        for module, kept in zip(modules, times, strict=True):
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            if round_ >= warmup:
                kept.append((time.perf_counter() - start) * 1000.0)
    return [float(np.percentile(kept, 25)) for kept in times]
