"""The latency budget: per-layer tables, the env's latency walls, the dense fallback, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import rlrank.latency_table as latency_module
from rlrank.describe import describe_layers
from rlrank.envs import Evaluation, RankSearchEnv
from rlrank.envs.latency_budget import LatencyBudgetError, played_dense_from
from rlrank.latency_table import LatencyTable, LayerLatency, latency_table
from rlrank.models import ModelSpec, build_model
from rlrank.planning import full_ranks, is_compressible, plan_layer
from rlrank.runlog import read_rows
from rlrank.search import main

FAST = [
    "--model", "tiny", "--episodes", "6", "--warmup", "2", "--dense-epochs", "0.3", "--final-epochs", "0",
    "--finetune-steps", "1", "--bn-batches", "1", "--quiet", "--no-latency", "--latency-batch", "8",
]  # fmt: skip


@pytest.fixture(scope="module")
def resnet20_steps():
    layers = describe_layers(build_model(ModelSpec("resnet20", 10, 3, 32)), (3, 32, 32))
    return layers, [layer for layer in layers if is_compressible(layer, "tucker2")]


def synthetic_table(steps, slow: set[str] = frozenset(), fixed_ms: float = 2.0) -> LatencyTable:
    """Latency proportional to MACs (dense: 1 ms per 10 M MACs); factorized: linear in the ratio from
    10 % to 110 % of dense, or for layers in ``slow`` always 1.5x dense."""
    grid = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    layers = {}
    for step in steps:
        dense = step.macs / 1e7
        ms = [1.5 * dense] * len(grid) if step.name in slow else [dense * (0.1 + r) for r in grid]
        layers[step.name] = LayerLatency(step.name, dense, grid, ms)
    total = fixed_ms + sum(entry.dense_ms for entry in layers.values())
    return LatencyTable("cpu", 64, total, fixed_ms, layers)


def evaluator(plans):
    return Evaluation(accuracy=float(np.mean([p.ratio for p in plans])), loss=0.5)


def random_episode(env, rng):
    env.reset()
    while True:
        _, _, done, _, info = env.step(rng.uniform(-1, 1, size=1).astype(np.float32))
        if done:
            return info


def test_both_budgets_hold_in_every_random_episode(resnet20_steps):
    layers, steps = resnet20_steps
    table = synthetic_table(steps)
    env = RankSearchEnv(layers, evaluator, budget=0.6, latency_table=table, latency_budget=0.5)
    check_env(env, skip_render_check=True)
    rng = np.random.default_rng(0)
    latencies, flops = [], []
    for _ in range(150):
        info = random_episode(env, rng)
        latencies.append(info["latency_ratio"])
        flops.append(info["flops_ratio"])
    assert max(latencies) <= 0.5 + 1e-9 and max(flops) <= 0.6 + 1e-9
    # the latency budget binds here, and the lower wall spends it
    assert min(latencies) > 0.45
    # predicted latency is what the table says of the chosen plans
    plans = info["plans"]
    by_name = {step.name: step for step in steps}

    def built(plan):  # the ratio the plan's rounded ranks are built at
        full = full_ranks(by_name[plan.name], plan.method)
        return min(1.0, max(r / f for r, f in zip(plan.ranks, full, strict=True)))

    predicted = table.fixed_ms + sum(
        table.layers[p.name].dense_ms if p.dense else table.layers[p.name].factorized(built(p)) for p in plans
    )
    assert info["latency_ratio"] == pytest.approx(predicted / table.model_ms)


def test_without_a_latency_budget_nothing_changes(resnet20_steps):
    layers, steps = resnet20_steps
    plain = RankSearchEnv(layers, evaluator, budget=0.5)
    with_table = RankSearchEnv(layers, evaluator, budget=0.5, latency_table=synthetic_table(steps))
    rng1, rng2 = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        a, b = random_episode(plain, rng1), random_episode(with_table, rng2)
        assert a["ratios"] == b["ratios"] and "latency_ratio" not in a


def test_a_layer_that_factorizes_slower_stays_dense(resnet20_steps):
    layers, steps = resnet20_steps
    slow = steps[3].name
    table = synthetic_table(steps, slow={slow})
    assert played_dense_from(steps[3], table.layers[slow], 0.05, "tucker2") == pytest.approx(0.05)
    env = RankSearchEnv(layers, evaluator, budget=0.9, latency_table=table, latency_budget=0.95)
    rng = np.random.default_rng(1)
    for _ in range(30):
        info = random_episode(env, rng)
        assert info["ranks"][slow] is None  # never factorized: it would only be slower
        assert info["latency_ratio"] <= 0.95 + 1e-9


def test_the_flop_budget_overrides_the_dense_fallback(resnet20_steps):
    layers, steps = resnet20_steps
    table = synthetic_table(steps, slow={step.name for step in steps})  # factorizing only slows down
    kept = RankSearchEnv(layers, evaluator, budget=1.0, latency_table=table, latency_budget=1.0)
    assert all(ratio is not None for ratio in kept._dense_from)  # free to stay dense: all do
    info = random_episode(kept, np.random.default_rng(0))
    assert all(ranks is None for ranks in info["ranks"].values()) and info["latency_ratio"] == pytest.approx(
        1.0
    )
    # at half the FLOPs some layers must be factorized, slower or not: priced at their real latency
    env = RankSearchEnv(layers, evaluator, budget=0.5, latency_table=table, latency_budget=1.5)
    rng = np.random.default_rng(2)
    for _ in range(20):
        info = random_episode(env, rng)
        assert info["flops_ratio"] <= 0.5 + 1e-9 and 1.0 < info["latency_ratio"] <= 1.5 + 1e-9
    with pytest.raises(LatencyBudgetError):
        RankSearchEnv(layers, evaluator, budget=0.5, latency_table=table, latency_budget=1.0)


def test_dense_from_is_where_the_built_form_meets_dense(resnet20_steps):
    _, steps = resnet20_steps
    layer = next(step for step in steps if step.name == "layer1.0.conv1")  # 16 -> 16: ranks of 16
    entry = LayerLatency(layer.name, 1.0, [0.05, 0.5, 1.0], [0.2, 0.6, 1.4])
    assert entry.factorized(0.3) == pytest.approx(0.2 + 0.4 * 0.25 / 0.45)  # linear between grid points
    # the curve meets dense at 0.75; ratios are played continuously, ranks come in sixteenths
    found = played_dense_from(layer, entry, 0.05, "tucker2")
    ranks = plan_layer(layer, found, "tucker2", allow_dense=False).ranks
    assert max(ranks) / 16 >= 0.75 and max(plan_layer(layer, found - 1e-6, "tucker2").ranks) / 16 < 0.75
    assert played_dense_from(layer, LayerLatency("y", 1.0, [0.05, 1.0], [0.2, 0.9]), 0.05, "tucker2") is None
    # below dense at the played 0.05 but not at rank 1 (1/16 = 0.0625): dense from the start
    steep = LayerLatency("z", 1.0, [0.05, 0.06, 1.0], [0.9, 1.0, 2.0])
    assert played_dense_from(layer, steep, 0.05, "tucker2") == pytest.approx(0.05)


def test_rounded_ranks_never_price_a_layer_above_dense_at_its_lowest_ratio(resnet20_steps):
    layers, steps = resnet20_steps
    grid = [0.05, 0.06, 1.0]  # faster than dense only below the smallest rank any layer can have
    table = synthetic_table(steps)
    for step in steps:
        dense = table.layers[step.name].dense_ms
        table.layers[step.name] = LayerLatency(step.name, dense, grid, [0.9 * dense, 1.0 * dense, 2 * dense])
    table.model_ms = table.fixed_ms + sum(entry.dense_ms for entry in table.layers.values())
    env = RankSearchEnv(layers, evaluator, budget=1.0, latency_table=table, latency_budget=1.0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert random_episode(env, rng)["latency_ratio"] <= 1.0 + 1e-9


def test_an_unreachable_latency_budget_names_the_smallest(resnet20_steps):
    layers, steps = resnet20_steps
    table = synthetic_table(steps)

    def built(step):  # ratio 0.05, as the rounded ranks build it (at least rank 1)
        plan = plan_layer(step, 0.05, "tucker2")
        return max(r / f for r, f in zip(plan.ranks, full_ranks(step, plan.method), strict=True))

    fastest = table.fixed_ms + sum(table.layers[step.name].factorized(built(step)) for step in steps)
    with pytest.raises(LatencyBudgetError) as info:
        RankSearchEnv(layers, evaluator, budget=0.5, latency_table=table, latency_budget=0.05)
    assert f"smallest reachable latency budget is {fastest / table.model_ms:.4f}" in str(info.value)


def test_the_table_is_measured_once_then_cached(tmp_path, monkeypatch):
    model = build_model(ModelSpec("tiny", 10, 1, 8))
    layers = describe_layers(model, (1, 8, 8))
    steps = [layer for layer in layers if is_compressible(layer, "tucker2")]
    args = (model, steps, "tucker2", (1, 8, 8), 4, torch.device("cpu"), tmp_path)
    table = latency_table(*args, min_ratio=0.1)
    assert set(table.layers) == {s.name for s in steps} and table.model_ms > 0 and table.fixed_ms >= 0
    for entry in table.layers.values():
        assert entry.ratios[0] == 0.1 and np.all(np.diff(entry.factorized_ms) >= 0)
    (cached,) = (tmp_path / "latency").glob("*.json")
    assert json.loads(cached.read_text())["format"] == "rlrank-latency/3"

    def no_timing(*a, **k):
        raise AssertionError("timed again although the table is cached")

    monkeypatch.setattr(latency_module, "measure_table", no_timing)
    again = latency_table(*args, min_ratio=0.1)
    assert again.layers == table.layers
    with pytest.raises(AssertionError):  # another batch size is another table
        latency_table(model, steps, "tucker2", (1, 8, 8), 5, torch.device("cpu"), tmp_path, 0.1)


def test_a_search_with_a_latency_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("RLRANK_CACHE", str(tmp_path / "cache"))
    # a latency budget alone (no --flops): whatever this machine's timings, 1.0 is reachable
    assert main([*FAST, "--latency", "1.0", "--out", str(tmp_path / "runs")]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert len(rows) == 6
    assert all(row["latency_ratio"] <= 1.0 + 1e-9 for row in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["latency_budget"] == 1.0 and config["flops"] == 1.0
    report = json.loads((run / "report.json").read_text())
    assert report["latency_budget"] == 1.0 and 0 < report["predicted_latency_ratio"] <= 1.0 + 1e-9
    # the env priced the chosen strategy as the report prices the model built from it
    best = json.loads((run / "stage-1" / "best_strategy.json").read_text())["episode"]
    (row,) = [row for row in rows if row["episode"] == best]
    assert row["latency_ratio"] == pytest.approx(report["predicted_latency_ratio"], abs=1e-9)
    assert list((tmp_path / "cache" / "latency").glob("*.json"))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--latency", "0.001"], "smallest reachable latency budget"),
        (["--latency", "0.001", "--flops", "0.5"], "smallest reachable latency budget"),
        (["--latency", "0.5", "--stages", "2"], "one stage"),
        (["--latency", "1.5"], "--latency"),
    ],
)
def test_bad_latency_budgets_are_one_line(argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLRANK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    assert main([*FAST, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert fragment in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists() or not list(Path(out).iterdir())


def test_the_dense_strategy_predicts_exactly_the_dense_latency():
    # layers timed one by one can sum to more than the whole model (noise on a tiny model)
    layers = {
        "a": LayerLatency("a", 0.6, [0.05, 1.0], [0.1, 0.7]),
        "b": LayerLatency("b", 0.5, [0.05, 1.0], [0.1, 0.6]),
    }
    table = LatencyTable("cpu", 8, model_ms=1.0, fixed_ms=0.0, layers=layers)
    assert table.model_ms == pytest.approx(1.1)
    assert LatencyTable.from_dict(table.to_dict()).model_ms == pytest.approx(1.1)
    kept = LatencyTable("cpu", 8, model_ms=2.0, fixed_ms=0.9, layers=layers)
    assert kept.model_ms == pytest.approx(2.0)
