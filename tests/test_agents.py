"""Agents: DDPG after AMC (warm-up, decaying noise, learning, persistence), baselines, selectors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from rlrank.agents.base import FixedStrategyAgent, RandomAgent, Transition
from rlrank.agents.ddpg import DDPGAgent, DDPGConfig, load_policy, save_policy, truncated_normal
from rlrank.agents.policy_files import PolicyError, check_policy_fits, read_policy_metadata
from rlrank.agents.selectors import (
    SelectorError,
    alds_ratios,
    energy_rank,
    energy_ratios,
    spectral_rank,
    uniform_ratios,
    vbmf_rank,
    vbmf_ratios,
)
from rlrank.describe import describe_layers
from rlrank.envs import OBSERVATION_FEATURES, Evaluation, RankSearchEnv
from rlrank.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def tiny_layers():
    return describe_layers(build_model(ModelSpec("tiny", 10, 1, 8)), (1, 8, 8))


def run_episode(env, agent, episode):
    agent.begin_episode(episode)
    obs, _ = env.reset()
    transitions = []
    while True:
        action = agent.act(obs)
        assert action.shape == (1,) and -1 <= action[0] <= 1
        nxt, reward, terminated, truncated, info = env.step(action)
        transitions.append(Transition(obs, action, nxt, terminated))
        obs = nxt
        if terminated or truncated:
            return transitions, reward, info


def test_truncated_normal_stays_in_bounds():
    rng = np.random.default_rng(0)
    xs = [truncated_normal(rng, 0.9, 1.0, -1.0, 1.0) for _ in range(2000)]
    assert min(xs) >= -1 and max(xs) <= 1
    assert np.std(xs) > 0.2  # wide noise is not collapsed onto the bound


def test_noise_schedule_follows_amc():
    space = RankSearchEnv.__new__(RankSearchEnv)  # only spaces are needed
    import gymnasium as gym

    obs_space = gym.spaces.Box(0, 1, (len(OBSERVATION_FEATURES),), np.float32)
    act_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    del space
    agent = DDPGAgent(obs_space, act_space, DDPGConfig(warmup=10, noise_init=0.5, noise_decay=0.9), seed=1)
    assert agent.noise_std(10) == pytest.approx(1.0)  # 0.5 in AMC's [0, 1] units
    assert agent.noise_std(13) == pytest.approx(1.0 * 0.9**3)
    # warm-up actions are uniform in [-1, 1], independent of the actor
    agent.begin_episode(0)
    actions = np.array([agent.act(np.zeros(len(OBSERVATION_FEATURES), np.float32))[0] for _ in range(500)])
    assert actions.min() < -0.9 and actions.max() > 0.9 and abs(actions.mean()) < 0.1


def test_warmup_spread_and_start_at_center():
    import gymnasium as gym

    obs_space = gym.spaces.Box(0, 1, (len(OBSERVATION_FEATURES),), np.float32)
    act_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    obs = np.zeros(len(OBSERVATION_FEATURES), np.float32)
    cfg = DDPGConfig(warmup=3, spread=0.25, start_at_center=True)
    ddpg = DDPGAgent(obs_space, act_space, cfg, seed=0)
    random = RandomAgent(seed=0, spread=0.25, start_at_center=True)
    for agent in (ddpg, random):
        assert agent.start_at_center
        agent.begin_episode(0)
        assert [agent.act(obs)[0] for _ in range(4)] == [0.0] * 4  # episode 0: the center
        agent.begin_episode(1)
        actions = np.array([agent.act(obs)[0] for _ in range(300)])
        assert actions.min() >= -0.25 and actions.max() <= 0.25 and actions.max() - actions.min() > 0.4
    assert not DDPGAgent(obs_space, act_space, DDPGConfig(), seed=0).start_at_center  # AMC's default
    with pytest.raises(ValueError, match="spread"):
        DDPGConfig(spread=0.0)
    with pytest.raises(ValueError, match="spread"):
        RandomAgent(spread=1.5)


def test_output_layers_start_near_zero_as_in_the_ddpg_paper():
    import gymnasium as gym

    obs_space = gym.spaces.Box(0, 1, (len(OBSERVATION_FEATURES),), np.float32)
    act_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    observations = np.random.default_rng(0).random((20, len(OBSERVATION_FEATURES)), dtype=np.float32)
    agent = DDPGAgent(obs_space, act_space, DDPGConfig(), seed=0)
    actions = [agent.policy_action(o) for o in observations]
    assert max(abs(a) for a in actions) < 0.02  # the first policy plays (about) the center
    policy = agent.model.policy
    for net, target in ((policy.actor, policy.actor_target), (policy.critic, policy.critic_target)):
        for (name, p), (_, q) in zip(net.state_dict().items(), target.state_dict().items(), strict=True):
            assert torch.equal(p, q), name
    with torch.no_grad():
        values = policy.critic(torch.from_numpy(observations), torch.zeros(20, 1))[0]
    assert values.abs().max() < 0.02
    sb3 = DDPGAgent(obs_space, act_space, DDPGConfig(final_layer_init=0), seed=0)
    assert max(abs(sb3.policy_action(o)) for o in observations) > 0.02  # stable-baselines3's init


def test_hidden_option_sets_the_widths_of_actor_and_critics():
    import gymnasium as gym

    from rlrank.agents.registry import AgentContext, make_agent
    from rlrank.search import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--hidden", "64,32", "--critics", "2"]))
    assert config.hidden == [64, 32]
    assert config_from_args(build_parser().parse_args([])).hidden == [300, 300]  # AMC's
    context = AgentContext(
        observation_space=gym.spaces.Box(0, 1, (len(OBSERVATION_FEATURES),), np.float32),
        action_space=gym.spaces.Box(-1, 1, (1,), np.float32),
        ratio_bounds=[(0.05, 1.0)],
        budget=0.5,
        cost=lambda ratios: 0.5,
        spectra=lambda: [],
        critics=config.critics,
        hidden=tuple(config.hidden),
    )
    policy = make_agent("ddpg", context).model.policy
    linear = [m.out_features for m in policy.actor.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [64, 32, 1]
    for q in policy.critic.q_networks:
        assert [m.out_features for m in q.modules() if isinstance(m, torch.nn.Linear)] == [64, 32, 1]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--hidden", "64,0"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("critics", [1, 2])
def test_ddpg_learns_which_layer_to_keep(tiny_layers, critics):
    """A synthetic reward that pays for keeping the last layers large: DDPG must beat random (also
    with two critics and the actor maximising their minimum)."""

    def evaluator(plans):
        weights = np.linspace(0.0, 1.0, len(plans)) ** 2
        return Evaluation(accuracy=float(np.dot(weights, [p.ratio for p in plans]) / weights.sum()))

    env = RankSearchEnv(tiny_layers, evaluator, budget=0.4)
    cfg = DDPGConfig(
        warmup=15,
        noise_init=0.3,
        noise_decay=0.9,
        hidden=(64, 64),
        actor_lr=1e-3,
        updates_per_step=4,
        critics=critics,
    )
    agent = DDPGAgent(env.observation_space, env.action_space, cfg, seed=0)
    rewards = []
    for episode in range(70):
        transitions, reward, _ = run_episode(env, agent, episode)
        stats = agent.end_episode(transitions, reward, episode)
        rewards.append(reward)
        if episode >= cfg.warmup:
            assert "critic_loss" in stats and np.isfinite(stats["critic_loss"])
    random_mean = np.mean(rewards[: cfg.warmup])
    learned = np.mean(rewards[-10:])
    assert learned > random_mean + 0.05, (random_mean, learned)
    assert len(agent.model.critic.q_networks) == critics


def test_pessimistic_actor_maximises_the_smallest_critic(tiny_layers):
    """With two critics the actor's loss is minus the smaller of their values (not the first's)."""
    env = RankSearchEnv(tiny_layers, lambda plans: Evaluation(accuracy=float(plans[-1].ratio)), budget=0.5)
    agent = DDPGAgent(env.observation_space, env.action_space, DDPGConfig(warmup=1, critics=2), seed=0)
    for episode in range(3):
        transitions, reward, _ = run_episode(env, agent, episode)
        stats = agent.end_episode(transitions, reward, episode)
    model = agent.model
    with torch.no_grad():  # make the second critic read 1 lower everywhere: the actor's loss follows it
        model.critic.q_networks[1][-1].bias -= 1.0
    obs = torch.as_tensor(agent.buffer.observations[: agent.buffer.pos, 0])
    with torch.no_grad():
        q1, q2 = model.critic(obs, model.actor(obs))
    assert bool((q2 < q1).all())
    model.train(gradient_steps=1, batch_size=4)
    loss = model.logger.name_to_value["train/actor_loss"]
    # minus the mean of q2 over the batch (up to the critics' own update just before): 1 above any
    # value that following the first critic would give
    assert -float(q2.max()) - 0.1 < loss < -float(q2.min()) + 0.1
    assert loss > -float(q1.min()) + 0.5 and np.isfinite(stats["critic_loss"])
    with pytest.raises(ValueError, match="critics"):
        DDPGConfig(critics=0)


def test_bootstrap_credit_stores_reward_on_last_step_only(tiny_layers):
    env = RankSearchEnv(tiny_layers, lambda plans: Evaluation(accuracy=0.7), budget=0.5)
    agent = DDPGAgent(
        env.observation_space, env.action_space, DDPGConfig(warmup=5, credit="bootstrap"), seed=0
    )
    transitions, reward, _ = run_episode(env, agent, 0)
    agent.end_episode(transitions, reward, 0)
    n = len(transitions)
    assert agent.buffer.rewards[:n, 0].tolist() == [0.0] * (n - 1) + [pytest.approx(0.7)]
    assert agent.buffer.dones[:n, 0].tolist() == [0.0] * (n - 1) + [1.0]

    agent = DDPGAgent(env.observation_space, env.action_space, DDPGConfig(warmup=5, credit="copy"), seed=0)
    agent.end_episode(transitions, reward, 0)
    assert np.allclose(agent.buffer.rewards[:n, 0], 0.7) and np.all(agent.buffer.dones[:n, 0] == 1)


def test_policy_save_load_round_trip(tiny_layers, tmp_path):
    env = RankSearchEnv(tiny_layers, lambda plans: Evaluation(accuracy=float(plans[-1].ratio)), budget=0.5)
    config = DDPGConfig(warmup=2, batch_size=4, critics=2)
    agent = DDPGAgent(env.observation_space, env.action_space, config, seed=3)
    for episode in range(5):
        transitions, reward, _ = run_episode(env, agent, episode)
        agent.end_episode(transitions, reward, episode)
    meta = {"model": "tiny", "decomposition": "tucker2", "observation_features": list(OBSERVATION_FEATURES)}
    save_policy(tmp_path / "policy", agent, meta)
    assert {p.name for p in (tmp_path / "policy").iterdir()} == {"policy.pt", "policy.json", "replay.npz"}
    torch.load(tmp_path / "policy" / "policy.pt", weights_only=True)  # plain tensors

    loaded, saved_meta = load_policy(tmp_path / "policy", env.observation_space, env.action_space)
    assert saved_meta["model"] == "tiny" and saved_meta["observation_dim"] == len(OBSERVATION_FEATURES)
    obs, _ = env.reset()
    assert loaded.policy_action(obs) == pytest.approx(agent.policy_action(obs))
    assert loaded.buffer.pos == agent.buffer.pos
    assert np.array_equal(loaded.buffer.rewards[: agent.buffer.pos], agent.buffer.rewards[: agent.buffer.pos])
    assert loaded.state_dict() == agent.state_dict()
    assert len(loaded.model.critic.q_networks) == 2  # the saved config's critics
    # the restored RNG continues the same stream
    loaded.begin_episode(1)
    agent.begin_episode(1)
    assert loaded.act(obs)[0] == agent.act(obs)[0]


def test_crafted_pickle_policy_is_not_executed(tiny_layers, tmp_path):
    env = RankSearchEnv(tiny_layers, lambda plans: Evaluation(accuracy=0.5), budget=0.5)
    agent = DDPGAgent(env.observation_space, env.action_space, DDPGConfig(), seed=0)
    save_policy(
        tmp_path / "p",
        agent,
        {"model": "tiny", "decomposition": "tucker2", "observation_features": list(OBSERVATION_FEATURES)},
    )
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "p" / "policy.pt", "wb") as handle:
        pickle.dump({"actor": Evil()}, handle)
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "p", env.observation_space, env.action_space)
    assert not marker.exists()


def test_policy_metadata_checks(tmp_path):
    layout = list(OBSERVATION_FEATURES)
    meta = {
        "model": "resnet20",
        "decomposition": "tucker2",
        "action_space": "relative",
        "observation_features": layout,
    }
    assert check_policy_fits(meta, layout, "tucker2", "resnet20") is None
    warning = check_policy_fits(meta, layout, "tucker2", "resnet56")
    assert warning and "resnet20" in warning and "resnet56" in warning
    with pytest.raises(PolicyError, match="observation layout"):
        check_policy_fits({**meta, "observation_features": layout[:-1]}, layout, "tucker2", "resnet20")
    with pytest.raises(PolicyError, match="decomposition"):
        check_policy_fits(meta, layout, "svd", "resnet20")
    with pytest.raises(PolicyError, match="--action-space relative"):
        check_policy_fits(meta, layout, "tucker2", "resnet20", action_space="absolute")
    with pytest.raises(PolicyError, match="no saved policy"):
        read_policy_metadata(tmp_path)
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(PolicyError):
        read_policy_metadata(tmp_path)


def test_random_agent_is_seeded():
    a, b = RandomAgent(seed=5), RandomAgent(seed=5)
    obs = np.zeros(3, np.float32)
    assert [a.act(obs)[0] for _ in range(5)] == [b.act(obs)[0] for _ in range(5)]
    state = a.state_dict()
    first = a.act(obs)[0]
    a.load_state_dict(state)
    assert a.act(obs)[0] == first


def test_fixed_strategy_agent_replays_its_actions():
    agent = FixedStrategyAgent("uniform", [0.1, -0.2, 0.3])
    for _ in range(2):
        agent.begin_episode(0)
        assert [float(agent.act(None)[0]) for _ in range(3)] == pytest.approx([0.1, -0.2, 0.3])
    assert agent.episodes_needed == 1


# ----------------------------------------------------------------------------- selectors


def linear_cost(weights):
    weights = np.asarray(weights, dtype=float)
    return lambda ratios: float(np.dot(weights, ratios) / weights.sum())


def test_uniform_ratio_is_the_largest_within_budget():
    cost = linear_cost([1, 2, 3])
    ratios, r = uniform_ratios(3, cost, 0.4, 0.05)
    assert np.allclose(ratios, r) and r == pytest.approx(0.4, abs=1e-6) and cost(ratios) <= 0.4
    with pytest.raises(SelectorError):
        uniform_ratios(3, cost, 0.01, 0.05)


def test_energy_rank():
    values = np.array([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1, 0 of 14
    assert energy_rank(values, 9 / 14) == 1
    assert energy_rank(values, 9 / 14 + 1e-6) == 2
    assert energy_rank(values, 1.0) == 3
    spectra = [[(np.array([5.0, 1.0, 0.5, 0.1]), (4, 9))], [(np.array([2.0, 2.0, 2.0, 2.0]), (4, 9))]]
    ratios, e = energy_ratios(spectra, linear_cost([1, 1]), 0.6)
    assert np.mean(ratios) <= 0.6 + 1e-9
    assert ratios[0] < ratios[1]  # the concentrated spectrum gets the smaller rank


def test_spectral_rank_bounds_the_operator_norm_error():
    values = np.array([4.0, 2.0, 1.0, 0.5])  # relative: 1, 0.5, 0.25, 0.125
    assert spectral_rank(values, 0.5) == 1  # sigma_2 / sigma_1 = 0.5 <= 0.5
    assert spectral_rank(values, 0.49) == 2
    assert spectral_rank(values, 0.2) == 3
    assert spectral_rank(values, 0.0) == 4 and spectral_rank(values, 1.0) == 1


def test_alds_minimises_the_largest_error_within_budget():
    rng = np.random.default_rng(2)
    flat_tail = np.array([10.0] + [1.0] * 15)  # little error left after rank 1, much energy
    decaying = np.sort(rng.uniform(0.5, 10.0, 16))[::-1]
    spectra = [[(flat_tail, (16, 144))], [(decaying, (16, 144))]]
    cost = linear_cost([1, 3])

    def largest_error(ranks):
        return max(
            spectrum[r] / spectrum[0] if r < 16 else 0.0
            for ((spectrum, _),), r in zip(spectra, ranks, strict=True)
        )

    ratios, eps = alds_ratios(spectra, cost, 0.5)
    ranks = [int(round(r * 16)) for r in ratios]
    assert cost(ratios) <= 0.5 + 1e-9
    # brute force over every pair of ranks within the budget: none has a smaller largest error
    best = min(
        largest_error((a, b))
        for a in range(1, 17)
        for b in range(1, 17)
        if cost(np.array([a, b]) / 16) <= 0.5
    )
    assert largest_error(ranks) == pytest.approx(best) and largest_error(ranks) <= eps + 1e-9
    energy, _ = energy_ratios(spectra, cost, 0.5)
    assert ratios[0] < energy[0]  # energy keeps the flat tail's energy; ALDS spends it on layer 1
    with pytest.raises(SelectorError):
        alds_ratios(spectra, cost, 0.01)


def test_vbmf_finds_the_rank_of_a_noisy_low_rank_matrix():
    rng = np.random.default_rng(0)
    rows, cols, rank = 64, 200, 6
    signal = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) * 3.0
    noisy = signal + rng.normal(scale=1.0, size=(rows, cols))
    values = np.linalg.svd(noisy, compute_uv=False)
    assert vbmf_rank(values, (rows, cols)) == rank


def test_vbmf_weakening_meets_budget_and_orders_layers():
    rng = np.random.default_rng(1)

    def spectrum(rank):
        m = rng.normal(size=(32, rank)) @ rng.normal(size=(rank, 96)) * 3 + rng.normal(size=(32, 96))
        return np.linalg.svd(m, compute_uv=False)

    spectra = [[(spectrum(4), (32, 96))], [(spectrum(16), (32, 96))]]
    cost = linear_cost([1, 1])
    ratios, w = vbmf_ratios(spectra, cost, 0.5)
    assert cost(ratios) <= 0.5 + 1e-9 and cost(ratios) > 0.45
    assert ratios[0] < ratios[1]
    ratios_loose, w_loose = vbmf_ratios(spectra, cost, 0.95)
    assert w_loose < w and cost(ratios_loose) <= 0.95
