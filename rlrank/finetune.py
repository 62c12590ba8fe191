"""Training, cheap fine-tuning, BatchNorm re-estimation, evaluation and latency.

The cheap fine-tune that prices every episode's strategy is :func:`reestimate_bn` followed by
:func:`finetune_steps`; the dense model's training and the final fine-tune of the chosen strategy
use :func:`train_epochs` (SGD with Nesterov momentum and a one-cycle schedule, optionally with
knowledge distillation from the dense model).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlrank.data import DataSplits, Split
from rlrank.errors import RunFailure, UserError
from rlrank.modes import preserved_modes

logger = logging.getLogger(__name__)


class NumericalFault(RunFailure):
    """A loss or a weight became NaN or infinite."""


class DeviceError(UserError):
    """A device that does not exist here."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        DeviceError: CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)")
        return torch.device(name)
    raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda")


FINAL_FINETUNE_IMAGES = 540_000
"""Training images the default final fine-tune sees: 12 epochs of CIFAR-10's 45,000, the length at
which decompose + fine-tune met issue 16's goals on ResNet-20 (experiments/RESULTS.md)."""
FINAL_EPOCHS_RANGE = (1.0, 12.0)
"""Fewest and most epochs of the default final fine-tune: a small data set gets the epochs that
were enough on CIFAR-10 rather than hundreds; a very large one gets at least one pass."""


def final_epochs_for(train_images: int) -> float:
    """The default final fine-tune length (``--final-epochs``) for a training split of this size.

    About :data:`FINAL_FINETUNE_IMAGES` images' worth, rounded to whole epochs, within
    :data:`FINAL_EPOCHS_RANGE`: 12 epochs for CIFAR-10 (45,000 images) and for digits, 1 for
    ImageNet (1.28 M).
    """
    low, high = FINAL_EPOCHS_RANGE
    return float(min(max(round(FINAL_FINETUNE_IMAGES / max(train_images, 1)), low), high))


@dataclass
class TrainConfig:
    """Settings of a multi-epoch training run (dense training or final fine-tune).

    Attributes:
        epochs: Passes over the training split (fractions allowed, e.g. 0.5).
        lr: Peak learning rate of the one-cycle schedule.
        momentum: Nesterov momentum.
        weight_decay: L2 penalty.
        batch_size: Images per step.
        distill: Weight of knowledge distillation from a teacher (0 = off).
        temperature: Distillation temperature.
    """

    epochs: float = 1.0
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    distill: float = 0.0
    temperature: float = 4.0


@dataclass
class FinetuneConfig:
    """The cheap fine-tune that prices one strategy.

    Attributes:
        steps: SGD steps on training batches after BN re-estimation (0: BN re-estimation only).
        lr: Constant learning rate of those steps.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        batch_size: Images per step.
        bn_batches: Training batches used to re-estimate BatchNorm statistics.
        val_images: Validation images the reward is measured on (0: the whole split).
    """

    steps: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    bn_batches: int = 4
    val_images: int = 1000


EXPLOSION = 1e3
"""A loss this many times its first value (and above 1) counts as diverged, even while finite."""


def check_loss(loss: torch.Tensor, first: float | None, step: int, what: str) -> float:
    """The loss as a float; raise :class:`NumericalFault` if it is not finite or has exploded
    (grown by :data:`EXPLOSION` over ``first``, the first step's loss)."""
    value = loss.item()
    if not math.isfinite(value):
        raise NumericalFault(f"{what} loss became {value} at step {step}")
    if first is not None and value > EXPLOSION * max(first, 1.0):
        raise NumericalFault(f"{what} loss exploded from {first:.3g} to {value:.3g} at step {step}")
    return value


