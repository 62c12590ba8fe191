"""Channel pruning (``--decomposition prune``): pairs found, exact accounting, selection, refit, files."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rlrank
from rlrank.agents.policy_files import read_policy_metadata
from rlrank.channel_coupling import channel_producers
from rlrank.data import DataConfig, load_data
from rlrank.describe import describe_layers
from rlrank.errors import ConfigError
from rlrank.export import export_model
from rlrank.factor_cache import FactorCache, input_grams
from rlrank.flops import count_model
from rlrank.fusion import fuse_for_inference
from rlrank.latency_table import measure_table, predicted_latency_ratio
from rlrank.methods import get_method
from rlrank.methods.prune import contribution_gram, refit
from rlrank.model_file import save
from rlrank.models import ModelSpec, build_model
from rlrank.planning import owned_layers, plan_layer, searched_layers
from rlrank.runlog import read_rows
from rlrank.search import main
from rlrank.surgery import decompose_model

SHAPE = (3, 16, 16)


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet20", 10, 3, 16))
    for module in model.modules():  # BatchNorm statistics of a trained model, not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


def pruning_cache(model: nn.Module, with_data: bool = True) -> tuple[list, list, FactorCache]:
    layers = describe_layers(model, SHAPE)
    steps = searched_layers(layers, "prune")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn((16, *SHAPE), generator=generator) for _ in range(2)]
    grams = input_grams(model, [s.name for s in steps], batches) if with_data else None
    return layers, steps, FactorCache(model, steps, "prune", input_grams=grams)


class NotTraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.conv2(F.relu(self.conv1(x)))


def test_producers_are_the_inner_convolutions_of_residual_blocks():
    producers = channel_producers(resnet20())
    assert len(producers) == 9
    for stage in (1, 2, 3):
        for block in (0, 1, 2):
            found = producers[f"layer{stage}.{block}.conv2"]
            assert (found.name, found.batchnorms) == (
                f"layer{stage}.{block}.conv1",
                (f"layer{stage}.{block}.bn1",),
            )
    # a block's first convolution reads the residual stream (a shortcut reads it too), the classifier a pool
    assert not any(name.endswith("conv1") or name in ("fc", "linear") for name in producers)
    assert channel_producers(NotTraceable()) == {}


def test_a_chain_keeps_its_later_layer_and_owns_the_producer():
    model = build_model(ModelSpec("tiny", 10, 1, 8))
    layers = describe_layers(model, (1, 8, 8))
    assert {layer.name: layer.producer for layer in layers if layer.producer} == {
        "conv2": "conv1",
        "conv3": "conv2",
    }
    steps = searched_layers(layers, "prune")
    assert [s.name for s in steps] == ["conv3"]  # conv2 is conv3's producer: priced by conv3's plan
    assert owned_layers(steps, "prune") == {"conv2"}
    assert [s.name for s in searched_layers(layers, "prune", exclude=["conv3"])] == ["conv2"]


class SmallVGG(nn.Module):
    """Pairs through max pooling, a chain of three convolutions, linear pairs through dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize("name", ["resnet20", "small_vgg", "mobilenet_v2"])
def test_planned_cost_is_the_pruned_models_cost(name):
    if name == "resnet20":
        model, shape = resnet20(), SHAPE
    elif name == "small_vgg":
        model, shape = SmallVGG().eval(), SHAPE
    else:  # an inverted-residual network: two pairs between blocks without a shortcut
        model, shape = build_model(ModelSpec(name, 10, 3, 32)).eval(), (3, 32, 32)
    layers = describe_layers(model, shape)
    steps = searched_layers(layers, "prune")
    grams = input_grams(model, [s.name for s in steps], [torch.randn((4, *shape))])
    cache = FactorCache(model, steps, "prune", input_grams=grams)
    owned = owned_layers(steps, "prune") | {s.name for s in steps}
    fixed_macs = sum(layer.macs for layer in layers if layer.name not in owned)
    fixed_params = sum(layer.params for layer in layers if layer.name not in owned)
    rng = random.Random(0)
    for _ in range(3):
        plans = [plan_layer(step, rng.uniform(0.05, 1.0), "prune") for step in steps]
        pruned = decompose_model(model, plans, cache)
        weights = sum(
            p.numel()
            for m in pruned.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in m.parameters()
        )
        assert fixed_macs + sum(p.macs for p in plans) == count_model(pruned, shape).macs
        assert fixed_params + sum(p.params for p in plans) == weights
        assert pruned(torch.randn((2, *shape))).shape == (2, 10)


def test_keeping_every_channel_reproduces_the_model():
    model = resnet20()
    _, steps, cache = pruning_cache(model)
    x = torch.randn((4, *SHAPE))
    for step in steps[:3]:
        target = copy.deepcopy(model)
        module = cache.build(step.name, (step.in_channels,))
        get_method("prune").apply(target, step.name, module)
        assert isinstance(target.get_submodule(step.name), nn.Conv2d)
        torch.testing.assert_close(target(x), model(x), atol=1e-5, rtol=1e-5)


