"""The schedule as bound kernel launches: a lookup from each node's kernel record (the plan's
meta["kernel"], written by passes/lower_cuda.py) to a launcher that turns the node into a closure
launching exactly that kernel and variant on the backend's compute stream, with every pointer
fixed at build time. Nothing here chooses: a record the runtime cannot follow is an error.

Values without work are views: a SLICE, and a RESHAPE the plan made a view, are CuPy views of
their input (kernels accept row strides; kernels/layout.py gives the strides, as it gave the
lowering); KV_APPEND's value is the cache itself (its launch appends the chunk's rows first);
FETCH_WEIGHTS of resident experts is the weight itself, of streamed experts a copy into the
layer's device slot plus a wait before the first reader (runtime/cuda/streaming.py).
"""
from __future__ import annotations

import numpy as np

from ggfuse.errors import GGFuseError, PlanError
from ggfuse.ir.ops import Op
from ggfuse.ir.ops_fused_moe import moe_operands
from ggfuse.ir.types import shape_eval
from ggfuse.kernels import layout
from ggfuse.runtime.cuda.streaming import fetch_chain

_LAUNCHERS = {}


def launcher(*names):
    """Register a launcher for kernel records named `names`."""
    def deco(fn):
        for name in names:
            _LAUNCHERS[name] = fn
        return fn
    return deco


class Ctx:
    """What a launcher needs: the backend, value lookup, the node's record and workspace."""

    def __init__(self, be):
        self.be = be
        self.cp = be.cp
        self.g = be.graph
        self.key = str(be.chunk)
        self.vals = {}
        self.weights = {}      # Value -> GGUF tensor name (resolved per use: raw / bf16 / f32)

    @property
    def stream(self):
        return self.be.stream

    def v(self, value):
        return self.vals[value]

    def t(self, value):
        return self.g.type_of(value)

    def shape(self, value):
        return shape_eval(self.t(value).shape, {"T": self.be.chunk, "P": 0})

    @property
    def by_name(self) -> dict:
        if not hasattr(self, "_by_name"):
            self._by_name = {n.name: n for n in self.g.topo() if n.name}
        return self._by_name

    def ws(self, node, name: str, shape, dtype):
        """The node's workspace `name` in the arena (the plan placed it)."""
        return self.be.workspace_view(node, name, shape, dtype)

    def at(self, rec: dict) -> dict:
        """A kernel record's variant fields for this chunk size (its by_chunk entry)."""
        by = rec.get("by_chunk")
        if by is None:
            return {}
        try:
            return by[self.key]
        except KeyError:
            raise PlanError(None, f"kernel {rec.get('name')}: the plan has no variant for chunk {self.key}") from None


def _dt(a) -> str:
    return "f32" if a.dtype == np.float32 else "bf16"


def _expect(node, what: str, have: str, want: str) -> None:
    if have != want:
        raise PlanError(None, f"cuda: {node.name}: the plan says {what} {want}, the runtime has {have}; recompile the plan")


