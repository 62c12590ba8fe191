#!/usr/bin/env bash
# Issue 19's methods benchmark on a GPU: MODEL (default resnet56) on CIFAR-10 at --flops 0.5, tucker2 /
# prune / mixed as three searches at once on the one GPU (DDPG, EPISODES (100) episodes, a quarter of
# them warm-up, BN-only reward), each then
# fine-tuned for FINAL_EPOCHS (default 10) epochs; every search capped at CAP seconds (a rerun resumes
# what a cap killed, through recording.run_search). Then one table of the three (latencies timed while
# the other searches shared the GPU). Results under $OUT: steps.log, RESULTS.md (the appended
# section), logs.tgz, runs.tgz (run folders, model files left out, resume checkpoints kept).
# Run from the repository root on the device: `bash experiments/gpu_methods.sh`, carrying .devcarry/
# (experiments/gpu_checks_prepare.sh) and, to resume, bench-runs/methods-gpu.
set -u
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/gpu-out}; L=/tmp/gpu-logs; mkdir -p "$OUT" $L
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/steps.log"; }
source experiments/gpu_setup.sh
python3 -c "import torch, sklearn, rlrank.envs; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'sklearn', sklearn.__version__)" 2>&1 | tee -a "$OUT/steps.log"
python3 -c "from rlrank.data import DataConfig, load_data; load_data(DataConfig('imagefolder', '../shared/data/cifar10-jpeg.tar.gz'))" >"$L/warm.log" 2>&1
log "setup done"

CAP=${CAP:-400}; MODEL=${MODEL:-resnet56}; EPISODES=${EPISODES:-100}; R=bench-runs/methods-gpu-$MODEL
ARGS="--device cuda --model $MODEL --episodes $EPISODES --warmup $((EPISODES / 4)) --finetune-steps 0"
ARGS="$ARGS --final-epochs ${FINAL_EPOCHS:-10} --out $R"
for m in tucker2 prune mixed; do
  OMP_NUM_THREADS=4 timeout $CAP python3 experiments/bench_methods.py $ARGS --methods $m --no-append \
    >"$L/methods-$m.log" 2>&1 &
done
wait
log "searches done: $(ls $R/*/*/report.json 2>/dev/null | wc -l) of 3 complete"
timeout 60 python3 experiments/bench_methods.py $ARGS --methods tucker2 prune mixed >"$L/methods-table.log" 2>&1
log "table exit $?"
cp experiments/RESULTS.md "$OUT/RESULTS.md"
tar -czf "$OUT/logs.tgz" -C $L .
find bench-runs -type f \( -size -2M -o -path '*/checkpoint-*' \) -print0 | tar --null -czf "$OUT/runs.tgz" -T -
log "packed $(du -h "$OUT/runs.tgz" | cut -f1)"
