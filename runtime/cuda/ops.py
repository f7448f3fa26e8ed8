"""The schedule as bound kernel launches: one function per op turns a node into a closure that
launches its kernel(s) on the backend's compute stream, with every pointer fixed at build time.

Values without work are views: RESHAPE and SLICE are CuPy views of their input (kernels accept
row strides), CONCAT onto a KV cache is the cache itself (the attention launch appends the
chunk's K/V first), FETCH_WEIGHTS of resident experts is the weight itself; of streamed experts,
a copy into the layer's device slot plus a wait before the first reader (runtime/cuda/streaming.py).
"""
from __future__ import annotations

import os

import numpy as np

from ggfuse.errors import GGFuseError
from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType, shape_eval
from ggfuse.runtime.cuda.streaming import fetch_chain

_LAUNCHERS = {}


def launcher(*ops):
    def deco(fn):
        for op in ops:
            _LAUNCHERS[op] = fn
        return fn
    return deco


class Ctx:
    """What a launcher needs: the backend, value lookup, scratch buffers."""

    def __init__(self, be):
        self.be = be
        self.cp = be.cp
        self.g = be.graph
        self.vals = {}
        self.weights = {}      # Value -> (array, fmt, ggml type, numpy shape)
        # scratch buffers outside the arena, shared by the backend's sub-chunk executors (they
        # never run at the same time); runtime/cuda/workspace.py bounds what they add up to
        shared = getattr(be, "scratch_shared", None)
        if shared is None:
            shared = be.scratch_shared = {"named": {}, "live": []}
        self._scratch = shared["named"]
        self._live = shared["live"]
        self._busy = []        # per live buffer: last schedule step of its current holder

    @property
    def stream(self):
        return self.be.stream

    def v(self, value):
        return self.vals[value]

    def t(self, value):
        return self.g.type_of(value)

    def shape(self, value):
        return shape_eval(self.t(value).shape, {"T": self.be.chunk, "P": 0})

    def scratch(self, key: str, shape, dtype):
        """A persistent buffer outside the arena, shared by every node that asks for `key`."""
        cp = self.cp
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self._scratch.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = cp.empty(max(nbytes, 256), dtype=cp.uint8)
            self._scratch[key] = buf
        return buf[:nbytes].view(dtype).reshape(shape)

    def scratch_live(self, shape, dtype, first: int, last: int):
        """A buffer outside the arena for a value live over schedule steps [first, last]:
        reuses one whose previous holder's last step is before `first`."""
        from ggfuse.runtime.cuda.workspace import reuse_slot
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        # the buffers are shared with the sub-chunk executors; who holds them is per schedule
        self._busy += [-1] * (len(self._live) - len(self._busy))
        i = reuse_slot([b.nbytes for b in self._live], self._busy, nbytes, first, last)
        if i < 0:
            self._live.append(self.cp.empty(max(nbytes, 256), dtype=self.cp.uint8))
            self._busy.append(last)
            i = len(self._live) - 1
        return self._live[i][:nbytes].view(dtype).reshape(shape)


# ops whose kernels write bf16 as well as f32 (dense/launch.py), by output index
_BF16_OUT = {Op.RMS_NORM: (0,), Op.ADD_RMS_NORM: (0,), Op.GATED_RMS_NORM: (0,), Op.SIGMOID_MUL: (0,)}


def _gemm_operand_only(g, v) -> bool:
    """Every reader of v (through RESHAPE / SLICE views) is a GEMM's activation operand."""
    uses = list(g.uses_of(v))
    if not uses:
        return False
    for u, i in uses:
        if u.op in (Op.RESHAPE, Op.SLICE):
            if not _gemm_operand_only(g, u.out):
                return False
        elif not (u.op in (Op.MATMUL, Op.FFN_SWIGLU) and i == 0):
            return False
    return True


def bf16_activations(g) -> set:
    """Values stored as bf16 although the IR says f32: outputs of norms / gates that only GEMMs
    read. The tensor-core GEMMs round their activation operand to bf16 anyway, so the results are
    bit-identical, while the norm writes half the bytes and the GEMM takes its bf16 x bf16 path
    (128 x 256 tiles on sm_90) instead of converting f32 while staging. GGFUSE_BF16_ACT=0: off."""
    if os.environ.get("GGFUSE_BF16_ACT") == "0":
        return set()
    outs = set(g.outputs.values())
    vals = set()
    for n in g.nodes():
        for i in _BF16_OUT.get(n.op, ()):
            v = n.value(i)
            if v not in outs and g.type_of(v).dtype == DType.F32 and _gemm_operand_only(g, v):
                vals.add(v)
    return vals


