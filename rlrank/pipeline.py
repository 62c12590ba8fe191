"""One whole search, top to bottom: check the inputs, the dense baseline, stages of search ->
decompose -> fine-tune, the report. :func:`run` is what ``python -m rlrank.search`` calls.

Everything that can fail on bad input (model, data, checkpoint, budget, policy) is checked before
the run folder is created (:mod:`rlrank.preflight`), so a refused run leaves nothing behind. Every
episode is appended to the stage's log as it ends and a resume checkpoint follows it, so
``run(resume=folder)`` continues a killed search from its last completed episode.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from rlrank.atomic import write_json
from rlrank.config import SearchConfig
from rlrank.dense import dense_baseline
from rlrank.flops import count_model
from rlrank.model_file import save
from rlrank.preflight import prepare
from rlrank.report import build_report, latency
from rlrank.run_folder import CONFIG_FILE, MODEL_FILE, REPORT_FILE, RunFolder
from rlrank.stage import run_stage

logger = logging.getLogger(__name__)


def run_name(config: SearchConfig) -> str:
    """The default name of a new run folder: model, budget and start time."""
    return f"{config.model}-flops{config.flops:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(
    config: SearchConfig | None = None, resume: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run a search (or resume the one in ``resume``) and return its report.

    Args:
        config: The search; ignored when resuming (the run's ``config.json`` is used).
        resume: A run folder to continue from its last completed episode.
        progress: Show progress bars.

    Returns:
        The report (``report.json``) plus ``run_dir``, the run folder.

    Raises:
        UserError: Bad input, found before anything is written.
        RunFailure: The search could not go on (the run folder can be resumed).
    """
    started = time.perf_counter()

    # ---- the options: given, or those of the run being resumed
    folder = None
    if resume is not None:
        folder = RunFolder.open(resume)
        config = SearchConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        if folder.complete:
            logger.info("run %s is already complete", folder.path)
            return json.loads((folder / REPORT_FILE).read_text())
    assert config is not None

    # ---- every input checked, data and model loaded, before anything is written
    setup = prepare(config)
    folder = folder or RunFolder.create(config.out, run_name(config))
    with folder:
        if resume is None:
            write_json(folder / CONFIG_FILE, config.to_dict())
        logger.info("run folder: %s", folder.path)

        # ---- the dense baseline: the given weights, or a model trained here
        model = setup.model
        dense = dense_baseline(folder, setup, progress)
        model.load_state_dict(dense.state_dict)
        dense_model = copy.deepcopy(model).eval()
        dense_cost = count_model(model, setup.input_shape)

        # ---- the stages: search -> decompose -> fine-tune, each on the model the last one produced
        stages: list[dict[str, Any]] = []
        budgets = config.budgets_of_stages()
        previous_val = dense.val_accuracy
        for k, budget in enumerate(budgets, start=1):
            last = k == len(budgets)
            model, result = run_stage(
                folder, setup, model, dense_model, dense_cost.params, k, budget, last, progress
            )
            improved = result.val_accuracy >= previous_val
            if not improved and k > 1:
                logger.warning(
                    "stage %d did not improve on stage %d: val accuracy %.4f -> %.4f at budget %.3f",
                    k,
                    k - 1,
                    previous_val,
                    result.val_accuracy,
                    budget,
                )
            previous_val = result.val_accuracy
            stages.append({**result.to_dict(), "improved": improved})

        # ---- the report: test accuracy (first and only use of the test split), cost, latency
        report = build_report(
            config,
            setup.device,
            setup.data,
            dense,
            dense_cost,
            model,
            setup.input_shape,
            stages,
            setup.warnings,
        )
        if config.latency:
            report.latency_ms = latency(dense_model, model, setup.input_shape, setup.device)
        save(folder / MODEL_FILE, model, setup.spec, {"report": REPORT_FILE, "budget": config.flops})
        report.wall_seconds = time.perf_counter() - started
        write_json(folder / REPORT_FILE, report.to_dict())
        logger.info(
            "dense test accuracy %.4f -> compressed %.4f at %.3f of the FLOPs (%s)",
            dense.test_accuracy,
            report.compressed.test_accuracy,
            report.compressed.flops_ratio,
            folder.path,
        )
        return {**report.to_dict(), "run_dir": str(folder.path)}
