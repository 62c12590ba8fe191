"""Reading a torch file safely: tensors and plain containers only, and a clear word when refused.

Every file rlrank reads with ``torch.load`` (checkpoints, model files, policies, resume states) is
loaded with ``weights_only=True``, so a pickle that carries code is never executed. torch's own
message for such a file ends by suggesting ``weights_only=False``, exactly what must not be done
with a file from elsewhere; :func:`load_error` says instead that the file is refused and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tensors(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: str | Path, what: str, error: type[Exception]) -> Any:
    """:func:`load_tensors`, raising ``error`` with :func:`load_error`'s one line when it fails."""
    try:
        return load_tensors(path)
    except Exception as exc:
        raise error(load_error(what, path, exc)) from exc


def load_error(what: str, path: str | Path, exc: BaseException) -> str:
    """One line saying why the ``what`` at ``path`` (``"checkpoint"``, ``"model file"``, ...) could not
    be loaded, without torch's ``weights_only=False`` hint."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text or "Unsupported global" in text:
        return (
            f"cannot read {what} {path}: refused, it holds pickled code or objects, not only tensors "
            "(rlrank never executes a pickle from a file)"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"cannot read {what} {path}: {first}"
