"""Benchmark: peak memory and images per second of the data path, in memory vs streamed from disk.

For CIFAR-10 (``../shared``, 60,000 JPEGs of 32x32) and a synthetic ImageNet-shaped folder (JPEGs
of 224x224 this script writes, 20,000 by default), each setting runs in a fresh Python process:
``load_data`` (decoding every image in memory -- the only way before streaming -- or listing the
files to stream), then one shuffled, augmented pass over ``--images`` training images in batches
of 128, as the fine-tunes draw them. Reported: load time, images per second of the pass, and the
process's peak resident memory. ``memory (cold)`` decodes into an empty cache; ``memory (cached)``
reads the decoded tensors an earlier run cached (folders up to 2 GiB decoded). Appends one table
to ``experiments/RESULTS.md``.

Run from the repository root::

    python experiments/bench_data.py
    python experiments/bench_data.py --synthetic 60 --size 32 --no-cifar --no-append   # smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import recording

MEASURE = """
import json, sys, time, warnings, torch
warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
from rlrank.data import DataConfig, load_data
folder, cache, loading, workers, images = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
start = time.perf_counter()
data = load_data(DataConfig("imagefolder", data_dir=folder, val_size=0.2, cache_dir=cache, loading=loading,
                            workers=workers))
loaded = time.perf_counter() - start
train = data.train.subset(min(images, len(data.train)))
start, seen = time.perf_counter(), 0
for batch, _ in data.batches(train, 128, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)):
    seen += batch.shape[0]
passed = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"load_s": loaded, "images": seen, "pass_s": passed, "peak_kib": peak,
                  "kind": type(data.train).__name__, "shape": list(data.train.image_shape)}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", type=int, default=20_000, help="synthetic images (default: %(default)s)")
    p.add_argument("--size", type=int, default=224, help="their side in pixels (default: %(default)s)")
    p.add_argument(
        "--images", type=int, default=20_000, help="training images of the timed pass (default: %(default)s)"
    )
    p.add_argument(
        "--workers", default="0,1", help="DataLoader workers of the streamed runs (default: %(default)s)"
    )
    p.add_argument("--no-cifar", action="store_true", help="skip CIFAR-10 (../shared)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the synthetic images and caches (default: a temporary one)",
    )
    p.add_argument("--no-append", action="store_true", help="print the section, do not append it")
    return p.parse_args(argv)


def write_synthetic(root: Path, count: int, size: int, classes: int = 10) -> Path:
    """``root/{train,test}/<class>/*.jpg``: smooth random colour images (a tenth for test), written once."""
    import torch
    from torchvision.io import encode_jpeg

    done = root / f".written-{count}-{size}"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    generator = torch.Generator().manual_seed(0)
    test_every = 10
    for i in range(count):
        split = "test" if (i // classes) % test_every == 0 else "train"
        folder = root / split / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        image = torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bicubic", align_corners=False
        )
        image = (image + 0.05 * torch.randn(1, 3, size, size, generator=generator)).clamp(0, 1)
        (folder / f"{i:06d}.jpg").write_bytes(
            encode_jpeg((image[0] * 255).to(torch.uint8), quality=90).numpy()
        )
    done.touch()
    return root


def measure(folder: Path, cache: Path, loading: str, workers: int, images: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(cache), loading, str(workers), str(images)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed ({loading}, {workers} workers):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings(workers: list[int]) -> list[tuple[str, str, int, bool]]:
    """(name, loading, workers, fresh cache) in the order they run."""
    return [
        ("memory (cold)", "memory", 0, True),
        ("memory (cached)", "memory", 0, False),
        *[(f"stream, {w} worker{'s' if w != 1 else ''}", "stream", w, False) for w in workers],
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = recording.Session(argv)
    workers = [int(w) for w in args.workers.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="rlrank-bench-data-"))
    folders = []
    if not args.no_cifar:
        from rlrank.data import DataConfig
        from rlrank.image_folder import extract_archive

        archive = recording.SHARED / "data" / "cifar10-jpeg.tar.gz"
        folders.append(("CIFAR-10 (32x32 JPEG)", extract_archive(archive, DataConfig("imagefolder"))))
    synthetic = write_synthetic(work / "synthetic", args.synthetic, args.size)
    folders.append((f"synthetic {args.synthetic:,} x {args.size}x{args.size} JPEG", synthetic))
    rows = []
    for data_name, folder in folders:
        cache = work / f"cache-{folder.name}"
        for name, loading, count, fresh in settings(workers):
            if fresh:
                shutil.rmtree(cache, ignore_errors=True)
            result = measure(folder, cache, loading, count, args.images)
            rows.append(
                {
                    "data": data_name,
                    "loading": name,
                    "load (s)": result["load_s"],
                    "pass images": result["images"],
                    "images/s": result["images"] / result["pass_s"],
                    "peak memory (GiB)": result["peak_kib"] / 1024**2,
                }
            )
            print(f"{data_name} / {name}: {rows[-1]}", flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    table = pd.DataFrame(rows)
    lines = [
        *session.header("Data path: in memory vs streamed from disk", "cpu"),
        "- one fresh process per row: `load_data`, then one shuffled, augmented pass (batch 128) over "
        "the first training images; peak memory is the process's VmHWM; `memory (cached)` reads the "
        "decoded tensors `memory (cold)` cached (only folders up to 2 GiB decoded are cached)",
        "",
        recording.markdown(table, {"load (s)": ".1f", "images/s": ",.0f", "peak memory (GiB)": ".2f"}),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
