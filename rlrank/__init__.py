"""rlrank: compress a trained CNN to a FLOP budget with low-rank decomposition, choosing every
layer's rank with reinforcement learning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["compress", "load", "save", "__version__"]


def __getattr__(name: str) -> Any:
    """``rlrank.compress``, ``rlrank.load`` and ``rlrank.save``, imported on first use (PEP 562).

    Lazy so that torch-free modules (``rlrank.analysis``, ``rlrank.config``, ``rlrank.runlog``)
    can be imported without importing torch.
    """
    if name in ("load", "save"):
        from rlrank import model_file

        return getattr(model_file, name)
    if name == "compress":
        from rlrank.api import compress

        return compress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
