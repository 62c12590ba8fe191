"""Low-rank-aware training (ADMM): the projection is the factor cache's truncation, ADMM drives the
weights onto the chosen ranks, ``--admm-epochs`` works in a search with every method and stage; the
fine-tune after a stage keeps its best epoch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rlrank.admm import AdmmConfig, AdmmPull, decomposition_errors, rank_projections
from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache
from rlrank.methods import list_methods
from rlrank.planning import LayerPlan, full_ranks, is_compressible, plan_layer
from rlrank.search import main
from rlrank.surgery import decompose_model

BASE = [
    "--model", "tiny", "--warmup", "2", "--dense-epochs", "1", "--final-epochs", "0.5", "--stage-epochs", "0.5",
    "--finetune-steps", "2", "--bn-batches", "1", "--quiet", "--no-latency", "--threads", "1",
]  # fmt: skip


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 10, 3, padding=1))


def plans_at(model: nn.Module, ratio: float, decomposition: str):
    layers = describe_layers(model, (8, 6, 6))
    steps = [layer for layer in layers if is_compressible(layer, decomposition)]
    return layers, steps, [plan_layer(layer, ratio, decomposition, allow_dense=False) for layer in steps]


@pytest.mark.parametrize("decomposition", ["tucker2", "svd", "cp", "tt", "tr"])
def test_projection_is_the_factor_caches_truncation(decomposition: str) -> None:
    model = small_net()
    layers, steps, plans = plans_at(model, 0.5, decomposition)
    projections = rank_projections(model, layers, plans, AdmmConfig(), decomposition)
    decomposed = decompose_model(model, plans, FactorCache(model, steps, decomposition))
    for plan in plans:
        want = decomposed.get_submodule(plan.name).effective_weight()
        torch.testing.assert_close(projections[plan.name], want, rtol=1e-4, atol=1e-5)
    shifted = rank_projections(
        model,
        layers,
        plans,
        AdmmConfig(),
        decomposition,
        {p.name: torch.zeros_like(projections[p.name]) for p in plans},
    )
    for plan in plans:
        torch.testing.assert_close(shifted[plan.name], projections[plan.name])


def test_pruning_projection_zeroes_the_dropped_input_channels() -> None:
    """ADMM toward a pruning plan: ``Z`` is ``W`` with all but the ``k`` input channels of largest
    norm zeroed (the Euclidean projection onto that set), the cache's plain slice without data."""
    model = small_net()
    layers, steps, plans = plans_at(model, 0.5, "prune")
    (plan,) = plans  # the second convolution, whose input channels the first one makes
    (kept,) = plan.ranks
    shift = {plan.name: 0.1 * torch.randn(10, 12, 3, 3)}
    (z,) = rank_projections(model, layers, plans, AdmmConfig(), "prune", shift).values()
    w = model.get_submodule(plan.name).weight.detach() + shift[plan.name]
    norms = w.pow(2).sum(dim=(0, 2, 3))
    top = norms.argsort(descending=True)[:kept]
    zero = torch.ones(12, dtype=torch.bool)
    zero[top] = False
    assert torch.equal(z[:, zero], torch.zeros_like(z[:, zero]))
    torch.testing.assert_close(z[:, ~zero], w[:, ~zero])
    built = FactorCache(model, steps, "prune", weights={plan.name: w}).build(plan.name, plan.ranks)
    torch.testing.assert_close(built.effective_weight(), z)


def test_decomposition_error_is_zero_at_full_rank_and_grows_as_ranks_fall() -> None:
    model = small_net()
    _, steps, _ = plans_at(model, 1.0, "tucker2")
    full = [LayerPlan(layer.name, 1.0, "tucker2", full_ranks(layer, "tucker2"), 0, 0) for layer in steps]
    cache = FactorCache(model, steps, "tucker2")
    assert max(decomposition_errors(cache, full).values()) < 1e-6
    _, _, half = plans_at(model, 0.5, "tucker2")
    _, _, quarter = plans_at(model, 0.25, "tucker2")
    for name, error in decomposition_errors(cache, half).items():
        assert 0.05 < error < decomposition_errors(cache, quarter)[name]


