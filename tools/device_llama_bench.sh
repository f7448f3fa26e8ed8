#!/usr/bin/env bash
# Unpack a llama-bench built elsewhere (a tarball of its bin/ folder: llama-bench and its shared
# libraries, CUDA for sm_90, every CPU variant) and print the command line that runs it on this
# machine, with the CUDA runtime and cuBLAS of the installed pip wheels on the library path.
#   eval "$(bash tools/device_llama_bench.sh .llama/llama-bench-sm90.tar.xz /tmp/llamab)"; $LLAMA_BENCH --help
set -eu
tarball="${1:?tarball}"; dest="${2:-/tmp/llamab}"
mkdir -p "$dest"; [ -x "$dest/bin/llama-bench" ] || tar xJf "$tarball" -C "$dest"
site="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
libs="$dest/bin"
for n in libcublas.so.13 libcudart.so.13; do
  f="$(find "$site/nvidia" -name "$n" 2>/dev/null | head -1)"
  [ -n "$f" ] && libs="$libs:$(dirname "$f")"
done
# a build linked against a stub driver library may not name libcuda.so.1: preload the driver's
drv="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')"
[ -z "$drv" ] && for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do [ -e "$d/libcuda.so.1" ] && drv="$d/libcuda.so.1" && break; done
echo "export LD_LIBRARY_PATH=$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} LLAMA_BENCH=$dest/bin/llama-bench${drv:+ LD_PRELOAD=$drv}"
