#!/usr/bin/env bash
# Build llama.cpp's llama-bench with CUDA, for the side-by-side anchor of `ggfuse bench
# --against-llama-bench` (issue 5). Two steps, because the device machine has no network:
#
#   here (any machine with the llama-cpp-python sdist extracted):
#     bash tools/build_llama_bench.sh pack /path/to/llama_cpp_python-0.3.36 .llama/llama-src.tar.xz
#   on the GPU machine (carry .llama/):
#     bash tools/build_llama_bench.sh build .llama/llama-src.tar.xz /tmp/llama [ARCH=90-real] [JOBS=16]
#
# `pack` keeps what llama-bench needs (ggml with only the CPU and CUDA backends, src, include,
# common, vendor, tools/llama-bench) and makes tools/ build llama-bench alone: ~2.3 MB.
# `build` configures a static build (-DBUILD_SHARED_LIBS=OFF) so the one binary
# /tmp/llama/bin/llama-bench can be copied around; cuBLAS is taken from the CUDA toolkit, else
# from the pip wheels (nvidia-cublas) that PyTorch installs.
set -euo pipefail
cmd="${1:?pack|build}"
case "$cmd" in
pack)
  sdist="${2:?sdist dir}"; out="${3:?out.tar.xz}"
  src="$sdist/vendor/llama.cpp"
  tmp="$(mktemp -d)"; mkdir -p "$tmp/llama.cpp"
  (cd "$src" && tar cf - CMakeLists.txt cmake ggml src common include vendor tools/llama-bench LICENSE licenses) \
    | tar xf - -C "$tmp/llama.cpp"
  for d in vulkan sycl metal opencl cann hexagon webgpu musa hip zdnn openvino et zendnn virtgpu; do
    rm -rf "$tmp/llama.cpp/ggml/src/ggml-$d"
  done
  echo 'add_subdirectory(llama-bench)' > "$tmp/llama.cpp/tools/CMakeLists.txt"
  mkdir -p "$(dirname "$out")"
  tar cJf "$out" -C "$tmp" llama.cpp
  rm -rf "$tmp"
  ls -la "$out"
  ;;
build)
  tarball="${2:?tarball}"; prefix="${3:-/tmp/llama}"; arch="${4:-90-real}"; jobs="${5:-16}"
  mkdir -p "$prefix"; tar xJf "$tarball" -C "$prefix"
  extra=()
  cuda_root="$(dirname "$(dirname "$(command -v nvcc)")")"
  if [ ! -f "$cuda_root/include/cublas_v2.h" ]; then
    # cuBLAS from the pip wheel (nvidia-cublas); CMake's FindCUDAToolkit looks beside the toolkit
    cub="$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__))' 2>/dev/null \
           || python3 -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia", "cu13"))')"
    echo "cuBLAS from $cub"
    lib="$(dirname "$(find "$cub" -name 'libcublas.so*' | head -1)")"
    inc="$(dirname "$(find "$cub" -name cublas_v2.h | head -1)")"
    for l in "$lib"/libcublas*.so.*; do b="${l%%.so.*}.so"; [ -e "$b" ] || ln -sf "$l" "$b" 2>/dev/null || true; done
    export CPATH="$inc${CPATH:+:$CPATH}" LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    extra+=("-DCUDA_cublas_LIBRARY=$lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$lib/libcublasLt.so"
            "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc")
  fi
  cmake -S "$prefix/llama.cpp" -B "$prefix/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF "${extra[@]}"
  cmake --build "$prefix/build" --target llama-bench -j "$jobs"
  mkdir -p "$prefix/bin"; cp "$prefix/build/bin/llama-bench" "$prefix/bin/"
  ls -la "$prefix/bin/llama-bench"
  ;;
