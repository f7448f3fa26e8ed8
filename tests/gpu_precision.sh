#!/usr/bin/env bash
# The precision="f32" GPU tests only (one device call), from the repo root, with the wheels in .whl:
#     bash tests/gpu_precision.sh
# Runs tests/test_gpu_precision.py (the f32 kernels), the f32 and default-precision model tests
# of tests/test_gpu_models.py (test_gpu_precision_f32_matches_cpu_and_llama,
# test_gpu_matches_cpu_and_llama) and tests/precision_emulation.py (the CPU table, for the log).
# Logs land in $OUT.
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ggfuse
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 GGFUSE_CACHE=/tmp/ggfuse-cubin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-480}" python3 -m pytest -q -rA -s -p no:cacheprovider --tb=short \
  tests/test_gpu_precision.py \
  "tests/test_gpu_models.py::test_gpu_precision_f32_matches_cpu_and_llama" \
  "tests/test_gpu_models.py::test_gpu_matches_cpu_and_llama" 2>&1 | tee "$OUT/pytest.log" | grep -E "vs |passed|failed|FAIL|Error" | tail -80
timeout 120 python3 tests/precision_emulation.py 2>&1 | tee "$OUT/emulation.log" | tail -14
