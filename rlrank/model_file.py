"""The model file: a dense or compressed model as tensors plus what rebuilds it, and :func:`load`.

A file holds the format tag, the architecture (:class:`~rlrank.models.ModelSpec`), the factorized
structure (:func:`~rlrank.surgery.factorization_of`), the state dict and free metadata, all plain
containers and tensors, so it loads with ``weights_only=True`` and nothing in it is executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlrank.atomic import save_torch
from rlrank.models import ModelError, ModelSpec, build_model, load_state_into
from rlrank.safe_load import load_error, load_tensors
from rlrank.surgery import apply_factorization, factorization_of

MODEL_FORMAT = "rlrank-model/1"


def save(
    path: str | Path, model: nn.Module, spec: ModelSpec, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save ``model`` with what :func:`load` needs to rebuild it (architecture, factorization).

    The file holds only tensors and plain containers, so it loads with ``weights_only=True``.
    """
    payload = {
        "format": MODEL_FORMAT,
        "arch": spec.to_dict(),
        "factorized": factorization_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    return save_torch(path, payload)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by rlrank (dense or compressed) and return it ready to run (eval mode).

    Raises:
        ModelError: The file is missing, unreadable or not an rlrank model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        payload = load_tensors(path)
    except Exception as exc:
        raise ModelError(load_error("model file", path, exc)) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not an rlrank model file (expected format {MODEL_FORMAT})")
    model = build_model(ModelSpec.from_dict(payload["arch"]))
    apply_factorization(model, payload["factorized"])
    load_state_into(model, payload["state_dict"], source=str(path))
    return model.to(map_location).eval()


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Architecture, factorization and metadata of a saved model, without building it."""
    try:
        payload = load_tensors(path)
    except Exception as exc:
        raise ModelError(load_error("model file", path, exc)) from exc
    return {k: payload[k] for k in ("format", "arch", "factorized", "metadata") if k in payload}
