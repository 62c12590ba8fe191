"""Image folders on disk: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or ``DIR/val``), or a
``.tar.gz`` of that layout, extracted once into a cache folder; decoded once per machine into memory,
or streamed from disk when the decoded images would not fit (:mod:`rlrank.streaming`).

Extraction and decoding show progress bars; the decoded uint8 tensors of a folder are cached (see
:func:`decoded_split`), so a second run on the same data starts in seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlrank.atomic import save_torch
from rlrank.cache_dir import cache_dir
from rlrank.data import LOADINGS, DataConfig, DataError, ImageSplit, Split
from rlrank.errors import StorageError
from rlrank.safe_load import load_tensors
from rlrank.streaming import FileSplit, decode_file, fit_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DECODE_CHUNK = 2048
"""Images decoded per batched call (and per progress-bar step)."""
DECODED_CACHE_LIMIT = 2 * 1024**3
"""Decoded folders up to this many bytes are cached; larger ones are decoded every run."""


def cache_root(config: DataConfig) -> Path:
    """Folder where archives are extracted and decoded images cached."""
    return cache_dir(config.cache_dir)


def extract_archive(archive: Path, config: DataConfig) -> Path:
    """Extract a ``.tar.gz`` once into the cache; later calls reuse the extracted folder."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root(config) / f"{archive.name.split('.')[0]}-{key}"
    done = target / ".extracted"
    if done.exists():
        return target
    logger.info("extracting %s into %s (once)", archive, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not _bars()):
                tar.extract(member, tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot extract {archive}: {exc}") from exc
    # the archive may hold the layout at its top or inside one folder
    inner = _layout_root(tmp) or tmp
    if target.exists():
        shutil.rmtree(target)
    inner.rename(target)
    if inner != tmp:  # the layout sat inside one folder: drop the now empty wrapper
        shutil.rmtree(tmp, ignore_errors=True)
    (target / ".extracted").touch()
    return target


def _layout_root(folder: Path) -> Path | None:
    if (folder / "train").is_dir():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return None


def load_image_folder(config: DataConfig) -> tuple[Split, Split, list[str]]:
    """The train pool and test split of an image folder (or ``.tar.gz``) and its class names.

    Held in memory (decoded once per machine, see :func:`decoded_split`) or streamed from disk
    (:class:`~rlrank.streaming.FileSplit`) as ``config.loading`` says; ``auto`` streams a folder whose
    decoded images would take more than ``config.memory_limit`` bytes.
    """
    if not config.data_dir:
        raise DataError("dataset imagefolder needs --data-dir (a folder with train/ and test/, or a .tar.gz)")
    if config.loading not in LOADINGS:
        raise DataError(f"unknown loading {config.loading!r}; known: {', '.join(LOADINGS)}")
    root = Path(config.data_dir)
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if root.is_file():
        if not root.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"{root} is a file, not a folder or a .tar.gz archive")
        root = extract_archive(root, config)
    layout = _layout_root(root)
    if layout is None:
        raise DataError(f"{root} has no train/ folder (expected train/<class>/ and test/<class>/)")
    test_dir = layout / "test" if (layout / "test").is_dir() else layout / "val"
    if not test_dir.is_dir():
        raise DataError(f"{layout} has no test/ or val/ folder")
    classes = sorted(p.name for p in (layout / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{layout / 'train'} has no class folders")
    train_files = _image_files(layout / "train", classes)
    test_files = _image_files(test_dir, classes)
    size = (
        (config.image_size,) * 2
        if config.image_size
        else tuple(decode_file(str(train_files[0][0])).shape[1:])
    )
    decoded_bytes = (len(train_files[0]) + len(test_files[0])) * 3 * size[0] * size[1]
    if config.loading == "stream" or (config.loading == "auto" and decoded_bytes > config.memory_limit):
        workers = default_workers() if config.workers is None else config.workers
        logger.info(
            "%s: streaming from disk (%.1f GB decoded%s), %d decoding worker%s",
            layout,
            decoded_bytes / 1e9,
            f" > --memory-limit {config.memory_limit / 1e9:.1f} GB" if config.loading == "auto" else "",
            workers,
            "" if workers == 1 else "s",
        )
        return (
            _file_split(*train_files, size, workers),
            _file_split(*test_files, size, workers),
            classes,
        )
    train = decoded_split(layout / "train", train_files, size, config)
    test = decoded_split(test_dir, test_files, size, config)
    return train, test, classes


def default_workers() -> int:
    """Decoding processes for a streamed split: none on one or two cores (the main process decodes
    as fast there, with half the memory: ``experiments/RESULTS.md``, "Data path"), else one per
    core beyond the first, at most 8."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


def _file_split(files: list[Path], labels: list[int], size: tuple[int, int], workers: int) -> FileSplit:
    return FileSplit(
        [str(path) for path in files], torch.tensor(labels, dtype=torch.int64), (3, *size), workers
    )


def _image_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The images under ``folder/<class>/`` (sorted per class) and their class indices."""
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        found = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise DataError(f"no images found under {folder}")
    return files, labels


def decoded_split(
    folder: Path, found: tuple[list[Path], list[int]], size: tuple[int, int], config: DataConfig
) -> ImageSplit:
    """The images ``found`` under ``folder`` (files and labels) fitted to ``size``, as one uint8
    tensor, decoded once per machine.

    The decoded tensors of a folder up to :data:`DECODED_CACHE_LIMIT` bytes are kept in the cache
    folder, keyed by the folder's path, the size and every file's name, size and modification time,
    so a later run (or a changed folder) never reads stale images and an unchanged one decodes nothing.
    """
    files, labels = found
    stats = [path.stat() for path in files]
    fingerprint = hashlib.sha1(f"{folder.resolve()}:{size}".encode())
    for path, stat in zip(files, stats, strict=True):
        fingerprint.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    cached = cache_root(config) / "decoded" / f"{folder.name}-{fingerprint.hexdigest()[:16]}.pt"
    if cached.is_file():
        try:
            payload = load_tensors(cached)
            logger.info("%s: %d decoded images from the cache %s", folder, len(files), cached)
            return ImageSplit(payload["images"], payload["labels"])
        except Exception as exc:  # a damaged cache file is decoded again
            logger.warning("ignoring the damaged cache file %s (%s)", cached, exc)
    split = _decode(files, labels, folder, size)
    if split.images.numel() <= DECODED_CACHE_LIMIT:
        try:
            save_torch(cached, {"images": split.images, "labels": split.labels})
        except StorageError as exc:
            logger.warning("could not cache the decoded images: %s", exc)
    return split


def _decode(files: list[Path], labels: list[int], folder: Path, size: tuple[int, int]) -> ImageSplit:
    """Decode ``files`` (batched JPEG decoding where possible), each fitted to ``size``, straight
    into one preallocated tensor (peak memory: the decoded images and one chunk)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    out = torch.empty((len(files), 3, *size), dtype=torch.uint8)
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}", unit="img", disable=not _bars())
    for start in range(0, len(files), DECODE_CHUNK):
        chunk = files[start : start + DECODE_CHUNK]
        images: list[torch.Tensor] | None = None
        if all(p.suffix.lower() in {".jpg", ".jpeg"} for p in chunk):
            try:  # batched JPEG decoding is several times faster than one call per image
                images = decode_jpeg([read_file(str(path)) for path in chunk], mode=ImageReadMode.RGB)
            except RuntimeError:
                images = None  # fall back to one image at a time, to name the bad file
        if images is None:
            images = []
            for path in chunk:
                try:
                    images.append(decode_file(str(path)))
                except DataError:
                    bar.close()
                    raise
        for offset, image in enumerate(images):
            out[start + offset] = fit_image(image, size)
        bar.update(len(chunk))
    bar.close()
    return ImageSplit(out, torch.tensor(labels, dtype=torch.int64))


def _bars() -> bool:
    """Progress bars for the slow steps, unless rlrank's logging is quiet (``--quiet``)."""
    return logging.getLogger("rlrank").getEffectiveLevel() <= logging.INFO
