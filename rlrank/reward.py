"""Pricing a strategy: decompose from the factor cache, cheap fine-tune, accuracy on validation.

:class:`RewardEvaluator` is what the pipeline injects into the environment. Each call applies the
strategy to a copy of the base model (factors come truncated from the cache, never recomputed),
re-estimates BatchNorm statistics on training batches, optionally takes a few SGD steps (off by
default: BN re-estimation alone ranks strategies closest to their accuracy after a real fine-tune,
Spearman 0.89 against 0.75 with 10 steps, in ``experiments/RESULTS.md`` "Reward fidelity") and
measures the validation accuracy.

On the CPU the compressed copy runs in ``channels_last`` layout and is evaluated in batches of
:data:`EVAL_BATCH`: the thin factor convolutions of a low-rank model are memory-bound, and both
choices measured faster on ResNet-20 CIFAR-10 (evaluation of 1,000 images 1.7 s -> 0.5 s, BN
re-estimation 0.22 s -> 0.13 s, the same accuracy; "Episode cost" in ``experiments/RESULTS.md``) and
never slower on the embedded digits.

Every episode of a stage sees the *same* fine-tune batches and augmentations (common random
numbers): a strategy's reward is then a deterministic function of the strategy, and two strategies
are compared under identical conditions. With a different stream per episode the reward of one
fixed strategy varies by about one accuracy point on the embedded digits data, as much as the
differences the search has to rank (measured in ``experiments/RESULTS.md``). Pass
``common_batches=False`` to draw a new stream per episode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from rlrank.data import DataSplits
from rlrank.envs import Evaluation
from rlrank.factor_cache import FactorCache
from rlrank.finetune import FinetuneConfig, NumericalFault, evaluate, finetune_steps, reestimate_bn
from rlrank.planning import LayerPlan
from rlrank.surgery import decompose_model

logger = logging.getLogger(__name__)

EVAL_BATCH = 128
"""Validation images per forward pass of a reward (512 was 3x slower on CPU for ResNet-20)."""


class RewardEvaluator:
    """Callable ``plans -> Evaluation`` for the environment.

    Args:
        model: The model being compressed (on the run's device); never modified.
        cache: Its factor cache.
        data: The data splits (on the run's device).
        config: Cheap fine-tune settings.
        seed: Base seed; call :meth:`set_episode` to derive the episode's stream.
        common_batches: The same fine-tune batches for every episode of a stage (default).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: FactorCache,
        data: DataSplits,
        config: FinetuneConfig,
        seed: int = 0,
        common_batches: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        self.data = data
        self.config = config
        self.seed = seed
        self.common_batches = common_batches
        self.episode_seed = seed
        self.val = data.held(data.val.subset(config.val_images) if config.val_images > 0 else data.val)
        param = next(model.parameters(), None)
        self.channels_last = param is not None and param.device.type == "cpu"

    def set_episode(self, stage: int, episode: int) -> None:
        """Derive the random stream (fine-tune batches, augmentation) of one episode."""
        episode = 0 if self.common_batches else episode
        self.episode_seed = (self.seed * 1_000_003 + stage * 10_007 + episode) % (2**63)

    def __call__(self, plans: Sequence[LayerPlan]) -> Evaluation:
        timings: dict[str, float] = {}
        generator = torch.Generator().manual_seed(self.episode_seed)
        start = time.perf_counter()
        compressed = decompose_model(self.model, plans, self.cache)
        if self.channels_last:
            compressed = compressed.to(memory_format=torch.channels_last)
        timings["decompose"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            reestimate_bn(compressed, self.data, self.config.bn_batches, self.config.batch_size, generator)
            finetune_steps(compressed, self.data, self.config, generator)
        except NumericalFault as exc:
            timings["finetune"] = time.perf_counter() - start
            logger.info("episode failed: %s", exc)
            return Evaluation(accuracy=0.0, failed=str(exc), timings=timings)
        timings["finetune"] = time.perf_counter() - start
        start = time.perf_counter()
        accuracy, loss = evaluate(compressed, self.data, self.val, batch_size=EVAL_BATCH)
        timings["evaluate"] = time.perf_counter() - start
        if not torch.isfinite(torch.tensor(loss)):
            return Evaluation(accuracy=0.0, loss=loss, failed=f"validation loss is {loss}", timings=timings)
        return Evaluation(accuracy=accuracy, loss=loss, timings=timings)
