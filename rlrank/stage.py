"""One compression stage, top to bottom: factor cache, environment, agent, search, then the best
strategy applied and fine-tuned.

A stage whose ``result.json`` exists was finished before a resume and is read back; a stage with a
checkpoint continues its search from it (the episode log is cut back to the checkpoint first).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlrank.admm import AdmmConfig, admm_layers, admm_train, decomposition_errors
from rlrank.agents.base import Agent
from rlrank.agents.registry import AgentContext, agent_spec, make_agent
from rlrank.agents.selectors import Spectra, rule_ratios
from rlrank.atomic import write_json
from rlrank.callbacks import BestTracker, CallbackList, Checkpointer, EpisodeLog, FailureLimit, ProgressBar
from rlrank.checkpoint import SearchProgress, restore_checkpoint
from rlrank.config import SearchConfig
from rlrank.data import DataSplits
from rlrank.describe import describe_layers
from rlrank.envs import OBSERVATION_FEATURES, MixedSearchEnv, RankSearchEnv
from rlrank.errors import SearchError
from rlrank.evaluator_pool import EvaluatorPool, open_pool
from rlrank.factor_cache import FactorCache, input_grams, output_covariances
from rlrank.finetune import (
    FinetuneConfig,
    NumericalFault,
    TrainConfig,
    evaluate,
    reestimate_bn,
    train_epochs,
)
from rlrank.layers import LayerInfo
from rlrank.mixed_units import prunable_pairs
from rlrank.model_file import load, save
from rlrank.planning import MIXED, LayerPlan, searched_layers
from rlrank.preflight import Setup
from rlrank.records import TIMING_KEYS, EpisodeRow, StageResult
from rlrank.run_folder import (
    BEST_STRATEGY_FILE,
    EPISODES_FILE,
    MODEL_FILE,
    POLICY_DIR,
    STAGE_RESULT_FILE,
    RunFolder,
    RunFolderError,
    read_json,
)
from rlrank.runlog import EpisodeLogError, append_row, read_rows, truncate_rows
from rlrank.search_loop import run_episodes
from rlrank.surgery import decompose_model

logger = logging.getLogger(__name__)


def run_stage(
    folder: RunFolder,
    setup: Setup,
    model: nn.Module,
    dense_model: nn.Module,
    dense_params: int,
    k: int,
    budget: float,
    last: bool,
    progress: bool,
) -> tuple[nn.Module, StageResult]:
    """Search ranks for stage ``k`` at ``budget``, apply the best strategy to ``model`` and fine-tune.

    Args:
        folder: The run folder.
        setup: The run's data, device and options.
        model: The model this stage compresses (dense, or the previous stage's result).
        dense_model: The dense model (distillation teacher).
        dense_params: Parameters of the dense model.
        k: The stage (1-based).
        budget: The stage's FLOP budget (fraction of the dense model's MACs).
        last: Whether this is the last stage (it gets ``--final-epochs``, the others ``--stage-epochs``).
        progress: Show progress bars.

    Returns:
        The compressed, fine-tuned model and the stage's result.
    """
    config, data, device = setup.config, setup.data, setup.device
    stage_dir = folder.stage(k)
    if (stage_dir / STAGE_RESULT_FILE).is_file():  # finished before a resume
        logger.info("stage %d already complete", k)
        model = load(stage_dir / MODEL_FILE, map_location=device).train()
        try:
            return model, StageResult.from_dict(read_json(stage_dir / STAGE_RESULT_FILE))
        except TypeError as exc:
            raise RunFolderError(f"{stage_dir / STAGE_RESULT_FILE} is damaged ({exc})") from exc

    logger.info("stage %d: searching ranks for %.3f of the dense FLOPs", k, budget)
    layers = describe_layers(model, setup.input_shape)
    steps = searched_layers(layers, config.decomposition, config.exclude)
    cache = stage_factor_cache(model, steps, config, data, k, progress)
    reward_config = stage_reward_config(config)
    spec = agent_spec(config.agent)
    env_class = MixedSearchEnv if config.decomposition == MIXED else RankSearchEnv
    env = env_class(
        layers,
        None,  # the search loop prices strategies through the stage's evaluator pool
        budget=budget,
        budgets=config.train_budgets if config.train_budgets else None,
        decomposition=config.decomposition,
        min_ratio=config.min_ratio,
        reward=config.reward,
        total_params=dense_params,
        allow_dense=config.stages == 1,
        # a rule's strategy is played as its knob made it: absolute ratios, not topped up
        fill_budget=config.fill_budget and not spec.plays_absolute_ratios,
        reserve=config.reserve,
        action_mode="absolute" if spec.plays_absolute_ratios else config.action_space,
        exclude=config.exclude,
        latency_table=setup.latency_table,
        latency_budget=config.latency_budget,
        sparse=config.sparse,
    )
    if config.center() != "uniform" and not spec.plays_absolute_ratios:
        env.set_center(rule_strategy(config.center(), env, cache, config.min_ratio))
    agent = make_agent(config.agent, _agent_context(config, env, cache, k))
    pool = open_pool(config, model, cache, data, reward_config)
    try:
        best, failures, seconds = _search(stage_dir, config, env, agent, pool, k, budget, progress)
    finally:
        pool.close()

    # ---- the chosen strategy, applied and fine-tuned
    plans = env.layer_plans(env.strategy_of(best.layers))
    assert env.flops_ratio(plans) <= budget + 1e-9, "the chosen strategy exceeds the budget"
    _write_best_strategy(stage_dir / BEST_STRATEGY_FILE, best, plans, env, config)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed + 7919 * k)
    error_before_admm = None
    admm_epochs = config.admm_epochs if admm_layers(model, plans) else 0.0
    if config.admm_epochs > 0 and not admm_epochs:
        logger.info("stage %d: no dense layer left to train with ADMM; decomposing directly", k)
    if admm_epochs > 0:
        error_before_admm = decomposition_errors(cache, plans)
        model, cache = _admm(setup, model, dense_model, layers, steps, plans, generator, k, progress)
    compressed = decompose_model(model, plans, cache)
    errors = decomposition_errors(cache, plans, compressed)
    del cache, pool
    reestimate_bn(compressed, data, max(config.bn_batches, 1) * 4, config.batch_size, generator)
    epochs = config.final_epochs if last else config.stage_epochs
    if epochs > 0:
        train = TrainConfig(
            epochs=epochs, lr=config.final_lr, batch_size=config.batch_size, distill=config.distill
        )
        teacher = dense_model if config.distill > 0 else None
        try:
            train_epochs(
                compressed,
                data,
                train,
                generator,
                teacher=teacher,
                desc=f"fine-tuning stage {k}",
                progress=progress,
                keep_best=data.val,
            )
        except NumericalFault as exc:
            raise NumericalFault(
                f"the fine-tune of stage {k} diverged ({exc}); resume with a lower --final-lr "
                f"(it was {config.final_lr:g}); the search is kept"
            ) from exc
    val_acc, _ = evaluate(compressed, data, data.val)
    finetune_seconds = time.perf_counter() - start
    save(stage_dir / MODEL_FILE, compressed, setup.spec, {"stage": k, "budget": budget})
    rows = read_rows(stage_dir / EPISODES_FILE)
    result = StageResult(
        stage=k,
        budget=budget,
        episodes=len(rows),
        failed_episodes=failures,
        best_episode=best.episode,
        best_reward=best.reward,
        best_val_accuracy_before_finetune=best.accuracy,
        val_accuracy=val_acc,
        flops_ratio=env.flops_ratio(plans),
        params_ratio=env.params_ratio(plans),
        search_seconds=seconds,
        finetune_seconds=finetune_seconds,
        finetune_epochs=epochs,
        time_per_episode=_mean_times(rows),
        decomposition_error=_mean(errors),
        admm_epochs=admm_epochs,
        decomposition_error_before_admm=_mean(error_before_admm),
    )
    write_json(stage_dir / STAGE_RESULT_FILE, result.to_dict())
    logger.info("stage %d: val accuracy %.4f at %.3f of the FLOPs", k, val_acc, result.flops_ratio)
    return compressed, result


def _admm(
    setup: Setup,
    model: nn.Module,
    dense_model: nn.Module,
    layers: list[LayerInfo],
    steps: list[LayerInfo],
    plans: list[LayerPlan],
    generator: torch.Generator,
    k: int,
    progress: bool,
) -> tuple[nn.Module, FactorCache]:
    """``--admm-epochs``: the stage's model trained toward the chosen ranks, and its factor cache."""
    config = setup.config
    admm = AdmmConfig(
        rho=config.admm_rho,
        rho_growth=config.admm_rho_growth,
        updates=config.admm_updates,
        hooi_iters=config.hooi_iters,
        seed=config.seed,
    )
    train = TrainConfig(
        epochs=config.admm_epochs, lr=config.final_lr, batch_size=config.batch_size, distill=config.distill
    )
    try:
        trained = admm_train(
            model, layers, plans, admm, train, setup.data, generator, config.decomposition,
            teacher=dense_model if config.distill > 0 else None, desc=f"ADMM training, stage {k}",
            progress=progress,
        )  # fmt: skip
    except NumericalFault as exc:
        raise NumericalFault(
            f"the ADMM training of stage {k} diverged ({exc}); resume with a lower --final-lr or "
            f"--admm-rho; the search is kept"
        ) from exc
    cache = FactorCache(  # decomposed with ADMM's own projection (its sparse alternations)
        trained,
        steps,
        config.decomposition,
        hooi_iters=config.hooi_iters,
        seed=config.seed,
        alternations=admm.alternations,
    )
    return trained, cache


