"""Benchmark: does He et al.'s channel selection pay? LASSO path + least squares vs kernel norm.

For every finished ``--decomposition prune`` run under ``--runs`` (``bench_methods.py --out``
folders), its ``--top`` best distinct strategies are priced again as the reward prices them (BN
re-estimation on the stage's common batches, no SGD step), at the same keep counts and so the same
FLOPs, with three ways of choosing and weighting the kept channels:

* ``lasso + refit``: rlrank's (:mod:`rlrank.methods.prune`): channels ranked by their entry into the
  LASSO path of the layer's output reconstruction, the kept kernel refit by least squares;
* ``lasso``: the same channels, their kernel slices unchanged;
* ``norm``: the channels of largest kernel norm (Li et al. 2017), slices unchanged.

Reported per variant: the accuracy on the reward's images (the first reproduces the logged reward)
and on the test split (BN only; measured, never used to choose). Appended to
``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_prune_selection.py --runs /work/bench/prune-r20 --top 5
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pandas as pd
import recording
from bench_top_strategies import logged_plans, prepared, run_config, top_rows

VARIANTS = ("lasso + refit", "lasso", "norm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="a folder of finished run folders")
    p.add_argument(
        "--top", type=int, default=5, help="best distinct strategies per run (default: %(default)s)"
    )
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def price_run(run: Path, top: int) -> pd.DataFrame:
    """Per top strategy of a pruning ``run`` and per variant: accuracy on the reward's images and on
    the test split."""
    from rlrank.factor_cache import FactorCache
    from rlrank.methods import register_method
    from rlrank.methods.prune import ChannelPruning
    from rlrank.planning import searched_layers
    from rlrank.reward import RewardEvaluator
    from rlrank.run_folder import EPISODES_FILE
    from rlrank.runlog import read_rows
    from rlrank.stage import stage_factor_cache, stage_reward_config

    class LassoSlices(ChannelPruning):
        """rlrank's channel ranking, without the least-squares refit."""

        name = "prune-lasso-slices"

        def factors(self, entry, ranks, settings):  # noqa: ANN001, ANN201 - the base's signature
            return [entry.weight[:, self.kept_channels(entry, ranks[0], settings)].clone()]

    register_method(LassoSlices())
    config = run_config(run)
    if config.decomposition != "prune":
        raise SystemExit(f"bench_prune_selection: {run} is a {config.decomposition} run, not a pruning one")
    setup = prepared(run, config)
    steps = searched_layers(setup.layers, "prune", config.exclude)
    searched = stage_factor_cache(setup.model, steps, config, setup.data)
    grams = {layer.name: searched.entry(layer.name).input_gram for layer in steps}
    caches = {
        "lasso + refit": searched,
        "lasso": FactorCache(setup.model, steps, LassoSlices.name, input_grams=grams),
        "norm": FactorCache(setup.model, steps, "prune"),
    }
    reward = stage_reward_config(config)
    test = replace(reward, val_images=0)
    records = []
    for rank, row in enumerate(top_rows(read_rows(run / "stage-1" / EPISODES_FILE), top)):
        plans = logged_plans(row, steps)
        record = {"rank": rank, "episode": row["episode"], "logged reward": row["reward"]}
        for variant, cache in caches.items():
            method = cache.decomposition
            priced = [p if p.dense else replace(p, method=method) for p in plans]
            for split, settings, data in (
                ("reward", reward, setup.data),
                ("test", test, replace(setup.data, val=setup.data.test)),
            ):
                evaluator = RewardEvaluator(setup.model, cache, data, settings, seed=config.seed)
                evaluator.set_episode(1, row["episode"])
                record[f"{variant}: {split}"] = evaluator(priced).accuracy
        records.append(record)
    return pd.DataFrame(records)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    frames = []
    for folder in sorted(args.runs.iterdir()):
        run = recording.complete_run(folder) if folder.is_dir() else None
        if run is None or "prune" not in folder.name:
            continue
        frame = price_run(run, args.top)
        frame.insert(0, "run", folder.name)
        frames.append(frame)
        print(f"[{recording.utc_now()}] {folder.name}: {len(frame)} strategies priced", flush=True)
    if not frames:
        raise SystemExit(f"bench_prune_selection: no finished pruning run under {args.runs}")
    frame = pd.concat(frames, ignore_index=True)
    means = {
        column: recording.mean_spread(frame[column])
        for column in frame.columns
        if column.endswith((": reward", ": test"))
    }
    table = pd.DataFrame(
        [
            {"variant": v, "reward images": means[f"{v}: reward"], "test (BN only)": means[f"{v}: test"]}
            for v in VARIANTS
        ]
    )
    lines = [
        *session.header(f"Channel selection of pruning ({args.runs.name})"),
        f"- runs: every finished pruning run under `{args.runs}`; its {args.top} best distinct strategies by "
        "reward, priced again as the reward does (BN re-estimation on the stage's common batches, no SGD "
        "step) with each variant at the same keep counts (same FLOPs); mean ± std over the strategies",
        f"- logged rewards of these strategies: {recording.mean_spread(frame['logged reward'])}",
        "",
        recording.markdown(table),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
