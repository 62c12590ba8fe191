"""Tensor-train (``tt``) and tensor-ring (``tr``) convolutions and linear layers: shapes, exactness, cost,
files, search."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import rlrank
from rlrank import models
from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache
from rlrank.flops import count_model, flop_counter_macs
from rlrank.methods import DecompositionError, TRConv, TTConv, get_method, list_methods
from rlrank.methods.tensor_network import (
    MEMO_SIZE,
    SharedConv,
    channel_modes,
    kernel_tensor,
    mode_sizes,
    tensor_kernel,
)
from rlrank.models import ModelSpec, build_model
from rlrank.planning import (
    LayerPlan,
    current_macs,
    current_params,
    full_ranks,
    is_compressible,
    method_for,
    plan_layer,
    ratio_to_ranks,
)
from rlrank.runlog import read_rows
from rlrank.search import main
from rlrank.surgery import decompose_model, empty_factorized, factorization_of, replace_module

pytestmark = pytest.mark.usefixtures("single_thread")

METHODS = ["tt", "tr"]
FORMS = {"tt": TTConv, "tr": TRConv}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


LAYERS = {
    "3x3-stride2-pad2-dil2-bias": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2), (6, 11, 11)),
    "3x3-16to32": (lambda: nn.Conv2d(16, 32, 3, padding=1, bias=False), (16, 6, 6)),
    "3x5-prime-channels": (lambda: nn.Conv2d(5, 7, (3, 5), stride=(1, 2), padding=(1, 2)), (5, 8, 9)),
    "in1": (lambda: nn.Conv2d(1, 8, 3, padding=1), (1, 7, 7)),
    "wide-in-12to18": (lambda: nn.Conv2d(12, 18, 3, padding=1), (12, 6, 6)),
}


def _layer(key: str) -> tuple[nn.Sequential, tuple[int, int, int]]:
    make, shape = LAYERS[key]
    model = nn.Sequential(make()).double()
    if model[0].bias is not None:
        with torch.no_grad():
            model[0].bias.normal_()
    return model, shape


# ------------------------------------------------------------------------------------------
# Modes and ranks
# ------------------------------------------------------------------------------------------


def test_registered_after_the_low_rank_methods_before_pruning() -> None:
    assert list_methods()[-3:] == ["tt", "tr", "prune"]


def test_channel_modes() -> None:
    cases = {64: (8, 8), 32: (8, 4), 16: (4, 4), 12: (4, 3), 512: (32, 16), 3: (3,), 7: (7,), 1: (1,)}
    assert {n: channel_modes(n) for n in cases} == cases


def test_kernel_tensor_round_trip() -> None:
    geometry = {"in_channels": 12, "out_channels": 32, "kernel": (3, 5)}
    weight = torch.randn(32, 12, 3, 5)
    tensor = kernel_tensor(weight, geometry)
    assert mode_sizes(geometry) == ((4, 3), 15, (4, 8)) and tensor.shape == (4, 3, 15, 4, 8)
    # n_1 is the fastest-varying factor of the input channel, m_1 the slowest of the output channel
    assert tensor[1, 2, 7, 3, 5] == weight.flatten(2)[3 * 8 + 5, 2 * 4 + 1, 7]
    assert torch.equal(tensor_kernel(tensor, geometry), weight)


def test_full_ranks() -> None:
    (layer,) = describe_layers(nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)), (64, 4, 4))
    assert full_ranks(layer, "tt") == (8, 64, 64, 8)  # ranks of the sequential unfoldings
    # r_0 = ceil(sqrt(8)), r_1 = 8, r_k = min(r_{k-1} n_k, r_0 n_{k+1}..n_D)
    assert full_ranks(layer, "tr") == (3, 8, 64, 3 * 64, 3 * 8)
    (prime,) = describe_layers(nn.Sequential(nn.Conv2d(5, 7, 3)), (5, 6, 6))
    assert full_ranks(prime, "tt") == (5, 7) and full_ranks(prime, "tr") == (3, 5, 21)


# ------------------------------------------------------------------------------------------
# Exactness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", sorted(LAYERS))
def test_full_rank_reproduces_the_layer(key: str, method: str) -> None:
    model, shape = _layer(key)
    (layer,) = describe_layers(model, shape)
    cache = FactorCache(model, [layer], method)
    plan = LayerPlan(layer.name, 1.0, method, full_ranks(layer, method), 0, 0)
    decomposed = decompose_model(model, [plan], cache)
    assert isinstance(decomposed[0], FORMS[method]) and decomposed[0].method == method
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(decomposed(x), model(x)) < 1e-12
        assert _rel(decomposed[0].effective_weight(), model[0].weight) < 1e-12
    if model[0].bias is not None:
        assert torch.equal(decomposed[0].effective_bias(), model[0].bias)


@pytest.mark.parametrize("method", METHODS)
def test_forward_is_the_convolution_with_the_effective_weight(method: str) -> None:
    """Any weights (random, ring rank 2): running the chain equals convolving with its kernel."""
    conv = nn.Conv2d(12, 32, 3, stride=2, padding=1, dilation=1)
    geometry = {
        "kind": "conv", "in_channels": 12, "out_channels": 32, "kernel": (3, 3), "stride": (2, 2),
        "padding": (1, 1), "dilation": (1, 1), "bias": True,
    }  # fmt: skip
    ranks = (3, 5, 4, 6) if method == "tt" else (2, 3, 5, 4, 6)
    module = get_method(method).build_module(geometry, ranks).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = F.conv2d(x, module.effective_weight(), module.effective_bias(), (2, 2), (1, 1))
        assert _rel(module(x), expected) < 1e-12
    assert module.dense_geometry() == geometry
    assert module.effective_weight().shape == conv.weight.shape


def test_tt_error_is_within_the_tt_svd_bound() -> None:
    """TT-SVD: squared error at most the sum of the discarded squared singular values of every unfolding."""
    model, shape = _layer("3x3-16to32")
    (layer,) = describe_layers(model, shape)
    cache = FactorCache(model, [layer], "tt")
    weight = model[0].weight.detach()
    spectra = [s.values for s in cache.spectra(layer.name)]
    assert [len(v) for v in spectra] == list(full_ranks(layer, "tt"))
    errors = []
    for ratio in (1.0, 0.7, 0.5, 0.3, 0.1):
        ranks = ratio_to_ranks(ratio, full_ranks(layer, "tt"))
        error = (
            cache.build(layer.name, ranks, dtype=torch.float64).effective_weight().detach() - weight
        ).norm()
        bound = math.sqrt(sum(float((v[r:] ** 2).sum()) for v, r in zip(spectra, ranks, strict=True)))
        assert error <= bound + 1e-9
        errors.append(error.item() / weight.norm().item())
    assert errors[0] < 1e-12 and errors == sorted(errors) and errors[-1] > 0.5


def test_tr_error_falls_with_the_ratio() -> None:
    model, shape = _layer("wide-in-12to18")
    (layer,) = describe_layers(model, shape)
    cache = FactorCache(model, [layer], "tr")
    weight = model[0].weight.detach()
    errors = [
        _rel(cache.build(layer.name, ratio_to_ranks(r, full_ranks(layer, "tr")), dtype=torch.float64)
             .effective_weight().detach(), weight)
        for r in (1.0, 0.75, 0.5, 0.25)
    ]  # fmt: skip
    assert errors[0] < 1e-12 and errors == sorted(errors) and errors[-1] > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_factors_are_memoized_per_ranks(method: str) -> None:
    model, shape = _layer("3x3-16to32")
    (layer,) = describe_layers(model, shape)
    cache = FactorCache(model, [layer], method)
    ranks = ratio_to_ranks(0.5, full_ranks(layer, method))
    assert cache.factors(layer.name, ranks) is cache.factors(layer.name, ranks)
    full = full_ranks(layer, method)
    for r in range(1, MEMO_SIZE + 2):
        cache.factors(layer.name, tuple(min(r, f) for f in full))
    assert len(cache.entry(layer.name).store["memo"]) == MEMO_SIZE
    with pytest.raises(DecompositionError, match="out of range"):
        cache.factors(layer.name, tuple(f + 1 for f in full))


# ------------------------------------------------------------------------------------------
# Cost
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", sorted(LAYERS))
def test_macs_and_params_match_the_built_module(key: str, method: str) -> None:
    model, shape = _layer(key)
    (layer,) = describe_layers(model, shape)
    priced = get_method(method)
    full = full_ranks(layer, method)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ranks = tuple(int(torch.randint(1, f + 1, (1,), generator=g)) for f in full)
        module = nn.Sequential(empty_factorized(model[0], method, ranks))
        reference = flop_counter_macs(module, shape)
        assert priced.macs(layer, ranks) == reference == count_model(module, shape).macs
        assert priced.params(layer, ranks) == sum(p.numel() for p in module.parameters())
        (described,) = describe_layers(module, shape)
        assert described.ranks == ranks and current_macs(described) == reference
        assert current_params(described) == priced.params(layer, ranks)
        assert module[0].core.groups == (ranks[0] if method == "tr" else 1)


def test_shared_convolution_is_counted_as_grouped() -> None:
    conv = SharedConv(4, 6, 3, {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)})
    assert conv.weight.shape == (6, 4, 3, 3)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (12, 18, 3)
    assert flop_counter_macs(nn.Sequential(conv), (12, 5, 5)) == 3 * 6 * 4 * 9 * 25
    x = torch.randn(1, 12, 5, 5)
    with torch.no_grad():
        per_group = [F.conv2d(part, conv.weight, padding=1) for part in x.split(4, dim=1)]
        assert torch.allclose(conv(x), torch.cat(per_group, 1))


@pytest.mark.parametrize("method", METHODS)
def test_resnet_layers_are_compressible_and_pointwise_ones_use_the_method_too(method: str) -> None:
    model = build_model(ModelSpec("resnet20", num_classes=10, input_size=32))
    layers = describe_layers(model, (3, 32, 32))
    assert all(is_compressible(layer, method) for layer in layers)
    assert any(layer.kind == "linear" for layer in layers)
    for layer in layers:
        assert method_for(layer, method) == method
        for other in ("tucker2", "cp"):  # not pointwise methods: SVD there, as before
            assert method_for(layer, other) == ("svd" if layer.is_pointwise else other)
        plan = plan_layer(layer, 0.3, method)
        assert plan.method == method_for(layer, method) and plan.macs < layer.macs


@pytest.mark.parametrize("method", METHODS)
def test_bad_layers_and_rank_counts_are_refused(method: str) -> None:
    pointwise = {
        "kind": "conv", "in_channels": 8, "out_channels": 8, "kernel": (1, 1), "stride": (1, 1),
        "padding": (0, 0), "dilation": (1, 1), "bias": False,
    }  # fmt: skip
    with pytest.raises(DecompositionError, match="convolutions and linear layers only"):
        get_method(method).build_module({**pointwise, "kind": "pool"}, (2,) * 5)
    assert get_method(method).pointwise
    for other in ("tucker2", "cp"):
        assert not get_method(other).pointwise
        with pytest.raises(DecompositionError, match="1x1 convolutions are factorized by svd"):
            empty_factorized(nn.Conv2d(8, 8, 1), other, (2, 2))
        with pytest.raises(DecompositionError, match="linear layers are factorized by svd"):
            empty_factorized(nn.Linear(8, 8), other, (2, 2))
    with pytest.raises(DecompositionError, match="bond ranks"):
        empty_factorized(nn.Conv2d(8, 8, 1), method, (2,) * 7)
    with pytest.raises(DecompositionError, match="bond ranks"):
        empty_factorized(nn.Conv2d(8, 8, 3), method, (2,) * 7)
    (layer,) = describe_layers(nn.Sequential(nn.Conv2d(8, 8, 3)), (8, 5, 5))
    for wrong in ((2,), (2,) * 7):
        for price in (get_method(method).macs, get_method(method).params):
            with pytest.raises(DecompositionError, match="bond ranks expected"):
                price(layer, wrong)


# ------------------------------------------------------------------------------------------
# Linear layers and 1x1 convolutions
# ------------------------------------------------------------------------------------------

POINTWISE = {
    "linear-12to18-bias": (lambda: nn.Linear(12, 18), (12,)),
    "linear-prime-7to10": (lambda: nn.Linear(7, 10, bias=False), (7,)),
    "1x1-16to32-stride2-bias": (lambda: nn.Conv2d(16, 32, 1, stride=2), (16, 5, 5)),
    "1x1-12to8": (lambda: nn.Conv2d(12, 8, 1, bias=False), (12, 4, 4)),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", sorted(POINTWISE))
def test_pointwise_layers_full_rank_and_costs(key: str, method: str) -> None:
    make, shape = POINTWISE[key]
    model = nn.Sequential(make()).double()
    if model[0].bias is not None:
        with torch.no_grad():
            model[0].bias.normal_()
    (layer,) = describe_layers(model, shape)
    assert layer.is_pointwise and method_for(layer, method) == method and is_compressible(layer, method)
    cache = FactorCache(model, [layer], method)
    plan = LayerPlan(layer.name, 1.0, method, full_ranks(layer, method), 0, 0)
    full = decompose_model(model, [plan], cache)
    assert isinstance(full[0], FORMS[method]) and full[0].dense_geometry() == {
        k: getattr(layer, k) for k in full[0].dense_geometry()
    }
    assert full[0].linear == (layer.kind == "linear")
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert full(x).shape == model(x).shape and _rel(full(x), model(x)) < 1e-12
        assert full[0].effective_weight().shape == model[0].weight.shape
        assert _rel(full[0].effective_weight(), model[0].weight) < 1e-12
    for ratio in (0.2, 0.5):
        plan = plan_layer(layer, ratio, method)
        if plan.dense:
            continue
        decomposed = decompose_model(model, [plan], cache)
        macs = flop_counter_macs(decomposed, shape)
        assert (
            macs
            == count_model(decomposed, shape).macs
            == plan.macs
            == current_macs(describe_layers(decomposed, shape)[0])
        )
        assert (
            sum(p.numel() for p in decomposed.parameters())
            == plan.params
            == count_model(decomposed, shape).params
        )


@pytest.mark.parametrize("method", METHODS)
def test_linear_module_keeps_leading_dimensions(method: str) -> None:
    geometry = {
        "kind": "linear", "in_channels": 12, "out_channels": 18, "kernel": (1, 1), "stride": (1, 1),
        "padding": (0, 0), "dilation": (1, 1), "bias": True,
    }  # fmt: skip
    ranks = (3, 4, 1, 5) if method == "tt" else (2, 3, 4, 1, 5)
    module = get_method(method).build_module(geometry, ranks).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        x = torch.randn(2, 5, 12, dtype=torch.float64)
        expected = F.linear(x, module.effective_weight(), module.effective_bias())
        assert module(x).shape == (2, 5, 18) and _rel(module(x), expected) < 1e-12
    assert module.dense_geometry() == geometry


def _pointwise_net(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, pretrained: bool = False
) -> nn.Module:
    """A 3x3 convolution, a 1x1 convolution and a linear layer."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


