"""``--decomposition mixed``: pairs, the family action, walls per family, exact accounting, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from test_prune import SEARCH as PRUNE_SEARCH
from test_prune import SHAPE, resnet20

import rlrank
from rlrank.agents.base import RandomAgent
from rlrank.describe import describe_layers
from rlrank.envs import Evaluation, MixedSearchEnv, RankSearchEnv, smallest_budget
from rlrank.factor_cache import FactorCache, input_grams
from rlrank.flops import count_model
from rlrank.methods import FactorizedLayer
from rlrank.mixed_units import LOW_RANK, PRUNE, PRUNED_WITH_PRODUCER, prunable_pairs
from rlrank.model_file import save
from rlrank.models import ModelSpec
from rlrank.planning import searched_layers
from rlrank.runlog import read_rows
from rlrank.search import main
from rlrank.surgery import decompose_model


def mixed_env(budget: float = 0.5, **kwargs) -> MixedSearchEnv:
    layers = describe_layers(resnet20(), SHAPE)
    return MixedSearchEnv(layers, lambda plans: Evaluation(accuracy=0.5), budget=budget, **kwargs)


def play(env: MixedSearchEnv, actions) -> dict:
    env.reset()
    for action in actions:
        _, _, done, _, info = env.step(np.asarray(action, dtype=np.float32))
    assert done
    return info


def test_pairs_are_the_inner_convolutions_of_residual_blocks_and_steps_those_of_tucker2():
    layers = describe_layers(resnet20(), SHAPE)
    pairs = {p: head.name for p, head in prunable_pairs(layers).items()}
    assert pairs == {f"layer{s}.{b}.conv1": f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in (0, 1, 2)}
    env = mixed_env()
    assert [layer.name for layer in env.steps] == [layer.name for layer in searched_layers(layers, "tucker2")]
    producers = [i for i, layer in enumerate(env.steps) if layer.name in pairs]
    assert all(env.families(i) == (LOW_RANK, PRUNE) for i in producers)
    assert all(env.families(i) == (LOW_RANK,) for i in range(len(env.steps)) if i not in producers)


def test_a_search_that_never_prunes_is_the_low_rank_search():
    layers = describe_layers(resnet20(), SHAPE)
    mixed = mixed_env(0.5, reserve=0.5)
    low_rank = RankSearchEnv(layers, lambda plans: Evaluation(accuracy=0.5), budget=0.5, reserve=0.5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        actions = rng.uniform(-1, 1, size=len(mixed.steps))
        ours = play(mixed, [[a, -abs(b)] for a, b in zip(actions, actions[::-1], strict=True)])["plans"]
        theirs = play(low_rank, [[a] for a in actions])["plans"]
        assert ours == theirs


def test_the_env_passes_gymnasiums_checker_with_a_two_entry_action():
    env = mixed_env()
    assert env.action_space.shape == (2,) and env.observation_space.shape == (18,)
    check_env(env, skip_render_check=True)


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_every_episode_keeps_the_budget_whatever_the_families(budget):
    env = mixed_env(budget, reserve=0.5)
    rng = np.random.default_rng(0)
    families = set()
    for _ in range(40):
        info = play(env, rng.uniform(-1, 1, size=(len(env.steps), 2)))
        assert info["flops_ratio"] <= budget + 1e-9
        names = {p.name for p in info["plans"]}
        for producer, head in env.pairs.items():
            families.add(LOW_RANK if producer in names else PRUNE)  # a pruned pair: the head's plan only
            assert head.name in names
    assert families == {LOW_RANK, PRUNE}
    assert env.smallest_budget == pytest.approx(
        smallest_budget(env.layers, "mixed", env.min_ratio), abs=1e-12
    )


def test_the_second_action_picks_the_family_at_the_same_fair_cost():
    env = mixed_env(0.5, reserve=0.0, fill_budget=False)
    index = next(i for i, layer in enumerate(env.steps) if layer.name in env.pairs)
    head = next(i for i, layer in enumerate(env.steps) if layer.name == env.pairs[env.steps[index].name].name)
    env.reset()
    for _ in range(index):
        env.step(np.zeros(2, dtype=np.float32))
    spent = sum(p.macs for p in env._plans)
    fair = env.fair_ratio(index, spent, family=LOW_RANK)
    low_rank = env.plan_step(index, fair, LOW_RANK).macs + env.plan_step(head, fair, LOW_RANK).macs
    pruned = env.plan_step(index, env.fair_ratio(index, spent, family=PRUNE), PRUNE)
    assert pruned.family == PRUNE and [p.method for p in pruned.plans] == [PRUNE]
    # action 0 spends the same budget in both families, up to one channel
    channel = env.steps[head].macs / env.steps[head].in_channels * 2
    assert pruned.macs <= low_rank and low_rank - pruned.macs <= channel
    _, _, _, _, info = env.step(np.array([0.0, 1.0], dtype=np.float32))
    assert info["family"] == PRUNE and env._plans[-1].macs == pruned.macs
    for _ in range(index + 1, head + 1):  # the head's step has nothing left to plan
        _, _, _, _, info = env.step(np.array([1.0, 1.0], dtype=np.float32))
    assert env._plans[-1].family == PRUNED_WITH_PRODUCER and env._plans[-1].macs == 0
    # one entry: the ratio action alone, low rank (how the rules play a mixed search)
    plans = play(env, [[0.0]] * len(env.steps))["plans"]
    assert {p.name for p in plans} >= set(env.pairs)


def test_a_mixed_strategy_is_applied_exactly_saved_and_reloaded(tmp_path):
    model = resnet20()
    env = mixed_env(0.5, reserve=0.5)
    pruned = sorted(env.pairs)[::2]
    pruned_heads = {env.pairs[p].name for p in pruned}
    actions = [[0.0, 1.0 if layer.name in pruned else -1.0] for layer in env.steps]
    info = play(env, actions)
    plans = info["plans"]
    assert {p.method for p in plans} >= {PRUNE, LOW_RANK}
    assert env.flops_ratio(env.layer_plans(env.strategy_of(json_layers(plans)))) == info["flops_ratio"]

    layers = describe_layers(model, SHAPE)
    steps = searched_layers(layers, "mixed")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn((16, *SHAPE), generator=generator) for _ in range(2)]
    grams = input_grams(model, sorted(pruned_heads), batches)
    cache = FactorCache(model, steps, "mixed", input_grams=grams)
    cache.prepare_all()
    compressed = decompose_model(model, plans, cache)
    cost = count_model(compressed, SHAPE)
    assert cost.macs == round(info["flops_ratio"] * env.dense_macs)  # exact accounting
    assert any(isinstance(m, FactorizedLayer) for m in compressed.modules())
    for plan in plans:
        if plan.method == PRUNE:  # the producer and the head really narrower
            (kept,) = plan.ranks
            assert compressed.get_submodule(plan.name.replace("conv2", "conv1")).out_channels == kept
            assert compressed.get_submodule(plan.name).in_channels == kept

    path = tmp_path / "mixed.pt"
    save(path, compressed.eval(), ModelSpec("resnet20", 10, 3, 16))
    reloaded = rlrank.load(path).eval()
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), compressed(x))


def json_layers(plans) -> dict:
    return {p.name: {"ratio": p.ratio, "method": p.method, "ranks": p.ranks} for p in plans}


def test_random_search_draws_both_action_entries():
    agent = RandomAgent(seed=0, spread=0.25, dims=2)
    agent.begin_episode(1)
    actions = np.array([agent.act(np.zeros(18)) for _ in range(200)])
    assert actions.shape == (200, 2) and np.abs(actions).max() <= 0.25
    assert (actions[:, 1] > 0).mean() == pytest.approx(0.5, abs=0.1)


SEARCH = ["mixed" if arg == "prune" else arg for arg in PRUNE_SEARCH]  # the pruning tests' search


@pytest.mark.parametrize("agent", ["ddpg", "surrogate"])
def test_a_mixed_search_keeps_the_budget_and_tries_both_families(tmp_path, agent):
    assert main([*SEARCH, "--agent", agent, "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert len(rows) == 4 and all(row["flops_ratio"] <= 0.5 + 1e-9 for row in rows)
    methods = {layer["method"] for row in rows for layer in row["layers"].values() if layer["ranks"]}
    assert {PRUNE, LOW_RANK} <= methods
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.5 + 1e-9
    best = json.loads((run / "stage-1" / "best_strategy.json").read_text())
    model = rlrank.load(run / "model.pt")
    for layer in best["layers"]:
        if layer["method"] == PRUNE:  # the producer really narrower
            producer = layer["name"].replace("conv2", "conv1")
            assert model.get_submodule(producer).out_channels == layer["ranks"][0]
        elif layer["method"] == LOW_RANK:
            assert isinstance(model.get_submodule(layer["name"]), FactorizedLayer)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--stages", "2"], "--stages > 1"),
        (["--sparse", "0.2"], "--sparse"),
        (["--latency", "0.9"], "--latency"),
        (["--admm-epochs", "1"], "--admm-epochs"),
    ],
)
def test_mixed_refuses_what_it_cannot_do_yet(tmp_path, capsys, extra, named):
    assert main([*SEARCH, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decomposition mixed does not work with" in err[0] and named in err[0], err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_an_episode_does_not_leak_into_the_next_ones_walls_or_the_rules_costs():
    played, fresh = mixed_env(0.5, reserve=0.5), mixed_env(0.5, reserve=0.5)
    play(played, [[0.0, 1.0]] * len(played.steps))  # every pair pruned
    ratios = [0.5] * len(played.steps)
    assert [p.macs for p in played.plan(ratios)] == [p.macs for p in fresh.plan(ratios)]
    played.reset()
    fresh.reset()
    np.testing.assert_array_equal(played._reserved, fresh._reserved)


def test_the_surrogate_models_both_entries_and_warms_up_as_random_search():
    from rlrank.agents.base import Transition
    from rlrank.agents.surrogate import SurrogateAgent, SurrogateConfig

    config = SurrogateConfig(warmup=3, spread=0.25, candidates=50, trees=5)
    agent, random = SurrogateAgent(4, config, seed=3, dims=2), RandomAgent(seed=3, spread=0.25, dims=2)
    obs = np.zeros(18, dtype=np.float32)
    for episode in range(1, 5):
        agent.begin_episode(episode)
        random.begin_episode(episode)
        actions = [agent.act(obs) for _ in range(4)]
        assert all(a.shape == (2,) and np.abs(a).max() <= 0.25 for a in actions)
        if episode < 3:
            np.testing.assert_array_equal(actions, [random.act(obs) for _ in range(4)])
        transitions = [Transition(obs, a, obs, False) for a in actions]
        agent.end_episode(transitions, float(actions[0][1] > 0), episode)
    assert agent.phase(4) == "model" and np.asarray(agent.actions).shape == (4, 8)
