#!/usr/bin/env bash
# One lent-GPU session, run from the repository root: install, kernel tests on the card, the
# one-shot gpu_check (correctness, kernel timings, end-to-end explain vs plain), the benchmark suite
# on CUDA, a short CUDA training run, then the torch.compile baselines with whatever time is left.
# Every step has its own time limit and writes into $OUT, so a step that fails or runs out of time
# still leaves the others' results.
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/session.log"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, output to $OUT/NAME.log
  local name=$1 secs=$2; shift 2
  log "start $name (limit ${secs}s)"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  log "end $name rc=$?"
}

log "install"
# python -m pip: the pip on PATH may belong to another interpreter than the python that runs below.
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || log "install failed"
python -c "import vdm_engine.kernels, vdm_engine.export, vdm_engine.training" >> "$OUT/install.log" 2>&1 \
  || { log "editable install not importable: $(which python pip)"; python -m pip --version >> "$OUT/session.log"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, transformers, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| onnxruntime', ort.__version__, ort.get_available_providers())"
  date -u
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step check_eager 150 python benchmarks/gpu_check.py --no-compile --out "$OUT/check_eager"
step pytest_gpu 120 python -m pytest -q -rs -p no:cacheprovider tests/kernels tests/test_explainer.py tests/test_runtime.py
step train_cuda 60 vdm-train --model vit-digits --data digits --out "$OUT/train_cuda" --steps 200 \
  --eval-interval 100 --checkpoint-interval 100 --device cuda --precision bf16 --no-register --no-progress
rm -rf "$OUT/train_cuda/checkpoint"*  # keep metrics and gates, not the optimiser state
step bench_b16_bf16 150 python -m pytest benchmarks --benchmark-only -p no:cacheprovider --vdm-device cuda \
  --vdm-model vit-b16 --vdm-dtype bf16 --vdm-batch 64 --vdm-budget 1 --benchmark-json "$OUT/bench_b16_bf16.json"
python -m benchmarks.report "$OUT/bench_b16_bf16.json" --out "$OUT/bench_b16_bf16.md" >> "$OUT/session.log" 2>&1
step check_compile 90 python benchmarks/gpu_check.py --out "$OUT/check_compile"
log "done"