build-shared)
  # A build on a machine with nvcc but no GPU driver (a CPU-only box), to copy to the GPU machine:
  # shared libraries, the CUDA backend for ARCH and every x86 CPU variant loaded at run time
  # (GGML_BACKEND_DL), linked against a stub libcuda.so.1 (the real driver is found at run time;
  # tools/device_llama_bench.sh unpacks it there and sets the library path and the driver).
  #   bash tools/build_llama_bench.sh build-shared .llama/llama-src.tar.xz /tmp/llama 90-real 2 /path/to/nvidia/cu13
  tarball="${2:?tarball}"; prefix="${3:-/tmp/llama}"; arch="${4:-90-real}"; jobs="${5:-2}"; cub="${6:?cuBLAS dir (nvidia/cu13 of the nvidia-cublas wheel)}"
  mkdir -p "$prefix/stub"; tar xJf "$tarball" -C "$prefix"
  echo 'void ggfuse_libcuda_stub(void) {}' > "$prefix/stub/s.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$prefix/stub/libcuda.so" "$prefix/stub/s.c"
  for l in "$cub"/lib/libcublas*.so.*; do b="${l%%.so.*}.so"; [ -e "$b" ] || ln -sf "$l" "$b"; done
  CPATH="$cub/include" cmake -S "$prefix/llama.cpp" -B "$prefix/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DCUDA_cublas_LIBRARY="$cub/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$cub/lib/libcublasLt.so" \
    -DCUDA_cuda_driver_LIBRARY="$prefix/stub/libcuda.so" \
    -DCMAKE_CUDA_FLAGS="-I$cub/include" -DCMAKE_CXX_FLAGS="-I$cub/include" \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined -DCMAKE_SHARED_LINKER_FLAGS="-L$cub/lib"
  CPATH="$cub/include" cmake --build "$prefix/build" -j "$jobs"
  # sapphirerapids' AMX code faults where the kernel does not grant AMX state (seen in a VM)
  (cd "$prefix/build" && rm -f bin/libggml-cpu-sapphirerapids.so && strip --strip-unneeded bin/*.so* || true)
  tar cJf "$prefix/llama-bench-bin.tar.xz" -C "$prefix/build" bin
  ls -la "$prefix/llama-bench-bin.tar.xz"
  ;;
build-server)
  # llama-server beside an existing `build-shared` build in PREFIX (same ggml, nothing of ggml is
  # recompiled): adds tools/server, tools/mtmd and the UI stub from the full sources, re-runs cmake
  # with the build-shared options plus LLAMA_BUILD_SERVER=ON (no web UI: LLAMA_BUILD_UI=OFF,
  # LLAMA_USE_PREBUILT_UI=OFF -> 0 embedded assets, GET / is a 404; the HTTP API works), builds only
  # llama-server and packs what PREFIX/llama-bench-bin.tar.xz lacks into OUT (paths bin/...), to be
  # unpacked over the directory where llama-bench-bin.tar.xz was unpacked.
  #   bash tools/build_llama_bench.sh build-server /tmp/llama 90-real 2 /path/to/nvidia/cu13 /path/to/llama_cpp_python-0.3.36 [OUT.tar.xz]
  prefix="${2:?prefix of build-shared}"; arch="${3:-90-real}"; jobs="${4:-2}"
  cub="${5:?cuBLAS dir (nvidia/cu13 of the nvidia-cublas wheel)}"; sdist="${6:?sdist dir}"
  out="${7:-$prefix/server-extra.tar.xz}"
  src="$sdist/vendor/llama.cpp"; b="$prefix/build"
  (cd "$src" && tar cf - --exclude=tools/server/tests --exclude=tools/server/bench \
      --exclude=tools/mtmd/tests --exclude='tools/mtmd/test-*' tools/server tools/mtmd \
      tools/ui/CMakeLists.txt tools/ui/ui.cpp.in tools/ui/ui.h.in tools/ui/sources.cmake \
      scripts/ui-assets.cmake) | tar xf - -C "$prefix/llama.cpp"
  printf '%s\n' 'add_subdirectory(llama-bench)' 'if (LLAMA_BUILD_SERVER)' '    add_subdirectory(mtmd)' \
    '    add_subdirectory(ui)' '    add_subdirectory(server)' 'endif()' > "$prefix/llama.cpp/tools/CMakeLists.txt"
  # the build-shared options, unchanged, plus the server ones (no ggml option differs)
  CPATH="$cub/include" cmake -S "$prefix/llama.cpp" -B "$b" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DCUDA_cublas_LIBRARY="$cub/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$cub/lib/libcublasLt.so" \
    -DCUDA_cuda_driver_LIBRARY="$prefix/stub/libcuda.so" \
    -DCMAKE_CUDA_FLAGS="-I$cub/include" -DCMAKE_CXX_FLAGS="-I$cub/include" \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined -DCMAKE_SHARED_LINKER_FLAGS="-L$cub/lib"
  # refuse to go on if anything outside the server's own sources would be compiled (a changed flag)
  if ninja -C "$b" -n llama-server | grep -E 'Building (CXX|C|CUDA) object' | grep -vE ' tools/(server|mtmd|ui)/'; then
    echo "build-server: the objects above (outside tools/server, mtmd, ui) would be rebuilt; stopping" >&2; exit 1
  fi
  # build-shared stripped bin/*.so* in place, which makes ninja relink every library (and the
  # missing sapphirerapids module) against the "newer" libggml-base; their contents are current,
  # so give them one common mtime and record it (ninja -t restat) instead of relinking
  t="$(date +%s)"; find "$b/bin" -type f -exec touch -d "@$t" {} +; ninja -C "$b" -t restat
  CPATH="$cub/include" cmake --build "$b" --target llama-server -j "$jobs"
  rm -f "$b/bin/libggml-cpu-sapphirerapids.so"   # relinked as a dependency of ggml; see build-shared
  strip --strip-unneeded "$b/bin/llama-server" "$b/bin/libllama-server-impl.so" "$b"/bin/libmtmd.so.*.*
  # pack whatever is new or differs from the llama-bench tarball
  old="$(mktemp -d)"; tar xJf "$prefix/llama-bench-bin.tar.xz" -C "$old"
  files=()
  for f in "$b"/bin/*; do
    n="bin/$(basename "$f")"
    if [ -L "$f" ]; then [ -L "$old/$n" ] && [ "$(readlink "$f")" = "$(readlink "$old/$n")" ] && continue
    else cmp -s "$f" "$old/$n" && continue; fi
    files+=("$n")
  done
  rm -rf "$old"
  printf 'packing %s\n' "${files[@]}"
  XZ_OPT=-9e tar cJf "$out" --owner=0 --group=0 -C "$b" "${files[@]}"
  ls -la "$out"
  LD_LIBRARY_PATH="$b/bin:$cub/lib:$prefix/stub" ldd "$b/bin/llama-server" | grep 'not found' || true
  ;;
*) echo "usage: $0 pack SDIST OUT.tar.xz | build TARBALL [PREFIX] [ARCH] [JOBS] | build-shared TARBALL PREFIX ARCH JOBS CUBLAS_DIR | build-server PREFIX ARCH JOBS CUBLAS_DIR SDIST [OUT.tar.xz]" >&2; exit 2 ;;
esac