def last_use(g, v, step: dict) -> int:
    """The last schedule step that reads `v`, through views (RESHAPE / SLICE) of it."""
    last = step[v.node]
    for u, _ in g.uses_of(v):
        last = max(last, step[u.id])
        if u.op in (Op.RESHAPE, Op.SLICE):
            last = max(last, last_use(g, u.out, step))
    return last


def strided_reshape(cp, a, shape):
    """Reshape a view without copying: contiguous arrays reshape; a row-strided 2-D view whose
    rows are contiguous splits/merges its trailing dims with as_strided."""
    shape = tuple(int(d) for d in shape)
    if a.flags.c_contiguous:
        return a.reshape(shape)
    item = a.itemsize
    rows = a.shape[0]
    if shape[0] == rows and a.strides[-1] == item:
        inner_a = int(np.prod(a.shape[1:]))
        if int(np.prod(shape[1:])) == inner_a and _rows_contiguous(a):
            strides = [a.strides[0]]
            acc = item
            tail = []
            for d in reversed(shape[1:]):
                tail.append(acc)
                acc *= d
            strides += list(reversed(tail))
            return cp.lib.stride_tricks.as_strided(a, shape=shape, strides=tuple(strides))
    raise GGFuseError(None, f"cannot view an array of shape {a.shape} strides {a.strides} as {shape} without a copy")


