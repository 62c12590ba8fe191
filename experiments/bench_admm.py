"""Benchmark: does low-rank-aware training (ADMM) before decomposing close the accuracy gap?

ResNet-20 on ``../shared`` CIFAR-10, Tucker-2, the ALDS rule's strategy (the best measured one,
``experiments/RESULTS.md``) at each budget, at equal total training epochs: (a) decompose, then
fine-tune ``epochs``; (b) ADMM for ``admm-epochs``, decompose, fine-tune ``epochs - admm-epochs``;
(c) as (b) with ``--sparse F``: ADMM trains toward low rank plus ``F`` of each layer's cost in whole
dense filters, kept beside the factors (sparse + low-rank layers). All distil from the dense model.
Appends per budget and variant the decomposition error right after decomposing, the test accuracy,
its change against the dense model and the wall time to ``experiments/RESULTS.md``, and per-run rows
to ``experiments/results/admm-<scale>.csv``. Completed runs under ``--out`` are reused, so the
benchmark can be split (``--flops 0.5``, then ``--flops 0.3``).

Run from the repository root::

    python experiments/bench_admm.py --flops 0.5 0.3 --epochs 6 --admm-epochs 3
    python experiments/bench_admm.py --dataset digits --model tiny --flops 0.5 --epochs 1 \
        --admm-epochs 0.5 --out /tmp/bench-admm --no-append   # a smoke test on the embedded data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import recording

RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--flops", type=float, nargs="+", default=[0.5, 0.3], help="budgets (default: %(default)s)"
    )
    p.add_argument("--epochs", type=float, default=6.0, help="training epochs in all (default: %(default)s)")
    p.add_argument("--admm-epochs", type=float, default=3.0, help="of which ADMM (default: %(default)s)")
    p.add_argument(
        "--admm-rho", type=float, default=None, help="--admm-rho of the ADMM runs (default: rlrank's)"
    )
    p.add_argument(
        "--sparse",
        type=float,
        default=0.2,
        help="--sparse of a third variant, ADMM toward low rank + whole filters (0: no such variant; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=("plain", "admm", "sparse"),
        default=["plain", "admm", "sparse"],
        help="which runs per budget: decompose + fine-tune, ADMM first, ADMM toward rank + filters "
        "(with --sparse > 0) (default: all)",
    )
    p.add_argument("--rule", default="alds", help="the strategy's rule (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, help="per-run rows (default: results/admm-<scale>.csv)")
    recording.add_cifar_options(p, out="bench-runs/admm")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.admm_epochs < args.epochs:
        raise SystemExit("bench_admm: --admm-epochs must be between 0 and --epochs")
    session = recording.Session(argv)
    base = [*recording.cifar_run_args(args), "--agent", args.rule, "--distill", "0.5"]
    rho = ["--admm-rho", str(args.admm_rho)] if args.admm_rho is not None else []
    variants = {
        "decompose + fine-tune": ["--final-epochs", str(args.epochs)],
        "ADMM + decompose + fine-tune": [
            "--admm-epochs", str(args.admm_epochs), "--final-epochs", str(args.epochs - args.admm_epochs), *rho,
        ],
    }  # fmt: skip
    if args.sparse > 0:
        variants["ADMM + sparse + decompose + fine-tune"] = [
            *variants["ADMM + decompose + fine-tune"], "--sparse", str(args.sparse),
        ]  # fmt: skip
    names = {
        "decompose + fine-tune": "plain",
        "ADMM + decompose + fine-tune": "admm",
        "ADMM + sparse + decompose + fine-tune": f"admm-sparse{args.sparse:g}",
    }
    chosen = {"plain": "decompose + fine-tune", "admm": "ADMM + decompose + fine-tune"}
    chosen["sparse"] = "ADMM + sparse + decompose + fine-tune"
    variants = {k: v for k, v in variants.items() if k in {chosen[name] for name in args.variants}}
    if not variants:
        raise SystemExit("bench_admm: no variant left to run (--variants sparse needs --sparse > 0)")
    rows = []
    for budget in args.flops:
        for variant, extra in variants.items():
            name = f"{names[variant]}-{budget:g}"
            run = recording.run_search(name, [*base, "--flops", str(budget), *extra], args.out)
            stage = run.report["stages"][-1]
            rows.append({
                "budget": budget,
                "variant": variant,
                "device": run.report["device"],
                "decomposition error": stage.get("decomposition_error"),
                "error before ADMM": stage.get("decomposition_error_before_admm"),
                "test acc": run.report["compressed"]["test_accuracy"],
                "Δ test vs dense": run.report["test_accuracy_delta"],
                "FLOP ratio": run.report["compressed"]["flops_ratio"],
                "param ratio": run.report["compressed"]["params_ratio"],
                "epochs": args.epochs,
                "run wall s": run.wall_s,
            })  # fmt: skip
    table = pd.DataFrame(rows)
    csv = args.csv or RESULTS_DIR / f"admm-{'digits' if args.dataset == 'digits' else 'cpu'}.csv"
    recording.write_csv(table, csv, not args.no_append)
    dense = run.report["dense"]["test_accuracy"]
    lines = [
        *session.header(
            f"ADMM before decomposing ({args.model}, {recording.DATASETS[args.dataset]})",
            args.device,
            run.report["device"],
        ),
        f"- strategy: the {args.rule} rule's at each budget, Tucker-2; {args.epochs:g} training epochs in "
        f"all per run (ADMM runs: {args.admm_epochs:g} of ADMM, the rest fine-tune), one-cycle lr "
        f"{run.config['final_lr']}, distillation 0.5; ADMM rho {run.config['admm_rho']:g}, growth "
        f"{run.config['admm_rho_growth']:g} per epoch"
        + (f"; sparse variant: --sparse {args.sparse:g}" if args.sparse > 0 else "")
        + f"; dense test accuracy {dense:.4f}; decomposition error: "
        "mean over the decomposed layers of ||W - proj(W)|| / ||W|| when they were decomposed",
        "",
        recording.markdown(
            table.drop(columns=["device", "epochs"]),
            {"Δ test vs dense": "+.4f", "FLOP ratio": ".3f", "run wall s": ".0f"},
        ),
    ]
    recording.publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