def check_finite(model: nn.Module) -> None:
    """Raise :class:`NumericalFault` if any parameter or buffer is NaN or infinite."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NumericalFault(f"non-finite values in {name}")


def _loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    distill: float,
    temperature: float,
) -> torch.Tensor:
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and distill > 0:
        soft = F.kl_div(
            F.log_softmax(logits / temperature, dim=1),
            F.softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
        ) * (temperature**2)
        loss = (1 - distill) * loss + distill * soft
    return loss


@torch.no_grad()
def reestimate_bn(
    model: nn.Module, data: DataSplits, batches: int, batch_size: int, generator: torch.Generator
) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them on ``batches`` training batches.

    After low-rank surgery the activations' statistics shift; fresh statistics recover much of the
    accuracy for free (the cumulative average over the batches is used, not a momentum average).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with preserved_modes(model):
        model.train()
        stream = data.endless_batches(data.train, batch_size, generator, augment=False)
        for _ in range(batches):
            images, _ = next(stream)
            model(images)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def finetune_steps(
    model: nn.Module,
    data: DataSplits,
    config: FinetuneConfig,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 4.0,
) -> float:
    """``config.steps`` SGD steps on augmented training batches; returns the mean loss (with a
    ``teacher``: cross-entropy and distillation mixed as in :func:`train_epochs`).

    Raises:
        NumericalFault: The loss or the weights became non-finite.
    """
    if config.steps <= 0:
        return float("nan")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if teacher is not None:
        teacher.eval()
    model.train()
    stream = data.endless_batches(data.train, config.batch_size, generator, augment=True)
    total, first = 0.0, None
    for step in range(config.steps):
        images, labels = next(stream)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(images)
        loss = _loss(model(images), labels, teacher_logits, distill, temperature)
        value = check_loss(loss, first, step, "fine-tune")
        first = value if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
    check_finite(model)
    return total / config.steps


def train_epochs(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
    desc: str = "training",
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
    keep_best: Split | None = None,
) -> float:
    """Train for ``config.epochs`` epochs with a one-cycle schedule; returns the last epoch's mean loss.

    ``after_step(step)`` is called after every optimizer step (e.g. ADMM's decoupled pull). With
    ``keep_best`` (a validation split), the model is evaluated on it after every epoch and at the
    end (shown in the progress bar, logged), and ends with the weights of its best epoch.

    Raises:
        NumericalFault: The loss became non-finite.
    """
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = max(1, int(round(config.epochs * steps_per_epoch)))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )
    if total_steps >= 8:
        schedule: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.25, anneal_strategy="cos"
        )
    else:  # too few steps for a warm-up: linear decay
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    if teacher is not None:
        teacher.eval()
    from tqdm.auto import tqdm

    stream = data.endless_batches(data.train, config.batch_size, generator, augment=True)
    model.train()
    running, seen, first = 0.0, 0, None
    bar = tqdm(range(total_steps), desc=desc, unit="step", disable=not progress, leave=False)
    best = _BestEpoch(model, data, keep_best) if keep_best is not None else None
    for step in bar:
        images, labels = next(stream)
        teacher_logits = None
        if teacher is not None and config.distill > 0:
            with torch.no_grad():
                teacher_logits = teacher(images)
        loss = _loss(model(images), labels, teacher_logits, config.distill, config.temperature)
        value = check_loss(loss, first, step, "training")
        first = value if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        if step % steps_per_epoch == 0:
            running, seen = 0.0, 0
        running += value
        seen += 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running / seen:.3f}", **best.postfix() if best else {})
        if best is not None and ((step + 1) % steps_per_epoch == 0 or step + 1 == total_steps):
            best.measure((step + 1) / steps_per_epoch)
    check_finite(model)
    if best is not None:
        best.restore()
    return running / max(seen, 1)


class _BestEpoch:
    """Validation accuracy after every epoch of a training run, and the weights of the best one."""

    def __init__(self, model: nn.Module, data: DataSplits, val: Split) -> None:
        self.model, self.data, self.val = model, data, val
        self.accuracies: list[tuple[float, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None

    def measure(self, epoch: float) -> None:
        accuracy, _ = evaluate(self.model, self.data, self.val)
        logger.info("epoch %.3g: val accuracy %.4f", epoch, accuracy)
        if not self.accuracies or accuracy > max(a for _, a in self.accuracies):
            self.best_state = copy.deepcopy(self.model.state_dict())
        self.accuracies.append((epoch, accuracy))

    def postfix(self) -> dict[str, str]:
        return {"val": f"{self.accuracies[-1][1]:.4f}"} if self.accuracies else {}

    def restore(self) -> None:
        """Put the best epoch's weights back when a later epoch was worse."""
        epoch, accuracy = max(self.accuracies, key=lambda item: item[1])
        if self.best_state is not None and accuracy > self.accuracies[-1][1]:
            self.model.load_state_dict(self.best_state)
            logger.info(
                "kept the weights of epoch %.3g (val accuracy %.4f; the last epoch's: %.4f)",
                epoch, accuracy, self.accuracies[-1][1],
            )  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module, data: DataSplits, split: Split, batch_size: int = 512, desc: str | None = None
) -> tuple[float, float]:
    """Top-1 accuracy (0..1) and mean cross-entropy of ``model`` on ``split`` (with a progress bar
    titled ``desc`` when one is given: the long evaluations of the dense and final models)."""
    from tqdm.auto import tqdm

    correct, loss, n = 0, 0.0, 0
    batches = data.batches(split, batch_size)
    total = -(-len(split) // batch_size)
    with preserved_modes(model):
        model.eval()
        for images, labels in tqdm(
            batches, desc=desc, total=total, unit="batch", disable=desc is None, leave=False
        ):
            logits = model(images)
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            n += labels.numel()
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 20,
) -> float:
    """Median wall time in milliseconds of one forward pass of a ``batch_size`` batch on ``device``.

    ``model`` is left as it was: a model on another device is measured on a copy, and every
    submodule's train / eval flag is restored.
    """
    param = next(model.parameters(), None)
    on_device = param is None or param.device == torch.device(device)
    runner = model if on_device else copy.deepcopy(model).to(device)
    x = torch.randn((batch_size, *input_shape), device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with preserved_modes(runner):
        runner.eval()
        for _ in range(warmup):
            runner(x)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner(x)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
