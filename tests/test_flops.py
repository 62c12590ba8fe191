"""MAC and parameter accounting (``rlrank.flops``): analytic formulas, hooks and FlopCounterMode agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache
from rlrank.flops import count_model, factorized_macs, factorized_params, flop_counter_macs
from rlrank.layers import LayerInfo
from rlrank.methods import DecompositionError, FactorizedLayer
from rlrank.models import ModelSpec, build_model, list_models
from rlrank.planning import current_macs, current_params, full_ranks, is_compressible, plan_layer
from rlrank.surgery import decompose_model, empty_factorized

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


# input size per model: 32 for the CIFAR-style models, 8 where that keeps the test fast
INPUT_SIZE = {
    "tiny": 8,
    "resnet20": 32,
    "resnet32": 32,
    "resnet44": 32,
    "resnet56": 32,
    "resnet18": 32,
    "mobilenet_v2": 32,
    "vgg16_bn": 8,
}

# the tensorly CP initialization warns whenever the rank exceeds a mode's size (3 for 3x3 kernels)
CP_WARNING = "ignore:Trying to compute SVD with n_eigenvecs"


def test_every_registered_model_is_covered() -> None:
    assert sorted(INPUT_SIZE) == list_models()


class Built:
    """A model, its input shape and its layer descriptions, built once per test module."""

    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        size = INPUT_SIZE[name]
        self.name = name
        self.shape = (3, size, size)
        self.model = build_model(ModelSpec(name, num_classes=10, in_channels=3, input_size=size)).eval()
        self.layers = describe_layers(self.model, self.shape)
        self.caches: dict[str, FactorCache] = {}

    def cache(self, decomposition: str) -> FactorCache:
        """One factor cache per model and decomposition, reused for every rank vector."""
        if decomposition not in self.caches:
            compressible = [layer for layer in self.layers if is_compressible(layer, decomposition)]
            cache = FactorCache(self.model, compressible, decomposition, cp_iters=10)
            if decomposition != "cp":
                cache.prepare_all()
            self.caches[decomposition] = cache
        return self.caches[decomposition]


@pytest.fixture(scope="module")
def built():
    models: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in models:
            models[name] = Built(name)
        return models[name]

    return get


def _three_counts(model: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    hooks = count_model(model, shape).macs
    reference = flop_counter_macs(model, shape)
    analytic = sum(current_macs(layer) for layer in describe_layers(model, shape))
    return hooks, reference, analytic


def _assert_agree(hooks: int, reference: int, analytic: int) -> None:
    assert abs(hooks - reference) <= 0.01 * reference
    assert abs(analytic - reference) <= 0.01 * reference
    assert hooks == reference == analytic


def _conv_linear_params(model: nn.Module) -> int:
    return sum(
        p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()
    )


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_dense_counts_agree(built, name: str) -> None:
    b = built(name)
    hooks, reference, analytic = _three_counts(b.model, b.shape)
    _assert_agree(hooks, reference, analytic)
    assert sum(layer.macs for layer in b.layers) == reference
    assert count_model(b.model, b.shape).params == sum(p.numel() for p in b.model.parameters())
    assert sum(layer.params for layer in b.layers) == _conv_linear_params(b.model)


def test_cifar_resnet_reference_costs(built) -> None:
    r20 = count_model(built("resnet20").model, (3, 32, 32))
    r56 = count_model(built("resnet56").model, (3, 32, 32))
    assert r20.macs == 40_551_040
    assert round(r56.macs / 1e6, 2) == 125.49
    assert round(r20.params / 1e6, 2) == 0.27
    assert round(r56.params / 1e6, 2) == 0.85


def _ratio_vectors(n: int) -> list[list[float]]:
    random = torch.empty(n).uniform_(0.05, 1.0, generator=torch.Generator().manual_seed(7)).tolist()
    return [[0.25] * n, [0.5] * n, random]


def _check_decomposed(b: Built, decomposition: str, ratio_vectors: list[list[float]]) -> None:
    cache = b.cache(decomposition)
    compressible = list(cache.layers.values())
    dense_total = sum(layer.macs for layer in b.layers)
    dense_params = sum(p.numel() for p in b.model.parameters())
    for ratios in ratio_vectors:
        plans = [plan_layer(layer, r, decomposition) for layer, r in zip(compressible, ratios, strict=True)]
        factorized = [p for p in plans if not p.dense]
        assert factorized, "the rank vector factorizes nothing"
        model = decompose_model(b.model, plans, cache)
        hooks, reference, analytic = _three_counts(model, b.shape)
        _assert_agree(hooks, reference, analytic)
        # the plans price the model before it is built: the same total
        saved = sum(cache.layers[p.name].macs - p.macs for p in factorized)
        assert reference == dense_total - saved < dense_total
        saved_params = sum(cache.layers[p.name].params - p.params for p in factorized)
        assert count_model(model, b.shape).params == dense_params - saved_params
        # every factorized layer: described as planned, and its analytic size is its real size
        described = {layer.name: layer for layer in describe_layers(model, b.shape)}
        for plan in factorized:
            layer = described[plan.name]
            assert (layer.method, layer.ranks) == (plan.method, plan.ranks)
            module = model.get_submodule(plan.name)
            assert isinstance(module, FactorizedLayer)
            assert current_params(layer) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("decomposition", ["tucker2", "svd"])
@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_decomposed_counts_agree(built, name: str, decomposition: str) -> None:
    b = built(name)
    _check_decomposed(b, decomposition, _ratio_vectors(len(b.cache(decomposition).layers)))


@pytest.mark.filterwarnings(CP_WARNING)
@pytest.mark.parametrize("name", ["tiny", "resnet20"])
def test_cp_decomposed_counts_agree(built, name: str) -> None:
    b = built(name)
    n = len(b.cache("cp").layers)
    ratios = torch.empty(n).uniform_(0.02, 0.1, generator=torch.Generator().manual_seed(3)).tolist()
    _check_decomposed(b, "cp", [[0.05] * n, ratios])


# ------------------------------------------------------------------------------------------
# Single layers: every factorized form of every geometry, priced and measured
# ------------------------------------------------------------------------------------------

GEOMETRIES = {
    "conv3x3-s2-pad-dil-bias": (nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True), (6, 11, 11)),
    "conv3x5-s1x2": (nn.Conv2d(4, 7, (3, 5), stride=(1, 2), padding=(1, 2)), (4, 9, 10)),
    "conv5x3-s2x1-nopad": (nn.Conv2d(5, 6, (5, 3), stride=(2, 1), bias=False), (5, 12, 7)),
    "conv1x1": (nn.Conv2d(8, 12, 1, bias=True), (8, 5, 5)),
    "conv-in1": (nn.Conv2d(1, 8, 3, padding=1), (1, 6, 6)),
    "linear": (nn.Linear(12, 9), (12,)),
}


def _methods(layer: LayerInfo) -> list[str]:
    return ["svd"] if layer.is_pointwise else ["tucker2", "svd", "cp"]


@pytest.mark.parametrize("key", sorted(GEOMETRIES))
def test_single_layer_formulas_match_built_modules(key: str) -> None:
    module, shape = GEOMETRIES[key]
    (layer,) = describe_layers(nn.Sequential(module), shape)
    assert layer.macs == count_model(nn.Sequential(module), shape).macs
    assert layer.params == sum(p.numel() for p in module.parameters())
    for method in _methods(layer):
        full = full_ranks(layer, method)
        for ranks in {tuple(1 for _ in full), tuple(max(1, f // 2) for f in full), full}:
            factorized = empty_factorized(module, method, ranks)
            assert factorized.method == method and factorized.ranks == ranks
            model = nn.Sequential(factorized)
            expected = factorized_macs(layer, method, ranks)
            assert count_model(model, shape).macs == expected, (method, ranks)
            assert flop_counter_macs(model, shape) == expected, (method, ranks)
            params = sum(p.numel() for p in factorized.parameters())
            assert factorized_params(layer, method, ranks) == params, (method, ranks)
            # described as the dense layer it stands for, priced as it is now
            (now,) = describe_layers(model, shape)
            assert now == LayerInfo(**{**layer.to_dict(), "method": method, "ranks": ranks})
            assert current_macs(now) == expected and current_params(now) == params


def test_layer_info_dict_round_trip() -> None:
    module, shape = GEOMETRIES["conv3x5-s1x2"]
    (layer,) = describe_layers(nn.Sequential(empty_factorized(module, "tucker2", (3, 2))), shape)
    assert LayerInfo.from_dict(layer.to_dict()) == layer
    assert layer.kernel == (3, 5) and layer.stride == (1, 2) and layer.ranks == (3, 2)


def test_unknown_method_in_formulas() -> None:
    module, shape = GEOMETRIES["conv1x1"]
    (layer,) = describe_layers(nn.Sequential(module), shape)
    known = "unknown decomposition 'tensor-magic'; known: tucker2, svd, cp, tt, tr"
    with pytest.raises(ValueError, match=known):
        factorized_macs(layer, "tensor-magic", (2,))
    with pytest.raises(ValueError, match=known):
        factorized_params(layer, "tensor-magic", (2,))


def test_grouped_convs_are_described_and_left_dense(built) -> None:
    b = built("mobilenet_v2")
    grouped = [layer for layer in b.layers if layer.groups > 1]
    assert len(grouped) == 17  # one depthwise conv per inverted-residual block
    for layer in grouped:
        assert layer.groups == layer.in_channels == layer.out_channels
        assert (
            layer.macs
            == layer.out_channels * layer.kernel[0] * layer.kernel[1] * layer.out_hw[0] * layer.out_hw[1]
        )
        assert layer.params == layer.out_channels * layer.kernel[0] * layer.kernel[1]
        for decomposition in ("tucker2", "svd", "cp"):
            assert not is_compressible(layer, decomposition)
    assert all(is_compressible(layer, "tucker2") for layer in b.layers if layer.groups == 1)
    with pytest.raises(DecompositionError, match="grouped and depthwise"):
        empty_factorized(b.model.get_submodule(grouped[0].name), "svd", (1,))


def test_flop_counter_counts_batch_one() -> None:
    """Both counters price one input, whatever the model's training mode, and leave the mode alone."""
    model = build_model(ModelSpec("tiny", input_size=8)).train()
    assert flop_counter_macs(model, (3, 8, 8)) == count_model(model, (3, 8, 8)).macs == 106_304
    assert model.training
