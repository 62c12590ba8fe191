"""The model-based search agent (``--agent surrogate``): its warm-up, its candidates, that it beats
random search on a reward with structure, and that a resume replays it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_agents import run_episode

from rlrank.agents.base import RandomAgent
from rlrank.agents.surrogate import SurrogateAgent, SurrogateConfig, propose
from rlrank.describe import describe_layers
from rlrank.envs import Evaluation, RankSearchEnv
from rlrank.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def tiny_layers():
    return describe_layers(build_model(ModelSpec("tiny", 10, 1, 8)), (1, 8, 8))


def peaked_reward(plans) -> Evaluation:
    """Best when every layer's ratio is near a target that differs per layer (not the center)."""
    ratios = np.array([p.ratio for p in plans])
    target = np.linspace(0.2, 0.7, len(ratios))
    return Evaluation(accuracy=float(1.0 - np.abs(np.log(ratios / target)).mean()))


def search(tiny_layers, agent, episodes: int) -> list[float]:
    env = RankSearchEnv(tiny_layers, peaked_reward, budget=0.5)
    rewards = []
    for episode in range(episodes):
        transitions, reward, _ = run_episode(env, agent, episode)
        agent.end_episode(transitions, reward, episode)
        rewards.append(reward)
    return rewards


def test_warmup_is_random_search_itself(tiny_layers):
    """The warm-up episodes draw exactly what random search draws with the same seed."""
    n = len(tiny_layers)
    surrogate = SurrogateAgent(n, SurrogateConfig(warmup=6, spread=0.5), seed=3)
    random = RandomAgent(seed=3, spread=0.5, start_at_center=True)
    for episode in range(6):
        surrogate.begin_episode(episode)
        random.begin_episode(episode)
        obs = np.zeros(18, dtype=np.float32)
        assert [surrogate.act(obs)[0] for _ in range(n)] == [random.act(obs)[0] for _ in range(n)]
        assert surrogate.phase(episode) == ("center" if episode == 0 else "warmup")
        surrogate.end_episode([], 0.5, episode)
    assert surrogate.phase(6) == "model"


def test_candidates_stay_in_the_spread_and_near_the_elites():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.3, 0.3, size=(20, 7))
    rewards = rng.random(20)
    config = SurrogateConfig(spread=0.3, candidates=500, elites=3, global_fraction=0.2)
    candidates = propose(rng, actions, rewards, config)
    assert candidates.shape == (500, 7)
    assert np.abs(candidates).max() <= 0.3
    elites = actions[np.argsort(-rewards)[:3]]
    nearest = np.abs(candidates[:400, None, :] - elites[None]).max(axis=2).min(axis=1)
    assert np.median(nearest) < 0.3  # local moves stay close to an elite; uniform ones need not


@pytest.mark.parametrize("seed", [0, 1])
def test_beats_random_search_on_a_reward_with_structure(tiny_layers, seed):
    """Same warm-up, same number of episodes: the model's choices must find a better strategy than
    random search does, and play better on average after the warm-up."""
    episodes, warmup = 60, 15
    config = SurrogateConfig(warmup=warmup, spread=1.0, trees=30, candidates=500)
    learned = search(tiny_layers, SurrogateAgent(len(tiny_layers), config, seed=seed), episodes)
    blind = search(tiny_layers, RandomAgent(seed=seed, spread=1.0, start_at_center=True), episodes)
    assert learned[:warmup] == blind[:warmup]
    assert max(learned) > max(blind) + 0.02, (max(learned), max(blind))
    assert np.mean(learned[warmup:]) > np.mean(blind[warmup:]) + 0.05


def test_resume_from_state_dict_replays_the_same_episodes(tiny_layers):
    config = SurrogateConfig(warmup=4, trees=10, candidates=100)
    env = RankSearchEnv(tiny_layers, peaked_reward, budget=0.5)
    first = SurrogateAgent(len(tiny_layers), config, seed=5)
    for episode in range(8):
        transitions, reward, _ = run_episode(env, first, episode)
        first.end_episode(transitions, reward, episode)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = SurrogateAgent(len(tiny_layers), config, seed=99)
    resumed.load_state_dict(state)
    for episode in range(8, 11):
        a, reward_a, _ = run_episode(env, first, episode)
        b, reward_b, _ = run_episode(env, resumed, episode)
        assert [t.action[0] for t in a] == [t.action[0] for t in b]
        assert first.end_episode(a, reward_a, episode)["predicted_reward"] == pytest.approx(
            resumed.end_episode(b, reward_b, episode)["predicted_reward"]
        )
