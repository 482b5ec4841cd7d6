#!/usr/bin/env bash
# One lent-GPU session, run from the repository root (about 4-5 minutes): install, the one-shot
# gpu_check (correctness, kernel timings, tile sweep, end-to-end explain vs plain), the kernel tests
# on the card, a profile of explain() vs plain inference, then gpu_check with the torch.compile
# baselines. Optional, off by default to stay
# inside ~5 minutes: TRAIN=1 adds a short CUDA training run, BENCH=1 the benchmark suite on CUDA.
# LATENCY=1 (on by default) measures the latency group (batch 1/8/64; eager with the Triton kernels
# and compiled with CUDA graphs, plain and explain side by side, p50/p90/p99 and peak memory) on
# the ViT-B/16 shape in bf16, and the peak memory of explain vs plain at batch 64.
# Every step has its own time limit, so a step that fails or runs out of time leaves the others.
#
# The device returns only a few files from $OUT, so this writes few: session.log (every step's
# output, in order), gpu_check.md/.json (eager run), gpu_check_compile.md, latency_b16_bf16.md/.json
# and memory_b16_b64.json, and with BENCH=1 bench_b16_bf16.md/.json. Scratch output goes to a temporary directory.
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
LOG="$OUT/session.log"
log() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, output appended to session.log
  local name=$1 secs=$2 rc; shift 2
  log "start $name (limit ${secs}s)"
  timeout "$secs" "$@" >> "$LOG" 2>&1
  rc=$?
  log "end $name rc=$rc"
}

log "install"
# python -m pip: the pip on PATH may belong to another interpreter than the python that runs below.
python -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || log "install failed"
python -c "import vdm_engine.kernels, vdm_engine.export, vdm_engine.training" >> "$LOG" 2>&1 \
  || { log "editable install not importable: $(which python pip)"; python -m pip --version >> "$LOG"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, numpy, transformers, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| numpy', numpy.__version__, '| transformers', transformers.__version__, '| onnxruntime', ort.__version__, ort.get_available_providers())"
} >> "$LOG" 2>&1

step check_eager 150 python benchmarks/gpu_check.py --no-compile --out "$OUT"
step pytest_gpu 100 python -m pytest -q -rs -p no:cacheprovider tests/kernels tests/test_explainer.py tests/test_runtime.py
step profile 60 python benchmarks/profile_explain.py --batch 256 --dtype bf16
step check_compile 100 python benchmarks/gpu_check.py --no-sweep --out "$SCRATCH/compile"
cp "$SCRATCH/compile/gpu_check.md" "$OUT/gpu_check_compile.md" 2>> "$LOG" || log "no gpu_check_compile.md"
if [ "${LATENCY:-1}" = 1 ]; then
  step latency_b16_bf16 240 python -m pytest benchmarks/test_bench_latency.py --benchmark-only -p no:cacheprovider \
    --vdm-device cuda --vdm-model vit-b16 --vdm-dtype bf16 --vdm-budget 1 --benchmark-json "$OUT/latency_b16_bf16.json"
  python -m benchmarks.report "$OUT/latency_b16_bf16.json" --out "$OUT/latency_b16_bf16.md" >> "$LOG" 2>&1
  step memory_b16_b64 60 sh -c "python -m benchmarks.memory --device cuda --dtype bf16 --shape vit-b16 --batch 64 > '$OUT/memory_b16_b64.json'"
fi
if [ "${TRAIN:-0}" = 1 ]; then
  step train_cuda 60 vdm-train --model vit-digits --data digits --out "$SCRATCH/train_cuda" --steps 200 \
    --eval-interval 100 --checkpoint-interval 100 --device cuda --precision bf16 --no-register --no-progress
fi
if [ "${BENCH:-0}" = 1 ]; then
  step bench_b16_bf16 150 python -m pytest benchmarks --benchmark-only -p no:cacheprovider --vdm-device cuda \
    --vdm-model vit-b16 --vdm-dtype bf16 --vdm-batch 64 --vdm-budget 1 --benchmark-json "$OUT/bench_b16_bf16.json"
  python -m benchmarks.report "$OUT/bench_b16_bf16.json" --out "$OUT/bench_b16_bf16.md" >> "$LOG" 2>&1
fi
rm -rf "$SCRATCH"
log "done"
