"""Benchmark: episodes per hour of a search, before and after the episode-cost work (issue #14).

ResNet-20 on ``../shared`` CIFAR-10, budget 0.5, DDPG: the same search run by two installs of
rlrank, each with its own reward settings:

* ``before``: an older checkout (``--before-python``: an interpreter whose rlrank is that checkout,
  run inside ``--before-checkout``), with the reward every recorded CIFAR-10 benchmark used until
  then: BN re-estimation + 10 SGD steps (batch 128), 1,000 validation images;
* ``after``: this checkout with its defaults (BN re-estimation only, 1,000 validation images,
  ``channels_last`` and batches of 128 on the CPU).

Each run's episodes per hour is ``episodes * 3600 / search_seconds`` (the stage's episode loop:
agent, env, reward, logging and checkpoints; not the factor cache or the final fine-tune), with the
mean seconds per phase of an episode. The fidelity column is each reward's Spearman correlation with
a real fine-tune's test accuracy, read from ``experiments/results/reward-fidelity-candidates.csv``
(the layout and batch size do not change a reward's value). Per-run rows go to
``experiments/results/episode-cost.csv``; a complete run folder is reused.

Run from the repository root::

    git worktree add /tmp/before cb7f243 && python -m venv --system-site-packages /tmp/venv-before \\
        && /tmp/venv-before/bin/pip install --no-deps -e /tmp/before
    python experiments/bench_episode_cost.py --before-python /tmp/venv-before/bin/python \\
        --before-checkout /tmp/before
    python experiments/bench_episode_cost.py --dataset digits --model tiny --episodes 4 \\
        --out /tmp/cost --csv /tmp/cost.csv --no-append     # a smoke test of the after run alone
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import recording

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIDELITY = RESULTS_DIR / "reward-fidelity-candidates.csv"
BEFORE_REWARD = [
    "--finetune-steps", "10", "--reward-val-images", "1000", "--finetune-batch-size", "128",
]  # fmt: skip
"""The reward of every CIFAR-10 benchmark recorded before this one (``Scale("cpu")`` of bench_selectors)."""
FIDELITY_CANDIDATE = {"before": "bn+10 steps, 1000 val (today)", "after": "bn+0 steps, 1000 val"}
"""Each run's reward as named in the fidelity CSV ("today" there is the reward before this change)."""
PHASES = ("decompose", "finetune", "evaluate", "agent", "env", "total")
COST_COLUMNS = [f"{phase}_s" for phase in PHASES]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recording.add_dataset_option(p)
    p.add_argument("--model", default="resnet20", help="(default: %(default)s)")
    p.add_argument("--flops", type=float, default=0.5, help="(default: %(default)s)")
    p.add_argument("--episodes", type=int, default=40, help="episodes per search (default: %(default)s)")
    p.add_argument("--before-python", help="interpreter of the older install (omit: the after run only)")
    p.add_argument("--before-checkout", type=Path, help="the older checkout (the before run's working dir)")
    p.add_argument("--out", type=Path, default=Path("bench-runs/episode-cost"), help="(default: %(default)s)")
    p.add_argument(
        "--csv", type=Path, default=RESULTS_DIR / "episode-cost.csv", help="(default: %(default)s)"
    )
    p.add_argument("--no-append", action="store_true", help="print the section instead of appending it")
    return p.parse_args(argv)


def search_args(args: argparse.Namespace) -> list[str]:
    """The options both runs share (the reward's are added per run)."""
    return [
        *recording.data_args(args.model, args.dataset),
        "--flops", str(args.flops),
        "--agent", "ddpg",
        "--episodes", str(args.episodes),
        "--warmup", str(max(1, args.episodes // 4)),
        "--batch-size", "128",
        "--final-epochs", "0.05",
        "--device", "cpu",
    ]  # fmt: skip


def fidelity() -> dict[str, float]:
    """Spearman correlation of each run's reward with the reference, from the fidelity benchmark."""
    if not FIDELITY.is_file():
        return {}
    from scipy import stats

    table = pd.read_csv(FIDELITY)
    refs = pd.read_csv(RESULTS_DIR / "reward-fidelity-references.csv").set_index("strategy")["test_acc"]
    out = {}
    for label, candidate in FIDELITY_CANDIDATE.items():
        rows = table[table["candidate"] == candidate].set_index("strategy")["score"]
        if len(rows):
            out[label] = float(stats.spearmanr(rows, refs.loc[rows.index]).statistic)
    return out


def row(label: str, run: recording.SearchRun) -> dict[str, object]:
    stage = run.report["stages"][0]
    times = stage["time_per_episode"]
    return {
        "label": label,
        "episodes": stage["episodes"],
        "search_s": stage["search_seconds"],
        "episodes_per_hour": stage["episodes"] * 3600.0 / stage["search_seconds"],
        **{f"{phase}_s": times.get(phase, float("nan")) for phase in PHASES},
        "best_reward": stage["best_reward"],
        "run_dir": str(run.run_dir),
        "wall_s": run.wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    session = recording.Session(argv)
    shared = search_args(args)
    rows = []
    if args.before_python:
        before = recording.run_search(
            "before", [*shared, *BEFORE_REWARD], args.out, python=args.before_python, cwd=args.before_checkout
        )
        rows.append(row("before", before))
    rows.append(row("after", recording.run_search("after", shared, args.out)))
    table = pd.DataFrame(rows)
    fid = fidelity()
    table["fidelity_spearman"] = [fid.get(label, float("nan")) for label in table["label"]]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False)
    default_csv = args.csv.resolve() == (RESULTS_DIR / "episode-cost.csv").resolve()
    shown_csv = f"experiments/results/{args.csv.name}" if default_csv else str(args.csv)
    lines = session.header(f"Episode cost ({args.model}, {args.dataset}, --flops {args.flops}, DDPG)")
    lines += [
        f"- searches: {args.episodes} episodes each, warm-up {max(1, args.episodes // 4)}, final fine-tune "
        "0.05 epoch (not counted); episodes per hour = episodes × 3600 / the stage's search seconds",
        f"- before: `{args.before_checkout}` run by `{args.before_python}` with `{' '.join(BEFORE_REWARD)}`; "
        "after: this checkout's defaults",
        f"- per-run CSV: `{shown_csv}`",
        "",
        recording.markdown(
            table[
                ["label", "episodes", "episodes_per_hour", *COST_COLUMNS, "fidelity_spearman", "best_reward"]
            ],
            {"episodes_per_hour": ".0f", "fidelity_spearman": ".3f"},
            digits=3,
        ),
    ]
    if len(table) == 2:
        ratio = table["episodes_per_hour"].iloc[1] / table["episodes_per_hour"].iloc[0]
        lines += ["", f"Speed-up: **{ratio:.2f}×** episodes per hour."]
    recording.publish("\n".join(lines), not args.no_append)


if __name__ == "__main__":
    main()
