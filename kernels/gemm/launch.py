"""Launchers for the tensor-core GEMMs: kernels/gemm/gemm.cu (mma.sync, design in gemm_core.cuh)
and, on compute capability 9.0, kernels/gemm/gemm90.cu (wgmma, design in gemm90_core.cuh).

    gemm(a, "bf16", K, w, "q4_k", N, K, c, "f32", N, M, stream)            # C = A @ W^T
    gemm_swiglu(a, "bf16", K, wg, wu, "q4_k", F, K, h, "bf16", F, M, stream)  # silu(A Wg^T) * (A Wu^T)

Arrays are CuPy arrays; bf16 data lives in 2-byte containers (uint16 bit patterns: CuPy has no
bfloat16). Weights are the raw GGUF bytes of an [N, K] matrix (any dtype, contiguous), or bf16
for type "bf16" (dense weights the runtime pre-dequantised). Nothing is allocated and nothing
waits on the host, so every launcher is capturable; call `prepare` for each variant before
capturing (module load and function attributes are not stream work).

Which kernel: the caller says (`impl=`; the plan's lowering, passes/lower_cuda.py, decides it
per node): "wgmma" (the sm_90a kernel; needs a cc 9.0 build target, a weight type in SM90_TYPES
and K % 64 == 0), "mma" (mma.sync, every target), or None (wgmma where it can run, else mma).
`persist` (sm_90a dense GEMMs: persistent blocks or a block per tile) and `dequant` ("fast"
word-wise or "generic" element-wise dequantisation in the wgmma producers) are arguments too.
The kernels are built for kernels/target.py's current target (the device's when none is set).
"""
from __future__ import annotations

import threading

import numpy as np

from ggfuse.kernels import target as _target
from ggfuse.kernels.nvrtc import build_arch, load_module
from ggfuse.kernels.quant.types import act_kind as _act_kind, qtype

SOURCE = "gemm/gemm.cu"
SOURCE90 = "gemm/gemm90.cu"
SM90_TYPES = ("bf16", "q8_0", "q4_k", "q6_k")
IMPLS = ("mma", "wgmma")
THREADS = 256
BM = BN = 128          # block tile (gemm_core.cuh)
BK = 32                # compute step along K
TILE_BYTES = 128 * BK * 2
ROW_TABLES = 128 * 8 + 128 * 8 + 128 * 4
WEIGHT_TYPES = ("bf16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k")

_lock = threading.Lock()
_functions: dict = {}


def act_kind(dtype, what: str = "a") -> str:
    """'f32' or 'bf16' from a DType / name / numpy dtype (2-byte non-f16 dtypes hold bf16 bits)."""
    return _act_kind(dtype, "gemm", what)


def weight_name(w_type) -> str:
    name = qtype(w_type).name
    if name not in WEIGHT_TYPES:
        raise ValueError(f"gemm: weight type {name} is not supported on the tensor-core path "
                         f"(supported: {', '.join(WEIGHT_TYPES)})")
    return name


def stages(cc: int) -> int:
    """Pipeline depth: 4 on sm_90, 3 below (sm_89 has 99 KB of shared memory per block)."""
    return 4 if cc >= 90 else 3


def smem_bytes(w_type, cc: int) -> int:
    """Dynamic shared memory of one block; mirrors gemm::smem_bytes<W>() (the kernel traps if
    it was given less)."""
    t = qtype(w_type)
    S = stages(cc)
    if t.name == "bf16":
        b = S * TILE_BYTES
    else:
        r = t.block // BK
        nr = S if r == 1 else 2
        by = t.block_bytes
        align = 16 if by % 16 == 0 else 8 if by % 8 == 0 else 4 if by % 4 == 0 else 2
        slot = (by + (16 - align) + 15) // 16 * 16
        b = nr * 128 * slot + 2 * TILE_BYTES
    return S * TILE_BYTES + b + ROW_TABLES


