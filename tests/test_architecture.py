"""The package's shape: one job per module, imports that point one way, and the plug-in points
(compression methods, agents, callbacks, the generated command line) working from outside."""

from __future__ import annotations

import ast
import inspect
import json
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rlrank
from rlrank import errors
from rlrank.agents.base import Agent
from rlrank.agents.registry import _REGISTRY as AGENTS
from rlrank.agents.registry import AgentSpec, list_agents
from rlrank.callbacks import CallbackList, SearchCallback
from rlrank.checkpoint import SearchProgress
from rlrank.config import SearchConfig
from rlrank.describe import describe_layers
from rlrank.envs import Evaluation, RankSearchEnv
from rlrank.evaluator_pool import InProcessPool
from rlrank.factor_cache import FactorCache
from rlrank.methods import _REGISTRY as METHODS
from rlrank.methods import SVD, get_method, list_methods
from rlrank.models import ModelSpec, build_model
from rlrank.options import cli_fields
from rlrank.planning import is_compressible, plan_layer
from rlrank.records import EpisodeRow
from rlrank.runlog import read_rows
from rlrank.search import build_parser, config_from_args, main
from rlrank.search_loop import run_episodes
from rlrank.surgery import decompose_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rlrank": ROOT / "rlrank", "rlrank.envs": ROOT / "envs", "rlrank.agents": ROOT / "agents"}
MAX_LINES = 500


