"""Sparse + low-rank layers (``--sparse F``, issue 16): the layer computes ``L + S``, ``S`` holds the
filters ``L`` misses most, the plans price it exactly and within the FLOP budget, and it saves, reloads,
folds BatchNorm, exports, trains with ADMM and runs in a search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_admm import small_net
from torch import nn
from torch.nn import functional as F

import rlrank
from rlrank.admm import AdmmConfig, AdmmPull, decomposition_errors, rank_projections
from rlrank.config import SearchConfig
from rlrank.describe import describe_layers
from rlrank.envs import Evaluation, RankSearchEnv
from rlrank.errors import ConfigError
from rlrank.export import export_model, load_exported
from rlrank.factor_cache import FactorCache
from rlrank.flops import count_model, flop_counter_macs
from rlrank.fusion import count_batchnorm, fuse_for_inference
from rlrank.inference import fastest_form
from rlrank.methods.sparse_residual import SparseResidualLayer, scatter_filters, top_filters
from rlrank.model_file import load_metadata, save
from rlrank.models import ModelSpec, build_model
from rlrank.planning import current_macs, current_params, full_ranks, is_compressible, method_for, plan_layer
from rlrank.preflight import validate
from rlrank.runlog import read_rows
from rlrank.search import build_parser, main
from rlrank.surgery import decompose_model, factorization_of

pytestmark = pytest.mark.usefixtures("single_thread")

GEOMETRIES = {
    "conv3x3-s2-pad-dil-bias": (nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True), (6, 11, 11)),
    "conv3x5-s1x2": (nn.Conv2d(4, 7, (3, 5), stride=(1, 2), padding=(1, 2), bias=False), (4, 9, 10)),
    "conv1x1": (nn.Conv2d(8, 12, 1, bias=True), (8, 5, 5)),
    "linear": (nn.Linear(12, 9), (12,)),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _single(key: str, decomposition: str = "tucker2"):
    """A one-layer model of ``GEOMETRIES[key]`` with random weights, its layer and its factor cache."""
    module, shape = GEOMETRIES[key]
    torch.manual_seed(0)
    model = nn.Sequential(type(module)(**_kwargs(module)))
    (layer,) = describe_layers(model, shape)
    return model, shape, layer, FactorCache(model, [layer], decomposition)


def _kwargs(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return dict(
            in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None
        )
    return dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=module.bias is not None,
    )


def _dense_forward(module: nn.Module, geometry_of: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a dense layer of ``geometry_of``'s geometry with ``module``'s effective weight computes."""
    weight, bias = module.effective_weight(), module.effective_bias()
    if isinstance(geometry_of, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, geometry_of.stride, geometry_of.padding, geometry_of.dilation)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("key", sorted(GEOMETRIES))
def test_at_full_rank_the_sparse_layer_reproduces_the_dense_layer(key: str) -> None:
    model, shape, layer, cache = _single(key)
    method = method_for(layer, "tucker2")
    built = cache.build(layer.name, full_ranks(layer, method), filters=3)
    assert isinstance(built, SparseResidualLayer) and built.filters == 3 and built.method == method
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert _rel(built(x), model(x)) < 1e-5


