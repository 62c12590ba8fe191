"""What every benchmark script shares: its options, its records (the machine, the command, runs of
``rlrank.search``) and its Markdown tables.

Benchmarks run each search as a subprocess (``python -m rlrank.search ... --quiet``) so that every
method starts from the same fresh process state, and read its ``report.json`` and episode log.
Tables are pandas frames rendered by :func:`markdown` (``rlrank.analysis.markdown_table`` with a
format per column). The CIFAR-10 benchmarks read ``../shared``; ``--dataset digits`` runs them on
the embedded data instead (each search trains a small dense model itself), for smoke tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rlrank.analysis import markdown_table
from rlrank.run_folder import CONFIG_FILE, DENSE_MODEL_FILE, POLICY_DIR, REPORT_FILE, stage_dir_name

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHARED = Path(__file__).resolve().parents[2] / "shared"
"""``../shared`` seen from the repository root: real CIFAR-10 and the pretrained CIFAR ResNets."""
HEADER = (
    "# rlrank — benchmark results\n\n"
    "Every figure below comes from a run recorded with its command, date, device and wall time.\n"
)
DATASETS = {"cifar10": "CIFAR-10", "digits": "digits"}
"""``--dataset`` of the CIFAR-10 benchmarks: its values and the name their sections print.

``cifar10``: ``../shared`` CIFAR-10 (JPEG) and the pretrained ``<model>-jpeg.pt`` checkpoints.
``digits``: the embedded 8x8 digits; every search trains its dense model for
:data:`DIGITS_DENSE_EPOCHS` epoch(s) (for smoke tests, with ``--model tiny``)."""
DIGITS_DENSE_EPOCHS = 1


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1 / 5 / 15 minute load averages, formatted."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def device_line(device: str = "cpu") -> str:
    """One line naming the device the figures come from."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), host {cpu_model()}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def command_line(argv: list[str] | None) -> str:
    """The command that ran this script, quoted for a shell."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", *map(shlex.quote, [sys.argv[0], *args])])


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def append_section(text: str, results: Path = RESULTS) -> None:
    """Append a Markdown section to RESULTS.md (created with its header when missing)."""
    existing = results.read_text() if results.is_file() else HEADER
    results.write_text(existing.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def publish(section: str, append: bool, results: Path = RESULTS) -> None:
    """Print a benchmark's Markdown section and, with ``append``, add it to ``results``.

    Args:
        section: The Markdown section.
        append: Whether to append it to ``results`` (the scripts' ``--no-append`` turns it off).
        results: The results file (default ``experiments/RESULTS.md``).
    """
    if append:
        append_section(section, results)
    print(section)


# ============================================================================================
# Tables
# ============================================================================================

Format = str | Callable[[Any], str]
"""How :func:`markdown` shows a column's cells: a format spec (``".3f"``, ``"+.4f"``, ``"g"``) or a
function of the cell."""


def write_csv(frame: pd.DataFrame, path: Path, write: bool = True) -> Path:
    """Write a benchmark's rows to ``path`` (its folder made) unless ``write`` is false (``--no-append``:
    the run is a trial, nothing under experiments/ changes); returns ``path`` for the section's text."""
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
    return path


def tagged(stem: str, tag: str) -> str:
    """A CSV's file name: ``stem.csv``, or ``stem-tag.csv`` with a tag."""
    return f"{stem}{'-' + tag if tag else ''}.csv"


def markdown(table: pd.DataFrame, formats: Mapping[str, Format] | None = None, digits: int = 4) -> str:
    """A Markdown table of a frame: ``rlrank.analysis.markdown_table`` with a format per column.

    Args:
        table: One row per table row; its column names are the header.
        formats: Column -> format spec or function, for cells that need another form than
            ``digits`` decimals (missing values stay blank). Numeric columns stay right-aligned.
        digits: Decimals of the other float cells.

    Returns:
        The table, without a trailing newline.
    """
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    shown = table.copy()
    for column, fmt in (formats or {}).items():
        shown[column] = pd.Series(
            [_format(value, fmt) for value in table[column]], index=table.index, dtype=object
        )
    lines = markdown_table(shown, digits).split("\n")
    lines[1] = "|" + "|".join("---:" if right else "---" for right in numeric) + "|"
    return "\n".join(lines)


def _format(value: Any, fmt: Format) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return fmt(value) if callable(fmt) else format(value, fmt)


def mean_spread(values: Iterable[float], digits: int = 4, signed: bool = False) -> str:
    """``"m"`` for one value, ``"m ± s"`` (mean and sample standard deviation) for several.

    Args:
        values: The values (e.g. one per seed).
        digits: Decimals of both.
        signed: Show the mean's sign even when positive (for differences).
    """
    values = [float(v) for v in values]
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    return f"{statistics.mean(values):{sign}.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# ============================================================================================
# Options shared by the CIFAR-10 benchmarks
# ============================================================================================


