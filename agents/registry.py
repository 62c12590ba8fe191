"""Agents, by name: the registry behind ``--agent``.

A builder gets an :class:`AgentContext` (the environment's spaces and bounds, a cost function, the
layers' spectra, the search options that concern agents) and returns an
:class:`~rlrank.agents.base.Agent`. Adding an agent is one new file with its class and one
:func:`register_agent` call (see ``ARCHITECTURE.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym

from rlrank.agents.base import Agent, FixedStrategyAgent, RandomAgent
from rlrank.agents.selectors import SELECTORS, CostFn, Spectra, rule_ratios
from rlrank.errors import ConfigError


@dataclass
class AgentContext:
    """What an agent builder may use.

    Attributes:
        observation_space: The environment's observation space.
        action_space: The environment's action space.
        ratio_bounds: Per step, the ``[low, high]`` rank-ratio range (absolute actions map onto it).
        budget: The stage's FLOP budget.
        cost: Ratios (one per step) -> kept FLOP fraction.
        spectra: Per step, per unfolding, singular values and matrix shape (computed on call).
        min_ratio: The smallest rank ratio.
        seed: Seed of the agent (differs per stage).
        spread: Random actions are uniform in ``[-spread, spread]``.
        start_at_center: Episode 0 plays action 0 everywhere.
        warmup: DDPG warm-up episodes.
        noise: DDPG's initial exploration noise (AMC's units).
        noise_decay: DDPG's per-episode noise decay.
        credit: DDPG's credit assignment (``copy`` or ``bootstrap``).
        critics: DDPG's critics (more than one: the actor maximises their minimum).
        hidden: Hidden layer widths of DDPG's actor and critics.
        policy: A saved policy to continue (DDPG), or ``None``.
    """

    observation_space: gym.spaces.Box
    action_space: gym.spaces.Box
    ratio_bounds: list[tuple[float, float]]
    budget: float
    cost: CostFn
    spectra: Callable[[], Spectra]
    min_ratio: float = 0.05
    seed: int = 0
    spread: float = 1.0
    start_at_center: bool = True
    warmup: int = 25
    noise: float = 0.5
    noise_decay: float = 0.95
    credit: str = "copy"
    critics: int = 1
    hidden: tuple[int, ...] = (300, 300)
    policy: str | None = None


@dataclass(frozen=True)
class AgentSpec:
    """A registered agent.

    Attributes:
        name: The ``--agent`` name.
        build: Makes the agent from an :class:`AgentContext`.
        plays_absolute_ratios: The agent plays one fixed strategy of absolute ratios (the rules): the
            environment maps its actions linearly onto each step's range and does not top up the
            budget, so the strategy is played exactly as the rule chose it.
        learns: The agent learns a policy (it can be saved, continued and rolled out).
        warms_up: The agent plays ``--warmup`` random episodes before it chooses (a search with no
            more episodes than that is random search, and preflight says so).
        description: One line for ``--help``.
    """

    name: str
    build: Callable[[AgentContext], Agent]
    plays_absolute_ratios: bool = False
    learns: bool = False
    warms_up: bool = False
    description: str = ""


_REGISTRY: dict[str, AgentSpec] = {}


def register_agent(spec: AgentSpec) -> AgentSpec:
    """Make an agent available as ``--agent spec.name``."""
    _REGISTRY[spec.name] = spec
    return spec


def list_agents() -> list[str]:
    """Registered agent names, in registration order."""
    return list(_REGISTRY)


def agent_spec(name: str) -> AgentSpec:
    """The registered agent ``name``.

    Raises:
        ConfigError: Unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown agent {name!r}; known: {', '.join(list_agents())}")
    return _REGISTRY[name]


def make_agent(name: str, context: AgentContext) -> Agent:
    """Build the registered agent ``name`` for ``context``."""
    return agent_spec(name).build(context)


def _ddpg(context: AgentContext) -> Agent:
    from rlrank.agents.ddpg import DDPGAgent, DDPGConfig, load_policy
    from rlrank.agents.policy_files import read_policy_metadata

    if context.policy:
        # continuing a trained policy: no warm-up, gentle exploration around it (its roll-out is
        # the first episode of the search)
        saved = DDPGConfig.from_dict(read_policy_metadata(context.policy)["ddpg"])
        config = DDPGConfig.from_dict(
            {**vars(saved), "warmup": 0, "start_at_center": False, "noise_init": min(context.noise, 0.1)}
        )
        agent, _ = load_policy(
            context.policy, context.observation_space, context.action_space, config=config, restart=True
        )
        return agent
    config = DDPGConfig(
        warmup=context.warmup,
        spread=context.spread,
        start_at_center=context.start_at_center,
        noise_init=context.noise,
        noise_decay=context.noise_decay,
        credit=context.credit,
        critics=context.critics,
        hidden=context.hidden,
    )
    return DDPGAgent(context.observation_space, context.action_space, config, seed=context.seed)


def _random(context: AgentContext) -> Agent:
    return RandomAgent(
        seed=context.seed,
        spread=context.spread,
        start_at_center=context.start_at_center,
        dims=int(context.action_space.shape[0]),
    )


def _surrogate(context: AgentContext) -> Agent:
    from rlrank.agents.surrogate import SurrogateAgent, SurrogateConfig

    config = SurrogateConfig(
        warmup=max(1, context.warmup), spread=context.spread, start_at_center=context.start_at_center
    )
    dims = int(context.action_space.shape[0])
    return SurrogateAgent(len(context.ratio_bounds), config, seed=context.seed, dims=dims)


def _rule(rule: str) -> Callable[[AgentContext], Agent]:
    def build(context: AgentContext) -> Agent:
        from rlrank.envs import ratio_to_action

        ratios, knob = rule_ratios(
            rule, len(context.ratio_bounds), context.cost, context.budget, context.min_ratio, context.spectra
        )
        actions = [
            ratio_to_action(r, *bounds) for r, bounds in zip(ratios, context.ratio_bounds, strict=True)
        ]
        return FixedStrategyAgent(rule, actions, knob)

    return build


register_agent(
    AgentSpec("ddpg", _ddpg, learns=True, warms_up=True, description="DDPG after AMC (learns a policy)")
)
register_agent(AgentSpec("random", _random, description="random search"))
register_agent(
    AgentSpec(
        "surrogate",
        _surrogate,
        warms_up=True,
        description="model-based search: a random forest of the reward of whole strategies picks each episode",
    )
)
_RULES = {
    "uniform": "one rank ratio for every layer",
    "energy": "keep a fraction of every layer's singular-value energy",
    "vbmf": "weakened VBMF ranks (MUSCO)",
    "alds": "the smallest largest per-layer relative error in operator norm (ALDS)",
}
for _rule_name in SELECTORS:
    register_agent(
        AgentSpec(_rule_name, _rule(_rule_name), plays_absolute_ratios=True, description=_RULES[_rule_name])
    )
