"""The run's report: dense vs compressed accuracy and cost, the stages, latency, and its printed summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rlrank.config import SearchConfig
from rlrank.data import DataSplits
from rlrank.dense import DenseBaseline
from rlrank.finetune import evaluate
from rlrank.flops import ModelCost, count_model
from rlrank.modes import preserved_modes
from rlrank.records import ModelSummary, Report
from rlrank.timing import time_interleaved

LATENCY_BATCHES = (1, 64)


def build_report(
    config: SearchConfig,
    device: torch.device,
    data: DataSplits,
    dense: DenseBaseline,
    dense_cost: ModelCost,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    stages: Sequence[dict[str, Any]],
    warnings: Sequence[str],
) -> Report:
    """Measure the compressed ``model`` (the test split's first and only use) and assemble the report."""
    cost = count_model(model, input_shape)
    test_acc, _ = evaluate(model, data, data.test)
    val_acc, _ = evaluate(model, data, data.val)
    return Report(
        model=config.model,
        dataset=config.dataset,
        decomposition=config.decomposition,
        agent=config.agent,
        budget=config.flops,
        device=device_name(device),
        dense=ModelSummary(dense.val_accuracy, dense.test_accuracy, dense_cost.macs, dense_cost.params),
        compressed=ModelSummary(
            val_acc,
            test_acc,
            cost.macs,
            cost.params,
            flops_ratio=cost.macs / dense_cost.macs,
            params_ratio=cost.params / dense_cost.params,
        ),
        test_accuracy_delta=test_acc - dense.test_accuracy,
        stages=list(stages),
        reward_evaluations=sum(s["episodes"] for s in stages),
        search_seconds=sum(s["search_seconds"] for s in stages),
        warnings=list(warnings),
    )


def device_name(device: torch.device) -> str:
    """The device as the report names it (the CUDA card, or the CPU's thread count)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def latency(
    dense: nn.Module,
    compressed: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    batches: Sequence[int] = LATENCY_BATCHES,
    rounds: int = 20,
) -> dict[str, dict[str, float]]:
    """Forward latency (ms) of both models at each batch size (1 and 64) as they are and in their
    fastest inference forms (:func:`rlrank.inference.fastest_form`: BatchNorm folded, factors
    grouped, memory layout as measured fastest), timed in interleaved rounds (lower quartile,
    :func:`rlrank.timing.time_interleaved`), and the speed-ups."""
    from rlrank.inference import fastest_form

    out: dict[str, dict[str, float]] = {}
    with preserved_modes(dense), preserved_modes(compressed):
        dense.eval()
        compressed.eval()
        for batch in batches:
            x = torch.randn((batch, *input_shape), device=device)
            fast = [
                fastest_form(m, input_shape, batch, device, rounds=max(3, rounds // 2))
                for m in (dense, compressed)
            ]
            d, c, df, cf = time_interleaved([dense, compressed, *fast], x, rounds)
            out[f"batch{batch}"] = {
                "dense": d,
                "compressed": c,
                "speedup": d / c if c > 0 else float("nan"),
                "dense_fast": df,
                "compressed_fast": cf,
                "speedup_fast": df / cf if cf > 0 else float("nan"),
            }
    return out


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def summarize(report: dict[str, Any]) -> str:
    """The lines ``rlrank-search`` prints at the end of a search."""
    dense, comp = report["dense"], report["compressed"]
    lines = [
        f"dense      test accuracy {_percent(dense['test_accuracy'])}   MACs {dense['macs'] / 1e6:.2f} M   params {dense['params'] / 1e6:.3f} M",
        f"compressed test accuracy {_percent(comp['test_accuracy'])}   MACs {comp['macs'] / 1e6:.2f} M ({comp['flops_ratio']:.3f} of dense, budget {report['budget']:g})   params {comp['params'] / 1e6:.3f} M ({comp['params_ratio']:.3f})",
    ]
    if "latency_ms" in report:
        lat = report["latency_ms"]
        unreliable = report.get("latency_unreliable")
        measured = ", ".join(
            f"batch {key[len('batch') :]} {v['dense']:.2f} -> {v['compressed']:.2f} ms"
            + (f" ({v['dense_fast']:.2f} -> {v['compressed_fast']:.2f} fused)" if "dense_fast" in v else "")
            for key, v in sorted(lat.items(), key=lambda item: int(item[0][len("batch") :]))
        )
        lines.append(
            f"latency on {report['device']}: {measured}"
            + (f" (unreliable: {unreliable})" if unreliable else "")
        )
    if "predicted_latency_ratio" in report:
        lines.append(
            f"latency budget {report['latency_budget']:g} of dense: predicted "
            f"{report['predicted_latency_ratio']:.3f} (from the per-layer table)"
        )
    if "run_dir" in report:
        lines.append(f"run folder: {report['run_dir']}")
    return "\n".join(lines)