def cfg90(w_type, a_kind: str, wide: bool = False) -> tuple[int, int, int]:
    """(BN, threads, dynamic shared memory) of the sm_90a kernels; mirrors g90::Cfg<W, A_F32, WIDE>
    (gemm90_core.cuh; the kernel traps if it was given less shared memory). wide: the MoE
    kernels' 256-row tiles (GGML weights, bf16 activations)."""
    t = qtype(w_type)
    raw, a_f32 = t.name != "bf16", a_kind == "f32"
    if wide and (not raw or a_f32):
        raise ValueError(f"wide tiles need GGML weights and bf16 activations, got {t.name} / {a_kind}")
    S, BM_, BK_ = (3, 256, 64) if wide else (4, 128, 64)
    bn = 128 if (raw or a_f32) else 256
    threads = (128 if bn == 256 else 256) + 256
    qk, qbytes = (t.block, t.block_bytes) if raw else (BK_, 0)
    unit_elems = max(qk, BK_)
    unit_bytes = unit_elems // qk * qbytes
    r = unit_elems // BK_
    slot = 16 * (((unit_bytes + 30) // 16) | 1) if raw else 0
    nr = 0 if not raw else S if r == 1 else (S - 1 + 2 * r - 1) // r
    raw_bytes = nr * bn * slot + 16 if raw else 0
    # barriers full/empty[S], rfull/rempty[NR], tbl_full/tbl_empty[2]; double-buffered tables;
    # wide: the per-expert tile prefix (kMaxExperts + 1 ints)
    end = (S * BM_ * BK_ * 2 + S * bn * BK_ * 2 + raw_bytes + (2 * S + 2 * nr + 4) * 8
           + 2 * BM_ * 8 + 2 * bn * 8 + 2 * BM_ * 4 + 32 + ((MAX_EXPERTS90 + 1) * 4 + 12 if wide else 0))
    return bn, threads, end + 1024


MAX_EXPERTS90 = 512     # gemm90_core.cuh kMaxExperts (wide tiles)


_cc: dict = {}
_sms: dict = {}


def device_sms() -> int:
    """Multiprocessor count of the current device (the persistent kernels' grid)."""
    import cupy
    dev = cupy.cuda.Device().id
    if dev not in _sms:
        _sms[dev] = int(cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
    return _sms[dev]


def device_cc() -> int:
    import cupy
    dev = cupy.cuda.Device().id
    if dev not in _cc:
        _cc[dev] = int(cupy.cuda.Device().compute_capability)
    return _cc[dev]


def build_cc() -> int:
    """The compute capability the kernels are built for (the target's, else the device's)."""
    return _target.build_cc(device_cc())


def wgmma_ok(w_name: str, K: int, cc: int | None = None) -> bool:
    """Whether the wgmma kernel can run a weight type and K when building for cc (default: now)."""
    cc = build_cc() if cc is None else cc
    spec = _target.current()
    return cc == 90 and (spec is None or spec.wgmma) and w_name in SM90_TYPES and K % 64 == 0


def pick_impl(w_name: str, K: int, impl: str | None = None) -> str:
    """"wgmma" or "mma" for a weight type and K (see the module docstring)."""
    ok90 = wgmma_ok(w_name, K)
    if impl not in (None, "auto", *IMPLS):
        raise ValueError(f"gemm: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "wgmma" and not ok90:
        raise ValueError(f"gemm: the wgmma kernel needs an sm_90a build target, a weight type in {SM90_TYPES} "
                         f"and K % 64 == 0 (got cc {build_cc()}, {w_name}, K={K})")
    if impl == "mma":
        return "mma"
    return "wgmma" if ok90 else "mma"


def function(source: str, name: str, w_type, smem: int | None = None, defines: dict | None = None):
    """The kernel `name` of `source` (built with `defines`) with its dynamic shared memory limit
    set (once per device); smem defaults to the mma.sync kernels' smem_bytes(w_type)."""
    import cupy
    dev = cupy.cuda.Device().id
    key = (dev, build_arch(), source, name, tuple(sorted((defines or {}).items())))
    with _lock:
        fn = _functions.get(key)
        if fn is None:
            fn = load_module(source, defines=defines).get_function(name)
            fn.max_dynamic_shared_size_bytes = smem_bytes(w_type, build_cc()) if smem is None else smem
            fn.preferred_shared_memory_carveout = 100   # two blocks per SM need ~2 x 105 KB
            _functions[key] = fn
    return fn


DEQUANTS = ("fast", "generic")


def check_dequant(dequant: str) -> str:
    """How the wgmma kernels' producers dequantise GGML weights: "fast" (word-wise,
    gemm/dequant90.cuh, for Q4_K / Q6_K / Q8_0) or "generic" (the element-wise dequant8 of
    quant/ggml_quants.cuh, a separate module, for comparison)."""
    if dequant not in DEQUANTS:
        raise ValueError(f"dequant must be one of {DEQUANTS}, got {dequant!r}")
    return dequant


def _dense_grid90(n_cols: int, n_rows: int, persist: bool) -> tuple[str, tuple[int, int, int]]:
    """persist: persistent blocks (gemm90p_*, about one per SM), else a block per tile (gemm90_*)."""
    if persist:
        return "gemm90p", (max(1, min(device_sms(), n_cols * n_rows)), 1, 1)
    return "gemm90", (n_cols, n_rows, 1)


GLU_ACTS = {"silu": 0, "gelu": 1}    # the GLU's gate: the sources' GLU_ACT define (gemm_core.cuh Act)


def act_defines(act: str, defines: dict | None = None) -> dict | None:
    """The module defines that build the GLU kernels (gemm_swiglu, moe_gate_up) with gate `act`:
    "silu" (SwiGLU, the sources' default) or "gelu" (GELU-tanh, Gemma 4): the same kernel names
    in a module of their own."""
    if act not in GLU_ACTS:
        raise ValueError(f"GLU activation must be one of {tuple(GLU_ACTS)}, got {act!r}")
    if GLU_ACTS[act] == 0:
        return defines
    return {**(defines or {}), "GLU_ACT": GLU_ACTS[act]}


def function90(source: str, name: str, w_name: str, a_kind: str, wide: bool = False, dequant: str = "fast",
               act: str = "silu"):
    defines = {"G90_GENERIC_DEQUANT": 1} if check_dequant(dequant) == "generic" else None
    return function(source, name, w_name, cfg90(w_name, a_kind, wide)[2], act_defines(act, defines))


def prepare(a_dtype, w_type, impl: str | None = None, dequant: str = "fast", act: str = "silu") -> None:
    """Load and configure gemm and gemm_swiglu (its GLU gate `act`) for (a_dtype, w_type); call
    before capturing. Loads the mma.sync kernels always (the fallback for K % 64 != 0) and the
    wgmma ones where they can be used."""
    a, w = act_kind(a_dtype), weight_name(w_type)
    function(SOURCE, f"gemm_{a}a_{w}", w)
    function(SOURCE, f"gemm_swiglu_{a}a_{w}", w, defines=act_defines(act))
    if pick_impl(w, 64, impl) == "wgmma":
        for pfx in ("gemm90", "gemm90p"):
            function90(SOURCE90, f"{pfx}_{a}a_{w}", w, a, dequant=dequant)
            function90(SOURCE90, f"{pfx}_swiglu_{a}a_{w}", w, a, dequant=dequant, act=act)


def ptr(x) -> np.uint64:
    """Device address of a CuPy array (or an int address) as a kernel pointer argument."""
    return np.uint64(x if isinstance(x, (int, np.integer)) else x.data.ptr)


def check_operands(fn: str, a, a_kind: str, lda: int, K: int, w, w_name: str, c=None, c_kind=None, ldc=None) -> None:
    t = qtype(w_name)
    if K <= 0 or K % BK or K % t.block:
        raise ValueError(f"{fn}: K={K} must be a positive multiple of {max(BK, t.block)} for {w_name} weights")
    esz = 4 if a_kind == "f32" else 2
    if a.itemsize != esz:
        raise ValueError(f"{fn}: a_dtype {a_kind} but a has {a.itemsize}-byte elements")
    if lda < K or a.data.ptr % 16 or (lda * esz) % 16:
        raise ValueError(f"{fn}: A base and row stride lda={lda} must be 16-byte aligned with lda >= K={K}")
    if w is not None and w.data.ptr % 16:      # None: an expert table's addresses (kernels/moe/table.py)
        raise ValueError(f"{fn}: weight base address must be 16-byte aligned")
    if c is not None:
        cs = 4 if c_kind == "f32" else 2
        if c.itemsize != cs:
            raise ValueError(f"{fn}: c_dtype {c_kind} but c has {c.itemsize}-byte elements")
        if ldc % 2 or c.data.ptr % (2 * cs):
            raise ValueError(f"{fn}: C base must be {2 * cs}-byte aligned and ldc={ldc} even")


def gemm(a, a_dtype, lda: int, w, w_type, N: int, K: int, c, c_dtype, ldc: int, M: int,
         stream=None, *, accumulate: bool = False, impl: str | None = None, persist: bool = True,
         dequant: str = "fast") -> None:
    """C[M, N] (+)= A[M, K] @ W[N, K]^T on the tensor cores (bf16 operands, f32 accumulation).

    a: [M, lda] f32 or bf16 (a_dtype); w: W's raw GGUF bytes (w_type: a GGML type name / DType /
    id from WEIGHT_TYPES), rows of K elements, contiguous; c: [M, ldc] f32 or bf16 (c_dtype), its
    first N columns written (accumulate: added to). K % 32 == 0 (and % 256 for K-quants); M, N
    arbitrary. grid (ceil(N/128), ceil(M/128)) [wgmma: (ceil(N/BN), ceil(M/128)), cfg90].
    """
    a_kind, c_kind, w_name = act_kind(a_dtype), act_kind(c_dtype, "c"), weight_name(w_type)
    check_operands("gemm", a, a_kind, lda, K, w, w_name, c, c_kind, ldc)
    if M <= 0 or N <= 0:
        return
    if pick_impl(w_name, K, impl) == "wgmma":
        bn, threads, smem = cfg90(w_name, a_kind)
        pfx, grid = _dense_grid90((N + bn - 1) // bn, (M + BM - 1) // BM, persist)
        fn = function90(SOURCE90, f"{pfx}_{a_kind}a_{w_name}", w_name, a_kind, dequant=dequant)
        fn(grid, (threads, 1, 1),
           (ptr(a), np.int64(lda), ptr(w), np.int64(qtype(w_name).row_bytes(K)), np.int32(M), np.int32(N),
            np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16"), np.int32(bool(accumulate))),
           shared_mem=smem, stream=stream)
        return
    fn = function(SOURCE, f"gemm_{a_kind}a_{w_name}", w_name)
    grid = ((N + BN - 1) // BN, (M + BM - 1) // BM, 1)
    fn(grid, (THREADS, 1, 1),
       (ptr(a), np.int64(lda), ptr(w), np.int64(qtype(w_name).row_bytes(K)), np.int32(M), np.int32(N),
        np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16"), np.int32(bool(accumulate))),
       shared_mem=smem_bytes(w_name, build_cc()), stream=stream)


def gemm_swiglu(a, a_dtype, lda: int, w_gate, w_up, w_type, F: int, K: int, c, c_dtype, ldc: int, M: int,
                stream=None, *, impl: str | None = None, persist: bool = True, dequant: str = "fast",
                act: str = "silu") -> None:
    """C[M, F] = silu(A Wg^T) * (A Wu^T), the dense SwiGLU FFN's first half in one GEMM; act
    "gelu": gelu(A Wg^T) * (A Wu^T) (GELU-tanh, Gemma 4's GELU GLU; act_defines).

    w_gate, w_up: [F, K] raw GGUF bytes of one type (views into a merged [2F, K] gate_up tensor
    work: pass its two halves). Each block computes 64 output columns from 64 gate and 64 up
    rows. grid (ceil(F/64), ceil(M/128)); other rules as gemm.
    """
    a_kind, c_kind, w_name = act_kind(a_dtype), act_kind(c_dtype, "c"), weight_name(w_type)
    check_operands("gemm_swiglu", a, a_kind, lda, K, w_gate, w_name, c, c_kind, ldc)
    if w_up.data.ptr % 16:
        raise ValueError("gemm_swiglu: w_up base address must be 16-byte aligned")
    if M <= 0 or F <= 0:
        return
    if pick_impl(w_name, K, impl) == "wgmma":
        bn, threads, smem = cfg90(w_name, a_kind)
        pfx, grid = _dense_grid90((F + bn // 2 - 1) // (bn // 2), (M + BM - 1) // BM, persist)
        fn = function90(SOURCE90, f"{pfx}_swiglu_{a_kind}a_{w_name}", w_name, a_kind, dequant=dequant, act=act)
        fn(grid, (threads, 1, 1),
           (ptr(a), np.int64(lda), ptr(w_gate), ptr(w_up), np.int64(qtype(w_name).row_bytes(K)), np.int32(M),
            np.int32(F), np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16")),
           shared_mem=smem, stream=stream)
        return
    fn = function(SOURCE, f"gemm_swiglu_{a_kind}a_{w_name}", w_name, defines=act_defines(act))
    grid = ((F + BN // 2 - 1) // (BN // 2), (M + BM - 1) // BM, 1)
    fn(grid, (THREADS, 1, 1),
       (ptr(a), np.int64(lda), ptr(w_gate), ptr(w_up), np.int64(qtype(w_name).row_bytes(K)), np.int32(M),
        np.int32(F), np.int32(K), ptr(c), np.int64(ldc), np.int32(c_kind == "bf16")),
       shared_mem=smem_bytes(w_name, build_cc()), stream=stream)
