"""Benchmark: are a search's best strategies the best on images the search never scored?

A search keeps the strategy with the best reward: the validation accuracy, after BatchNorm
re-estimation, on the first ``--reward-val-images`` images of the validation split, the same images
for every episode. A search that climbs that function well may climb those images' noise too. For
every finished run of a selectors benchmark (``bench_selectors.py --out``) of the methods named,
this takes the ``--top`` best distinct strategies of its episode log and prices each again in one
process, as the reward does (BN re-estimation on the stage's common batches), on (a) the reward's
own images (the search's figure, reproduced), (b) the rest of the validation split, which no
episode saw, and (c) the test split (measured, never used to choose). Per budget and method: the
best strategy's (a), (b), (c); the means over the top strategies; the strategy that (b) would pick
and its (c); and Spearman ρ of (a) vs (b) and of (b) vs (c) within each run's top strategies.
Per-strategy rows go to ``experiments/results/top-strategies-<tag>.csv``.

Run from the repository root::

    python experiments/bench_top_strategies.py --runs /work/bench/selectors-amc200 \\
        --methods random ddpg surrogate --top 5 --tag amc200
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import recording
from scipy import stats

RESULTS_DIR = Path(__file__).parent / "results"
RUN_NAME = re.compile(r"^flops(?P<budget>[0-9.]+)-(?P<method>.+)-seed(?P<seed>\d+)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the selectors benchmark's --out folder")
    p.add_argument("--methods", nargs="+", default=["random", "surrogate"], help="(default: %(default)s)")
    p.add_argument(
        "--top", type=int, default=5, help="best distinct strategies per run (default: %(default)s)"
    )
    p.add_argument("--tag", default="", help="suffix of the CSV name")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the CSV goes")
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def top_rows(rows: list[dict], top: int) -> list[dict]:
    """The ``top`` best episodes by reward whose strategies (ranks of every layer) differ."""
    seen, chosen = set(), []
    for row in sorted((r for r in rows if not r.get("failed")), key=lambda r: -r["reward"]):
        key = tuple((name, tuple(e["ranks"] or ())) for name, e in sorted(row["layers"].items()))
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == top:
            break
    return chosen


def run_config(run: Path):  # noqa: ANN201 - a SearchConfig (torch is imported on call, not here)
    """The resolved options of a finished run (its ``config.json``)."""
    from rlrank.config import SearchConfig
    from rlrank.run_folder import CONFIG_FILE, read_json

    return SearchConfig.from_dict(read_json(run / CONFIG_FILE))


def prepared(run: Path, config):  # noqa: ANN001, ANN201 - SearchConfig -> Setup
    """``run``'s data and model prepared as its search was, with the dense weights it searched from."""
    from rlrank.model_file import load
    from rlrank.preflight import prepare
    from rlrank.run_folder import DENSE_MODEL_FILE

    setup = prepare(config)
    if (run / DENSE_MODEL_FILE).is_file():  # the run trained its dense model (no --checkpoint)
        setup.model.load_state_dict(load(run / DENSE_MODEL_FILE, map_location=setup.device).state_dict())
    return setup


def unseen_images(run: Path, val, reward_images: int):  # noqa: ANN001, ANN201 - ImageSplit -> ImageSplit
    """The validation images no reward of ``run`` scored: all but the first ``reward_images``.

    Raises:
        SystemExit: The reward used every validation image (``reward_images`` 0 means all).
    """
    from rlrank.data import ImageSplit

    if reward_images == 0 or len(val) <= reward_images:
        raise SystemExit(f"{run}: the reward used all {len(val)} validation images")
    return ImageSplit(val.images[reward_images:], val.labels[reward_images:])


def logged_plans(row: dict, steps: list) -> list:
    """The strategy an episode log row records, as one ``LayerPlan`` per searched layer."""
    from rlrank.methods import get_method
    from rlrank.planning import LayerPlan

    plans = []
    for layer in steps:
        entry = row["layers"][layer.name]
        if entry["method"] is None:
            plans.append(LayerPlan(layer.name, entry["ratio"], None, None, layer.macs, layer.params))
            continue
        method, ranks = get_method(entry["method"]), tuple(entry["ranks"])
        plans.append(
            LayerPlan(
                layer.name,
                entry["ratio"],
                entry["method"],
                ranks,
                method.macs(layer, ranks),
                method.params(layer, ranks),
            )
        )
    return plans


