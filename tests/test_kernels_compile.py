"""Every CUDA kernel compiles with NVRTC for Ada (sm_89) and Hopper (sm_90), without a GPU; the
sm_90a-specific sources also for sm_90a, without spills."""
import os
import re

import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

from ggfuse.kernels.nvrtc import KERNELS_DIR, all_sources, compile_cubin, cuda_include_dirs, ptxas_report, source_arch  # noqa: E402

SOURCES = all_sources()


def test_there_are_kernels_and_headers():
    names = {os.path.relpath(p, KERNELS_DIR) for p in SOURCES}
    assert {"dense/elementwise.cu", "dense/dequant.cu", "attention/flash_attn.cu", "attention/window_attn.cu"} <= names
    assert cuda_include_dirs(), "no CUDA headers found (install nvidia-cuda-runtime, the nvrtc extra)"


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("path", SOURCES, ids=[os.path.relpath(p, KERNELS_DIR) for p in SOURCES])
def test_compiles(path, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))  # really compile, never a cached cubin
    cubin = compile_cubin(path, arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


# The GLU kernels are also built with the GELU-tanh gate (Gemma 4: kernels/gemm/launch.py
# act_defines, GLU_ACT=1): the same kernel names in a module of their own
GLU_SOURCES = ("gemm/gemm.cu", "moe/grouped_gemm.cu", "dense/gemm_qf32.cu", "moe/grouped_f32.cu")


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("rel", GLU_SOURCES, ids=[f"{r}-gelu" for r in GLU_SOURCES])
def test_compiles_gelu_glu(rel, arch, tmp_path, monkeypatch):
    from ggfuse.kernels.gemm.launch import act_defines
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))
    cubin = compile_cubin(os.path.join(KERNELS_DIR, rel), arch, defines=act_defines("gelu"))
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000


# The decode experts' module for a shared expert of another type than the routed ones
# (kernels/moe/launch.py _gemv_kernel): gemv.cu built for one (routed, shared) pair
GEMV_PAIRS = [("q4_k", "q8_0"), ("q6_k", "q4_k"), ("q5_k", "bf16")]


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
@pytest.mark.parametrize("wr,ws", GEMV_PAIRS, ids=[f"gemv-{r}-{s}" for r, s in GEMV_PAIRS])
def test_compiles_gemv_type_pair(wr, ws, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))
    from ggfuse.kernels.moe.launch import gemv_pair_defines
    cubin = compile_cubin(os.path.join(KERNELS_DIR, "moe/gemv.cu"), arch, defines=gemv_pair_defines(wr, ws))
    assert cubin[:4] == b"\x7fELF" and f"moe_gemv_down_{wr}_{ws}".encode() in cubin
    assert f"moe_gemv_gate_up_bf16a_{wr}_{ws}".encode() in cubin


SM90A = [p for p in SOURCES if source_arch(p, "sm_90") == "sm_90a"]


def _spill_entries(log: str) -> list[tuple]:
    """(function, stack bytes, spill stores, spill loads) of each entry in a ptxas report."""
    return re.findall(r"Function properties for (\w+)\n[^\n]*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)


def test_sm90a_sources_are_marked():
    names = {os.path.relpath(p, KERNELS_DIR) for p in SM90A}
    assert {"gemm/gemm90.cu", "moe/grouped_gemm90.cu"} <= names


# the wgmma GEMM sources are also built with the element-wise dequantisation (launch.py
# GGFUSE_DEQUANT=generic), so check that variant too
SM90A_VARIANTS = [(p, None) for p in SM90A] + [(p, {"G90_GENERIC_DEQUANT": 1}) for p in SM90A
                                               if os.path.relpath(p, KERNELS_DIR) in ("gemm/gemm90.cu", "moe/grouped_gemm90.cu")] + \
    [(p, {"GLU_ACT": 1}) for p in SM90A if os.path.relpath(p, KERNELS_DIR) in ("gemm/gemm90.cu", "moe/grouped_gemm90.cu")]


@pytest.mark.parametrize("path,defines", SM90A_VARIANTS,
                         ids=[os.path.relpath(p, KERNELS_DIR) + ("-gelu" if d and "GLU_ACT" in d else "-generic" if d else "")
                              for p, d in SM90A_VARIANTS])
def test_compiles_sm90a_without_spills(path, defines):
    """Sources marked for sm_90a (wgmma, setmaxnreg) build for it with no stack and no spills,
    and ptxas honours setmaxnreg (it warns C7508 when it ignores it)."""
    log = ptxas_report(path, "sm_90a", defines)
    entries = _spill_entries(log)
    assert entries, log[:2000]
    bad = [e for e in entries if e[1:] != ("0", "0", "0")]
    assert not bad, f"stack / spills: {bad}"
    assert "C7508" not in log, log


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_deltanet_recurrent_kernels_exist_without_spills(arch, tmp_path, monkeypatch):
    """Every function gated_delta_rule_recurrent can ask for (the loop and the one-token step
    family, each dtype pair) is an entry point of recurrent.cu; the step kernels keep their
    state rows in registers (no stack, no spills)."""
    from ggfuse.kernels.deltanet.launch import RECURRENT_KERNELS, recurrent_kernel_name
    monkeypatch.setenv("GGFUSE_CACHE", str(tmp_path))
    path = os.path.join(KERNELS_DIR, "deltanet", "recurrent.cu")
    cubin = compile_cubin(path, arch)
    names = [recurrent_kernel_name(kern, a, o) for kern in RECURRENT_KERNELS for a in ("f32", "bf16")
             for o in ("f32", "bf16")]
    assert [n for n in names if n.encode() + b"\0" not in cubin] == []
    entries = {name: list(rest) for name, *rest in _spill_entries(ptxas_report(path, arch))}
    steps = [n for n in names if n.startswith("gdr_step_")]
    assert {n: entries.get(n) for n in steps} == {n: ["0", "0", "0"] for n in steps}


@pytest.mark.parametrize("arch", ["sm_89", "sm_90"])
def test_gemv1_kernels_exist_without_spills(arch):
    """The one-row GEMV kernels gemv() can launch (kernels/dense/launch.py GEMV1_TYPES, f32 and
    bf16 x) are entry points of dense/gemv.cu with no stack and no spills."""
    from ggfuse.kernels.dense.launch import GEMV1_TYPES
    entries = {name: list(rest)
               for name, *rest in _spill_entries(ptxas_report(os.path.join(KERNELS_DIR, "dense", "gemv.cu"), arch))}
    names = [f"gemv1_{a}a_{w}" for w in GEMV1_TYPES for a in ("f32", "bf16")]
    assert {n: entries.get(n) for n in names} == {n: ["0", "0", "0"] for n in names}