def _mean(errors: dict[str, float] | None) -> float | None:
    return sum(errors.values()) / len(errors) if errors else None


def _cost_and_spectra(
    env: RankSearchEnv, cache: FactorCache
) -> tuple[Callable[[np.ndarray], float], Callable[[], Spectra]]:
    """What the rank rules see of a stage: ratios -> kept FLOP fraction, and the steps' spectra."""

    def cost(ratios: np.ndarray) -> float:
        return env.flops_ratio(env.plan(ratios))

    def spectra() -> Spectra:
        return [[(s.values, s.shape) for s in cache.spectra(layer.name)] for layer in env.steps]

    return cost, spectra


def rule_strategy(rule: str, env: RankSearchEnv, cache: FactorCache, min_ratio: float) -> np.ndarray:
    """A rank rule's ratios (``uniform``, ``energy``, ``vbmf``) for the env's steps at its budget."""
    cost, spectra = _cost_and_spectra(env, cache)
    return rule_ratios(rule, len(env.steps), cost, env.budget, min_ratio, spectra)[0]


def _agent_context(config: SearchConfig, env: RankSearchEnv, cache: FactorCache, k: int) -> AgentContext:
    """What the ``--agent`` builder may use at stage ``k``."""
    cost, spectra = _cost_and_spectra(env, cache)
    return AgentContext(
        observation_space=env.observation_space,
        action_space=env.action_space,
        ratio_bounds=[env.ratio_bounds(i) for i in range(len(env.steps))],
        budget=env.budget,
        cost=cost,
        spectra=spectra,
        min_ratio=config.min_ratio,
        seed=config.seed + 1000 * (k - 1),
        spread=config.spread,
        start_at_center=config.start_at_center and config.action_space == "relative",
        warmup=config.warmup,
        noise=config.noise,
        noise_decay=config.noise_decay,
        credit=config.credit,
        critics=config.critics,
        hidden=tuple(config.hidden),
        policy=config.policy,
    )


