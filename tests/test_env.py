"""The rank-search environment: spaces, the budget guarantee, rewards, info."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from rlrank.describe import describe_layers
from rlrank.envs import (
    ENV_ID,
    OBSERVATION_FEATURES,
    BudgetError,
    Evaluation,
    RankSearchEnv,
    action_to_ratio,
    ratio_to_action,
)
from rlrank.models import ModelSpec, build_model
from rlrank.planning import plan_layer


@pytest.fixture(scope="module")
def tiny_layers():
    return describe_layers(build_model(ModelSpec("tiny", 10, 1, 8)), (1, 8, 8))


@pytest.fixture(scope="module")
def resnet20_layers():
    return describe_layers(build_model(ModelSpec("resnet20", 10, 3, 32)), (3, 32, 32))


def mean_ratio_evaluator(plans):
    return Evaluation(accuracy=float(np.mean([p.ratio for p in plans])), loss=0.5)


def play(env, policy, options=None):
    obs, info = env.reset(options=options)
    total = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        total += reward
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        if terminated or truncated:
            return total, info


def test_checkers_pass(tiny_layers, resnet20_layers):
    for layers in (tiny_layers, resnet20_layers):
        env = RankSearchEnv(layers, mean_ratio_evaluator, budget=0.5)
        check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=False)


def test_registered_id(tiny_layers):
    env = gym.make(ENV_ID, layers=tiny_layers, evaluator=mean_ratio_evaluator, budget=0.4)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (len(OBSERVATION_FEATURES),)
    assert env.action_space.shape == (1,) and env.action_space.low[0] == -1 and env.action_space.high[0] == 1


def test_budget_holds_in_1000_random_episodes(tiny_layers):
    rng = np.random.default_rng(0)
    for budget, mode in ((0.2, "relative"), (0.5, "relative"), (0.2, "absolute"), (0.5, "absolute")):
        env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=budget, action_mode=mode)
        worst = 0.0
        for _ in range(250):
            _, info = play(env, lambda obs: rng.uniform(-1, 1, size=(1,)).astype(np.float32))
            worst = max(worst, info["flops_ratio"])
            assert info["flops_ratio"] <= budget + 1e-12
        assert worst > 0.8 * budget  # the wall caps, it does not starve


def test_relative_action_zero_is_the_uniform_strategy(resnet20_layers):
    env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4)
    _, info = play(env, lambda obs: np.zeros(1, np.float32))
    ratios = np.array(list(info["ratios"].values()))[:-1]
    # one ratio for every layer, up to what integer ranks leave over (the last, tiny linear layer
    # takes the sliver of budget left: fill_budget)
    assert ratios.max() - ratios.min() < 0.03
    assert 0.39 < info["flops_ratio"] <= 0.4
    # the first step's fair ratio is the uniform ratio meeting the budget
    env.reset()
    fair = env.fair_ratio(0, 0.0)
    assert env.flops_ratio(env.plan([fair] * len(env.steps))) <= 0.4
    assert env.flops_ratio(env.plan([fair + 0.01] * len(env.steps))) > 0.4 - 1e-3


def test_centered_actions_play_the_center_rescaled_to_the_budget(resnet20_layers):
    env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4, fill_budget=False)
    rng = np.random.default_rng(3)
    center = rng.uniform(0.2, 0.9, size=len(env.steps))
    env.set_center(center)
    _, info = play(env, lambda obs: np.zeros(1, np.float32))
    ratios = np.array(list(info["ratios"].values()))[:-1]  # the tiny linear layer costs the same dense
    center = center[:-1]
    assert 0.38 < info["flops_ratio"] <= 0.4
    # the strategy has the center's shape: one common scale, up to integer ranks
    scale = ratios / center
    assert np.median(np.abs(scale - np.median(scale))) < 0.05 * np.median(scale)
    assert np.corrcoef(ratios, center)[0, 1] > 0.95
    for _ in range(50):  # and the budget still holds for any actions
        _, info = play(env, lambda obs: rng.uniform(-1, 1, size=(1,)).astype(np.float32))
        assert info["flops_ratio"] <= 0.4
    with pytest.raises(ValueError, match="one positive ratio per step"):
        env.set_center(center)
    env.set_center(None)
    assert env.fair_ratio(0, 0.0) == pytest.approx(
        RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4).fair_ratio(0, 0.0)
    )


def test_relative_action_scales_the_fair_ratio(resnet20_layers):
    env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.6, fill_budget=False)
    obs, _ = env.reset()
    fair = env.fair_ratio(0, 0.0)
    assert obs[OBSERVATION_FEATURES.index("fair_ratio")] == pytest.approx(fair, abs=1e-6)
    _, _, _, _, info = env.step(np.array([-1.0], np.float32))
    assert info["wanted_ratio"] == pytest.approx(fair / 3)
    with pytest.raises(ValueError, match="action mode"):
        RankSearchEnv(resnet20_layers, mean_ratio_evaluator, action_mode="sideways")


def test_fill_budget_spends_the_budget_in_every_episode(resnet20_layers):
    rng = np.random.default_rng(1)
    filled = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4)
    single_wall = RankSearchEnv(
        resnet20_layers, mean_ratio_evaluator, budget=0.4, fill_budget=False, action_mode="absolute"
    )
    used, unused = [], []
    for _ in range(100):
        used.append(
            play(filled, lambda obs: rng.uniform(-1, 1, size=(1,)).astype(np.float32))[1]["flops_ratio"]
        )
        unused.append(
            play(single_wall, lambda obs: rng.uniform(-1, 1, size=(1,)).astype(np.float32))[1]["flops_ratio"]
        )
    assert max(used) <= 0.4 and min(used) > 0.39  # integer ranks leave a sliver
    assert min(unused) < 0.3  # a single wall lets random episodes waste budget
    # a timid agent is pushed up to the budget; a greedy one still stops at it
    assert play(filled, lambda obs: -np.ones(1, np.float32))[1]["flops_ratio"] > 0.39
    assert play(filled, lambda obs: np.ones(1, np.float32))[1]["flops_ratio"] <= 0.4


def test_greedy_agent_is_walled_close_to_budget(resnet20_layers):
    env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.3)
    _, info = play(env, lambda obs: np.ones(1, dtype=np.float32))
    assert 0.29 <= info["flops_ratio"] <= 0.3
    # the wall leaves room for the layers after: none of them is starved below min_ratio
    assert min(info["ratios"].values()) >= env.min_ratio - 1e-12


def test_reserve_keeps_later_layers_from_absorbing_the_overspend(resnet20_layers):
    # a greedy agent overspends early; without a reserve the walls squeeze the last layers to
    # min_ratio, with one every layer keeps at least that fraction of its center ratio
    greedy = lambda obs: np.ones(1, dtype=np.float32)  # noqa: E731
    debt = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4, reserve=0.0)
    _, info = play(debt, greedy)
    center = debt.fair_ratio(0, 0.0)
    debt_ratios = np.array(list(info["ratios"].values()))[:-1]
    assert debt_ratios[-1] < 0.2 * center
    for center_ratios in (None, np.linspace(0.3, 0.9, len(debt.steps))):
        env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.4, reserve=0.5)
        env.set_center(center_ratios)
        env.reset()
        centers = np.array([env.fair_ratio(0, 0.0)] * len(env.steps))
        if center_ratios is not None:
            centers = env._center_scale(0, 0.0) * center_ratios
        _, info = play(env, greedy)
        ratios = np.array(list(info["ratios"].values()))
        assert info["flops_ratio"] <= 0.4
        # up to integer ranks (a rank is 1/16 of a 16-channel layer)
        assert np.all(ratios[:-1] >= 0.5 * centers[:-1] - 1.0 / 16)
        assert ratios[0] > centers[0]  # the first layers may still overspend
    # random actions: the budget holds and the first layers still vary
    rng = np.random.default_rng(0)
    env = RankSearchEnv(resnet20_layers, mean_ratio_evaluator, budget=0.3, reserve=1.0)
    firsts = set()
    for _ in range(30):
        _, info = play(env, lambda obs: rng.uniform(-1, 1, size=(1,)).astype(np.float32))
        assert info["flops_ratio"] <= 0.3
        firsts.add(round(next(iter(info["ratios"].values())), 3))
    assert len(firsts) > 5
    with pytest.raises(ValueError, match="reserve"):
        RankSearchEnv(resnet20_layers, mean_ratio_evaluator, reserve=1.5)


def test_smallest_budget_is_refused_with_the_reachable_minimum(tiny_layers):
    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=0.5, min_ratio=0.05)
    smallest = env.smallest_budget
    assert 0 < smallest < 0.5
    with pytest.raises(BudgetError, match=f"{smallest:.4f}") as err:
        RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=smallest * 0.9)
    assert err.value.smallest == pytest.approx(smallest)
    RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=smallest)  # exactly reachable is fine
    # at the smallest budget every layer ends at its minimum
    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=smallest)
    _, info = play(env, lambda obs: np.ones(1, dtype=np.float32))
    assert info["flops_ratio"] <= smallest + 1e-12


def test_info_and_rewards(tiny_layers):
    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=0.5)
    total, info = play(env, lambda obs: np.zeros(1, dtype=np.float32))
    assert set(info["ratios"]) == {layer.name for layer in env.steps}
    assert set(info["ranks"]) == set(info["ratios"])
    for plan in info["plans"]:
        assert plan == plan_layer(
            env.steps[[s.name for s in env.steps].index(plan.name)], plan.ratio, "tucker2"
        )
    assert total == pytest.approx(info["accuracy"])
    assert 0 < info["params_ratio"] <= 1 and 0 < info["flops_ratio"] <= 0.5

    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=0.5, reward="acc-logflops")
    total, info = play(env, lambda obs: np.zeros(1, dtype=np.float32))
    expected = -(1 - info["accuracy"]) * math.log(info["flops_ratio"] * env.dense_macs)
    assert total == pytest.approx(expected)


def test_failed_evaluation_gets_minimum_reward(tiny_layers):
    def failing(plans):
        return Evaluation(accuracy=0.9, failed="fine-tune loss became nan")

    env = RankSearchEnv(tiny_layers, failing, budget=0.5)
    total, info = play(env, lambda obs: np.zeros(1, dtype=np.float32))
    assert total == 0.0 and info["failed"] == "fine-tune loss became nan"


def test_budgets_cycle_and_reset_option(tiny_layers):
    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budgets=[0.3, 0.6])
    seen = []
    for _ in range(4):
        obs, info = env.reset()
        seen.append(info["budget"])
        assert obs[OBSERVATION_FEATURES.index("target_budget")] == pytest.approx(info["budget"])
    assert seen == [0.3, 0.6, 0.3, 0.6]
    _, info = play(env, lambda obs: np.ones(1, dtype=np.float32), options={"budget": 0.45})
    assert info["budget"] == 0.45 and info["flops_ratio"] <= 0.45
    with pytest.raises(ValueError):
        env.reset(options={"budget": 1.5})


def test_action_mapping_round_trip():
    for ratio in (0.05, 0.3, 0.77, 1.0):
        assert action_to_ratio(ratio_to_action(ratio, 0.05, 1.0), 0.05, 1.0) == pytest.approx(ratio)
    assert action_to_ratio(-1, 0.05, 1.0) == 0.05 and action_to_ratio(1, 0.05, 1.0) == 1.0
    assert action_to_ratio(5, 0.05, 1.0) == 1.0  # out-of-range actions are clipped


def test_previous_ratio_and_progress_features(tiny_layers):
    env = RankSearchEnv(tiny_layers, mean_ratio_evaluator, budget=0.9, action_mode="absolute")
    obs, _ = env.reset()
    idx = {name: i for i, name in enumerate(OBSERVATION_FEATURES)}
    assert obs[idx["layer_index"]] == 0 and obs[idx["flops_removed"]] == 0
    obs2, *_ = env.step(np.array([-1.0], dtype=np.float32))
    assert obs2[idx["layer_index"]] > 0
    assert obs2[idx["previous_ratio"]] == pytest.approx(env.min_ratio)
    assert obs2[idx["flops_removed"]] > 0
    assert obs2[idx["flops_to_come"]] < obs[idx["flops_to_come"]]
