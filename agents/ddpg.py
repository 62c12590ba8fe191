"""DDPG (stable-baselines3) configured after AMC, driven one episode at a time.

AMC (He et al., 2018) searches per-layer compression with DDPG: warm-up episodes of uniformly random
actions fill the replay buffer, then the actor acts with truncated-normal exploration noise whose
width decays every episode, and the networks are updated at the end of each episode.

**Credit assignment.** The reward arrives only at the end of an episode. With ``credit="copy"``
(default, as AMC) the final reward is copied to every step of the episode and each transition is a
one-step target: with gamma = 1 and no intermediate reward that *is* the Monte-Carlo return of every
step, so the critic learns the expected final accuracy of (state, action) without bootstrapping.
A moving-average baseline of the rewards (AMC's ``moving_alpha``) is subtracted when the critic is
trained, centering the small differences between strategies. ``credit="bootstrap"`` instead keeps
the reward on the last step and bootstraps with ``gamma`` through the episode (plain TD).

The networks, target networks, optimizers and replay buffer are SB3's; rlrank drives them directly
(``replay_buffer.add`` / ``train``) so that the search loop reads top to bottom and episodes,
warm-up and noise follow AMC. Policies are saved as tensors plus JSON (no pickle): see
:func:`save_policy` / :func:`load_policy`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DDPG
from stable_baselines3.common.logger import Logger

from rlrank.agents.base import Agent, Transition
from rlrank.agents.ddpg_model import AMCDDPG, BaselineReplayBuffer
from rlrank.agents.policy_files import (
    PolicyError,
    read_networks,
    read_policy_metadata,
    read_replay,
    write_policy_files,
)

logger = logging.getLogger(__name__)

CREDITS = ("copy", "bootstrap")


@dataclass
class DDPGConfig:
    """DDPG hyperparameters; defaults are AMC's.

    Attributes:
        hidden: Hidden layer widths of actor and critic (AMC: 300, 300).
        actor_lr: Actor learning rate (AMC: 1e-4).
        critic_lr: Critic learning rate (AMC: 1e-3).
        tau: Soft target-update rate (AMC: 0.01).
        batch_size: Transitions per update (AMC: 64).
        buffer_size: Replay capacity in transitions.
        warmup: Episodes of uniformly random actions before learning (AMC: 100).
        spread: Warm-up actions are uniform in ``[-spread, spread]`` (AMC: the whole range, 1).
        start_at_center: Play action 0 at every step of episode 0: with relative actions that is the
            center strategy (uniform or a rule's), so the search never ends below it and the
            replay buffer holds it from the start (AMC: no).
        noise_init: Initial std of the truncated-normal exploration noise, in units of AMC's [0, 1]
            action range (AMC: 0.5); rlrank's actions span [-1, 1], so the std applied is twice this.
        noise_decay: Per-episode decay of the noise std after warm-up (AMC: 0.95).
        gamma: Discount (AMC: 1); only used with ``credit="bootstrap"``.
        credit: ``copy`` (final reward on every step, AMC) or ``bootstrap``.
        baseline_alpha: Step of the reward moving-average baseline (AMC's ``moving_alpha``: 0.5).
        updates_per_step: Gradient updates per transition of a finished episode (AMC: 1).
        critics: Critics fitted to the same transitions; with more than one the actor maximises
            their minimum (:mod:`rlrank.agents.ddpg_model`; AMC: 1).
        final_layer_init: The output layers of actor and critic start uniform in
            ``[-final_layer_init, final_layer_init]``, so the first policy actions are near 0 (with
            relative actions: the center strategy) and the first values near 0 (DDPG paper and AMC:
            3e-3; 0 keeps stable-baselines3's initialization).
    """

    hidden: tuple[int, ...] = (300, 300)
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    batch_size: int = 64
    buffer_size: int = 100_000
    warmup: int = 100
    spread: float = 1.0
    start_at_center: bool = False
    noise_init: float = 0.5
    noise_decay: float = 0.95
    gamma: float = 1.0
    credit: str = "copy"
    baseline_alpha: float = 0.5
    updates_per_step: int = 1
    final_layer_init: float = 3e-3
    critics: int = 1

    def __post_init__(self) -> None:
        if self.credit not in CREDITS:
            raise ValueError(f"unknown credit {self.credit!r}; known: {', '.join(CREDITS)}")
        if not 0 < self.spread <= 1:
            raise ValueError(f"spread must be in (0, 1], got {self.spread}")
        if self.critics < 1:
            raise ValueError(f"critics must be >= 1, got {self.critics}")
        self.hidden = tuple(int(h) for h in self.hidden)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DDPGConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class _SpacesOnly(gym.Env):
    """Carries the spaces SB3 needs to build its networks; the search loop drives the real env."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        raise RuntimeError("this environment only carries spaces")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the small actor/critic networks on one thread: with several, the per-op threading
    overhead dominates and, on a busy machine, slows updates down by an order of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _init_output_layers(model: DDPG, bound: float, seed: int) -> None:
    """Draw the last linear layer of the actor and of every critic uniformly in ``[-bound, bound]``
    (weights and biases, as in the DDPG paper) and copy them to the target networks."""
    generator = torch.Generator().manual_seed(seed)
    policy = model.policy
    heads = [policy.actor.mu] + list(policy.critic.q_networks)
    with torch.no_grad():
        for head in heads:
            last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
            for tensor in (last.weight, last.bias):
                tensor.copy_(torch.empty_like(tensor).uniform_(-bound, bound, generator=generator))
    policy.actor_target.load_state_dict(policy.actor.state_dict())
    policy.critic_target.load_state_dict(policy.critic.state_dict())


def truncated_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> float:
    """A normal sample around ``mean`` conditioned on ``[low, high]`` (rejection, then clipping)."""
    if std <= 0:
        return float(np.clip(mean, low, high))
    for _ in range(100):
        x = rng.normal(mean, std)
        if low <= x <= high:
            return float(x)
    return float(np.clip(mean, low, high))


class DDPGAgent(Agent):
    """AMC-style DDPG over the rank-search environment.

    Args:
        observation_space: The environment's observation space.
        action_space: The environment's action space (``Box(-1, 1, (1,))``).
        config: Hyperparameters.
        seed: Seed of the networks, the warm-up actions and the noise.
    """

    name = "ddpg"

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        action_space: gym.spaces.Box,
        config: DDPGConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.config = config or DDPGConfig()
        self.seed = seed
        cfg = self.config
        self.model = AMCDDPG(
            "MlpPolicy",
            _SpacesOnly(self.observation_space, self.action_space),
            learning_rate=cfg.critic_lr,
            buffer_size=cfg.buffer_size,
            learning_starts=0,
            batch_size=cfg.batch_size,
            tau=cfg.tau,
            gamma=cfg.gamma,
            replay_buffer_class=BaselineReplayBuffer,
            policy_kwargs={
                "net_arch": {"pi": list(cfg.hidden), "qf": list(cfg.hidden)},
                "n_critics": cfg.critics,
            },
            seed=self.seed,
            device="cpu",
        )
        self.model.actor_lr, self.model.critic_lr = cfg.actor_lr, cfg.critic_lr
        if cfg.final_layer_init > 0:
            _init_output_layers(self.model, cfg.final_layer_init, seed)
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.rng = np.random.default_rng(self.seed)
        self.episode = 0
        self.episodes_learned = 0
        self.baseline: float | None = None

    @property
    def start_at_center(self) -> bool:  # type: ignore[override]
        return self.config.start_at_center

    @property
    def buffer(self) -> BaselineReplayBuffer:
        return self.model.replay_buffer  # type: ignore[return-value]

    def noise_std(self, episode: int | None = None) -> float:
        """Exploration noise std (in [-1, 1] action units) of ``episode`` (0 during warm-up: random)."""
        episode = self.episode if episode is None else episode
        steps = max(0, episode - self.config.warmup)
        return 2.0 * self.config.noise_init * self.config.noise_decay**steps

    def begin_episode(self, episode: int) -> None:
        self.episode = episode

    def phase(self, episode: int) -> str:
        if episode == 0 and self.start_at_center:
            return "center"
        return "warmup" if episode < self.config.warmup else "explore"

    def greedy(self) -> Agent:
        return GreedyPolicy(self)

    def policy_actions(self, obs: np.ndarray) -> np.ndarray:
        """The actor's deterministic action for ``obs`` (every entry of the action space)."""
        with _one_thread():
            action, _ = self.model.predict(np.asarray(obs, dtype=np.float32), deterministic=True)
        return np.asarray(action, dtype=np.float64).reshape(-1)

    def policy_action(self, obs: np.ndarray) -> float:
        """The first entry of the actor's deterministic action for ``obs`` (the ratio action)."""
        return float(self.policy_actions(obs)[0])

    def act(self, obs: np.ndarray) -> np.ndarray:
        dims = int(self.action_space.shape[0])
        if self.config.start_at_center and self.episode == 0:
            action = [0.0] * dims
        elif self.episode < self.config.warmup:
            action = [self.rng.uniform(-self.config.spread, self.config.spread) for _ in range(dims)]
        else:
            std = self.noise_std()
            action = [truncated_normal(self.rng, m, std, -1.0, 1.0) for m in self.policy_actions(obs)]
        return np.array(action, dtype=np.float32)

    def end_episode(self, transitions: Sequence[Transition], reward: float, episode: int) -> dict[str, float]:
        copy = self.config.credit == "copy"
        last = len(transitions) - 1
        for t, tr in enumerate(transitions):
            r = reward if (copy or t == last) else 0.0
            done = True if copy else tr.done
            self.buffer.add(
                np.asarray(tr.obs, dtype=np.float32)[None],
                np.asarray(tr.next_obs, dtype=np.float32)[None],
                np.asarray(tr.action, dtype=np.float32).reshape(1, -1),
                np.array([r], dtype=np.float32),
                np.array([done]),
                [{}],
            )
        stats: dict[str, float] = {}
        filled = self.buffer.buffer_size if self.buffer.full else self.buffer.pos
        if copy:
            mean = float(self.buffer.rewards[:filled].mean())
            self.baseline = (
                mean
                if self.baseline is None
                else self.baseline + self.config.baseline_alpha * (mean - self.baseline)
            )
            self.buffer.reward_offset = self.baseline
            stats["baseline"] = self.baseline
        if episode >= self.config.warmup and filled > 0:  # sampling is with replacement
            self.model.train(
                gradient_steps=len(transitions) * self.config.updates_per_step,
                batch_size=self.config.batch_size,
            )
            self.episodes_learned += 1
            values = self.model.logger.name_to_value
            for key in ("train/critic_loss", "train/actor_loss"):
                if key in values:
                    stats[key.split("/")[1]] = float(values[key])
        if episode >= self.config.warmup:
            stats["noise_std"] = self.noise_std(episode)
        return stats

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path, metadata: dict[str, Any]) -> bool:
        """Save as ``policy.pt`` (tensors), ``policy.json`` (``metadata``, config, counters) and
        ``replay.npz`` (the replay buffer), each written atomically (see :mod:`rlrank.agents.policy_files`).

        Args:
            directory: Folder to write into (created).
            metadata: What the policy was trained on: ``model``, ``decomposition``,
                ``observation_features``, ``layers``, ``budgets`` ... (checked by
                :func:`~rlrank.agents.policy_files.check_policy_fits`).
        """
        write_policy_files(
            directory,
            self.network_state(),
            self.buffer_arrays(),
            {
                **metadata,
                "observation_dim": int(self.observation_space.shape[0]),
                "ddpg": asdict(self.config),
                "seed": self.seed,
                "state": self.state_dict(),
            },
        )
        return True

    def restore(self, directory: str | Path) -> None:
        """Load the networks, optimizers and replay buffer that :meth:`save` wrote (resuming)."""
        self.load_network_state(read_networks(directory))
        arrays = read_replay(directory)
        if arrays is not None:
            self.load_buffer_arrays(arrays)

    def state_dict(self) -> dict[str, Any]:
        return {
            "episode": self.episode,
            "episodes_learned": self.episodes_learned,
            "baseline": self.baseline,
            "n_updates": int(self.model._n_updates),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episode = int(state["episode"])
        self.episodes_learned = int(state["episodes_learned"])
        self.baseline = state["baseline"]
        self.buffer.reward_offset = self.baseline or 0.0
        self.model._n_updates = int(state["n_updates"])
        self.rng.bit_generator.state = state["rng"]

    def network_state(self) -> dict[str, Any]:
        """Tensors of actor, critic, their targets and optimizers (loadable with ``weights_only``)."""
        policy = self.model.policy
        return {
            "actor": policy.actor.state_dict(),
            "actor_target": policy.actor_target.state_dict(),
            "critic": policy.critic.state_dict(),
            "critic_target": policy.critic_target.state_dict(),
            "actor_optimizer": policy.actor.optimizer.state_dict(),
            "critic_optimizer": policy.critic.optimizer.state_dict(),
        }

    def load_network_state(self, state: dict[str, Any]) -> None:
        policy = self.model.policy
        try:
            for key in ("actor", "actor_target", "critic", "critic_target"):
                getattr(policy, key).load_state_dict(state[key])
            policy.actor.optimizer.load_state_dict(state["actor_optimizer"])
            policy.critic.optimizer.load_state_dict(state["critic_optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise PolicyError(f"saved networks do not fit this agent: {str(exc).splitlines()[0]}") from exc

    def buffer_arrays(self) -> dict[str, np.ndarray]:
        b = self.buffer
        n = b.buffer_size if b.full else b.pos
        return {
            "observations": b.observations[:n, 0],
            "next_observations": b.next_observations[:n, 0],
            "actions": b.actions[:n, 0],
            "rewards": b.rewards[:n, 0],
            "dones": b.dones[:n, 0],
            "pos": np.array(b.pos),
            "full": np.array(b.full),
        }

    def load_buffer_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        b = self.buffer
        n = len(arrays["rewards"])
        if n > b.buffer_size:
            raise PolicyError(
                f"saved replay buffer holds {n} transitions, more than the capacity {b.buffer_size}"
            )
        if arrays["observations"].shape[1:] != b.observations.shape[2:]:
            raise PolicyError("saved replay buffer has another observation size")
        b.observations[:n, 0] = arrays["observations"]
        b.next_observations[:n, 0] = arrays["next_observations"]
        b.actions[:n, 0] = arrays["actions"]
        b.rewards[:n, 0] = arrays["rewards"]
        b.dones[:n, 0] = arrays["dones"]
        b.pos = int(arrays["pos"]) % b.buffer_size if bool(arrays["full"]) else n
        b.full = bool(arrays["full"]) and n == b.buffer_size


class GreedyPolicy(Agent):
    """A DDPG agent's deterministic policy, without exploration or learning (a policy's roll-out)."""

    name = "policy"
    episodes_needed = 1

    def __init__(self, ddpg: DDPGAgent) -> None:
        self.ddpg = ddpg

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.ddpg.policy_actions(obs).astype(np.float32)

    def phase(self, episode: int) -> str:
        return "policy"


def save_policy(directory: str | Path, agent: DDPGAgent, metadata: dict[str, Any]) -> Path:
    """Save ``agent`` into ``directory`` (:meth:`DDPGAgent.save`) and return the folder."""
    agent.save(directory, metadata)
    return Path(directory)


def load_policy(
    directory: str | Path,
    observation_space: gym.spaces.Box,
    action_space: gym.spaces.Box,
    with_buffer: bool = True,
    config: DDPGConfig | None = None,
    restart: bool = False,
) -> tuple[DDPGAgent, dict[str, Any]]:
    """Rebuild a DDPG agent from :meth:`DDPGAgent.save`'s files (tensors with ``weights_only=True``,
    arrays with ``allow_pickle=False``: nothing from the files is executed).

    Args:
        directory: The policy folder, or any file inside it.
        config: Hyperparameters to continue with (default: the saved ones).
        restart: Count episodes from 0 again (continuing a saved policy in a new search).

    Returns:
        The agent (counters and RNG restored) and the saved metadata.
    """
    meta = read_policy_metadata(directory)
    if int(meta.get("observation_dim", -1)) != int(observation_space.shape[0]):
        raise PolicyError(
            f"policy expects {meta.get('observation_dim')} observation features, the environment has {observation_space.shape[0]}"
        )
    try:
        agent = DDPGAgent(
            observation_space,
            action_space,
            config or DDPGConfig.from_dict(meta["ddpg"]),
            int(meta.get("seed", 0)),
        )
        agent.load_network_state(read_networks(directory))
        agent.load_state_dict(meta["state"])
    except PolicyError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PolicyError(
            f"{directory} is not a usable rlrank policy: {type(exc).__name__} {exc} in its policy.json"
        ) from exc
    if restart:
        agent.episode = 0
    if with_buffer:
        arrays = read_replay(directory)
        if arrays is not None:
            agent.load_buffer_arrays(arrays)
    return agent, meta
