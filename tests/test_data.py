"""Data sets and their train / val / test splits (``rlrank.data``)."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlrank.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    DataError,
    DataSplits,
    ImageSplit,
    load_data,
    split_train_val,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


DIGITS_TOTAL = 1797

# rlrank.data decodes with torchvision.io, deprecated since torchvision 0.29 (still working)
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
]

# ------------------------------------------------------------------------------------------
# split_train_val on images that carry their own index
# ------------------------------------------------------------------------------------------


def _indexed_pool(n: int = 500, num_classes: int = 7) -> ImageSplit:
    """``n`` unique 1x2x2 images whose pixels encode their index, with imbalanced labels."""
    index = torch.arange(n)
    images = torch.stack([index // 256, index % 256, index // 256, index % 256], dim=1)
    images = images.to(torch.uint8).view(n, 1, 2, 2)
    # class c gets a share proportional to c + 1: imbalanced, every class present
    weights = torch.arange(1, num_classes + 1, dtype=torch.float64)
    labels = torch.multinomial(weights, n, replacement=True, generator=torch.Generator().manual_seed(1))
    labels[:num_classes] = torch.arange(num_classes)
    return ImageSplit(images, labels)


def _indices(split: ImageSplit) -> torch.Tensor:
    flat = split.images.view(len(split), -1).long()
    return flat[:, 0] * 256 + flat[:, 1]


def test_split_is_a_partition_of_the_pool() -> None:
    pool = _indexed_pool()
    train, val = split_train_val(pool, 0.2, seed=3)
    train_idx, val_idx = _indices(train).tolist(), _indices(val).tolist()
    assert len(val) == 100 and len(train) == 400
    assert len(set(train_idx)) == len(train_idx) and len(set(val_idx)) == len(val_idx)
    assert not set(train_idx) & set(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(pool)))
    # labels travel with their images
    assert torch.equal(train.labels, pool.labels[_indices(train)])
    assert torch.equal(val.labels, pool.labels[_indices(val)])


def test_split_is_stratified() -> None:
    pool = _indexed_pool()
    _, val = split_train_val(pool, 0.2, seed=0)
    pool_counts = torch.bincount(pool.labels)
    val_counts = torch.bincount(val.labels, minlength=len(pool_counts))
    expected = pool_counts.double() * len(val) / len(pool)
    assert (val_counts > 0).all()
    assert ((val_counts.double() - expected).abs() < 1).all(), (val_counts, expected)


def test_split_is_deterministic_per_seed() -> None:
    pool = _indexed_pool()
    _, val_a = split_train_val(pool, 0.2, seed=5)
    _, val_b = split_train_val(pool, 0.2, seed=5)
    _, val_c = split_train_val(pool, 0.2, seed=6)
    assert torch.equal(_indices(val_a), _indices(val_b))
    assert set(_indices(val_a).tolist()) != set(_indices(val_c).tolist())


def test_split_val_size_as_count() -> None:
    train, val = split_train_val(_indexed_pool(), 37, seed=0)
    assert (len(train), len(val)) == (463, 37)


@pytest.mark.parametrize("val_size", [0.0, 500, 10_000])
def test_split_refuses_empty_parts(val_size: float) -> None:
    with pytest.raises(DataError, match="leaves no train or no val"):
        split_train_val(_indexed_pool(), val_size, seed=0)


# ------------------------------------------------------------------------------------------
# digits (offline)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data(DataConfig("digits", val_size=0.1, seed=0))


def test_digits_sizes_and_shapes(digits: DataSplits) -> None:
    assert len(digits.test) == round(0.2 * DIGITS_TOTAL)
    assert len(digits.val) == round(0.1 * (DIGITS_TOTAL - len(digits.test)))
    assert len(digits.train) + len(digits.val) + len(digits.test) == DIGITS_TOTAL
    assert digits.train.images.dtype == torch.uint8 and digits.train.labels.dtype == torch.int64
    assert (digits.in_channels, digits.input_size, digits.num_classes) == (1, 8, 10)
    assert digits.classes == [str(i) for i in range(10)]


def test_digits_splits_partition_the_data_set(digits: DataSplits) -> None:
    """Train, val and test together hold every (image, label) of the data set exactly once.

    Compared as multisets, so this holds even if the data set contained duplicate images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    expected = Counter(
        (image.tobytes(), int(label)) for image, label in zip(images, bunch.target, strict=True)
    )
    found: Counter = Counter()
    for split in (digits.train, digits.val, digits.test):
        found.update(
            (image[0].numpy().tobytes(), int(label))
            for image, label in zip(split.images, split.labels, strict=True)
        )
    assert found == expected


def test_digits_val_keeps_every_class(digits: DataSplits) -> None:
    assert set(digits.val.labels.tolist()) == set(range(10))
    assert set(digits.test.labels.tolist()) == set(range(10))