def cifar_search_args(
    model: str,
    finetune_steps: int,
    reward_val_images: int,
    batch_size: int = 128,
    distill: float = 0.0,
    dataset: str = "cifar10",
) -> list[str]:
    """``rlrank.search`` options for a pretrained CIFAR ResNet on ``../shared`` CIFAR-10 (JPEG).

    The dense weights are the ``<model>-jpeg.pt`` checkpoints adapted to this data; distillation is
    off unless asked for, as in every CIFAR-10 figure recorded in RESULTS.md. With
    ``dataset="digits"`` the search runs on the embedded digits instead and trains its dense model
    itself (see :data:`DATASETS`).
    """
    return [
        *data_args(model, dataset),
        "--finetune-steps", str(finetune_steps),
        "--reward-val-images", str(reward_val_images),
        "--batch-size", str(batch_size),
        "--finetune-batch-size", str(batch_size),
        "--distill", str(distill),
    ]  # fmt: skip


@dataclass
class Priced:
    """What the benchmarks that price fixed strategies in one process share: the prepared run, the
    factor cache of its compressible layers, and an env that plans strategies (and prices none)."""

    config: Any
    setup: Any
    cache: Any
    env: Any


def priced_setup(cli: list[str], flops: float, device: str) -> Priced:
    """Prepare ``rlrank.search`` options ``cli`` at budget ``flops`` and factorize every compressible
    layer once (torch is imported here, not by this module)."""
    from rlrank.envs import RankSearchEnv
    from rlrank.planning import searched_layers
    from rlrank.preflight import prepare
    from rlrank.search import build_parser, config_from_args
    from rlrank.stage import stage_factor_cache

    config = config_from_args(build_parser().parse_args([*cli, "--flops", str(flops), "--device", device]))
    setup = prepare(config)
    steps = searched_layers(setup.layers, config.decomposition, config.exclude)
    cache = stage_factor_cache(setup.model, steps, config, setup.data)
    env = RankSearchEnv(
        setup.layers, None, budget=flops, decomposition=config.decomposition, min_ratio=config.min_ratio
    )
    return Priced(config, setup, cache, env)


def data_args(model: str, dataset: str = "cifar10") -> list[str]:
    """The ``rlrank.search`` options naming the model, its data and its dense weights.

    Raises:
        ValueError: ``dataset`` is not one of :data:`DATASETS`.
    """
    if dataset == "digits":
        return ["--model", model, "--dataset", "digits", "--dense-epochs", str(DIGITS_DENSE_EPOCHS)]
    if dataset != "cifar10":
        raise ValueError(f"unknown benchmark dataset {dataset!r} (use one of {', '.join(DATASETS)})")
    return [
        "--model", model,
        "--dataset", "imagefolder",
        "--data-dir", str(SHARED / "data" / "cifar10-jpeg.tar.gz"),
        "--checkpoint", str(SHARED / "models" / "cifar-resnet" / f"{model}-jpeg.pt"),
    ]  # fmt: skip


def add_dataset_option(parser: argparse.ArgumentParser) -> None:
    """``--dataset cifar10|digits`` (default cifar10, the ``../shared`` data)."""
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="cifar10",
        help="cifar10: ../shared CIFAR-10 and pretrained checkpoints; digits: the embedded data, the "
        f"dense model trained by each search ({DIGITS_DENSE_EPOCHS} epoch), for smoke tests "
        "(default: %(default)s)",
    )


class Session:
    """One benchmark invocation: when it began and the machine's load then, for its section header."""

    def __init__(self, argv: list[str] | None) -> None:
        self.argv = argv
        self.date = utc_now()
        self.load_before = load_average()
        self.began = time.perf_counter()

    def header(self, title: str, device: str = "cpu", runs_device: str | None = None) -> list[str]:
        """A section's title and its command / device / load / wall-time lines (ends the clock)."""
        wall = time.perf_counter() - self.began
        reported = f" (runs report: {runs_device})" if runs_device else ""
        return [
            f"## {title} — {self.date}",
            "",
            f"- command: `{command_line(self.argv)}`",
            f"- device: {device_line(device)}{reported}",
            f"- load average before: {self.load_before}, after: {load_average()}",
            f"- total wall time of the script: {wall / 60:.1f} min",
        ]