def stage_reward_config(config: SearchConfig) -> FinetuneConfig:
    """The cheap fine-tune that prices every episode's strategy (``--finetune-steps``,
    ``--finetune-lr``, ``--finetune-batch-size``, ``--bn-batches``, ``--reward-val-images``): what a
    benchmark re-pricing a search's strategies uses too."""
    return FinetuneConfig(
        steps=config.finetune_steps,
        lr=config.finetune_lr,
        batch_size=config.finetune_batch_size,
        bn_batches=config.bn_batches,
        val_images=config.reward_val_images,
    )


def stage_factor_cache(
    model: nn.Module,
    steps: Sequence[LayerInfo],
    config: SearchConfig,
    data: DataSplits,
    k: int = 1,
    progress: bool = False,
) -> FactorCache:
    """Stage ``k``'s factor cache of ``steps``, every layer factorized: with ``--data-aware`` the
    layers' output covariances, with pruning their input Gram matrices, on ``--data-aware-batches``
    training batches (the same ones for a given seed and stage, so a resumed or re-priced search
    builds the same cache)."""

    def training_images() -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed + 31 * k)
        batches = data.batches(data.train, config.batch_size, shuffle=True, generator=generator)
        return (x for x, _ in itertools.islice(batches, config.data_aware_batches))

    names = [layer.name for layer in steps]
    covariances = grams = None
    if config.data_aware:  # fit output factors to the layers' responses on training images
        covariances = output_covariances(model, names, training_images())
    if config.decomposition == "prune":  # select and refit channels on the layers' inputs
        grams = input_grams(model, names, training_images(), seed=config.seed + k)
    elif config.decomposition == MIXED:  # the same for the layers a mixed search may prune
        heads = [head.name for head in prunable_pairs(steps, config.exclude).values()]
        grams = input_grams(model, heads, training_images(), seed=config.seed + k)
    cache = FactorCache(
        model,
        steps,
        config.decomposition,
        hooi_iters=config.hooi_iters,
        seed=config.seed,
        output_covariances=covariances,
        input_grams=grams,
    )
    cache.prepare_all(progress=progress)
    return cache


