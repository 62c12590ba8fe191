"""The Python API: :func:`compress` a trained ``nn.Module`` of your own, as ``rlrank-search`` would.

::

    import rlrank
    from rlrank.data import DataConfig, load_data

    data = load_data(DataConfig("imagefolder", data_dir="my-images/", val_size=5000))
    report = rlrank.compress(my_model, data, flops=0.5, episodes=100, final_epochs=2)
    compressed = rlrank.load(report["run_dir"] + "/model.pt")

The model is registered under a name (its class name, lower-case, unless ``model_name`` says
otherwise) so that the run folder, the logs and the report name it; its layers are found and
factorized exactly as for a built-in model. The saved ``model.pt`` rebuilds it in a fresh process
from its class (importable and constructible without arguments) or from a builder you registered
with :func:`rlrank.models.register_model` in an importable module.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from rlrank.config import SearchConfig
from rlrank.data import DataConfig, DataSplits, load_data
from rlrank.errors import ConfigError
from rlrank.models import builder_of, register_model
from rlrank.pipeline import run


def compress(
    model: nn.Module,
    data: DataSplits | str = "digits",
    flops: float | None = None,
    *,
    model_name: str | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Compress a trained model to a FLOP budget: search per-layer ranks, decompose, fine-tune.

    Args:
        model: The trained model (not modified; a copy is compressed).
        data: Data splits (:func:`rlrank.data.load_data`), or the name of a built-in data set
            (``digits``, ``cifar10`` with ``data_dir=...`` in ``options``), or a folder / ``.tar.gz``
            in the ImageFolder layout.
        flops: Keep at most this fraction of the model's multiply-accumulates (default 0.5, or 1
            with a latency budget, ``latency_budget=F``, alone).
        model_name: The name the run uses for the architecture (default: the class name, lower-case).
        resume: A run folder of an earlier call to continue (pass the same model and data).
        progress: Show progress bars.
        verbose: Log what happens to stderr, as ``rlrank-search`` does (unless the ``rlrank``
            logger has handlers of your own).
        **options: Any other ``rlrank-search`` option, by its :class:`~rlrank.config.SearchConfig`
            field name (``episodes=200``, ``agent="random"``, ``decomposition="cp"``, ``out="runs"``).

    Returns:
        The report (``report.json``) with ``run_dir``, the run folder.

    Raises:
        UserError: An option or input that cannot work (nothing is written).
        RunFailure: The run could not go on; continue with ``resume=report_dir``.
    """
    name = model_name or type(model).__name__.lower()
    existing = builder_of(name)
    if existing is not None and not getattr(existing, "_rlrank_compress", False):
        raise ConfigError(f"model name {name!r} is taken by a registered model; pass model_name=...")
    register_model(name)(_copying_builder(model))
    splits = data if isinstance(data, DataSplits) else _load(data, options)
    with _logging(verbose):
        if resume is not None:
            return run(resume=resume, progress=progress, model=model, data=splits, overrides=options or None)
        unknown = sorted(set(options) - set(SearchConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see rlrank-search --help")
        if flops is None:
            flops = 1.0 if options.get("latency_budget") is not None else 0.5
        config = SearchConfig(model=name, dataset=splits.name, flops=flops, **options)
        return run(config, progress=progress, model=model, data=splits)


def _copying_builder(model: nn.Module):
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, pretrained: bool = False):
        return copy.deepcopy(model)

    build._rlrank_compress = True  # type: ignore[attr-defined]
    return build


def _load(data: str, options: dict[str, Any]) -> DataSplits:
    """Built-in data by name, or an ImageFolder-style folder / archive by path."""
    val_size = options.get("val_size")
    if data in ("digits", "cifar10"):
        dataset, data_dir = data, options.get("data_dir")
    else:
        dataset, data_dir = "imagefolder", str(data)
    if val_size is None:
        val_size = 0.2 if dataset == "digits" else 5000
    return load_data(
        DataConfig(
            dataset,
            data_dir,
            val_size,
            options.get("split_seed", 0),
            options.get("download", False),
            loading=options.get("loading", "auto"),
            image_size=options.get("image_size"),
            workers=options.get("loader_workers"),
        )
    )


@contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Send rlrank's INFO records to stderr for the call, as the command does (unless ``verbose`` is
    off or rlrank's logger already has a handler of its own); they do not reach the root logger's
    handlers meanwhile, so nothing is printed twice."""
    logger = logging.getLogger("rlrank")
    if not verbose or logger.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
