"""The environment's spaces and how an action becomes a rank ratio.

The observation layout (:data:`OBSERVATION_FEATURES`) is what a saved policy is checked against;
actions are declared in [-1, 1] and mapped inside the environment, absolutely (AMC's linear map onto
a step's ratio range) or relatively (a factor ``3 ** action`` on the step's fair ratio).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gymnasium import spaces

from rlrank.layers import LayerInfo

OBSERVATION_FEATURES = (
    "layer_index",
    "is_linear",
    "is_pointwise",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "feature_map",
    "layer_flops",
    "layer_params",
    "flops_removed",
    "flops_to_come",
    "previous_ratio",
    "target_budget",
    "current_ratio",
    "wall_ratio",
    "floor_ratio",
    "fair_ratio",
)
"""Names of the observation's entries, in order: the layout a saved policy is checked against."""


def layer_features(steps: Sequence[LayerInfo], dense_macs: int, dense_params: int) -> np.ndarray:
    """The first 10 observation entries of every step (what does not change within an episode):
    layer index, linear / pointwise flags, channels, kernel, stride and feature map (each divided by
    its maximum over the steps), MACs and parameters (fractions of the dense model's)."""

    def norm(values: list[float]) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        top = arr.max()
        return arr / top if top > 0 else arr

    n = len(steps)
    feats = np.zeros((n, 10), dtype=np.float64)
    feats[:, 0] = np.arange(n) / max(1, n - 1)
    feats[:, 1] = [layer.kind == "linear" for layer in steps]
    feats[:, 2] = [layer.is_pointwise for layer in steps]
    feats[:, 3] = norm([layer.in_channels for layer in steps])
    feats[:, 4] = norm([layer.out_channels for layer in steps])
    feats[:, 5] = norm([layer.kernel[0] for layer in steps])
    feats[:, 6] = norm([layer.stride[0] for layer in steps])
    feats[:, 7] = norm([layer.in_hw[0] for layer in steps])
    feats[:, 8] = [layer.macs / dense_macs for layer in steps]
    feats[:, 9] = [layer.params / dense_params for layer in steps]
    return feats


ACTION_MODES = ("relative", "absolute")
RELATIVE_SCALE = 3.0
"""With ``action_mode="relative"``, actions -1 / +1 divide / multiply the fair ratio by this."""


def observation_space() -> spaces.Box:
    """The environment's observation space: :data:`OBSERVATION_FEATURES` in [0, 1], float32."""
    return spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)


def action_space(dims: int = 1) -> spaces.Box:
    """The environment's action space: ``dims`` actions in [-1, 1], float32 (one: the ratio; the
    mixed decomposition's second: the family)."""
    return spaces.Box(-1.0, 1.0, shape=(dims,), dtype=np.float32)


def action_to_ratio(action: float, low: float, high: float) -> float:
    """Map an action in [-1, 1] linearly onto a rank ratio in ``[low, high]``."""
    a = float(np.clip(action, -1.0, 1.0))
    return low + (a + 1.0) * 0.5 * (high - low)


def ratio_to_action(ratio: float, low: float, high: float) -> float:
    """Inverse of :func:`action_to_ratio` (ratios outside ``[low, high]`` are clipped)."""
    if high <= low:
        return 1.0
    return float(np.clip(2.0 * (ratio - low) / (high - low) - 1.0, -1.0, 1.0))


def relative_action_to_ratio(action: float, fair: float) -> float:
    """Map an action in [-1, 1] to ``fair * RELATIVE_SCALE ** action`` (0 gives the fair ratio)."""
    a = float(np.clip(action, -1.0, 1.0))
    return fair * RELATIVE_SCALE**a
