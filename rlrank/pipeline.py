"""One whole search, top to bottom: data, model, dense baseline, stages of search -> decompose ->
fine-tune, report. :func:`run` is what ``python -m rlrank.search`` calls.

Everything that can fail on bad input (model, data, checkpoint, budget, policy) is checked before
the run folder is created, so a refused run leaves nothing behind. Every episode is appended to the
stage's log as it ends and a resume checkpoint follows it, so ``run(..., resume=folder)`` continues
a killed search from its last completed episode.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlrank.agents.base import Agent, FixedStrategyAgent, RandomAgent, Transition
from rlrank.agents.ddpg import (
    DDPGAgent,
    DDPGConfig,
    check_policy_fits,
    load_policy,
    read_policy_metadata,
    save_policy,
)
from rlrank.agents.selectors import energy_ratios, uniform_ratios, vbmf_ratios
from rlrank.atomic import save_torch, write_json
from rlrank.config import AGENTS, SearchConfig
from rlrank.data import DataConfig, DataSplits, load_data
from rlrank.decompose import (
    FactorCache,
    LayerPlan,
    check_decomposition,
    decompose_model,
    describe_layers,
    is_compressible,
    load,
    output_covariances,
    save,
)
from rlrank.envs import (
    OBSERVATION_FEATURES,
    REWARDS,
    BudgetError,
    RankSearchEnv,
    ratio_to_action,
    smallest_budget,
)
from rlrank.finetune import (
    FinetuneConfig,
    TrainConfig,
    evaluate,
    measure_latency,
    reestimate_bn,
    resolve_device,
    train_epochs,
)
from rlrank.flops import LayerInfo, count_model
from rlrank.models import ModelSpec, build_model, load_checkpoint
from rlrank.reward import RewardEvaluator
from rlrank.run_folder import RunFolder
from rlrank.runlog import EPISODES_FILE, append_row, read_rows, truncate_rows

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An option value that cannot work."""


class SearchError(RuntimeError):
    """A search that cannot go on (every episode failed)."""


MAX_FAILURES_WITHOUT_SUCCESS = 10


# ============================================================================================
# Set-up
# ============================================================================================


