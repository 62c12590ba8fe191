"""The episode loop of one stage's search, top to bottom: play, price, learn, count, call the hooks.

An episode is *played* here (the agent's actions, the env's walls and plans) and *priced* by an
evaluator pool (:mod:`rlrank.evaluator_pool`): in this process one at a time, or on Ray workers with
up to one episode in flight per worker; the agent plays the next episodes while earlier ones are
priced and learns from each as its reward comes back, in episode order. Everything around an
episode (the log row, the best episode, the progress bar, checkpoints, the failure limit) is a
callback (:mod:`rlrank.callbacks`), also called in episode order; the loop never asks which agent it
drives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rlrank.agents.base import Agent, Transition
from rlrank.callbacks import SearchCallback
from rlrank.checkpoint import SearchProgress
from rlrank.envs import RankSearchEnv
from rlrank.evaluator_pool import EvaluatedEpisode, EvaluatorPool
from rlrank.planning import LayerPlan
from rlrank.records import EpisodeRow


@dataclass
class PlayedEpisode:
    """An episode whose actions are chosen, waiting for its strategy's price.

    Attributes:
        episode: Its index in the stage.
        player: The agent that played it (the search's agent, or the roll-out of its policy).
        budget: Its target budget.
        plans: The strategy.
        transitions: What the player saw and did, step by step.
        agent_time: Seconds the player took choosing the actions.
        env_time: Seconds the env took (resets, steps: walls, plans, observations).
        started: ``time.perf_counter()`` when it began.
    """

    episode: int
    player: Agent
    budget: float
    plans: list[LayerPlan]
    transitions: list[Transition]
    agent_time: float
    env_time: float
    started: float


def run_episodes(
    env: RankSearchEnv,
    agent: Agent,
    pool: EvaluatorPool,
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

    Up to ``pool.capacity`` episodes are in flight; each is finished (the agent learns, the
    callbacks run) in episode order. The roll-out waits until every earlier episode is finished.

    Args:
        env: The stage's environment (without an evaluator: the pool prices its strategies).
        agent: The agent that chooses the actions (and learns from each episode).
        pool: Prices strategies (in this process, or on Ray workers).
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
    in_flight: dict[int, PlayedEpisode] = {}
    priced: dict[int, EvaluatedEpisode] = {}
    next_episode = progress.episodes_done
    clock = time.perf_counter()
    callbacks.on_search_start(progress)
    try:
        while progress.episodes_done < total:
            while next_episode < total and len(in_flight) < pool.capacity:
                greedy = rollout is not None and next_episode == rollout_episode
                if greedy and in_flight:  # the roll-out plays the policy learned from every episode before
                    break
                player = rollout if greedy else agent
                episode_budget = budget if (greedy or not cycle_budgets) else None
                played = play_actions(env, player, next_episode, episode_budget)
                pool.submit(stage, next_episode, played.plans)
                in_flight[next_episode] = played
                next_episode += 1
            result = pool.next_result()
            priced[result.episode] = result
            while progress.episodes_done in priced:  # finish episodes in order
                episode = progress.episodes_done
                row = finish_episode(env, in_flight.pop(episode), priced.pop(episode), stage)
                now = time.perf_counter()
                progress.seconds += now - clock
                clock = now
                progress.episodes_done = episode + 1
                progress.failures += 1 if row.failed else 0
                progress.last_row = row
                callbacks.on_episode_end(row, progress)
    finally:
        pool.cancel()  # episodes still in flight are played again on resume
        callbacks.on_search_end(progress)
    return progress


def play_actions(env: RankSearchEnv, agent: Agent, episode: int, budget: float | None) -> PlayedEpisode:
    """Play one episode's actions (``budget``: the episode's target, ``None`` for the env's own
    choice); the strategy is priced later."""
    start = time.perf_counter()
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
        next_obs, _, terminated, truncated, info = env.step(action)
        transitions.append(Transition(obs, action, next_obs, terminated))
        obs = next_obs
        if terminated or truncated:
            break
    env_time = time.perf_counter() - start - agent_time
    return PlayedEpisode(
        episode, agent, info["budget"], info["plans"], transitions, agent_time, env_time, start
    )


def finish_episode(
    env: RankSearchEnv, played: PlayedEpisode, priced: EvaluatedEpisode, stage: int
) -> EpisodeRow:
    """The priced episode's reward, the agent's learning from it, and its log row.

    The row's ``time``: the agent's and the env's own seconds, the evaluation's phases, and the
    episode's wall time from its first action to its row (``total``; with workers it includes the
    wait for a free worker and for earlier episodes).
    """
    t = time.perf_counter()
    reward, info = env.outcome(played.plans, priced.evaluation, played.budget)
    env_time = played.env_time + time.perf_counter() - t
    t = time.perf_counter()
    stats = played.player.end_episode(played.transitions, reward, played.episode)
    agent_time = played.agent_time + time.perf_counter() - t
    timings = {key: info["timings"].get(key, 0.0) for key in ("decompose", "finetune", "evaluate")}
    timings.update(agent=agent_time, env=env_time, total=time.perf_counter() - played.started)
    row = _row(stage, played.episode, played.player.name, reward, info, timings, stats)
    row.phase = played.player.phase(played.episode)
    row.worker = priced.worker
    return row


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
            p.name: {
                "ratio": p.ratio,
                "ranks": list(p.ranks) if p.ranks else None,
                "method": p.method,
                **({"filters": p.filters} if p.filters else {}),  # --sparse
            }
            for p in info["plans"]
        },
        agent_stats=dict(agent_stats),
        latency_ratio=info.get("latency_ratio"),
        timestamp=time.time(),
    )