def _rows_contiguous(a) -> bool:
    expect = a.itemsize
    for d, s in zip(reversed(a.shape[1:]), reversed(a.strides[1:])):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def build_launches(be) -> list:
    """Resolve every value to a device array and bind each node's launch."""
    ctx = Ctx(be)
    be.ctx = ctx
    cp = be.cp
    out = []
    be.launch_nodes = []
    logits = be.graph.outputs["logits"]
    be.head_all = be.head_last = be.head_node = be.logits_last_view = None
    streamer = getattr(be, "streamer", None)
    joined = set()
    order = be.graph.topo()
    step = {n.id: i for i, n in enumerate(order)}
    bf16_vals = set() if f32_precision(be) else bf16_activations(be.graph)   # f32: GEMMs read f32
    for n in order:
        if n.op == Op.INPUT:
            kind = n.attrs.kind
            ctx.vals[n.out] = {"tokens": be.tokens_dev, "positions": be.pos_dev}.get(kind) if kind != "state" \
                else be.states[n.attrs.key]
            continue
        if n.op == Op.WEIGHT:
            ctx.weights[n.out] = n.attrs.tensor   # resolved per use: raw / bf16 / f32 (be.weight)
            continue
        if n.op == Op.FETCH_WEIGHTS:
            # the fetched value is looked up by tensor name: the weight itself when resident, its
            # view in the layer's device slot when streamed (runtime/cuda/streaming.py)
            for i in range(n.attrs.n_weights):
                ctx.weights[n.value(i)] = ctx.weights[n.inputs[i]]
            if streamer is not None:
                out.append(streamer.step(ctx, n))   # host -> slot copy on the copy stream
                be.launch_nodes.append(n)
            continue
        if n.op == Op.RESHAPE:
            if n.inputs[0] in ctx.weights:
                ctx.weights[n.out] = ctx.weights[n.inputs[0]]
                continue
            src = ctx.v(n.inputs[0])
            try:
                ctx.vals[n.out] = strided_reshape(cp, src, ctx.shape(n.out))
            except GGFuseError:
                if src.dtype != np.float32:
                    raise GGFuseError(None, f"cuda: {n.name}: a bf16 activation cannot be re-viewed as "
                                            f"{ctx.shape(n.out)} without a copy (set GGFUSE_BF16_ACT=0)") from None
                # e.g. the attention gate: one half of each head's [q | gate] row, merged across heads
                dst = ctx.scratch_live(ctx.shape(n.out), src.dtype, step[n.id], last_use(be.graph, n.out, step))
                d = _dense()
                out.append(lambda src=src, dst=dst: d.copy(src, dst.reshape(src.shape), stream=ctx.stream))
                be.launch_nodes.append(n)
                ctx.vals[n.out] = dst
            continue
        if n.op == Op.SLICE:
            x = ctx.v(n.inputs[0])
            idx = [slice(None)] * x.ndim
            idx[n.attrs.axis % x.ndim] = slice(n.attrs.start, n.attrs.stop)
            ctx.vals[n.out] = x[tuple(idx)]
            continue
        if n.op == Op.CONCAT:
            # onto a KV cache: the chunk's rows are appended at P, here, where the graph reads them
            # (their buffer may be reused right after this step), and the value is the cache
            state = [v for v in n.inputs if be.graph.node(v.node).op == Op.INPUT]
            if len(state) != 1 or len(n.inputs) != 2 or n.inputs[0] != state[0]:
                raise GGFuseError(None, f"cuda: concat {n.name} is not a KV-cache append")
            cache, new = ctx.v(state[0]), ctx.v(n.inputs[1])
            d = _dense()
            # kv_append writes a k and a v; the same tensor twice appends it once (identical writes)
            out.append(lambda cache=cache, new=new: d.kv_append(new, new, cache, cache, be.past_dev, stream=ctx.stream))
            be.launch_nodes.append(n)
            ctx.vals[n.out] = cache
            continue
        # every other value lives in the arena (state outputs are bound by their launcher)
        for i, off in enumerate(n.meta.get("arena", [])):
            if off is not None:
                v = n.value(i)
                ctx.vals[v] = be.arena_view(n, i, cp.uint16 if v in bf16_vals else None)
        fn = _LAUNCHERS.get(n.op)
        if fn is None:
            raise GGFuseError(None, f"the cuda backend has no kernel for op {n.op.value} ({n.name})")
        if n.out == logits and n.op == Op.MATMUL:
            # the LM head runs outside the chunk's graph: every row when the caller wants every
            # position's logits, one row (the last valid token) for time-to-first-token, none
            # for the other chunks of a long prompt
            be.head_all = _HeadAll(ctx, n)
            be.head_last = [_lm_head_last(ctx, n)]
            be.head_node = n
            continue
        if n.out == logits:   # logits from another op: computed inside the chunk, into scratch
            ctx.vals[n.out] = ctx.scratch("logits", ctx.shape(n.out), np.float32)
        if streamer is not None:
            # the first reader of a streamed layer's experts waits for their copy first
            chains = [fetch_chain(be.graph, v) for v in n.inputs]
            for f in dict.fromkeys(x for c in chains for x in c):
                if f.id not in joined:
                    joined.add(f.id)
                    out.append(streamer.join(ctx, f))
                    be.launch_nodes.append(f)
        out.append(fn(ctx, n))
        be.launch_nodes.append(n)
    be.logits_view = ctx.vals.get(logits)
    return out


from ggfuse.runtime.cuda.workspace import HEAD_BLOCK  # noqa: E402  (rows per block of the all-rows LM head)


class _HeadAll:
    """Every valid row's logits, HEAD_BLOCK rows at a time through one scratch buffer, each
    block copied to the host: the [T, vocab] logits (2 GB at T=2048 for a 248k vocabulary)
    never need device memory of their own. Eager launches and a host copy per block: this
    path is for callers that want every position's logits, not for time-to-first-token."""

    def __init__(self, ctx, n):
        from ggfuse.kernels.gemm import launch as gemm
        self.gemm, self.ctx = gemm, ctx
        self.x = ctx.v(n.inputs[0])
        self.w, self.wtype, shape = _weight(ctx, n.inputs[1])
        self.N, self.K = shape[-2], shape[-1]
        self.a_dt = "f32" if self.x.dtype == np.float32 else "bf16"
        self.lda = self.x.strides[0] // self.x.itemsize
        self.rb = min(self.x.shape[0], getattr(ctx.be, "head_block", None) or HEAD_BLOCK)
        self.buf = ctx.scratch("logits_block", (self.rb, self.N), np.float32)
        if f32_precision(ctx.be):
            self.gemm = _QF32Head()
        else:
            gemm.prepare(self.a_dt, self.wtype)

    def __call__(self, n_rows: int) -> np.ndarray:
        cp, s = self.ctx.cp, self.ctx.stream
        out = np.empty((n_rows, self.N), dtype=np.float32)
        for b in range(0, n_rows, self.rb):
            m = min(self.rb, n_rows - b)
            self.gemm.gemm(self.x[b:b + m], self.a_dt, self.lda, self.w, self.wtype, self.N, self.K,
                           self.buf[:m], "f32", self.N, m, s)
            out[b:b + m] = cp.asnumpy(self.buf[:m], stream=s)
            s.synchronize()
        return out


