"""Benchmark: SGD steps on a busy machine, by thread count and OpenMP wait policy.

Starts ``--load-procs`` busy-looping processes (an artificial load, stopped at the end whatever
happens), then times ``--steps`` SGD steps of ``--model`` on the embedded digits data in a fresh
Python process per setting (the wait policy must be set before torch starts): torch's default
threads with OpenMP's defaults, one thread, torch's default threads with ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep while they wait) and with ``GOMP_SPINCOUNT=10000`` (they spin briefly, then sleep)
-- each on the busy and on the idle machine. Appends one table to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_load.py
    python experiments/bench_load.py --load-procs 1 --steps 2 --model tiny --no-append   # smoke test
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pandas as pd
import recording

STEP_TIMER = """
import sys, time, torch
from rlrank.data import DataConfig, load_data
from rlrank.finetune import FinetuneConfig, finetune_steps
from rlrank.models import ModelSpec, build_model
threads, model_name, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if threads > 0:
    torch.set_num_threads(threads)
data = load_data(DataConfig("digits", val_size=0.2))
model = build_model(ModelSpec(model_name, data.num_classes, data.in_channels, data.input_size))
generator = torch.Generator().manual_seed(0)
finetune_steps(model, data, FinetuneConfig(steps=1, batch_size=64), generator)  # warm-up
start = time.perf_counter()
finetune_steps(model, data, FinetuneConfig(steps=steps, batch_size=64), generator)
print(time.perf_counter() - start, torch.get_num_threads())
"""

SETTINGS = [
    # name, threads (0: torch's default), OpenMP environment; each is timed under the artificial
    # load and on the idle machine
    ("default threads, OpenMP defaults", 0, {}),
    ("1 thread", 1, {}),
    ("default threads, passive wait", 0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("default threads, bounded spinning", 0, {"GOMP_SPINCOUNT": "10000"}),
]
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="(default: %(default)s, the README's main job)")
    p.add_argument("--steps", type=int, default=10, help="timed SGD steps (default: %(default)s)")
    p.add_argument(
        "--load-procs", type=int, default=7, help="busy-looping processes of the load (default: %(default)s)"
    )
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def time_steps(model: str, steps: int, threads: int, openmp: dict[str, str]) -> tuple[float, int]:
    """Seconds for ``steps`` SGD steps in a fresh process, and the threads it used."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.update(openmp)
    done = subprocess.run(
        [sys.executable, "-c", STEP_TIMER, str(threads), model, str(steps)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=1800,
    )
    seconds, used = done.stdout.split()
    return float(seconds), int(used)


def start_load(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    rows = []
    for loaded in (True, False):
        load = start_load(args.load_procs) if loaded else []
        try:
            if loaded:
                time.sleep(2.0)  # let the busy loops get going
            for name, threads, openmp in SETTINGS:
                load_before = recording.load_average()
                seconds, used = time_steps(args.model, args.steps, threads, openmp)
                rows.append(
                    {
                        "machine": "busy" if loaded else "idle",
                        "setting": name,
                        "torch threads": used,
                        "OpenMP environment": " ".join(f"{k}={v}" for k, v in openmp.items()) or "(unset)",
                        "busy processes": len(load),
                        f"{args.steps} SGD steps (s)": seconds,
                        "load average before": load_before,
                    }
                )
                print(f"{name}: {seconds:.2f} s", flush=True)
        finally:
            stop_load(load)
    table = pd.DataFrame(rows)
    lines = [
        *session.header(f"Under load: {args.steps} SGD steps of {args.model} (digits, batch 64)", "cpu"),
        f"- artificial load: {args.load_procs} busy-looping Python processes; each setting timed in a "
        "fresh process after one warm-up step",
        "",
        recording.markdown(table, {f"{args.steps} SGD steps (s)": ".2f"}),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
