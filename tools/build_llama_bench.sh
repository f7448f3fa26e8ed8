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
*) echo "usage: $0 pack SDIST OUT.tar.xz | build TARBALL [PREFIX] [ARCH] [JOBS] | build-shared TARBALL PREFIX ARCH JOBS CUBLAS_DIR" >&2; exit 2 ;;
esac