def add_cifar_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every CIFAR-10 benchmark shares: data, model, reward settings, seed, device, output."""
    add_dataset_option(parser)
    parser.add_argument("--model", default="resnet20", help="(default: %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--reward-val-images", type=int, default=1000, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(out), help="run folders (default: %(default)s)")
    parser.add_argument(
        "--search-args",
        default="",
        help="extra rlrank.search options for every run, e.g. '--action-center energy'",
    )
    parser.add_argument("--no-append", action="store_true", help="print the section, do not append it")


def cifar_run_args(args: argparse.Namespace) -> list[str]:
    """``rlrank.search`` options from what :func:`add_cifar_options` parsed."""
    return [
        *cifar_search_args(args.model, args.finetune_steps, args.reward_val_images, dataset=args.dataset),
        "--seed", str(args.seed),
        "--device", args.device,
        *shlex.split(args.search_args),
    ]  # fmt: skip


@dataclass
class SearchRun:
    """One finished ``rlrank.search`` subprocess."""

    name: str
    run_dir: Path
    report: dict[str, Any]
    wall_s: float
    reused: bool = False

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved ``config.json``."""
        return json.loads((self.run_dir / CONFIG_FILE).read_text())

    @property
    def dense_model(self) -> Path:
        """The dense model the run trained (when it was given no ``--checkpoint``)."""
        return self.run_dir / DENSE_MODEL_FILE

    def policy_dir(self, stage: int = 1) -> Path:
        """The DDPG policy folder of a stage (what ``--policy`` reads)."""
        return self.run_dir / stage_dir_name(stage) / POLICY_DIR

    @property
    def episodes(self) -> pd.DataFrame:
        """The episode log of every stage (``rlrank.analysis.load_episodes``)."""
        from rlrank.analysis import load_episodes

        return load_episodes(self.run_dir)


def run_search(
    name: str,
    args: list[str],
    out: Path,
    reuse: bool = True,
    python: str = sys.executable,
    cwd: Path | None = None,
) -> SearchRun:
    """Run ``python -m rlrank.search ARGS --out OUT/NAME --quiet`` and return its report.

    Args:
        name: The run's sub-folder of ``out``; its log goes to ``OUT/NAME.log``.
        args: Command-line arguments of the search.
        out: The benchmark's output folder.
        reuse: When ``OUT/NAME`` already holds a complete run, read it instead of running again,
            and when it holds one that was killed part-way, ``--resume`` it (so that an interrupted
            benchmark picks up where it stopped).
        python: The interpreter (another one runs another install of rlrank, e.g. an older commit).
        cwd: The search's working directory (a checkout there shadows the installed rlrank).

    Raises:
        RuntimeError: The search failed; the message names its log file.
    """
    target = (out / name).resolve()
    if reuse:
        done = complete_run(target)
        if done is not None:
            report = json.loads((done / REPORT_FILE).read_text())
            return SearchRun(name, done, report, float(report.get("wall_seconds", float("nan"))), reused=True)
    target.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    interrupted = interrupted_run(target) if reuse else None
    if interrupted is not None:  # killed part-way (a capped benchmark): go on from its last episode
        command = [python, "-m", "rlrank.search", "--resume", str(interrupted), "--quiet"]
    else:
        command = [python, "-m", "rlrank.search", *args, "--out", str(target), "--quiet"]
    print(f"[{utc_now()}] {name}: {' '.join(map(shlex.quote, command[1:]))}", flush=True)
    began = time.perf_counter()
    with log.open("a" if interrupted is not None else "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    wall = time.perf_counter() - began
    done = complete_run(target)
    if code != 0 or done is None:
        raise RuntimeError(f"search {name} failed with exit code {code}; see {log}")
    report = json.loads((done / REPORT_FILE).read_text())
    print(
        f"[{utc_now()}] {name}: {wall:.0f} s, test {report['compressed']['test_accuracy']:.4f}, "
        f"FLOPs {report['compressed']['flops_ratio']:.3f}",
        flush=True,
    )
    return SearchRun(name, done, report, wall)


def interrupted_run(folder: Path) -> Path | None:
    """The latest run under ``folder`` that started (has its config) but has no report, or ``None``."""
    if not folder.is_dir():
        return None
    runs = sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}") if not (p.parent / REPORT_FILE).exists())
    return runs[-1] if runs else None


def complete_run(folder: Path) -> Path | None:
    """The latest run under ``folder`` that finished (has its report), or ``None``."""
    if not folder.is_dir():
        return None
    runs = sorted(p.parent for p in folder.glob(f"*/{REPORT_FILE}"))
    return runs[-1] if runs else None


def best_val_reward(run: SearchRun) -> float:
    """The best validation reward over the run's last stage (what selection used)."""
    return float(run.report["stages"][-1]["best_reward"])
