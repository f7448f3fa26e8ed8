"""Every CUDA kernel compiles with NVRTC for Ada (sm_89) and Hopper (sm_90), without a GPU."""
import os

import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

from ggfuse.kernels.nvrtc import KERNELS_DIR, all_sources, compile_cubin, cuda_include_dirs  # noqa: E402

SOURCES = all_sources()


def test_there_are_kernels_and_headers():
    names = {os.path.relpath(p, KERNELS_DIR) for p in SOURCES}
    assert {"dense/elementwise.cu", "dense/dequant.cu", "attention/flash_attn.cu"} <= names
    assert cuda_include_dirs(), "no CUDA headers found (install nvidia-cuda-runtime, the nvrtc extra)"


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("path", SOURCES, ids=[os.path.relpath(p, KERNELS_DIR) for p in SOURCES])
def test_compiles(path, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))  # really compile, never a cached cubin
    cubin = compile_cubin(path, arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
