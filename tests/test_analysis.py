"""Offline analysis of episode logs (``rlrank.analysis``, ``rlrank.analyze``) on a real tiny search."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlrank.analysis import (
    PLOTS,
    RANK,
    RATIO,
    best_episodes,
    format_ranks,
    load_episodes,
    pareto_front,
    running_best,
    top_strategies,
    write_comparison_report,
    write_run_report,
)
from rlrank.analyze import main

EPISODES = 6


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run folder of a real (tiny) search, made once per test session."""
    from rlrank.config import SearchConfig
    from rlrank.pipeline import run

    out = tmp_path_factory.mktemp("runs")
    config = SearchConfig(
        model="tiny",
        flops=0.5,
        episodes=EPISODES,
        warmup=2,
        dense_epochs=1,
        final_epochs=0.5,
        finetune_steps=2,
        bn_batches=1,
        latency=False,
        action_center="uniform",  # AMC's wide actions: episodes whose FLOPs and ranks vary
        spread=1.0,
        out=str(out),
    )
    report = run(config, progress=False)
    return Path(report["run_dir"])


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the run, to damage."""
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name, ignore=shutil.ignore_patterns("*.pt")))


def _links(report: Path) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", report.read_text())


def _assert_links_exist(report: Path) -> None:
    links = _links(report)
    assert links
    for link in links:
        assert not Path(link).is_absolute(), link
        assert (report.parent / link).exists(), link


def _one_error_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlrank-analyze: error: ")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------
# the episode frame
# ------------------------------------------------------------------------------------------


def test_frame_columns_and_dtypes(run_dir: Path) -> None:
    df = load_episodes(run_dir)
    assert len(df) == EPISODES
    assert (df["run"] == run_dir.name).all()
    assert (df["stage"] == 1).all()
    assert df["episode"].tolist() == list(range(EPISODES))
    for column in ("stage", "episode"):
        assert df[column].dtype == np.int64
    floats = ["budget", "reward", "accuracy", "loss", "flops_ratio", "params_ratio"]
    times = [f"time_{k}" for k in ("decompose", "finetune", "evaluate", "agent", "env", "total")]
    for column in floats + times:
        assert df[column].dtype == np.float64, column
    assert df["failed"].dtype == bool
    for column in ("run", "agent", "phase"):
        assert pd.api.types.is_object_dtype(df[column]) or pd.api.types.is_string_dtype(df[column])
    assert set(df["phase"]) <= {"center", "warmup", "explore", "policy"}
    assert (df["agent"] == "ddpg").all()
    assert (df["time_total"] > 0).all()


def test_frame_has_every_layer(run_dir: Path) -> None:
    df = load_episodes(run_dir)
    best = json.loads((run_dir / "stage-1" / "best_strategy.json").read_text())
    layers = [layer["name"] for layer in best["layers"]]
    assert layers
    for name in layers:
        assert df[RATIO + name].dtype == np.float64
        assert df[RATIO + name].between(0, 1).all()
        assert df[RANK + name].map(lambda r: bool(re.fullmatch(r"dense|\d+(x\d+)*", r))).all()
    row = df[df["episode"] == best["episode"]].iloc[0]
    for layer in best["layers"]:
        assert row[RANK + layer["name"]] == format_ranks(layer["ranks"])


def test_format_ranks() -> None:
    assert format_ranks([32, 16]) == "32x16"
    assert format_ranks([24]) == "24"
    assert format_ranks(None) == "dense"


def test_best_and_running_best_match_the_search(run_dir: Path) -> None:
    df = load_episodes(run_dir)
    result = json.loads((run_dir / "stage-1" / "result.json").read_text())
    best = best_episodes(df)
    assert len(best) == 1
    assert best["episode"].iat[0] == result["best_episode"]
    assert best["reward"].iat[0] == pytest.approx(result["best_reward"])
    curve = running_best(df)
    assert curve.is_monotonic_increasing
    assert curve.iat[-1] == pytest.approx(result["best_reward"])


def test_failed_episode_never_best(run_copy: Path) -> None:
    log = run_copy / "stage-1" / "episodes.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows[-1].update(failed="validation loss is nan", reward=9.0, accuracy=0.0)
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    df = load_episodes(run_copy)
    assert df["failed"].tolist() == [False] * (EPISODES - 1) + [True]
    assert df["failure"].iat[-1] == "validation loss is nan"
    assert best_episodes(df)["reward"].iat[0] < 9.0
    assert running_best(df).max() < 9.0
    assert (top_strategies(df, EPISODES)["reward"] < 9.0).all()


def test_several_runs_concatenate(run_dir: Path, run_copy: Path) -> None:
    df = load_episodes([run_dir, run_copy])
    assert len(df) == 2 * EPISODES
    assert df["run"].nunique() == 2  # same folder name: told apart by the parent
    assert df["episode"].dtype == np.int64


# ------------------------------------------------------------------------------------------
# Pareto front and distinct strategies
# ------------------------------------------------------------------------------------------


def test_pareto_front_known_answer() -> None:
    frame = pd.DataFrame(
        {
            "flops_ratio": [0.5, 0.2, 0.3, 0.3, 0.8, 0.6, np.nan, 0.2, 0.9],
            "accuracy": [0.7, 0.5, 0.4, 0.6, 0.9, 0.65, 1.0, 0.5, 0.85],
        }
    )
    front = pareto_front(frame)
    assert front.index.tolist() == [1, 3, 0, 4]
    assert front["flops_ratio"].tolist() == [0.2, 0.3, 0.5, 0.8]
    assert front["accuracy"].tolist() == [0.5, 0.6, 0.7, 0.9]
    renamed = frame.rename(columns={"flops_ratio": "cost", "accuracy": "quality"})
    assert pareto_front(renamed, x="cost", y="quality").index.tolist() == [1, 3, 0, 4]
    assert pareto_front(frame.iloc[0:0]).empty


def test_top_k_distinct(run_dir: Path) -> None:
    df = load_episodes(run_dir)
    again = df.assign(episode=df["episode"] + 100, reward=df["reward"] - 0.01)  # every strategy twice
    top = top_strategies(pd.concat([df, again], ignore_index=True), 4)
    ranks = [c for c in top.columns if c.startswith(RANK)]
    assert 1 <= len(top) <= 4
    assert not top.duplicated(subset=ranks).any()
    assert top["reward"].is_monotonic_decreasing
    assert top["reward"].iat[0] == pytest.approx(best_episodes(df)["reward"].iat[0])
    assert (top["evaluations"] >= 2).all()
    assert (top["episode"] < 100).all()  # the better evaluation of each strategy is shown


# ------------------------------------------------------------------------------------------
# reports, plots, export
# ------------------------------------------------------------------------------------------


def test_run_report_writes_plots_and_links(run_dir: Path, tmp_path: Path) -> None:
    report = write_run_report(run_dir, tmp_path / "analysis", top=3)
    assert report == tmp_path / "analysis" / "report.md"
    for name in PLOTS.values():
        assert (report.parent / name).stat().st_size > 1024, name
    _assert_links_exist(report)
    text = report.read_text()
    assert "Best strategy per layer" in text and "Top 3 distinct strategies" in text


def test_cli_one_run_default_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "best strategy per layer" in out and "top 2 distinct strategies" in out
    report = run_dir / "analysis" / "report.md"
    assert str(report) in out
    _assert_links_exist(report)


def test_export_csv(run_dir: Path, tmp_path: Path) -> None:
    assert main([str(run_dir), "--out", str(tmp_path), "--export", "csv"]) == 0
    back = pd.read_csv(tmp_path / "episodes.csv")
    df = load_episodes(run_dir)
    assert list(back.columns) == list(df.columns)
    assert len(back) == len(df)
    assert "episodes.csv" in _links(tmp_path / "report.md")


def test_export_parquet(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    assert main([str(run_dir), "--out", str(tmp_path), "--export", "parquet"]) == 0
    back = pd.read_parquet(tmp_path / "episodes.parquet")
    df = load_episodes(run_dir)
    assert list(back.columns) == list(df.columns)
    assert back["episode"].dtype == np.int64
    np.testing.assert_allclose(back["reward"], df["reward"])


def test_parquet_without_pyarrow(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    out = tmp_path / "out"
    assert main([str(run_dir), "--out", str(out), "--export", "parquet"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "pip install pyarrow" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# runs in progress, crashed, or not runs at all
# ------------------------------------------------------------------------------------------


def test_torn_last_line_is_skipped(run_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open(run_copy / "stage-1" / "episodes.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"stage":1,"episode":6,"agent":"ddpg","rew')
    with caplog.at_level(logging.WARNING):
        df = load_episodes(run_copy)
    assert len(df) == EPISODES
    assert any("partial last row" in r.getMessage() for r in caplog.records)
    assert main([str(run_copy)]) == 0


def test_run_in_progress_with_an_empty_stage(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "report.json").unlink()
    (run_copy / "stage-1" / "result.json").unlink()
    (run_copy / "stage-2").mkdir()
    (run_copy / "stage-3").mkdir()
    (run_copy / "stage-3" / "episodes.jsonl").write_text("")
    from rlrank.analysis import read_run, stage_table

    info = read_run(run_copy)
    table = stage_table([info], load_episodes(info))
    assert table["stage"].tolist() == [1, 2, 3]
    assert table["episodes"].tolist() == [EPISODES, 0, 0]
    assert (table["status"] == "incomplete").all()
    report = write_run_report(run_copy, tmp_path)
    _assert_links_exist(report)


def test_run_without_any_episode(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "stage-1" / "episodes.jsonl").write_text('{"stage":1,"epi')  # killed mid first row
    df = load_episodes(run_copy)
    assert df.empty and "run" in df.columns and "stage" in df.columns
    assert main([str(run_copy), "--out", str(tmp_path), "--top", "3", "--export", "csv"]) == 0
    assert "No episode logged yet" in (tmp_path / "report.md").read_text()


def test_not_a_run_and_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "not an rlrank run folder" in err
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "not found" in err


def test_corrupt_log_is_an_error(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = run_copy / "stage-1" / "episodes.jsonl"
    log.write_text("not json\n" + log.read_text())
    assert main([str(run_copy)]) == 2
    _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------
# several runs
# ------------------------------------------------------------------------------------------


def test_compare_runs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_stages = Path(shutil.copytree(run_dir / "stage-1", tmp_path / "other" / "stage-2")).parent
    shutil.copytree(run_dir / "stage-1", two_stages / "stage-1")
    shutil.copy(run_dir / "config.json", two_stages / "config.json")
    out = tmp_path / "compare"
    assert main([str(run_dir), str(two_stages), "--out", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "runs and stages" in printed
    report = out / "report.md"
    _assert_links_exist(report)
    assert (out / "running_best.png").stat().st_size > 1024
    section = report.read_text().split("## Runs and stages")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| run |")]
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {run_dir.name}", "1"],
        ["| other", "1"],
        ["| other", "2"],
    ]


def test_compare_report_library(run_dir: Path, run_copy: Path, tmp_path: Path) -> None:
    report = write_comparison_report([run_dir, run_copy], tmp_path)
    assert report.is_file()
    _assert_links_exist(report)


# ------------------------------------------------------------------------------------------
# output a person can read: where a comparison goes, and plots that say what they draw
# ------------------------------------------------------------------------------------------


def _close(fig: object) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _copy_run(run_dir: Path, to: Path) -> Path:
    return Path(shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("*.pt")))


def test_compare_goes_beside_the_runs_not_the_current_folder(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlrank.analysis import comparison_dir
    from rlrank.analyze import build_parser

    parent = tmp_path / "runs"
    runs = [_copy_run(run_dir, parent / name) for name in ("a", "b")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([str(run) for run in runs]) == 0
    printed = capsys.readouterr().out
    out = parent / "analysis-compare"
    assert comparison_dir(runs) == out
    assert list(elsewhere.iterdir()) == []
    assert (out / "running_best.png").stat().st_size > 1024
    _assert_links_exist(out / "report.md")
    assert printed.splitlines()[0].startswith(f"comparing 2 runs into {out}/ (")  # said first ...
    assert f"wrote {out / 'report.md'}" in printed  # ... and last
    # the next `rlrank-analyze runs/*/` also names runs/analysis-compare/: skipped, not an error
    assert main([f"{path}/" for path in sorted(parent.iterdir())]) == 0
    assert f"skipping {out}/" in capsys.readouterr().out
    assert "common parent folder" in " ".join(build_parser().format_help().split())


def test_reward_legend_explains_every_marker(run_dir: Path) -> None:
    from rlrank.analysis import reward_figure

    df = load_episodes(run_dir)
    df.loc[df.index[-1], ["failed", "failure"]] = [True, "validation loss is nan"]
    df.loc[df.index[-2], "budget"] = 0.7  # played at another budget than the stage's 0.5
    fig = reward_figure(df)
    ax = fig.axes[0]
    texts = [text.get_text() for text in ax.get_legend().get_texts()]
    assert texts == [
        "stage 1: running best",
        "episode at the stage's budget (competes for the best)",
        "failed episode (diverged fine-tune or NaN loss; never the best)",
        "episode at another budget (not ranked)",
    ]

    def drawn_at(row: pd.Series) -> np.ndarray:  # the marker of the scatter holding that episode
        point = [row["episode"], row["reward"]]
        hits = [c for c in ax.collections if np.isclose(c.get_offsets(), point).all(axis=1).any()]
        assert len(hits) == 1
        return hits[0].get_paths()[0].vertices

    for row, text in zip(df.iloc[[0, -1, -2]].itertuples(), texts[1:], strict=True):
        key = next(c for c in ax.collections if c.get_label() == text)
        np.testing.assert_array_equal(drawn_at(pd.Series(row._asdict())), key.get_paths()[0].vertices)
    _close(fig)
    clean = reward_figure(load_episodes(run_dir))  # only what is drawn is explained
    assert len(clean.axes[0].get_legend().get_texts()) == 2
    _close(clean)


def test_pareto_plot_when_every_episode_spends_the_budget(run_copy: Path, tmp_path: Path) -> None:
    from rlrank.analysis import FLAT_SPAN, pareto_axis, pareto_figure

    df = load_episodes(run_copy)
    assert pareto_axis(df) == "flops_ratio"  # the tiny search's FLOPs vary: the usual plot
    flat = df.assign(
        flops_ratio=np.linspace(0.49987, 0.5, len(df)), params_ratio=np.linspace(0.4, 0.55, len(df))
    )
    assert pareto_axis(flat) == "params_ratio"
    fig = pareto_figure(flat)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("parameter ratio") and "0.49987 to 0.5" in ax.get_xlabel()
    assert "every episode spent the FLOP budget" in ax.get_title()
    low, high = ax.get_xlim()
    assert low <= 0.4 and high >= 0.55
    _close(fig)
    one = pareto_figure(flat.iloc[:1])  # nothing varies: the FLOP axis is widened, and says so
    low, high = one.axes[0].get_xlim()
    assert high - low == pytest.approx(0.1) and low < 0.49987 and high > 0.5
    assert "axis widened" in one.axes[0].get_xlabel()
    assert FLAT_SPAN < 0.02
    _close(one)
    log = run_copy / "stage-1" / "episodes.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for i, row in enumerate(rows):
        row.update(flops_ratio=0.49987 + 1e-5 * i, params_ratio=0.4 + 0.03 * i)
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = write_run_report(run_copy, tmp_path)
    assert "### Accuracy vs parameter ratio, Pareto front" in report.read_text()


def test_comparison_draws_a_one_episode_run(run_dir: Path, run_copy: Path) -> None:
    from rlrank.analysis import running_best_figure

    log = run_copy / "stage-1" / "episodes.jsonl"
    log.write_text(log.read_text().splitlines(keepends=True)[0])  # like a rule-based run
    df = load_episodes([run_dir, run_copy])
    sizes = df.groupby("run").size()
    rule = sizes.index[sizes == 1][0]
    reward = df.loc[df["run"] == rule, "reward"].iat[0]
    fig = running_best_figure(df)
    lines = [line for line in fig.axes[0].get_lines() if line.get_label().startswith(rule)]
    assert len(lines) == 1
    assert lines[0].get_marker() not in ("None", "", " ", None)
    assert list(lines[0].get_xdata()) == [0] and list(lines[0].get_ydata()) == [reward]
    assert "one episode" in lines[0].get_label()
    _close(fig)


# ------------------------------------------------------------------------------------------
# no torch
# ------------------------------------------------------------------------------------------


def test_analysis_does_not_import_torch() -> None:
    code = "import rlrank.analysis, rlrank.analyze, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_rlrank_load_save_still_available() -> None:
    import rlrank
    from rlrank.model_file import load, save

    assert rlrank.load is load and rlrank.save is save
    with pytest.raises(AttributeError):
        _ = rlrank.no_such_thing
