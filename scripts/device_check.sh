#!/usr/bin/env bash
# The GPU checks of one device lease, in one call (see /work/.library/device, or any CUDA machine):
#   tests    the CUDA backend's tests against the CPU reference (pytest -m cuda)
#   bench    `dcnbench bench ops --device cuda` on the issue's shapes, full float32 and TF32
#   large    the same on batched shapes where the kernels, not the host, set the time
#   runtime  `dcnbench runtime --device cuda` (Table 4 at the paper's sizes, 45 rounds)
#   profile  scripts/profile_cuda.py, every section: DeepLab@V host vs GPU time and its Python host
#            time, host time per call of the res5 layer's parts, host split, largest kernels, the cost
#            of --fmad=false and of deterministic mode (estimated from separate runs of its sections at
#            ~110 s of its 120 s limit on an H100 host; never timed as a whole)
# Results land in $OUT (default /tmp/dcnbench-device): CSVs, gpu.txt and one log of every step
# (device_check.log). Each step has its own time limit, together 540 s, so that the whole
# check fits one 10-minute device call; a failing step does not stop the next. No install: the
# checkout runs from PYTHONPATH.
# Usage: DCNBENCH_GIT_COMMIT=<sha> scripts/device_check.sh [steps]   (default: all steps; name the
#        commit where the copy has no .git)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dcnbench-device}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONWARNINGS=ignore::DeprecationWarning
steps=${*:-tests runtime profile bench large}
start=$SECONDS
step() { echo "=== $1 ($((SECONDS - start)) s)" | tee -a "$LOG"; }
bench() {  # bench <out dir> <time limit> [options]
  local out=$1 limit=$2; shift 2
  for mode in "" --tf32; do
    timeout "$limit" python3 -m dcnbench.cli bench ops --device cuda --threads 1 --repeats 25 --out "$out" $mode "$@" \
      >>"$LOG" 2>&1 || echo "bench $out $mode failed or timed out" | tee -a "$LOG"
  done
}

step gpu
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__); print('device', torch.cuda.get_device_name())"
  python3 -c "import torchvision, cupy; print('torchvision', torchvision.__version__, 'cupy', cupy.__version__)"
} 2>&1 | tee "$OUT/gpu.txt" >>"$LOG"

if [[ $steps == *tests* ]]; then
  step tests
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda_kernels.py >>"$LOG" 2>&1
  tail -1 "$LOG"
fi
if [[ $steps == *runtime* ]]; then
  step runtime
  timeout 120 python3 -m dcnbench.cli runtime --device cuda --repeats 45 --results-dir "$OUT" >>"$LOG" 2>&1
fi
if [[ $steps == *profile* ]]; then
  step profile
  timeout 120 python3 scripts/profile_cuda.py 2>&1 | tee "$OUT/profile.txt" >>"$LOG"
fi
if [[ $steps == *bench* ]]; then
  step bench
  bench "$OUT" 35
fi
if [[ $steps == *large* ]]; then
  step large
  bench "$OUT/large" 40 --no-roi --shapes res5-b8=8,512,38,63,512,2 --shapes mid-b8=8,256,64,64,256,1 \
    --shapes small-b64=64,64,48,48,64,2
fi
step done
