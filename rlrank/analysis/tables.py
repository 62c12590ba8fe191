"""Tables from an episode frame: best episodes, running best, Pareto front, distinct strategies,
per-stage / per-layer / timing summaries, and the Markdown rendering of any table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from rlrank.analysis.runs import RANK, RATIO, TIME_KEYS, RunInfo, StageInfo, layer_names

# ============================================================================================
# Best episodes, running best, Pareto front, distinct strategies
# ============================================================================================


def eligible(df: pd.DataFrame) -> pd.Series:
    """Episodes that compete for a stage's best: not failed, and at the stage's budget.

    (A policy trained over several budgets also plays episodes at other budgets; like the search,
    the analysis only ranks those at the stage's own budget.)
    """
    at_budget = np.isclose(df["budget"], df["stage_budget"], rtol=0.0, atol=1e-9)
    return ~df["failed"] & df["reward"].notna() & (df["stage_budget"].isna() | at_budget)


def running_best(df: pd.DataFrame) -> pd.Series:
    """The best eligible reward so far, per run and stage, in episode order (NaN before the first)."""
    rewards = df["reward"].where(eligible(df))
    best = rewards.groupby([df["run"], df["stage"]], sort=False).cummax()
    return best.groupby([df["run"], df["stage"]], sort=False).ffill()


def best_episodes(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's and stage's best eligible episode (the first one, on a tie), as the search chose it."""
    ok = df[eligible(df)]
    if ok.empty:
        return df.iloc[0:0]
    return df.loc[ok.groupby(["run", "stage"], sort=False)["reward"].idxmax()]


def pareto_front(df: pd.DataFrame, x: str = "flops_ratio", y: str = "accuracy") -> pd.DataFrame:
    """The rows on the Pareto front: the most ``y`` for at most a given ``x``.

    A row is on the front when every row with a smaller or equal ``x`` has a smaller ``y``
    (of rows with the same ``x`` and ``y`` only the first is kept). Rows with a missing ``x`` or
    ``y`` are ignored; failed episodes are not dropped here, filter them first.

    Args:
        df: Any frame with the two columns.
        x: The cost column (smaller is better).
        y: The quality column (larger is better).

    Returns:
        The rows on the front, with their original index, sorted by ``x`` (``y`` rises with it).

    Raises:
        KeyError: ``df`` has no column ``x`` or ``y``.
    """
    for column in (x, y):
        if column not in df.columns:
            raise KeyError(f"pareto_front: no column {column!r}")
    data = df.dropna(subset=[x, y])
    ordered = data.sort_values([x, y], ascending=[True, False], kind="mergesort")
    best_before = ordered[y].cummax().shift(1, fill_value=-np.inf)
    return ordered[ordered[y] > best_before]


def strategy_key(df: pd.DataFrame) -> pd.Series:
    """A text key per row naming its strategy: stage and every layer's ranks."""
    ranks = [c for c in df.columns if c.startswith(RANK)]
    parts = [df["stage"].astype(str)] + [df[c].fillna("-").astype(str) for c in ranks]
    key = parts[0]
    for part in parts[1:]:
        key = key + "|" + part
    return key


def top_strategies(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """The ``k`` best distinct strategies (different rank tuples, per stage) by best reward.

    Each strategy is shown with its best eligible episode and how often it was evaluated.
    """
    ok = df[eligible(df)]
    key = strategy_key(ok)
    ordered = ok.assign(evaluations=key.map(key.value_counts()), _key=key).sort_values(
        "reward", ascending=False, kind="stable"
    )
    best = ordered.drop_duplicates("_key").head(k)
    columns = ["run", "stage", "budget", "episode", "reward", "accuracy", "flops_ratio", "params_ratio"]
    columns.append("evaluations")
    ranks = [c for c in df.columns if c.startswith(RANK)]
    return best[columns + ranks].reset_index(drop=True)


# ============================================================================================
# Summary tables
# ============================================================================================

_STAGE_TABLE_COLUMNS = [
    "run",
    "stage",
    "agent",
    "budget",
    "status",
    "episodes",
    "failed",
    "best_episode",
    "best_reward",
    "best_accuracy",
    "flops_ratio",
    "params_ratio",
    "val_accuracy",
    "test_accuracy",
]


def stage_table(infos: Sequence[RunInfo], df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage: agent, budget, episodes, best reward and its accuracy and cost,
    the stage's val accuracy after fine-tuning, and the run's final test accuracy (last stage).

    Args:
        infos: The runs, as read by :func:`rlrank.analysis.read_runs`.
        df: Their episode frame.
    """
    best = best_episodes(df).set_index(["run", "stage"])
    rows = [_stage_row(info, stage, df, best) for info in infos for stage in info.stages]
    return pd.DataFrame(rows, columns=_STAGE_TABLE_COLUMNS)


def _stage_row(info: RunInfo, stage: StageInfo, df: pd.DataFrame, best: pd.DataFrame) -> dict[str, Any]:
    rows = df[(df["run"] == info.name) & (df["stage"] == stage.number)]
    top = best.loc[(info.name, stage.number)] if (info.name, stage.number) in best.index else None
    last = stage is info.stages[-1]
    test = (info.report or {}).get("compressed", {}).get("test_accuracy") if last else None
    return {
        "run": info.name,
        "stage": stage.number,
        "agent": info.config.get("agent") or (rows["agent"].mode().iat[0] if len(rows) else None),
        "budget": stage.budget,
        "status": "complete" if stage.result is not None else "incomplete",
        "episodes": len(rows),
        "failed": int(rows["failed"].sum()),
        "best_episode": int(top["episode"]) if top is not None else None,
        "best_reward": top["reward"] if top is not None else math.nan,
        "best_accuracy": top["accuracy"] if top is not None else math.nan,
        "flops_ratio": top["flops_ratio"] if top is not None else math.nan,
        "params_ratio": top["params_ratio"] if top is not None else math.nan,
        "val_accuracy": (stage.result or {}).get("val_accuracy", math.nan),
        "test_accuracy": math.nan if test is None else test,
    }


def best_strategy_table(df: pd.DataFrame) -> pd.DataFrame:
    """Each stage's best strategy per layer: ``run``, ``stage``, ``episode``, ``layer``, ``ratio``, ``ranks``."""
    rows = []
    for _, best in best_episodes(df).iterrows():
        for layer in layer_names(df):
            if not pd.isna(best[RATIO + layer]):
                rows.append(
                    {
                        "run": best["run"],
                        "stage": best["stage"],
                        "episode": best["episode"],
                        "layer": layer,
                        "ratio": best[RATIO + layer],
                        "ranks": best[RANK + layer],
                    }
                )
    return pd.DataFrame(rows, columns=["run", "stage", "episode", "layer", "ratio", "ranks"])


def time_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per episode, per run and stage, split into decompose / fine-tune / evaluate /
    agent / env (the rest of the environment step) and their total."""
    columns = [f"time_{key}" for key in TIME_KEYS]
    table = df.groupby(["run", "stage"], sort=False)[columns].mean().reset_index()
    table.insert(2, "episodes", df.groupby(["run", "stage"], sort=False).size().to_numpy())
    return table.rename(columns={c: c[len("time_") :] for c in columns})


# ============================================================================================
# Markdown
# ============================================================================================


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (floats rounded to ``digits``; missing values blank).

    Args:
        df: Any frame; its column names are the header, its index is not shown.
        digits: Decimals of float cells (text cells are shown as they are, ``|`` escaped).

    Returns:
        The table's lines joined by newlines (no trailing newline).
    """
    header = "| " + " | ".join(_cell(c, digits) for c in df.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")
