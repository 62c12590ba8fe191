"""Image folders streamed from disk (rlrank.streaming): the same batches as in memory, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlrank.data import DataConfig, DataError, ImageSplit, load_data
from rlrank.runlog import read_rows
from rlrank.search import main
from rlrank.streaming import FileSplit, fit_image

CLASSES = ("ant", "bee", "cow")


def _noise_folder(root: Path, per_class: int = 12, size: int = 16, odd: bool = True) -> Path:
    """``root/{train,test}/<class>/*.png``: random images (lossless), one of another size and shape."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 3)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = (20, 26) if (odd and split == "train" and c == 1 and i == 2) else (size, size)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255 - 10 * c  # a class colour, so a model can learn something
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _noise_folder(tmp_path_factory.mktemp("stream") / "data")


def _load(folder: Path, tmp_path: Path, **kwargs) -> object:
    return load_data(
        DataConfig("imagefolder", data_dir=str(folder), val_size=6, cache_dir=str(tmp_path), **kwargs)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_in_memory_ones(folder, tmp_path, workers):
    memory = _load(folder, tmp_path, loading="memory")
    stream = _load(folder, tmp_path, loading="stream", workers=workers)
    assert isinstance(memory.train, ImageSplit) and isinstance(stream.train, FileSplit)
    assert (memory.in_channels, memory.input_size) == (stream.in_channels, stream.input_size) == (3, 16)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(memory, name).labels, getattr(stream, name).labels)
    # shuffled and augmented training batches: the same draws, the same pixels
    for split, kwargs in (("train", dict(shuffle=True, augment=True)), ("test", {}), ("val", {})):
        a = list(
            memory.batches(getattr(memory, split), 5, generator=torch.Generator().manual_seed(3), **kwargs)
        )
        b = list(
            stream.batches(getattr(stream, split), 5, generator=torch.Generator().manual_seed(3), **kwargs)
        )
        assert len(a) == len(b) > 1
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    endless = stream.endless_batches(stream.train, 7, torch.Generator().manual_seed(1))
    endless_memory = memory.endless_batches(memory.train, 7, torch.Generator().manual_seed(1))
    for _ in range(len(stream.train) // 7 + 3):  # past the end of one pass
        assert torch.equal(next(endless)[0], next(endless_memory)[0])


def test_auto_streams_only_past_the_memory_limit(folder, tmp_path):
    streamed = _load(folder, tmp_path / "streamed", memory_limit=1000)
    assert isinstance(streamed.train, FileSplit) and isinstance(streamed.test, FileSplit)
    assert not (tmp_path / "streamed" / "decoded").exists()  # nothing decoded ahead
    assert isinstance(_load(folder, tmp_path / "memory").train, ImageSplit)
    assert len(list((tmp_path / "memory" / "decoded").glob("*.pt"))) == 2


def test_image_size_fits_every_image(folder, tmp_path):
    data = _load(folder, tmp_path, loading="stream", image_size=8, workers=0)
    images, _ = next(iter(data.batches(data.train, 64)))
    assert images.shape[1:] == (3, 8, 8) and data.input_size == 8
    memory = _load(folder, tmp_path, loading="memory", image_size=8)
    assert torch.equal(memory.train.images, data.train.load().images)


def test_fit_image_covers_and_centre_crops():
    image = torch.arange(2 * 4 * 8, dtype=torch.uint8).view(2, 4, 8)
    assert fit_image(image, (4, 8)) is image
    assert fit_image(image, (4, 4)).shape == (2, 4, 4)
    assert torch.equal(fit_image(image, (4, 4)), image[:, :, 2:6])  # same scale: a centre crop
    assert fit_image(image, (8, 8)).shape == (2, 8, 8)  # scaled up to cover, then cropped


def test_a_corrupt_file_in_a_streamed_split_is_one_clean_error(tmp_path):
    root = _noise_folder(tmp_path / "data", per_class=3, odd=False)
    bad = root / "train" / "bee" / "001.png"
    bad.write_bytes(b"\x89PNG not really")
    data = _load(root, tmp_path, loading="stream", workers=1)
    with pytest.raises(DataError) as info:
        for split in (data.train, data.val):
            list(data.batches(split, 4))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert "Traceback" not in str(info.value)


def test_held_decodes_a_small_streamed_split_once(folder, tmp_path):
    data = _load(folder, tmp_path, loading="stream", workers=0)
    held = data.held(data.val)
    assert isinstance(held, ImageSplit) and torch.equal(held.labels, data.val.labels)
    assert isinstance(data.held(data.val, limit=10), FileSplit)
    memory = _load(folder, tmp_path, loading="memory")
    assert torch.equal(held.images, memory.val.images)
    assert memory.held(memory.val) is memory.val


def test_a_search_on_a_streamed_folder_matches_the_in_memory_one(folder, tmp_path):
    argv = [
        "--model", "tiny", "--dataset", "imagefolder", "--data-dir", str(folder), "--val-size", "6",
        "--episodes", "2", "--warmup", "1", "--dense-epochs", "1", "--final-epochs", "0.5",
        "--finetune-steps", "2", "--bn-batches", "1", "--batch-size", "8", "--quiet", "--no-latency",
    ]  # fmt: skip
    reports = []
    for loading in ("memory", "stream"):
        out = tmp_path / loading
        assert main([*argv, "--loading", loading, "--loader-workers", "1", "--out", str(out)]) == 0
        (run,) = out.iterdir()
        assert json.loads((run / "config.json").read_text())["loading"] == loading
        rows = read_rows(run / "stage-1" / "episodes.jsonl")
        reports.append(
            (json.loads((run / "report.json").read_text()), [(r["loss"], r["layers"]) for r in rows])
        )
    (memory, memory_rows), (stream, stream_rows) = reports
    for key in ("dense", "compressed"):
        assert stream[key] == memory[key]
    assert stream_rows == memory_rows  # same fine-tune batches, same validation losses


def test_bad_loading_options_are_one_line(folder, tmp_path, capsys):
    argv = ["--model", "tiny", "--dataset", "imagefolder", "--data-dir", str(folder), "--out", str(tmp_path)]
    assert main([*argv, "--loading", "disk"]) == 2
    assert main([*argv, "--image-size", "0"]) == 2
    assert main([*argv, "--loader-workers", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


GROWTH = """
import sys, torch
from rlrank.data import DataSplits
from rlrank.streaming import FileSplit
files = sys.argv[1:]
split = FileSplit(files * 3000, torch.arange(len(files) * 3000) % 2, (3, 64, 64), workers=1)
data = DataSplits("x", split, split, split, ["a", "b"], (0.5,) * 3, (0.25,) * 3, 8, True)
def anon_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon")) / 1024
for i, _ in enumerate(data.batches(split, 512, shuffle=True, augment=True)):
    if i == 5:
        first = anon_mib()
print(anon_mib() - first)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status (Linux)")
def test_memory_stays_flat_while_workers_stream(tmp_path):
    """Batches from a worker made the process grow ~150 MB over 40 batches of 512 64x64 images
    (glibc's adaptive mmap threshold) before :func:`rlrank.streaming.map_large_allocations`."""
    files = []
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run(
        [sys.executable, "-c", GROWTH, *files], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) < 60


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_streamed_batches_reach_the_gpu_through_pinned_memory(folder, tmp_path):
    memory = _load(folder, tmp_path, loading="memory").to("cuda")
    stream = _load(folder, tmp_path, loading="stream", workers=1).to("cuda")
    a = list(memory.batches(memory.train, 5, shuffle=True, augment=True))
    b = list(stream.batches(stream.train, 5, shuffle=True, augment=True))
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xb.is_cuda and yb.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)
