#!/usr/bin/env bash
# The precision="f32" GPU tests only (one device call), from the repo root, with the wheels in .whl:
#     bash tools/gpu_precision.sh
# Runs, through tools/gpu_suite.sh (which installs the wheels and sets the paths),
# tests/test_gpu_precision.py (the f32 kernels) and the f32 and default-precision model tests of
# tests/test_gpu_models.py (test_gpu_precision_f32_matches_cpu_and_llama,
# test_gpu_matches_cpu_and_llama), printing each case's error; then tests/precision_emulation.py
# (the CPU table, for the log). Logs land in $OUT.
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export OUT TEST_TIMEOUT="${TEST_TIMEOUT:-480}" PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -s -rA"
bash "$(dirname "$0")/gpu_suite.sh" "test_gpu_precision or precision_f32_matches or test_gpu_matches_cpu_and_llama" > /dev/null
grep -E "vs |passed|failed|FAIL|Error" "$OUT/pytest.log" | tail -80
PYTHONPATH=/tmp/pkg:/tmp/site timeout 120 python3 tests/precision_emulation.py 2>&1 | tee "$OUT/emulation.log" | tail -14
