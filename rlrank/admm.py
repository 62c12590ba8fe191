"""Low-rank-aware training (ADMM): train a model so that the chosen layers become low-rank before they
are decomposed, so that the decomposition loses (almost) nothing.

For every planned dense layer with weight ``W`` and chosen ranks ``r``, ADMM keeps an auxiliary
``Z`` (the rank-``r`` projection, computed with the very truncation the factor cache uses,
:class:`~rlrank.factor_cache.FactorCache`) and a scaled dual ``U``, and trains on the task loss plus
``rho / 2 * ||W - Z + U||^2``; ``updates`` times per epoch ``Z <- proj_r(W + U)`` and
``U <- U + W - Z``. The ADMM term is applied as a *decoupled* step after every optimizer step,
``W <- W - rho * (W - Z + U)`` (its gradient step at learning rate 1, as AdamW decouples weight
decay): a coupled penalty moves ``W`` by ``lr * rho`` per step, far too little between two
``Z`` updates at the learning rates of a fine-tune, and ADMM with such inexact ``W`` steps diverges
(the dual grows while ``W`` stays put; measured in ``tests/test_admm.py``). ``rho`` grows by
``rho_growth`` per epoch, capped at 0.5, so ``W`` ends on the rank-``r`` set. Layers an earlier
stage already factorized are left to the fine-tune (their weights are factors, not ``W``).

With ``--sparse`` a plan keeps ``k`` whole filters besides its ranks, and ``Z`` is the projection
onto that set, {rank ``r`` + ``k`` whole filters}: ``alternations`` rounds of ``L = proj_r(V - S)``,
``S`` = the ``k`` filters of ``V - L`` with the largest norm (``V = W + U``; the factor cache's
``build(..., filters=k)`` with ``alternations``); the stage decomposes the trained model with the
same projection, so that what ADMM trained toward is what the model becomes.

With channel pruning (``--decomposition prune``) the set is {``W`` with only ``k`` input channels
non-zero}: ``Z`` keeps the ``k`` channels of ``W + U`` with the largest norm and zeroes the rest (the
cache's pruning without data: kernel-norm ranking, slices unchanged), and the stage then prunes the
trained layer to those channels, its producer's outputs with them.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rlrank.data import DataSplits
from rlrank.describe import effective_weight
from rlrank.factor_cache import FactorCache
from rlrank.finetune import TrainConfig, train_epochs
from rlrank.layers import LayerInfo
from rlrank.methods import FactorizedLayer
from rlrank.planning import LayerPlan

logger = logging.getLogger(__name__)


@dataclass
class AdmmConfig:
    """ADMM settings.

    Attributes:
        rho: Initial weight of the ADMM term: the fraction of the way to ``Z - U`` each optimizer
            step moves the weights.
        rho_growth: Factor ``rho`` grows by per epoch (spread evenly over the epoch's updates).
        updates: ``Z`` / ``U`` updates per epoch.
        hooi_iters: HOOI sweeps of the Tucker-2 projection (as the factor cache's).
        cp_iters: ALS iterations of the CP projection.
        seed: Seed of CP's initialization.
        alternations: Rounds of the low-rank / sparse alternation projecting a plan with sparse
            filters (``--sparse``), in every ``Z`` update and in the decomposition after ADMM.
    """

    rho: float = 1e-3
    rho_growth: float = 3.0
    updates: int = 4
    hooi_iters: int = 0
    cp_iters: int = 50
    seed: int = 0
    alternations: int = 2


def rank_projections(
    model: nn.Module,
    layers: Iterable[LayerInfo],
    plans: Sequence[LayerPlan],
    config: AdmmConfig,
    decomposition: str,
    shift: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each planned layer's weight (plus ``shift``) projected to its chosen ranks, as the factor
    cache truncates it: the effective weight of the factorization ``decompose_model`` would build."""
    planned = {plan.name: plan for plan in plans if not plan.dense}
    by_name = {layer.name: layer for layer in layers}
    weights = None
    if shift is not None:
        with torch.no_grad():
            weights = {name: effective_weight(model.get_submodule(name)) + shift[name] for name in planned}
    cache = FactorCache(
        model,
        [by_name[name] for name in planned],
        decomposition,
        hooi_iters=config.hooi_iters,
        cp_iters=config.cp_iters,
        seed=config.seed,
        weights=weights,
        alternations=config.alternations,
    )
    param = next(model.parameters())
    with torch.no_grad():
        return {
            name: cache.build(name, plan.ranks, param.device, param.dtype, plan.filters)
            .effective_weight()
            .detach()
            for name, plan in planned.items()
        }


def decomposition_errors(
    cache: FactorCache, plans: Sequence[LayerPlan], decomposed: nn.Module | None = None
) -> dict[str, float]:
    """Per planned layer of ``cache``, ``||W - proj_r(W)|| / ||W||``: what decomposing at the chosen
    ranks (and sparse filters) loses of the weight. ``decomposed``: the model ``decompose_model`` already built from
    ``cache`` with ``plans`` (its layers are read instead of being built again)."""
    errors = {}
    with torch.no_grad():
        for plan in plans:
            if plan.dense:
                continue
            w = cache.entry(plan.name).weight
            module = decomposed.get_submodule(plan.name) if decomposed is not None else None
            if not isinstance(module, FactorizedLayer):  # not given, or a pruned layer (unwrapped)
                module = cache.build(plan.name, plan.ranks, "cpu", torch.float64, plan.filters, plan.method)
            z = effective_weight(module).to("cpu", torch.float64)
            errors[plan.name] = float((w - z).norm() / w.norm().clamp_min(1e-12))
    return errors


def admm_train(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    plans: Sequence[LayerPlan],
    admm: AdmmConfig,
    train: TrainConfig,
    data: DataSplits,
    generator: torch.Generator,
    decomposition: str,
    teacher: nn.Module | None = None,
    desc: str = "ADMM training",
    progress: bool = True,
) -> nn.Module:
    """A copy of ``model`` trained ``train.epochs`` epochs with ADMM toward ``plans``' ranks.

    Raises:
        NumericalFault: The loss became non-finite.
    """
    trained = copy.deepcopy(model)
    steps_per_epoch = math.ceil(len(data.train) / train.batch_size)
    pull = AdmmPull(trained, layers, plans, admm, decomposition, steps_per_epoch)
    train_epochs(
        trained, data, train, generator, teacher=teacher, desc=desc, progress=progress, after_step=pull
    )
    logger.info("ADMM: the weights are %.2e of their energy away from the chosen ranks", pull.residual())
    return trained


def admm_layers(model: nn.Module, plans: Sequence[LayerPlan]) -> list[str]:
    """The planned layers ADMM trains: those still dense (a plain ``nn.Conv2d`` or ``nn.Linear``)."""
    return [
        plan.name
        for plan in plans
        if not plan.dense and isinstance(model.get_submodule(plan.name), (nn.Conv2d, nn.Linear))
    ]


class AdmmPull:
    """ADMM's ``Z`` / ``U`` state and its decoupled step, called after every optimizer step.

    Args:
        model: The model being trained.
        layers: The model's layers.
        plans: The chosen strategy (dense plans and already factorized layers are left alone).
        config: ADMM settings.
        decomposition: ``--decomposition``.
        steps_per_epoch: Training steps per epoch (the updates are spread over each epoch).
    """

    MAX_RHO = 0.5

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        plans: Sequence[LayerPlan],
        config: AdmmConfig,
        decomposition: str,
        steps_per_epoch: int,
    ) -> None:
        self.model, self.config, self.decomposition = model, config, decomposition
        self.layers = list(layers)
        self.names = admm_layers(model, plans)
        self.plans = [plan for plan in plans if plan.name in self.names]
        self.rho = min(config.rho, self.MAX_RHO)
        self.interval = max(1, steps_per_epoch // max(config.updates, 1))
        self.growth = config.rho_growth ** (self.interval / max(steps_per_epoch, 1))
        self.z = rank_projections(model, self.layers, self.plans, config, decomposition)
        self.u = {name: torch.zeros_like(z) for name, z in self.z.items()}

    def weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """The decoupled ADMM step; every ``interval`` steps also ``Z``, ``U`` and ``rho``."""
        for name in self.names:
            w = self.weight(name)
            w -= self.rho * (w - self.z[name] + self.u[name])
        if (step + 1) % self.interval:
            return
        self.z = rank_projections(
            self.model, self.layers, self.plans, self.config, self.decomposition, self.u
        )
        for name in self.names:
            self.u[name] += self.weight(name) - self.z[name]
        self.rho = min(self.rho * self.growth, self.MAX_RHO)

    @torch.no_grad()
    def residual(self) -> float:
        """``sum ||W - Z||^2 / sum ||W||^2``: how far the weights are from the rank-constrained set."""
        gap = sum(float(((self.weight(n) - self.z[n]) ** 2).sum()) for n in self.names)
        size = sum(float((self.weight(n) ** 2).sum()) for n in self.names)
        return gap / max(size, 1e-12)
