"""The resolved configuration of one search: every command-line option, as a dataclass.

Defaults are sized for the embedded default (ResNet-18 on scikit-learn's 8x8 digits), so that
``python -m rlrank.search --model resnet18 --flops 0.5`` finishes in minutes on a laptop CPU.
For real data sets raise ``episodes``, ``warmup``, ``finetune_steps`` and the epoch counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

AGENTS = ("ddpg", "random", "uniform", "energy", "vbmf")


@dataclass
class SearchConfig:
    """Everything a search needs; written to ``config.json`` in the run folder.

    Attributes are grouped as on the command line: model and data, budget and decomposition,
    search, reward (cheap fine-tune), training, multi-stage, policy reuse, run.
    """

    # model and data
    model: str = "resnet18"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_size: float | None = None
    split_seed: int = 0
    checkpoint: str | None = None
    pretrained: bool = False
    # budget and decomposition
    flops: float = 0.5
    decomposition: str = "tucker2"
    hooi_iters: int = 0
    data_aware: bool = False
    data_aware_batches: int = 8
    min_ratio: float = 0.05
    fill_budget: bool = True
    action_space: str = "relative"
    action_center: str = "uniform"
    # search
    agent: str = "ddpg"
    episodes: int = 100
    warmup: int = 25
    spread: float = 1.0
    start_at_center: bool = True
    noise: float = 0.5
    noise_decay: float = 0.95
    credit: str = "copy"
    reward: str = "acc"
    # reward: the cheap fine-tune
    finetune_steps: int = 10
    finetune_lr: float = 0.01
    finetune_batch_size: int = 64
    bn_batches: int = 4
    reward_val_images: int = 0
    # training: dense model (when no checkpoint) and final fine-tune
    dense_epochs: float = 10.0
    dense_lr: float = 0.05
    final_epochs: float = 5.0
    final_lr: float = 0.01
    batch_size: int = 64
    distill: float = 0.5
    # multi-stage
    stages: int = 1
    stage_budgets: list[float] | None = None
    stage_epochs: float = 2.0
    # policy reuse
    train_budgets: list[float] | None = None
    policy: str | None = None
    # run
    device: str = "auto"
    seed: int = 0
    out: str = "runs"
    checkpoint_every: int = 1
    latency: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def budgets_of_stages(self) -> list[float]:
        """Each stage's FLOP budget (relative to the dense model); the last is ``flops``.

        Default schedule: geometric, ``flops ** (k / stages)`` for stage ``k``.
        """
        if self.stage_budgets:
            return [float(b) for b in self.stage_budgets]
        return [self.flops ** ((k + 1) / self.stages) for k in range(self.stages)]
