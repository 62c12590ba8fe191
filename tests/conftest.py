"""Shared fixtures: the real data and models in ``../shared`` (tests skip when it is absent)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Extracted archives and decoded images go to a temporary folder, never the user's cache."""
    cache = tmp_path_factory.mktemp("rlrank-user-cache")
    previous = os.environ.get("RLRANK_CACHE")
    os.environ["RLRANK_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("RLRANK_CACHE", None)
    else:
        os.environ["RLRANK_CACHE"] = previous


@pytest.fixture
def shared_dir() -> Path:
    """The project's ``../shared`` folder; the test is skipped when it is not there."""
    if not SHARED.is_dir():
        pytest.skip(f"real data and models not available: {SHARED} does not exist")
    return SHARED


@pytest.fixture(scope="session")
def cifar10_jpeg(tmp_path_factory: pytest.TempPathFactory):
    """The real CIFAR-10 JPEGs of ``../shared`` as :class:`rlrank.data.DataSplits` (val: 5,000 images).

    Extracted once per session into a temporary cache; slow (~30 s), so only for ``slow`` tests.
    """
    from rlrank.data import DataConfig, load_data

    archive = SHARED / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real data not available: {archive} does not exist")
    cache = tmp_path_factory.mktemp("rlrank-cache")
    config = DataConfig("imagefolder", data_dir=str(archive), val_size=5000, cache_dir=str(cache))
    with warnings.catch_warnings():  # torchvision >= 0.29 warns on every decode (still works)
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        return load_data(config)


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module on one thread (torch and numpy's BLAS), then restore the previous setting.

    The tensors in these tests are tiny, so threads buy little; and on a 2-core machine shared with
    other jobs, two OpenMP threads that wait for each other make LAPACK and convolutions 5-50x slower.
    """
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)
