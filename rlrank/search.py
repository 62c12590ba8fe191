"""Command line: ``python -m rlrank.search --model resnet18 --flops 0.5`` (also ``rlrank-search``).

Parses and validates the options, calls :func:`rlrank.pipeline.run`, prints the dense vs compressed
result. Bad input exits with code 2 and one line on stderr, without a traceback and without a run
folder that looks complete.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from rlrank.config import AGENTS, SearchConfig

EXIT_USAGE = 2
EXIT_FAILED = 1
PROG = "rlrank-search"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _fractions(text: str) -> list[float]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return [_fraction(v) for v in values]


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _epochs(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from rlrank.data import DATASETS
    from rlrank.decompose import DECOMPOSITIONS
    from rlrank.envs import REWARDS
    from rlrank.models import list_models

    d = SearchConfig()
    p = _Parser(
        prog=PROG,
        description=(
            "Compress a CNN to a FLOP budget with low-rank decomposition; a DDPG agent (or a baseline "
            "selector) chooses every layer's rank, rewarded by validation accuracy after a cheap fine-tune."
        ),
        epilog=(
            "examples:\n"
            "  rlrank-search --model resnet18 --flops 0.5                       # embedded digits data\n"
            "  rlrank-search --model resnet20 --flops 0.5 --dataset imagefolder \\\n"
            "      --data-dir ../shared/data/cifar10-jpeg.tar.gz --checkpoint ../shared/models/cifar-resnet/resnet20-jpeg.pt\n"
            "  rlrank-search --resume runs/resnet18-flops0.5-20261122-101500   # continue a killed search"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        choices=list_models(),
        default=d.model,
        metavar="NAME",
        help=f"architecture: {', '.join(list_models())} (default: %(default)s)",
    )
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default=d.dataset,
        help="digits (embedded, offline), cifar10 or imagefolder (default: %(default)s)",
    )
    g.add_argument(
        "--data-dir",
        help="data folder (cifar10: torchvision's files; imagefolder: DIR/train, DIR/test, or a .tar.gz of them)",
    )
    g.add_argument("--download", action="store_true", help="download CIFAR-10 if missing (needs internet)")
    g.add_argument(
        "--val-size",
        type=float,
        help="validation images held out of train: a fraction (<1) or a count (default: 0.2 for digits, 5000 otherwise)",
    )
    g.add_argument(
        "--split-seed",
        type=int,
        default=d.split_seed,
        help="seed of the train/val split, kept apart from --seed so that runs with several seeds "
        "share one held-out set (default: %(default)s)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="trained weights: a state dict or {'state_dict': ...}, 'module.' prefix allowed",
    )
    g.add_argument("--pretrained", action="store_true", help="start from published weights (needs internet)")

    g = p.add_argument_group("budget and decomposition")
    g.add_argument(
        "--flops",
        type=_fraction,
        default=d.flops,
        help="keep at most this fraction of the dense model's MACs (default: %(default)s)",
    )
    g.add_argument(
        "--decomposition",
        choices=DECOMPOSITIONS,
        default=d.decomposition,
        help="factorization of kxk convs; 1x1 convs and linear layers use SVD (default: %(default)s)",
    )
    g.add_argument(
        "--hooi-iters",
        type=_count,
        default=d.hooi_iters,
        help="HOOI sweeps refining each Tucker-2 truncation (default: %(default)s)",
    )
    g.add_argument(
        "--data-aware",
        action="store_true",
        help="fit each layer's output factor to its responses on training images, not to its weights alone",
    )
    g.add_argument(
        "--data-aware-batches",
        type=_positive,
        default=d.data_aware_batches,
        help="training batches observed for --data-aware (default: %(default)s)",
    )
    g.add_argument(
        "--no-fill-budget",
        dest="fill_budget",
        action="store_false",
        help="let episodes leave budget unused (AMC's single action wall); by default a lower wall "
        "makes every episode spend its whole budget",
    )
    g.add_argument(
        "--action-space",
        choices=("relative", "absolute"),
        default=d.action_space,
        help="relative: an action scales the ratio that would share the budget left evenly "
        "(0 = uniform); absolute: AMC's linear map onto [min-ratio, 1] (default: %(default)s)",
    )
    g.add_argument(
        "--action-center",
        choices=("uniform", "energy", "vbmf"),
        default=d.action_center,
        help="with --action-space relative: the strategy that action 0 plays, the uniform one or a "
        "rule's, rescaled to the budget left at each step (default: %(default)s)",
    )
    g.add_argument(
        "--min-ratio",
        type=_fraction,
        default=d.min_ratio,
        help="smallest rank ratio of a layer (default: %(default)s)",
    )

    g = p.add_argument_group("search")
    g.add_argument(
        "--agent",
        choices=AGENTS,
        default=d.agent,
        help="ddpg, random search, or a rule: uniform, energy, vbmf (default: %(default)s)",
    )
    g.add_argument(
        "--episodes",
        type=_count,
        default=d.episodes,
        help="episodes (reward evaluations) per stage (default: %(default)s)",
    )
    g.add_argument(
        "--warmup",
        type=_count,
        default=d.warmup,
        help="DDPG warm-up episodes of random actions (default: %(default)s)",
    )
    g.add_argument(
        "--spread",
        type=_fraction,
        default=d.spread,
        help="random actions (random search, DDPG warm-up) are uniform in [-S, S] (default: %(default)s)",
    )
    g.add_argument(
        "--no-start-at-center",
        dest="start_at_center",
        action="store_false",
        help="with relative actions, episode 0 of ddpg and random search plays the center strategy "
        "(action 0: uniform or --action-center's rule), so a search never ends below it; this turns that off",
    )
    g.add_argument(
        "--noise",
        type=float,
        default=d.noise,
        help="initial exploration noise, AMC's units (default: %(default)s)",
    )
    g.add_argument(
        "--noise-decay",
        type=_fraction,
        default=d.noise_decay,
        help="per-episode noise decay (default: %(default)s)",
    )
    g.add_argument(
        "--credit",
        choices=("copy", "bootstrap"),
        default=d.credit,
        help="copy the final reward to every step (AMC) or bootstrap (default: %(default)s)",
    )
    g.add_argument(
        "--reward",
        choices=REWARDS,
        default=d.reward,
        help="acc, or AMC's -error*log(FLOPs) (default: %(default)s)",
    )

    g = p.add_argument_group("reward: the cheap fine-tune of every episode")
    g.add_argument(
        "--finetune-steps",
        type=_count,
        default=d.finetune_steps,
        help="SGD steps after BN re-estimation (default: %(default)s)",
    )
    g.add_argument(
        "--finetune-lr", type=_positive_float, default=d.finetune_lr, help="(default: %(default)s)"
    )
    g.add_argument(
        "--finetune-batch-size", type=_positive, default=d.finetune_batch_size, help="(default: %(default)s)"
    )
    g.add_argument(
        "--bn-batches",
        type=_count,
        default=d.bn_batches,
        help="batches re-estimating BatchNorm statistics (default: %(default)s)",
    )
    g.add_argument(
        "--reward-val-images",
        type=_count,
        default=d.reward_val_images,
        help="validation images per reward, 0 = all (default: %(default)s)",
    )

    g = p.add_argument_group("training")
    g.add_argument(
        "--dense-epochs",
        type=_epochs,
        default=d.dense_epochs,
        help="epochs training the dense model when no --checkpoint (default: %(default)s)",
    )
    g.add_argument("--dense-lr", type=_positive_float, default=d.dense_lr, help="(default: %(default)s)")
    g.add_argument(
        "--final-epochs",
        type=_epochs,
        default=d.final_epochs,
        help="fine-tune epochs of the final compressed model (default: %(default)s)",
    )
    g.add_argument("--final-lr", type=_positive_float, default=d.final_lr, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=_positive, default=d.batch_size, help="(default: %(default)s)")
    g.add_argument(
        "--distill",
        type=float,
        default=d.distill,
        help="weight of distillation from the dense model in the stage and final fine-tunes, 0 = off; on by default since it measurably helps (experiments/RESULTS.md) (default: %(default)s)",
    )

    g = p.add_argument_group("multi-stage compression")
    g.add_argument(
        "--stages",
        type=_positive,
        default=d.stages,
        help="search -> decompose -> fine-tune stages (default: %(default)s)",
    )
    g.add_argument(
        "--stage-budgets",
        type=_fractions,
        help="each stage's budget, e.g. 0.8,0.65,0.5 (default: geometric, ending at --flops)",
    )
    g.add_argument(
        "--stage-epochs",
        type=_epochs,
        default=d.stage_epochs,
        help="fine-tune epochs after every stage but the last (default: %(default)s)",
    )

    g = p.add_argument_group("policy reuse")
    g.add_argument(
        "--train-budgets",
        type=_fractions,
        help="train one DDPG policy across these budgets, cycled per episode, e.g. 0.3,0.5,0.7",
    )
    g.add_argument(
        "--policy",
        metavar="DIR",
        help="a saved policy folder (runs/X/stage-1/policy): --episodes 0 rolls it out once, N continues training",
    )

    g = p.add_argument_group("run")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the agent, fine-tunes and dense training (default: %(default)s)",
    )
    g.add_argument("--out", default=d.out, help="folder for run folders (default: %(default)s)")
    g.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a killed search in run folder RUN (other options are taken from its config.json)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=d.checkpoint_every,
        help="episodes between resume checkpoints (default: %(default)s)",
    )
    g.add_argument("--no-latency", action="store_true", help="skip the latency measurement of the report")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    values = {k: v for k, v in vars(args).items() if k in SearchConfig.__dataclass_fields__}
    values["latency"] = not args.no_latency
    return SearchConfig(**values)


def _user_errors() -> tuple[type[BaseException], ...]:
    from rlrank.agents.ddpg import PolicyError
    from rlrank.agents.selectors import SelectorError
    from rlrank.data import DataError
    from rlrank.decompose import DecompositionError
    from rlrank.envs import BudgetError
    from rlrank.finetune import DeviceError
    from rlrank.models import ModelError
    from rlrank.pipeline import ConfigError
    from rlrank.run_folder import RunFolderError

    return (
        ModelError,
        DataError,
        DecompositionError,
        BudgetError,
        PolicyError,
        DeviceError,
        RunFolderError,
        ConfigError,
        SelectorError,
    )


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def summarize(report: dict) -> str:
    """The lines printed at the end of a search."""
    dense, comp = report["dense"], report["compressed"]
    lines = [
        f"dense      test accuracy {_percent(dense['test_accuracy'])}   MACs {dense['macs'] / 1e6:.2f} M   params {dense['params'] / 1e6:.3f} M",
        f"compressed test accuracy {_percent(comp['test_accuracy'])}   MACs {comp['macs'] / 1e6:.2f} M ({comp['flops_ratio']:.3f} of dense, budget {report['budget']:g})   params {comp['params'] / 1e6:.3f} M ({comp['params_ratio']:.3f})",
    ]
    if "latency_ms" in report:
        lat = report["latency_ms"]
        lines.append(
            f"latency on {report['device']}: batch 1 {lat['batch1']['dense']:.2f} -> {lat['batch1']['compressed']:.2f} ms, "
            f"batch 64 {lat['batch64']['dense']:.2f} -> {lat['batch64']['compressed']:.2f} ms"
        )
    if "run_dir" in report:
        lines.append(f"run folder: {report['run_dir']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported in one line
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    from rlrank.pipeline import SearchError, run

    try:
        with logging_redirect_tqdm():
            if args.resume:
                report = run(resume=args.resume, progress=not args.quiet)
            else:
                report = run(config_from_args(args), progress=not args.quiet)
    except _user_errors() as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except SearchError as exc:
        sys.stderr.write(f"{PROG}: search failed: {exc}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; continue with --resume RUN_FOLDER\n")
        return 130
    print(summarize(report))  # noqa: T201 - the command's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
