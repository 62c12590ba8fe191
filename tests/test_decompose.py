"""Low-rank factorization (``rlrank.methods``), planning, the factor cache, model surgery and the model file."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import rlrank
from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache
from rlrank.flops import factorized_macs
from rlrank.methods import CPConv, DecompositionError, FactorizedLayer, SVDConv, SVDLinear, Tucker2Conv
from rlrank.model_file import load_metadata
from rlrank.models import ModelError, ModelSpec, build_model
from rlrank.planning import (
    LayerPlan,
    check_decomposition,
    current_macs,
    current_ratio,
    full_ranks,
    is_compressible,
    max_ratio_within,
    method_for,
    plan_layer,
    ratio_to_ranks,
)
from rlrank.surgery import decompose_model, factorization_of, replace_module

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


CP_WARNING = "ignore:Trying to compute SVD with n_eigenvecs"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _full_plan(layer, decomposition: str) -> LayerPlan:
    """A plan at full rank (``plan_layer`` would leave such a layer dense: it costs more)."""
    method = method_for(layer, decomposition)
    return LayerPlan(layer.name, 1.0, method, full_ranks(layer, method), 0, 0)


# ------------------------------------------------------------------------------------------
# Ratios and ranks
# ------------------------------------------------------------------------------------------


def test_ratio_one_gives_full_ranks() -> None:
    assert ratio_to_ranks(1.0, (64, 27)) == (64, 27)
    assert ratio_to_ranks(1, (5,)) == (5,)


def test_tiny_ratio_gives_rank_one() -> None:
    assert ratio_to_ranks(1e-9, (64, 27, 3)) == (1, 1, 1)


def test_ratio_rounds_to_nearest() -> None:
    assert ratio_to_ranks(0.5, (16, 7, 3)) == (8, 4, 2)
    assert ratio_to_ranks(0.3, (10,)) == (3,)


def test_ranks_are_monotone_in_ratio_and_bounded() -> None:
    full = (512, 300, 27, 16, 3, 1)
    previous = (0,) * len(full)
    for i in range(1, 1001):
        ranks = ratio_to_ranks(i / 1000, full)
        assert all(1 <= r <= f for r, f in zip(ranks, full, strict=True))
        assert all(r >= p for r, p in zip(ranks, previous, strict=True))
        previous = ranks
    assert previous == full


@pytest.mark.parametrize(
    "bad, shown",
    [
        (0.0, "0.0"),
        (-0.5, "-0.5"),
        (1.5, "1.5"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        ("0.5", "'0.5'"),
        ("half", "'half'"),
        (None, "None"),
        (True, "True"),
    ],
)
def test_bad_ratio_is_named(bad, shown: str) -> None:
    with pytest.raises(DecompositionError, match="rank ratio") as info:
        ratio_to_ranks(bad, (8, 8))
    assert shown in str(info.value)


def test_unknown_decomposition_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    (layer,) = describe_layers(model, (4, 5, 5))
    for call in (
        lambda: check_decomposition("tensor-magic"),
        lambda: method_for(layer, "tensor-magic"),
        lambda: full_ranks(layer, "tensor-magic"),
        lambda: plan_layer(layer, 0.5, "tensor-magic"),
        lambda: FactorCache(model, [layer], "tensor-magic"),
    ):
        with pytest.raises(DecompositionError, match="unknown decomposition 'tensor-magic'"):
            call()


def test_full_ranks_per_method() -> None:
    (layer,) = describe_layers(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)), (3, 8, 8))
    assert full_ranks(layer, "tucker2") == (27, 3)  # ranks of the out- and in-mode unfoldings
    assert full_ranks(layer, "svd") == (27,)
    # CP's "full" rank: the one where the factorized layer costs as much as the dense one
    (cp_full,) = full_ranks(layer, "cp")
    assert (
        factorized_macs(layer, "cp", (cp_full,)) <= layer.macs < factorized_macs(layer, "cp", (cp_full + 1,))
    )


# ------------------------------------------------------------------------------------------
# Exactness at full rank
# ------------------------------------------------------------------------------------------

LAYERS = {
    "conv3x3-stride2-pad-dil2-bias": (
        lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2),
        (6, 11, 11),
    ),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (8, 5, 5)),
    "linear": (lambda: nn.Linear(12, 9), (12,)),
    "conv-in1": (lambda: nn.Conv2d(1, 8, 3, padding=1), (1, 7, 7)),
    "conv3x5": (lambda: nn.Conv2d(5, 7, (3, 5), stride=(1, 2), padding=(1, 2)), (5, 8, 9)),
    "conv-wide-in": (lambda: nn.Conv2d(20, 4, 3, padding=1, bias=False), (20, 6, 6)),
}
EXPECTED_FORM = {"tucker2": Tucker2Conv, "svd": SVDConv}


@pytest.mark.parametrize("decomposition", ["tucker2", "svd"])
@pytest.mark.parametrize("key", sorted(LAYERS))
def test_full_rank_reproduces_the_layer(key: str, decomposition: str) -> None:
    make, shape = LAYERS[key]
    model = nn.Sequential(make()).double()
    if getattr(model[0], "bias", None) is not None:
        with torch.no_grad():
            model[0].bias.normal_()
    (layer,) = describe_layers(model, shape)
    cache = FactorCache(model, [layer], decomposition)
    decomposed = decompose_model(model, [_full_plan(layer, decomposition)], cache)
    module = decomposed[0]
    if layer.kind == "linear":
        assert isinstance(module, SVDLinear)
    elif layer.kernel == (1, 1):
        assert isinstance(module, SVDConv)
    else:
        assert isinstance(module, EXPECTED_FORM[decomposition])
    assert module[0].weight.dtype == torch.float64
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        error = _rel(decomposed(x), model(x))
    assert error < 1e-4
    assert error < 1e-10  # float64 all the way, bias included
    # the original model is untouched (decompose_model works on a copy)
    assert isinstance(model[0], (nn.Conv2d, nn.Linear))


@pytest.mark.filterwarnings(CP_WARNING)
def test_cp_at_break_even_rank_is_a_fair_approximation() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).double()
    (layer,) = describe_layers(model, (8, 8, 8))
    cache = FactorCache(model, [layer], "cp")
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    errors = {}
    for ratio in (0.1, 1.0):
        ranks = ratio_to_ranks(ratio, full_ranks(layer, "cp"))
        decomposed = decompose_model(model, [LayerPlan(layer.name, ratio, "cp", ranks, 0, 0)], cache)
        assert isinstance(decomposed[0], CPConv) and decomposed[0].ranks == ranks
        with torch.no_grad():
            errors[ratio] = _rel(decomposed(x), model(x))
    assert errors[1.0] < 0.3
    assert errors[1.0] < errors[0.1]


# ------------------------------------------------------------------------------------------
# Error and cost against rank
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decomposition", ["tucker2", "svd"])
def test_error_and_macs_fall_with_rank(decomposition: str) -> None:
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False))
    (layer,) = describe_layers(model, (16, 8, 8))
    cache = FactorCache(model, [layer], decomposition)
    weight = model[0].weight.double()
    errors, macs = [], []
    for ratio in (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05):
        ranks = ratio_to_ranks(ratio, full_ranks(layer, decomposition))
        module = cache.build(layer.name, ranks, dtype=torch.float64)
        errors.append(_rel(module.effective_weight().detach(), weight))
        macs.append(factorized_macs(layer, decomposition, ranks))
    assert errors[0] < 1e-12
    assert all(b >= a - 1e-12 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert all(b <= a for a, b in zip(macs, macs[1:], strict=False)), macs
    assert errors[-1] > 0.5 and macs[-1] < macs[0] / 10


def test_hooi_is_no_worse_than_hosvd() -> None:
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False))
    (layer,) = describe_layers(model, (32, 8, 8))
    weight = model[0].weight.double()
    hosvd = FactorCache(model, [layer], "tucker2")
    hooi = FactorCache(model, [layer], "tucker2", hooi_iters=3)
    for ranks in ((4, 4), (8, 6)):
        plain = _rel(hosvd.build(layer.name, ranks, dtype=torch.float64).effective_weight().detach(), weight)
        refined = _rel(hooi.build(layer.name, ranks, dtype=torch.float64).effective_weight().detach(), weight)
        assert refined <= plain + 1e-9
        assert refined < plain - 1e-4  # the sweeps do run: a random kernel is never HOOI-optimal at once
    # HOOI factors are computed once per rank
    assert hooi.factors(layer.name, (4, 4)) is hooi.factors(layer.name, (4, 4))


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def test_plan_leaves_a_layer_dense_when_factorizing_costs_more() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 10))
    conv, linear = describe_layers(model, (3, 6, 6))
    for layer in (conv, linear):
        plan = plan_layer(layer, 1.0, "tucker2")
        assert plan.dense and plan.method is None and plan.ranks is None
        assert (plan.macs, plan.params) == (layer.macs, layer.params)
    low = plan_layer(conv, 0.1, "tucker2")
    assert not low.dense and low.method == "tucker2" and low.ranks == (1, 1)
    assert low.macs == factorized_macs(conv, "tucker2", (1, 1)) < conv.macs
    assert plan_layer(linear, 0.3, "tucker2").method == "svd"  # linear layers always use SVD


def test_max_ratio_within_budget() -> None:
    (layer,) = describe_layers(nn.Sequential(nn.Conv2d(32, 64, 3, padding=1)), (32, 8, 8))
    budget = 0.3 * layer.macs
    ratio = max_ratio_within(layer, "tucker2", budget, 0.01, 1.0)
    assert plan_layer(layer, ratio, "tucker2").macs <= budget
    assert plan_layer(layer, min(1.0, ratio + 0.02), "tucker2").macs > budget
    assert max_ratio_within(layer, "tucker2", 0, 0.01, 1.0) == 0.01


# ------------------------------------------------------------------------------------------
# Training a decomposed model
# ------------------------------------------------------------------------------------------


def _tiny_decomposed(decomposition: str = "tucker2", ratio: float = 0.5) -> tuple[nn.Module, nn.Module]:
    model = build_model(ModelSpec("tiny", num_classes=10, input_size=8))
    layers = [layer for layer in describe_layers(model, (3, 8, 8)) if is_compressible(layer, decomposition)]
    cache = FactorCache(model, layers, decomposition)
    plans = [plan_layer(layer, ratio, decomposition) for layer in layers]
    return model, decompose_model(model, plans, cache)


def test_decomposed_model_trains() -> None:
    _, model = _tiny_decomposed()
    factorized = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    assert set(factorized) == {"conv1", "conv2", "conv3", "fc"}
    factors = {f"{n}.{k}": p for n, m in factorized.items() for k, p in m.named_parameters()}
    before = {k: p.detach().clone() for k, p in factors.items()}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for key, p in factors.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, key
    optimizer.step()
    for key, p in factors.items():
        assert not torch.equal(p.detach(), before[key]), key


# ------------------------------------------------------------------------------------------
# Multi-stage: re-decomposing factorized layers
# ------------------------------------------------------------------------------------------


def test_redecomposition_keeps_depth_and_lowers_ranks() -> None:
    dense = build_model(ModelSpec("tiny", num_classes=10, input_size=8)).eval()
    shape = (3, 8, 8)
    dense_layers = {layer.name: layer for layer in describe_layers(dense, shape)}
    _, stage1 = _tiny_decomposed(ratio=0.6)
    stage1.eval()
    layers = describe_layers(stage1, shape)
    factorized = [layer for layer in layers if layer.method is not None]
    assert len(factorized) == 4
    for layer in factorized:
        # described as the dense layer it stands for (channel pruning's producers: dense layers only)
        dense_layer = dense_layers[layer.name]
        geometry = {k: v for k, v in dense_layer.to_dict().items() if not k.startswith("producer")}
        assert {k: v for k, v in layer.to_dict().items() if not k.startswith("producer")} | {
            "method": None,
            "ranks": None,
        } == geometry
        assert is_compressible(layer, "tucker2")
        assert 0 < current_ratio(layer) <= 1
    cache = FactorCache(stage1, factorized, "tucker2")
    x = torch.randn(2, *shape)
    with torch.no_grad():
        old = stage1(x)

    # re-factorized at its current ranks, each layer is rebuilt exactly (nothing is lost)
    same = copy.deepcopy(stage1)
    for layer in factorized:
        replace_module(same, layer.name, cache.build(layer.name, layer.ranks))
    with torch.no_grad():
        assert _rel(same(x), old) < 1e-5

    plans = [plan_layer(layer, 0.8 * current_ratio(layer), "tucker2") for layer in factorized]
    for layer, plan in zip(factorized, plans, strict=True):
        assert plan.method == layer.method
        assert all(r <= c for r, c in zip(plan.ranks, layer.ranks, strict=True))
        assert plan.ranks != layer.ranks and plan.macs < current_macs(layer)
    # a ratio above the current one never grows a layer back
    grown = plan_layer(factorized[1], 1.0, "tucker2")
    assert grown.ranks == factorized[1].ranks

    stage2 = decompose_model(stage1, plans, cache)

    def conv_count(model: nn.Module) -> int:
        return sum(isinstance(m, nn.Conv2d) for m in model.modules())

    assert conv_count(stage2) == conv_count(stage1) == 3 * 3
    assert factorization_of(stage2) == {p.name: {"method": p.method, "ranks": list(p.ranks)} for p in plans}
    with torch.no_grad():
        new = stage2(x)
    assert 0 < _rel(new, old) < 0.5
    # the new factors are the best truncation of the old effective weights
    for plan in plans:
        old_w = stage1.get_submodule(plan.name).effective_weight().detach().double()
        new_w = stage2.get_submodule(plan.name).effective_weight().detach().double()
        assert 0 < _rel(new_w, old_w) < 0.6
        torch.testing.assert_close(new_w, _truncate(old_w, plan.ranks), atol=1e-5, rtol=1e-4)


def _truncate(weight: torch.Tensor, ranks: tuple[int, ...]) -> torch.Tensor:
    """Truncated SVD (one rank) or truncated HOSVD of modes 0 and 1 (two ranks), computed directly."""
    if len(ranks) == 1:
        u, s, vh = torch.linalg.svd(weight.flatten(1), full_matrices=False)
        (r,) = ranks
        return ((u[:, :r] * s[:r]) @ vh[:r]).reshape(weight.shape)
    r_out, r_in = ranks
    u_out = torch.linalg.svd(weight.flatten(1), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(weight.transpose(0, 1).flatten(1), full_matrices=False)[0][:, :r_in]
    p_out, p_in = u_out @ u_out.T, u_in @ u_in.T
    return torch.einsum("ao,oikl,ib->abkl", p_out, weight, p_in)


# ------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------


def _random_plans(model: nn.Module, shape, decomposition: str, seed: int):
    layers = [layer for layer in describe_layers(model, shape) if is_compressible(layer, decomposition)]
    g = torch.Generator().manual_seed(seed)
    ratios = torch.empty(len(layers)).uniform_(0.1, 0.9, generator=g).tolist()
    return layers, [plan_layer(layer, r, decomposition) for layer, r in zip(layers, ratios, strict=True)]


@pytest.mark.filterwarnings(CP_WARNING)
@pytest.mark.parametrize(
    "name, size, decomposition", [("tiny", 8, "tucker2"), ("tiny", 8, "cp"), ("resnet20", 32, "tucker2")]
)
def test_save_and_load_round_trip(tmp_path: Path, name: str, size: int, decomposition: str) -> None:
    spec = ModelSpec(name, num_classes=10, in_channels=3, input_size=size)
    shape = (3, size, size)
    model = build_model(spec)
    layers, plans = _random_plans(model, shape, decomposition, seed=1)
    decomposed = decompose_model(model, plans, FactorCache(model, layers, decomposition, cp_iters=10)).eval()
    assert factorization_of(decomposed)
    path = rlrank.save(tmp_path / "model.pt", decomposed, spec, metadata={"top1": 0.5, "ranks": [1, 2]})
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))

    loaded = rlrank.load(path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert factorization_of(loaded) == factorization_of(decomposed)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), decomposed(x))

    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "rlrank-model/1" and payload["arch"] == spec.to_dict()
    meta = load_metadata(path)
    assert meta["metadata"] == {"top1": 0.5, "ranks": [1, 2]}
    assert meta["factorized"] == factorization_of(decomposed)


def test_load_refuses_other_files(tmp_path: Path) -> None:
    model = build_model(ModelSpec("tiny"))
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    with pytest.raises(ModelError, match="not an rlrank model file"):
        rlrank.load(plain)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="cannot read model file"):
        rlrank.load(corrupt)
    with pytest.raises(ModelError, match="model file not found"):
        rlrank.load(tmp_path / "absent.pt")


# ------------------------------------------------------------------------------------------
# The factor cache
# ------------------------------------------------------------------------------------------


def test_factor_cache_factorizes_each_layer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(ModelSpec("resnet20", input_size=32))
    shape = (3, 32, 32)
    layers = [layer for layer in describe_layers(model, shape) if is_compressible(layer, "tucker2")]
    calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    cache = FactorCache(model, layers, "tucker2")
    assert calls == []  # nothing is computed before it is needed
    cache.prepare_all()
    # two unfoldings per k x k conv (Tucker-2), one for the linear layer (SVD)
    expected = sum(1 if layer.is_pointwise else 2 for layer in layers)
    assert len(calls) == expected
    svd_objects = {
        name: [id(t) for usv in cache.entry(name).store["svd"] for t in usv] for name in cache.layers
    }
    for seed in range(3):
        _, plans = _random_plans(model, shape, "tucker2", seed)
        decompose_model(model, plans, cache)
    for layer in layers:
        cache.factors(layer.name, ratio_to_ranks(0.3, full_ranks(layer, cache.method(layer.name))))
        cache.spectra(layer.name)
    assert len(calls) == expected
    assert {
        name: [id(t) for usv in cache.entry(name).store["svd"] for t in usv] for name in cache.layers
    } == svd_objects


def test_factor_cache_copies_the_weights() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    (layer,) = describe_layers(model, (4, 5, 5))
    cache = FactorCache(model, [layer], "svd")
    before = cache.build(layer.name, (6,), dtype=torch.float64).effective_weight().detach()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    after = cache.build(layer.name, (6,), dtype=torch.float64).effective_weight().detach()
    torch.testing.assert_close(after, before)


def test_factor_cache_spectra_and_rank_range() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    (layer,) = describe_layers(model, (4, 5, 5))
    cache = FactorCache(model, [layer], "tucker2")
    out_mode, in_mode = cache.spectra(layer.name)
    assert out_mode.shape == (6, 36) and in_mode.shape == (4, 54)
    expected = torch.linalg.svdvals(model[0].weight.detach().double().flatten(1)).numpy()
    assert out_mode.values == pytest.approx(expected)
    assert (out_mode.values[:-1] >= out_mode.values[1:]).all()
    for bad in ((0, 2), (7, 2), (6, 5)):
        with pytest.raises(DecompositionError, match="out of range"):
            cache.factors(layer.name, bad)


@pytest.mark.filterwarnings(CP_WARNING)
def test_cp_factors_are_memoized_per_rank() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    (layer,) = describe_layers(model, (4, 5, 5))
    cache = FactorCache(model, [layer], "cp", cp_iters=5)
    first = cache.factors(layer.name, (3,))
    assert cache.factors(layer.name, (3,)) is first
    assert cache.factors(layer.name, (4,)) is not first
