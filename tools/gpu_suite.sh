#!/usr/bin/env bash
# One device call: install the carried wheels, run every gpu-marked test, then the benchmarks.
# Usage on the device machine, from the repo root:  bash tools/gpu_suite.sh [pytest -k expr] [bench names]
# Logs land in $OUT (the device tool brings them back).
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { echo "wheel install failed (is .whl/ carried?): $(tail -1 "$OUT/pip.log")"; exit 2; }
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ggfuse
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 GGFUSE_CACHE=/tmp/ggfuse-cubin
[ -f .build-commit ] || echo "warning: no .build-commit (git rev-parse HEAD > .build-commit, and carry it)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, cuda.bindings, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
K="${1:-}"
# -v: each test's name and outcome is printed as it ends, so the failing tests are known even when
# the time limit cuts pytest off before its summary; WORKERS > 1 needs pytest-xdist among the wheels
W="${WORKERS:-1}"
# the device-memory measurement needs the GPU to itself: with several workers it runs alone after
MEM=tests/test_gpu_streaming.py::test_measured_memory_under_budget_on_a_shortened_35b
timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -v -m gpu -p no:cacheprovider --maxfail=80 --tb=short -rfE \
    $(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${PER_TEST_TIMEOUT:-200}") \
    ${K:+-k "$K"} $([ "$W" -gt 1 ] && echo "-n $W --deselect $MEM") tests/ > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"
[ "$W" -gt 1 ] && [ -z "$K" ] && timeout 120 python3 -m pytest -v -m gpu -p no:cacheprovider "$MEM" >> "$OUT/pytest.log" 2>&1
grep -E "(FAILED|ERROR) tests/|tests/.*(FAILED|ERROR)" "$OUT/pytest.log" | sort -u > "$OUT/failed.txt" || true
grep -cE " PASSED| FAILED| SKIPPED| ERROR" "$OUT/pytest.log" | sed 's/^/outcomes seen: /'
tail -5 "$OUT/failed.txt"; tail -3 "$OUT/pytest.log"
shift || true
for b in "$@"; do
  echo "=== bench $b"
  timeout "${BENCH_TIMEOUT:-120}" python3 -m "ggfuse.kernels.$b.bench" 2>&1 | tee "$OUT/bench_$b.log" | tail -25
done
