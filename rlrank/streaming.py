"""Image splits read from disk batch by batch: data sets larger than memory (ImageNet-size folders).

A :class:`FileSplit` holds file paths and labels, not pixels. Its batches are decoded by a
:class:`torch.utils.data.DataLoader` (``workers`` processes, pinned memory when the batches go to a
GPU); the order of the images and the augmentation are drawn in the main process exactly as for an
in-memory :class:`~rlrank.data.ImageSplit`, so a streamed split and the same images held in memory
give identical batches. Every image is fitted to one ``(H, W)`` by :func:`fit_image`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rlrank.data import DataError, ImageSplit

logger = logging.getLogger(__name__)


MMAP_THRESHOLD = 4 * 1024**2
"""Allocations from this size up are mapped (and unmapped when freed) while workers stream batches."""


def map_large_allocations() -> None:
    """Serve every allocation of :data:`MMAP_THRESHOLD` bytes or more by ``mmap`` (glibc's
    ``mallopt``; elsewhere, or when ``MALLOC_MMAP_THRESHOLD_`` is set, nothing changes).

    Batches from DataLoader workers come through shared memory, and the large, short-lived tensors
    made from them otherwise end up on the heap once glibc's adaptive threshold has risen, where
    they fragment: the process grew by about 11 MB per 224x224 batch of 128, without bound
    (``experiments/RESULTS.md``, "Data path"). A fixed threshold keeps it flat.
    """
    global _THRESHOLD_SET
    if _THRESHOLD_SET or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _THRESHOLD_SET = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_THRESHOLD_SET = False


def fit_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``image`` (uint8 ``(C, h, w)``) at ``size``: scaled (antialiased) until it covers ``size``,
    then centre-cropped; an image already at ``size`` comes back unchanged."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(size):
        return image
    scale = max(size[0] / h, size[1] / w)
    scaled = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    resized = torch.nn.functional.interpolate(
        image[None].float(), size=scaled, mode="bilinear", antialias=True
    )[0]
    top, left = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
    return resized[:, top : top + size[0], left : left + size[1]].round().clamp(0, 255).to(torch.uint8)


def decode_file(path: str) -> torch.Tensor:
    """One image file as uint8 RGB ``(3, h, w)``.

    Raises:
        DataError: The file cannot be read or decoded (the message names it).
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {str(exc).splitlines()[0][:200]}") from exc


class _BatchFiles(Dataset):
    """Item ``i`` of the loader is batch ``i``: its files decoded, fitted and stacked.

    A file that cannot be decoded comes back as its error message, so that the main process raises
    one clean :class:`~rlrank.data.DataError` instead of a worker's traceback.
    """

    def __init__(self, files: Sequence[str], size: tuple[int, int], batches: list[np.ndarray]) -> None:
        self.files = files
        self.size = size
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        try:
            return torch.stack(
                [fit_image(decode_file(self.files[i]), self.size) for i in self.batches[index]]
            )
        except DataError as exc:
            return str(exc)


@dataclass
class FileSplit:
    """Images as files on disk, decoded when a batch is read.

    Attributes:
        files: One path per image.
        labels: int64 ``(N,)``.
        image_shape: ``(C, H, W)`` every image is fitted to.
        workers: Decoding processes (0: decode in the main process).
        device: Where batches are delivered.
    """

    files: list[str]
    labels: torch.Tensor
    image_shape: tuple[int, int, int]
    workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the split takes once decoded."""
        return len(self) * int(np.prod(self.image_shape))

    def to(self, device: torch.device | str) -> FileSplit:
        return replace(self, device=torch.device(device))

    def take(self, index: torch.Tensor) -> FileSplit:
        """The images at ``index``, in that order."""
        positions = index.tolist()
        return replace(self, files=[self.files[i] for i in positions], labels=self.labels[index])

    def subset(self, n: int) -> FileSplit:
        """The first ``n`` images (the splits are already shuffled)."""
        return replace(self, files=self.files[:n], labels=self.labels[:n])

    def read_batches(
        self, order: torch.Tensor | None, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches on :attr:`device`, in ``order`` (default: as stored)."""
        n = len(self)
        positions = order.cpu().numpy() if order is not None else np.arange(n)
        batches = [positions[start : start + batch_size] for start in range(0, n, batch_size)]
        pin = self.device.type == "cuda"
        if self.workers > 0:
            map_large_allocations()
        loader = DataLoader(
            _BatchFiles(self.files, self.image_shape[1:], batches),
            batch_size=None,
            num_workers=min(self.workers, len(batches)),
            pin_memory=pin,
            prefetch_factor=4 if self.workers > 0 else None,
        )
        labels = self.labels.to(self.device)
        for index, images in zip(batches, loader, strict=True):
            if isinstance(images, str):
                raise DataError(images)
            yield images.to(self.device, non_blocking=pin), labels[torch.as_tensor(index, device=self.device)]

    def load(self) -> ImageSplit:
        """Every image decoded into memory (on :attr:`device`)."""
        images = [batch for batch, _ in self.read_batches(None, 256)]
        return ImageSplit(torch.cat(images), self.labels.to(self.device))