def source_files() -> list[tuple[str, Path]]:
    found = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def imported_rlrank_modules(path: Path) -> set[str]:
    """Every ``rlrank...`` module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlrank"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("rlrank"))
    return names


@pytest.mark.parametrize("module,path", source_files(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_module_is_small_and_says_its_job(module, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (> {MAX_LINES}): split it"
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring.split()) >= 5, f"{module} has no docstring saying its job"


# Which rooms a room may not import (ARCHITECTURE.md, "Direction of imports").
HIGHER = {"rlrank.pipeline", "rlrank.stage", "rlrank.search", "rlrank.search_loop", "rlrank.callbacks",
          "rlrank.checkpoint", "rlrank.preflight", "rlrank.dense", "rlrank.report", "rlrank.analyze"}  # fmt: skip
FORBIDDEN = {
    # compression never knows about RL, the search or the data
    "rlrank.layers": {"rlrank.methods", *HIGHER, "rlrank.envs", "rlrank.agents", "rlrank.data"},
    "rlrank.methods": {
        *HIGHER,
        "rlrank.envs",
        "rlrank.agents",
        "rlrank.data",
        "rlrank.finetune",
        "rlrank.planning",
        "rlrank.factor_cache",
        "rlrank.surgery",
        "rlrank.model_file",
    },  # fmt: skip
    "rlrank.planning": {*HIGHER, "rlrank.envs", "rlrank.agents", "rlrank.factor_cache", "rlrank.surgery"},
    "rlrank.factor_cache": {*HIGHER, "rlrank.envs", "rlrank.agents", "rlrank.surgery"},
    "rlrank.surgery": {*HIGHER, "rlrank.envs", "rlrank.agents", "rlrank.model_file"},
    "rlrank.model_file": {*HIGHER, "rlrank.envs", "rlrank.agents"},
    # the env does not know which agent drives it, nor how rewards are computed
    "rlrank.envs": {
        *HIGHER,
        "rlrank.agents",
        "rlrank.reward",
        "rlrank.finetune",
        "rlrank.factor_cache",
        "rlrank.evaluator_pool",
        "rlrank.ray_pool",
    },  # fmt: skip
    # where strategies are priced knows nothing of agents or the loop that drives it
    "rlrank.evaluator_pool": {*HIGHER, "rlrank.agents"},
    "rlrank.ray_pool": {*HIGHER, "rlrank.agents"},
    # agents never touch a network being compressed
    "rlrank.agents": {
        *HIGHER,
        "rlrank.models",
        "rlrank.data",
        "rlrank.finetune",
        "rlrank.factor_cache",
        "rlrank.surgery",
        "rlrank.describe",
        "rlrank.reward",
        "rlrank.methods",
    },  # fmt: skip
    # the analysis reads logs only
    "rlrank.analysis": {
        *HIGHER,
        "rlrank.envs",
        "rlrank.agents",
        "rlrank.methods",
        "rlrank.models",
        "rlrank.finetune",
        "rlrank.data",
    },  # fmt: skip
}


@pytest.mark.parametrize("module,path", source_files(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_one_way(module, path):
    rules = [
        forbidden for room, forbidden in FORBIDDEN.items() if module == room or module.startswith(room + ".")
    ]
    for forbidden in rules:
        for name in imported_rlrank_modules(path):
            hits = [f for f in forbidden if name == f or name.startswith(f + ".")]
            assert not hits, f"{module} imports {name}, which its room may not"


def test_every_error_derives_from_the_one_base():
    classes = []
    for module, _ in source_files():
        mod = __import__(module, fromlist=["_"])
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module:
                classes.append(obj)
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, errors.RlrankError), (
            f"{cls.__module__}.{cls.__name__} is outside the hierarchy"
        )
        kinds = [issubclass(cls, k) for k in (errors.UserError, errors.RunFailure, errors.Interrupted)]
        assert sum(kinds) == 1 or cls is errors.RlrankError, f"{cls.__name__} is not exactly one kind"


# ---------------------------------------------------------------------------- the generated CLI


def test_every_config_field_is_an_option_with_the_same_default():
    parser = build_parser()
    dests = {action.dest: action for action in parser._actions}
    for f in cli_fields(SearchConfig):
        assert f.name in dests, f"--{f.name} missing"
        assert f.metadata["help"] is not None
    assert config_from_args(parser.parse_args([])) == SearchConfig()
    text = parser.format_help()
    for flag in (
        "--flops",
        "--no-fill-budget",
        "--no-start-at-center",
        "--no-latency",
        "--resume",
        "--quiet",
    ):
        assert flag in text
    assert "(default: 0.5)" in text and "tucker2, svd, cp" not in text or "tucker2" in text


def test_parsed_options_reach_the_config():
    args = build_parser().parse_args(
        ["--flops", "0.3", "--no-fill-budget", "--stage-budgets", "0.6,0.3", "--stages", "2", "--no-latency"]
    )
    config = config_from_args(args)
    assert config.flops == 0.3 and config.fill_budget is False and config.latency is False
    assert config.stage_budgets == [0.6, 0.3] and config.stages == 2


# ---------------------------------------------------------------------------- plug-ins


class ScaledSVD(SVD):
    """A compression method defined outside the package: SVD under another name."""

    name = "svd-plugin"


@pytest.fixture
def plugin_method(monkeypatch):
    monkeypatch.setitem(METHODS, ScaledSVD.name, ScaledSVD())
    return ScaledSVD.name


def test_a_registered_method_is_a_decomposition_everywhere(plugin_method, tmp_path):
    assert plugin_method in list_methods() and get_method(plugin_method).name == plugin_method
    assert plugin_method in build_parser().format_help()
    torch.manual_seed(0)
    model = build_model(ModelSpec("tiny", 10, 1, 8)).eval()
    layers = [layer for layer in describe_layers(model, (1, 8, 8)) if is_compressible(layer, plugin_method)]
    cache = FactorCache(model, layers, plugin_method)
    x = torch.randn(2, 1, 8, 8)
    # full rank reproduces the layer
    conv = layers[1]
    full = cache.build(conv.name, get_method(plugin_method).full_ranks(conv))
    assert full.method == plugin_method
    inputs = torch.randn(2, conv.in_channels, *conv.in_hw)
    assert torch.allclose(full(inputs), model.get_submodule(conv.name)(inputs), atol=1e-5)
    # a strategy, the model file, and a reload
    compressed = decompose_model(model, [plan_layer(layer, 0.5, plugin_method) for layer in layers], cache)
    expected = {layer.name: "svd" if layer.is_pointwise else plugin_method for layer in layers}
    assert {layer.name: layer.method for layer in describe_layers(compressed, (1, 8, 8))} == expected
    path = rlrank.save(tmp_path / "model.pt", compressed, ModelSpec("tiny", 10, 1, 8))
    reloaded = rlrank.load(path)
    assert torch.equal(reloaded(x), compressed.eval()(x))
    assert {layer.name: layer.method for layer in describe_layers(reloaded, (1, 8, 8))} == expected


class AlwaysCenter(Agent):
    """An agent defined outside the package: action 0 at every step."""

    name = "always-center"

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    def phase(self, episode: int) -> str:
        return "center"


def test_a_registered_agent_runs_from_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setitem(AGENTS, "always-center", AgentSpec("always-center", lambda context: AlwaysCenter()))
    assert "always-center" in list_agents()
    args = ["--model", "tiny", "--agent", "always-center", "--episodes", "2", "--dense-epochs", "0.2",
            "--final-epochs", "0", "--finetune-steps", "1", "--quiet", "--no-latency", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_rows(run / "stage-1" / "episodes.jsonl")
    assert [r["phase"] for r in rows] == ["center", "center"] and rows[0]["layers"] == rows[1]["layers"]
    assert not (run / "stage-1" / "policy").exists()  # nothing learned, nothing saved
    assert json.loads((run / "report.json").read_text())["agent"] == "always-center"


class Recorder(SearchCallback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_search_start(self, progress: SearchProgress) -> None:
        self.calls.append(("start", progress.episodes_done))

    def on_episode_end(self, row: EpisodeRow, progress: SearchProgress) -> None:
        self.calls.append(("episode", row.episode))

    def on_search_end(self, progress: SearchProgress) -> None:
        self.calls.append(("end", progress.episodes_done))


class StubEvaluator:
    def __init__(self) -> None:
        self.episodes: list[tuple[int, int]] = []

    def set_episode(self, stage: int, episode: int) -> None:
        self.episodes.append((stage, episode))

    def __call__(self, plans) -> Evaluation:
        return Evaluation(accuracy=sum(p.ratio for p in plans) / len(plans), loss=0.1)


def test_the_loop_calls_every_hook_in_order_and_continues_from_progress():
    layers = describe_layers(build_model(ModelSpec("tiny", 10, 1, 8)), (1, 8, 8))
    evaluator = StubEvaluator()
    env = RankSearchEnv(layers, None, budget=0.5)
    recorder = Recorder()
    progress = SearchProgress(episodes_done=1)
    run_episodes(env, AlwaysCenter(), InProcessPool(evaluator), 1, 0.5, 3, progress, CallbackList([recorder]))
    assert recorder.calls == [("start", 1), ("episode", 1), ("episode", 2), ("end", 3)]
    assert evaluator.episodes == [(1, 1), (1, 2)] and progress.episodes_done == 3


def test_episode_rows_round_trip_through_the_log(tmp_path):
    from rlrank.runlog import append_row

    row = EpisodeRow(1, 0, "ddpg", 0.5, 0.9, 0.9, None, 0.5, 0.4, None, {"total": 1.0},
                     {"conv1": {"ratio": 0.5, "ranks": [2, 1], "method": "tucker2"}}, phase="center")  # fmt: skip
    append_row(tmp_path / "log.jsonl", row.to_dict())
    (back,) = read_rows(tmp_path / "log.jsonl")
    assert EpisodeRow.from_dict(back) == row and back["phase"] == "center"


def test_no_module_is_left_unimported():
    """Every module of the three packages imports (no dead file that nothing can load)."""
    for package, folder in PACKAGES.items():
        for info in pkgutil.walk_packages([str(folder)], prefix=package + "."):
            __import__(info.name)
    assert isinstance(nn.Module, type)


def test_a_method_decides_how_its_replacement_goes_into_the_model(plugin_method, monkeypatch):
    """The hook a channel-pruning method needs: ``apply`` may change more than the layer itself."""
    calls = []

    def apply(self, model, name, module):
        calls.append(name)
        SVD.apply(self, model, name, module)
        model.touched = True

    monkeypatch.setattr(ScaledSVD, "apply", apply)
    model = build_model(ModelSpec("tiny", 10, 1, 8)).eval()
    layers = [layer for layer in describe_layers(model, (1, 8, 8)) if is_compressible(layer, plugin_method)]
    plans = [plan_layer(layer, 0.5, plugin_method) for layer in layers]
    compressed = decompose_model(model, plans, FactorCache(model, layers, plugin_method))
    kxk = [p.name for p in plans if not p.dense and p.method == plugin_method]
    assert calls == kxk and compressed.touched and not hasattr(model, "touched")
