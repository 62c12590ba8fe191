"""Export a saved model to ONNX or TorchScript, checked against PyTorch (also ``rlrank-export``).

``rlrank-export RUN --format onnx|torchscript`` loads ``RUN/model.pt`` (or a model file) with
:func:`rlrank.load`, folds BatchNorm into the convolutions (:mod:`rlrank.fusion`, unless
``--no-fuse``), exports with a dynamic batch dimension, checks the export's outputs against the
PyTorch model's on random inputs at two batch sizes (ONNX through ``onnxruntime``, TorchScript
through ``torch.jit.load``), and only then writes the file, atomically (``RUN/model.onnx`` or
``RUN/model.torchscript.pt`` by default). The file runs without rlrank: ONNX needs
``onnxruntime`` only, TorchScript ``torch`` only. It prints the largest output difference and the
median latency at batch 1 of the PyTorch model and of the export.

ONNX goes through ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter, which
needs ``onnx`` and no ``onnxscript`` (torch 2.14's default ``dynamo=True`` path needs
``onnxscript``); TorchScript through ``torch.jit.trace``.

``--channels-last`` (``memory_format="channels_last"``) lays TorchScript weights and inputs out
channels-last: measured faster at batch 64 on CPU, not at batch 1 (figures in :mod:`rlrank.fusion`),
so it is off by default; ONNX has no memory format (onnxruntime lays out tensors itself).

Bad input (a missing run, a file that is not an rlrank model, a missing ``onnxruntime``, an
unwritable ``--out``) exits with code 2 and one line on stderr, before anything is written; an
export that does not match PyTorch exits with code 1 and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlrank.atomic import atomic_write
from rlrank.errors import RunFailure, StorageError, UserError
from rlrank.options import EXIT_USAGE, OneLineParser, positive
from rlrank.threads import choose_openmp_wait

if TYPE_CHECKING:  # torch is imported on first use, so that main() can set OpenMP's wait policy first
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PROG = "rlrank-export"
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INSTALL_HINT = 'pip install "rlrank[export]"'
OPSET = 17
RTOL = 1e-4
"""The export matches when its largest output difference is at most ``RTOL * max(1, max |output|)``."""

EXIT_FAILED = 1


class ExportError(UserError):
    """A model, file, option or missing package that makes an export impossible (exit code 2)."""


class ExportMismatch(RunFailure):
    """The exported file computes other outputs than the PyTorch model (exit code 1); nothing written."""

    resumable = False


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        path: The file written.
        fmt: ``onnx`` or ``torchscript``.
        max_abs_diff: Largest absolute difference between the export's and the PyTorch model's
            outputs on random inputs (``None`` when not checked).
        torch_ms: Median latency of the PyTorch model at batch 1 (``None`` when not checked).
        export_ms: Median latency of the exported file at batch 1 (``None`` when not checked).
    """

    path: Path
    fmt: str
    max_abs_diff: float | None = None
    torch_ms: float | None = None
    export_ms: float | None = None


