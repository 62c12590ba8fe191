"""Smoke tests of the benchmark scripts in ``experiments/``: each script's ``main`` at tiny settings.

Every script runs on the embedded digits (``--dataset digits``, ``--model tiny``) or on tiny models,
with ``--no-append`` and every output under ``tmp_path``; a fixture checks that
``experiments/RESULTS.md`` and ``experiments/results/`` are left as they were. The searches are
subprocesses (``python -m rlrank.search``, about 5 s each on 2 cores), run on one thread.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RESULTS = EXPERIMENTS / "RESULTS.md"
RESULTS_DIR = EXPERIMENTS / "results"

# rlrank.search options that keep a digits search at a few seconds
TINY_SEARCH = ["--finetune-steps", "1", "--reward-val-images", "100"]


def _snapshot() -> dict[str, str]:
    """Hashes of RESULTS.md and every file in experiments/results (what the tests must not touch)."""
    files = [RESULTS, *sorted(RESULTS_DIR.rglob("*"))] if RESULTS_DIR.is_dir() else [RESULTS]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files if path.is_file()}


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[str], ModuleType]]:
    """Import a benchmark script by name (experiments/ on sys.path, cwd in tmp_path, one thread)."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.chdir(tmp_path)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(variable, "1")  # the search subprocesses
    before = _snapshot()
    yield importlib.import_module
    assert _snapshot() == before, "a smoke test changed experiments/RESULTS.md or experiments/results/"


def _tables(text: str) -> list[pd.DataFrame]:
    """Every Markdown table in ``text``, as frames of strings."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block]
            assert all(set(c) <= set("-:") for c in cells[1]), f"not a table rule: {block[1]}"
            assert all(len(row) == len(cells[0]) for row in cells), block
            tables.append(pd.DataFrame(cells[2:], columns=cells[0]))
            block = []
    return tables


def _section(printed: str, title: str) -> str:
    """The printed Markdown section that starts with ``## title``."""
    assert f"## {title}" in printed, printed[-2000:]
    section = printed[printed.index(f"## {title}") :]
    assert "- command: `" in section and "- device: " in section
    return section


def _complete_runs(out: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in out.glob("*/*/report.json"))


# ------------------------------------------------------------------------------------------
# recording.py
# ------------------------------------------------------------------------------------------


def test_markdown_renders_a_frame_with_column_formats(script: Callable[[str], ModuleType]) -> None:
    recording = script("recording")
    frame = pd.DataFrame(
        {
            "method": ["uniform", "a|b"],
            "budget": [0.5, 0.25],
            "Δ": [0.01234, float("nan")],
            "reward": [0.123456, 0.5],
            "evals": [1, 40],
            "mean": [recording.mean_spread([0.5]), recording.mean_spread([0.5, 0.7], digits=2)],
        }
    )
    text = recording.markdown(frame, {"budget": "g", "Δ": "+.3f"})
    assert text.splitlines() == [
        "| method | budget | Δ | reward | evals | mean |",
        "|---|---:|---:|---:|---:|---|",
        "| uniform | 0.5 | +0.012 | 0.1235 | 1 | 0.5000 |",
        "| a\\|b | 0.25 |  | 0.5000 | 40 | 0.60 ± 0.14 |",
    ]
    assert recording.mean_spread([-0.01, -0.03], signed=True) == "-0.0200 ± 0.0141"
    assert recording.mean_spread([0.01], signed=True) == "+0.0100"


def test_dataset_option_replaces_the_shared_data(script: Callable[[str], ModuleType]) -> None:
    import argparse

    recording = script("recording")
    parser = argparse.ArgumentParser()
    recording.add_cifar_options(parser, out="bench-runs/x")
    cifar = recording.cifar_run_args(parser.parse_args([]))
    assert cifar[cifar.index("--dataset") + 1] == "imagefolder"
    assert cifar[cifar.index("--checkpoint") + 1].endswith("resnet20-jpeg.pt")
    digits = recording.cifar_run_args(parser.parse_args(["--dataset", "digits", "--model", "tiny"]))
    assert digits[:6] == ["--model", "tiny", "--dataset", "digits", "--dense-epochs", "1"]
    assert "--checkpoint" not in digits and "--data-dir" not in digits
    assert digits[digits.index("--finetune-steps") + 1] == "10"
    with pytest.raises(ValueError, match="unknown benchmark dataset"):
        recording.data_args("tiny", "mnist")