@pytest.mark.parametrize("method", METHODS)
def test_pointwise_layers_save_and_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    monkeypatch.setitem(models._REGISTRY, "pointwise_net", _pointwise_net)
    spec = ModelSpec("pointwise_net", num_classes=10, in_channels=3, input_size=8)
    model = build_model(spec).eval()
    shape = (3, 8, 8)
    layers = describe_layers(model, shape)
    plans = [plan_layer(layer, 0.4, method, allow_dense=False) for layer in layers]
    compressed = decompose_model(model, plans, FactorCache(model, layers, method)).eval()
    saved = factorization_of(compressed)
    assert {name: entry["method"] for name, entry in saved.items()} == {"0": method, "2": method, "6": method}
    assert (
        flop_counter_macs(compressed, shape)
        == count_model(compressed, shape).macs
        == sum(plan.macs for plan in plans)
    )
    loaded = rlrank.load(rlrank.save(tmp_path / "model.pt", compressed, spec))
    assert factorization_of(loaded) == saved
    assert isinstance(loaded[6], FORMS[method]) and loaded[6].linear and not loaded[2].linear
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))


# ------------------------------------------------------------------------------------------
# Models: training, later stages, the model file
# ------------------------------------------------------------------------------------------


def _compressed(name: str, size: int, method: str, seed: int = 1) -> tuple[nn.Module, nn.Module, ModelSpec]:
    spec = ModelSpec(name, num_classes=10, in_channels=3, input_size=size)
    model = build_model(spec).eval()
    layers = [layer for layer in describe_layers(model, (3, size, size)) if is_compressible(layer, method)]
    g = torch.Generator().manual_seed(seed)
    ratios = torch.empty(len(layers)).uniform_(0.2, 0.6, generator=g).tolist()
    plans = [plan_layer(layer, r, method) for layer, r in zip(layers, ratios, strict=True)]
    return model, decompose_model(model, plans, FactorCache(model, layers, method)).eval(), spec