def _lm_head_last(ctx, n):
    """logits of the chunk's last valid row only: a GEMV straight from the stored weight."""
    d = _dense()
    x = ctx.v(n.inputs[0])
    w, wtype, shape = _weight(ctx, n.inputs[1])
    N, K = shape[-2], shape[-1]
    y = ctx.scratch("lm_head.last", (1, N), np.float32)
    ctx.be.logits_last_view = y
    return lambda: d.gemv(x, w, wtype, N, K, y, nvalid=ctx.be.nvalid_dev, stream=ctx.stream)


# ---- dense ----------------------------------------------------------------------------------

def _dense():
    from ggfuse.kernels.dense import launch
    return launch


def _weight(ctx, value):
    """(array, kernel weight type name, numpy shape) of a matmul / expert weight."""
    arr, fmt, gt, shape = ctx.be.weight(ctx.weights[value], "gemm")
    return arr, ("bf16" if fmt == "bf16" else gt.lower()), shape


def _f32(ctx, value):
    """A weight read elementwise (norm weights, conv taps, gate vectors) as float32, in the
    shape the graph gives it."""
    arr = ctx.be.weight(ctx.weights[value], "f32")[0]
    return arr.reshape(ctx.shape(value))


def _in(ctx, value):
    """An op input: an activation, or a weight read elementwise."""
    return _f32(ctx, value) if value in ctx.weights else ctx.v(value)


@launcher(Op.GET_ROWS)
def _get_rows(ctx, n):
    d = _dense()
    name = ctx.weights[n.inputs[0]]
    raw, fmt, gt, shape = ctx.be.weight(name, "rows")
    ids, out = ctx.v(n.inputs[1]), ctx.v(n.out)
    emb = getattr(ctx.be, "embedding", None)
    if emb is not None and emb.name == name:
        # gathered on the host (runtime/cuda/backend.py HostEmbedding): row i is position i's
        ids = emb.ids[:ids.shape[0]]
    return lambda: d.get_rows(raw, gt, shape[1], ids, out, stream=ctx.stream)


def _gemm_call(ctx, a, w_value, c, *, accumulate=False):
    from ggfuse.kernels.gemm import launch as gemm
    w, wtype, shape = _weight(ctx, w_value)
    N, K = shape[-2], shape[-1]
    a2 = a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else a
    c2 = c.reshape(-1, c.shape[-1]) if c.flags.c_contiguous else c
    M = a2.shape[0]
    a_dt = "f32" if a2.dtype == np.float32 else "bf16"
    c_dt = "f32" if c2.dtype == np.float32 else "bf16"
    lda = a2.strides[0] // a2.itemsize
    ldc = c2.strides[0] // c2.itemsize
    from ggfuse.kernels.gemm import blas
    if blas.usable(a_dt, gemm.weight_name(wtype)):
        # bf16 x bf16 (dense matrices the runtime dequantised): cuBLAS, capturable (kernels/gemm/blas.py)
        return lambda: blas.gemm_bf16(a2, lda, w, N, K, c2, c_dt, ldc, M, ctx.stream, accumulate=accumulate)
    gemm.prepare(a_dt, wtype)
    return lambda: gemm.gemm(a2, a_dt, lda, w, wtype, N, K, c2, c_dt, ldc, M, ctx.stream, accumulate=accumulate)


@launcher(Op.MATMUL)
def _matmul(ctx, n):
    if f32_precision(ctx.be):
        return _matmul_f32(ctx, n)
    return _gemm_call(ctx, ctx.v(n.inputs[0]), n.inputs[1], ctx.v(n.out))


