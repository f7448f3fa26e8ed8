"""Launcher for the chunked gated delta rule on tensor cores (kernels/deltanet/chunk_gdr.cu).

    ws = cupy.empty(workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype="bf16"), cupy.uint8)   # once, from the arena
    chunk_gated_delta_rule(xc, xc, xc, C, 0, Hk * K, C, 2 * Hk * K, g, beta, state, o, "f32",
                           T, Hk, Hv, K, V, scale, "tile", ws, stream)

Letters as in ref.py: q, k [T, Hk, K] and v [T, Hv, V] are strided views into base arrays (typically
the [T, C] output of the short conv): element (t, h, d) of q is q_base.flat[t * q_k_row_stride +
q_col_off + h * K + d] (k likewise with k_col_off, v with v_row_stride / v_col_off). bf16 arrays are
CuPy arrays of 2-byte elements (uint16 bit patterns). g, beta [T, Hv] f32 contiguous; state
[Hv, K, V] f32, read as the initial state and overwritten with the final one; out [T, Hv, V] f32 or
bf16. No allocation and no host synchronisation: capturable in a CUDA graph (T, the strides and
scale are frozen into it; padded rows must carry g = 0 and beta = 0).

Two kernels: `gdr_prep_*` (parallel over chunks and heads: decays, Tinv = (I + A)^-1, masked Q K^T)
and `gdr_recur_*` (sequential over chunks, parallel over value heads x value-column blocks; also
writes the output). The workspace holds Tinv and P (bf16 [NT, Hv, 64, 64]) and the per-token decay
factors (f32 [NT, Hv, 4, 64]); with f32 inputs also bf16 copies of q, k, v.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from ggfuse.kernels.nvrtc import build_arch, load_module

CHUNK = 64
HEAD_MAPS = {"tile": 0, "interleave": 1}
_SOURCE = "deltanet/chunk_gdr.cu"
_ALIGN = 256
_TP = 72  # padded 64 x 64 tile row, as in the .cu


def _up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def num_chunks(T: int) -> int:
    return (T + CHUNK - 1) // CHUNK


def _workspace_layout(T: int, Hv: int, K: int, V: int, Hk: int, copies: bool) -> tuple[dict, int]:
    NT = num_chunks(T)
    parts = [("tinv", NT * Hv * CHUNK * CHUNK * 2), ("p", NT * Hv * CHUNK * CHUNK * 2),
             ("f", NT * Hv * 4 * CHUNK * 4)]
    if copies:
        parts += [("qc", T * Hk * K * 2), ("kc", T * Hk * K * 2), ("vc", T * Hv * V * 2)]
    offsets, total = {}, 0
    for name, size in parts:
        offsets[name] = total
        total += _up(size)
    return offsets, total


def workspace_bytes(T: int, Hv: int, K: int, V: int, *, Hk: int | None = None, in_dtype: str = "bf16") -> int:
    """Scratch bytes `chunk_gated_delta_rule` needs for T tokens. bf16 inputs: Tinv, P and decay
    factors only (16.5 KiB per chunk and value head). f32 inputs (in_dtype="f32") add bf16 copies of
    q, k (sized by Hk, default Hv: an upper bound) and v."""
    if in_dtype not in ("bf16", "f32"):
        raise ValueError(f"workspace_bytes: in_dtype must be 'bf16' or 'f32', got {in_dtype!r}")
    return _workspace_layout(T, Hv, K, V, Hk or Hv, in_dtype == "f32")[1]


def workspace(T: int, Hv: int, K: int, V: int, *, Hk: int, in_dtype: str) -> dict[str, int]:
    """Scratch bytes of one chunked delta-rule step, placed by the memory plan in the arena."""
    return {"ws": workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=in_dtype)}


def recur_smem_bytes(K: int, v_block: int, stages: int) -> int:
    """Dynamic shared memory of gdr_recur (mirror of RecurLayout in the .cu)."""
    stage = 2 * CHUNK * (K + 8) * 2 + 2 * CHUNK * _TP * 2 + CHUNK * (v_block + 8) * 2 + 4 * CHUNK * 4
    return stages * stage


def prep_smem_bytes(K: int) -> int:
    """Dynamic shared memory of gdr_prep (mirror of prep_impl in the .cu)."""
    r0 = max(2 * CHUNK * (K + 8) * 2, 2 * CHUNK * _TP * 2 + 2 * CHUNK * CHUNK * 2)
    return r0 + 2 * CHUNK * 68 * 4 + 2 * 5 * CHUNK * 4


@dataclass(frozen=True)
class _Kernels:
    prep: dict           # input dtype -> RawKernel
    recur: dict          # output dtype -> RawKernel
    prep_smem: int
    recur_smem: int
    stages: int


_cache: dict = {}


def _max_smem_optin() -> int:
    import cupy
    return int(cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])


def _kernels(K: int, V: int, v_block: int) -> _Kernels:
    import cupy
    key = (cupy.cuda.Device().id, build_arch(), K, V, v_block)
    ks = _cache.get(key)
    if ks is not None:
        return ks
    limit = _max_smem_optin()
    stages = 2 if recur_smem_bytes(K, v_block, 2) <= limit else 1
    recur_smem, prep_smem = recur_smem_bytes(K, v_block, stages), prep_smem_bytes(K)
    if recur_smem > limit or prep_smem > limit:
        raise RuntimeError(f"{_SOURCE}: needs {max(recur_smem, prep_smem)} bytes of shared memory per block, "
                           f"the device allows {limit}")
    mod = load_module(_SOURCE, defines={"GDR_DK": K, "GDR_DV": V, "GDR_VB": v_block, "GDR_STAGES": stages})
    prep = {d: mod.get_function(f"gdr_prep_{d}") for d in ("bf16", "f32")}
    recur = {d: mod.get_function(f"gdr_recur_{d}") for d in ("bf16", "f32")}
    for f in prep.values():
        f.max_dynamic_shared_size_bytes = prep_smem
    for f in recur.values():
        f.max_dynamic_shared_size_bytes = recur_smem
    ks = _Kernels(prep, recur, prep_smem, recur_smem, stages)
    _cache[key] = ks
    return ks


def _elem_kind(a, what: str) -> str:
    dt = np.dtype(a.dtype)
    if dt == np.float32:
        return "f32"
    if dt.itemsize == 2 and dt != np.float16:
        return "bf16"
    raise TypeError(f"chunk_gated_delta_rule: {what} must be float32 or bf16 (2-byte bit patterns), got {dt}")


def _check_f32(a, shape, what: str):
    if np.dtype(a.dtype) != np.float32 or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous:
        raise ValueError(f"chunk_gated_delta_rule: {what} must be a contiguous float32 array of shape {tuple(shape)}, "
                         f"got {a.dtype} {tuple(a.shape)} (contiguous={a.flags.c_contiguous})")


def default_v_block(V: int) -> int:
    return min(64, V)


def prepare(K: int, V: int, v_block: int | None = None) -> None:
    """Compile/load the kernels and set their shared-memory limits. Call before capturing a graph:
    module loading and function attributes are not stream work."""
    _kernels(K, V, v_block or default_v_block(V))


@dataclass(frozen=True)
class _Launch:
    """The two launches of one call, arguments resolved (the bench times them separately)."""
    ks: _Kernels
    in_kind: str
    out_dtype: str
    prep_grid: tuple
    prep_args: tuple
    recur_grid: tuple
    recur_block: tuple
    recur_args: tuple

    def prep(self, stream=None) -> None:
        with stream if stream is not None else contextlib.nullcontext():
            self.ks.prep[self.in_kind](self.prep_grid, (128, 1, 1), self.prep_args, shared_mem=self.ks.prep_smem)

    def recur(self, stream=None) -> None:
        with stream if stream is not None else contextlib.nullcontext():
            self.ks.recur[self.out_dtype](self.recur_grid, self.recur_block, self.recur_args,
                                          shared_mem=self.ks.recur_smem)


def chunk_gated_delta_rule(q, k, v, q_k_row_stride: int, q_col_off: int, k_col_off: int,
                           v_row_stride: int, v_col_off: int, g, beta, state, out, out_dtype: str,
                           T: int, Hk: int, Hv: int, K: int, V: int, scale: float, head_map,
                           workspace, stream=None, *, v_block: int | None = None) -> None:
    """o = gated delta rule(q, k, v, g, beta; state) written into `out`; state updated in place.

    Shapes and strides: see the module docstring. head_map: "tile" / "interleave" or 0 / 1.
    workspace: a CuPy array of at least workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=...) bytes.
    v_block: value columns per recurrence CTA (16 per warp; default 64).
    """
    if T <= 0:
        return
    launch = plan(q, k, v, q_k_row_stride, q_col_off, k_col_off, v_row_stride, v_col_off, g, beta, state,
                  out, out_dtype, T, Hk, Hv, K, V, scale, head_map, workspace, v_block=v_block)
    launch.prep(stream)
    launch.recur(stream)


def plan(q, k, v, q_k_row_stride, q_col_off, k_col_off, v_row_stride, v_col_off, g, beta, state, out,
         out_dtype, T, Hk, Hv, K, V, scale, head_map, workspace, *, v_block=None) -> _Launch:
    """Check the arguments and resolve both launches (arguments as `chunk_gated_delta_rule`)."""
    if T <= 0:
        raise ValueError(f"chunk_gated_delta_rule: T must be positive, got {T}")
    if K not in (64, 128) or V not in (64, 128):
        raise ValueError(f"chunk_gated_delta_rule: K and V must be 64 or 128, got K={K} V={V}")
    if Hk <= 0 or Hv % Hk:
        raise ValueError(f"chunk_gated_delta_rule: Hv ({Hv}) must be a multiple of Hk ({Hk})")
    vb = v_block or default_v_block(V)
    if vb not in (16, 32, 64, 128) or V % vb:
        raise ValueError(f"chunk_gated_delta_rule: v_block must be 16, 32, 64 or 128 and divide V={V}, got {vb}")
    hm = HEAD_MAPS[head_map] if isinstance(head_map, str) else int(head_map)
    if hm not in (0, 1):
        raise ValueError(f"chunk_gated_delta_rule: head_map must be 'tile', 'interleave', 0 or 1, got {head_map!r}")
    in_kind = _elem_kind(q, "q")
    if _elem_kind(k, "k") != in_kind or _elem_kind(v, "v") != in_kind:
        raise TypeError("chunk_gated_delta_rule: q, k and v must share one dtype")
    if out_dtype not in ("f32", "bf16") or _elem_kind(out, "out") != out_dtype:
        raise TypeError(f"chunk_gated_delta_rule: out_dtype {out_dtype!r} does not match out ({out.dtype})")
    for name, val in (("q_k_row_stride", q_k_row_stride), ("q_col_off", q_col_off), ("k_col_off", k_col_off),
                      ("v_row_stride", v_row_stride), ("v_col_off", v_col_off)):
        if val % 8:
            raise ValueError(f"chunk_gated_delta_rule: {name} must be a multiple of 8 elements, got {val}")
    for name, a in (("q", q), ("k", k), ("v", v), ("out", out)):
        if a.data.ptr % 16:
            raise ValueError(f"chunk_gated_delta_rule: {name} must be 16-byte aligned")
    _check_f32(g, (T, Hv), "g")
    _check_f32(beta, (T, Hv), "beta")
    _check_f32(state, (Hv, K, V), "state")
    if out.size < T * Hv * V or not out.flags.c_contiguous:
        raise ValueError(f"chunk_gated_delta_rule: out must be contiguous with >= {T * Hv * V} elements, "
                         f"got {out.shape}")
    copies = in_kind == "f32"
    offs, need = _workspace_layout(T, Hv, K, V, Hk, copies)
    wbytes = workspace.size * workspace.dtype.itemsize
    if wbytes < need:
        raise ValueError(f"chunk_gated_delta_rule: workspace has {wbytes} bytes, needs {need}")

    ks = _kernels(K, V, vb)
    isz = 4 if in_kind == "f32" else 2
    u64, i64, i32, f32 = np.uint64, np.int64, np.int32, np.float32
    wp = workspace.data.ptr
    tinv, p, f = u64(wp + offs["tinv"]), u64(wp + offs["p"]), u64(wp + offs["f"])
    qp = u64(q.data.ptr + q_col_off * isz)
    kp = u64(k.data.ptr + k_col_off * isz)
    vp = u64(v.data.ptr + v_col_off * isz)
    if copies:
        qc, kc, vc = (u64(wp + offs[n]) for n in ("qc", "kc", "vc"))
        rq, rk, rqk_stride, rv, rv_stride = qc, kc, Hk * K, vc, Hv * V
    else:
        qc = kc = vc = u64(0)
        rq, rk, rqk_stride, rv, rv_stride = qp, kp, q_k_row_stride, vp, v_row_stride
    npairs = (Hv // Hk + 1) // 2
    return _Launch(
        ks, in_kind, out_dtype,
        (num_chunks(T), Hk * npairs, 1),
        (qp, kp, i64(q_k_row_stride), vp, i64(v_row_stride), g, beta, tinv, p, f, qc, kc, vc,
         i32(T), i32(Hk), i32(Hv), f32(scale), i32(hm)),
        (Hv * (V // vb), 1, 1), (2 * vb, 1, 1),
        (rq, rk, i64(rqk_stride), rv, i64(rv_stride), tinv, p, f, state, out,
         i32(T), i32(Hk), i32(Hv), f32(scale), i32(hm)))


def flops(T: int, Hk: int, Hv: int, K: int, V: int) -> float:
    """Tensor-core FLOPs the two kernels issue (dense count of the chunked algorithm, tails padded)."""
    NT, C = num_chunks(T), CHUNK
    prep = NT * Hk * math.ceil(Hv / Hk / 2) * 2 * (2 * C * C * K) + NT * Hv * C ** 3 / 3
    recur = NT * Hv * (2 * C * K * V * 3 + 2 * C * C * V)
    return float(prep + recur)


# ---- token-recurrent kernels (kernels/deltanet/recurrent.cu): the fallback and the decode step --

def chunked_supported(K: int, V: int) -> bool:
    """Head dims the tensor-core chunked kernels take; others use the recurrent fallback."""
    return K in (64, 128) and V in (64, 128)


STEP_MAX_K = 256   # gdr_step_*: 8 state rows per thread, 32 row groups (recurrent.cu STEP_ROWS)
STEP_THREADS = 256
RECURRENT_KERNELS = ("loop", "step")


def step_supported(K: int, V: int) -> bool:
    """Head dims the one-token kernel gdr_step_* takes (K <= 256 state rows in registers, float4
    column groups: V % 4 == 0); the loop kernel gdr_recurrent_* takes any."""
    return 0 < K <= STEP_MAX_K and V > 0 and V % 4 == 0


def recurrent_kernel_name(kernel: str, in_kind: str, out_kind: str) -> str:
    """The recurrent.cu function of a kernel family ("loop" or "step") for q/k/v stored as in_kind
    and out as out_kind ("f32" or "bf16")."""
    if kernel == "step":
        return f"gdr_step_{in_kind}_{out_kind}"
    return "gdr_recurrent_f32" if (in_kind, out_kind) == ("f32", "f32") else f"gdr_recurrent_{in_kind}_{out_kind}"


def gated_delta_rule_recurrent(q, k, v, g, beta, state, out, scale: float, head_map, stream=None, *,
                               kernel: str = "auto") -> None:
    """The token-recurrent delta rule on the GPU, for any head dims (f32 arithmetic): the
    fallback for head dims without a chunked kernel, precision f32's delta rule, and the decode
    step (one token). q, k [T, Hk, K] views sharing a row stride and v [T, Hv, V], f32 or bf16
    (uint16 words), all of one dtype; g, beta [T, Hv] f32; state [Hv, K, V] f32 (in place);
    out [T, Hv, V] f32 or bf16, contiguous.

    Two kernels (recurrent.cu): with one token (T == 1) and head dims `step_supported` takes (and
    the state 16-byte aligned), gdr_step_*: the state read once into registers and written once
    (the decode step); otherwise gdr_recurrent_*, which walks the tokens in order. kernel: "auto"
    (that choice), "loop" (always gdr_recurrent_*) or "step" (gdr_step_*; an error where it
    cannot run): the explicit ones are for the benchmark and the tests."""
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    hm = head_map if isinstance(head_map, int) else (0 if head_map == "tile" else 1)
    a, o = _elem_kind(q, "q"), _elem_kind(out, "out")
    if _elem_kind(k, "k") != a or _elem_kind(v, "v") != a:
        raise ValueError("gated_delta_rule_recurrent: q, k and v must share a dtype")
    step_ok = T == 1 and step_supported(K, V) and state.data.ptr % 16 == 0
    if kernel == "auto":
        kernel = "step" if step_ok else "loop"
    elif kernel not in RECURRENT_KERNELS:
        raise ValueError(f"gated_delta_rule_recurrent: kernel must be 'auto', 'loop' or 'step', got {kernel!r}")
    elif kernel == "step" and not step_ok:
        raise ValueError(f"gated_delta_rule_recurrent: the step kernel takes one token, K <= {STEP_MAX_K}, "
                         f"V % 4 == 0 and a 16-byte aligned state; got T={T} K={K} V={V} "
                         f"(state at {state.data.ptr % 16} bytes past 16)")
    fn = load_module("deltanet/recurrent.cu").get_function(recurrent_kernel_name(kernel, a, o))
    i32, f32 = np.int32, np.float32
    with (stream if stream is not None else contextlib.nullcontext()):
        if kernel == "step":
            fn((Hv, (V + 31) // 32), (STEP_THREADS,),
               (q, k, v, g, beta, state, out, i32(Hk), i32(Hv), i32(K), i32(V), f32(scale), i32(hm)))
        else:
            fn((Hv, (V + 31) // 32), (32,),
               (q, k, np.int64(q.strides[0] // q.itemsize), v, np.int64(v.strides[0] // v.itemsize), g, beta,
                state, out, i32(T), i32(Hk), i32(Hv), i32(K), i32(V), f32(scale), i32(hm)),
               shared_mem=(K * 32 + 2 * K) * 4)


def gdr_step_fused(q, k, v, state, out, scale: float, head_map, *, eps_q: float, eps_k: float, alpha, beta_lin,
                   dt_bias, ssm_a, n_valid, stream=None) -> None:
    """The decode step's delta rule with the q / k l2 normalisation and the gates folded in
    (recurrent.cu gdr_step_fused_*): as l2_norm(q), l2_norm(k) (eps_q, eps_k), deltanet_gates(alpha,
    beta_lin, dt_bias, ssm_a, n_valid) and gated_delta_rule_recurrent(kernel="step") in one launch,
    to f32 rounding. q, k [1, Hk, K] and v [1, Hv, V] f32 (raw: before the normalisation; only row
    0 read, each head contiguous); alpha, beta_lin [1, Hv] or [1, Hk, Hv/Hk] f32 views; dt_bias,
    ssm_a [Hv] f32; state [Hv, K, V] f32 16-byte aligned (in place); out [1, Hv, V] f32 or bf16."""
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    if T != 1 or not step_supported(K, V) or state.data.ptr % 16:
        raise ValueError(f"gdr_step_fused: one token, K <= {STEP_MAX_K}, V % 4 == 0 and a 16-byte aligned state; "
                         f"got T={T} K={K} V={V}")
    for a, what in ((q, "q"), (k, "k"), (v, "v")):
        if _elem_kind(a, what) != "f32" or a.strides[-1] != a.itemsize or a.strides[1] != a.shape[2] * a.itemsize:
            raise ValueError(f"gdr_step_fused: {what} must be f32 with contiguous heads")
    for a, what, n in ((dt_bias, "dt_bias", Hv), (ssm_a, "ssm_a", Hv)):
        if np.dtype(a.dtype) != np.float32 or a.size != n:
            raise ValueError(f"gdr_step_fused: {what} must be f32 [{Hv}]")
    from ggfuse.kernels.dense.launch import gate_layout
    Tg, Hg, grp, (_, a_sg), (_, b_sg) = gate_layout(alpha, beta_lin, "gdr_step_fused")
    if (Tg, Hg) != (T, Hv):
        raise ValueError(f"gdr_step_fused: alpha and beta_lin must be [{T}, {Hv}] (or grouped), got {alpha.shape}")
    hm = head_map if isinstance(head_map, int) else (0 if head_map == "tile" else 1)
    o = _elem_kind(out, "out")
    fn = load_module("deltanet/recurrent.cu").get_function(f"gdr_step_fused_{o}")
    i32, f32 = np.int32, np.float32
    with (stream if stream is not None else contextlib.nullcontext()):
        fn((Hv, (V + 31) // 32), (STEP_THREADS,),
           (q, k, v, state, out, i32(Hk), i32(Hv), i32(K), i32(V), f32(scale), i32(hm), f32(eps_q), f32(eps_k),
            alpha, np.int64(a_sg), beta_lin, np.int64(b_sg), i32(grp), dt_bias, ssm_a, n_valid))