def test_digits_seed_changes_val_but_not_test(digits: DataSplits) -> None:
    again = load_data(DataConfig("digits", val_size=0.1, seed=0))
    other = load_data(DataConfig("digits", val_size=0.1, seed=1))
    assert torch.equal(again.val.images, digits.val.images)
    assert torch.equal(again.train.labels, digits.train.labels)
    assert not torch.equal(other.val.images, digits.val.images)
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.test.labels, digits.test.labels)


def test_batches_are_normalized_float32(digits: DataSplits) -> None:
    batches = list(digits.batches(digits.train, 500))
    assert [len(y) for _, y in batches] == [500, 500, len(digits.train) - 1000]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (500, 1, 8, 8)
    assert torch.equal(y, digits.train.labels[:500])
    mean, std = torch.tensor(digits.mean), torch.tensor(digits.std)
    expected = (digits.train.images[:500].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    torch.testing.assert_close(x, expected)
    # the statistics come from the training images: the whole train split is ~standardized
    everything = torch.cat([x for x, _ in batches])
    assert abs(everything.mean().item()) < 0.05
    assert abs(everything.std().item() - 1) < 0.05


def test_shuffled_batches_keep_image_label_pairs(digits: DataSplits) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = next(iter(digits.batches(digits.train, 64, shuffle=True, generator=g)))
    assert not torch.equal(y, digits.train.labels[:64])
    pairs = {
        (img.numpy().tobytes(), int(lab))
        for img, lab in zip(digits.train.images, digits.train.labels, strict=True)
    }
    raw = (x * torch.tensor(digits.std).view(1, -1, 1, 1) + torch.tensor(digits.mean).view(1, -1, 1, 1)) * 255
    raw = raw.round().to(torch.uint8)
    assert all((img.numpy().tobytes(), int(lab)) in pairs for img, lab in zip(raw, y, strict=True))


def test_augmentation_changes_images_not_shape_or_labels(digits: DataSplits) -> None:
    g = torch.Generator().manual_seed(0)
    plain_x, plain_y = next(iter(digits.batches(digits.train, 64)))
    aug_x, aug_y = next(iter(digits.batches(digits.train, 64, augment=True, generator=g)))
    assert aug_x.shape == plain_x.shape and aug_x.dtype == torch.float32
    assert torch.equal(aug_y, plain_y)
    changed = (aug_x != plain_x).flatten(1).any(1)
    assert changed.sum() > 32  # with padding 1 only 1 crop in 9 is the identity


def _rgb_splits(crop_padding: int, flip: bool, n: int = 16, size: int = 6) -> DataSplits:
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    split = ImageSplit(images, torch.arange(n) % 2)
    return DataSplits("toy", split, split, split, ["a", "b"], IMAGENET_MEAN, IMAGENET_STD, crop_padding, flip)


def test_normalize_is_per_channel() -> None:
    data = _rgb_splits(crop_padding=0, flip=False)
    x = data.normalize(data.train.images)
    assert x.dtype == torch.float32 and x.shape == data.train.images.shape
    for c in range(3):
        expected = (data.train.images[:, c].float() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(x[:, c], expected)


def test_augment_flip_only_flips() -> None:
    data = _rgb_splits(crop_padding=0, flip=True)
    out = data.augment(data.train.images, torch.Generator().manual_seed(0))
    same = (out == data.train.images).flatten(1).all(1)
    flipped = (out == data.train.images.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert same.any() and flipped.any()


def test_augment_crop_is_a_shifted_window_of_the_padded_image() -> None:
    p = 2
    data = _rgb_splits(crop_padding=p, flip=False)
    images = data.train.images
    out = data.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    size = images.shape[-1]
    offsets = []
    for i in range(len(images)):
        fits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + size, dx : dx + size])
        ]
        assert fits, f"image {i} is no crop of its padded original"
        offsets.append(fits[0])
    assert len(set(offsets)) > 1


# ------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------

COLORS = {"cat": (250, 10, 10), "dog": (10, 10, 250), "emu": (10, 250, 10)}
COUNTS = {"train": {"cat": 3, "dog": 4, "emu": 2}, "test": {"cat": 1, "dog": 2, "emu": 1}}


