"""The CPU reference with the GPU's bf16 roundings put back in, per kind of computation: an
importable helper for tests/test_gpu_models.py and a diagnostic when run as a script.

    emulated_logits(arch, quant, gemm="bf16", attention="bf16", deltanet="bf16", chunk=16)

runs the fixture on the cpu device (chunks of `chunk` tokens, as the GPU test feeds them) with
the numpy reference functions patched to round what the CUDA backend's default ("bf16")
kernels round:
  gemm       every GEMM operand (activation and weight, the kernels/gemm and kernels/moe
             tensor-core kernels) and the SwiGLU intermediate of the MoE experts (stored bf16
             between gate_up and down); MoE routers and the shared-expert gate stay f32 as on the
             GPU (kernels/dense/router_gemm.cu, rowdot_sigmoid)
  attention  q, the bf16 KV cache and the softmax numerators P (kernels/attention/flash_attn.cu)
  deltanet   the chunked delta rule's tensor-core operands (kernels/deltanet/chunk_gdr.cu: q, k,
             v, Tinv, P, the state S, R, U, U*exp(G_L - G)); only for head dims the chunked kernel
             takes (64/128): the others run the exact f32 recurrent kernel on the GPU
"f32" for a kind leaves its reference untouched.

    python tests/precision_emulation.py      # the table of every fixture case
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ggfuse  # noqa: E402
from ggfuse.kernels.attention import ref as attn_ref  # noqa: E402
from ggfuse.kernels.deltanet import ref as dn_ref  # noqa: E402
from ggfuse.kernels.dense import ref as dref  # noqa: E402
from ggfuse.kernels.moe import ref as moe_ref  # noqa: E402
from util import fixture, refs  # noqa: E402

F32 = np.float32
KINDS = ("gemm", "attention", "deltanet")


def rb(a) -> np.ndarray:
    """Round f32 to the nearest bf16 (ties to even), returned as f32."""
    a = np.ascontiguousarray(a, np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


# ---- gemm ------------------------------------------------------------------------------------

def _matmul_bf16(orig):
    state = {"exact": 0}

    def mm(x, w):
        if state["exact"]:
            return orig(x, w)
        return orig(rb(x), rb(dref.dense(w)))
    return mm, state


def _route_exact(orig_route, state):
    def route(*a, **kw):
        state["exact"] += 1
        try:
            return orig_route(*a, **kw)
        finally:
            state["exact"] -= 1
    return route


def _grouped_bf16(x, weights, sorted_slots, expert_offsets, *, w_down, w_gate=None, w_up=None, w_gate_up=None,
                  shared=None, act="silu"):
    """moe_ref.moe_grouped_gemm with bf16 operands and a bf16 GLU intermediate (act "gelu":
    Gemma 4's GELU-tanh experts)."""
    gate_fn = dref.gelu if act == "gelu" else dref.silu
    T, k = weights.shape
    per_slot = np.zeros((T * k, x.shape[1]), dtype=F32)
    w_flat = weights.reshape(-1)
    xb = rb(x)
    for e in range(len(expert_offsets) - 1):
        seg = sorted_slots[expert_offsets[e]:expert_offsets[e + 1]]
        seg = seg[seg >= 0].astype(np.int64)
        if seg.size == 0:
            continue
        xe = xb[seg // k]
        if w_gate_up is not None:
            gu = xe @ rb(moe_ref.expert(w_gate_up, e)).T
            F = gu.shape[1] // 2
            gate, up = gu[:, :F], gu[:, F:]
        else:
            gate, up = xe @ rb(moe_ref.expert(w_gate, e)).T, xe @ rb(moe_ref.expert(w_up, e)).T
        h = rb(dref.mul(gate_fn(gate), up))
        per_slot[seg] = (h @ rb(moe_ref.expert(w_down, e)).T) * w_flat[seg, None]
    out = dref.sum_axis(per_slot.reshape(T, k, -1), axis=1)
    if shared is not None:
        wg, wu, wd, sg = shared
        h = rb(dref.mul(dref.silu(dref.matmul(x, wg)), dref.matmul(x, wu)))   # matmul: patched
        out = dref.add(out, dref.mul(dref.matmul(h, wd), sg))
    return out


# ---- attention -------------------------------------------------------------------------------

def _attention_bf16(q, k, v, *, scale):
    """attn_ref.attention with bf16 q, K, V and softmax numerators (f32 row sums, as the kernel)."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    P = S - T
    group = Hq // Hkv
    kh = np.repeat(rb(k), group, axis=1).astype(np.float64)
    vh = np.repeat(rb(v), group, axis=1).astype(np.float64)
    s = np.einsum("thd,shd->hts", rb(q).astype(np.float64), kh) * scale
    mask = np.arange(S)[None, :] > (P + np.arange(T))[:, None]
    s = np.where(mask[None], -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True)).astype(F32)
    o = np.einsum("hts,shd->thd", rb(p).astype(np.float64), vh) / p.sum(axis=-1, dtype=np.float64).T[:, :, None]
    return o.astype(F32)


# ---- deltanet --------------------------------------------------------------------------------

def _chunk_gdr_bf16(orig):
    def gdr(q, k, v, g, beta, state, *, scale, head_map="tile", chunk=64):
        K, V = q.shape[2], v.shape[2]
        if K not in (64, 128) or V not in (64, 128):   # the GPU runs the f32 recurrent kernel
            return orig(q, k, v, g, beta, state, scale=scale, head_map=head_map, chunk=chunk)
        return _gdr_kernel_order(q, k, v, g, beta, state, scale=scale, head_map=head_map)
    return gdr


def _gdr_kernel_order(q, k, v, g, beta, state, *, scale, head_map, C=64):
    """The chunked delta rule in chunk_gdr.cu's order and roundings (chunks of C = 64)."""
    T, Hk, K = q.shape
    Hv, V = v.shape[1:]
    kh = dn_ref.key_head_of(Hv, Hk, head_map)
    f64 = np.float64
    qd = rb(q[:, kh]).astype(f64).transpose(1, 0, 2)
    kd = rb(k[:, kh]).astype(f64).transpose(1, 0, 2)
    vd = rb(v).astype(f64).transpose(1, 0, 2)
    gd = g.astype(F32).T
    bd = beta.astype(F32).T.astype(f64)
    S = state.astype(F32).copy()
    o = np.empty((Hv, T, V), dtype=F32)
    for s0 in range(0, T, C):
        e = min(s0 + C, T)
        L = e - s0
        qc, kc, vc, bc = qd[:, s0:e], kd[:, s0:e], vd[:, s0:e], bd[:, s0:e]
        G = np.cumsum(gd[:, s0:e], axis=1, dtype=F32).astype(f64)
        causal = np.tril(np.ones((L, L), dtype=bool))
        D = np.exp(np.where(causal, G[:, :, None] - G[:, None, :], -np.inf))
        strict = np.tril(bc[:, :, None] * (kc @ kc.transpose(0, 2, 1)) * D, -1)
        Tinv = rb(dn_ref._unit_lower_inverse(strict).astype(F32)).astype(f64)
        Pm = rb((scale * (qc @ kc.transpose(0, 2, 1)) * D).astype(F32)).astype(f64)
        eG = np.exp(G)
        Sb = rb(S).astype(f64)
        X = kc @ Sb
        QS = qc @ Sb
        R = rb((bc[:, :, None] * (vc - eG[:, :, None] * X)).astype(F32)).astype(f64)
        U = (Tinv @ R).astype(F32)
        Ub = rb(U).astype(f64)
        o[:, s0:e] = (scale * eG[:, :, None] * QS + Pm @ Ub).astype(F32)
        GL = G[:, -1]
        Uw = rb((U * np.exp(GL[:, None] - G)[:, :, None]).astype(F32)).astype(f64)
        S = (np.exp(GL)[:, None, None] * S + kc.transpose(0, 2, 1) @ Uw).astype(F32)
    return o.transpose(1, 0, 2).copy(), S


# ---- driver ----------------------------------------------------------------------------------

@contextlib.contextmanager
def emulate(gemm="bf16", attention="bf16", deltanet="bf16"):
    """Patch the numpy references to round like the default GPU kernels, per kind."""
    saved = [(dref, "matmul"), (moe_ref, "moe_route"), (moe_ref, "moe_grouped_gemm"),
             (attn_ref, "attention"), (dn_ref, "chunk_gated_delta_rule")]
    saved = [(m, n, getattr(m, n)) for m, n in saved]
    try:
        if gemm == "bf16":
            mm, st = _matmul_bf16(dref.matmul)
            moe_ref.moe_route = _route_exact(moe_ref.moe_route, st)
            dref.matmul = mm
            moe_ref.moe_grouped_gemm = _grouped_bf16
        if attention == "bf16":
            attn_ref.attention = _attention_bf16
        if deltanet == "bf16":
            dn_ref.chunk_gated_delta_rule = _chunk_gdr_bf16(dn_ref.chunk_gated_delta_rule)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def emulated_logits(arch: str, quant: str, *, gemm="bf16", attention="bf16", deltanet="bf16",
                    chunk: int = 16) -> np.ndarray:
    """Logits of the fixture's reference tokens on the cpu device with the chosen roundings."""
    tokens = refs(arch)["tokens"]
    with emulate(gemm, attention, deltanet):
        return ggfuse.load(fixture(arch, quant), device="cpu", chunk=chunk).prefill(tokens)


def compare(out, ref) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, top-1 agreement), as tests/test_gpu_models.py _check."""
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    return err, float(np.mean(out.argmax(-1) == ref.argmax(-1)))


MODES = {   # name -> (gemm, attention, deltanet)
    "all bf16 (default GPU)": ("bf16", "bf16", "bf16"),
    "(a) f32 GEMMs only": ("f32", "bf16", "bf16"),
    "f32 GEMMs + attention": ("f32", "f32", "bf16"),
    "f32 GEMMs + deltanet": ("f32", "bf16", "f32"),
    "(b) all f32": ("f32", "f32", "f32"),
}


def main():
    from util import ARCHS, QUANTS
    for arch in ARCHS:
        for quant in QUANTS:
            base = ggfuse.load(fixture(arch, quant), device="cpu").prefill(refs(arch)["tokens"])
            cells = []
            for name, (g, a, d) in MODES.items():
                err, top = compare(emulated_logits(arch, quant, gemm=g, attention=a, deltanet=d), base)
                ok = err <= 2e-2 and top >= 39 / 40
                cells.append(f"{err:.3f}/{top:.3f}{'' if ok else ' FAIL'}")
            print(f"| {arch} {quant} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    print("| case | " + " | ".join(MODES) + " |")
    main()
