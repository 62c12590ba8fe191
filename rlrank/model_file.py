"""The model file: a dense or compressed model as tensors plus what rebuilds it, and :func:`load`.

A file holds the format tag, the architecture (:class:`~rlrank.models.ModelSpec`), the factorized
structure (:func:`~rlrank.surgery.factorization_of`), the state dict and free metadata, all plain
containers and tensors, so it loads with ``weights_only=True`` and nothing in it is executed. A
sparse + low-rank layer (``--sparse``) adds its filter count to its factorization entry; which
filters it keeps is its ``filter_index`` buffer, in the state dict. Every layer's channel counts
(:func:`~rlrank.surgery.channel_counts_of`) rebuild the narrower layers of a pruned model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlrank.atomic import save_torch
from rlrank.models import ModelError, ModelSpec, build_model, builder_of, load_checkpoint, load_state_into
from rlrank.safe_load import read_tensors
from rlrank.surgery import apply_channel_counts, apply_factorization, channel_counts_of, factorization_of

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
        "source": source_of(model, spec),
        "factorized": factorization_of(model),
        "channels": channel_counts_of(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    return save_torch(path, payload)


def load(
    path: str | Path, map_location: str | torch.device = "cpu", model: nn.Module | None = None
) -> nn.Module:
    """Load a model saved by rlrank (dense or compressed), or your own checkpoint into ``model``, and
    return it ready to run (eval mode).

    An rlrank model file rebuilds its architecture by itself: a registered model by its name; a model
    of your own (compressed through :func:`rlrank.compress`) by importing the class or the registered
    builder it was made from, so it reloads in a fresh process as long as that code is importable.

    Args:
        path: An rlrank model file, or a plain checkpoint (a state dict, ``{'state_dict': ...}``).
        map_location: Device of the returned model.
        model: For a plain checkpoint: a model of its architecture to load it into.

    Raises:
        ModelError: The file is missing, unreadable, or a plain checkpoint without ``model``; or the
            architecture cannot be rebuilt.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    payload = read_tensors(path, "model file", ModelError)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        if model is None:
            raise ModelError(
                f"{path} is not an rlrank model file (expected format {MODEL_FORMAT}); a plain checkpoint "
                "loads with rlrank.load(path, model=<a model of its architecture>)"
            )
        load_checkpoint(model, path)
        return model.to(map_location).eval()
    model = _rebuild(ModelSpec.from_dict(payload["arch"]), payload.get("source") or {})
    apply_channel_counts(model, payload.get("channels") or {})
    apply_factorization(model, payload["factorized"])
    load_state_into(model, payload["state_dict"], source=str(path))
    return model.to(map_location).eval()


def source_of(model: nn.Module, spec: ModelSpec) -> dict[str, str | None]:
    """Where a model's code lives, for :func:`load` in a fresh process: its registered builder and its
    class, each as ``module:qualname`` (``None`` when it cannot be imported, e.g. defined in a script)."""

    def importable(obj: object) -> str | None:
        module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if not module or module == "__main__" or "<locals>" in name:
            return None
        return f"{module}:{name}"

    builder = builder_of(spec.name)
    return {"builder": importable(builder) if builder else None, "class": importable(type(model))}


def _rebuild(spec: ModelSpec, source: Mapping[str, str | None]) -> nn.Module:
    """Build ``spec``: from the registry, after importing the builder's module if it is not registered
    yet (its import registers it), or from the saved class constructed without arguments."""
    if builder_of(spec.name) is None and source.get("builder"):
        module = str(source["builder"]).split(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ModelError(
                f"model {spec.name!r} is registered in {module}, which cannot be imported: {exc}"
            ) from exc
    if builder_of(spec.name) is not None:
        return build_model(spec)
    if source.get("class"):
        module, _, qualname = str(source["class"]).partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            return cls()
        except Exception as exc:  # an import error, or a constructor that needs arguments
            raise ModelError(
                f"model {spec.name!r} was made from {source['class']}, which cannot be built here "
                f"({type(exc).__name__}: {exc}); register a builder with rlrank.models.register_model("
                f"{spec.name!r}) in an importable module, then load again"
            ) from exc
    return build_model(spec)  # raises "unknown model", listing the known ones


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Architecture, factorization and metadata of a saved model, without building it."""
    payload = read_tensors(path, "model file", ModelError)
    return {k: payload[k] for k in ("format", "arch", "factorized", "metadata") if k in payload}
