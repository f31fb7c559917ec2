#!/usr/bin/env bash
# One prepared run on a lent GPU (an H200 here), within BUDGET seconds (one device command may run 10 minutes):
#   1. the JVP attention kernels against forward-mode AD through math attention on CUDA (gpu-marked tests;
#      if they fail, everything after runs with EMF_JVP_ATTENTION=math)
#   2. environment and a bf16 MeanFlow smoke step (falls back to fp32 if bf16 JVP fails)
#   3. micro-benchmark of attention inside the graph-free JVP, math vs fused (DiT-B/2 sizes, bf16)
#   4. the step benchmark on CUDA (DiT-S, DiT-B, unet-S; bf16), alone on the GPU so its timings are clean;
#      then, time permitting, the SANA adapter at the real 1.6B size (random weights, 512 px: 32x16x16 DC-AE
#      latents, EMF's trainable set, gradient checkpointing; needs diffusers there, carried in .whl if missing)
#      and DiT-B's MeanFlow steps again with EMF_JVP_ATTENTION=math (side by side)
#   5. time permitting, the encoder study at 64 px (unet-S), 4 runs at a time
# Steps 1, 3 and 4 write straight into $OUT as they go (a run cut short keeps them). Text features for the study come
# precomputed (.devdata/precomputed, written on a CPU machine where SmolLM2 and MiniLM are installed) so no
# text model is needed there. Everything else: $RESULTS, packed into $OUT/gpu_results.tgz.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-540}
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

timeout 120 python3 -m pytest -q -m gpu tests/test_jvp_attention.py > "$OUT/jvp_attention_tests.txt" 2>&1
RC=$?
if [ "$RC" -ne 0 ]; then  # a broken kernel must not cost the rest of the session its MeanFlow numbers
  export EMF_JVP_ATTENTION=math
fi
echo "JVP attention tests rc=$RC, EMF_JVP_ATTENTION=${EMF_JVP_ATTENTION:-auto} (after $(( $(date +%s) - START )) s)" \
  | tee "$RESULTS/smoke.txt"

PREC=bf16-mixed
timeout 90 python3 tools/gpu_smoke.py >> "$RESULTS/smoke.txt" 2>&1 || PREC=32-true
echo "study precision: $PREC (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"

timeout 120 python3 tools/bench_jvp_attention.py --device cuda --jsonl "$OUT/jvp_attention.jsonl" \
  > "$RESULTS/bench_jvp_attention.log" 2>&1
echo "JVP attention micro-benchmark rc=$? (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"

timeout $(( $(left) < 270 ? $(left) - 30 : 240 )) python3 tools/bench_step.py --device cuda --sizes S,B,unet-S \
  --repeats 10 --out "$OUT/bench_gpu.md" --json "$OUT/bench_gpu.json" > "$RESULTS/bench.log" 2>&1
echo "bench done (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"
if [ "$(left)" -gt 240 ]; then
  timeout 150 python3 tools/bench_step.py --device cuda --sizes sana-1.6b --variants mf25,mf75,mf_pred25 \
    --repeats 5 --no-sampling --no-loader --out "$OUT/bench_gpu_sana.md" --json "$OUT/bench_gpu_sana.json" \
    > "$RESULTS/bench_sana.log" 2>&1
  echo "SANA adapter bench rc=$? (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"
fi
if [ "$(left)" -gt 120 ]; then
  EMF_JVP_ATTENTION=math timeout $(( $(left) - 60 )) python3 tools/bench_step.py --device cuda --sizes B \
    --variants mf25,mf75 --repeats 10 --no-sampling --no-loader --out "$OUT/bench_gpu_math_attention.md" \
    > "$RESULTS/bench_math.log" 2>&1
  echo "math-attention bench done (after $(( $(date +%s) - START )) s)" | tee -a "$RESULTS/smoke.txt"
fi

export OMP_NUM_THREADS=2  # ~19 training processes share 16 cores: no OpenMP oversubscription
T=$(( $(left) - 50 ))
if [ "$T" -lt 240 ]; then  # under ~3 minutes of training the study measures nothing (docs/gpu_results.md)
  echo "study skipped: $T s left" | tee -a "$RESULTS/smoke.txt"
  tar czf "$OUT/gpu_results.tgz" --exclude='*.tar' --exclude='feature_cache' --exclude='*.ckpt' "$RESULTS"
  ls -la "$OUT"
  exit 0
fi
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
