"""What pricing a strategy reports to the environment, and the evaluator's signature."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlrank.planning import LayerPlan


@dataclass
class Evaluation:
    """What an evaluator reports for one strategy.

    Attributes:
        accuracy: Validation accuracy in [0, 1] after the cheap fine-tune.
        loss: Validation loss.
        failed: Why the evaluation failed (non-finite loss, ...), or ``None``.
        timings: Seconds spent per phase (``decompose``, ``finetune``, ``evaluate``).
    """

    accuracy: float
    loss: float = float("nan")
    failed: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


Evaluator = Callable[[list[LayerPlan]], Evaluation]
