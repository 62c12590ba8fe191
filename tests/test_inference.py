"""The fastest inference form: every grouping of a layer's factors computes the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlrank.describe import describe_layers, geometry_of
from rlrank.factor_cache import FactorCache
from rlrank.inference import fastest_form, fastest_grouping, groupings, is_chain, merge_pair
from rlrank.methods import get_method
from rlrank.models import ModelSpec, build_model
from rlrank.planning import is_compressible, plan_layer
from rlrank.surgery import decompose_model


def _random(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for param in module.parameters():
        nn.init.normal_(param, std=0.3)
    return module.eval()


@pytest.mark.parametrize(
    ("method", "layer", "ranks", "shape"),
    [
        ("tucker2", nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True), (4, 3), (2, 6, 9, 9)),
        ("tucker2", nn.Conv2d(6, 10, (3, 5), padding=(1, 2), dilation=1, bias=False), (5, 2), (2, 6, 7, 8)),
        ("svd", nn.Conv2d(6, 10, 3, padding=1, bias=True), (4,), (2, 6, 7, 7)),
        ("svd", nn.Conv2d(6, 10, 1, bias=True), (3,), (2, 6, 5, 5)),
        ("svd", nn.Linear(12, 7), (3,), (4, 12)),
    ],
)
def test_every_grouping_computes_the_chain(method, layer, ranks, shape):
    chain = _random(get_method(method).build_module(geometry_of(layer), ranks))
    x = torch.randn(shape)
    forms = groupings(chain)
    assert forms[0] is chain and len(forms) == 2 ** (len(chain) - 1)  # all mergeable here
    with torch.no_grad():
        expected = chain(x)
        for form in forms[1:]:
            assert torch.allclose(form(x), expected, rtol=1e-4, atol=1e-4)
    merged = forms[-1] if len(chain) == 2 else [f for f in forms if not isinstance(f, nn.Sequential)][0]
    assert not isinstance(merged, nn.Sequential)  # one layer: the whole chain merged


def test_a_biased_first_factor_before_padding_is_not_merged():
    first = _random(nn.Conv2d(4, 3, 1, bias=True))
    core = _random(nn.Conv2d(3, 5, 3, padding=1))
    assert merge_pair(first, core) is None  # its bias would not reach the zero padding
    assert merge_pair(nn.Conv2d(4, 3, 3, groups=1), nn.Conv2d(3, 6, 3)) is None  # two spatial kernels
    assert len(groupings(nn.Sequential(first, core))) == 1


def test_fastest_form_keeps_the_function_and_picks_a_timed_grouping():
    model = build_model(ModelSpec("resnet20", 10, 3, 16)).eval()
    layers = describe_layers(model, (3, 16, 16))
    steps = [layer for layer in layers if is_compressible(layer, "tucker2")]
    cache = FactorCache(model, steps, "tucker2")
    compressed = decompose_model(model, [plan_layer(layer, 0.3, "tucker2") for layer in steps], cache).eval()
    x = torch.randn(4, 3, 16, 16)
    fast = fastest_form(compressed, (3, 16, 16), batch=4, rounds=2)
    with torch.no_grad():
        assert torch.allclose(fast(x), compressed(x), rtol=1e-3, atol=1e-3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # folded
    assert compressed.training is False and any(is_chain(m) for m in compressed.modules())  # unchanged


def test_fastest_grouping_takes_the_minimum(monkeypatch):
    import rlrank.inference as inference

    chain = _random(get_method("tucker2").build_module(geometry_of(nn.Conv2d(4, 6, 3, padding=1)), (3, 2)))
    monkeypatch.setattr(inference, "time_interleaved", lambda forms, x, rounds: [5.0, 1.0, 3.0, 4.0])
    best, ms = fastest_grouping(chain, torch.randn(1, 4, 5, 5))
    assert ms == 1.0 and isinstance(best, nn.Conv2d)  # the second form: every factor merged into one


def test_faster_layout_is_measured_and_keeps_the_function(monkeypatch):
    import rlrank.inference as inference

    model = build_model(ModelSpec("tiny", 10, 3, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(inference, "time_interleaved", lambda forms, x, rounds: [2.0, 1.0])
    faster = inference.faster_layout(model, x)
    assert isinstance(faster, inference.ChannelsLast)
    with torch.no_grad():
        assert torch.allclose(faster(x), model(x), atol=1e-5)
    assert next(model.parameters()).is_contiguous()  # the original is untouched
    monkeypatch.setattr(inference, "time_interleaved", lambda forms, x, rounds: [1.0, 2.0])
    assert inference.faster_layout(model, x) is model