@launcher(Op.FFN_SWIGLU)
def _ffn_swiglu(ctx, n):
    if f32_precision(ctx.be):
        return _ffn_swiglu_f32(ctx, n)
    from ggfuse.kernels.gemm import launch as gemm
    x = ctx.v(n.inputs[0])
    wg, tg, sg = _weight(ctx, n.inputs[1])
    wu, tu, _ = _weight(ctx, n.inputs[2])
    out = ctx.v(n.out)
    M, K = x.shape
    F = sg[0]
    if tg != tu:
        raise GGFuseError(None, f"cuda: ffn_swiglu {n.name}: gate {tg} and up {tu} weights differ in type")
    a_dt = "f32" if x.dtype == np.float32 else "bf16"
    gemm.prepare(a_dt, tg)
    return lambda: gemm.gemm_swiglu(x, a_dt, x.strides[0] // x.itemsize, wg, wu, tg, F, K, out, "f32", F, M, ctx.stream)


@launcher(Op.RMS_NORM)
def _rms_norm(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    w = _in(ctx, n.inputs[1]) if len(n.inputs) > 1 else None
    return lambda: d.rms_norm(x, w, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher(Op.ADD_RMS_NORM)
def _add_rms_norm(ctx, n):
    d = _dense()
    a, b, w = (_in(ctx, v) for v in n.inputs)
    on, osum = ctx.v(n.value(0)), ctx.v(n.value(1))
    return lambda: d.add_rms_norm(a, b, w, on, osum, eps=n.attrs.eps, stream=ctx.stream)


@launcher(Op.L2_NORM)
def _l2_norm(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.l2_norm(x, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher(Op.GATED_RMS_NORM)
def _gated_rms_norm(ctx, n):
    d = _dense()
    o, w, z = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.gated_rms_norm(o, w, z, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher(Op.NORM_ROPE)
def _norm_rope(ctx, n):
    d = _dense()
    x, w, pos = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    a = n.attrs
    return lambda: d.norm_rope(x, w, pos, out, eps=a.eps, n_dims=a.n_dims, freq_base=a.freq_base,
                               freq_scale=a.freq_scale, mode=a.mode, stream=ctx.stream)


@launcher(Op.SIGMOID_MUL)
def _sigmoid_mul(ctx, n):
    d = _dense()
    x, g = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.sigmoid_mul(x, g, out, stream=ctx.stream)


@launcher(Op.ADD)
def _add(ctx, n):
    d = _dense()
    a, b = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.add(a, b, out, stream=ctx.stream)


@launcher(Op.MUL)
def _mul(ctx, n):
    d = _dense()
    a, b = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.mul(a, b, out, stream=ctx.stream)


# ---- recurrent ------------------------------------------------------------------------------

@launcher(Op.SSM_CONV_SILU)
def _ssm_conv_silu(ctx, n):
    d = _dense()
    x, state, w = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.value(0))
    ctx.vals[n.value(1)] = state   # the window is updated in place
    nv = ctx.be.nvalid_dev
    return lambda: d.ssm_conv_silu(x, state, w, out, nv, stream=ctx.stream)


@launcher(Op.DELTANET_GATES)
def _deltanet_gates(ctx, n):
    d = _dense()
    alpha, beta_lin, dtb, ssm_a = (_in(ctx, v) for v in n.inputs)
    g_out, b_out = ctx.v(n.value(0)), ctx.v(n.value(1))
    nv = ctx.be.nvalid_dev
    return lambda: d.deltanet_gates(alpha, beta_lin, dtb, ssm_a, g_out, b_out, nv, stream=ctx.stream)


@launcher(Op.CHUNK_GATED_DELTA_RULE)
def _chunk_gdr(ctx, n):
    from ggfuse.kernels.deltanet import launch as dn
    q, k, v, g, beta, state = (ctx.v(x) for x in n.inputs)
    out = ctx.v(n.value(0))
    ctx.vals[n.value(1)] = state   # final state written in place
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    if q.strides != k.strides or q.strides[1] != K * q.itemsize:
        raise GGFuseError(None, f"cuda: {n.name}: q and k must share a row layout")
    if not dn.chunked_supported(K, V) or f32_precision(ctx.be):   # exact f32 token recurrence
        return lambda: dn.gated_delta_rule_recurrent(q, k, v, g, beta, state, out, n.attrs.scale,
                                                     n.attrs.head_map, stream=ctx.stream)
    in_dt = "f32" if q.dtype == np.float32 else "bf16"
    ws = ctx.scratch("deltanet_ws", (dn.workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=in_dt),), np.uint8)
    item = q.itemsize
    out_dt = "f32" if out.dtype == np.float32 else "bf16"
    dn.prepare(K, V)
    # the kernels take base arrays plus element offsets: the views themselves are the bases
    return lambda: dn.chunk_gated_delta_rule(q, k, v, q.strides[0] // item, 0, 0, v.strides[0] // v.itemsize, 0,
                                             g, beta, state, out, out_dt, T, Hk, Hv, K, V, n.attrs.scale,
                                             n.attrs.head_map, ws, ctx.stream)


# ---- attention ------------------------------------------------------------------------------

@launcher(Op.ATTENTION)
def _attention(ctx, n):
    from ggfuse.kernels.attention import launch as fa
    q = ctx.v(n.inputs[0])
    k_cache, v_cache = ctx.v(n.inputs[1]), ctx.v(n.inputs[2])   # the chunk's K/V already appended
    out = ctx.v(n.out)
    T, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[2]
    be = ctx.be
    q_dt = "f32" if q.dtype == np.float32 else "bf16"
    fa.prepare(D, q_dt, out.dtype)

    def run():
        fa.flash_attn_prefill(q, q_dt, q.strides[0] // q.itemsize, q.strides[1] // q.itemsize, k_cache, v_cache,
                              out, T, Hq, Hkv, D, Dv, n.attrs.scale, be.past_dev, be.nvalid_dev, stream=ctx.stream)
    return run


# ---- mixture of experts ---------------------------------------------------------------------

@launcher(Op.MOE_ROUTE)
def _moe_route(ctx, n):
    from ggfuse.kernels.moe import launch as moe
    d = _dense()
    x = ctx.v(n.inputs[0])
    w_router = n.inputs[1]
    T = x.shape[0]
    E = ctx.t(w_router).shape[0]
    logits = ctx.scratch("router_logits", (T, E), np.float32)
    w_f32 = _f32(ctx, w_router)
    # f32-accurate logits (llama.cpp multiplies f32 routers in f32; bf16 flips near-tied experts):
    # tensor cores on split f16 halves (kernels/dense/router_gemm.cu); GGFUSE_ROUTER=f32simt: the
    # CUDA-core f32 GEMM, =bf16x3: bf16 halves
    mode = os.environ.get("GGFUSE_ROUTER", "f16x3")
    if mode == "f32simt" or x.shape[1] % 32 or w_f32.data.ptr % 16:
        router = lambda: d.gemm_f32(x, w_f32, logits, stream=ctx.stream)  # noqa: E731
    else:
        split = "bf16" if mode == "bf16x3" else "f16"
        router = lambda: d.router_gemm(x, w_f32, logits, split=split, stream=ctx.stream)  # noqa: E731
    ids, weights, slots, offsets = (ctx.v(n.value(i)) for i in range(4))
    a = n.attrs
    be = ctx.be
    shexp = None
    if len(n.inputs) > 2:
        wsh = _f32(ctx, n.inputs[2]).reshape(-1)
        shexp = (wsh, ctx.v(n.value(4)))
    scratch = ctx.scratch("moe_route_scratch", (moe.route_scratch_ints(T, a.k, E),), np.int32)

    def run():
        router()
        moe.moe_route(logits, T, E, a.k, a.norm, a.scale, a.tile, be.nvalid_dev, ids, weights, slots, offsets,
                      scratch, ctx.stream, gating=a.gating)
        if shexp is not None:
            d.rowdot_sigmoid(x, shexp[0], shexp[1], stream=ctx.stream)
    return run


def _moe_operands(ctx, n):
    """The MOE_GROUPED_GEMM node's operands, resolved: x, routing (weights, slots, offsets),
    the experts (gate and up, or the merged gate_up with up None; down) and, with a shared
    expert, its three weights and gate; T, D, k, E, F, S."""
    from types import SimpleNamespace
    a = n.attrs
    x, weights, slots, offsets = (ctx.v(v) for v in n.inputs[:4])
    i = 4
    wg, tg, sg = _weight(ctx, n.inputs[i])
    if a.merged_gate_up:
        wu, F = None, sg[1] // 2
        i += 1
    else:
        wu, tu, _ = _weight(ctx, n.inputs[i + 1])
        F = sg[1]
        i += 2
        if tu != tg:
            raise GGFuseError(None, f"cuda: {n.name}: gate ({tg}) and up ({tu}) experts differ in type")
    wd, td, _ = _weight(ctx, n.inputs[i])
    i += 1
    shared = None
    if a.shared:
        wgs, tgs, sgs = _weight(ctx, n.inputs[i])
        wus, _, _ = _weight(ctx, n.inputs[i + 1])
        wds, tds, _ = _weight(ctx, n.inputs[i + 2])
        shared = SimpleNamespace(wg=wgs, wu=wus, tg=tgs, wd=wds, td=tds, F=sgs[0],
                                 gate=ctx.v(n.inputs[i + 3]).reshape(-1))
    T, D = x.shape
    E = sg[0]
    tab_gu, tab_d = _expert_tables(ctx, n, wg, wu, tg, wd, E, F, D)
    return SimpleNamespace(x=x, weights=weights, slots=slots, offsets=offsets, wg=wg, wu=wu, tg=tg, wd=wd, td=td,
                           E=E, F=F, T=T, D=D, k=weights.shape[1], S=slots.shape[0], out=ctx.v(n.out),
                           shared=shared, tab_gu=tab_gu, tab_d=tab_d)


def _expert_tables(ctx, n, wg, wu, tg, wd, E: int, F: int, D: int):
    """Device expert tables (kernels/moe/table.py) for a layer whose experts are split between
    resident memory and a streaming slot (runtime/cuda/streaming.py binds such a tensor to an
    ExpertTable): (gate_up [2E], down [E]), each None where the weight is one contiguous stack.
    Built here, before any capture, once per backend (the addresses never change)."""
    from ggfuse.kernels.gemm import launch as gl
    from ggfuse.kernels.moe import table
    from ggfuse.kernels.quant.types import qtype
    tabs = ctx.be.buf.tables
    gu = d = None
    if isinstance(wg, table.ExpertTable) or isinstance(wu, table.ExpertTable):
        key = (n.name, "gate_up")
        if key not in tabs:
            rb = qtype(gl.weight_name(tg)).row_bytes(D)
            tabs[key] = table.device_table(ctx.be.cp, table.gate_up_pointers(wg, wu, E, F * rb))
        gu = tabs[key]
    if isinstance(wd, table.ExpertTable):
        key = (n.name, "down")
        if key not in tabs:
            tabs[key] = table.device_table(ctx.be.cp, table.pointers(wd, E))
        d = tabs[key]
    return gu, d


@launcher(Op.MOE_GROUPED_GEMM)
def _moe_grouped_gemm(ctx, n):
    if f32_precision(ctx.be):
        return _moe_grouped_f32(ctx, n)
    from ggfuse.kernels.gemm import launch as gemm
    from ggfuse.kernels.moe import launch as moe
    d = _dense()
    o = _moe_operands(ctx, n)
    h = ctx.scratch("moe_h", (o.S, o.F), np.uint16)
    x, x_dt = o.x, ("f32" if o.x.dtype == np.float32 else "bf16")
    # x stays f32 for the f32-accurate router (MOE_ROUTE reads it too, so bf16_activations keeps
    # it f32); the expert GEMMs round it to bf16 anyway, so a bf16 copy first gives bit-identical
    # results while they take the bf16-A path (on sm_90 the wide tiles; no f32 conversion in the
    # producers). GGFUSE_MOE_XBF16=0: read x as f32.
    x_copy = None
    if x_dt == "f32" and os.environ.get("GGFUSE_MOE_XBF16", "1") != "0":
        x_copy = ctx.scratch("moe_x_bf16", (o.T, o.D), np.uint16)
        x, x_dt = x_copy, "bf16"
    moe.prepare(x_dt, o.tg, o.td)
    sh = o.shared
    if sh is not None:
        hs = ctx.scratch("moe_hs", (o.T, sh.F), np.uint16)
        ys = ctx.scratch("moe_ys", (o.T, o.D), np.float32)
        gemm.prepare(x_dt, sh.tg)
        gemm.prepare("bf16", sh.td)
    ldx = x.strides[0] // x.itemsize

    def run():
        s = ctx.stream
        if x_copy is not None:
            d.copy(o.x, x_copy, stream=s)
        moe.moe_gate_up(x, x_dt, o.wg, o.wu, o.tg, o.E, o.F, o.D, o.slots, o.offsets, o.k, h, s, ldx=ldx,
                        wtab=o.tab_gu)
        moe.moe_down(h, o.wd, o.td, o.E, o.D, o.F, o.slots, o.offsets, o.weights, o.k, o.out, s, zero_out=True,
                     wtab=o.tab_d)
        if sh is not None:
            gemm.gemm_swiglu(x, x_dt, ldx, sh.wg, sh.wu, sh.tg, sh.F, o.D, hs, "bf16", sh.F, o.T, s)
            gemm.gemm(hs, "bf16", sh.F, sh.wd, sh.td, o.D, sh.F, ys, "f32", o.D, o.T, s)
            d.axpy_rows(o.out, ys, sh.gate, stream=s)
    return run


# ---- precision="f32" ---------------------------------------------------------------------------
#
# The default kernels round every GEMM operand to bf16 (tensor cores). precision="f32" (load(...,
# precision="f32"), `ggfuse run --precision f32`, GGFUSE_PRECISION) makes the results f32-faithful
# where that matters (tests/precision_emulation.py: bf16 GEMM operands flip near-tied MoE experts
# of the test fixtures; bf16 attention and delta-rule operands move logits by <= 4e-3 of max):
# every GEMM (dense, SwiGLU, routed and shared experts, LM head) multiplies f32 activations by the
# weight as the GGUF stores it, dequantised in f32 (kernels/dense/gemm_qf32.cu,
# kernels/moe/grouped_f32.cu), and the delta rule runs the exact f32 token recurrence. Attention
# keeps its bf16 KV cache and tensor cores. A verification mode: slower, not tuned.

def f32_precision(be) -> bool:
    return getattr(be, "precision", "bf16") == "f32"


def _rows2d(a):
    return a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else a


def _matmul_f32(ctx, n):
    from ggfuse.kernels.dense import qf32
    w, wtype, shape = _weight(ctx, n.inputs[1])
    N, K = shape[-2], shape[-1]
    a2, c2 = _rows2d(ctx.v(n.inputs[0])), _rows2d(ctx.v(n.out))
    return lambda: qf32.gemm_qf32(a2, w, wtype, N, K, c2, stream=ctx.stream)


def _ffn_swiglu_f32(ctx, n):
    from ggfuse.kernels.dense import qf32
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    wg, tg, sg = _weight(ctx, n.inputs[1])
    wu, tu, _ = _weight(ctx, n.inputs[2])
    if tg != tu:
        raise GGFuseError(None, f"cuda: ffn_swiglu {n.name}: gate {tg} and up {tu} weights differ in type")
    F, K = sg[0], sg[1]
    return lambda: qf32.gemm_swiglu_qf32(x, wg, wu, tg, F, K, out, stream=ctx.stream)


class _QF32Head:
    """The all-rows LM head's GEMM call (kernels/gemm/launch.py gemm's argument order) on the
    f32 kernel."""

    def gemm(self, a, a_dt, lda, w, wtype, N, K, c, c_dt, ldc, M, stream):
        from ggfuse.kernels.dense import qf32
        qf32.gemm_qf32(a, w, wtype, N, K, c, M, stream=stream)


def _moe_grouped_f32(ctx, n):
    from ggfuse.kernels.dense import qf32
    from ggfuse.kernels.moe import launch_f32 as moe32
    d = _dense()
    o = _moe_operands(ctx, n)
    h = ctx.scratch("moe_h_f32", (o.S, o.F), np.float32)
    y = ctx.scratch("moe_y_f32", (o.T * o.k, o.D), np.float32)
    sh = o.shared
    if sh is not None:
        hs = ctx.scratch("moe_hs_f32", (o.T, sh.F), np.float32)
        ys = ctx.scratch("moe_ys", (o.T, o.D), np.float32)

    def run():
        s = ctx.stream
        moe32.moe_experts_f32(o.x, o.wg, o.wu, o.tg, o.wd, o.td, o.E, o.F, o.D, o.slots, o.offsets, o.weights,
                              h, y, o.out, tile=n.attrs.tile, stream=s, wtab_gate_up=o.tab_gu,
                              wtab_down=o.tab_d)
        if sh is not None:
            qf32.gemm_swiglu_qf32(o.x, sh.wg, sh.wu, sh.tg, sh.F, o.D, hs, stream=s)
            qf32.gemm_qf32(hs, sh.wd, sh.td, o.D, sh.F, ys, stream=s)
            d.axpy_rows(o.out, ys, sh.gate, stream=s)
    return run
