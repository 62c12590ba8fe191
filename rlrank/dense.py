"""The dense baseline of a run: the given weights, or a model trained here first, and its accuracy.

Compressing an untrained model means nothing, so without ``--checkpoint`` (or ``--pretrained``) the
dense model is trained for ``--dense-epochs`` and saved as ``dense.pt`` with its accuracy in
``dense.json``; a resumed run reads both back instead of training again.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from rlrank.atomic import write_json
from rlrank.finetune import NumericalFault, TrainConfig, evaluate, train_epochs
from rlrank.model_file import load, save
from rlrank.preflight import Setup
from rlrank.run_folder import DENSE_INFO_FILE, DENSE_MODEL_FILE, RunFolder, RunFolderError, read_json

logger = logging.getLogger(__name__)


@dataclass
class DenseBaseline:
    """The dense model's accuracy and weights.

    Attributes:
        val_accuracy: Accuracy on the validation split.
        test_accuracy: Accuracy on the test split (reported only).
        trained_here: Whether this run trained it (no weights were given).
        state_dict: Its weights.
    """

    val_accuracy: float
    test_accuracy: float
    trained_here: bool
    state_dict: dict[str, Any]


def dense_baseline(folder: RunFolder, setup: Setup, progress: bool) -> DenseBaseline:
    """The dense model's weights and accuracy; trains ``setup.model`` first when no weights were given."""
    config, data, model = setup.config, setup.data, setup.model
    info_path, weights_path = folder / DENSE_INFO_FILE, folder / DENSE_MODEL_FILE
    if info_path.is_file() and weights_path.is_file():  # resuming
        info = read_json(info_path)
        state = load(weights_path, map_location=setup.device).state_dict()
        try:
            return DenseBaseline(
                float(info["val_accuracy"]), float(info["test_accuracy"]), bool(info["trained_here"]), state
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFolderError(
                f"{info_path} is damaged ({exc!r}); the run cannot be resumed from it"
            ) from exc
    trained_here = not setup.weights_given
    if trained_here:
        logger.info(
            "no --checkpoint given: training the dense %s on %s for %g epochs first",
            config.model,
            config.dataset,
            config.dense_epochs,
        )
        train = TrainConfig(epochs=config.dense_epochs, lr=config.dense_lr, batch_size=config.batch_size)
        generator = torch.Generator().manual_seed(config.seed)
        try:
            train_epochs(model, data, train, generator, desc="training dense model", progress=progress)
        except NumericalFault as exc:
            raise NumericalFault(
                f"training the dense model diverged ({exc}); resume with a lower --dense-lr "
                f"(it was {config.dense_lr:g})"
            ) from exc
        save(weights_path, model, setup.spec, {"trained_here": True})
    bar = "evaluating the dense model" if progress else None
    val_acc, _ = evaluate(model, data, data.val, desc=bar)
    test_acc, _ = evaluate(model, data, data.test, desc=bar)
    logger.info("dense model: val accuracy %.4f, test accuracy %.4f", val_acc, test_acc)
    if trained_here:
        write_json(
            info_path, {"val_accuracy": val_acc, "test_accuracy": test_acc, "trained_here": trained_here}
        )
    return DenseBaseline(val_acc, test_acc, trained_here, copy.deepcopy(model.state_dict()))
