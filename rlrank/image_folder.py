"""Image folders on disk: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or ``DIR/val``), or a
``.tar.gz`` of that layout, extracted once into a cache folder and decoded once per machine.

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
from rlrank.data import DataConfig, DataError, ImageSplit
from rlrank.errors import StorageError
from rlrank.safe_load import load_tensors

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DECODE_CHUNK = 2048
"""Images decoded per batched call (and per progress-bar step)."""
DECODED_CACHE_LIMIT = 2 * 1024**3
"""Decoded folders up to this many bytes are cached; larger ones are decoded every run."""


def cache_root(config: DataConfig) -> Path:
    """Folder where archives are extracted."""
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("RLRANK_CACHE", Path.home() / ".cache" / "rlrank"))


def _extract_archive(archive: Path, config: DataConfig) -> Path:
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


def load_image_folder(config: DataConfig) -> tuple[ImageSplit, ImageSplit, list[str]]:
    if not config.data_dir:
        raise DataError("dataset imagefolder needs --data-dir (a folder with train/ and test/, or a .tar.gz)")
    root = Path(config.data_dir)
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if root.is_file():
        if not root.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"{root} is a file, not a folder or a .tar.gz archive")
        root = _extract_archive(root, config)
    layout = _layout_root(root)
    if layout is None:
        raise DataError(f"{root} has no train/ folder (expected train/<class>/ and test/<class>/)")
    test_dir = layout / "test" if (layout / "test").is_dir() else layout / "val"
    if not test_dir.is_dir():
        raise DataError(f"{layout} has no test/ or val/ folder")
    classes = sorted(p.name for p in (layout / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{layout / 'train'} has no class folders")
    train = decoded_split(layout / "train", classes, config)
    test = decoded_split(test_dir, classes, config)
    return train, test, classes


def _image_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
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


def decoded_split(folder: Path, classes: list[str], config: DataConfig) -> ImageSplit:
    """Every image under ``folder/<class>/`` as one uint8 tensor, decoded once per machine.

    The decoded tensors of a folder up to :data:`DECODED_CACHE_LIMIT` bytes are kept in the cache
    folder, keyed by the folder's path and every file's name, size and modification time, so a
    later run (or a changed folder) never reads stale images and an unchanged one decodes nothing.
    """
    files, labels = _image_files(folder, classes)
    stats = [path.stat() for path in files]
    fingerprint = hashlib.sha1(str(folder.resolve()).encode())
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
    split = _decode(files, labels, folder)
    if split.images.numel() <= DECODED_CACHE_LIMIT:
        try:
            save_torch(cached, {"images": split.images, "labels": split.labels})
        except StorageError as exc:
            logger.warning("could not cache the decoded images: %s", exc)
    return split


def _decode(files: list[Path], labels: list[int], folder: Path) -> ImageSplit:
    """Decode ``files`` (batched JPEG decoding where possible), resizing odd sizes to the first's."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    decoded: list[torch.Tensor] = []
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}", unit="img", disable=not _bars())
    for start in range(0, len(files), DECODE_CHUNK):
        chunk = files[start : start + DECODE_CHUNK]
        encoded = [read_file(str(path)) for path in chunk]
        images: list[torch.Tensor] | None = None
        if all(p.suffix.lower() in {".jpg", ".jpeg"} for p in chunk):
            try:  # batched JPEG decoding is several times faster than one call per image
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB)
            except RuntimeError:
                images = None  # fall back to one image at a time, to name the bad file
        if images is None:
            images = []
            for path, data in zip(chunk, encoded, strict=True):
                try:
                    images.append(decode_image(data, mode=ImageReadMode.RGB))
                except RuntimeError as exc:
                    bar.close()
                    raise DataError(f"cannot decode image {path}: {str(exc).splitlines()[0][:200]}") from exc
        decoded += images
        bar.update(len(chunk))
    bar.close()
    shape = decoded[0].shape
    images = [
        image
        if image.shape == shape
        else torch.nn.functional.interpolate(
            image[None].float(), size=shape[1:], mode="bilinear", antialias=True
        )[0]
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for image in decoded
    ]
    return ImageSplit(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _bars() -> bool:
    """Progress bars for the slow steps, unless rlrank's logging is quiet (``--quiet``)."""
    return logging.getLogger("rlrank").getEffectiveLevel() <= logging.INFO
