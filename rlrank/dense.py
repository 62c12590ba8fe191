"""The dense baseline of a run: the given weights, or a model trained here first, and its accuracy.

Compressing an untrained model means nothing, so without ``--checkpoint`` (or ``--pretrained``) the
dense model is trained for ``--dense-epochs`` and saved as ``dense.pt`` with its accuracy in
``dense.json``; a resumed run reads both back instead of training again.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from rlrank.atomic import write_json
from rlrank.finetune import TrainConfig, evaluate, train_epochs
from rlrank.model_file import load, save
from rlrank.preflight import Setup
from rlrank.run_folder import DENSE_INFO_FILE, DENSE_MODEL_FILE, RunFolder

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
        info = json.loads(info_path.read_text())
        state = load(weights_path, map_location=setup.device).state_dict()
        return DenseBaseline(info["val_accuracy"], info["test_accuracy"], info["trained_here"], state)
    trained_here = not (config.checkpoint or config.pretrained)
    if trained_here:
        logger.info(
            "no --checkpoint given: training the dense %s on %s for %g epochs first",
            config.model,
            config.dataset,
            config.dense_epochs,
        )
        train = TrainConfig(epochs=config.dense_epochs, lr=config.dense_lr, batch_size=config.batch_size)
        generator = torch.Generator().manual_seed(config.seed)
        train_epochs(model, data, train, generator, desc="training dense model", progress=progress)
        save(weights_path, model, setup.spec, {"trained_here": True})
    val_acc, _ = evaluate(model, data, data.val)
    test_acc, _ = evaluate(model, data, data.test)
    logger.info("dense model: val accuracy %.4f, test accuracy %.4f", val_acc, test_acc)
    if trained_here:
        write_json(
            info_path, {"val_accuracy": val_acc, "test_accuracy": test_acc, "trained_here": trained_here}
        )
    return DenseBaseline(val_acc, test_acc, trained_here, copy.deepcopy(model.state_dict()))