def test_channels_that_carry_nothing_go_first_and_dropping_them_changes_nothing():
    model = resnet20()
    dead = [1, 4, 6, 11]  # make these outputs of layer1.0.conv1 zero after its BatchNorm and ReLU
    with torch.no_grad():
        model.layer1[0].bn1.weight[dead] = 0.0
        model.layer1[0].bn1.bias[dead] = -1.0
    _, steps, cache = pruning_cache(model)
    name = "layer1.0.conv2"
    step = next(s for s in steps if s.name == name)
    keep = step.in_channels - len(dead)
    module = cache.build(name, (keep,))
    assert not set(dead) & set(module.kept_channels.tolist())
    target = copy.deepcopy(model)
    get_method("prune").apply(target, name, module)
    assert target.layer1[0].conv1.out_channels == keep and target.layer1[0].bn1.num_features == keep
    x = torch.randn((4, *SHAPE))
    torch.testing.assert_close(target(x), model(x), atol=1e-4, rtol=1e-4)


def test_least_squares_refit_reconstructs_better_than_the_kept_slices():
    torch.manual_seed(0)
    mix = torch.randn(6, 12, dtype=torch.float64)  # 12 correlated input channels from 6 sources
    patches = (torch.randn(4000, 6, dtype=torch.float64) @ mix).repeat_interleave(9, dim=1)
    patches = patches + 0.3 * torch.randn_like(patches)
    gram = patches.T @ patches / len(patches)
    weight = torch.randn(8, 12, 3, 3, dtype=torch.float64)
    flat = weight.reshape(8, -1)

    def error(kernel: torch.Tensor, channels: torch.Tensor) -> float:
        index = (channels.view(-1, 1) * 9 + torch.arange(9)).flatten()
        residual = patches @ flat.T - patches[:, index] @ kernel.reshape(8, -1).T
        return float(residual.norm() / (patches @ flat.T).norm())

    gains = []
    for keep in (3, 6, 9):
        channels = torch.arange(keep)
        refitted, sliced = (
            error(refit(weight, gram, channels), channels),
            error(weight[:, channels], channels),
        )
        assert refitted <= sliced + 1e-9
        gains.append(sliced - refitted)
    assert max(gains) > 0.1
    assert contribution_gram(gram, weight.reshape(8, 12, 9)).shape == (12, 12)


def test_a_pruned_model_saves_and_loads(tmp_path):
    model = resnet20()
    _, steps, cache = pruning_cache(model)
    plans = [plan_layer(step, 0.5, "prune") for step in steps]
    pruned = decompose_model(model, plans, cache)
    path = save(tmp_path / "model.pt", pruned, ModelSpec("resnet20", 10, 3, 16))
    loaded = rlrank.load(path)
    assert loaded.layer2[1].conv1.out_channels == pruned.layer2[1].conv1.out_channels < 32
    x = torch.randn((2, *SHAPE))
    torch.testing.assert_close(loaded(x), pruned.eval()(x))


def test_without_data_channels_are_ranked_by_kernel_norm():
    model = resnet20()
    _, steps, cache = pruning_cache(model, with_data=False)
    name = steps[0].name
    norms = model.get_submodule(name).weight.detach().pow(2).sum(dim=(0, 2, 3))
    module = cache.build(name, (4,))
    assert sorted(module.kept_channels.tolist()) == sorted(norms.argsort(descending=True)[:4].tolist())


SEARCH = [
    "--model", "resnet20", "--decomposition", "prune", "--flops", "0.5", "--episodes", "4", "--warmup", "2",
    "--dense-epochs", "0.3", "--final-epochs", "0.1", "--finetune-steps", "1", "--bn-batches", "1",
    "--quiet", "--no-latency",
]  # fmt: skip