def validate(config: SearchConfig) -> None:
    """Check option values that need no data or model; raise :class:`ConfigError` naming the bad one."""

    def fraction(name: str, value: Any) -> None:
        if not isinstance(value, (int, float)) or not np.isfinite(value) or not 0 < value <= 1:
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")

    fraction("--flops", config.flops)
    fraction("--min-ratio", config.min_ratio)
    check_decomposition(config.decomposition)
    if config.agent not in AGENTS:
        raise ConfigError(f"unknown agent {config.agent!r}; known: {', '.join(AGENTS)}")
    if config.reward not in REWARDS:
        raise ConfigError(f"unknown reward {config.reward!r}; known: {', '.join(REWARDS)}")
    for name in ("episodes", "warmup", "finetune_steps", "bn_batches", "reward_val_images", "hooi_iters"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ("dense_epochs", "final_epochs", "stage_epochs"):
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.episodes == 0 and config.agent in ("ddpg", "random") and not config.policy:
        raise ConfigError("--episodes 0 needs --policy (to roll out a saved policy) or a rule-based agent")
    if config.action_center != "uniform" and config.action_space != "relative":
        raise ConfigError("--action-center needs --action-space relative")
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
    if (config.train_budgets or config.policy) and config.agent != "ddpg":
        raise ConfigError("--train-budgets and --policy need --agent ddpg")
    if config.train_budgets and config.stages > 1:
        raise ConfigError("--train-budgets trains one policy over budgets; use it with --stages 1")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_val_size(dataset: str) -> float:
    """Validation images held out of train when ``--val-size`` is not given."""
    return 0.2 if dataset == "digits" else 5000


def run_name(config: SearchConfig) -> str:
    return f"{config.model}-flops{config.flops:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def layer_table(layers: Sequence[LayerInfo]) -> list[dict[str, Any]]:
    return [layer.to_dict() for layer in layers]


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
    policy_meta: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def prepare(config: SearchConfig) -> Setup:
    """Load data and model and check every input; raises a ``ValueError`` subclass on bad input."""
    validate(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    val_size = config.val_size if config.val_size is not None else default_val_size(config.dataset)
    data = load_data(
        DataConfig(config.dataset, config.data_dir, val_size, config.split_seed, config.download)
    )
    data = data.to(device)
    spec = ModelSpec(config.model, data.num_classes, data.in_channels, data.input_size)
    model = build_model(spec, pretrained=config.pretrained)
    if config.checkpoint:
        load_checkpoint(model, config.checkpoint)
    model = model.to(device)
    input_shape = (data.in_channels, data.input_size, data.input_size)
    layers = describe_layers(model, input_shape)
    smallest = smallest_budget(layers, config.decomposition, config.min_ratio)
    for budget in [config.flops, *config.budgets_of_stages(), *(config.train_budgets or [])]:
        if budget < smallest - 1e-12:
            raise BudgetError(budget, smallest)
    setup = Setup(config, device, data, spec, model, layers, input_shape)
    if config.policy:
        meta = read_policy_metadata(config.policy)
        warning = check_policy_fits(
            meta,
            OBSERVATION_FEATURES,
            config.decomposition,
            config.model,
            config.action_space,
            config.action_center,
        )
        if warning:
            logger.warning(warning)
            setup.warnings.append(warning)
        setup.policy_meta = meta
    return setup


# ============================================================================================
# The run
# ============================================================================================


def run(
    config: SearchConfig | None = None, resume: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run a search (or resume the one in ``resume``) and return its report.

    Args:
        config: The search; ignored when resuming (the run's ``config.json`` is used).
        resume: A run folder to continue from its last completed episode.
        progress: Show progress bars.
    """
    started = time.perf_counter()
    folder = None
    if resume is not None:
        folder = RunFolder.open(resume)
        config = SearchConfig.from_dict(json.loads((folder / "config.json").read_text()))
        if folder.complete:
            logger.info("run %s is already complete", folder.path)
            return json.loads((folder / "report.json").read_text())
    assert config is not None
    setup = prepare(config)
    folder = folder or RunFolder.create(config.out, run_name(config))
    with folder:
        if resume is None:
            write_json(folder / "config.json", config.to_dict())
        logger.info("run folder: %s", folder.path)
        return _run_in(folder, setup, started, progress)


def _run_in(folder: RunFolder, setup: Setup, started: float, progress: bool) -> dict[str, Any]:
    config, data, device = setup.config, setup.data, setup.device

    # ---- the dense baseline: the given checkpoint, or train one here (compressing an untrained
    # model means nothing)
    model = setup.model
    dense_info = _dense_baseline(folder, setup, progress)
    model.load_state_dict(dense_info.pop("state_dict"))
    dense_model = copy.deepcopy(model).eval()
    dense_cost = count_model(model, setup.input_shape)

    # ---- the stages: search -> decompose -> fine-tune, each on the model the last one produced
    stages = []
    budgets = config.budgets_of_stages()
    previous_val = dense_info["val_accuracy"]
    for k, budget in enumerate(budgets, start=1):
        last = k == len(budgets)
        model, result = _run_stage(
            folder, setup, model, dense_model, dense_cost.params, k, budget, last, progress
        )
        result["improved"] = result["val_accuracy"] >= previous_val
        if not result["improved"] and k > 1:
            logger.warning(
                "stage %d did not improve on stage %d: val accuracy %.4f -> %.4f at budget %.3f",
                k,
                k - 1,
                previous_val,
                result["val_accuracy"],
                budget,
            )
        previous_val = result["val_accuracy"]
        stages.append(result)

    # ---- the report: test accuracy (first and only use of the test split), cost, latency
    cost = count_model(model, setup.input_shape)
    test_acc, _ = evaluate(model, data, data.test)
    val_acc, _ = evaluate(model, data, data.val)
    report = {
        "model": config.model,
        "dataset": config.dataset,
        "decomposition": config.decomposition,
        "agent": config.agent,
        "budget": config.flops,
        "device": _device_name(device),
        "dense": {
            "val_accuracy": dense_info["val_accuracy"],
            "test_accuracy": dense_info["test_accuracy"],
            "macs": dense_cost.macs,
            "params": dense_cost.params,
        },
        "compressed": {
            "val_accuracy": val_acc,
            "test_accuracy": test_acc,
            "macs": cost.macs,
            "params": cost.params,
            "flops_ratio": cost.macs / dense_cost.macs,
            "params_ratio": cost.params / dense_cost.params,
        },
        "test_accuracy_delta": test_acc - dense_info["test_accuracy"],
        "stages": stages,
        "reward_evaluations": sum(s["episodes"] for s in stages),
        "search_seconds": sum(s["search_seconds"] for s in stages),
        "warnings": setup.warnings,
    }
    if config.latency:
        report["latency_ms"] = _latency(dense_model, model, setup.input_shape, device)
    save(folder / "model.pt", model, setup.spec, {"report": "report.json", "budget": config.flops})
    report["wall_seconds"] = time.perf_counter() - started
    write_json(folder / "report.json", report)
    logger.info(
        "dense test accuracy %.4f -> compressed %.4f at %.3f of the FLOPs (%s)",
        dense_info["test_accuracy"],
        test_acc,
        cost.macs / dense_cost.macs,
        folder.path,
    )
    report["run_dir"] = str(folder.path)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _latency(
    dense: nn.Module, compressed: nn.Module, input_shape: tuple[int, int, int], device: torch.device
) -> dict:
    out: dict[str, Any] = {}
    for batch in (1, 64):
        d = measure_latency(dense, input_shape, batch, device)
        c = measure_latency(compressed, input_shape, batch, device)
        out[f"batch{batch}"] = {"dense": d, "compressed": c, "speedup": d / c if c > 0 else float("nan")}
    return out


def _dense_baseline(folder: RunFolder, setup: Setup, progress: bool) -> dict[str, Any]:
    """The dense model's weights and accuracy; trains it first when no weights were given."""
    config, data, model = setup.config, setup.data, setup.model
    info_path, weights_path = folder / "dense.json", folder / "dense.pt"
    if info_path.is_file() and weights_path.is_file():  # resuming
        info = json.loads(info_path.read_text())
        info["state_dict"] = load(weights_path, map_location=setup.device).state_dict()
        return info
    trained_here = not (config.checkpoint or config.pretrained)
    if trained_here:
        logger.info(
            "no --checkpoint given: training the dense %s on %s for %g epochs first",
            config.model,
            config.dataset,
            config.dense_epochs,
        )
        train = TrainConfig(epochs=config.dense_epochs, lr=config.dense_lr, batch_size=config.batch_size)
        generator = torch.Generator().manual_seed(config.seed)
        train_epochs(model, data, train, generator, desc="training dense model", progress=progress)
        save(weights_path, model, setup.spec, {"trained_here": True})
    val_acc, _ = evaluate(model, data, data.val)
    test_acc, _ = evaluate(model, data, data.test)
    info = {"val_accuracy": val_acc, "test_accuracy": test_acc, "trained_here": trained_here}
    logger.info("dense model: val accuracy %.4f, test accuracy %.4f", val_acc, test_acc)
    if trained_here:
        write_json(info_path, info)
    info["state_dict"] = copy.deepcopy(model.state_dict())
    return info


# ============================================================================================
# One stage: search, then decompose with the best strategy and fine-tune
# ============================================================================================


def _run_stage(
    folder: RunFolder,
    setup: Setup,
    model: nn.Module,
    dense_model: nn.Module,
    dense_params: int,
    k: int,
    budget: float,
    last: bool,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    config, data, device = setup.config, setup.data, setup.device
    stage_dir = folder.stage(k)
    if (stage_dir / "result.json").is_file():  # finished before a resume
        logger.info("stage %d already complete", k)
        model = load(stage_dir / "model.pt", map_location=device).train()
        return model, json.loads((stage_dir / "result.json").read_text())

    logger.info("stage %d: searching ranks for %.3f of the dense FLOPs", k, budget)
    layers = describe_layers(model, setup.input_shape)
    steps = [layer for layer in layers if is_compressible(layer, config.decomposition)]
    covariances = None
    if config.data_aware:  # fit output factors to the layers' responses on training images
        generator = torch.Generator().manual_seed(config.seed + 31 * k)
        batches = data.batches(data.train, config.batch_size, shuffle=True, generator=generator)
        images = (x for x, _ in itertools.islice(batches, config.data_aware_batches))
        covariances = output_covariances(model, [layer.name for layer in steps], images)
    cache = FactorCache(
        model,
        steps,
        config.decomposition,
        hooi_iters=config.hooi_iters,
        seed=config.seed,
        output_covariances=covariances,
    )
    cache.prepare_all(progress=progress)
    reward_config = FinetuneConfig(
        steps=config.finetune_steps,
        lr=config.finetune_lr,
        batch_size=config.finetune_batch_size,
        bn_batches=config.bn_batches,
        val_images=config.reward_val_images,
    )
    evaluator = RewardEvaluator(model, cache, data, reward_config, seed=config.seed)
    env = RankSearchEnv(
        layers,
        evaluator,
        budget=budget,
        budgets=config.train_budgets if config.train_budgets else None,
        decomposition=config.decomposition,
        min_ratio=config.min_ratio,
        reward=config.reward,
        total_params=dense_params,
        allow_dense=config.stages == 1,
        fill_budget=config.fill_budget,
        action_mode=config.action_space,
    )
    if config.action_center != "uniform" and config.agent in ("ddpg", "random"):
        env.set_center(rule_ratios(config.action_center, env, cache, config.min_ratio)[0])
    agent = _make_agent(config, env, cache, k)
    if isinstance(agent, FixedStrategyAgent):
        # a rule's strategy is played as its knob made it: absolute ratios, not topped up
        env.fill_budget = False
        env.action_mode = "absolute"
    search = _search(stage_dir, config, env, agent, evaluator, k, budget, progress)

    # ---- the chosen strategy, applied and fine-tuned
    best = search["best"]
    plans = [env.plan_step(i, best["layers"][layer.name]["ratio"]) for i, layer in enumerate(env.steps)]
    assert env.flops_ratio(plans) <= budget + 1e-9, "the chosen strategy exceeds the budget"
    _write_best_strategy(stage_dir / "best_strategy.json", best, plans, env, config)
    start = time.perf_counter()
    compressed = decompose_model(model, plans, cache)
    del cache, evaluator
    generator = torch.Generator().manual_seed(config.seed + 7919 * k)
    reestimate_bn(compressed, data, max(config.bn_batches, 1) * 4, config.batch_size, generator)
    epochs = config.final_epochs if last else config.stage_epochs
    if epochs > 0:
        train = TrainConfig(
            epochs=epochs, lr=config.final_lr, batch_size=config.batch_size, distill=config.distill
        )
        teacher = dense_model if config.distill > 0 else None
        train_epochs(
            compressed,
            data,
            train,
            generator,
            teacher=teacher,
            desc=f"fine-tuning stage {k}",
            progress=progress,
        )
    val_acc, _ = evaluate(compressed, data, data.val)
    finetune_seconds = time.perf_counter() - start
    save(stage_dir / "model.pt", compressed, setup.spec, {"stage": k, "budget": budget})
    result = {
        "stage": k,
        "budget": budget,
        "episodes": search["episodes"],
        "failed_episodes": search["failures"],
        "best_episode": best["episode"],
        "best_reward": best["reward"],
        "best_val_accuracy_before_finetune": best["accuracy"],
        "val_accuracy": val_acc,
        "flops_ratio": env.flops_ratio(plans),
        "params_ratio": env.params_ratio(plans),
        "search_seconds": search["seconds"],
        "finetune_seconds": finetune_seconds,
        "finetune_epochs": epochs,
        "time_per_episode": search["time_per_episode"],
    }
    write_json(stage_dir / "result.json", result)
    logger.info("stage %d: val accuracy %.4f at %.3f of the FLOPs", k, val_acc, result["flops_ratio"])
    return compressed, result


def _make_agent(config: SearchConfig, env: RankSearchEnv, cache: FactorCache, k: int) -> Agent:
    """The ``--agent``: DDPG (new or from ``--policy``), random search, or a rule-based selector."""
    seed = config.seed + 1000 * (k - 1)
    center_first = config.start_at_center and config.action_space == "relative"
    if config.agent == "ddpg":
        ddpg = DDPGConfig(
            warmup=config.warmup,
            spread=config.spread,
            start_at_center=center_first,
            noise_init=config.noise,
            noise_decay=config.noise_decay,
            credit=config.credit,
        )
        if config.policy:
            # continuing a trained policy: no warm-up, gentle exploration around it
            saved = DDPGConfig.from_dict(read_policy_metadata(config.policy)["ddpg"])
            # (the roll-out of the saved policy is the first episode, see _search)
            ddpg = DDPGConfig.from_dict(
                {**vars(saved), "warmup": 0, "start_at_center": False, "noise_init": min(config.noise, 0.1)}
            )
            agent, _ = load_policy(config.policy, env.observation_space, env.action_space, config=ddpg)
            agent.episode = 0
            return agent
        return DDPGAgent(env.observation_space, env.action_space, ddpg, seed=seed)
    if config.agent == "random":
        return RandomAgent(seed=seed, spread=config.spread, start_at_center=center_first)

    ratios, knob = rule_ratios(config.agent, env, cache, config.min_ratio)
    actions = [ratio_to_action(r, *env.ratio_bounds(i)) for i, r in enumerate(ratios)]
    return FixedStrategyAgent(config.agent, actions, knob)


def rule_ratios(
    rule: str, env: RankSearchEnv, cache: FactorCache, min_ratio: float
) -> tuple[np.ndarray, float]:
    """A rule's per-step ratios at the env's budget: its one knob turned until the budget is met.

    Args:
        rule: ``uniform``, ``energy`` or ``vbmf``.

    Returns:
        The ratios and the knob's value.
    """

    def cost(ratios: np.ndarray) -> float:
        return env.flops_ratio(env.plan(ratios))

    if rule == "uniform":
        ratios, knob = uniform_ratios(len(env.steps), cost, env.budget, min_ratio)
    else:
        spectra = [[(s.values, s.shape) for s in cache.spectra(layer.name)] for layer in env.steps]
        select = energy_ratios if rule == "energy" else vbmf_ratios
        ratios, knob = select(spectra, cost, env.budget)
    logger.info("%s selector: knob %.4f keeps %.4f of the FLOPs", rule, knob, cost(ratios))
    return ratios, knob


class _GreedyAgent(Agent):
    """A DDPG agent's deterministic policy, without exploration or learning."""

    name = "policy"
    episodes_needed = 1

    def __init__(self, ddpg: DDPGAgent) -> None:
        self.ddpg = ddpg

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.array([self.ddpg.policy_action(obs)], dtype=np.float32)


# ============================================================================================
# The episode loop, with its log and resume checkpoints
# ============================================================================================


def _search(
    stage_dir: Path,
    config: SearchConfig,
    env: RankSearchEnv,
    agent: Agent,
    evaluator: RewardEvaluator,
    k: int,
    budget: float,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    log_path = stage_dir / EPISODES_FILE
    total = agent.episodes_needed or config.episodes
    # a policy trained over several budgets, or continued from a saved one, is also rolled out once
    # deterministically at the stage's budget (one more reward evaluation, logged as phase "policy"):
    # a saved policy first, so that continuing it never ends below its zero-shot strategy; a policy
    # trained here last, once it has learned
    rollout = isinstance(agent, DDPGAgent) and bool(config.train_budgets or config.policy)
    state = _restore_checkpoint(stage_dir, agent)
    done = state["episodes_done"]
    rows = truncate_rows(log_path, done) if log_path.exists() else []
    best = state.get("best")
    failures = state.get("failures", 0)
    successes = sum(1 for r in rows if not r.get("failed"))
    seconds = state.get("seconds", 0.0)
    n_episodes = total + (1 if rollout else 0)
    rollout_episode = (0 if config.policy else n_episodes - 1) if rollout else -1
    if done:
        logger.info("resuming stage %d after %d completed episodes", k, done)

    bar = tqdm(total=n_episodes, initial=done, desc=f"stage {k} episodes", unit="ep", disable=not progress)
    for episode in range(done, n_episodes):
        greedy = episode == rollout_episode
        player = _GreedyAgent(agent) if greedy else agent  # type: ignore[arg-type]
        episode_budget = budget if (greedy or not config.train_budgets) else None
        start = time.perf_counter()
        row = _play_episode(env, player, evaluator, k, episode, episode_budget)
        row["phase"] = "policy" if greedy else _phase(agent, episode)
        seconds += time.perf_counter() - start
        append_row(log_path, row)
        if row["failed"]:
            failures += 1
        else:
            successes += 1
        counts_for_best = abs(row["budget"] - budget) < 1e-9 and not row["failed"]
        if counts_for_best and (best is None or row["reward"] > best["reward"]):
            best = row
        bar.update(1)
        if best is not None:
            bar.set_postfix(best_reward=f"{best['reward']:.4f}", best_acc=f"{best['accuracy']:.4f}")
        if (episode + 1) % config.checkpoint_every == 0 or episode + 1 == n_episodes:
            _save_checkpoint(stage_dir, agent, episode + 1, best, failures, seconds)
        if successes == 0 and failures >= min(MAX_FAILURES_WITHOUT_SUCCESS, n_episodes):
            bar.close()
            raise SearchError(
                f"every episode of stage {k} failed ({failures} so far); last reason: {row['failed']}"
            )
    bar.close()

    if isinstance(agent, DDPGAgent):
        save_policy(stage_dir / "policy", agent, _policy_metadata(config, env, n_episodes))
    if best is None:
        raise SearchError(f"no episode of stage {k} succeeded at budget {budget:g}")
    rows = read_rows(log_path)
    return {
        "best": best,
        "episodes": len(rows),
        "failures": failures,
        "seconds": seconds,
        "time_per_episode": _mean_times(rows),
    }


def _phase(agent: Agent, episode: int) -> str:
    if episode == 0 and agent.start_at_center:
        return "center"
    if isinstance(agent, DDPGAgent):
        return "warmup" if episode < agent.config.warmup else "explore"
    return "rule" if isinstance(agent, FixedStrategyAgent) else "random"


def _play_episode(
    env: RankSearchEnv, agent: Agent, evaluator: RewardEvaluator, k: int, episode: int, budget: float | None
) -> dict[str, Any]:
    """Play one episode; return its log row."""
    start = time.perf_counter()
    evaluator.set_episode(k, episode)
    agent_time = 0.0
    t = time.perf_counter()
    agent.begin_episode(episode)
    agent_time += time.perf_counter() - t
    obs, _ = env.reset(options={"budget": budget} if budget is not None else None)
    transitions = []
    while True:
        t = time.perf_counter()
        action = agent.act(obs)
        agent_time += time.perf_counter() - t
        next_obs, reward, terminated, truncated, info = env.step(action)
        transitions.append(Transition(obs, action, next_obs, terminated))
        obs = next_obs
        if terminated or truncated:
            break
    t = time.perf_counter()
    stats = agent.end_episode(transitions, reward)
    agent_time += time.perf_counter() - t
    total = time.perf_counter() - start
    timings = {key: info["timings"].get(key, 0.0) for key in ("decompose", "finetune", "evaluate")}
    timings["agent"] = agent_time
    timings["env"] = max(
        0.0, total - agent_time - sum(timings[k] for k in ("decompose", "finetune", "evaluate"))
    )
    timings["total"] = total
    return episode_row(k, episode, agent.name, reward, info, timings, stats)


def episode_row(
    stage: int,
    episode: int,
    agent: str,
    reward: float,
    info: dict[str, Any],
    timings: dict[str, float],
    agent_stats: dict[str, float],
) -> dict[str, Any]:
    """One row of the episode log (see :mod:`rlrank.runlog`)."""
    plans: list[LayerPlan] = info["plans"]
    return {
        "stage": stage,
        "episode": episode,
        "agent": agent,
        "budget": info["budget"],
        "reward": reward,
        "accuracy": info["accuracy"],
        "loss": info["loss"],
        "flops_ratio": info["flops_ratio"],
        "params_ratio": info["params_ratio"],
        "failed": info["failed"],
        "time": timings,
        "layers": {
            p.name: {"ratio": p.ratio, "ranks": list(p.ranks) if p.ranks else None, "method": p.method}
            for p in plans
        },
        "agent_stats": agent_stats,
        "timestamp": time.time(),
    }


def _mean_times(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    keys = ("decompose", "finetune", "evaluate", "agent", "env", "total")
    if not rows:
        return {key: 0.0 for key in keys}
    return {key: float(np.mean([r["time"].get(key, 0.0) for r in rows])) for key in keys}


def _policy_metadata(config: SearchConfig, env: RankSearchEnv, episodes: int) -> dict[str, Any]:
    return {
        "model": config.model,
        "dataset": config.dataset,
        "decomposition": config.decomposition,
        "action_space": config.action_space,
        "action_center": config.action_center,
        "observation_features": list(OBSERVATION_FEATURES),
        "layers": [layer.name for layer in env.steps],
        "budgets": config.train_budgets or [env.budget],
        "min_ratio": config.min_ratio,
        "episodes": episodes,
    }


def _write_best_strategy(
    path: Path, best: dict[str, Any], plans: Sequence[LayerPlan], env: RankSearchEnv, config: SearchConfig
) -> None:
    write_json(
        path,
        {
            "episode": best["episode"],
            "reward": best["reward"],
            "val_accuracy_after_cheap_finetune": best["accuracy"],
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
                }
                for p in plans
            ],
        },
    )


# ---- resume checkpoints: checkpoint-<n>/ folders, checkpoint.json points at the latest complete one


def _save_checkpoint(
    stage_dir: Path, agent: Agent, episodes_done: int, best: dict | None, failures: int, seconds: float
) -> None:
    target = stage_dir / f"checkpoint-{episodes_done}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    if isinstance(agent, DDPGAgent):
        save_policy(
            target / "agent", agent, {"checkpoint": True, "observation_features": list(OBSERVATION_FEATURES)}
        )
    save_torch(target / "rng.pt", {"torch": torch.get_rng_state()})
    write_json(
        target / "state.json",
        {
            "episodes_done": episodes_done,
            "best": best,
            "failures": failures,
            "seconds": seconds,
            "agent": agent.state_dict(),
            "python_rng": _python_rng_state(),
            "numpy_rng": _numpy_rng_state(),
        },
    )
    write_json(stage_dir / "checkpoint.json", {"latest": target.name, "episodes_done": episodes_done})
    for old in stage_dir.glob("checkpoint-*"):
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


def _restore_checkpoint(stage_dir: Path, agent: Agent) -> dict[str, Any]:
    pointer = stage_dir / "checkpoint.json"
    if not pointer.is_file():
        return {"episodes_done": 0}
    target = stage_dir / json.loads(pointer.read_text())["latest"]
    state = json.loads((target / "state.json").read_text())
    if isinstance(agent, DDPGAgent):
        saved, _ = load_policy(
            target / "agent", agent.observation_space, agent.action_space, config=agent.config
        )
        agent.load_network_state(saved.network_state())
        agent.load_buffer_arrays(saved.buffer_arrays())
    agent.load_state_dict(state["agent"])
    torch.set_rng_state(torch.load(target / "rng.pt", weights_only=True)["torch"])
    random.setstate(_tuples(state["python_rng"]))
    np.random.set_state(
        tuple(state["numpy_rng"][:1])
        + (np.array(state["numpy_rng"][1], dtype=np.uint32),)
        + tuple(state["numpy_rng"][2:])
    )
    return state


def _python_rng_state() -> list:
    return json.loads(json.dumps(random.getstate()))


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
