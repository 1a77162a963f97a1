#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (see /work/.library/device or any CUDA machine):
#   1. the CUDA backend's tests against the CPU reference (pytest -m cuda),
#   2. `dcnbench bench ops --device cuda` in full float32 and in TF32,
#   3. `dcnbench runtime --device cuda` (Table 4 at the paper's sizes).
# Everything lands in $OUT (default /tmp/dcnbench-device); each step has its own time limit and a
# failing step does not stop the next. No install: the checkout runs from PYTHONPATH.
# Usage: DCNBENCH_GIT_COMMIT=<sha> scripts/device_check.sh [steps]   (the copy there has no .git)
#        steps: any of "tests bench tf32 runtime" (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dcnbench-device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
steps=${*:-tests bench tf32 runtime}
start=$SECONDS
step() { echo "=== $1 ($((SECONDS - start)) s)"; }

step gpu
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, torchvision, cupy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cupy', cupy.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head; } 2>&1 | tee "$OUT/gpu.txt"

if [[ $steps == *tests* ]]; then
  step tests
  timeout 180 python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda_kernels.py 2>&1 | tee "$OUT/pytest_cuda.log"
fi
if [[ $steps == *bench* ]]; then
  step bench
  timeout 120 python3 -m dcnbench.cli bench ops --device cuda --threads 1 --repeats 25 --out "$OUT" 2>&1 | tee "$OUT/bench_fp32.log"
fi
if [[ $steps == *tf32* ]]; then
  step tf32
  timeout 90 python3 -m dcnbench.cli bench ops --device cuda --threads 1 --repeats 25 --tf32 --out "$OUT" 2>&1 | tee "$OUT/bench_tf32.log"
fi
if [[ $steps == *runtime* ]]; then
  step runtime
  timeout 150 python3 -m dcnbench.cli runtime --device cuda --repeats 10 --results-dir "$OUT" 2>&1 | tee "$OUT/runtime.log"
fi
step done