# ------------------------------------------------------------------------------------------
# the benchmarks that run rlrank.search subprocesses
# ------------------------------------------------------------------------------------------


def test_run_search_resumes_a_run_that_a_cap_killed(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = script("recording")
    args = ["--model", "tiny", "--dataset", "digits", "--dense-epochs", "1", *TINY_SEARCH]
    args += ["--agent", "random", "--episodes", "3", "--final-epochs", "0.1", "--no-latency"]
    first = recording.run_search("killed", args, tmp_path / "runs")
    episodes = (first.run_dir / "stage-1" / "episodes.jsonl").read_text()
    (first.run_dir / "report.json").unlink()  # as if killed in the final fine-tune
    assert recording.interrupted_run(tmp_path / "runs" / "killed") == first.run_dir
    capsys.readouterr()
    again = recording.run_search("killed", args, tmp_path / "runs")
    assert "--resume" in capsys.readouterr().out and not again.reused
    assert again.run_dir == first.run_dir and len(list((tmp_path / "runs" / "killed").iterdir())) == 1
    assert (again.run_dir / "stage-1" / "episodes.jsonl").read_text() == episodes  # no search again
    assert again.report["compressed"]["test_accuracy"] == first.report["compressed"]["test_accuracy"]
    assert recording.interrupted_run(tmp_path / "runs" / "killed") is None


def test_bench_default(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search = [*TINY_SEARCH, "--episodes", "2", "--warmup", "1", "--dense-epochs", "1"]
    search += ["--final-epochs", "0.1", "--no-latency"]
    argv = ["--model", "tiny", "--baselines", "uniform", "--out", str(tmp_path / "runs"), "--no-append"]
    assert script("bench_default").main([*argv, "--search-args", " ".join(search)]) == 0
    section = _section(capsys.readouterr().out, "Embedded default: DDPG vs baselines (tiny, digits")
    assert "python -m rlrank.search --model tiny --flops 0.5 --finetune-steps 1" in section
    (table,) = _tables(section)
    assert list(table.columns) == [
        "agent", "seeds", "best val reward", "test acc", "Δ test vs dense", "FLOP ratio",
        "param ratio", "reward evals", "search s", "run wall s",
    ]  # fmt: skip
    assert table["agent"].tolist() == ["ddpg", "uniform"]
    assert table["reward evals"].tolist() == ["2", "1"]
    assert _complete_runs(tmp_path / "runs") == ["main-job", "uniform-seed0"]


def test_bench_stages(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--model", "tiny", "--flops", "0.4", "--stages", "2", "--episodes", "2"]
    argv += ["--epochs", "0.2", *TINY_SEARCH, "--search-args=--no-latency", "--out", str(tmp_path / "runs")]
    assert script("bench_stages").main([*argv, "--no-append"]) == 0
    section = _section(capsys.readouterr().out, "Multi-stage vs one stage (tiny, digits, --flops 0.4)")
    stages, final = _tables(section)
    assert list(stages.columns) == [
        "run", "stage", "budget", "FLOP ratio", "param ratio", "best val reward",
        "val acc after fine-tune", "episodes", "stage wall s",
    ]  # fmt: skip
    assert stages[["run", "stage"]].values.tolist() == [["stages1", "1"], ["stages2", "1"], ["stages2", "2"]]
    assert stages.groupby("run")["budget"].last().tolist() == ["0.400", "0.400"]  # --flops reaches the search
    assert list(final.columns) == [
        "run", "test acc", "Δ test vs dense", "FLOP ratio", "reward evals", "run wall s",
    ]  # fmt: skip
    assert final["run"].tolist() == ["stages1", "stages2"]
    assert final["reward evals"].tolist() == ["2", "2"]


def test_bench_policy_reuse(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--model", "tiny", "--train-budgets", "0.4,0.6", "--train-episodes", "2"]
    argv += ["--targets", "0.5", "--variants", "zero-shot", "--final-epochs", "0.1", *TINY_SEARCH]
    argv += ["--search-args=--no-latency", "--out", str(tmp_path / "runs"), "--no-append"]
    assert script("bench_policy_reuse").main(argv) == 0
    section = _section(capsys.readouterr().out, "Policy reuse across budgets (tiny, digits)")
    assert "- runs: 2 made, 0 complete runs" in section
    (table,) = _tables(section)
    assert list(table.columns) == [
        "budget", "variant", "best val reward", "val acc after fine-tune", "test acc",
        "Δ test vs dense", "FLOP ratio", "reward evals", "search s",
    ]  # fmt: skip
    assert table[["budget", "variant"]].values.tolist() == [["0.5", "zero-shot"]]
    assert table["reward evals"].tolist() == ["1"]  # the saved policy's deterministic roll-out
    assert _complete_runs(tmp_path / "runs") == ["flops0.5-zero-shot", "train"]


def test_bench_methods(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--model", "tiny", "--methods", "tt", "prune", "mixed", "--episodes", "2"]
    argv += ["--final-epochs", "0.1", *TINY_SEARCH, "--out", str(tmp_path / "runs"), "--no-append"]
    assert script("bench_methods").main(argv) == 0
    section = _section(capsys.readouterr().out, "Compression methods (tiny, digits, --flops 0.5)")
    (table,) = _tables(section)
    assert list(table.columns) == [
        "method", "best val reward", "test acc", "Δ test vs dense", "FLOP ratio", "param ratio",
        "pruned / pairs", "latency b1 ms (speed-up)", "latency b64 ms (speed-up)", "b64 speed-up fast",
        "b64 fast / FLOP speed-up", "search s", "run wall s",
    ]  # fmt: skip
    assert table["method"].tolist() == ["tt", "prune", "mixed"]
    assert table["pruned / pairs"].tolist()[:2] == ["0 / 1", "1 / 1"]  # tiny: one pair (conv2, conv3)
    assert table["pruned / pairs"].tolist()[2] in ("0 / 1", "1 / 1")
    flop_speedup = 1 / table["FLOP ratio"].astype(float)
    ratio = table["b64 speed-up fast"].astype(float) / flop_speedup
    assert (abs(ratio - table["b64 fast / FLOP speed-up"].astype(float)) < 0.02).all()
    assert (table["FLOP ratio"].astype(float) <= 0.5).all()
    assert table["latency b1 ms (speed-up)"].str.endswith("x)").all()
    assert "- best in this table for test accuracy: " in section
    assert _complete_runs(tmp_path / "runs") == [
        "flops0.5-mixed-seed0", "flops0.5-prune-seed0", "flops0.5-tt-seed0"
    ]  # fmt: skip


def _selectors_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "digits", "--model", "tiny", "--budgets", "0.5", "--seeds", "0", "--episodes", "2",
        "--final-epochs", "0.1", *TINY_SEARCH, "--csv-dir", str(tmp_path / "csv"),
        "--out", str(tmp_path / "runs"), "--no-append", *extra,
    ]  # fmt: skip


RESULTS_COLUMNS = [
    "budget", "method", "seeds", "best val reward", "test acc", "Δ test", "FLOP ratio", "param ratio",
    "latency b1 ms (speed-up)", "latency b64 ms (speed-up)", "FLOP speed-up", "search s", "reward evals",
]  # fmt: skip
COST_COLUMNS = [
    "budget", "method", "episodes", "decompose", "BN + fine-tune", "evaluate", "agent", "env", "total",
    "env + agent share",
]  # fmt: skip


def test_bench_selectors(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _selectors_argv(tmp_path, "--methods", "uniform", "random", "--no-ablations")
    assert script("bench_selectors").main(argv) == 0
    section = _section(capsys.readouterr().out, "Rank selectors on digits (tiny, scale cpu)")
    csv = tmp_path / "csv" / "selectors-cpu.csv"
    assert f"per-run CSV: `{csv}`" in section
    frame = pd.read_csv(csv)
    assert frame[["budget", "method", "seed"]].values.tolist() == [[0.5, "uniform", 0], [0.5, "random", 0]]
    assert frame["reward_evaluations"].tolist() == [1, 2]
    results, cost = _tables(section)
    assert list(results.columns) == RESULTS_COLUMNS
    assert results[["budget", "method", "seeds"]].values.tolist() == [
        ["0.5", "uniform", "1"],
        ["0.5", "random", "1"],
    ]
    assert results["FLOP speed-up"].str.endswith("x").all()
    assert list(cost.columns) == COST_COLUMNS
    assert cost["env + agent share"].str.endswith("%").all()
    assert "Too few runs for a reward / final-accuracy correlation." in section
    # the learning curves of the searched runs (the rule's single episode is left out), from each
    # folder's finished run (an interrupted one beside it, sorted first, is passed over)
    (finished,) = (tmp_path / "runs" / "flops0.5-random-seed0").glob("*/report.json")
    interrupted = finished.parent.parent / "a-interrupted-run"
    interrupted.mkdir()
    (interrupted / "config.json").write_text((finished.parent / "config.json").read_text())
    plotter = script("plot_learning_curves")
    curves = plotter.curves(tmp_path / "runs", window=10, min_episodes=2)
    assert curves[["method", "seed"]].drop_duplicates().values.tolist() == [["random", 0]]
    assert curves["episode"].tolist() == [0, 1]
    png = tmp_path / "curves.png"
    plotter.main(["--runs", str(tmp_path / "runs"), "--out", str(png), "--min-episodes", "2"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no searched run"):
        plotter.curves(tmp_path / "runs", window=10, min_episodes=20)


def test_bench_top_strategies(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _selectors_argv(tmp_path, "--methods", "random", "--no-ablations", "--search-args=--spread 1")
    argv[argv.index("--episodes") + 1] = "5"
    assert script("bench_selectors").main(argv) == 0
    top = script("bench_top_strategies")
    (run,) = (tmp_path / "runs" / "flops0.5-random-seed0").glob("*/report.json")
    priced = top.price_run(run.parent, 3)
    # the reward's own images reproduce the logged rewards: the strategies are rebuilt faithfully
    assert priced["reward images"].tolist() == pytest.approx(priced["logged reward"].tolist(), abs=1e-9)
    assert priced["logged reward"].is_monotonic_decreasing and len(priced) == 3
    assert priced[["unseen val", "test (BN only)"]].notna().all().all()
    capsys.readouterr()
    assert (
        top.main(["--runs", str(tmp_path / "runs"), "--methods", "random", "--top", "3", "--no-append"]) == 0
    )
    (table,) = _tables(_section(capsys.readouterr().out, "Top strategies on images the search never scored"))
    assert table[["budget", "method", "runs"]].values.tolist() == [["0.5", "random", "1"]]
    assert "re-ranked test (BN only)" in table.columns


def test_unseen_images_are_those_no_reward_scored(script: Callable[[str], ModuleType]) -> None:
    import torch

    from rlrank.data import ImageSplit

    unseen = script("bench_top_strategies").unseen_images
    val = ImageSplit(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    assert unseen(Path("run"), val, 4).labels.tolist() == [4, 5, 6, 7, 8, 9]
    for reward_images in (0, 10):  # 0: the reward scored all of them
        with pytest.raises(SystemExit, match="the reward used all 10 validation images"):
            unseen(Path("run"), val, reward_images)


def test_bench_finetune_headroom(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    headroom = script("bench_finetune_headroom")
    argv = [
        "--dataset", "digits", "--model", "tiny", "--budgets", "0.5", "--episodes", "6", "--final-epochs",
        "0.1", *TINY_SEARCH, "--top", "2", "--quantiles", "1", "--ft-seeds", "2",
        "--out", str(tmp_path / "runs"), "--no-append",
    ]  # fmt: skip
    assert headroom.main(argv) == 0
    (table,) = _tables(_section(capsys.readouterr().out, "How far apart strategies are after the final"))
    (row,) = table.to_dict("records")
    # the best strategy's first fine-tune repeats the search's own: the same test accuracy
    assert row["search's pick (here)"] == row["search's pick (its report)"]
    assert int(row["fine-tunes"]) >= 4  # top 1 twice, top 2, a quantile (and the center unless it is top)
    assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}", row["pick, fine-tune seeds"])


def test_picked_strategies_are_distinct_and_keep_the_center(script: Callable[[str], ModuleType]) -> None:
    pick = script("bench_finetune_headroom").picked_rows
    rewards = [0.1, 0.5, 0.8, 0.7, 0.6, 0.3, 0.4]
    rows = [
        {
            "episode": i,
            "reward": r,
            "phase": "center" if i == 0 else "random",
            "layers": {"a": {"ranks": [i]}},
        }
        for i, r in enumerate(rewards)
    ]
    picked = [(role, row["episode"]) for role, row in pick(rows, 2, 2)]
    assert picked == [("top 1", 2), ("top 2", 3), ("quantile 0.33", 1), ("quantile 0.67", 6), ("center", 0)]
    rows[0]["reward"] = 0.9  # the center is the best: fine-tuned once, as the top strategy
    assert [role for role, _ in pick(rows, 2, 0)] == ["top 1 (center)", "top 2"]


def test_bench_prune_selection(
    script: Callable[[str], ModuleType],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rlrank.methods

    # the script registers its no-refit variant: other tests must see the built-in methods only
    monkeypatch.setattr(rlrank.methods, "_REGISTRY", dict(rlrank.methods._REGISTRY))
    argv = [
        "--dataset",
        "digits",
        "--model",
        "resnet20",
        "--methods",
        "prune",
        "--agent",
        "random",
        "--episodes",
        "4",
    ]
    argv += ["--final-epochs", "0", *TINY_SEARCH, "--out", str(tmp_path / "runs"), "--no-append"]
    assert script("bench_methods").main(argv) == 0
    selection = script("bench_prune_selection")
    (run,) = (tmp_path / "runs" / "flops0.5-prune-seed0").glob("*/report.json")
    priced = selection.price_run(run.parent, 2)
    # rlrank's own variant reproduces the logged rewards: the same channels, weights and BN batches
    assert priced["lasso + refit: reward"].tolist() == pytest.approx(
        priced["logged reward"].tolist(), abs=1e-9
    )
    assert priced.filter(like=": test").notna().all().all() and len(priced) == 2
    capsys.readouterr()
    assert selection.main(["--runs", str(tmp_path / "runs"), "--top", "2", "--no-append"]) == 0
    (table,) = _tables(_section(capsys.readouterr().out, "Channel selection of pruning (runs)"))
    assert table["variant"].tolist() == ["lasso + refit", "lasso", "norm"]


@pytest.mark.slow
def test_bench_selectors_with_ablations_and_correlation(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _selectors_argv(tmp_path, "--methods", "uniform", "energy", "ddpg", "--tag", "smoke")
    assert script("bench_selectors").main(argv) == 0
    section = _section(capsys.readouterr().out, "Rank selectors on digits (tiny, scale cpu)")
    results, _ = _tables(section)
    assert results["method"].tolist() == [
        "uniform",
        "energy",
        "ddpg",
        "uniform+distill",
        "uniform+data-aware",
    ]
    assert "- budget 0.5: Spearman ρ(best val reward, val acc after fine-tune) = " in section
    assert (tmp_path / "csv" / "selectors-cpu-smoke.csv").is_file()


# ------------------------------------------------------------------------------------------
# the benchmarks that run in-process (rlrank internals)
# ------------------------------------------------------------------------------------------


def test_bench_reward_noise(
    script: Callable[[str], ModuleType], single_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--model", "tiny", "--rules", "uniform", "energy", "--steps", "1", "2"]
    argv += ["--seeds", "2", "--reward-val-images", "100", "--device", "cpu", "--no-append"]
    assert script("bench_reward_noise").main(argv) == 0
    section = _section(
        capsys.readouterr().out, "Reward noise of the cheap fine-tune (tiny, digits, --flops 0.5)"
    )
    (table,) = _tables(section)
    assert list(table.columns) == ["SGD steps", "rule", "mean reward", "std over seeds", "min", "max"]
    assert table[["SGD steps", "rule"]].values.tolist() == [
        ["1", "uniform"], ["1", "energy"], ["2", "uniform"], ["2", "energy"],
    ]  # fmt: skip
    assert "- 1 steps: " in section and " of 2 seeds (order by mean: " in section


def test_bench_reward_fidelity(
    script: Callable[[str], ModuleType],
    single_thread: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--dataset", "digits", "--model", "tiny", "--strategies", "5", "--reference-epochs", "0.1"]
    argv += ["--results", str(tmp_path), "--bootstrap", "20", "--device", "cpu", "--no-append"]
    bench = script("bench_reward_fidelity")
    assert bench.main([*argv, "--phase", "references", "--max-new-references", "2"]) == 0
    printed = capsys.readouterr().out
    priced = [line for line in printed.splitlines() if line.startswith("reference ")]
    assert len(priced) == 2 and "2 of 5 references stored" in printed
    assert bench.main(argv) == 0  # the other 3 references, then every candidate
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if line.startswith("reference ")]) == 3
    section = _section(printed, "Reward fidelity (tiny, digits, --flops 0.5)")
    table, per_strategy = _tables(section)
    assert list(table.columns) == [
        "candidate",
        "Spearman",
        "Spearman 95% CI",
        "Kendall",
        "Kendall 95% CI",
        "s / eval",
    ]
    assert "bn+10 steps, 1000 val (today)" in set(table["candidate"])
    assert any(name.startswith("ranks of [") for name in table["candidate"])
    assert list(per_strategy["strategy"][:4]) == ["uniform", "energy", "vbmf", "alds"]
    references = pd.read_csv(tmp_path / "reward-fidelity-references.csv")
    assert len(references) == 5 and references["ranks"].is_unique
    assert bench.main(argv) == 0  # everything reused: nothing priced again
    assert not [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("reference ", "candidates "))
    ]
    assert len(pd.read_csv(tmp_path / "reward-fidelity-candidates.csv")) == len(
        pd.read_csv(tmp_path / "reward-fidelity-candidates.csv").drop_duplicates(["ranks", "candidate"])
    )


def test_bench_admm(
    script: Callable[[str], ModuleType],
    single_thread: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "--dataset",
        "digits",
        "--model",
        "tiny",
        "--flops",
        "0.5",
        "--epochs",
        "1",
        "--admm-epochs",
        "0.5",
    ]
    argv += ["--admm-rho", "0.05", "--device", "cpu", "--out", str(tmp_path), "--no-append"]
    assert script("bench_admm").main(argv) == 0
    section = _section(capsys.readouterr().out, "ADMM before decomposing (tiny, digits)")
    (table,) = _tables(section)
    assert list(table["variant"]) == [
        "decompose + fine-tune",
        "ADMM + decompose + fine-tune",
        "ADMM + sparse + decompose + fine-tune",
    ]
    plain, admm, sparse = (float(v) for v in table["decomposition error"])
    assert admm < plain and sparse < plain and table["error before ADMM"][0] in ("", "nan")
    assert script("bench_admm").main(argv) == 0  # complete runs are reused, not run again
    assert "plain-0.5: " not in capsys.readouterr().out
    assert script("bench_admm").main([*argv, "--variants", "sparse"]) == 0  # one variant alone
    section = _section(capsys.readouterr().out, "ADMM before decomposing (tiny, digits)")
    assert list(_tables(section)[0]["variant"]) == ["ADMM + sparse + decompose + fine-tune"]


def test_bench_decompose(
    script: Callable[[str], ModuleType],
    single_thread: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    results = tmp_path / "RESULTS.md"
    argv = ["--models", "tiny", "--repeats", "1", "--results", str(results), "--no-append"]
    assert script("bench_decompose").main(argv) == 0
    section = _section(capsys.readouterr().out, "Factor cache: cold vs warm strategy application (tucker2)")
    (table,) = _tables(section)
    assert list(table.columns) == [
        "model", "layers (compressible / all)", "cold s", "warm s", "speed-up", "cold runs s", "warm runs s",
    ]  # fmt: skip
    assert table["model"].tolist() == ["tiny"]
    assert table["speed-up"].str.endswith("x").all()
    assert not results.exists()


def test_bench_episode_cost(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the "before" run by another interpreter: here the same one, in another working directory
    argv = ["--dataset", "digits", "--model", "tiny", "--episodes", "3", "--out", str(tmp_path / "runs")]
    argv += ["--csv", str(tmp_path / "cost.csv"), "--no-append"]
    argv += ["--before-python", sys.executable, "--before-checkout", str(tmp_path)]
    script("bench_episode_cost").main(argv)
    section = _section(capsys.readouterr().out, "Episode cost (tiny, digits, --flops 0.5, DDPG)")
    (table,) = _tables(section)
    assert table["label"].tolist() == ["before", "after"]
    assert table["episodes"].tolist() == ["3", "3"]
    assert "Speed-up: **" in section
    frame = pd.read_csv(tmp_path / "cost.csv")
    assert (frame["episodes_per_hour"] > 0).all()
    assert frame["fidelity_spearman"].between(-1, 1).all()  # read from the stored fidelity CSV
    assert _complete_runs(tmp_path / "runs") == ["after", "before"]


def test_every_script_has_a_smoke_test() -> None:
    scripts = {path.stem for path in EXPERIMENTS.glob("bench_*.py")}
    tested = {name[len("test_") :] for name in globals() if name.startswith("test_bench_")}
    assert scripts <= tested, f"no smoke test for {sorted(scripts - tested)}"
    assert sys.modules[__name__].__doc__


def test_bench_load(script: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "tiny", "--steps", "2", "--load-procs", "1", "--no-append"]
    assert script("bench_load").main(argv) == 0
    section = _section(capsys.readouterr().out, "Under load: 2 SGD steps of tiny (digits, batch 64)")
    (table,) = _tables(section)
    assert table["machine"].tolist() == ["busy"] * 4 + ["idle"] * 4
    environments = ["(unset)", "(unset)", "OMP_WAIT_POLICY=PASSIVE", "GOMP_SPINCOUNT=10000"]
    assert table["OpenMP environment"].tolist() == environments * 2
    assert table["busy processes"].tolist() == ["1"] * 4 + ["0"] * 4
    assert table["torch threads"].tolist()[1] == "1" and table["torch threads"].tolist()[5] == "1"
    assert all(float(s) > 0 for s in table["2 SGD steps (s)"])


def test_bench_data(
    script: Callable[[str], ModuleType], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--synthetic", "100", "--size", "24", "--images", "40", "--workers", "0,1", "--no-cifar"]
    assert script("bench_data").main([*argv, "--work", str(tmp_path), "--no-append"]) == 0
    section = _section(capsys.readouterr().out, "Data path: in memory vs streamed from disk")
    (table,) = _tables(section)
    assert table["loading"].tolist() == [
        "memory (cold)",
        "memory (cached)",
        "stream, 0 workers",
        "stream, 1 worker",
    ]
    assert table["pass images"].tolist() == ["40"] * 4
    assert all(float(x.replace(",", "")) > 0 for x in table["images/s"])
    assert (tmp_path / "cache-synthetic" / "decoded").is_dir()  # the cold run cached what it decoded


def test_bench_latency(
    script: Callable[[str], ModuleType], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--models", "tiny", "--episodes", "2", "--final-epochs", "0.1"]
    argv += [*TINY_SEARCH, "--latency-targets", "1.0", "--rounds", "2", "--out", str(tmp_path), "--no-append"]
    assert script("bench_latency").main(argv) == 0
    section = _section(capsys.readouterr().out, "Latency vs FLOPs (tiny, digits)")
    (table,) = _tables(section)
    assert table["search"].tolist() == ["--flops 0.5", "--flops 0.5 --latency 1.0", "--latency 1.0"]
    measured = table[table["note"].isna() | (table["note"] == "")]
    assert {"--flops 0.5", "--latency 1.0"} <= set(measured["search"])  # always reachable
    assert all(float(x) > 0 for x in measured["b64 speed-up fast"])


def test_bench_latency_with_pruning(
    script: Callable[[str], ModuleType], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "digits", "--models", "tiny", "--episodes", "2", "--final-epochs", "0"]
    argv += [*TINY_SEARCH, "--decomposition", "prune", "--flops-latency", "1.0", "--latency-targets", "1.0"]
    argv += ["--latency-center", "uniform", "--rounds", "2", "--timings", "2"]
    argv += ["--out", str(tmp_path), "--no-append"]
    assert script("bench_latency").main(argv) == 0
    section = _section(capsys.readouterr().out, "Latency vs FLOPs (tiny, digits)")
    assert "every search: channel pruning, DDPG" in section
    (table,) = _tables(section)
    assert table["search"].tolist() == [
        "--flops 0.5",
        "--flops 0.5 --latency 1.0 --action-center uniform",
        "--latency 1.0 --action-center uniform",
    ]
    for ratio, spread in zip(
        table["b64 measured / FLOP speed-up (fast)"], table["range over timings"], strict=True
    ):
        low, high = (float(x) for x in spread.split("–"))
        assert low - 0.01 <= float(ratio) <= high + 0.01  # the median of two timings lies between them
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {
        "tiny-prune-flops0.5-seed0",
        "tiny-prune-flops0.5-latency1-center-uniform-seed0",
        "tiny-prune-latency1-center-uniform-seed0",
    }


def test_latency_bound_knapsack_is_exact(script: Callable[[str], ModuleType]) -> None:
    fewest_ms = script("bench_latency_bound").fewest_ms
    rng = np.random.default_rng(0)
    for _ in range(10):
        ms = rng.uniform(0.1, 2.0, size=(3, 4))
        macs = rng.integers(0, 20, size=(3, 4)) * 10
        got = fewest_ms(ms, macs, max_macs=600, buckets=60)  # exact: every MAC count is a multiple of 10
        want = np.full(61, np.inf)
        for combo in itertools.product(range(4), repeat=3):
            total = sum(macs[i, c] for i, c in enumerate(combo)) // 10
            want[total] = min(want[total], sum(ms[i, c] for i, c in enumerate(combo)))
        np.testing.assert_allclose(got, want)


def test_bench_latency_bound(
    script: Callable[[str], ModuleType], tmp_path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RLRANK_CACHE", str(tmp_path / "cache"))
    argv = ["--dataset", "digits", "--models", "tiny", "--points", "6", "--flop-ratios", "0.6", "1.0"]
    assert script("bench_latency_bound").main([*argv, "--no-append"]) == 0
    section = _section(capsys.readouterr().out, "The best latency per FLOP any strategy reaches (tiny)")
    (table,) = _tables(section)
    assert table["method"].tolist() == ["tucker2", "tucker2", "prune", "prune"]
    full = table[table["FLOP ratio"] == "1.00"]
    assert all(float(x) <= 1.0 + 1e-9 for x in full["fastest latency there"])  # dense is a strategy
    assert all(float(x) <= 0.6 + 1e-9 for x in table[table["FLOP ratio"] == "0.60"]["at FLOP ratio"])
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # the tables a search would reuse


def test_bench_workers(
    script: Callable[[str], ModuleType], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    argv = ["--dataset", "digits", "--model", "tiny", "--episodes", "4", *TINY_SEARCH]
    argv += ["--configs", "inproc:1", "1:1", "2:1", "--paper-model", "tiny", "--probe-episodes", "2"]
    assert script("bench_workers").main([*argv, "--out", str(tmp_path), "--no-append"]) == 0
    section = _section(capsys.readouterr().out, "Episodes per hour on Ray workers (tiny, digits)")
    measured, paper = _tables(section)
    assert measured["configuration"].tolist() == [
        "in process, 1 thread(s), no Ray", "1 worker(s) x 1 thread(s)", "2 worker(s) x 1 thread(s)",
    ]  # fmt: skip
    assert measured["workers seen"].fillna("").tolist() == ["", "0", "0, 1"]
    assert [float(x) for x in measured["largest Δ reward"][1:]] == [0.0, 0.0]  # same strategies, same threads
    assert all(float(x) > 0 for x in measured["episodes / hour"])
    assert paper["workers"].tolist() == ["1", "8", "32"]
    assert "tiny's (a 2-episode probe" in section and (tmp_path / "tiny-probe-seed0").is_dir()


def test_bench_workers_gpu_configurations(script: Callable[[str], ModuleType]) -> None:
    bench = script("bench_workers")
    assert bench.config_args("inproc:4") == ["--threads", "4"]
    assert bench.config_args("2:1") == ["--workers", "2", "--threads-per-worker", "1"]
    assert bench.config_args("4:2:0.25") == [
        "--workers", "4", "--threads-per-worker", "2", "--gpus-per-worker", "0.25",
    ]  # fmt: skip
    assert bench.describe("4:2:0.25") == "4 worker(s) x 2 thread(s), 0.25 GPU each"


def test_bench_op_profile(
    script: Callable[[str], ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlrank.search import main as search

    args = ["--model", "tiny", "--flops", "0.5", "--agent", "uniform", "--dense-epochs", "0.3"]
    args += ["--final-epochs", "0", "--no-latency", "--quiet", "--out", str(tmp_path / "runs")]
    assert search(args) == 0
    argv = ["--dataset", "digits", "--model", "tiny", "--passes", "2", "--runs", str(tmp_path / "runs")]
    assert script("bench_op_profile").main([*argv, "--no-append"]) == 0
    section = _section(capsys.readouterr().out, "Where a forward pass spends its time (tiny, batch 64)")
    (table,) = _tables(section)
    assert table["model"].tolist()[0] == "dense" and len(table) == 2
    flops = float(table["FLOP ratio"][1])
    assert 0.3 < flops <= 0.5  # the run's model, counted again
    assert float(table["ceiling speed-up"][1]) <= 1 / flops + 1e-6  # never beyond the FLOP speed-up
