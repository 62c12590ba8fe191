"""What every benchmark script records: the machine, the command, and runs of ``rlrank.search``.

Benchmarks run each search as a subprocess (``python -m rlrank.search ... --quiet``) so that every
method starts from the same fresh process state, and read its ``report.json`` and episode log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHARED = Path(__file__).resolve().parents[2] / "shared"
"""``../shared`` seen from the repository root: real CIFAR-10 and the pretrained CIFAR ResNets."""
HEADER = (
    "# rlrank — benchmark results\n\n"
    "Every figure below comes from a run recorded with its command, date, device and wall time.\n"
)


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


def publish(section: str, append: bool) -> None:
    """Print a benchmark's Markdown section and, with ``append``, add it to RESULTS.md."""
    if append:
        append_section(section)
    print(section)


def cifar_search_args(
    model: str,
    finetune_steps: int,
    reward_val_images: int,
    batch_size: int = 128,
    distill: float = 0.0,
) -> list[str]:
    """``rlrank.search`` options for a pretrained CIFAR ResNet on ``../shared`` CIFAR-10 (JPEG).

    The dense weights are the ``<model>-jpeg.pt`` checkpoints adapted to this data; distillation is
    off unless asked for, as in every CIFAR-10 figure recorded in RESULTS.md.
    """
    return [
        "--model", model,
        "--dataset", "imagefolder",
        "--data-dir", str(SHARED / "data" / "cifar10-jpeg.tar.gz"),
        "--checkpoint", str(SHARED / "models" / "cifar-resnet" / f"{model}-jpeg.pt"),
        "--finetune-steps", str(finetune_steps),
        "--reward-val-images", str(reward_val_images),
        "--batch-size", str(batch_size),
        "--finetune-batch-size", str(batch_size),
        "--distill", str(distill),
    ]  # fmt: skip


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
    """The options every CIFAR-10 benchmark shares: model, reward settings, seed, device, output."""
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
        *cifar_search_args(args.model, args.finetune_steps, args.reward_val_images),
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
        return json.loads((self.run_dir / "config.json").read_text())

    @property
    def episodes(self) -> pd.DataFrame:
        """The episode log of every stage (``rlrank.analysis.load_episodes``)."""
        from rlrank.analysis import load_episodes

        return load_episodes(self.run_dir)


def run_search(name: str, args: list[str], out: Path, reuse: bool = True) -> SearchRun:
    """Run ``python -m rlrank.search ARGS --out OUT/NAME --quiet`` and return its report.

    Args:
        name: The run's sub-folder of ``out``; its log goes to ``OUT/NAME.log``.
        args: Command-line arguments of the search.
        out: The benchmark's output folder.
        reuse: When ``OUT/NAME`` already holds a complete run, read it instead of running again
            (so that an interrupted benchmark picks up where it stopped).

    Raises:
        RuntimeError: The search failed; the message names its log file.
    """
    target = out / name
    if reuse:
        done = _complete_run(target)
        if done is not None:
            report = json.loads((done / "report.json").read_text())
            return SearchRun(name, done, report, float(report.get("wall_seconds", float("nan"))), reused=True)
    target.mkdir(parents=True, exist_ok=True)
    log = out / f"{name}.log"
    command = [sys.executable, "-m", "rlrank.search", *args, "--out", str(target), "--quiet"]
    print(f"[{utc_now()}] {name}: {' '.join(map(shlex.quote, command[1:]))}", flush=True)
    began = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    done = _complete_run(target)
    if code != 0 or done is None:
        raise RuntimeError(f"search {name} failed with exit code {code}; see {log}")
    report = json.loads((done / "report.json").read_text())
    print(
        f"[{utc_now()}] {name}: {wall:.0f} s, test {report['compressed']['test_accuracy']:.4f}, "
        f"FLOPs {report['compressed']['flops_ratio']:.3f}",
        flush=True,
    )
    return SearchRun(name, done, report, wall)


def _complete_run(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    runs = sorted(p.parent for p in folder.glob("*/report.json"))
    return runs[-1] if runs else None


def best_val_reward(run: SearchRun) -> float:
    """The best validation reward over the run's last stage (what selection used)."""
    return float(run.report["stages"][-1]["best_reward"])
