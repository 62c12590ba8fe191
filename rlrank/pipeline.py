"""One whole search, top to bottom: check the inputs, the dense baseline, stages of search ->
decompose -> fine-tune, the report. :func:`run` is what ``python -m rlrank.search`` calls.

Everything that can fail on bad input (model, data, checkpoint, budget, policy) is checked before
the run folder is created (:mod:`rlrank.preflight`), so a refused run leaves nothing behind. Every
episode is appended to the stage's log as it ends and a resume checkpoint follows it, so
``run(resume=folder)`` continues a killed search from its last completed episode.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from rlrank.atomic import write_json
from rlrank.config import SearchConfig
from rlrank.data import DataSplits
from rlrank.dense import dense_baseline
from rlrank.describe import describe_layers
from rlrank.errors import ConfigError, Interrupted, RunFailure
from rlrank.flops import count_model
from rlrank.latency_table import predicted_latency_ratio
from rlrank.model_file import save
from rlrank.options import cli_fields, flag_of
from rlrank.preflight import Setup, prepare
from rlrank.report import LATENCY_BATCHES, build_report, latency
from rlrank.run_folder import (
    CONFIG_FILE,
    DENSE_INFO_FILE,
    MODEL_FILE,
    REPORT_FILE,
    RunFolder,
    RunFolderError,
    read_json,
)
from rlrank.stage import run_stage
from rlrank.threads import available_cpus, busy_load

logger = logging.getLogger(__name__)


def run_name(config: SearchConfig) -> str:
    """The name of a new run folder: ``--name``, or model, method, agent, budget, stages and start time."""
    if config.name:
        return config.name
    stages = f"-{config.stages}stages" if config.stages > 1 else ""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{config.model}-{config.decomposition}-{config.agent}-flops{config.flops:g}{stages}-{stamp}"


def run(
    config: SearchConfig | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    model: nn.Module | None = None,
    data: DataSplits | None = None,
) -> dict[str, Any]:
    """Run a search (or resume the one in ``resume``) and return its report.

    Args:
        config: The search; ignored when resuming (the run's ``config.json`` is used).
        resume: A run folder to continue from its last completed episode.
        progress: Show progress bars.
        overrides: With ``resume``: options to change (only those declared ``resume_safe``, such as
            the final fine-tune's; see :func:`resumed_config`).
        model: A trained model to compress instead of building ``config.model`` (:func:`rlrank.compress`).
        data: Data splits instead of loading ``config.dataset`` (give them again when resuming).

    Returns:
        The report (``report.json``) plus ``run_dir``, the run folder.

    Raises:
        UserError: Bad input, found before anything is written.
        RunFailure: The search could not go on; its ``run_dir`` can be resumed.
        Interrupted: Ctrl-C; the run folder (if one was made) can be resumed.
    """
    started = time.perf_counter()
    if resume is not None:
        folder = RunFolder.open(resume)
        with folder:  # the lock first: a second --resume of a running search refuses at once
            for path in folder.remove_temp_files():
                logger.info("removed %s, left by an interrupted write", path)
            config = resumed_config(folder, overrides or {})
            if folder.complete:
                logger.info("run %s is already complete", folder.path)
                return read_json(folder / REPORT_FILE)
            try:
                setup = prepare(config, model, data)
            except KeyboardInterrupt:
                raise Interrupted(str(folder.path)) from None
            if overrides:
                write_json(folder / CONFIG_FILE, config.to_dict())
            return _search_in(folder, setup, started, progress)
    if overrides:
        raise ConfigError("option overrides are for --resume only")
    assert config is not None
    setup = prepare(config, model, data)  # every input checked, data and model loaded: nothing written yet
    folder = RunFolder.create(config.out, run_name(config))
    with folder:
        write_json(folder / CONFIG_FILE, config.to_dict())
        return _search_in(folder, setup, started, progress)


def resumed_config(folder: RunFolder, overrides: dict[str, Any]) -> SearchConfig:
    """The options of the run in ``folder``, with ``overrides`` applied.

    Only options declared ``resume_safe`` may change (the final fine-tune's settings, the device,
    ...); the dense model's training options only while it is not trained yet.

    Raises:
        ConfigError: An option that cannot change once the run started.
        RunFolderError: ``config.json`` is missing or damaged.
    """
    data = read_json(folder / CONFIG_FILE)
    try:
        config = SearchConfig.from_dict(data)
    except TypeError as exc:
        raise RunFolderError(f"{folder / CONFIG_FILE} is damaged ({exc})") from exc
    safe = {f.name for f in cli_fields(SearchConfig) if f.metadata.get("resume_safe")}
    if (folder / DENSE_INFO_FILE).is_file():
        safe -= {"dense_epochs", "dense_lr"}
    fixed = sorted(name for name in overrides if name not in safe)
    if fixed:
        defaults, by_name = SearchConfig(), {f.name: f for f in cli_fields(SearchConfig)}
        flags = ", ".join(flag_of(by_name[name], getattr(defaults, name)) for name in fixed)
        allowed = ", ".join(flag_of(by_name[name], getattr(defaults, name)) for name in sorted(safe))
        raise ConfigError(
            f"{flags} cannot change when resuming (the run already used its value); "
            f"options that can: {allowed}"
        )
    if overrides:
        logger.info(
            "resuming with %s", ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        )
    return dataclasses.replace(config, **overrides)


def _search_in(folder: RunFolder, setup: Setup, started: float, progress: bool) -> dict[str, Any]:
    """The run inside its (locked) folder; failures and Ctrl-C name the folder to resume."""
    try:
        return _stages_and_report(folder, setup, started, progress)
    except RunFailure as exc:
        exc.run_dir = str(folder.path)
        raise
    except KeyboardInterrupt:
        raise Interrupted(str(folder.path)) from None


def _stages_and_report(folder: RunFolder, setup: Setup, started: float, progress: bool) -> dict[str, Any]:
    config = setup.config
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
    for k, budget in enumerate(budgets, start=1):
        last = k == len(budgets)
        model, result = run_stage(
            folder, setup, model, dense_model, dense_cost.params, k, budget, last, progress
        )
        stages.append(result.to_dict())

    # ---- the report: test accuracy (first and only use of the test split), cost, latency
    report = build_report(
        config, setup.device, setup.data, dense, dense_cost, model, setup.input_shape, stages, setup.warnings
    )
    if setup.latency_table is not None:
        report.latency_budget = config.latency_budget
        report.predicted_latency_ratio = predicted_latency_ratio(
            setup.latency_table, describe_layers(model, setup.input_shape), setup.layers
        )
    if config.latency:
        batches = sorted({*LATENCY_BATCHES, config.latency_batch if config.latency_budget else 1})
        report.latency_ms = latency(dense_model, model, setup.input_shape, setup.device, batches)
        load = busy_load()
        if load is not None and setup.device.type == "cpu":
            report.latency_unreliable = (
                f"the machine was busy (load average {load:.1f} on {available_cpus()} CPUs)"
            )
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
