#!/usr/bin/env bash
# The GPU checks in one shot (every phase capped, about 9 minutes in all): the tests marked cuda, a trimmed
# `--scale gpu` selectors benchmark (budget 0.5, seed 0, alds / random / ddpg / surrogate: four runs
# at once on the one GPU, each capped), then the Ray workers benchmark with workers sharing the GPU.
# Results under $OUT: steps.log, pytest-cuda.log, RESULTS.md (the sections the benchmarks appended),
# the selectors CSV, logs.tgz and runs.tgz (run folders, model files left out, resume checkpoints kept).
# On a machine without a package index, build .devcarry/ first (experiments/gpu_checks_prepare.sh)
# and run `bash .devcarry/gpu.sh` there; SMOKE=1 runs the same plumbing on the CPU with digits.
set -u
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/gpu-out}; L=/tmp/gpu-logs; mkdir -p "$OUT" $L
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.log"; }
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; SEL_CAP=300; WRK_CAP=200
  SEL="--dataset digits --model tiny --episodes 4 --final-epochs 0.1"
  WRK="--dataset digits --model tiny --episodes 4 --configs inproc:1 2:1"
  METHODS="alds random"
else
  DEV=cuda; SEL_CAP=${SEL_CAP:-300}; WRK_CAP=${WRK_CAP:-140}  # a rerun resumes runs a cap killed
  SEL=""
  WRK="--configs inproc:4 4:2:0.25 8:1:0.125 --episodes 64"
  METHODS="alds random ddpg surrogate"
  source experiments/gpu_setup.sh  # carried packages, rlrank importable, ../shared
fi
python3 -c "import torch, gymnasium, stable_baselines3, tensorly, rlrank.envs; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); import ray; print('ray', ray.__version__)" 2>&1 | tee -a "$OUT/steps.log"
if [ "$DEV" = cuda ]; then  # decode CIFAR-10 once (cached) before four searches read it at once
  python3 -c "from rlrank.data import DataConfig, load_data; load_data(DataConfig('imagefolder', '../shared/data/cifar10-jpeg.tar.gz'))" >"$L/warm.log" 2>&1
fi
log "setup done"

R=bench-runs/selectors-gpu
for m in $METHODS; do
  OMP_NUM_THREADS=3 timeout $SEL_CAP python3 experiments/bench_selectors.py --scale gpu --device $DEV \
    --budgets 0.5 --methods $m --seeds 0 --no-ablations $SEL --out $R --tag $m --csv-dir /tmp/csv-$m \
    --no-append >"$L/sel-$m.log" 2>&1 &
done
log "selectors started: $METHODS"

if [ "$DEV" = cuda ]; then
  timeout 200 python3 -m pytest -m cuda -rA -q -p no:cacheprovider tests/test_search.py \
    tests/test_streaming.py tests/test_ray_workers.py >"$OUT/pytest-cuda.log" 2>&1
  log "cuda tests exit $?: $(tail -1 "$OUT/pytest-cuda.log")"
fi
wait
done_methods=""
for m in $METHODS; do
  ls $R/flops0.5-$m-seed0/*/report.json >/dev/null 2>&1 && done_methods="$done_methods $m"
done
log "selectors finished:$done_methods"
if [ -n "$done_methods" ]; then
  timeout 50 python3 experiments/bench_selectors.py --scale gpu --device $DEV --budgets 0.5 \
    --methods $done_methods --seeds 0 --no-ablations $SEL --out $R --tag trimmed --csv-dir "$OUT" \
    >"$L/sel-table.log" 2>&1
  log "selectors table exit $?"
fi

timeout $WRK_CAP python3 experiments/bench_workers.py --device $DEV $WRK --out bench-runs/workers-gpu \
  >"$L/workers.log" 2>&1
log "workers exit $?"

cp experiments/RESULTS.md "$OUT/RESULTS.md"
tar -czf "$OUT/logs.tgz" -C $L .
find bench-runs -type f \( -size -2M -o -path '*/checkpoint-*' \) -print0 | tar --null -czf "$OUT/runs.tgz" -T -
log "packed $(du -h "$OUT/runs.tgz" | cut -f1)"
