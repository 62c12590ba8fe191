"""Typed records of what a search produces: an episode row, a stage result and the run's report.

Each record is a dataclass with ``to_dict`` / ``from_dict``: the dict is exactly what the run folder
holds as JSON (``episodes.jsonl`` rows, ``stage-K/result.json``, ``report.json``), so readers that
never import torch (the analysis, the experiments) see the same fields the pipeline writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

TIMING_KEYS = ("decompose", "finetune", "evaluate", "agent", "env", "total")
"""The phases an episode's wall time is split into (``EpisodeRow.time``)."""


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class EpisodeRow:
    """One episode of a search, as one line of ``episodes.jsonl``.

    Attributes:
        stage: Compression stage (1-based).
        episode: Episode index within the stage (0-based).
        agent: The agent that chose the actions (``ddpg``, ``random``, a rule, ``policy``).
        budget: The episode's FLOP budget (fraction of the dense model's MACs).
        reward: The reward the agent received.
        accuracy: Validation accuracy after the cheap fine-tune (0 when the episode failed).
        loss: Validation loss (``None`` when not finite).
        flops_ratio: Fraction of the dense model's MACs the strategy keeps.
        params_ratio: Fraction of the dense model's parameters it keeps.
        failed: Why the evaluation failed, or ``None``.
        time: Seconds per phase, keys :data:`TIMING_KEYS`.
        layers: Per layer: ``ratio``, ``ranks`` (``None``: dense) and ``method``.
        agent_stats: What the agent reported (critic loss, noise std, ...).
        timestamp: Seconds since the epoch when the episode ended.
        phase: ``center``, ``warmup``, ``explore``, ``random``, ``policy`` or ``rule``.
        latency_ratio: Predicted fraction of the dense model's latency (with ``--latency`` only).
        worker: The Ray worker that priced the strategy (with ``--workers`` only).
    """

    stage: int
    episode: int
    agent: str
    budget: float
    reward: float
    accuracy: float
    loss: float | None
    flops_ratio: float
    params_ratio: float
    failed: str | None
    time: dict[str, float]
    layers: dict[str, dict[str, Any]]
    agent_stats: dict[str, float] = field(default_factory=dict)
    timestamp: float = 0.0
    phase: str = ""
    latency_ratio: float | None = None
    worker: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("latency_ratio", "worker"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpisodeRow:
        return cls(**_known(cls, data))

    def ratios(self) -> dict[str, float]:
        """The strategy's rank ratio per layer."""
        return {name: float(entry["ratio"]) for name, entry in self.layers.items()}


@dataclass
class StageResult:
    """What one stage (search, then decompose with the best strategy and fine-tune) produced.

    Attributes mirror ``stage-K/result.json``; ``time_per_episode`` holds the mean seconds per
    phase (:data:`TIMING_KEYS`).
    """

    stage: int
    budget: float
    episodes: int
    failed_episodes: int
    best_episode: int
    best_reward: float
    best_val_accuracy_before_finetune: float
    val_accuracy: float
    flops_ratio: float
    params_ratio: float
    search_seconds: float
    finetune_seconds: float
    finetune_epochs: float
    time_per_episode: dict[str, float]
    decomposition_error: float | None = None
    """Mean over the decomposed layers of ``||W - proj_r(W)|| / ||W||`` when they were decomposed."""
    admm_epochs: float = 0.0
    decomposition_error_before_admm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        return cls(**_known(cls, data))


@dataclass
class ModelSummary:
    """Accuracy and cost of one model (dense or compressed) in the report."""

    val_accuracy: float
    test_accuracy: float
    macs: int
    params: int
    flops_ratio: float | None = None
    params_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Report:
    """``report.json``: dense vs compressed, the stages, the cost of the search.

    Attributes:
        stages: Every stage's :class:`StageResult` as a dict.
        latency_ms: Per batch size, dense and compressed latency and the speed-up (``None`` with
            ``--no-latency``).
        latency_unreliable: Why the latency figures cannot be trusted (the machine was busy while
            they were measured), or ``None``.
        latency_budget: ``--latency``, or ``None``.
        predicted_latency_ratio: With ``--latency``, the compressed model's latency as a fraction of
            the dense model's, predicted from the latency table (compare ``latency_ms``).
    """

    model: str
    dataset: str
    decomposition: str
    agent: str
    budget: float
    device: str
    dense: ModelSummary
    compressed: ModelSummary
    test_accuracy_delta: float
    stages: list[dict[str, Any]]
    reward_evaluations: int
    search_seconds: float
    warnings: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] | None = None
    latency_unreliable: str | None = None
    wall_seconds: float = 0.0
    latency_budget: float | None = None
    predicted_latency_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["dense"] = self.dense.to_dict()
        data["compressed"] = self.compressed.to_dict()
        if self.latency_ms is None:
            del data["latency_ms"]
        for name in ("latency_unreliable", "latency_budget", "predicted_latency_ratio"):
            if data[name] is None:
                del data[name]
        return data