def _search(
    stage_dir: Path,
    config: SearchConfig,
    env: RankSearchEnv,
    agent: Agent,
    pool: EvaluatorPool,
    k: int,
    budget: float,
    progress: bool,
) -> tuple[EpisodeRow, int, float]:
    """The stage's episodes (resumed from its checkpoint); returns the best row, failures and seconds."""
    log_path = stage_dir / EPISODES_FILE
    total = agent.episodes_needed or config.episodes
    # a policy trained over several budgets, or continued from a saved one, is also rolled out once
    # deterministically at the stage's budget (one more reward evaluation, logged as phase "policy"):
    # a saved policy first, so that continuing it never ends below its zero-shot strategy; a policy
    # trained here last, once it has learned
    rollout = agent.greedy() if (config.train_budgets or config.policy) else None
    n_episodes = total + (1 if rollout is not None else 0)
    rollout_episode = (0 if config.policy else n_episodes - 1) if rollout is not None else -1
    state = restore_checkpoint(stage_dir, agent)
    rows = truncate_rows(log_path, state.episodes_done) if log_path.exists() else []
    if len(rows) < state.episodes_done:
        rows = _repair_log(log_path, rows, state, k)
    if state.episodes_done:
        logger.info("resuming stage %d after %d completed episodes", k, state.episodes_done)
    callbacks = CallbackList(
        [
            EpisodeLog(log_path),
            BestTracker(budget),
            ProgressBar(k, n_episodes, enabled=progress),
            Checkpointer(stage_dir, agent, config.checkpoint_every, n_episodes),
            FailureLimit(k, n_episodes, successes=sum(1 for r in rows if not r.get("failed"))),
        ]
    )
    run_episodes(
        env,
        agent,
        pool,
        k,
        budget,
        n_episodes,
        state,
        callbacks,
        rollout=rollout,
        rollout_episode=rollout_episode,
        cycle_budgets=bool(config.train_budgets),
    )
    agent.save(stage_dir / POLICY_DIR, _policy_metadata(config, env, n_episodes))
    if state.best is None:
        raise SearchError(f"no episode of stage {k} succeeded at budget {budget:g}")
    return state.best, state.failures, state.seconds


def _repair_log(
    log_path: Path, rows: list[dict[str, Any]], state: SearchProgress, k: int
) -> list[dict[str, Any]]:
    """Put back the last counted episode when its row was torn after the checkpoint counted it.

    Raises:
        EpisodeLogError: More rows are missing than the checkpoint keeps: they cannot be restored.
    """
    last = state.last_row
    if len(rows) == state.episodes_done - 1 and last is not None and last.episode == len(rows):
        append_row(log_path, last.to_dict())
        logger.warning(
            "stage %d: the log's last row (episode %d) was torn; restored it from the checkpoint",
            k,
            last.episode,
        )
        return [*rows, last.to_dict()]
    raise EpisodeLogError(
        f"{log_path} holds {len(rows)} complete episodes but its checkpoint counts "
        f"{state.episodes_done}: rows were removed outside rlrank and cannot be restored; "
        "start a new run"
    )


def _mean_times(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    if not rows:
        return {key: 0.0 for key in TIMING_KEYS}
    return {key: float(np.mean([r["time"].get(key, 0.0) for r in rows])) for key in TIMING_KEYS}


def _policy_metadata(config: SearchConfig, env: RankSearchEnv, episodes: int) -> dict[str, Any]:
    return {
        "model": config.model,
        "dataset": config.dataset,
        "decomposition": config.decomposition,
        "action_space": config.action_space,
        "action_center": config.center(),
        "observation_features": list(OBSERVATION_FEATURES),
        "layers": [layer.name for layer in env.steps],
        "budgets": config.train_budgets or [env.budget],
        "min_ratio": config.min_ratio,
        "episodes": episodes,
    }


def _write_best_strategy(
    path: Path, best: EpisodeRow, plans: Sequence[LayerPlan], env: RankSearchEnv, config: SearchConfig
) -> None:
    write_json(
        path,
        {
            "episode": best.episode,
            "reward": best.reward,
            "val_accuracy_after_cheap_finetune": best.accuracy,
            "budget": config.flops if config.train_budgets else env.budget,
            "flops_ratio": env.flops_ratio(plans),
            "params_ratio": env.params_ratio(plans),
            "decomposition": config.decomposition,
            "layers": [
                {
                    "name": p.name,
                    "ratio": p.ratio,
                    "method": p.method,
                    "ranks": list(p.ranks) if p.ranks else None,
                    "macs": p.macs,
                    "params": p.params,
                    **({"filters": p.filters} if p.filters else {}),
                }
                for p in plans
            ],
        },
    )