def _write_folder(root: Path, suffix: str = ".png") -> Path:
    """``root/train/<class>/`` and ``root/test/<class>/`` with solid-colour 12x12 images."""
    for split, counts in COUNTS.items():
        for name, count in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = 10 if (name == "dog" and i == 3) else 12  # one odd size: resized on load
                Image.new("RGB", (size, size), COLORS[name]).save(folder / f"{i:03d}{suffix}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _assert_colors_match_labels(split: ImageSplit, classes: list[str], tolerance: int) -> None:
    for image, label in zip(split.images, split.labels, strict=True):
        expected = torch.tensor(COLORS[classes[int(label)]]).view(3, 1, 1)
        assert (image.int() - expected).abs().max() <= tolerance


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_imagefolder_loads_labels_and_classes(tmp_path: Path, suffix: str) -> None:
    root = _write_folder(tmp_path / "data", suffix)
    data = load_data(DataConfig("imagefolder", data_dir=str(root), val_size=3, cache_dir=str(tmp_path)))
    assert data.classes == ["cat", "dog", "emu"]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)
    assert data.train.images.shape[1:] == (3, 12, 12) and data.train.images.dtype == torch.uint8
    assert sorted(data.test.labels.tolist()) == [0, 1, 1, 2]
    labels = torch.cat([data.train.labels, data.val.labels]).tolist()
    assert Counter(labels) == {0: 3, 1: 4, 2: 2}
    tolerance = 0 if suffix == ".png" else 12  # JPEG is lossy
    for split in (data.train, data.val, data.test):
        _assert_colors_match_labels(split, data.classes, tolerance)
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD


def test_imagefolder_from_tar_gz(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="tiny")
    cache = tmp_path / "cache"
    config = DataConfig("imagefolder", data_dir=str(archive), val_size=3, cache_dir=str(cache))
    data = load_data(config)
    assert data.classes == ["cat", "dog", "emu"]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)
    _assert_colors_match_labels(data.test, data.classes, 0)
    # one extracted folder and the decoded images, nothing else (no temporary folder left behind)
    (extracted,) = [p for p in cache.iterdir() if p.name != "decoded"]
    assert (extracted / ".extracted").exists() and (extracted / "train" / "cat").is_dir()
    # a second load reuses the extracted folder
    again = load_data(config)
    assert torch.equal(again.test.images, data.test.images)
    assert sorted(cache.iterdir()) == sorted([extracted, cache / "decoded"])


def test_decoded_images_are_cached_and_a_changed_folder_decodes_again(tmp_path: Path, monkeypatch) -> None:
    import rlrank.image_folder

    root = _write_folder(tmp_path / "tiny")
    config = DataConfig("imagefolder", data_dir=str(root), val_size=3, cache_dir=str(tmp_path / "cache"))
    first = load_data(config)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2  # train and test

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(rlrank.image_folder, "_decode", no_decoding)
        cached = load_data(config)
    assert torch.equal(cached.train.images, first.train.images)
    assert torch.equal(cached.test.labels, first.test.labels)
    # a file that changes (here: another image under the same name) is never read from the cache
    victim = sorted((root / "test" / "cat").iterdir())[0]
    other = sorted((root / "test" / "dog").iterdir())[0]
    victim.write_bytes(other.read_bytes())
    changed = load_data(config)
    assert not torch.equal(changed.test.images, first.test.images)


def test_imagefolder_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="cannot extract") as info:
        load_data(DataConfig("imagefolder", data_dir=str(archive), cache_dir=str(cache)))
    assert str(archive) in str(info.value)
    assert not any(cache.iterdir())


def test_imagefolder_plain_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="not a folder or a .tar.gz") as info:
        load_data(DataConfig("imagefolder", data_dir=str(path)))
    assert str(path) in str(info.value)


def test_imagefolder_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="not found") as info:
        load_data(DataConfig("imagefolder", data_dir=str(missing)))
    assert str(missing) in str(info.value)


def test_imagefolder_without_train_folder(tmp_path: Path) -> None:
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ folder") as info:
        load_data(DataConfig("imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_imagefolder_empty_train_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders") as info:
        load_data(DataConfig("imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path / "train") in str(info.value)


def test_imagefolder_class_folders_without_images(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "readme.txt").write_text("no images here")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found") as info:
        load_data(DataConfig("imagefolder", data_dir=str(tmp_path)))
    assert str(tmp_path / "train") in str(info.value)


def test_imagefolder_corrupt_image_is_named(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "data")
    bad = root / "train" / "dog" / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode") as info:
        load_data(DataConfig("imagefolder", data_dir=str(root)))
    assert str(bad) in str(info.value)


def test_imagefolder_needs_data_dir() -> None:
    with pytest.raises(DataError, match="needs --data-dir"):
        load_data(DataConfig("imagefolder"))


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'") as info:
        load_data(DataConfig("mnist"))
    assert all(name in str(info.value) for name in ("digits", "cifar10", "imagefolder"))


def test_cifar10_needs_data_dir() -> None:
    with pytest.raises(DataError, match="cifar10 needs --data-dir"):
        load_data(DataConfig("cifar10"))


def test_cifar10_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "cifar"
    with pytest.raises(DataError) as info:
        load_data(DataConfig("cifar10", data_dir=str(missing)))
    assert str(missing) in str(info.value)


@pytest.mark.slow
def test_real_cifar10_jpeg_archive(cifar10_jpeg: DataSplits) -> None:
    data = cifar10_jpeg
    assert (len(data.train), len(data.val), len(data.test)) == (45_000, 5_000, 10_000)
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.val.labels).tolist() == [500] * 10
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
