#!/usr/bin/env bash
# One prepared run on a lent GPU (an H200 here), within ~9 minutes:
#   1. environment and a bf16 MeanFlow smoke step (falls back to fp32 if bf16 JVP fails)
#   2. the step benchmark on CUDA (DiT-S, DiT-B, unet-S; bf16), alone on the GPU so its timings are clean
#   3. the encoder study at 64 px (unet-S), MeanFlow and flow matching, the four offline encoders, 4 runs at a time
# Text features come precomputed (.devdata/precomputed, written on a CPU machine where SmolLM2 and MiniLM
# are installed) so no text model is needed there. Results: $RESULTS, packed into $OUT/gpu_results.tgz.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-500}
RESULTS=${RESULTS:-runs/gpu}
OUT=${OUT:-$RESULTS}
left() { echo $((BUDGET - ($(date +%s) - START))); }
mkdir -p "$RESULTS" "$OUT"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, lightning, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__)"
  nproc; } > "$RESULTS/env.txt" 2>&1

PREC=bf16-mixed
timeout 90 python3 tools/gpu_smoke.py > "$RESULTS/smoke.txt" 2>&1 || PREC=32-true
echo "study precision: $PREC (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"

timeout 240 python3 tools/bench_step.py --device cuda --sizes S,B,unet-S --repeats 10 --out "$RESULTS/bench_gpu.md" \
  --json "$RESULTS/bench_gpu.json" > "$RESULTS/bench.log" 2>&1
echo "bench done (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"

export OMP_NUM_THREADS=2  # ~19 training processes share 16 cores: no OpenMP oversubscription
T=$(( $(left) - 50 ))
MINUTES=$(( (T - 60) / 60 ))  # each run stops training in time to be evaluated
# At most 4 runs at a time: the 2026-11-30 session ran 19 at once and starved them all (docs/gpu_results.md).
COMMON=(--precomputed .devdata/precomputed --probe-json .devdata/probe.json --parallel 4 --max-minutes "$MINUTES")
study() {  # study <name> <args...>
  local name=$1; shift
  timeout "$T" python3 tools/encoder_study.py --out "$RESULTS/$name" "${COMMON[@]}" "$@" > "$RESULTS/$name.log" 2>&1
  python3 tools/encoder_study.py --out "$RESULTS/$name" "${COMMON[@]}" "$@" --report-only >> "$RESULTS/$name.log" 2>&1
}
study study64 --resolution 64 --backbone unet-S --max-steps 3000 --batch-size 64 --precision "$PREC" \
  --objectives meanflow,flow_matching &
wait
echo "studies done (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"
tar czf "$OUT/gpu_results.tgz" --exclude='*.tar' --exclude='feature_cache' --exclude='*.ckpt' "$RESULTS"
ls -la "$OUT"
