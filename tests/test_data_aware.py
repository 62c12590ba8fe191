"""Data-aware factorization: output factors fitted to the layer's responses on data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlrank.describe import describe_layers
from rlrank.factor_cache import FactorCache, output_covariances
from rlrank.planning import LayerPlan
from rlrank.surgery import decompose_model


def model_and_data(kind: str):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1, bias=True) if kind == "conv" else nn.Linear(32, 16)
    model = nn.Sequential(layer).double()
    # inputs confined to a few directions: what matters is how the layer maps *them*
    if kind == "conv":
        basis = torch.randn(2, 8, 3, 3, dtype=torch.float64)
        coeff = torch.randn(64, 2, dtype=torch.float64)
        images = torch.einsum("nb,bchw->nchw", coeff, basis.repeat(1, 1, 2, 2)[:, :, :6, :6])
        shape = (8, 6, 6)
    else:
        basis = torch.randn(3, 32, dtype=torch.float64)
        images = torch.randn(64, 3, dtype=torch.float64) @ basis
        shape = (32,)
    return model, images, shape


@pytest.mark.parametrize(
    ("kind", "method", "ranks"), [("conv", "tucker2", (3, 8)), ("conv", "svd", (3,)), ("linear", "svd", (3,))]
)
def test_data_aware_fits_the_outputs_better(kind, method, ranks):
    model, images, shape = model_and_data(kind)
    layers = describe_layers(model, shape)
    cov = output_covariances(model, ["0"], [images[:32], images[32:]])
    assert cov["0"].shape == (16, 16) and torch.allclose(cov["0"], cov["0"].T)
    plans = [LayerPlan("0", 0.2, method, ranks, 0, 0)]
    plain = decompose_model(model, plans, FactorCache(model, layers, method))
    aware = decompose_model(model, plans, FactorCache(model, layers, method, output_covariances=cov))
    with torch.no_grad():
        target = model(images)
        err_plain = (plain(images) - target).norm() / target.norm()
        err_aware = (aware(images) - target).norm() / target.norm()
    # projecting the outputs on their principal subspace is the best rank-r output fit for this data
    assert err_aware < 0.9 * err_plain, (float(err_aware), float(err_plain))


def test_data_aware_is_exact_at_full_rank():
    model, images, shape = model_and_data("conv")
    layers = describe_layers(model, shape)
    cov = output_covariances(model, ["0"], [images])
    cache = FactorCache(model, layers, "tucker2", output_covariances=cov)
    full = decompose_model(model, [LayerPlan("0", 1.0, "tucker2", (16, 8), 0, 0)], cache)
    with torch.no_grad():
        x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
        assert torch.allclose(full(x), model(x), atol=1e-10)