def view_as(cp, a, shape):
    """`a` (a CuPy view) re-viewed as `shape` without a copy, by kernels/layout.py's rule (the
    lowering's); None where only a copy can give it."""
    shape = tuple(int(d) for d in shape)
    item = a.itemsize
    st = layout.reshape_strides(a.shape, tuple(s // item for s in a.strides), shape)
    if st is None:
        return None
    if a.flags.c_contiguous:
        return a.reshape(shape)
    return cp.lib.stride_tricks.as_strided(a, shape=shape, strides=tuple(s * item for s in st))


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
    # weights first: a launch may read a weight whose node the schedule places after it (a
    # one-row product's group reads its members' matrices)
    for n in be.graph.by_op(Op.WEIGHT):
        ctx.weights[n.out] = n.attrs.tensor
    for n in be.graph.topo():
        if n.op == Op.INPUT:
            kind = n.attrs.kind
            ctx.vals[n.out] = {"tokens": be.tokens_dev, "positions": be.pos_dev}.get(kind) if kind != "state" \
                else be.states[n.attrs.key]
            continue
        if n.op == Op.WEIGHT:
            continue
        if n.op == Op.FETCH_WEIGHTS:
            # the fetched value is looked up by tensor name: the weight itself when resident, its
            # view in the layer's device slot when streamed (runtime/cuda/streaming.py)
            for i in range(n.attrs.n_weights):
                ctx.weights[n.value(i)] = ctx.weights[n.inputs[i]]
            if streamer is None:
                raise PlanError(None, f"cuda: {n.name}: a fetch step but no streamed experts")
            out.append(_for_target(be, streamer.step(ctx, n)))   # host -> slot copy on the copy stream
            be.launch_nodes.append(n)
            continue
        rec = n.meta.get("kernel")
        if rec is None:
            raise PlanError(None, f"cuda: {n.name or n.op.value} (%{n.id}) has no kernel record: the plan was not "
                                  f"lowered for a GPU; recompile it with --target")
        name = rec["name"]
        if n.op in (Op.RESHAPE, Op.SLICE) and name == "view":
            if n.inputs[0] in ctx.weights:
                ctx.weights[n.out] = ctx.weights[n.inputs[0]]
                continue
            x = ctx.v(n.inputs[0])
            if n.op == Op.SLICE:
                idx = [slice(None)] * x.ndim
                idx[n.attrs.axis % x.ndim] = slice(n.attrs.start, n.attrs.stop)
                ctx.vals[n.out] = x[tuple(idx)]
            else:
                v = view_as(cp, x, ctx.shape(n.out))
                if v is None:
                    raise PlanError(None, f"cuda: {n.name}: the plan says view, but {x.shape} with strides "
                                          f"{x.strides} cannot be viewed as {ctx.shape(n.out)}; recompile the plan")
                ctx.vals[n.out] = v
            continue
        # every other value lives in the arena (state outputs are bound by their launcher)
        for i, off in enumerate((n.meta.get("arena") or {}).get(ctx.key, [])):
            if off is not None:
                ctx.vals[n.value(i)] = be.arena_view(n, i)
        fn = _LAUNCHERS.get(name)
        if fn is None:
            raise PlanError(None, f"cuda: {n.name}: this runtime has no launcher for kernel {name!r}; "
                                  f"recompile the plan with this ggfuse")
        if n.op == Op.LM_HEAD:
            if n.out != logits:
                raise PlanError(None, f"cuda: {n.name}: an lm_head whose output is not the logits")
            # the LM head runs outside the chunk's graph: every row when the caller wants every
            # position's logits, one row (the last valid token) for time-to-first-token, none
            # for the other chunks of a long prompt
            fn(ctx, n)
            continue
        if streamer is not None:
            # the first reader of a streamed layer's experts waits for their copy first
            chains = [fetch_chain(be.graph, v) for v in n.inputs]
            for f in dict.fromkeys(x for c in chains for x in c):
                if f.id not in joined:
                    joined.add(f.id)
                    out.append(_for_target(be, streamer.join(ctx, f)))
                    be.launch_nodes.append(f)
        bound = fn(ctx, n)
        if bound is None:              # computed by another node's launch (a one-row product's group)
            continue
        out.append(_for_target(be, bound))
        be.launch_nodes.append(n)
    if be.head_last is None:
        raise PlanError(None, "cuda: the plan has no lm_head producing the logits")
    return out


def _for_target(be, fn):
    """fn, run with the kernels built for the plan's target (kernels/target.py): a launcher
    looks its kernel up when it runs (eagerly, or while being captured), so an sm_89 plan gets
    its sm_89 kernels wherever the launch is called from. HostSteps keep their type."""
    from ggfuse.runtime.cuda.streaming import HostStep
    spec = be.target
    if isinstance(fn, HostStep):
        inner = fn.fn
        fn.fn = lambda *a, **k: _call_for(spec, inner, a, k)
        return fn
    return _Bound(spec, fn)


def _call_for(spec, fn, a, k):
    from ggfuse.kernels.target import building_for
    with building_for(spec):
        return fn(*a, **k)


class _Bound:
    __slots__ = ("spec", "fn")

    def __init__(self, spec, fn):
        self.spec, self.fn = spec, fn

    def __call__(self, *a, **k):
        return _call_for(self.spec, self.fn, a, k)

    def __getattr__(self, name):          # e.g. _HeadAll.buf
        return getattr(self.fn, name)


# ---- helpers ------------------------------------------------------------------------------

def _dense():
    from ggfuse.kernels.dense import launch
    return launch


def _weight(ctx, value, form: str | None = None):
    """(array, kernel weight type name, numpy shape) of a matmul / expert weight: the GEMMs'
    form (bf16 where the plan dequantised it, else raw), or the one a record names (`form`: "bf16",
    or a GGUF type for the stored rows)."""
    role = "gemm" if form is None or form == "bf16" else "raw"
    arr, fmt, gt, shape = ctx.be.weight(ctx.weights[value], role)
    return arr, ("bf16" if fmt == "bf16" else gt.lower()), shape


def _f32(ctx, value):
    """A weight read elementwise (norm weights, conv taps, gate vectors) as float32, in the
    shape the graph gives it."""
    arr = ctx.be.weight(ctx.weights[value], "f32")[0]
    return arr.reshape(ctx.shape(value))


def _in(ctx, value):
    """An op input: an activation, or a weight read elementwise."""
    return _f32(ctx, value) if value in ctx.weights else ctx.v(value)


def _rows2d(a):
    return a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else a


def gemm_closure(ctx, node, rec: dict, a, w_value, c, *, accumulate: bool = False):
    """A dense GEMM C = A W^T as the record says: cuBLAS, our tensor-core kernel or the f32 one."""
    from ggfuse.kernels.gemm import launch as gemm
    w, wtype, shape = _weight(ctx, w_value)
    N, K = shape[-2], shape[-1]
    a2, c2 = _rows2d(a), _rows2d(c)
    M = a2.shape[0]
    name = rec["name"]
    if name == "qf32.gemm":
        from ggfuse.kernels.dense import qf32
        _expect(node, "weight", wtype, rec["w"])
        return lambda: qf32.gemm_qf32(a2, w, wtype, N, K, c2, M, accumulate=accumulate, stream=ctx.stream)
    _expect(node, "activation dtype", _dt(a2), rec["a"])
    _expect(node, "weight", wtype, rec["w"])
    c_dt = _dt(c2)
    lda, ldc = a2.strides[0] // a2.itemsize, c2.strides[0] // c2.itemsize
    if name == "cublas.gemm_bf16":
        from ggfuse.kernels.gemm import blas
        if not blas.usable("bf16", "bf16"):
            raise GGFuseError(None, f"cuda: the plan runs bf16 GEMMs through cuBLAS inside the captured graph, which "
                                    f"this machine cannot ({blas.unavailable()}); recompile with --dense-gemm ggfuse")
        return lambda: blas.gemm_bf16(a2, lda, w, N, K, c2, c_dt, ldc, M, ctx.stream, accumulate=accumulate)
    if name != "gemm.gemm":
        raise PlanError(None, f"cuda: {node.name}: {name!r} is not a dense GEMM kernel")
    kw = dict(impl=rec["impl"], persist=rec.get("persist", True), dequant=rec.get("dequant", "fast"))
    gemm.prepare(rec["a"], wtype, impl=kw["impl"], dequant=kw["dequant"])
    return lambda: gemm.gemm(a2, rec["a"], lda, w, wtype, N, K, c2, c_dt, ldc, M, ctx.stream,
                             accumulate=accumulate, **kw)


def swiglu_closure(ctx, node, rec: dict, x, wg_value, wu_value, out, out_dt: str):
    """silu(x Wg^T) * (x Wu^T) as the record says (our tensor-core kernel or the f32 one); the
    record's act "gelu": gelu(x Wg^T) * (x Wu^T) (Gemma's GELU GLU, a variant of the same kernels)."""
    from ggfuse.kernels.gemm import launch as gemm
    wg, tg, sg = _weight(ctx, wg_value)
    wu, tu, _ = _weight(ctx, wu_value)
    if tg != tu:
        raise GGFuseError(None, f"cuda: {node.name}: gate {tg} and up {tu} weights differ in type")
    F, K = sg[0], sg[1]
    M = x.shape[0]
    act = rec.get("act", "silu")
    if rec["name"] == "qf32.gemm_swiglu":
        from ggfuse.kernels.dense import qf32
        return lambda: qf32.gemm_swiglu_qf32(x, wg, wu, tg, F, K, out, act=act, stream=ctx.stream)
    _expect(node, "activation dtype", _dt(x), rec["a"])
    _expect(node, "weight", tg, rec["w"])
    kw = dict(impl=rec["impl"], persist=rec.get("persist", True), dequant=rec.get("dequant", "fast"), act=act)
    gemm.prepare(rec["a"], tg, impl=kw["impl"], dequant=kw["dequant"], act=act)
    ldx, ldo = x.strides[0] // x.itemsize, out.strides[0] // out.itemsize
    return lambda: gemm.gemm_swiglu(x, rec["a"], ldx, wg, wu, tg, F, K, out, out_dt, ldo, M, ctx.stream, **kw)


# ---- dense ----------------------------------------------------------------------------------

@launcher("gemm.gemm", "cublas.gemm_bf16", "qf32.gemm")
def _matmul(ctx, n):
    rec = n.meta["kernel"]
    at = ctx.at(rec)
    if at.get("impl") == "gemv":       # the decode step: one row, W read once (as stored, where kept)
        d = _dense()
        if at.get("in_group"):         # computed by its group's first launch (gemv_group)
            return None
        a, c = _rows2d(ctx.v(n.inputs[0])), _rows2d(ctx.v(n.out))
        want = at.get("w", rec["w"])   # (plans before 7.1: the GEMMs' form)
        w, wtype, shape = _weight(ctx, n.inputs[1], want)
        _expect(n, "weight", wtype, want)
        N, K = shape[-2], shape[-1]
        norm = None
        if at.get("norm"):             # its input's add_rms_norm runs in this launch (gemv_group norm=)
            a0, norm = _folded_norm(ctx, n, at["norm"])
            a = _rows2d(a0)
        if at.get("group") or norm is not None:
            mats = [(w, N, c)]
            for name in at.get("group", []):
                m = _partner(ctx, n, name, "in_group")
                if m.op != Op.MATMUL:
                    raise PlanError(None, f"cuda: {n.name}: its group names {name!r}, which is not a matmul")
                wm, tm, sm = _weight(ctx, m.inputs[1], want)
                _expect(m, "weight", tm, want)
                if sm[-1] != K or m.inputs[0] != n.inputs[0]:
                    raise PlanError(None, f"cuda: {m.name}: grouped with {n.name} but not on its input and K")
                mats.append((wm, sm[-2], _rows2d(ctx.be.arena_view(m, 0))))
            return lambda: d.gemv_group(a, mats, wtype, K, norm=norm, stream=ctx.stream)
        return lambda: d.gemv(a, w, wtype, N, K, c, M=a.shape[0], stream=ctx.stream)
    return gemm_closure(ctx, n, rec, ctx.v(n.inputs[0]), n.inputs[1], ctx.v(n.out))


def _folded_norm(ctx, n, name: str):
    """The add_rms_norm `name` of n's input that n's launch computes (by_chunk "norm"): its
    first operand and (b, w, eps, sum output, normed output), as gemv_group norm= and
    moe_route1 add_norm= take them."""
    m = _partner(ctx, n, name, "folded_into")
    if m.op != Op.ADD_RMS_NORM or m.value(0) != n.inputs[0]:
        raise PlanError(None, f"cuda: {n.name}: its norm {name!r} is not the add_rms_norm of its input")
    a, b, w = (_in(ctx, v) for v in m.inputs)
    return a, (b, w, m.attrs.eps, ctx.v(m.value(1)), ctx.v(m.value(0)))


def _partner(ctx, n, name: str, field: str):
    """The node `name` that n's record names (a one-row product's group, a delta rule's fold),
    whose record at this chunk size names n back in `field` ("in_group", "folded_into")."""
    m = ctx.by_name.get(name)
    if m is None or ctx.at(m.meta.get("kernel") or {}).get(field) != n.name:
        raise PlanError(None, f"cuda: {n.name}: its record names {name!r}, whose {field} does not name it back; "
                              f"recompile the plan")
    return m


@launcher("gemm.gemm_swiglu", "qf32.gemm_swiglu")
def _ffn_swiglu(ctx, n):
    return swiglu_closure(ctx, n, n.meta["kernel"], ctx.v(n.inputs[0]), n.inputs[1], n.inputs[2], ctx.v(n.out), "f32")


@launcher("lm_head")
def _lm_head(ctx, n):
    rec = n.meta["kernel"]
    be = ctx.be
    be.head_all = _for_target(ctx.be, _HeadAll(ctx, n, rec))
    be.head_last = [_for_target(ctx.be, _lm_head_last(ctx, n, rec["last"]))]
    be.head_node = n


class _HeadAll:
    """Every valid row's logits, block_rows rows at a time through the head's workspace block,
    each block copied to the host: the [T, vocab] logits (2 GB at T=2048 for a 248k
    vocabulary) never need device memory of their own. Eager launches and a host copy per
    block: this path is for callers that want every position's logits, not for time-to-first-token."""

    def __init__(self, ctx, n, rec):
        self.ctx = ctx
        x = ctx.v(n.inputs[0])
        N = ctx.t(n.inputs[1]).shape[0]
        self.rb = min(x.shape[0], int(rec["block_rows"]))
        self.x = x
        self.buf = ctx.ws(n, "block", (self.rb, N), np.float32)
        self.N = N
        self._rec, self._n = rec["all"], n
        self.cap = rec.get("softcap")

    def __call__(self, n_rows: int) -> np.ndarray:
        cp, s = self.ctx.cp, self.ctx.stream
        out = np.empty((n_rows, self.N), dtype=np.float32)
        for b in range(0, n_rows, self.rb):
            m = min(self.rb, n_rows - b)
            gemm_closure(self.ctx, self._n, self._rec, self.x[b:b + m], self._n.inputs[1], self.buf[:m])()
            if self.cap:
                _dense().softcap(self.buf[:m], self.buf[:m], self.cap, stream=s)
            out[b:b + m] = cp.asnumpy(self.buf[:m], stream=s)
            s.synchronize()
        return out


def _lm_head_last(ctx, n, rec):
    """logits of the chunk's last valid row only: a GEMV straight from the stored weight."""
    d = _dense()
    x = ctx.v(n.inputs[0])
    w, wtype, shape = _weight(ctx, n.inputs[1], rec["w"])
    _expect(n, "head weight", wtype, rec["w"])
    N, K = shape[-2], shape[-1]
    y = ctx.ws(n, "last", (1, N), np.float32)
    ctx.be.logits_last_view = y
    cap = n.meta["kernel"].get("softcap")
    if not cap:
        return lambda: d.gemv(x, w, wtype, N, K, y, nvalid=ctx.be.nvalid_dev, stream=ctx.stream)

    def run():
        d.gemv(x, w, wtype, N, K, y, nvalid=ctx.be.nvalid_dev, stream=ctx.stream)
        d.softcap(y, y, cap, stream=ctx.stream)
    return run


@launcher("dense.get_rows")
def _get_rows(ctx, n):
    d = _dense()
    name = ctx.weights[n.inputs[0]]
    raw, fmt, gt, shape = ctx.be.weight(name, "rows")
    ids, out = ctx.v(n.inputs[1]), ctx.v(n.out)
    if n.meta["kernel"].get("source") == "host":
        emb = ctx.be.embedding
        if emb is None or emb.name != name:
            raise PlanError(None, f"cuda: {n.name}: the plan gathers {name} on the host, the runtime does not")
        # gathered on the host (runtime/cuda/backend.py HostEmbedding): row i is position i's
        ids = emb.ids[:ids.shape[0]]
    return lambda: d.get_rows(raw, gt, shape[1], ids, out, stream=ctx.stream)


@launcher("dense.ple_gather")
def _ple_gather(ctx, n):
    # Gemma 4's per-layer embeddings: the token's row of the table, dequantised on the device
    d = _dense()
    name = ctx.weights[n.inputs[0]]
    raw, fmt, gt, shape = ctx.be.weight(name, "rows")
    ids, out = ctx.v(n.inputs[1]), ctx.v(n.out)
    _expect(n, "table type", gt.lower(), n.meta["kernel"]["w"])
    if n.meta["kernel"].get("source") == "host":
        rows = ctx.be.ple_rows
        if rows is None or rows.name != name:
            raise PlanError(None, f"cuda: {n.name}: the plan gathers {name} on the host, the runtime does not")
        # gathered on the host (runtime/cuda/backend.py HostEmbedding): row i is position i's
        ids = rows.ids[:ids.shape[0]]
    return lambda: d.ple_gather(raw, gt, ids, out, float(n.attrs.scale), stream=ctx.stream)


@launcher("dense.copy")
def _copy(ctx, n):
    d = _dense()
    src, dst = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.copy(src, dst.reshape(src.shape), stream=ctx.stream)


@launcher("dense.concat")
def _concat(ctx, n):
    d = _dense()
    out = ctx.v(n.out)
    ax = n.attrs.axis % out.ndim
    parts, off = [], 0
    for v in n.inputs:
        x = ctx.v(v)
        idx = [slice(None)] * out.ndim
        idx[ax] = slice(off, off + x.shape[ax])
        parts.append((x, out[tuple(idx)]))
        off += x.shape[ax]

    def run():
        for x, dst in parts:
            d.copy(x, dst, stream=ctx.stream)
    return run


@launcher("dense.kv_append")
def _kv_append(ctx, n):
    # the chunk's rows are appended at P, here, where the graph reads them (their buffer may be
    # reused right after this step), and the value is the cache
    d = _dense()
    cache, new = ctx.v(n.inputs[0]), ctx.v(n.inputs[1])
    ctx.vals[n.out] = cache
    be = ctx.be
    # kv_append writes a k and a v; the same tensor twice appends it once (identical writes)
    return lambda: d.kv_append(new, new, cache, cache, be.past_dev, stream=ctx.stream)


@launcher("dense.kv_ring_append")
def _kv_ring_append(ctx, n):
    # the ring is updated in place: the graph orders this after every reader of the ring (the
    # IR's `after` input), and the value is the ring
    d = _dense()
    ring, new = ctx.v(n.inputs[0]), ctx.v(n.inputs[1])
    if ring.shape[0] != n.meta["kernel"]["ring_rows"]:
        raise PlanError(None, f"cuda: {n.name}: the plan's ring has {n.meta['kernel']['ring_rows']} rows, "
                              f"the runtime's {ring.shape[0]}; recompile the plan")
    ctx.vals[n.out] = ring
    be = ctx.be
    return lambda: d.kv_ring_append(new, ring, be.past_dev, be.nvalid_dev, stream=ctx.stream)


@launcher("dense.rms_norm")
def _rms_norm(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    w = _in(ctx, n.inputs[1]) if len(n.inputs) > 1 else None
    return lambda: d.rms_norm(x, w, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher("dense.add_rms_norm")
def _add_rms_norm(ctx, n):
    d = _dense()
    if ctx.at(n.meta["kernel"]).get("folded_into"):      # the one-row launch after it does it (gemv_group norm=)
        return None
    a, b, w = (_in(ctx, v) for v in n.inputs)
    on, osum = ctx.v(n.value(0)), ctx.v(n.value(1))
    return lambda: d.add_rms_norm(a, b, w, on, osum, eps=n.attrs.eps, stream=ctx.stream)


@launcher("dense.l2_norm")
def _l2_norm(ctx, n):
    d = _dense()
    if ctx.at(n.meta["kernel"]).get("folded_into"):      # the decode delta rule does it (gdr_step_fused)
        return None
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.l2_norm(x, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher("dense.gated_rms_norm")
def _gated_rms_norm(ctx, n):
    d = _dense()
    o, w, z = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.gated_rms_norm(o, w, z, out, eps=n.attrs.eps, stream=ctx.stream)


@launcher("dense.norm_rope")
def _norm_rope(ctx, n):
    d = _dense()
    x, w, pos = (_in(ctx, v) for v in n.inputs[:3])
    ff = _in(ctx, n.inputs[3]).reshape(-1) if len(n.inputs) > 3 else None     # rope_freqs
    out = ctx.v(n.out)
    a = n.attrs
    return lambda: d.norm_rope(x, w, pos, out, eps=a.eps, n_dims=a.n_dims, freq_base=a.freq_base,
                               freq_scale=a.freq_scale, mode=a.mode, freq_factors=ff, stream=ctx.stream)


@launcher("dense.norm_add", "dense.norm_add_norm")
def _norm_add(ctx, n):
    # Gemma's post-norm residual, [* layer_output_scale], [the next block's RMSNorm]
    d = _dense()
    a = n.attrs
    if n.op == Op.NORM_ADD:
        x, w, r = (_in(ctx, v) for v in n.inputs[:3])
        s = _in(ctx, n.inputs[3]).reshape(-1) if len(n.inputs) > 3 else None
        total = ctx.v(n.out)
        return lambda: d.norm_add(x, w, r, total, scale=s, eps=a.eps, stream=ctx.stream)
    x, w, r, w_next = (_in(ctx, v) for v in n.inputs[:4])
    s = _in(ctx, n.inputs[4]).reshape(-1) if len(n.inputs) > 4 else None
    normed, total = ctx.v(n.value(0)), ctx.v(n.value(1))
    return lambda: d.norm_add(x, w, r, total, scale=s, w_next=w_next, out_norm=normed, eps=a.eps,
                              eps_next=a.eps_next, stream=ctx.stream)


@launcher("dense.scale")
def _scale(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.scale(x, out, float(n.attrs.factor), stream=ctx.stream)


@launcher("dense.gelu")
def _gelu(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.gelu(x, out, stream=ctx.stream)


@launcher("dense.gelu_mul")
def _gelu_mul(ctx, n):
    d = _dense()
    x, y = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.gelu_mul(x, y, out, stream=ctx.stream)


@launcher("dense.softcap")
def _softcap(ctx, n):
    d = _dense()
    x, out = ctx.v(n.inputs[0]), ctx.v(n.out)
    return lambda: d.softcap(x, out, float(n.attrs.cap), stream=ctx.stream)


@launcher("dense.sigmoid_mul")
def _sigmoid_mul(ctx, n):
    d = _dense()
    x, g = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.sigmoid_mul(x, g, out, stream=ctx.stream)


@launcher("dense.add")
def _add(ctx, n):
    d = _dense()
    a, b = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.add(a, b, out, stream=ctx.stream)


@launcher("dense.mul")
def _mul(ctx, n):
    d = _dense()
    a, b = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.out)
    return lambda: d.mul(a, b, out, stream=ctx.stream)


# ---- recurrent ------------------------------------------------------------------------------

@launcher("dense.ssm_conv_silu")
def _ssm_conv_silu(ctx, n):
    d = _dense()
    x, state, w = (_in(ctx, v) for v in n.inputs)
    out = ctx.v(n.value(0))
    ctx.vals[n.value(1)] = state   # the window is updated in place
    nv = ctx.be.nvalid_dev
    return lambda: d.ssm_conv_silu(x, state, w, out, nv, stream=ctx.stream)


@launcher("dense.deltanet_gates")
def _deltanet_gates(ctx, n):
    d = _dense()
    if ctx.at(n.meta["kernel"]).get("folded_into"):
        return None
    alpha, beta_lin, dtb, ssm_a = (_in(ctx, v) for v in n.inputs)
    g_out, b_out = ctx.v(n.value(0)), ctx.v(n.value(1))
    nv = ctx.be.nvalid_dev
    return lambda: d.deltanet_gates(alpha, beta_lin, dtb, ssm_a, g_out, b_out, nv, stream=ctx.stream)


@launcher("deltanet.chunk", "deltanet.recurrent")
def _chunk_gdr(ctx, n):
    from ggfuse.kernels.deltanet import launch as dn
    rec = n.meta["kernel"]
    q, k, v, g, beta, state = (ctx.v(x) for x in n.inputs)
    out = ctx.v(n.value(0))
    ctx.vals[n.value(1)] = state   # final state written in place
    T, Hk, K = q.shape
    Hv, V = v.shape[1], v.shape[2]
    if q.strides != k.strides or q.strides[1] != K * q.itemsize:
        raise GGFuseError(None, f"cuda: {n.name}: q and k must share a row layout")
    if rec["name"] == "deltanet.recurrent" or ctx.at(rec).get("impl") == "recurrent":
        # the exact f32 token recurrence (also the decode step of the chunked path's operands)
        if rec["name"] == "deltanet.chunk":
            _expect(n, "input dtype", _dt(q), rec["in"])
        fold = ctx.at(rec).get("fold")
        if fold:
            # the l2 norms of q and k and the gates, in the step kernel (gdr_step_fused)
            lq, lk, gates = (_partner(ctx, n, fold[x], "folded_into") for x in ("q", "k", "gates"))
            if (lq.out, lk.out, gates.value(0), gates.value(1)) != tuple(n.inputs[:2]) + tuple(n.inputs[3:5]):
                raise PlanError(None, f"cuda: {n.name}: its fold names steps that are not its q, k and gates")
            qr, kr = ctx.v(lq.inputs[0]), ctx.v(lk.inputs[0])
            alpha, beta_lin, dtb, ssm_a = (_in(ctx, x) for x in gates.inputs)
            return lambda: dn.gdr_step_fused(qr, kr, v, state, out, n.attrs.scale, n.attrs.head_map,
                                             eps_q=float(lq.attrs.eps), eps_k=float(lk.attrs.eps), alpha=alpha,
                                             beta_lin=beta_lin, dt_bias=dtb.reshape(-1), ssm_a=ssm_a.reshape(-1),
                                             n_valid=ctx.be.nvalid_dev, stream=ctx.stream)
        # the kernel family the plan names for this chunk size (plans before 8.0: by shape)
        kern = ctx.at(rec).get("kernel", "auto")
        return lambda: dn.gated_delta_rule_recurrent(q, k, v, g, beta, state, out, n.attrs.scale,
                                                     n.attrs.head_map, stream=ctx.stream, kernel=kern)
    in_dt = _dt(q)
    _expect(n, "input dtype", in_dt, rec["in"])
    ws = ctx.ws(n, "ws", (dn.workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype=in_dt),), np.uint8)
    item = q.itemsize
    out_dt = _dt(out)
    dn.prepare(K, V, rec.get("v_block"))
    # the kernels take base arrays plus element offsets: the views themselves are the bases
    return lambda: dn.chunk_gated_delta_rule(q, k, v, q.strides[0] // item, 0, 0, v.strides[0] // v.itemsize, 0,
                                             g, beta, state, out, out_dt, T, Hk, Hv, K, V, n.attrs.scale,
                                             n.attrs.head_map, ws, ctx.stream)


# ---- attention ------------------------------------------------------------------------------

@launcher("attention.flash_prefill")
def _attention(ctx, n):
    from ggfuse.kernels.attention import launch as fa
    q = ctx.v(n.inputs[0])
    k_cache, v_cache = ctx.v(n.inputs[1]), ctx.v(n.inputs[2])   # the chunk's K/V already appended
    out = ctx.v(n.out)
    T, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[2]
    be = ctx.be
    q_dt = _dt(q)
    _expect(n, "q dtype", q_dt, n.meta["kernel"]["q"])
    split = _decode_split(ctx, n, q, q_dt, k_cache, v_cache, out, Hq, Hkv, D, Dv)
    if split is not None:
        return split
    fa.prepare(D, q_dt, out.dtype)

    def run():
        fa.flash_attn_prefill(q, q_dt, q.strides[0] // q.itemsize, q.strides[1] // q.itemsize, k_cache, v_cache,
                              out, T, Hq, Hkv, D, Dv, n.attrs.scale, be.past_dev, be.nvalid_dev, stream=ctx.stream)
    return run


def _decode_split(ctx, n, q, q_dt, k_cache, v_cache, out, Hq, Hkv, D, Dv):
    """The one-token step's key-split attention where the plan names it for this chunk size
    (by_chunk impl "split", passes/lower_cuda.py decode_attention), else None."""
    at = ctx.at(n.meta["kernel"])
    if at.get("impl") != "split":
        return None
    from ggfuse.kernels.attention import launch as fa
    T = q.shape[0]
    if T != 1 or D != Dv:
        raise PlanError(None, f"cuda: {n.name}: the plan splits the keys of a {T}-row chunk (only the one-token step)")
    splits = int(at["splits"])
    ws = ctx.ws(n, "split", (fa.decode_workspace_bytes(Hq, D, splits),), np.uint8)
    be = ctx.be
    q_sh = q.strides[1] // q.itemsize
    scale = float(n.attrs.scale)
    return lambda: fa.decode_attn(q, q_dt, q_sh, k_cache, v_cache, out, Hq, Hkv, D, scale, splits, ws,
                                  be.past_dev, be.nvalid_dev, stream=ctx.stream)


@launcher("attention.window")
def _attention_window(ctx, n):
    # CUDA-core attention (kernels/attention/window_attn.cu): a sliding layer over its ring
    # (ATTENTION_WINDOW: the chunk's own k, v plus the ring before the chunk; KV-shared layers
    # get the same values), or ATTENTION over the cache at a head dim the tensor cores lack
    from ggfuse.kernels.attention import launch as fa
    rec = n.meta["kernel"]
    q = ctx.v(n.inputs[0])
    out = ctx.v(n.out)
    T, Hq, D = q.shape
    q_dt = _dt(q)
    _expect(n, "q dtype", q_dt, rec["q"])
    be = ctx.be
    if n.op == Op.ATTENTION_WINDOW:
        k, v, k_ring, v_ring = (ctx.v(x) for x in n.inputs[1:])
        R, window = int(rec["ring_rows"]), int(rec["window"])
        if k_ring.shape[0] != R:
            raise PlanError(None, f"cuda: {n.name}: the plan's ring has {R} rows, the runtime's {k_ring.shape[0]}")
    else:
        k, v = None, None
        k_ring, v_ring = ctx.v(n.inputs[1]), ctx.v(n.inputs[2])     # the caches, the chunk appended
        R, window = 0, 0
        split = _decode_split(ctx, n, q, q_dt, k_ring, v_ring, out, Hq, k_ring.shape[1], D, v_ring.shape[2])
        if split is not None:
            return split
    Hkv = k_ring.shape[1]
    return lambda: fa.window_attn(q, q_dt, k, v, k_ring, v_ring, out, T, Hq, Hkv, D, R, window, float(n.attrs.scale),
                                  be.past_dev, be.nvalid_dev, stream=ctx.stream)


# ---- mixture of experts ---------------------------------------------------------------------

@launcher("moe.route")
def _moe_route(ctx, n):
    from ggfuse.kernels.moe import launch as moe
    d = _dense()
    rec = n.meta["kernel"]
    x = ctx.v(n.inputs[0])
    w_router = n.inputs[1]
    T = x.shape[0]
    E = ctx.t(w_router).shape[0]
    a = n.attrs
    logits = ctx.ws(n, "router_logits", (T, E), np.float32)
    scratch = ctx.ws(n, "route_scratch", (moe.route_scratch_ints(T, a.k, E),), np.int32)
    w_f32 = _f32(ctx, w_router)
    # f32-accurate logits (llama.cpp multiplies f32 routers in f32; bf16 flips near-tied experts)
    if ctx.at(rec).get("router") == "gemv":
        D = ctx.t(w_router).shape[1]
        router = lambda: d.gemv(x, w_f32, "f32", E, D, logits, M=T, stream=ctx.stream)  # noqa: E731
    elif rec["router"] == "f32simt":
        router = lambda: d.gemm_f32(x, w_f32, logits, stream=ctx.stream)  # noqa: E731
    else:
        split = "bf16" if rec["router"] == "bf16x3" else "f16"
        tile = ctx.at(rec)["tile"]
        router = lambda: d.router_gemm(x, w_f32, logits, split=split, tile=tile, stream=ctx.stream)  # noqa: E731
    ids, weights, slots, offsets = (ctx.v(n.value(i)) for i in range(4))
    be = ctx.be
    shexp = None
    if rec.get("shared_gate"):
        wsh = _f32(ctx, n.inputs[2]).reshape(-1)
        shexp = (wsh, ctx.v(n.value(4)))
    # Gemma 4: each expert's output scale (ffn_down_exps.scale) folded into its slots' weights
    escale = _f32(ctx, n.inputs[-1]).reshape(-1) if rec.get("expert_scale") else None

    # the matrix-vector experts read each slot's expert from `slots`; no sorted layout
    slot_experts = ctx.at(rec).get("layout") == "slot_expert"
    if ctx.at(rec).get("router") == "fused":
        # one launch: router GEMV, shared gate, top-k (kernels/moe/route.cu moe_route1)
        if T != 1 or not slot_experts or escale is not None:
            raise PlanError(None, f"cuda: {n.name}: the fused router takes one token, the slot_expert layout "
                                  f"and no expert scale; recompile the plan")
        key = (n.name, "route1_counter", ctx.key)
        if key not in be.buf.tables:
            be.buf.tables[key] = ctx.cp.zeros(1, dtype=np.uint32)   # each launch leaves it 0
        counter = be.buf.tables[key]
        D = ctx.t(w_router).shape[1]
        wsh, sh_out = (shexp if shexp is not None else (None, None))
        add_norm = None
        if ctx.at(rec).get("norm"):     # its input's add_rms_norm runs in this launch (moe_route1 add_norm=)
            x, parts = _folded_norm(ctx, n, ctx.at(rec)["norm"])
            b0, w0, eps, osum, onorm = parts
            add_norm = (b0.reshape(-1), w0.reshape(-1), eps, osum.reshape(-1), onorm.reshape(-1))
        return lambda: moe.moe_route1(x.reshape(-1), w_f32, wsh, D, E, a.k, a.norm, a.scale, be.nvalid_dev,
                                      logits.reshape(-1), counter, ids, weights, slots, sh_out, ctx.stream,
                                      gating=a.gating, add_norm=add_norm)

    def run():
        router()
        if slot_experts:
            moe.moe_route_slot_experts(logits, T, E, a.k, a.norm, a.scale, be.nvalid_dev, ids, weights, slots,
                                       ctx.stream, gating=a.gating)
        else:
            moe.moe_route(logits, T, E, a.k, a.norm, a.scale, a.tile, be.nvalid_dev, ids, weights, slots,
                          offsets, scratch, ctx.stream, gating=a.gating)
        if escale is not None:
            d.scale_by_expert(weights, ids, escale, stream=ctx.stream)
        if shexp is not None:
            d.rowdot_sigmoid(x, shexp[0], shexp[1], stream=ctx.stream)
    return run


def _moe_operands(ctx, n):
    """The MOE_GROUPED_GEMM node's operands (ir/ops_fused_moe.py moe_operands), resolved: x,
    routing (weights, slots, offsets), the experts (gate and up, or the merged gate_up with up
    None; down) and, with a shared expert, its three weights and gate; T, D, k, E, F, S."""
    from types import SimpleNamespace
    ops = moe_operands(n.attrs, n.inputs)
    x, weights, slots, offsets = (ctx.v(v) for v in (ops.x, ops.weights, ops.slots, ops.offsets))
    wg, tg, sg = _weight(ctx, ops.first_gate)
    if ops.gate_up is not None:
        wu, F = None, sg[1] // 2
    else:
        wu, tu, _ = _weight(ctx, ops.up)
        F = sg[1]
        if tu != tg:
            raise GGFuseError(None, f"cuda: {n.name}: gate ({tg}) and up ({tu}) experts differ in type")
    wd, td, _ = _weight(ctx, ops.down)
    T, D = x.shape
    E = sg[0]
    tab_gu, tab_d = _expert_tables(ctx, n, wg, wu, tg, wd, E, F, D)
    return SimpleNamespace(ops=ops, x=x, weights=weights, slots=slots, offsets=offsets, wg=wg, wu=wu, tg=tg, wd=wd,
                           td=td, E=E, F=F, T=T, D=D, k=weights.shape[1], S=slots.shape[0], out=ctx.v(n.out),
                           tab_gu=tab_gu, tab_d=tab_d)


def _expert_tables(ctx, n, wg, wu, tg, wd, E: int, F: int, D: int):
    """Device expert tables (kernels/moe/table.py) for a layer the plan splits between resident
    memory and a streaming slot (its record says expert_tables; runtime/cuda/streaming.py binds
    such a tensor to an ExpertTable): (gate_up [2E], down [E]). Built here, before any capture,
    once per backend (the addresses never change)."""
    from ggfuse.kernels.gemm import launch as gl
    from ggfuse.kernels.moe import table
    from ggfuse.kernels.quant.types import qtype
    dec = n.meta["kernel"].get("decode_tables")
    if dec is not None and ctx.be.chunk == int(dec["chunk"]):
        # the one-token step of a budgeted plan: experts where the decode cache put them
        cache = getattr(ctx.be, "decode_cache", None)
        if cache is None:
            raise PlanError(None, f"cuda: {n.name}: the plan reads decode tables but has no decode cache")
        return cache.tables(n.name, F * qtype(gl.weight_name(tg)).row_bytes(D))
    want = bool(n.meta["kernel"].get("expert_tables"))
    have = any(isinstance(w, table.ExpertTable) for w in (wg, wu, wd))
    if want != have:
        raise PlanError(None, f"cuda: {n.name}: the plan says expert_tables={want}, the streamer bound "
                              f"{'tables' if have else 'stacked weights'}; recompile the plan")
    if not want:
        return None, None
    tabs = ctx.be.buf.tables
    key = (n.name, "gate_up")
    if key not in tabs:
        rb = qtype(gl.weight_name(tg)).row_bytes(D)
        tabs[key] = table.device_table(ctx.be.cp, table.gate_up_pointers(wg, wu, E, F * rb))
    key_d = (n.name, "down")
    if key_d not in tabs:
        tabs[key_d] = table.device_table(ctx.be.cp, table.pointers(wd, E))
    return tabs[key], tabs[key_d]


@launcher("moe.grouped")
def _moe_grouped_gemm(ctx, n):
    from ggfuse.kernels.moe import launch as moe
    d = _dense()
    rec = n.meta["kernel"]
    at = ctx.at(rec)
    o = _moe_operands(ctx, n)
    _expect(n, "expert type", o.tg, rec["w_gate_up"])
    _expect(n, "expert type", o.td, rec["w_down"])
    if at.get("impl") == "gemv":
        return _moe_gemv(ctx, n, o, at)
    h = ctx.ws(n, "h", (o.S, o.F), np.uint16)
    x = o.x
    x_copy = None
    if rec["x_copy"]:
        # x stays f32 for the f32-accurate router (MOE_ROUTE reads it too); the expert GEMMs
        # round it to bf16 anyway, so a bf16 copy first gives bit-identical results while they
        # take the bf16-A path (on sm_90 the wide tiles; no f32 conversion in the producers)
        x_copy = ctx.ws(n, "x_bf16", (o.T, o.D), np.uint16)
        x = x_copy
    _expect(n, "expert activation dtype", _dt(x), rec["a"])
    x_dt = rec["a"]
    act = rec.get("act", "silu")
    moe.prepare(x_dt, o.tg, o.td, dequant=rec["dequant"], act=act)
    kw_gu = dict(impl=rec["impl_gate_up"], schedule=at["schedule_gate_up"], max_blocks=rec.get("max_blocks"),
                 dequant=rec["dequant"], act=act)
    kw_d = dict(impl=rec["impl_down"], schedule=at["schedule_down"], max_blocks=rec.get("max_blocks"),
                dequant=rec["dequant"])
    shared = []
    if o.ops.shared is not None:
        sh = rec["shared"]
        hs = ctx.ws(n, "hs", (o.T, ctx.t(o.ops.shared.gate).shape[0]), np.uint16)
        ys = ctx.ws(n, "ys", (o.T, o.D), np.float32)
        gate = ctx.v(o.ops.shared.scale).reshape(-1)
        shared = [swiglu_closure(ctx, n, sh["gate_up"], x, o.ops.shared.gate, o.ops.shared.up, hs, "bf16"),
                  gemm_closure(ctx, n, sh["down"], hs, o.ops.shared.down, ys),
                  lambda: d.axpy_rows(o.out, ys, gate, stream=ctx.stream)]
    ldx = x.strides[0] // x.itemsize

    def run():
        s = ctx.stream
        if x_copy is not None:
            d.copy(o.x, x_copy, stream=s)
        moe.moe_gate_up(x, x_dt, o.wg, o.wu, o.tg, o.E, o.F, o.D, o.slots, o.offsets, o.k, h, s, ldx=ldx,
                        wtab=o.tab_gu, **kw_gu)
        moe.moe_down(h, o.wd, o.td, o.E, o.D, o.F, o.slots, o.offsets, o.weights, o.k, o.out, s, zero_out=True,
                     wtab=o.tab_d, **kw_d)
        for fn in shared:
            fn()
    return run


def _moe_gemv(ctx, n, o, at):
    """The few-token (decode) experts: matrix-vector products on the picked experts' rows
    (kernels/moe/gemv.cu), two launches per layer: the shared expert is one more slot of each
    token in both (launch.GemvShared), of its own weight types."""
    from ggfuse.kernels.moe import launch as moe
    from ggfuse.kernels.quant.types import qtype
    _expect(n, "expert activation dtype", _dt(o.x), at["a"])
    act = n.attrs.get("act", "silu")
    h = ctx.ws(n, "h_gemv", (o.T * o.k, o.F), np.float32)
    if at.get("slots") == "slot_expert":
        # the router wrote each slot's expert into `slots` (moe_route_slot_experts)
        slot_e, layout = o.slots, {}
    else:
        slot_e = ctx.ws(n, "slot_expert", (o.T * o.k,), np.int32)
        layout = {"sorted_slots": o.slots, "expert_offsets": o.offsets}
    rb_gu = qtype(o.tg).row_bytes(o.D)
    tabbed = o.tab_gu is not None
    if tabbed:
        w_gate, up_ptr, e_gu = None, 0, 0
    elif o.wu is None:                      # merged gate_up [E, 2F, D]: gate rows first
        w_gate, up_ptr, e_gu = o.wg, o.wg.data.ptr + o.F * rb_gu, 2 * o.F * rb_gu
    else:
        w_gate, up_ptr, e_gu = o.wg, o.wu.data.ptr, o.F * rb_gu
    w_down = None if tabbed else o.wd
    e_d = qtype(o.td).row_bytes(o.F) * o.D
    shared = None
    if o.ops.shared is not None:
        sh = o.ops.shared
        wgs, tgs, sgs = _weight(ctx, sh.gate)
        wus, tus, _ = _weight(ctx, sh.up)
        wds, tds, _ = _weight(ctx, sh.down)
        if tus != tgs:
            raise GGFuseError(None, f"cuda: {n.name}: shared gate ({tgs}) and up ({tus}) differ in type")
        Fs = sgs[0]
        shared = moe.GemvShared(gate=wgs, up=wus, down=wds, gate_up_type=tgs, down_type=tds, F=Fs,
                                h=ctx.ws(n, "hs_gemv", (o.T, Fs), np.float32), scale=ctx.v(sh.scale).reshape(-1))

    def run():
        s = ctx.stream
        moe.moe_gemv_gate_up(o.x, w_gate, up_ptr, e_gu, o.tg, o.E, o.F, o.D, o.k, h, **layout,
                             slot_expert=slot_e, wtab=o.tab_gu, act=act, shared=shared, stream=s)
        moe.moe_gemv_down(h, w_down, e_d, o.td, o.D, o.F, o.k, o.weights, o.out, slot_expert=slot_e,
                          wtab=o.tab_d, shared=shared, stream=s)
    return run


# ---- precision="f32" ---------------------------------------------------------------------------
#
# The default kernels round every GEMM operand to bf16 (tensor cores). A plan compiled with
# precision "f32" makes the results f32-faithful where that matters (tests/precision_emulation.py:
# bf16 GEMM operands flip near-tied MoE experts of the test fixtures; bf16 attention and delta-rule
# operands move logits by <= 4e-3 of max): every GEMM (dense, SwiGLU, routed and shared experts, LM
# head) multiplies f32 activations by the weight as the GGUF stores it, dequantised in f32
# (kernels/dense/gemm_qf32.cu, kernels/moe/grouped_f32.cu), and the delta rule runs the exact f32
# token recurrence. Attention keeps its bf16 KV cache and tensor cores. A verification mode:
# slower, not tuned.

@launcher("moe.grouped_f32")
def _moe_grouped_f32(ctx, n):
    from ggfuse.kernels.dense import qf32
    from ggfuse.kernels.moe import launch_f32 as moe32
    d = _dense()
    o = _moe_operands(ctx, n)
    h = ctx.ws(n, "h", (o.S, o.F), np.float32)
    y = ctx.ws(n, "y", (o.T * o.k, o.D), np.float32)
    sh = o.ops.shared
    if sh is not None:
        wgs, tgs, sgs = _weight(ctx, sh.gate)
        wus, _, _ = _weight(ctx, sh.up)
        wds, tds, _ = _weight(ctx, sh.down)
        Fs = sgs[0]
        hs = ctx.ws(n, "hs", (o.T, Fs), np.float32)
        ys = ctx.ws(n, "ys", (o.T, o.D), np.float32)
        gate = ctx.v(sh.scale).reshape(-1)

    def run():
        s = ctx.stream
        moe32.moe_experts_f32(o.x, o.wg, o.wu, o.tg, o.wd, o.td, o.E, o.F, o.D, o.slots, o.offsets, o.weights,
                              h, y, o.out, tile=n.attrs.tile, stream=s, wtab_gate_up=o.tab_gu,
                              wtab_down=o.tab_d, act=n.meta["kernel"].get("act", "silu"))
        if sh is not None:
            qf32.gemm_swiglu_qf32(o.x, wgs, wus, tgs, Fs, o.D, hs, stream=s)
            qf32.gemm_qf32(hs, wds, tds, o.D, Fs, ys, stream=s)
            d.axpy_rows(o.out, ys, gate, stream=s)
    return run