@pytest.mark.parametrize("method", METHODS)
def test_every_factor_trains(method: str) -> None:
    _, model, _ = _compressed("tiny", 8, method, seed=3)
    model.train()
    loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    named = {n: p for n, p in model.named_parameters() if n.split(".")[0] in ("conv1", "conv2", "conv3")}
    assert any(n.endswith("core.weight") for n in named)
    for name, p in named.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_a_later_stage_refactorizes_at_lower_ranks(method: str) -> None:
    _, stage1, _ = _compressed("tiny", 8, method)
    shape = (3, 8, 8)
    factorized = [layer for layer in describe_layers(stage1, shape) if layer.method == method]
    assert factorized
    cache = FactorCache(stage1, factorized, method)
    x = torch.randn(2, *shape)
    if method == "tt":  # TT-SVD of a tensor train at its own ranks is exact
        same = decompose_model(stage1, [], cache)
        for layer in factorized:
            replace_module(same, layer.name, cache.build(layer.name, layer.ranks))
        with torch.no_grad():
            assert _rel(same(x), stage1(x)) < 1e-4
    plans = [plan_layer(layer, 0.5, method) for layer in factorized]
    assert all(
        p.method == method and p.macs <= current_macs(f) for p, f in zip(plans, factorized, strict=True)
    )
    stage2 = decompose_model(stage1, plans, cache)
    assert (
        count_model(stage2, shape).macs == flop_counter_macs(stage2, shape) <= count_model(stage1, shape).macs
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, size", [("tiny", 8), ("resnet20", 32)])
def test_save_and_load_round_trip(tmp_path: Path, name: str, size: int, method: str) -> None:
    _, compressed, spec = _compressed(name, size, method)
    saved = factorization_of(compressed)
    assert method in {entry["method"] for entry in saved.values()}
    path = rlrank.save(tmp_path / "model.pt", compressed, spec)
    loaded = rlrank.load(path)
    assert factorization_of(loaded) == saved
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))