def price_run(run: Path, top: int) -> pd.DataFrame:
    """Per top strategy of ``run``: its logged reward and its accuracy on the reward's images, the
    rest of the validation split and the test split (BN re-estimated, as the reward does)."""
    from rlrank.data import ImageSplit
    from rlrank.planning import searched_layers
    from rlrank.reward import RewardEvaluator
    from rlrank.run_folder import EPISODES_FILE
    from rlrank.runlog import read_rows
    from rlrank.stage import stage_factor_cache, stage_reward_config

    config = run_config(run)
    setup = prepared(run, config)
    steps = searched_layers(setup.layers, config.decomposition, config.exclude)
    cache = stage_factor_cache(setup.model, steps, config, setup.data)  # the search's own cache
    data, n = setup.data, config.reward_val_images
    val = data.val.load()
    splits = {
        "reward images": ImageSplit(val.images[:n], val.labels[:n]),
        "unseen val": unseen_images(run, val, n),
        "test (BN only)": data.test,
    }
    reward = replace(stage_reward_config(config), val_images=0)  # each split whole
    evaluators = {
        name: RewardEvaluator(setup.model, cache, replace(data, val=split), reward, seed=config.seed)
        for name, split in splits.items()
    }
    records = []
    for rank, row in enumerate(top_rows(read_rows(run / "stage-1" / EPISODES_FILE), top)):
        plans = logged_plans(row, steps)
        record = {"rank": rank, "episode": row["episode"], "logged reward": row["reward"]}
        for name, evaluator in evaluators.items():
            evaluator.set_episode(1, row["episode"])  # stage 1; with common batches, its one BN stream
            record[name] = evaluator(plans).accuracy
        records.append(record)
    return pd.DataFrame(records)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per budget and method, over its runs: the best strategy's figures, the top strategies' means,
    what re-ranking on the unseen images would keep, and the rank correlations within runs."""
    rows = []
    for (budget, method), group in frame.groupby(["budget", "method"], sort=False):
        per_run = []
        for _, run in group.groupby("seed"):
            best = run.loc[run["rank"].idxmin()]
            reranked = run.loc[run["unseen val"].idxmax()]
            per_run.append(
                {
                    "best reward": best["reward images"],
                    "best unseen val": best["unseen val"],
                    "best test (BN only)": best["test (BN only)"],
                    "top mean unseen val": run["unseen val"].mean(),
                    "re-ranked unseen val": reranked["unseen val"],
                    "re-ranked test (BN only)": reranked["test (BN only)"],
                    "ρ(reward, unseen)": stats.spearmanr(run["reward images"], run["unseen val"])[0],
                    "ρ(unseen, test)": stats.spearmanr(run["unseen val"], run["test (BN only)"])[0],
                }
            )
        means = pd.DataFrame(per_run)
        rows.append(
            {
                "budget": budget,
                "method": method,
                "runs": len(per_run),
                **{k: recording.mean_spread(v) if len(v := means[k].dropna()) else "" for k in means.columns},
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    frames = []
    for folder in sorted(args.runs.iterdir()):
        match = RUN_NAME.match(folder.name)
        if not match or match["method"] not in args.methods:
            continue
        run = recording.complete_run(folder)
        if run is None:
            continue
        priced = price_run(run, args.top)
        priced.insert(0, "seed", int(match["seed"]))
        priced.insert(0, "method", match["method"])
        priced.insert(0, "budget", float(match["budget"]))
        frames.append(priced)
        print(f"[{recording.utc_now()}] {folder.name}: {len(priced)} strategies priced", flush=True)
    if not frames:
        raise SystemExit(f"bench_top_strategies: no finished run of {args.methods} under {args.runs}")
    frame = pd.concat(frames, ignore_index=True)
    frame["order"] = frame["method"].map({m: i for i, m in enumerate(args.methods)})
    frame = frame.sort_values(["budget", "order", "seed", "rank"], ascending=[False, True, True, True])
    frame = frame.drop(columns="order").reset_index(drop=True)
    csv = recording.write_csv(
        frame, args.results / recording.tagged("top-strategies", args.tag), not args.no_append
    )
    lines = [
        *session.header(f"Top strategies on images the search never scored ({args.runs.name})"),
        f"- runs: the finished `{'`, `'.join(args.methods)}` runs under `{args.runs}`; the {args.top} best "
        f"distinct strategies of each by reward, priced again as the reward does (BN re-estimation, no "
        f"SGD step) on the reward's images, on the rest of the validation split and on the test split "
        f"(measured, never used to choose); per-strategy CSV: `{csv}`",
        "- columns: the best strategy's accuracy on each; the top strategies' mean on the unseen images; "
        "the strategy the unseen images would keep and its test accuracy; Spearman ρ within each run's "
        "top strategies; mean ± std over runs",
        "",
        recording.markdown(summarize(frame), {"budget": "g", "runs": "d"}),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
