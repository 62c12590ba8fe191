"""A saved policy on disk: its files, its metadata, and the check that it fits where it is applied.

A policy folder holds ``policy.pt`` (the networks' and optimizers' tensors, loaded with
``weights_only=True``), ``replay.npz`` (the replay buffer, loaded with ``allow_pickle=False``) and
``policy.json`` (format tag, what it was trained on, hyperparameters, counters). Nothing in these
files is executed when they are read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlrank.atomic import atomic_write, save_torch, write_json
from rlrank.errors import UserError
from rlrank.safe_load import read_tensors

POLICY_FORMAT = "rlrank-policy/1"
NETWORKS_FILE = "policy.pt"
REPLAY_FILE = "replay.npz"
POLICY_META_FILE = "policy.json"
POLICY_FILES = (NETWORKS_FILE, POLICY_META_FILE, REPLAY_FILE)


class PolicyError(UserError):
    """A saved policy that is missing, unreadable or does not fit what it is applied to."""


def policy_dir(path: str | Path) -> Path:
    """The policy folder that ``path`` names: the folder itself, or the folder of a file inside it
    (``runs/X/stage-1/policy/policy.pt`` names ``runs/X/stage-1/policy``)."""
    path = Path(path)
    if path.is_file() and path.name in POLICY_FILES:
        return path.parent
    return path


def write_policy_files(
    directory: str | Path,
    networks: dict[str, Any],
    replay: dict[str, np.ndarray],
    metadata: dict[str, Any],
) -> Path:
    """Write a policy folder, each file atomically; ``metadata`` gets the format tag."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_torch(directory / NETWORKS_FILE, networks)
    atomic_write(directory / REPLAY_FILE, lambda h: np.savez(h, **replay))
    write_json(directory / POLICY_META_FILE, {"format": POLICY_FORMAT, **metadata})
    return directory


def read_networks(directory: str | Path) -> dict[str, Any]:
    """The tensors of ``policy.pt`` (``weights_only=True``: nothing in the file is executed).

    Raises:
        PolicyError: Missing, unreadable or not a file of tensors.
    """
    path = policy_dir(directory) / NETWORKS_FILE
    if not path.is_file():
        raise PolicyError(f"policy networks missing: {path} does not exist")
    networks = read_tensors(path, "policy", PolicyError)
    if not isinstance(networks, dict):
        raise PolicyError(f"{path} is not an rlrank policy (no networks in it)")
    return networks


def read_replay(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``replay.npz`` (``allow_pickle=False``), or ``None`` when there is none.

    Raises:
        PolicyError: The file is unreadable or holds objects.
    """
    path = policy_dir(directory) / REPLAY_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, KeyError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from exc


def read_policy_metadata(directory: str | Path) -> dict[str, Any]:
    """Read ``policy.json`` of a saved policy.

    Args:
        directory: The policy folder, or any file inside it (:func:`policy_dir`).

    Raises:
        PolicyError: Missing or unreadable, or not an rlrank policy.
    """
    path = policy_dir(directory) / POLICY_META_FILE
    if not path.is_file():
        raise PolicyError(f"no saved policy in {directory} ({POLICY_META_FILE} missing)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != POLICY_FORMAT:
        raise PolicyError(f"{path} is not an rlrank policy (expected format {POLICY_FORMAT})")
    return meta


def check_policy_fits(
    meta: dict[str, Any],
    observation_features: Sequence[str],
    decomposition: str,
    model: str,
    action_space: str = "relative",
    action_center: str = "uniform",
) -> str | None:
    """Check a saved policy against what it is applied to.

    Returns:
        ``None`` when it fits as is, or a warning when it was trained on another model with the
        same observation layout.

    Raises:
        PolicyError: Another observation layout, decomposition or action space.
    """
    saved = list(meta.get("observation_features", []))
    if saved != list(observation_features):
        raise PolicyError(
            f"policy observation layout {saved} does not match this environment's {list(observation_features)}"
        )
    if meta.get("decomposition") != decomposition:
        raise PolicyError(
            f"policy was trained for decomposition {meta.get('decomposition')!r}, not {decomposition!r}"
        )
    saved_actions = meta.get("action_space", "absolute")
    if saved_actions != action_space:
        raise PolicyError(
            f"policy was trained with --action-space {saved_actions}, not {action_space} "
            f"(pass --action-space {saved_actions})"
        )
    saved_center = meta.get("action_center", "uniform")
    if saved_center != action_center:
        raise PolicyError(
            f"policy was trained with --action-center {saved_center}, not {action_center} "
            f"(pass --action-center {saved_center})"
        )
    if meta.get("model") != model:
        return f"policy was trained on model {meta.get('model')!r}, applying it to {model!r} (same observation layout)"
    return None
