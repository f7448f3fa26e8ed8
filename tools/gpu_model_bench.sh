#!/usr/bin/env bash
# One device call after tools/gpu_suite.sh (which installed the wheels into /tmp/site): the MoE
# layer per kernel family, then the synthetic Qwen3.5-35B-A3B Q4_K_M whole, each `ggfuse bench`
# row set in its own process with its own time limit, JSONs and logs in $OUT.
# Usage on the device machine, from the repo root:  bash tools/gpu_model_bench.sh [ROWS...]
#   ROWS: names from the table below (default: the first seven), e.g.  bash tools/gpu_model_bench.sh auto smallq
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "wheel install failed (is .whl/ carried?)"; exit 2; }
fi
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/ggfuse
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 GGFUSE_CACHE=/tmp/ggfuse-cubin
MODEL=/tmp/q35.gguf
[ -f "$MODEL" ] || python3 -m ggfuse.compiler.cli synth --preset qwen3.5-35b-a3b --quant q4_k_m -o "$MODEL" \
  > "$OUT/synth.log" 2>&1 || { echo "synth failed: $(tail -1 "$OUT/synth.log")"; exit 2; }
# without git history on the device, the bench JSONs take their commit from .build-commit:
# write it here (git rev-parse HEAD > .build-commit) and carry it with the wheels
[ -f .build-commit ] && echo "build commit $(cat .build-commit)" || echo "warning: no .build-commit: the JSONs name no commit"
PROMPTS=64,128,256,512,1024,2048
declare -A ROW=(
  [layer]="kernel"
  [auto]="--prompt $PROMPTS --chunk 2048 --sub-chunk-min 64 --tg 128"
  [smallq]="--prompt $PROMPTS --chunk 2048 --sub-chunk-min 64 --tg 0 --moe-schedule smallq"
  [small]="--prompt $PROMPTS --chunk 2048 --sub-chunk-min 64 --tg 0 --moe-schedule small"
  [ada]="--target sm_89 --prompt 512,2048 --chunk 2048 --sub-chunk-min 512 --tg 0"
  [ada_smallq]="--target sm_89 --prompt 512,2048 --chunk 2048 --sub-chunk-min 512 --tg 0 --moe-schedule smallq"
  [long]="--prompt 4096,8192 --chunk 8192 --tg 0"
  # a same-run A/B of the few-rows schedules at the short prompts, and of the decode step's dense GEMVs
  [short_small]="--prompt 64,128,256,512 --chunk 512 --sub-chunk-min 64 --tg 0 --moe-schedule small"
  [short_smallq]="--prompt 64,128,256,512 --chunk 512 --sub-chunk-min 64 --tg 0 --moe-schedule smallq"
  [tg_gemm]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-dense gemm"
  [tg_gemv]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-dense gemv"
  [tg_auto]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-dense auto"
  # programmatic dependent launch off (the default, auto, is on for sm_90a)
  [tg_nopdl]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --pdl off"
  [tg_nogroup]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-gemv-group false"
  [tg_norouter]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-router gemv"
  [tg_nofold]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --decode-deltanet-fold false"
  [tg_base]="--prompt 64 --chunk 512 --sub-chunk-min 64 --tg 128 --pdl off --decode-gemv-group false --decode-router gemv --decode-deltanet-fold false"
  [short_nopdl]="--prompt 64,128,256,512 --chunk 512 --sub-chunk-min 64 --tg 0 --pdl off"
  [short]="--prompt 64,128,256,512 --chunk 512 --sub-chunk-min 64 --tg 0"
)
[ -n "${LLAMA_BENCH:-}" ] && ROW[vs_llama]="--prompt 64,128,256,512 --chunk 512 --sub-chunk-min 64 --tg 128 --against-llama-bench $LLAMA_BENCH"
ORDER=(layer auto smallq small ada ada_smallq long)
[ $# -gt 0 ] && ORDER=("$@")
for r in "${ORDER[@]}"; do
  a="${ROW[$r]:-}"
  [ -z "$a" ] && { echo "unknown row $r"; continue; }
  echo "=== $r"
  if [ "$a" = kernel ]; then
    timeout "${LAYER_TIMEOUT:-150}" python3 -m ggfuse.kernels.moe.bench --impls wgmma_persist,mma,small,smallq \
      > "$OUT/moe_layer.log" 2>&1
    grep -E "N =|whole layer|Error" "$OUT/moe_layer.log" | cut -c1-100
    continue
  fi
  # shellcheck disable=SC2086
  timeout "${ROW_TIMEOUT:-150}" python3 -m ggfuse.compiler.cli bench "$MODEL" $a --repeat 3 \
    --json "$OUT/bench_$r.json" > "$OUT/bench_$r.log" 2>&1
  echo "exit $?"; grep -E "^ +[0-9]+ |tg[0-9]+|error" "$OUT/bench_$r.log" | head -12
done