# ------------------------------------------------------------------------------------------
# A search end to end
# ------------------------------------------------------------------------------------------

FAST = [
    "--model", "tiny", "--flops", "0.5", "--episodes", "3", "--warmup", "1", "--dense-epochs", "1",
    "--final-epochs", "0.2", "--finetune-steps", "1", "--bn-batches", "1", "--no-latency", "--quiet",
]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_search_meets_its_budget(tmp_path: Path, method: str) -> None:
    """... and factorizes the linear layer ``fc`` with the method too (``--no-fill-budget``: the last
    layer, ``fc``, takes its own action instead of the budget left, which would keep it dense)."""
    wide = [
        "--action-center",
        "uniform",
        "--spread",
        "1",
        "--noise",
        "0.5",
        "--reserve",
        "0",
    ]  # reach fc's small ranks
    assert main([*FAST, *wide, "--no-fill-budget", "--decomposition", method, "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    report = json.loads((run / "report.json").read_text())
    assert report["decomposition"] == method and report["compressed"]["flops_ratio"] <= 0.5
    model, dense = rlrank.load(run / "model.pt"), rlrank.load(run / "dense.pt")
    shape = (1, 8, 8)
    assert (
        flop_counter_macs(model, shape)
        == report["compressed"]["macs"]
        <= 0.5 * count_model(dense, shape).macs
    )
    methods = {layer.name: layer.method for layer in describe_layers(model, shape)}
    assert method in methods.values() and set(methods.values()) <= {method, None}
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert rows and all(row["layers"]["fc"]["method"] in (method, None) for row in rows)
    if method == "tt":  # (with tr, fc stays dense at the ratios these 3 episodes give it)
        assert any(row["layers"]["fc"]["method"] == "tt" and row["layers"]["fc"]["ranks"] for row in rows)
    assert all(row["flops_ratio"] <= 0.5 for row in rows if not row["failed"])
