"""The rank-search environment: one step per compressible layer, the action is its rank ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from rlrank.envs.evaluation import Evaluation, Evaluator
from rlrank.envs.fair_share import FairShare
from rlrank.envs.flop_budget import BudgetError
from rlrank.envs.latency_budget import LatencyBudget, fallback_ratios
from rlrank.envs.spaces import (
    ACTION_MODES,
    action_space,
    action_to_ratio,
    layer_features,
    observation_space,
    relative_action_to_ratio,
)
from rlrank.layers import LayerInfo
from rlrank.planning import (
    LayerPlan,
    check_decomposition,
    current_macs,
    current_params,
    current_ratio,
    largest_ratio_within,
    owned_layers,
    plan_layer,
    searched_layers,
    smallest_ratio_reaching,
)

if TYPE_CHECKING:
    from rlrank.latency_table import LatencyTable

REWARDS = ("acc", "acc-logflops")


class RankSearchEnv(FairShare, gym.Env):
    """Choose a rank ratio for every compressible layer of a CNN, within a FLOP budget.

    ## Description

    An episode walks the compressible conv / linear layers of one model in forward order. At each
    step the agent picks the rank ratio of the current layer; after the last layer the strategy is
    applied (factors from a per-layer cache), the compressed model gets a cheap fine-tune and its
    validation accuracy is the reward. This is the search of AMC (He et al., 2018) with low-rank
    factorization, or with its channel pruning (``decomposition="prune"``: a step is a layer whose
    input channels one convolution makes, its ratio the fraction of them kept, its plan that pair's).

    ## Action Space

    ``Box(-1, 1, (1,), float32)``, mapped to a rank ratio in ``[min_ratio, upper]``, where ``upper``
    is 1 for a dense layer and the layer's current ratio for one factorized in an earlier stage
    (ranks never grow). With ``action_mode="relative"`` (default) the action scales the step's
    *fair ratio*, the one ratio that, given to this layer and every later one, spends exactly the
    budget left: ``ratio = fair * 3 ** action``, so action 0 everywhere is the uniform strategy and
    the agent learns how to deviate from it (a measured improvement over AMC's absolute mapping, see
    ``experiments/RESULTS.md``); :meth:`set_center` centers the actions on another strategy (a
    rule's) instead, scaled as a whole to the budget left. With ``action_mode="absolute"`` (AMC) the action maps linearly onto
    ``[min_ratio, upper]``; rule-based selectors play their ratios this way. The ratio is then
    clipped between two walls. The upper one is AMC's
    *action wall*: the largest ratio that keeps the budget reachable with every later layer at
    ``min_ratio``, so no episode ever exceeds the budget. The lower one (``fill_budget``, default)
    is the smallest ratio that still lets the episode spend its whole budget with every later layer
    at its largest ratio, so no episode wastes budget either: the agent decides how the budget is
    shared between layers, not how much of it to use (a measured improvement over AMC's single
    wall for accuracy rewards, see ``experiments/RESULTS.md``). With relative actions and
    ``reserve`` > 0 the upper wall also keeps every later layer at ``reserve`` times its ratio in the
    episode's center strategy (the uniform or rule strategy at the episode's budget): without it,
    early layers that overspend leave the debt to the last layers, which the walls then squeeze to
    ``min_ratio`` (the last large convolution absorbing every overspend). The ratio picks integer ranks
    through :func:`rlrank.planning.ratio_to_ranks`; a ratio whose factorization would not save
    MACs leaves the layer dense.

    ## Observation Space

    ``Box(0, 1, (18,), float32)``, entries named by :data:`OBSERVATION_FEATURES`: the layer's
    index, whether it is linear and whether it is pointwise, in / out channels, kernel size, stride,
    input feature-map size (each divided by its maximum over the model's layers), its dense MACs and
    parameters (fractions of the dense model's), the MACs removed by the choices so far and the dense
    MACs of the layers still to come (fractions of the dense model's), the previous step's ratio, the
    episode's target budget, the layer's current ratio (1 unless factorized in an earlier stage) and
    the two walls' bounds for this step (``wall_ratio``, ``floor_ratio``) and its fair ratio.

    ## Rewards

    0 at every step but the last. At the last step, with ``reward="acc"``, the validation accuracy
    (0..1) after the cheap fine-tune; with ``reward="acc-logflops"``, AMC's ``-error * log(MACs)``.
    A failed evaluation (non-finite loss) gets the minimum reward (accuracy 0). Earlier steps are
    credited by the agent: rlrank's DDPG, like AMC, copies the final reward to every step of the
    episode (a Monte-Carlo return with gamma = 1), see :mod:`rlrank.agents.ddpg`.

    ## Starting State

    The first compressible layer, nothing removed yet. The episode's target budget is ``budget``,
    or, with ``budgets``, the next of them in turn; ``reset(options={"budget": b})`` sets it.

    ## Episode End

    Terminates after the last compressible layer; never truncates. The last step's ``info`` holds
    the strategy (``plans``, ``ratios``, ``ranks``), ``flops_ratio``, ``params_ratio``, ``accuracy``,
    ``loss``, ``failed`` and ``timings``. The FLOP ratio never exceeds the episode's target.

    ## Arguments

    * ``layers``: every conv / linear layer of the model (:func:`rlrank.describe.describe_layers`);
      those that no rank makes cheaper (grouped convs) are fixed costs, not steps.
    * ``evaluator``: callable pricing a strategy (a list of :class:`LayerPlan`), returning an
      :class:`Evaluation`; tests inject a stub. ``None``: the caller prices strategies itself (the
      search loop, which may evaluate several episodes at once on Ray workers): the last step then
      returns reward 0 and ``info`` holds ``plans``, ``budget`` and ``pending=True``, and
      :meth:`outcome` turns the evaluation into the reward and the rest of ``info``.
    * ``budget``: fraction of the dense model's MACs to keep at most.
    * ``budgets``: several targets, cycled per episode (training one policy for many budgets).
    * ``decomposition``: a registered method (``tucker2``, ``svd``, ``cp``, ``tt``, ``tr``, ``prune``).
    * ``min_ratio``: the smallest rank ratio.
    * ``reward``: ``acc`` or ``acc-logflops``.
    * ``total_params``: parameters of the dense model (default: those of the layers).
    * ``fill_budget``: clip ratios from below too, so that every episode uses its budget.
    * ``reserve``: with relative actions, the fraction of its center ratio that the upper wall keeps
      for every later layer (0: only ``min_ratio``, AMC's wall).
    * ``action_mode``: ``relative`` (actions scale the fair ratio) or ``absolute`` (AMC's mapping).
    * ``exclude``: shell-style globs of layer names that stay as they are (fixed costs, not steps).
    * ``allow_dense``: let a layer stay dense when its ratio saves nothing; ``False`` gives it the
      largest ranks that still save MACs instead (multi-stage runs factorize every layer in their
      first stage, so that later stages only re-factorize and never add depth).
    * ``latency_table``, ``latency_budget``: a second budget, a fraction of the dense model's
      measured latency, enforced like the FLOP budget (:mod:`rlrank.envs.latency_budget`); a layer
      stays dense from the ratio where its factorized form stops being faster. The last step's
      ``info`` then holds the predicted ``latency_ratio``.
    * ``sparse``: ``--sparse F``: a factorized layer spends F of its cost on whole dense filters
      (:func:`rlrank.planning.sparse_plan`, within the same MACs, so every wall holds as it is).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        evaluator: Evaluator | None,
        budget: float = 0.5,
        budgets: Sequence[float] | None = None,
        decomposition: str = "tucker2",
        min_ratio: float = 0.05,
        reward: str = "acc",
        total_params: int | None = None,
        allow_dense: bool = True,
        fill_budget: bool = True,
        reserve: float = 0.0,
        action_mode: str = "relative",
        exclude: Sequence[str] | None = None,
        latency_table: LatencyTable | None = None,
        latency_budget: float | None = None,
        sparse: float = 0.0,
    ) -> None:
        super().__init__()
        self.sparse = float(sparse)
        if reward not in REWARDS:
            raise ValueError(f"unknown reward {reward!r}; known: {', '.join(REWARDS)}")
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action mode {action_mode!r}; known: {', '.join(ACTION_MODES)}")
        self.action_mode = action_mode
        if not 0.0 < min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
        if not 0.0 <= reserve <= 1.0:
            raise ValueError(f"reserve must be in [0, 1], got {reserve}")
        self.reserve = float(reserve)
        self.layers = list(layers)
        self.evaluator = evaluator
        self.decomposition = check_decomposition(decomposition)
        self.min_ratio = float(min_ratio)
        self.reward_kind = reward
        self.allow_dense = allow_dense
        self.fill_budget = fill_budget
        self.exclude = list(exclude or [])
        self.steps, owned = self._search_steps()
        if not self.steps:
            raise ValueError("the model has no compressible layer")
        step_names = {layer.name for layer in self.steps} | owned
        by_name = {layer.name: layer for layer in self.layers}
        self._current_macs = [  # what each step's layers cost now (its own and the one it owns)
            current_macs(layer) + (current_macs(by_name[layer.producer]) if layer.producer in owned else 0)
            for layer in self.steps
        ]
        self.fixed_macs = sum(current_macs(layer) for layer in self.layers if layer.name not in step_names)
        self.fixed_params = sum(
            current_params(layer) for layer in self.layers if layer.name not in step_names
        )
        self.dense_macs = sum(layer.macs for layer in self.layers)
        self.dense_params = total_params or sum(layer.params for layer in self.layers)
        self._upper = [current_ratio(layer) for layer in self.steps]
        self._low = [min(self.min_ratio, upper) for upper in self._upper]
        self._dense_from: list[float | None] = [None] * len(self.steps)
        self.latency: LatencyBudget | None = None
        if latency_budget is not None and latency_table is not None:
            if allow_dense:
                self._dense_from = fallback_ratios(
                    latency_table,
                    self.steps,
                    self._low,
                    self.decomposition,
                    min(budgets or [budget]) * self.dense_macs - self.fixed_macs,
                )
            self.latency = LatencyBudget(
                latency_table, self.steps, latency_budget, self._low, self._upper, self.plan_step
            )
        self._min_macs = [  # every family must fit at its lowest ratio: the walls reserve the most
            max(self.plan_step(i, low, f).macs for f in self.families(i)) for i, low in enumerate(self._low)
        ]
        self.smallest_budget = (self.fixed_macs + sum(self._min_macs)) / self.dense_macs
        self._max_macs = [self.plan_step(i, upper).macs for i, upper in enumerate(self._upper)]
        self._center: np.ndarray | None = None
        self._fair_grid, self._grid_macs, self._suffix_macs = self._tabulate_macs()
        self.budgets = [float(b) for b in (budgets if budgets else [budget])]
        for b in self.budgets:
            self.check_budget(b)
        self.budget = self.budgets[0]
        self._reserved = self._reserved_macs()
        self._features = layer_features(self.steps, self.dense_macs, self.dense_params)

        self.action_space = action_space()
        self.observation_space = observation_space()

        self._episode = -1
        self._t = 0
        self._plans: list[LayerPlan] = []
        self._prev_ratio = 1.0

    # ---------------------------------------------------------------- accounting

    def _search_steps(self) -> tuple[list[LayerInfo], set[str]]:
        """The layers searched, one per step, and the layers whose cost their plans own besides."""
        steps = searched_layers(self.layers, self.decomposition, self.exclude)
        return steps, owned_layers(steps, self.decomposition)

    def families(self, index: int) -> tuple[str | None, ...]:
        """What step ``index`` may be compressed with besides its ratio (one family: ``(None,)``)."""
        return (None,)

    def layer_plans(self, plans: Sequence[LayerPlan]) -> list[LayerPlan]:
        """A strategy as per-layer plans, as the evaluator and the log take it (here: as it is)."""
        return list(plans)

    def strategy_of(self, layers: dict[str, dict[str, Any]]) -> list[LayerPlan]:
        """The strategy (one plan per step) that an episode row's per-layer entries record."""
        return [self.plan_step(i, layers[layer.name]["ratio"]) for i, layer in enumerate(self.steps)]

    def check_budget(self, budget: float) -> None:
        """Raise :class:`BudgetError` when ``budget`` is out of (0, 1] or below the reachable minimum."""
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise ValueError(f"FLOP budget must be in (0, 1], got {budget!r}")
        if budget < self.smallest_budget - 1e-12:
            raise BudgetError(budget, self.smallest_budget)

    def plan(self, ratios: Sequence[float]) -> list[LayerPlan]:
        """Plans for one ratio per step, clipped to each layer's range (no action wall)."""
        return [self.plan_step(i, r) for i, r in enumerate(ratios)]

    def plan_step(self, index: int, ratio: float, family: str | None = None) -> LayerPlan:
        """The plan of step ``index`` at ``ratio`` (clipped to the step's range, no action wall);
        ``family``: one of :meth:`families` (``None`` here: the one method)."""
        ratio = float(np.clip(ratio, self._low[index], self._upper[index]))
        return plan_layer(
            self.steps[index],
            ratio,
            self.decomposition,
            self.allow_dense,
            self._dense_from[index],
            self.sparse,
        )

    def flops_ratio(self, plans: Sequence[LayerPlan]) -> float:
        """Fraction of the dense model's MACs kept by a full strategy."""
        return (self.fixed_macs + sum(p.macs for p in plans)) / self.dense_macs

    def params_ratio(self, plans: Sequence[LayerPlan]) -> float:
        return (self.fixed_params + sum(p.params for p in plans)) / self.dense_params

    def ratio_bounds(self, index: int) -> tuple[float, float]:
        """The ``[low, high]`` range that actions map onto for step ``index``."""
        return self._low[index], self._upper[index]

    def wall(self, index: int, spent: float, spent_ms: float = 0.0, family: str | None = None) -> float:
        """Largest ratio for step ``index`` (in ``family``) that keeps the budget reachable (AMC's
        action wall), and the latency budget too when there is one (``spent_ms``: the latency
        planned so far)."""
        allowed = self.budget * self.dense_macs - self.fixed_macs - spent - self._reserved[index + 1]
        wall = largest_ratio_within(
            lambda r: self.plan_step(index, r, family).macs, allowed, self._low[index], self._upper[index]
        )
        return wall if self.latency is None else min(wall, self.latency.wall(index, spent_ms))

    def _reserved_macs(self) -> np.ndarray:
        """MACs the upper wall keeps for steps ``i`` and later (entry ``i``; one entry more, 0):
        every step at ``min_ratio``, or with a ``reserve``, at that fraction of the center strategy's
        ratio at the current budget (never below ``min_ratio``, never more than the budget holds)."""
        macs = np.asarray(self._min_macs, dtype=np.float64)
        if self.reserve > 0 and self.action_mode == "relative":
            if self._center is None:
                center = np.full(len(self.steps), self.fair_ratio(0, 0.0))
            else:
                center = self._center_scale(0, 0.0) * self._center
            kept = np.array([self.plan_step(i, self.reserve * r).macs for i, r in enumerate(center)])
            if kept.sum() <= self.budget * self.dense_macs - self.fixed_macs:
                macs = np.maximum(macs, kept)
        return np.append(np.cumsum(macs[::-1])[::-1], 0.0)

    def floor(self, index: int, spent: float, spent_ms: float = 0.0, family: str | None = None) -> float:
        """Smallest ratio for step ``index`` that still lets the episode use its whole budget with
        every later layer at its largest ratio (the lower action wall; ``min_ratio`` when
        ``fill_budget`` is off). With a latency budget too: the lower of the two budgets' floors."""
        if not self.fill_budget:
            return self._low[index]
        needed = self.budget * self.dense_macs - self.fixed_macs - spent - sum(self._max_macs[index + 1 :])
        floor = smallest_ratio_reaching(
            lambda r: self.plan_step(index, r, family).macs, needed, self._low[index], self._upper[index]
        )
        return floor if self.latency is None else min(floor, self.latency.floor(index, spent_ms))

    def outcome(
        self, plans: Sequence[LayerPlan], evaluation: Evaluation, budget: float
    ) -> tuple[float, dict[str, Any]]:
        """The reward of a priced strategy and what the last step's ``info`` reports of it.

        Args:
            plans: The episode's strategy (one plan per step).
            evaluation: What the evaluator reported for it.
            budget: The episode's target budget.

        Returns:
            The reward, and ``info``'s entries ``plans``, ``ratios``, ``ranks``, ``flops_ratio``,
            ``params_ratio``, ``budget``, ``accuracy``, ``loss``, ``failed``, ``timings`` (and
            ``latency_ratio`` with a latency budget).
        """
        plans = list(plans)
        flops = self.flops_ratio(plans)
        accuracy = 0.0 if evaluation.failed else float(evaluation.accuracy)
        if self.reward_kind == "acc":
            reward = accuracy
        else:
            reward = -(1.0 - accuracy) * math.log(flops * self.dense_macs)
        info: dict[str, Any] = dict(
            plans=plans,
            ratios={p.name: p.ratio for p in plans},
            ranks={p.name: list(p.ranks) if p.ranks else None for p in plans},
            flops_ratio=flops,
            params_ratio=self.params_ratio(plans),
            budget=float(budget),
            accuracy=accuracy,
            loss=evaluation.loss,
            failed=evaluation.failed,
            timings=dict(evaluation.timings),
        )
        if self.latency is not None:
            info["latency_ratio"] = self.latency.ratio_of(plans)
        return float(reward), info

    # ---------------------------------------------------------------- observations

    def _observation(self) -> np.ndarray:
        t = self._t
        spent = sum(p.macs for p in self._plans)
        spent_ms = self.latency.spent(self._plans) if self.latency else 0.0
        removed = sum(now - p.macs for now, p in zip(self._current_macs, self._plans, strict=False))
        to_come = sum(layer.macs for layer in self.steps[t + 1 :])
        dynamic = [
            removed / self.dense_macs,
            to_come / self.dense_macs,
            self._prev_ratio,
            self.budget,
            self._upper[t],
            self.wall(t, spent, spent_ms),
            self.floor(t, spent, spent_ms),
            self.fair_ratio(t, spent, spent_ms),
        ]
        obs = np.concatenate([self._features[t], dynamic]).astype(np.float32)
        return np.clip(obs, 0.0, 1.0)

    def _family_and_ratio_action(self, index: int, action: np.ndarray) -> tuple[str | None, float]:
        """Step ``index``'s family (``None``: the one method) and the action mapped to its ratio."""
        return None, float(action[0])

    # ---------------------------------------------------------------- gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._episode += 1
        if options and "budget" in options:
            budget = float(options["budget"])
            self.check_budget(budget)
            self.budget = budget
        else:
            self.budget = self.budgets[self._episode % len(self.budgets)]
        self._t = 0
        self._plans = []  # before the reserve: a mixed search's plans depend on the episode's plans
        self._reserved = self._reserved_macs()
        self._prev_ratio = 1.0
        return self._observation(), {"budget": self.budget, "layer": self.steps[0].name}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._t >= len(self.steps):
            raise RuntimeError("step() called after the episode ended; call reset()")
        t = self._t
        low, high = self._low[t], self._upper[t]
        family, a = self._family_and_ratio_action(t, np.asarray(action, dtype=np.float64).reshape(-1))
        spent = sum(p.macs for p in self._plans)
        spent_ms = self.latency.spent(self._plans) if self.latency else 0.0
        if self.action_mode == "relative":
            fair = self.fair_ratio(t, spent, spent_ms, family)
            wanted = float(np.clip(relative_action_to_ratio(a, fair), low, high))
        else:
            wanted = action_to_ratio(a, low, high)
        floor, wall = self.floor(t, spent, spent_ms, family), self.wall(t, spent, spent_ms, family)
        ratio = min(max(wanted, floor), wall)
        self._plans.append(self.plan_step(t, ratio, family))
        self._prev_ratio = ratio
        self._t += 1
        info: dict[str, Any] = {"layer": self.steps[t].name, "ratio": ratio, "wanted_ratio": wanted}
        if family is not None:
            info["family"] = family
        if self._t < len(self.steps):
            return self._observation(), 0.0, False, False, info

        plans = self.layer_plans(self._plans)
        if self.evaluator is None:  # the caller prices the strategy: outcome() gives its reward
            reward = 0.0
            info.update(plans=plans, budget=self.budget, pending=True)
        else:
            reward, outcome = self.outcome(plans, self.evaluator(plans), self.budget)
            info.update(outcome)
        # the terminal observation: the last layer's features with the final accounting
        self._t = len(self.steps) - 1
        obs = self._observation()
        self._t = len(self.steps)
        return obs, float(reward), True, False, info
