"""Data sets and their three splits: train (fine-tuning), val (rewards, selection), test (report).

A data set that fits in memory is decoded once into uint8 tensors held in memory (or on the GPU),
so an epoch does no image I/O; an image folder too large for that is streamed from disk, batch by
batch, by a ``DataLoader`` (:mod:`rlrank.streaming`). Either way batches are cut, augmented and
normalized on the fly, with the same random draws. The validation split is held
out from the training images, stratified by class and deterministic under ``seed``; the test split
is the data set's own (for ``digits`` a fixed stratified fifth, the same for every seed).

Supported data sets:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline).
* ``cifar10``: torchvision's CIFAR-10 files in ``data_dir`` (downloaded only with ``download``).
* ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (or ``DIR/val``), where ``DIR``
  may also be a ``.tar.gz`` archive of that layout, extracted once into a cache folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rlrank.errors import UserError

logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "imagefolder")
LOADINGS = ("auto", "memory", "stream")
"""How ``imagefolder`` images are held: ``memory`` decodes them all once, ``stream`` reads batches
from disk, ``auto`` streams a folder whose decoded images would pass ``memory_limit`` bytes."""
RESIDENT_LIMIT = 1024**3
"""A streamed split read again and again (the reward's validation images) is held in memory when it
takes at most this many bytes decoded."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError):
    """A data set that cannot be found or read."""


@dataclass
class DataConfig:
    """Which data set to load and how to split it.

    Attributes:
        dataset: One of :data:`DATASETS`.
        data_dir: Folder (or ``.tar.gz`` for ``imagefolder``) holding the data.
        val_size: Validation images held out from train: a fraction (< 1) or a count (>= 1).
        seed: Seed of the train/val split.
        download: Allow downloading CIFAR-10 when it is missing.
        cache_dir: Where archives are extracted (default ``$RLRANK_CACHE`` or ``~/.cache/rlrank``).
        loading: One of :data:`LOADINGS` (``imagefolder`` only; the other data sets fit in memory).
        memory_limit: Decoded bytes above which ``loading="auto"`` streams from disk.
        image_size: Side every ``imagefolder`` image is fitted to (scaled to cover it, centre-cropped);
            default: the first training image's size.
        workers: Decoding processes of a streamed split (default:
            :func:`rlrank.image_folder.default_workers`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    val_size: float = 0.1
    seed: int = 0
    download: bool = False
    cache_dir: str | None = None
    loading: str = "auto"
    memory_limit: int = 4 * 1024**3
    image_size: int | None = None
    workers: int | None = None


@dataclass
class ImageSplit:
    """Images as uint8 ``(N, C, H, W)`` and labels as int64 ``(N,)``, held in memory (or on the GPU).

    A split too large for memory is a :class:`rlrank.streaming.FileSplit` instead: the same methods,
    with batches decoded from disk.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes the decoded images take."""
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device | str) -> ImageSplit:
        return ImageSplit(self.images.to(device), self.labels.to(device))

    def take(self, index: torch.Tensor) -> ImageSplit:
        """The images at ``index``, in that order."""
        index = index.to(self.images.device)
        return ImageSplit(self.images[index], self.labels[index])

    def subset(self, n: int) -> ImageSplit:
        """The first ``n`` images (the splits are already shuffled)."""
        return ImageSplit(self.images[:n], self.labels[:n])

    def read_batches(
        self, order: torch.Tensor | None, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches in ``order`` (default: as stored)."""
        if order is not None:
            order = order.to(self.images.device)
        for start in range(0, len(self), batch_size):
            if order is None:
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                yield self.images[index], self.labels[index]

    def load(self) -> ImageSplit:
        """The split itself (it is in memory already)."""
        return self


class Split(Protocol):
    """What a model's feeding needs of a split: :class:`ImageSplit` (in memory) or
    :class:`rlrank.streaming.FileSplit` (from disk)."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def nbytes(self) -> int: ...

    def to(self, device: torch.device | str) -> Split: ...

    def take(self, index: torch.Tensor) -> Split: ...

    def subset(self, n: int) -> Split: ...

    def read_batches(
        self, order: torch.Tensor | None, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def load(self) -> ImageSplit: ...


@dataclass
class DataSplits:
    """The three splits of one data set and how to feed them to a model."""

    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.image_shape[0])

    @property
    def input_size(self) -> int:
        return int(self.train.image_shape[-1])

    def to(self, device: torch.device | str) -> DataSplits:
        """The same splits held on ``device`` (e.g. the GPU, so batches never cross the bus)."""
        device = torch.device(device)
        return DataSplits(
            self.name,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.classes,
            self.mean,
            self.std,
            self.crop_padding,
            self.flip,
            device,
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images to normalized float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop (zero padding ``crop_padding``) and, if enabled, horizontal flip, per image."""
        n, _, h, w = images.shape
        p = self.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(images, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
            rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]
            cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]
            batch = torch.arange(n, device=images.device)[:, None, None]
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def batches(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over ``split`` as normalized ``(images, labels)`` batches on the split's device."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        order = torch.randperm(len(split), generator=generator) if shuffle else None
        for images, labels in split.read_batches(order, batch_size):
            if augment:
                images = self.augment(images, generator)
            yield self.normalize(images), labels

    def held(self, split: Split, limit: int = RESIDENT_LIMIT) -> Split:
        """``split`` decoded into memory when it takes at most ``limit`` bytes, else as it is: a
        streamed split read again and again (the reward's validation images) is decoded once."""
        return split.load() if split.nbytes <= limit else split

    def endless_batches(
        self, split: Split, batch_size: int, generator: torch.Generator, augment: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled, augmented training batches forever (a new permutation every pass)."""
        while True:
            yield from self.batches(split, batch_size, shuffle=True, augment=augment, generator=generator)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_data(config: DataConfig) -> DataSplits:
    """Load a data set and split it into train / val / test.

    Raises:
        DataError: Unknown data set, missing or empty data folder, unreadable files.
    """
    if config.dataset not in DATASETS:
        raise DataError(f"unknown dataset {config.dataset!r}; known: {', '.join(DATASETS)}")
    if config.dataset == "digits":
        train_pool, test, classes = _load_digits()
        (mean, std), padding, flip = _channel_stats(train_pool.images), 1, False
    elif config.dataset == "cifar10":
        train_pool, test, classes = _load_cifar10(config)
        mean, std, padding, flip = IMAGENET_MEAN, IMAGENET_STD, 4, True
    else:
        from rlrank.image_folder import load_image_folder

        train_pool, test, classes = load_image_folder(config)
        mean, std, padding, flip = IMAGENET_MEAN, IMAGENET_STD, _default_padding(train_pool), True
    if len(classes) < 2:
        raise DataError(
            f"{config.dataset} data{f' in {config.data_dir}' if config.data_dir else ''} has "
            f"{len(classes)} class ({', '.join(map(str, classes))}): classification needs at least two"
        )
    train, val = split_train_val(train_pool, config.val_size, config.seed)
    logger.info(
        "%s: %d train, %d val, %d test images of %s, %d classes",
        config.dataset,
        len(train),
        len(val),
        len(test),
        "x".join(map(str, train.image_shape)),
        len(classes),
    )
    return DataSplits(config.dataset, train, val, test, classes, tuple(mean), tuple(std), padding, flip)


def split_train_val(pool: Split, val_size: float, seed: int) -> tuple[Split, Split]:
    """Hold a stratified validation split out of ``pool``; both parts come back shuffled.

    Args:
        pool: The data set's training images.
        val_size: A fraction in (0, 1) or a number of images (>= 1).
        seed: The split is a deterministic function of ``seed``.
    """
    n = len(pool)
    if not (math.isfinite(val_size) and val_size >= 0):
        raise DataError(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size}")
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    n_classes = len(torch.unique(pool.labels))
    if not 0 < n_val < n:
        raise DataError(f"val_size {val_size} leaves no train or no val images out of {n}")
    if n_val < n_classes:
        raise DataError(
            f"val_size {val_size} holds out {n_val} images for {n_classes} classes: a validation split "
            f"needs at least one image per class (give at least {n_classes})"
        )
    generator = torch.Generator().manual_seed(seed)
    labels = pool.labels
    val_idx, train_idx = [], []
    classes = torch.unique(labels)
    # per class, a share of n_val proportional to the class size (largest remainders fill up)
    counts = torch.stack([(labels == c).sum() for c in classes]).double()
    quota = counts * n_val / n
    take = quota.floor().long()
    rest = n_val - int(take.sum())
    take[torch.argsort(quota - take, descending=True)[:rest]] += 1
    for c, k in zip(classes, take.tolist(), strict=True):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    val = torch.cat(val_idx)
    train = torch.cat(train_idx)
    val = val[torch.randperm(len(val), generator=generator)]
    train = train[torch.randperm(len(train), generator=generator)]
    return pool.take(train), pool.take(val)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _default_padding(split: Split) -> int:
    return max(1, int(split.image_shape[-1]) // 8)


def _load_digits() -> tuple[ImageSplit, ImageSplit, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # the test split is fixed (seed 0), whatever the run's seed: results stay comparable
    pool, test = split_train_val(ImageSplit(images, labels), 0.2, seed=0)
    return pool, test, [str(i) for i in range(10)]


def _load_cifar10(config: DataConfig) -> tuple[ImageSplit, ImageSplit, list[str]]:
    from torchvision.datasets import CIFAR10

    if not config.data_dir:
        raise DataError("dataset cifar10 needs --data-dir (the folder holding cifar-10-batches-py)")
    root = Path(config.data_dir)
    if not root.is_dir() and not config.download:
        raise DataError(f"data directory not found: {root}")
    try:
        train = CIFAR10(str(root), train=True, download=config.download)
        test = CIFAR10(str(root), train=False, download=config.download)
    except RuntimeError as exc:
        hint = "" if config.download else " (pass --download to fetch it; needs internet)"
        raise DataError(f"CIFAR-10 not found in {root}: {exc}{hint}") from exc
    except Exception as exc:
        raise DataError(f"could not load CIFAR-10 from {root}: {type(exc).__name__}: {exc}") from exc

    def to_split(ds: CIFAR10) -> ImageSplit:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return ImageSplit(images, torch.tensor(ds.targets, dtype=torch.int64))

    return to_split(train), to_split(test), list(train.classes)