def require_packages(fmt: str, check: bool = True) -> None:
    """Raise :class:`ExportError` naming the install command unless ``fmt``'s packages import.

    ONNX needs ``onnx`` to export and ``onnxruntime`` to check; TorchScript needs torch only.
    """
    needed = ["onnx", *(["onnxruntime"] if check else [])] if fmt == "onnx" else []
    missing = [name for name in needed if not _importable(name)]
    if missing:
        raise ExportError(f"{fmt} export needs {' and '.join(missing)}: {INSTALL_HINT}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    input_shape: tuple[int, ...],
    *,
    fuse: bool = True,
    batch: int = 1,
    check: bool = True,
    memory_format: str = "contiguous",
    seed: int = 0,
) -> ExportResult:
    """Export ``model`` to ``path`` in ``fmt`` with a dynamic batch dimension, checked before writing.

    Args:
        model: The model (not changed); exported on the CPU, in eval mode.
        path: The file to write (atomically; its folder is created).
        fmt: ``onnx`` or ``torchscript``.
        input_shape: One input without the batch dimension, e.g. ``(3, 32, 32)``.
        fuse: Fold BatchNorm into the convolutions first (:func:`rlrank.fusion.fuse_for_inference`).
        batch: Batch size of the example input the export traces.
        check: Run the export on random inputs at two batch sizes and compare with ``model`` before
            writing; also measure both at batch 1.
        memory_format: ``contiguous`` or ``channels_last`` (TorchScript weights and inputs; ONNX
            ignores it).
        seed: Seed of the random inputs.

    Returns:
        The path written and, when checked, the largest difference and both latencies.

    Raises:
        ExportError: Unknown format or memory format, missing packages, or a model the exporter
            refuses.
        ExportMismatch: The export's outputs differ from ``model``'s; nothing was written.
        StorageError: The file could not be written.
    """
    import torch

    from rlrank.fusion import MEMORY_FORMATS, fuse_for_inference, torch_memory_format

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if memory_format not in MEMORY_FORMATS:
        raise ExportError(f"unknown memory format {memory_format!r}; expected {', '.join(MEMORY_FORMATS)}")
    require_packages(fmt, check)
    reference = copy.deepcopy(model).cpu().eval()
    runner = fuse_for_inference(reference) if fuse else copy.deepcopy(reference)
    layout = torch_memory_format(memory_format) if fmt == "torchscript" else torch.contiguous_format
    runner = runner.to(memory_format=layout)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn((batch, *input_shape), generator=gen).contiguous(memory_format=layout)
    data = _serialize(runner, example, fmt)
    result = ExportResult(Path(path), fmt)
    if check:
        run = _runner_of(data, fmt)
        result.max_abs_diff = _compare(reference, run, input_shape, (batch, batch + 2), gen, layout)
        result.torch_ms = measure_latency(reference, input_shape)
        result.export_ms = measure_latency(run, input_shape, memory_format=memory_format)
    atomic_write(path, lambda handle: handle.write(data))
    log.info("wrote %s (%s, %d bytes)", path, fmt, len(data))
    return result


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A callable running an exported file on a batch (a list of output tensors), without rlrank's
    model classes: ``onnxruntime`` for ONNX, ``torch.jit.load`` for TorchScript."""
    require_packages(fmt)
    return _runner_of(Path(path).read_bytes(), fmt)


def measure_latency(
    model: Callable[[torch.Tensor], object],
    input_shape: tuple[int, ...],
    batch: int = 1,
    memory_format: str = "contiguous",
    warmup: int = 5,
    repeats: int = 50,
) -> float:
    """Median wall time in milliseconds of one CPU forward pass of a ``batch`` batch.

    ``model`` is a module in eval mode or a callable from :func:`load_exported`; the input is laid
    out in ``memory_format`` (``channels_last``: measured faster at batch 64, see :mod:`rlrank.fusion`).
    """
    import torch

    from rlrank.fusion import torch_memory_format

    x = torch.randn((batch, *input_shape)).contiguous(memory_format=torch_memory_format(memory_format))
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ exporting


_QUIET = (
    # torch 2.9+ advises its dynamo exporter and marks the TorchScript paths deprecated; both still work
    (DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export"),
    (DeprecationWarning, r"The feature will be removed"),
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (UserWarning, r"Constant folding"),
)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's deprecation notes about the TorchScript paths and its tracer's warnings (the
    check at two batch sizes is what tells whether a trace generalizes)."""
    import torch

    with warnings.catch_warnings():
        for category, message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _serialize(model: nn.Module, example: torch.Tensor, fmt: str) -> bytes:
    """The exported file's bytes (ONNX with a dynamic batch axis, or a traced TorchScript module)."""
    import torch

    buffer = io.BytesIO()
    with _quiet_torch(), torch.no_grad():
        try:
            if fmt == "onnx":
                names = _output_names(model, example)
                axes = {name: {0: "batch"} for name in ["input", *names]}
                legacy = (
                    {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
                )
                torch.onnx.export(
                    model,
                    (example,),
                    buffer,
                    input_names=["input"],
                    output_names=names,
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    **legacy,
                )
            else:
                torch.jit.save(torch.jit.trace(model, example), buffer)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ExportError(
                f"cannot export {type(model).__name__} to {fmt}: {type(exc).__name__}: {message}"
            ) from exc
    return buffer.getvalue()


def _output_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    outputs = _as_list(model(example))
    return ["output"] if len(outputs) == 1 else [f"output{i}" for i in range(len(outputs))]


def _as_list(outputs: object) -> list[torch.Tensor]:
    """A model's output(s) as a flat list of tensors."""
    import torch

    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return list(outputs)
    raise ExportError(f"only a model returning tensors exports, not {type(outputs).__name__}")


def _runner_of(data: bytes, fmt: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A callable running the exported bytes on a batch: ``onnxruntime`` or ``torch.jit.load``."""
    import torch

    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {name: x.contiguous().numpy()})]

        return run_onnx
    with _quiet_torch():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()

    def run_script(x: torch.Tensor) -> list[torch.Tensor]:
        return _as_list(module(x))

    return run_script


def _compare(
    reference: nn.Module,
    run: Callable[[torch.Tensor], list[torch.Tensor]],
    input_shape: tuple[int, ...],
    batches: Sequence[int],
    gen: torch.Generator,
    layout: torch.memory_format,
) -> float:
    """Largest absolute output difference over random inputs at ``batches``; raises
    :class:`ExportMismatch` past the tolerance."""
    import torch

    worst = 0.0
    for batch in batches:
        x = torch.randn((batch, *input_shape), generator=gen)
        with torch.inference_mode():
            expected = _as_list(reference(x))
            try:
                got = run(x.contiguous(memory_format=layout))
            except Exception as exc:  # e.g. a batch axis the export fixed
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ExportMismatch(
                    f"the export does not run at batch {batch}: {type(exc).__name__}: {first}"
                ) from exc
        if [tuple(e.shape) for e in expected] != [tuple(g.shape) for g in got]:
            raise ExportMismatch(
                f"the export's outputs at batch {batch} have shapes {[tuple(g.shape) for g in got]}, "
                f"PyTorch's {[tuple(e.shape) for e in expected]}"
            )
        for e, g in zip(expected, got, strict=True):
            diff = float((e.float() - g.float()).abs().max()) if e.numel() else 0.0
            scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
            if not diff <= RTOL * scale:  # also catches NaN
                raise ExportMismatch(
                    f"the export differs from PyTorch by {diff:.3g} at batch {batch} (tolerance "
                    f"{RTOL * scale:.3g}); nothing written"
                )
            worst = max(worst, diff)
    return worst


# ------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    """The ``rlrank-export`` parser."""
    p = OneLineParser(
        prog=PROG,
        description=(
            "Export an rlrank model (a run folder's model.pt) to ONNX or TorchScript with a dynamic batch "
            "dimension, BatchNorm folded into the convolutions; the export is checked against PyTorch on "
            "random inputs before it is written, and runs without rlrank."
        ),
        epilog=(
            "examples:\n"
            "  rlrank-export runs/resnet20-tucker2-ddpg-flops0.5-20261122-101500 --format onnx   # -> RUN/model.onnx\n"
            "  rlrank-export RUN --format torchscript --channels-last     # -> RUN/model.torchscript.pt\n"
            "  rlrank-export RUN/stage-1/model.pt --format onnx --out stage1.onnx\n"
            "\n"
            f"ONNX needs onnx and onnxruntime: {INSTALL_HINT}. Exit codes: 0 written, 1 the export did\n"
            "not match PyTorch or could not be written, 2 bad input (nothing written)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder holding model.pt, or an rlrank model file")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="the export format")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="the file to write (default: model.onnx or model.torchscript.pt next to the model file)",
    )
    p.add_argument(
        "--batch", type=positive, default=1, metavar="B", help="batch size of the traced example (default: 1)"
    )
    p.add_argument("--no-fuse", action="store_true", help="keep BatchNorm layers as they are")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch and the timing")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="TorchScript: channels_last weights and inputs (measured faster on CPU); ONNX ignores it",
    )
    return p


def model_path(run: str | Path) -> Path:
    """The model file of ``run`` (a run folder or a model file).

    Raises:
        ExportError: Nothing there, or a folder without ``model.pt``.
    """
    run = Path(run)
    if run.is_dir():
        if not (run / "model.pt").is_file():
            raise ExportError(f"{run} holds no model.pt (is the run complete? a stage's is in stage-K/)")
        return run / "model.pt"
    if not run.is_file():
        raise ExportError(f"run folder or model file not found: {run}")
    return run


def default_out(model_file: Path, fmt: str) -> Path:
    """``model.onnx`` / ``model.torchscript.pt`` next to ``model_file`` (its stem for another name)."""
    return model_file.with_name(model_file.name.removesuffix(".pt") + SUFFIXES[fmt])


def _writable(path: Path) -> None:
    """Raise :class:`ExportError` unless ``path`` can be created (the nearest existing folder is writable)."""
    if path.is_dir():
        raise ExportError(f"--out {path} is a folder; give a file name")
    folder = path.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: {folder} is not a writable folder")


def _input_shape(model_file: Path) -> tuple[int, int, int]:
    from rlrank.model_file import load_metadata
    from rlrank.models import ModelSpec

    spec = ModelSpec.from_dict(load_metadata(model_file)["arch"])
    return (spec.in_channels, spec.input_size, spec.input_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    choose_openmp_wait()  # before torch is imported
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported in one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    import rlrank

    out: Path | str = args.out or "the export"
    try:
        require_packages(args.fmt, check=not args.no_check)
        source = model_path(args.run)
        out = Path(args.out) if args.out else default_out(source, args.fmt)
        _writable(out)
        model = rlrank.load(source)  # a file that is not an rlrank model: ModelError (a UserError)
        shape = _input_shape(source)
        memory_format = "channels_last" if args.channels_last else "contiguous"
        result = export_model(
            model,
            out,
            args.fmt,
            shape,
            fuse=not args.no_fuse,
            batch=args.batch,
            check=not args.no_check,
            memory_format=memory_format,
        )
    except UserError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except StorageError as exc:  # the message's advice is a search's ("resume the run")
        reason = getattr(exc.__cause__, "strerror", None) or str(exc.__cause__ or exc)
        sys.stderr.write(f"{PROG}: export failed: cannot write {out}: {reason}\n")
        return EXIT_FAILED
    except RunFailure as exc:
        sys.stderr.write(f"{PROG}: export failed: {exc}\n")
        return EXIT_FAILED
    print(f"wrote {result.path} ({args.fmt}, input (batch, {', '.join(map(str, shape))}))")  # noqa: T201
    if result.max_abs_diff is not None:
        print(f"max abs difference vs PyTorch: {result.max_abs_diff:.3g}")  # noqa: T201
        print(  # noqa: T201 - the command's result
            f"latency at batch 1: PyTorch (as loaded) {result.torch_ms:.2f} ms, "
            f"{args.fmt} ({'fused, ' if not args.no_fuse else ''}{memory_format}) {result.export_ms:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
