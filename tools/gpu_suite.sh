#!/usr/bin/env bash
# One device call: install the carried wheels, run every gpu-marked test, then the benchmarks.
# Usage on the device machine, from the repo root:  bash tools/gpu_suite.sh [pytest -k expr] [bench names]
# Logs land in $OUT (the device tool brings them back).
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ggfuse
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 GGFUSE_CACHE=/tmp/ggfuse-cubin
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, cuda.bindings, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
K="${1:-}"
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=40 --tb=short ${K:+-k "$K"} tests/ 2>&1 | tee "$OUT/pytest.log" | tail -40
shift || true
for b in "$@"; do
  echo "=== bench $b"
  timeout "${BENCH_TIMEOUT:-120}" python3 -m "ggfuse.kernels.$b.bench" 2>&1 | tee "$OUT/bench_$b.log" | tail -25
done