def test_admm_drives_the_weights_onto_the_chosen_ranks_while_fitting() -> None:
    """A regression whose exact solution is far from rank r: ADMM ends on rank r and still fits."""
    model = small_net()
    layers, _, plans = plans_at(model, 0.5, "tucker2")
    target = small_net()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inputs = torch.randn(256, 8, 6, 6)
    with torch.no_grad():
        outputs = target(inputs)
    steps_per_epoch, epochs = 20, 30
    pull = AdmmPull(model, layers, plans, AdmmConfig(rho=0.01, rho_growth=1.3), "tucker2", steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps_per_epoch * epochs):
        loss = nn.functional.mse_loss(model(inputs), outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pull(step)
    with torch.no_grad():
        fitted = float(nn.functional.mse_loss(model(inputs), outputs))
    steps = [layer for layer in layers if any(p.name == layer.name for p in plans)]
    errors = decomposition_errors(FactorCache(model, steps, "tucker2"), plans)
    assert max(errors.values()) < 0.01, errors
    assert pull.residual() < 1e-4
    with torch.no_grad():
        untrained = float(nn.functional.mse_loss(small_net()(inputs), outputs))
    assert fitted < 0.5 * untrained  # and it still fits the data
    before = decomposition_errors(FactorCache(target, steps, "tucker2"), plans)
    assert min(before.values()) > 0.3  # the unconstrained solution is far from rank r


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    assert (
        main([*BASE, "--agent", "uniform", "--flops", "0.9", "--final-epochs", "0", "--out", str(out)]) == 0
    )
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run / "dense.pt"


@pytest.mark.parametrize("decomposition", list_methods())
def test_admm_epochs_in_a_search_shrink_the_decomposition_error(
    tmp_path, dense_checkpoint, decomposition
) -> None:
    args = [*BASE, "--agent", "uniform", "--flops", "0.5", "--checkpoint", str(dense_checkpoint)]
    args += [
        "--decomposition",
        decomposition,
        "--admm-epochs",
        "3",
        "--admm-rho",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    (result_file,) = tmp_path.glob("*/stage-1/result.json")
    result = json.loads(result_file.read_text())
    assert result["admm_epochs"] == 3
    assert result["decomposition_error"] < 0.1 * result["decomposition_error_before_admm"], result


def test_admm_in_a_multi_stage_run_and_without_it(tmp_path, dense_checkpoint) -> None:
    args = [*BASE, "--agent", "random", "--episodes", "2", "--flops", "0.4", "--stages", "2"]
    args += ["--checkpoint", str(dense_checkpoint), "--admm-epochs", "2", "--admm-rho", "0.05"]
    assert main([*args, "--out", str(tmp_path / "admm")]) == 0
    first, second = [
        json.loads(f.read_text()) for f in sorted((tmp_path / "admm").glob("*/stage-*/result.json"))
    ]
    assert first["decomposition_error"] < first["decomposition_error_before_admm"]
    # stage 1 factorized every layer: stage 2 has no dense weight left for ADMM and decomposes directly
    assert second["admm_epochs"] == 0 and second["decomposition_error_before_admm"] is None
    plain = [*BASE, "--agent", "uniform", "--flops", "0.5", "--checkpoint", str(dense_checkpoint)]
    assert main([*plain, "--out", str(tmp_path / "plain")]) == 0
    (result_file,) = (tmp_path / "plain").glob("*/stage-1/result.json")
    result = json.loads(result_file.read_text())
    assert result["admm_epochs"] == 0 and result["decomposition_error_before_admm"] is None
    assert 0 < result["decomposition_error"] < 1


def test_bad_admm_options_are_refused(capsys) -> None:
    for bad in (
        ["--admm-rho", "0"],
        ["--admm-rho-growth", "0.5"],
        ["--admm-epochs", "-1"],
        ["--admm-updates", "0"],
    ):
        assert main([*bad, "--dry-run"]) == 2
        assert "--admm" in capsys.readouterr().err


def test_the_final_fine_tune_keeps_its_best_epoch(caplog) -> None:
    """After every epoch the model is scored on validation; a last epoch that made it worse is undone."""
    import logging

    from rlrank.data import DataConfig, load_data
    from rlrank.finetune import TrainConfig, evaluate, train_epochs
    from rlrank.models import ModelSpec, build_model

    data = load_data(DataConfig("digits", val_size=0.2, seed=0))
    torch.manual_seed(0)
    model = build_model(ModelSpec("tiny", data.num_classes, data.in_channels, data.input_size))
    steps_per_epoch = -(-len(data.train) // 64)
    total = 3 * steps_per_epoch

    def spoil_at_the_end(step: int) -> None:
        if step == total - 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.0)

    caplog.set_level(logging.INFO, logger="rlrank.finetune")
    train_epochs(
        model, data, TrainConfig(epochs=3, lr=0.05, batch_size=64), torch.Generator().manual_seed(0),
        progress=False, after_step=spoil_at_the_end, keep_best=data.val,
    )  # fmt: skip
    measured = [float(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records if "val accuracy" in r.getMessage()
                and r.getMessage().startswith("epoch")]  # fmt: skip
    assert len(measured) == 3 and measured[-1] < max(measured)
    assert evaluate(model, data, data.val)[0] == pytest.approx(max(measured), abs=1e-4)
    assert any("kept the weights of epoch" in r.getMessage() for r in caplog.records)