@pytest.mark.parametrize("agent", ["ddpg", "alds"])
def test_a_pruning_search_keeps_the_budget_every_episode(tmp_path, agent):
    assert main([*SEARCH, "--agent", agent, "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert rows and all(row["flops_ratio"] <= 0.5 + 1e-9 for row in rows)
    assert {layer["method"] for row in rows for layer in row["layers"].values() if layer["ranks"]} == {
        "prune"
    }
    report = json.loads((run / "report.json").read_text())
    assert report["compressed"]["flops_ratio"] <= 0.5 + 1e-9
    model = rlrank.load(run / "model.pt")
    assert not any(isinstance(m, rlrank.methods.FactorizedLayer) for m in model.modules())
    widths = [model.get_submodule(f"layer{s}.{b}.conv1").out_channels for s in (1, 2, 3) for b in (0, 1, 2)]
    assert widths != [16] * 3 + [32] * 3 + [64] * 3  # channels really removed


@pytest.mark.parametrize("decomposition", ["prune", "mixed"])
def test_a_pruning_policy_is_reused_on_another_budget(tmp_path, decomposition):
    search = [decomposition if arg == "prune" else arg for arg in SEARCH]
    train = [*search, "--flops", "0.6", "--train-budgets", "0.4,0.6", "--out", str(tmp_path / "train")]
    assert main(train) == 0
    (run,) = [p for p in (tmp_path / "train").iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["budget"] for r in rows[:4]] == [0.4, 0.6, 0.4, 0.6]
    assert all(r["flops_ratio"] <= r["budget"] + 1e-12 for r in rows)
    policy = run / "stage-1" / "policy"
    assert read_policy_metadata(policy)["decomposition"] == decomposition
    reuse = [*search, "--flops", "0.45", "--episodes", "0", "--policy", str(policy)]
    assert main([*reuse, "--out", str(tmp_path / "reuse")]) == 0
    (reused,) = [p for p in (tmp_path / "reuse").iterdir() if p.is_dir()]
    assert json.loads((reused / "report.json").read_text())["compressed"]["flops_ratio"] <= 0.45 + 1e-9


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--stages", "2"], "--stages > 1"),
        (["--sparse", "0.2"], "--sparse"),
    ],
)
def test_pruning_refuses_what_it_cannot_do_yet(tmp_path, capsys, extra, named):
    assert main([*SEARCH, *extra, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decomposition prune does not work with" in err[0] and named in err[0], err
    assert not any(tmp_path.iterdir())


def test_a_model_with_nothing_to_prune_is_a_clear_error(tmp_path):
    data = load_data(DataConfig("digits", val_size=0.2))
    model = NotTraceable()
    model.conv1 = nn.Conv2d(1, 8, 3, padding=1)
    with pytest.raises(ConfigError, match="no layer of nottraceable can be pruned"):
        rlrank.compress(model, data, flops=0.5, decomposition="prune", out=str(tmp_path), progress=False)
    assert not any(tmp_path.iterdir())


def test_the_dry_run_says_which_layers_pruning_changes(tmp_path, capsys):
    assert main([*SEARCH, "--model", "tiny", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["conv3"].endswith("prune (input channels, with conv2's outputs)")
    assert lines["conv2"].endswith("pruned with conv3 (output channels)")
    assert "dense" in lines["conv1"] and "dense" in lines["fc"]
    assert "1 searched with prune;" in lines["tiny:"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_pruned_model_exports_and_fuses(tmp_path, fmt):
    model = resnet20()
    _, steps, cache = pruning_cache(model)
    pruned = decompose_model(model, [plan_layer(step, 0.4, "prune") for step in steps], cache).eval()
    result = export_model(pruned, tmp_path / "m", fmt, SHAPE, batch=2)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    fused = fuse_for_inference(pruned)  # every BatchNorm folded, the sliced ones included
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn((3, *SHAPE))
    torch.testing.assert_close(fused(x), pruned(x), atol=1e-4, rtol=1e-4)


def test_the_latency_table_times_a_pruned_layer_with_its_producer():
    model = resnet20()
    layers = describe_layers(model, SHAPE)
    steps = searched_layers(layers, "prune")
    table = measure_table(model, steps, "prune", SHAPE, 4, torch.device("cpu"), min_ratio=0.1, rounds=3)
    assert set(table.layers) == {s.name for s in steps}
    for entry in table.layers.values():
        assert entry.ratios[0] == 0.1 and np.all(np.diff(entry.factorized_ms) >= 0)
    # a pruned model's layers are plain and narrower: predicted at their kept fraction of channels
    _, _, cache = pruning_cache(model)
    plans = [plan_layer(step, 0.5, "prune") for step in steps]
    pruned = describe_layers(decompose_model(model, plans, cache), SHAPE)
    expected = table.fixed_ms + sum(
        table.layers[p.name].factorized(p.ranks[0] / s.in_channels) for p, s in zip(plans, steps, strict=True)
    )
    assert predicted_latency_ratio(table, pruned, layers) == pytest.approx(expected / table.model_ms)
    assert predicted_latency_ratio(table, layers, layers) == pytest.approx(1.0)


def test_a_pruning_search_with_a_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("RLRANK_CACHE", str(tmp_path / "cache"))
    args = [
        *SEARCH,
        "--flops",
        "0.6",
        "--latency",
        "1.0",
        "--latency-batch",
        "8",
        "--out",
        str(tmp_path / "runs"),
    ]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert rows and all(r["latency_ratio"] <= 1.0 + 1e-9 and r["flops_ratio"] <= 0.6 + 1e-9 for r in rows)
    report = json.loads((run / "report.json").read_text())
    assert 0 < report["predicted_latency_ratio"] <= 1.0 + 1e-9
