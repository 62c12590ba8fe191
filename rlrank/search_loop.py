"""The episode loop of one stage's search, top to bottom: play, count, call the hooks.

Everything around an episode (the log row, the best episode, the progress bar, checkpoints, the
failure limit) is a callback (:mod:`rlrank.callbacks`); the loop never asks which agent it drives.
"""

from __future__ import annotations

import time
from typing import Any

from rlrank.agents.base import Agent, Transition
from rlrank.callbacks import SearchCallback
from rlrank.checkpoint import SearchProgress
from rlrank.envs import RankSearchEnv
from rlrank.records import EpisodeRow
from rlrank.reward import RewardEvaluator


def run_episodes(
    env: RankSearchEnv,
    agent: Agent,
    evaluator: RewardEvaluator,
    stage: int,
    budget: float,
    total: int,
    progress: SearchProgress,
    callbacks: SearchCallback,
    rollout: Agent | None = None,
    rollout_episode: int = -1,
    cycle_budgets: bool = False,
) -> SearchProgress:
    """Play episodes ``progress.episodes_done .. total - 1`` of a stage.

    Args:
        env: The stage's environment.
        agent: The agent that chooses the actions (and learns from each episode).
        evaluator: Prices a strategy; told the episode before it is played (``set_episode``).
        stage: The stage (1-based).
        budget: The stage's FLOP budget.
        total: Episodes in the stage, the roll-out included.
        progress: The counters to continue from (all zero for a fresh stage); updated in place.
        callbacks: Called after every episode (log, best, progress, checkpoint, failure limit).
        rollout: The agent's deterministic policy, played once at ``rollout_episode`` at the stage's
            budget (phase ``policy``), or ``None``.
        rollout_episode: The episode index of the roll-out.
        cycle_budgets: The env cycles its budgets per episode (one policy for many budgets);
            otherwise every episode is played at ``budget``.

    Returns:
        ``progress``, with every episode counted.
    """
    callbacks.on_search_start(progress)
    try:
        for episode in range(progress.episodes_done, total):
            greedy = rollout is not None and episode == rollout_episode
            player = rollout if greedy else agent
            episode_budget = budget if (greedy or not cycle_budgets) else None
            start = time.perf_counter()
            row = play_episode(env, player, evaluator, stage, episode, episode_budget)
            row.phase = player.phase(episode)
            progress.seconds += time.perf_counter() - start
            progress.episodes_done = episode + 1
            progress.failures += 1 if row.failed else 0
            progress.last_row = row
            callbacks.on_episode_end(row, progress)
    finally:
        callbacks.on_search_end(progress)
    return progress


def play_episode(
    env: RankSearchEnv,
    agent: Agent,
    evaluator: RewardEvaluator,
    stage: int,
    episode: int,
    budget: float | None,
) -> EpisodeRow:
    """Play one episode (``budget``: the episode's target, ``None`` for the env's own choice)."""
    start = time.perf_counter()
    evaluator.set_episode(stage, episode)
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
    return _row(stage, episode, agent.name, reward, info, _timings(info, agent_time, total), stats)


def _timings(info: dict[str, Any], agent_time: float, total: float) -> dict[str, float]:
    timings = {key: info["timings"].get(key, 0.0) for key in ("decompose", "finetune", "evaluate")}
    timings["agent"] = agent_time
    timings["env"] = max(
        0.0, total - agent_time - sum(timings[k] for k in ("decompose", "finetune", "evaluate"))
    )
    timings["total"] = total
    return timings


def _row(
    stage: int,
    episode: int,
    agent: str,
    reward: float,
    info: dict[str, Any],
    timings: dict[str, float],
    agent_stats: dict[str, float],
) -> EpisodeRow:
    return EpisodeRow(
        stage=stage,
        episode=episode,
        agent=agent,
        budget=info["budget"],
        reward=reward,
        accuracy=info["accuracy"],
        loss=info["loss"],
        flops_ratio=info["flops_ratio"],
        params_ratio=info["params_ratio"],
        failed=info["failed"],
        time=timings,
        layers={
            p.name: {"ratio": p.ratio, "ranks": list(p.ranks) if p.ranks else None, "method": p.method}
            for p in info["plans"]
        },
        agent_stats=dict(agent_stats),
        latency_ratio=info.get("latency_ratio"),
        timestamp=time.time(),
    )