@pytest.mark.parametrize("key", sorted(GEOMETRIES))
def test_the_layer_computes_the_dense_layer_of_low_rank_plus_scattered_filters(key: str) -> None:
    model, shape, layer, cache = _single(key)
    built = cache.build(
        layer.name, tuple(1 for _ in full_ranks(layer, method_for(layer, "tucker2"))), filters=2
    )
    with torch.no_grad():  # sparse weights far from zero, so that adding them to the wrong channels shows
        built.sparse.weight.normal_()
        low = built.low_rank.effective_weight()
        scattered = scatter_filters(
            low.shape, built.filter_index, built.sparse.weight.reshape(2, *low.shape[1:])
        )
        torch.testing.assert_close(built.effective_weight(), low + scattered)
        x = torch.randn(3, *shape)
        torch.testing.assert_close(built(x), _dense_forward(built, model[0], x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(built(x), built.low_rank(x))


def test_top_filters_are_those_of_largest_norm() -> None:
    residual = torch.zeros(6, 2, 3, 3)
    for row, scale in zip((4, 1, 5), (3.0, 2.0, 1.0), strict=True):
        residual[row] = scale
    index, filters = top_filters(residual, 2)
    assert index.tolist() == [1, 4] and torch.equal(filters, residual[[1, 4]])
    assert torch.equal(
        scatter_filters(residual.shape, index, filters), residual.clone().index_fill_(0, torch.tensor([5]), 0)
    )


@pytest.mark.parametrize("key", ["conv3x3-s2-pad-dil-bias", "linear"])
def test_the_sparse_part_holds_the_largest_filters_of_the_residual_and_lowers_the_error(key: str) -> None:
    _, _, layer, cache = _single(key)
    ranks = tuple(max(1, f // 3) for f in full_ranks(layer, method_for(layer, "tucker2")))
    plain = cache.build(layer.name, ranks, dtype=torch.float64)
    built = cache.build(layer.name, ranks, dtype=torch.float64, filters=3)
    w = cache.entry(layer.name).weight
    residual = w - plain.effective_weight()
    want = residual.flatten(1).norm(dim=1).topk(3).indices.sort().values
    assert torch.equal(built.filter_index, want)
    torch.testing.assert_close(built.sparse.weight.reshape(3, *w.shape[1:]), residual[want])
    torch.testing.assert_close(built.low_rank.effective_weight(), plain.effective_weight())
    assert (w - built.effective_weight()).norm() < 0.999 * (w - plain.effective_weight()).norm()


# ------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("key", sorted(GEOMETRIES))
@pytest.mark.parametrize("decomposition", ["tucker2", "svd", "cp", "tt"])
def test_sparse_plans_price_the_built_module_as_flop_counter_mode_counts_it(
    key: str, decomposition: str
) -> None:
    model, shape, layer, cache = _single(key, decomposition)
    planned = 0
    for ratio in (0.1, 0.3, 0.5, 0.7):
        plan = plan_layer(layer, ratio, decomposition, sparse=0.4)
        if plan.dense:
            continue
        planned += plan.filters > 0
        compressed = decompose_model(model, [plan], cache)
        assert flop_counter_macs(compressed, shape) == count_model(compressed, shape).macs == plan.macs
        assert sum(p.numel() for p in compressed.parameters()) == plan.params
        (now,) = describe_layers(compressed, shape)
        assert (now.method, now.ranks, now.filters) == (plan.method, plan.ranks, plan.filters)
        assert current_macs(now) == plan.macs and current_params(now) == plan.params
    assert planned, "no ratio planned sparse filters"


@pytest.mark.parametrize("name,size", [("tiny", 8), ("resnet20", 32)])
def test_sparse_plans_never_cost_more_than_plain_ones_and_grow_with_the_ratio(name: str, size: int) -> None:
    model = build_model(ModelSpec(name, 10, 3, size))
    layers = [layer for layer in describe_layers(model, (3, size, size)) if is_compressible(layer, "tucker2")]
    ratios = [i / 200 for i in range(1, 201)]
    filters = 0
    for layer in layers:
        previous = 0
        for ratio in ratios:
            plain = plan_layer(layer, ratio, "tucker2")
            assert plan_layer(layer, ratio, "tucker2", sparse=0.0) == plain and plain.filters == 0
            sparse = plan_layer(layer, ratio, "tucker2", sparse=0.3)
            assert sparse.macs <= plain.macs and sparse.dense == plain.dense
            assert sparse.macs >= previous, (layer.name, ratio)  # the walls bisect on this
            previous = sparse.macs
            filters += sparse.filters
    assert filters > 0


def test_an_episode_with_sparse_filters_stays_within_the_flop_budget() -> None:
    model = build_model(ModelSpec("tiny", 10, 1, 8)).eval()
    layers = describe_layers(model, (1, 8, 8))
    env = RankSearchEnv(layers, lambda plans: Evaluation(accuracy=0.5), budget=0.4, reserve=0.5, sparse=0.3)
    cache = FactorCache(model, env.steps, "tucker2")
    dense = count_model(model, (1, 8, 8)).macs
    rng = torch.Generator().manual_seed(0)
    filters = 0
    for _ in range(6):
        env.reset()
        done = False
        while not done:
            _, _, done, _, info = env.step((torch.rand(1, generator=rng) * 2 - 1).numpy())
        assert info["flops_ratio"] <= 0.4 + 1e-12
        filters += sum(p.filters for p in info["plans"])
        assert count_model(decompose_model(model, info["plans"], cache), (1, 8, 8)).macs <= 0.4 * dense
    assert filters > 0


# ------------------------------------------------------------------------------------------ model file, BN, export


def _sparse_tiny() -> tuple[nn.Module, ModelSpec]:
    """The tiny model (random BatchNorm statistics) with every layer sparse + low-rank at ratio 0.5."""
    spec = ModelSpec("tiny", 10, 1, 8)
    model = build_model(spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.2, 2.0, generator=gen)
                m.weight.normal_(generator=gen)
                m.bias.normal_(generator=gen)
    layers = [layer for layer in describe_layers(model, (1, 8, 8)) if is_compressible(layer, "tucker2")]
    plans = [plan_layer(layer, 0.5, "tucker2", sparse=0.3) for layer in layers]
    assert all(p.filters > 0 for p in plans)
    return decompose_model(model, plans, FactorCache(model, layers, "tucker2")).eval(), spec


def test_a_saved_sparse_model_reloads_to_identical_outputs(tmp_path: Path) -> None:
    model, spec = _sparse_tiny()
    save(tmp_path / "m.pt", model, spec)
    factorized = load_metadata(tmp_path / "m.pt")["factorized"]
    assert factorized == factorization_of(model) and set(factorized) == {"conv1", "conv2", "conv3", "fc"}
    assert all(entry["filters"] > 0 for entry in factorized.values())
    again = rlrank.load(tmp_path / "m.pt")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert torch.equal(again.conv3.filter_index, model.conv3.filter_index)


def test_folding_batchnorm_scales_both_parts_of_a_sparse_layer() -> None:
    model, _ = _sparse_tiny()
    fused = fuse_for_inference(model)
    assert count_batchnorm(model) == 3 and count_batchnorm(fused) == 0
    assert isinstance(fused.conv2, SparseResidualLayer) and fused.conv2.low_rank.last.bias is not None
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Warning. ONNX export does not support duplicated values")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_sparse_model_exports_and_matches(fmt: str, tmp_path: Path) -> None:
    model, _ = _sparse_tiny()
    result = export_model(model, tmp_path / f"m.{fmt}", fmt, (1, 8, 8), batch=2)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    x = torch.randn(7, 1, 8, 8)  # another batch size than the export's
    with torch.no_grad():
        torch.testing.assert_close(load_exported(result.path, fmt)(x)[0], model(x), rtol=1e-4, atol=1e-5)


def test_the_fastest_form_regroups_the_low_rank_part_and_keeps_the_outputs() -> None:
    model, _ = _sparse_tiny()
    fast = fastest_form(model, (1, 8, 8), batch=2, rounds=2)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ ADMM


def test_admm_projects_onto_low_rank_plus_whole_filters_and_drives_the_weights_there() -> None:
    model = small_net()
    layers = describe_layers(model, (8, 6, 6))
    plans = [plan_layer(layer, 0.5, "tucker2", allow_dense=False, sparse=0.5) for layer in layers]
    assert all(p.filters > 0 for p in plans)
    config = AdmmConfig(rho=0.01, rho_growth=1.3)
    # the projection is the factor cache's sparse + low-rank split, with ADMM's alternations
    projections = rank_projections(model, layers, plans, config, "tucker2")
    cache = FactorCache(model, layers, "tucker2", alternations=config.alternations)
    for plan in plans:
        built = cache.build(plan.name, plan.ranks, filters=plan.filters)
        torch.testing.assert_close(projections[plan.name], built.effective_weight(), rtol=1e-4, atol=1e-5)
    target = small_net()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inputs = torch.randn(256, 8, 6, 6)
    with torch.no_grad():
        outputs = target(inputs)
    before = decomposition_errors(FactorCache(model, layers, "tucker2", alternations=2), plans)
    pull = AdmmPull(model, layers, plans, config, "tucker2", steps_per_epoch=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(20 * 30):
        loss = F.mse_loss(model(inputs), outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pull(step)
    assert pull.residual() < 1e-4
    after = decomposition_errors(FactorCache(model, layers, "tucker2", alternations=2), plans)
    for name, error in after.items():
        assert error < 0.05 < 0.5 < before[name], (after, before)


# ------------------------------------------------------------------------------------------ options, search

FAST = [
    "--model", "tiny", "--flops", "0.5", "--episodes", "5", "--warmup", "2", "--dense-epochs", "1",
    "--final-epochs", "0.5", "--finetune-steps", "2", "--bn-batches", "1", "--quiet", "--no-latency",
    "--threads", "1",
]  # fmt: skip


@pytest.mark.parametrize("bad", [["--sparse", "0.9"], ["--sparse", "-0.1"], ["--sparse", "a lot"]])
def test_a_bad_sparse_fraction_is_one_line_and_exit_code_2(bad, capsys) -> None:
    assert main([*bad, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sparse" in err[0] and "[0, 0.9)" in err[0]


def test_sparse_is_refused_with_a_latency_budget_and_out_of_range_in_the_api(capsys) -> None:
    assert main(["--sparse", "0.3", "--latency", "0.5", "--dry-run"]) == 2
    assert "--sparse" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--sparse"):
        validate(SearchConfig(sparse=0.95))
    validate(SearchConfig(sparse=0.3))


def test_help_describes_sparse() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--sparse F" in text and "sparse + low-rank layers" in text


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main([*FAST, "--sparse", "0.3", "--out", str(out)]) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def test_a_search_with_sparse_filters_meets_the_budget_and_its_model_reloads(sparse_run: Path) -> None:
    assert json.loads((sparse_run / "config.json").read_text())["sparse"] == 0.3
    rows = read_rows(sparse_run / "stage-1" / "episodes.jsonl")
    assert len(rows) == 5 and all(row["flops_ratio"] <= 0.5 + 1e-12 for row in rows)
    assert any(entry.get("filters", 0) > 0 for row in rows for entry in row["layers"].values())
    best = json.loads((sparse_run / "stage-1" / "best_strategy.json").read_text())
    model = rlrank.load(sparse_run / "model.pt")
    sparse = {name: m.filters for name, m in model.named_modules() if isinstance(m, SparseResidualLayer)}
    assert sparse == {entry["name"]: entry["filters"] for entry in best["layers"] if entry.get("filters")}
    dense = rlrank.load(sparse_run / "dense.pt")
    assert count_model(model, (1, 8, 8)).macs <= 0.5 * count_model(dense, (1, 8, 8)).macs
    assert sum(entry["macs"] for entry in best["layers"]) <= count_model(model, (1, 8, 8)).macs
    report = json.loads((sparse_run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.5
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_admm_with_sparse_filters_in_a_search_shrinks_the_decomposition_error(sparse_run, tmp_path) -> None:
    args = [*FAST, "--agent", "uniform", "--sparse", "0.3", "--checkpoint", str(sparse_run / "dense.pt")]
    args += ["--admm-epochs", "2", "--admm-rho", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    (result_file,) = tmp_path.glob("*/stage-1/result.json")
    result = json.loads(result_file.read_text())
    assert result["admm_epochs"] == 2
    assert result["decomposition_error"] < 0.1 * result["decomposition_error_before_admm"], result


def test_a_second_stage_refactorizes_sparse_layers_within_its_budget(sparse_run, tmp_path) -> None:
    args = [*FAST, "--agent", "uniform", "--sparse", "0.3", "--checkpoint", str(sparse_run / "dense.pt")]
    args += [
        "--flops",
        "0.4",
        "--stages",
        "2",
        "--stage-epochs",
        "0",
        "--final-epochs",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    first = rlrank.load(run / "stage-1" / "model.pt")
    second = rlrank.load(run / "model.pt")
    assert any(isinstance(m, SparseResidualLayer) for m in first.modules())
    assert any(isinstance(m, SparseResidualLayer) for m in second.modules())
    dense = count_model(rlrank.load(sparse_run / "dense.pt"), (1, 8, 8)).macs
    assert count_model(second, (1, 8, 8)).macs <= 0.4 * dense < count_model(first, (1, 8, 8)).macs
    assert (
        sum(current_macs(layer) for layer in describe_layers(second, (1, 8, 8)))
        == count_model(second, (1, 8, 8)).macs
    )
