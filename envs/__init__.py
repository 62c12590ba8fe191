"""Gymnasium environments of rlrank (installed as ``rlrank.envs``).

Importing this package registers ``rlrank/RankSearch-v0``::

    env = gymnasium.make("rlrank/RankSearch-v0", layers=layers, evaluator=evaluator, budget=0.5)
"""

import gymnasium as gym

from rlrank.envs.evaluation import Evaluation, Evaluator
from rlrank.envs.flop_budget import BudgetError, smallest_budget
from rlrank.envs.mixed_search import MixedSearchEnv
from rlrank.envs.rank_search import REWARDS, RankSearchEnv
from rlrank.envs.spaces import (
    ACTION_MODES,
    OBSERVATION_FEATURES,
    action_space,
    action_to_ratio,
    observation_space,
    ratio_to_action,
    relative_action_to_ratio,
)

ENV_ID = "rlrank/RankSearch-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="rlrank.envs.rank_search:RankSearchEnv")

__all__ = [
    "ACTION_MODES",
    "ENV_ID",
    "OBSERVATION_FEATURES",
    "REWARDS",
    "BudgetError",
    "Evaluation",
    "Evaluator",
    "MixedSearchEnv",
    "RankSearchEnv",
    "action_space",
    "action_to_ratio",
    "observation_space",
    "ratio_to_action",
    "relative_action_to_ratio",
    "smallest_budget",
]
