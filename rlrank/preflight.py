"""Before a run writes anything: check every option and input, load data and model, price the budget.

:func:`prepare` raises a :class:`~rlrank.errors.UserError` for anything that cannot work (an option,
the data, the model or checkpoint, a budget below the smallest reachable one, a policy that does not
fit), so a refused run leaves no run folder behind. What it loads travels on as :class:`Setup`.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rlrank.agents.ddpg import load_policy
from rlrank.agents.policy_files import check_policy_fits, read_policy_metadata
from rlrank.agents.registry import agent_spec
from rlrank.cache_dir import cache_dir
from rlrank.checkpoint import preserved_random_state
from rlrank.config import SearchConfig
from rlrank.data import DataConfig, DataSplits, load_data
from rlrank.describe import describe_layers
from rlrank.envs import (
    OBSERVATION_FEATURES,
    REWARDS,
    BudgetError,
    Evaluation,
    RankSearchEnv,
    action_space,
    observation_space,
    smallest_budget,
)
from rlrank.errors import ConfigError
from rlrank.evaluator_pool import check_workers
from rlrank.finetune import final_epochs_for, resolve_device
from rlrank.latency_table import LatencyTable, latency_table
from rlrank.layers import LayerInfo
from rlrank.methods.sparse_residual import MAX_SPARSE
from rlrank.models import ModelSpec, build_model, load_checkpoint
from rlrank.options import SEED_MAX
from rlrank.planning import MIXED, check_decomposition, is_excluded, searched_layers
from rlrank.threads import configure_threads, warn_if_busy

logger = logging.getLogger(__name__)


def validate(config: SearchConfig) -> None:
    """Check option values that need no data or model; raise :class:`ConfigError` naming the bad one."""

    def fraction(name: str, value: Any) -> None:
        if not isinstance(value, (int, float)) or not np.isfinite(value) or not 0 < value <= 1:
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")

    def number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (low_open and value == low) or value > high:
            bound = f"({low:g}" if low_open else f"[{low:g}"
            raise ConfigError(f"{name} must be a finite number in {bound}, {high:g}], got {value!r}")

    fraction("--flops", config.flops)
    if config.latency_budget is not None:
        fraction("--latency", config.latency_budget)
        if config.stages > 1:
            raise ConfigError("--latency works with one stage (--stages 1) for now")
    fraction("--min-ratio", config.min_ratio)
    sparse = config.sparse
    if isinstance(sparse, bool) or not isinstance(sparse, (int, float)) or not 0 <= sparse < MAX_SPARSE:
        raise ConfigError(f"--sparse must be a number in [0, {MAX_SPARSE:g}), got {sparse!r}")
    if sparse > 0 and config.latency_budget is not None:
        raise ConfigError(
            "--sparse does not work with --latency for now (the latency table times low-rank forms)"
        )
    if config.decomposition == "prune":
        refused = {
            "--stages > 1": config.stages > 1,
            "--sparse": sparse > 0,
        }
        if any(refused.values()):
            raise ConfigError(
                f"--decomposition prune does not work with {', '.join(k for k, v in refused.items() if v)} "
                "for now (it removes channels; those options act on factorized layers)"
            )
    if config.decomposition == MIXED:
        refused = {
            "--stages > 1": config.stages > 1,
            "--sparse": sparse > 0,
            "--latency": config.latency_budget is not None,
            "--admm-epochs": config.admm_epochs > 0,
        }
        if any(refused.values()):
            raise ConfigError(
                f"--decomposition mixed does not work with {', '.join(k for k, v in refused.items() if v)} "
                "for now; use --decomposition prune or tucker2 for those"
            )
    fraction("--spread", config.spread)
    fraction("--noise-decay", config.noise_decay)
    for name in ("seed", "split_seed"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_MAX:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a whole number in 0..{SEED_MAX}, got {value!r}"
            )
    number("--noise", config.noise, 0.0)
    number("--distill", config.distill, 0.0, 1.0)
    number("--admm-epochs", config.admm_epochs, 0.0)
    number("--admm-rho", config.admm_rho, 0.0, low_open=True)
    number("--admm-rho-growth", config.admm_rho_growth, 1.0)
    for name in ("finetune_lr", "dense_lr", "final_lr"):
        number(f"--{name.replace('_', '-')}", getattr(config, name), 0.0, low_open=True)
    if config.val_size is not None:
        number("--val-size", config.val_size, 0.0, low_open=True)
        if config.val_size >= 1 and config.val_size != int(config.val_size):
            raise ConfigError(
                f"--val-size must be a fraction in (0, 1) or a whole count, got {config.val_size!r}"
            )
    if config.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {config.threads}")
    check_decomposition(config.decomposition)
    spec = agent_spec(config.agent)
    if config.reward not in REWARDS:
        raise ConfigError(f"unknown reward {config.reward!r}; known: {', '.join(REWARDS)}")
    for name in ("episodes", "warmup", "finetune_steps", "bn_batches", "reward_val_images", "hooi_iters"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ("dense_epochs", "final_epochs", "stage_epochs"):
        if getattr(config, name) is not None and getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.episodes == 0 and not spec.plays_absolute_ratios and not config.policy:
        raise ConfigError("--episodes 0 needs --policy (to roll out a saved policy) or a rule-based agent")
    if config.stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {config.stages}")
    if config.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be >= 1, got {config.checkpoint_every}")
    budgets = config.budgets_of_stages()
    if len(budgets) != config.stages:
        raise ConfigError(f"--stage-budgets gives {len(budgets)} budgets for --stages {config.stages}")
    for b in budgets:
        fraction("each stage budget", b)
    if any(b2 > b1 for b1, b2 in zip(budgets, budgets[1:], strict=False)):
        raise ConfigError(f"stage budgets must not increase: {budgets}")
    if abs(budgets[-1] - config.flops) > 1e-9:
        raise ConfigError(f"the last stage budget {budgets[-1]:g} must equal --flops {config.flops:g}")
    for b in config.train_budgets or []:
        fraction("each of --train-budgets", b)
    if (config.train_budgets or config.policy) and not spec.learns:
        raise ConfigError("--train-budgets and --policy need an agent that learns a policy (--agent ddpg)")
    if config.train_budgets and config.stages > 1:
        raise ConfigError("--train-budgets trains one policy over budgets; use it with --stages 1")
    check_workers(config)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_val_size(dataset: str) -> float:
    """Validation images held out of train when ``--val-size`` is not given."""
    return 0.2 if dataset == "digits" else 5000


@dataclass
class Setup:
    """What a run needs, prepared before anything is written."""

    config: SearchConfig
    device: torch.device
    data: DataSplits
    spec: ModelSpec
    model: nn.Module
    layers: list[LayerInfo]
    input_shape: tuple[int, int, int]
    warnings: list[str] = field(default_factory=list)
    weights_given: bool = False
    """The model came trained (``--checkpoint``, ``--pretrained`` or a model passed in): no dense training."""
    latency_table: LatencyTable | None = None
    """The per-layer latency table of ``--latency`` (measured or from the cache)."""


def prepare(config: SearchConfig, model: nn.Module | None = None, data: DataSplits | None = None) -> Setup:
    """Load data and model and check every input.

    Args:
        config: The options; an unset ``final_epochs`` is filled in here, from the training split's
            size (:func:`rlrank.finetune.final_epochs_for`), so that config.json records it.
        model: A trained model to compress instead of building ``config.model`` (it is copied);
            ``config.model`` then names its architecture in the run folder.
        data: Data splits to use instead of loading ``config.dataset``.

    Raises:
        UserError: An option, the data, the model, the budget or the policy cannot work.
    """
    validate(config)
    configure_threads(config.threads)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    if data is None:
        val_size = config.val_size if config.val_size is not None else default_val_size(config.dataset)
        data = load_data(
            DataConfig(
                config.dataset,
                config.data_dir,
                val_size,
                config.split_seed,
                config.download,
                loading=config.loading,
                image_size=config.image_size,
                workers=config.loader_workers,
            )
        )
    data = data.to(device)
    if config.final_epochs is None:  # recorded in config.json: a resume fine-tunes the same length
        config.final_epochs = final_epochs_for(len(data.train))
        logger.info("final fine-tune: %g epochs for %d training images", config.final_epochs, len(data.train))
    spec = ModelSpec(config.model, data.num_classes, data.in_channels, data.input_size)
    weights_given = model is not None or bool(config.checkpoint or config.pretrained)
    if model is None:
        model = build_model(spec, pretrained=config.pretrained)
        if config.checkpoint:
            load_checkpoint(model, config.checkpoint)
    else:
        model = copy.deepcopy(model).train()
    model = model.to(device)
    input_shape = (data.in_channels, data.input_size, data.input_size)
    layers = describe_layers(model, input_shape)
    if config.decomposition in ("prune", MIXED) and not searched_layers(layers, "prune"):
        raise ConfigError(
            f"no layer of {config.model} can be pruned: pruning removes input channels of a layer whose "
            "input one convolution alone makes (through BatchNorm and activations), and none does"
        )
    check_exclude(config, layers)
    smallest = smallest_budget(layers, config.decomposition, config.min_ratio, config.exclude, config.sparse)
    for budget in [config.flops, *config.budgets_of_stages(), *(config.train_budgets or [])]:
        if budget < smallest - 1e-12:
            raise BudgetError(budget, smallest)
    setup = Setup(config, device, data, spec, model, layers, input_shape, weights_given=weights_given)
    if config.latency_budget is not None:
        setup.latency_table = check_latency_budget(config, model, layers, input_shape, device)
    if agent_spec(config.agent).warms_up and not config.policy and 0 < config.episodes <= config.warmup:
        setup.warnings.append(
            f"--warmup {config.warmup} >= --episodes {config.episodes}: the agent only plays its warm-up "
            f"and never learns (nor chooses); lower --warmup (e.g. --warmup {config.episodes // 4}) or use --agent random"
        )
        logger.warning(setup.warnings[-1])
    if config.policy:
        warning = check_policy(config)
        if warning:
            logger.warning(warning)
            setup.warnings.append(warning)
    warn_if_busy()  # after every check: bad input stays one line
    return setup


def check_latency_budget(
    config: SearchConfig,
    model: nn.Module,
    layers: list[LayerInfo],
    input_shape: tuple[int, int, int],
    device: torch.device,
) -> LatencyTable:
    """The model's latency table (timed once per model and device, then cached), after checking
    that ``--latency`` can be reached.

    Raises:
        LatencyBudgetError: The budget is below the latency with every searched layer at its fastest.
    """
    steps = searched_layers(layers, config.decomposition, config.exclude)
    table = latency_table(
        model,
        steps,
        config.decomposition,
        input_shape,
        config.latency_batch,
        device,
        cache_dir(),
        config.min_ratio,
        progress=True,
    )
    RankSearchEnv(  # raises when the budgets cannot both be met
        layers,
        lambda plans: Evaluation(accuracy=0.0),
        budget=config.flops,
        budgets=config.train_budgets or None,
        decomposition=config.decomposition,
        min_ratio=config.min_ratio,
        exclude=config.exclude,
        latency_table=table,
        latency_budget=config.latency_budget,
    )
    return table


def check_exclude(config: SearchConfig, layers: list[LayerInfo]) -> None:
    """Every ``--exclude`` pattern names a layer, and some compressible layer is left to search.

    Raises:
        ConfigError: A pattern that matches no layer (the message lists some names), or nothing left.
    """
    names = [layer.name for layer in layers]
    for pattern in config.exclude or []:
        if not any(is_excluded(name, [pattern]) for name in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"--exclude {pattern!r} matches no layer of {config.model} ({shown}; --dry-run lists them all)"
            )
    left = searched_layers(layers, config.decomposition, config.exclude)
    if not left:
        raise ConfigError(f"--exclude leaves no compressible layer of {config.model} to search")


def check_policy(config: SearchConfig) -> str | None:
    """Read and fully load ``--policy`` once (metadata, networks, replay buffer), so that a policy
    that cannot work is refused before anything is written or trained.

    Returns:
        A warning when the policy was trained on another model, else ``None``.

    Raises:
        PolicyError: Missing, unreadable, crafted, or made for another environment.
    """
    meta = read_policy_metadata(config.policy)
    warning = check_policy_fits(
        meta,
        OBSERVATION_FEATURES,
        config.decomposition,
        config.model,
        config.action_space,
        config.center(),
    )
    with preserved_random_state():  # building the networks seeds the global generators
        load_policy(
            config.policy, observation_space(), action_space(2 if config.decomposition == MIXED else 1)
        )
    return warning
