"""lower_cuda: decide everything the CUDA runtime will do, and write it into the graph.

After this pass (and the memory plan, which places what it declares), the CUDA backend only
looks launchers up by name and binds them: it never chooses by a name, a shape or the
environment. Per node, meta["kernel"] records the kernel and its variant:

    {"name": "gemm.gemm", "impl": "wgmma", "persist": true, "dequant": "fast",
     "a": "bf16", "c": "f32", "w": "q4_k"}
    {"name": "moe.grouped", "impl_gate_up": "wgmma", "impl_down": "wgmma", "x_copy": true,
     "expert_tables": false, "by_chunk": {"8192": {"schedule_gate_up": "wide", ...}, ...}}
    {"name": "view"} / {"name": "dense.copy"}          (RESHAPE: a strided view, or a copy)

meta["storage"] gives each output's storage dtype on the device (bf16 for norm / gate outputs
that only GEMMs read, whose tensor cores round them to bf16 anyway; f32 otherwise), and
meta["workspace"] = {"<chunk>": {name: bytes}} the scratch each launch needs at every captured
chunk size (the launchers declare it: kernels/*/launch.py *_workspace). The graph's meta gets
"lowering" (target, precision, captured chunk sizes, the dense-weight policy and why) and
"weights" (per GGUF tensor: how it is read and the device forms it is uploaded in).

Later passes extend the records: schedule_expert_prefetch marks split layers' grouped GEMMs
(expert tables), the embedding gathered on the host and the lean LM-head block, and gives its
FETCH_WEIGHTS nodes their kernel; plan_memory places values and workspace per chunk size.
"""
from __future__ import annotations

from ggfuse.errors import GGFuseError
from ggfuse.ir.graph import Graph
from ggfuse.ir.ops import Op
from ggfuse.ir.ops_fused_moe import moe_operands
from ggfuse.ir.types import DType, nbytes_of, shape_eval
from ggfuse.kernels import layout
from ggfuse.kernels.target import TARGETS, TargetSpec
from ggfuse.passes.base import PassResult

# The all-rows LM head writes logits HEAD_BLOCK rows at a time (a budgeted plan that sheds
# fixed costs uses HEAD_BLOCK_LEAN: time-to-first-token never uses the all-rows head).
HEAD_BLOCK = 128
HEAD_BLOCK_LEAN = 16
# device memory the runtime keeps outside the plan's buffers when it decides whether dense
# matrices fit as bf16 (CUDA graphs, modules, cuBLAS workspace, allocator slack)
DENSE_FIT_RESERVE = 256 << 20
DENSE_FIT_FRACTION = 0.92

GEMM_TYPES = ("bf16", "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k", "q6_k")    # kernels/gemm/launch.py
WGMMA_TYPES = ("bf16", "q8_0", "q4_k", "q6_k")                                    # SM90_TYPES
FLOAT_TYPES = ("F32", "F16", "BF16")

# ops whose kernels write their first output as bf16 as well as f32 (kernels/dense/launch.py)
_BF16_OUT = {Op.RMS_NORM: (0,), Op.ADD_RMS_NORM: (0,), Op.GATED_RMS_NORM: (0,), Op.SIGMOID_MUL: (0,),
             Op.NORM_ADD_NORM: (0,), Op.GELU_MUL: (0,)}
_ELEMENTWISE = {Op.RMS_NORM: "dense.rms_norm", Op.ADD_RMS_NORM: "dense.add_rms_norm", Op.L2_NORM: "dense.l2_norm",
                Op.GATED_RMS_NORM: "dense.gated_rms_norm", Op.NORM_ROPE: "dense.norm_rope",
                Op.SIGMOID_MUL: "dense.sigmoid_mul", Op.ADD: "dense.add", Op.MUL: "dense.mul",
                Op.SSM_CONV_SILU: "dense.ssm_conv_silu", Op.DELTANET_GATES: "dense.deltanet_gates",
                Op.KV_APPEND: "dense.kv_append", Op.CONCAT: "dense.concat",
                # Gemma 4 (ir/ops_gemma4.py, ir/ops_fused_elementwise.py)
                Op.SCALE: "dense.scale", Op.GELU: "dense.gelu", Op.GELU_MUL: "dense.gelu_mul",
                Op.SOFTCAP: "dense.softcap", Op.NORM_ADD: "dense.norm_add", Op.NORM_ADD_NORM: "dense.norm_add_norm"}
_GLU = (Op.FFN_SWIGLU, Op.FFN_GEGLU)      # gate+up GEMMs with the GLU fused: SiLU or GELU-tanh gate
_GLU_ACT = {Op.FFN_SWIGLU: "silu", Op.FFN_GEGLU: "gelu"}
# state kinds kept bf16 on the device: the attention caches (full layers' KV cache, sliding rings)
BF16_STATES = ("kv_cache", "kv_ring")
_NO_KERNEL = (Op.INPUT, Op.WEIGHT, Op.SLICE, Op.FETCH_WEIGHTS)


def capture_sizes(chunk: int, sub_chunks: bool = True, sub_chunk_min: int = 256, decode: bool = False) -> list[int]:
    """The chunk sizes the runtime captures: `chunk`, then halvings down to sub_chunk_min
    (multiples of 64 from 128 up), for short prompts and the tail of long ones; decode: also a
    one-token step (the graph generation replays per token)."""
    out, c = [chunk], chunk // 2
    while sub_chunks and c >= max(sub_chunk_min, 1):
        c = c // 64 * 64 if c >= 128 else c
        out.append(c)
        c //= 2
    if decode and out[-1] > 1:
        out.append(1)
    return out


def context_for(prompt: int, chunk: int, sizes: list[int] | None = None) -> int:
    """The KV-cache rows a prompt needs when prefilled in chunks of `chunk`: the last piece runs
    the smallest captured size that holds it, padded to that size."""
    sizes = sizes or capture_sizes(chunk)
    full = prompt // chunk * chunk
    tail = prompt - full
    if tail == 0:
        return max(prompt, 1)
    return full + min(c for c in sizes if c >= tail)


def _lower(name: str) -> str:
    return name.lower()


# ---- weights -----------------------------------------------------------------------------------

def weight_roles(g: Graph) -> dict[str, set]:
    """How each GGUF tensor is read: "gemm" (a matmul / expert operand), "rows" (embedding
    lookup) or "f32" (norm weights, conv taps, gates). A tied embedding is both rows and gemm."""
    roles: dict[str, set] = {}

    def consumers(v):
        for u, i in g.uses_of(v):
            if u.op in (Op.RESHAPE, Op.FETCH_WEIGHTS):
                yield from consumers(u.value(i if u.op == Op.FETCH_WEIGHTS else 0))
            else:
                yield u, i
    for w in g.weights():
        r = roles.setdefault(w.attrs.tensor, set())
        for u, i in consumers(w.out):
            if u.op in (Op.GET_ROWS, Op.PLE_GATHER) and i == 0:
                r.add("rows")
            elif (u.op in (Op.MATMUL, Op.LM_HEAD) and i == 1) or (u.op in _GLU and i in (1, 2)) or \
                    (u.op == Op.MOE_GROUPED_GEMM and i >= 4):
                r.add("gemm")
            else:
                r.add("f32")
    return roles


def _tensors(g: Graph) -> dict[str, dict]:
    """{tensor: {"ggml_type", "shape", "bytes"}} of every weight the graph reads."""
    out = {}
    for n in g.weights():
        shape = tuple(int(d) for d in n.outputs[0].shape)
        t = n.attrs.get("ggml_type", n.outputs[0].dtype.ggml_name)
        numel = 1
        for d in shape:
            numel *= d
        prev = out.get(n.attrs.tensor)
        if prev is None or len(shape) > len(prev["shape"]):   # a [1, D] view of a [D] vector
            out[n.attrs.tensor] = {"ggml_type": t, "shape": shape, "bytes": nbytes_of(DType.from_ggml(t), numel)}
    return out


def forms_of(roles: set, ggml_type: str, rank: int, *, precision: str, dense_bf16: bool,
             gemv_raw: bool = False) -> list[str]:
    """Device forms of one tensor: "raw" GGUF bytes, "bf16" or "f32". gemv_raw: a one-row product
    (the decode step's matmuls, the LM head's last row) reads its stored quantised rows, so a
    matrix dequantised to bf16 for the GEMMs keeps its raw bytes beside that copy."""
    out = []
    if "f32" in roles:
        out.append("f32")
    if "rows" in roles:
        out.append("raw")
    if "gemm" in roles:
        if precision == "f32":
            out.append("raw")        # the f32 kernels dequantise GGUF blocks themselves, in f32
        elif ggml_type in FLOAT_TYPES:
            out.append("bf16")
        elif rank == 2 and (dense_bf16 or _lower(ggml_type) not in GEMM_TYPES):
            out.append("bf16")       # dequantised once at load (types the GEMM cannot read, too)
        else:
            out.append("raw")
        if gemv_raw and precision != "f32" and rank == 2 and ggml_type not in FLOAT_TYPES and "bf16" in out:
            out.append("raw")
    return list(dict.fromkeys(out))


def _gemv_raw_tensors(g: Graph, tensors: dict, options, sizes: list[int]) -> set:
    """Matrices a one-row product reads as stored (option decode_dense auto / gemv): the decode
    step's matmul weights (when the plan captures a 1-token step) and the LM head's, where a GEMV
    kernel takes their quantised type."""
    from ggfuse.kernels.dense.launch import gemv_supported
    if options.precision == "f32" or options.decode_dense == "gemm":
        return set()
    out = set()
    for n in g.nodes():
        if n.op == Op.LM_HEAD or (n.op == Op.MATMUL and 1 in sizes):
            name = g.tensor_of(n.inputs[1])
            t = tensors[name]
            raw = _lower(t["ggml_type"])
            if t["ggml_type"] not in FLOAT_TYPES and gemv_supported(raw, int(t["shape"][-1])) and \
                    _gemv_reads_raw(options.decode_dense, raw):
                out.add(name)
    return out


def _pdl(option: str, spec: TargetSpec) -> dict:
    """Programmatic dependent launch in the captured graphs (kernels/graph.py): sm_90 and newer
    have it; the kernels built for older targets have no wait in them (kernels/pdl.cuh)."""
    if spec.cc < 90:
        if option == "on":
            raise GGFuseError(None, f"option pdl: on needs an sm_90a target (programmatic dependent launch), "
                                    f"not {spec.name}")
        return {"on": False, "why": f"target {spec.name}: no programmatic dependent launch below sm_90"}
    if option == "off":
        return {"on": False, "why": "option pdl off"}
    return {"on": True, "why": f"target {spec.name}: kernel-to-kernel edges of the captured graphs are "
                               f"programmatic (each kernel waits in griddepcontrol.wait for the one before)"}


def _gemv_reads_raw(decode_dense: str, raw: str) -> bool:
    """Whether a one-row product reads a quantised type as stored: gemv, every type with a GEMV
    kernel; auto, the types whose one-row kernel beats cuBLAS on the bf16 copy on the H200
    (kernels/dense/launch.py GEMV1_TYPES; `python -m ggfuse.kernels.dense.bench --gemv`)."""
    from ggfuse.kernels.dense.launch import GEMV1_TYPES
    return decode_dense == "gemv" or (decode_dense == "auto" and raw in GEMV1_TYPES)


def form_bytes(form: str, shape, raw_bytes: int) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return raw_bytes if form == "raw" else n * (4 if form == "f32" else 2)


def state_bytes(g: Graph, max_context: int) -> int:
    """Device bytes of the carried states: KV caches bf16 at max_context rows, sliding rings bf16,
    others f32."""
    n = 0
    for node in g.states().values():
        numel = 1
        for d in shape_eval(node.outputs[0].shape, {"P": max_context, "T": 0}):
            numel *= d
        n += numel * (2 if node.attrs.get("state") in BF16_STATES else 4)
    return n


def _dense_policy(g: Graph, tensors: dict, roles: dict, *, options, device_free: int | None) -> tuple[bool, str]:
    """Whether dense quantised matrices are dequantised to bf16 at load, and why."""
    if options.precision == "f32":
        return False, "precision f32: every GEMM reads the weights as stored"
    if options.dense_form != "auto":
        return options.dense_form == "bf16", f"dense_form={options.dense_form}"
    from ggfuse.passes import plan_memory
    raw = sum(t["bytes"] for t in tensors.values())
    dense_extra = sum(form_bytes("bf16", t["shape"], 0) for name, t in tensors.items()
                      if len(t["shape"]) == 2 and "gemm" in roles.get(name, ())
                      and t["ggml_type"] not in FLOAT_TYPES)
    intervals, _ = plan_memory.buffers(g, options.chunk)
    arena = plan_memory.place(intervals)[1]
    # the reserve scales down for toy budgets, as schedule_expert_prefetch's does
    reserve = DENSE_FIT_RESERVE if not options.vram_budget else min(DENSE_FIT_RESERVE, options.vram_budget // 16)
    need = raw + state_bytes(g, options.max_context) + arena + reserve
    limits = [x for x in (options.vram_budget, device_free) if x]
    if not limits:
        return True, ("bf16: no --vram-budget and no device to measure at compile time, so the dense matrices "
                      "are assumed to fit dequantised (compile with --vram-budget for a smaller card)")
    room = DENSE_FIT_FRACTION * min(limits)
    what = "the budget" if options.vram_budget and (not device_free or options.vram_budget <= device_free) \
        else "the device's free memory at compile time"
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    if need + dense_extra < room:
        return True, f"bf16: weights, states and arena {gib(need)} + dequantised dense matrices " \
                     f"{gib(dense_extra)} fit {DENSE_FIT_FRACTION:.0%} of {what} ({gib(min(limits))})"
    return False, f"raw: weights, states and arena {gib(need)} + dequantised dense matrices {gib(dense_extra)} " \
                  f"exceed {DENSE_FIT_FRACTION:.0%} of {what} ({gib(min(limits))})"


# ---- layouts and storage -----------------------------------------------------------------------

def _layouts(g: Graph, sizes: list[int]) -> dict:
    """Per value, at each captured size: (shape, strides) as the runtime will view it; per
    RESHAPE whether it is a view (True) or needs a copy (False, at any size)."""
    order = g.topo()
    is_view: dict[int, bool] = {}
    per_size = []
    for c in sizes:
        env = {"T": c, "P": 0}
        lay: dict = {}
        for n in order:
            if n.op in (Op.WEIGHT, Op.FETCH_WEIGHTS):
                continue
            if n.op == Op.SLICE and n.inputs[0] in lay:
                shape, strides = lay[n.inputs[0]]
                s2, st2, _ = layout.slice_strides(shape, strides, n.attrs.axis, n.attrs.start, n.attrs.stop)
                lay[n.out] = (s2, st2)
                continue
            if n.op == Op.RESHAPE and n.inputs[0] in lay:
                shape, strides = lay[n.inputs[0]]
                new = tuple(shape_eval(n.outputs[0].shape, env))
                st = layout.reshape_strides(shape, strides, new)
                if st is None:
                    is_view[n.id] = False
                    st = layout.contiguous_strides(new)
                else:
                    is_view.setdefault(n.id, True)
                lay[n.out] = (new, st)
                continue
            for i, t in enumerate(n.outputs):
                shape = tuple(shape_eval(t.shape, env))
                lay[n.value(i)] = (shape, layout.contiguous_strides(shape))
        per_size.append(lay)
    return {"views": is_view, "by_size": dict(zip(sizes, per_size))}


def _gemm_operand_only(g: Graph, v, views: dict) -> bool:
    """Every reader of v (through RESHAPE / SLICE views, no copies) is a GEMM's activation operand."""
    uses = list(g.uses_of(v))
    if not uses:
        return False
    for u, i in uses:
        if u.op in (Op.RESHAPE, Op.SLICE):
            if (u.op == Op.RESHAPE and not views.get(u.id, True)) or not _gemm_operand_only(g, u.out, views):
                return False
        elif not (u.op in (Op.MATMUL, Op.LM_HEAD) + _GLU and i == 0):
            return False
    return True


def bf16_values(g: Graph, views: dict) -> set:
    """Values stored as bf16 although the IR says f32: outputs of norms / gates that only GEMMs
    read. The tensor-core GEMMs round their activation operand to bf16 anyway, so the results are
    bit-identical, while the norm writes half the bytes and the GEMM takes its bf16 x bf16 path."""
    outs = set(g.outputs.values())
    vals = set()
    for n in g.nodes():
        for i in _BF16_OUT.get(n.op, ()):
            v = n.value(i)
            if v not in outs and g.type_of(v).dtype == DType.F32 and _gemm_operand_only(g, v, views):
                vals.add(v)
    return vals


def _root(g: Graph, v):
    """The value a view (RESHAPE-as-view / SLICE chain) reads."""
    n = g.node(v.node)
    while n.op in (Op.RESHAPE, Op.SLICE) and n.meta.get("kernel", {}).get("name", "view") == "view":
        v = n.inputs[0]
        n = g.node(v.node)
    return v


# ---- kernels -----------------------------------------------------------------------------------

class _Lowering:
    def __init__(self, g: Graph, spec: TargetSpec, options, sizes: list[int], forms: dict, tensors: dict,
                 gemv_raw: set):
        self.g, self.spec, self.o, self.sizes, self.forms, self.tensors = g, spec, options, sizes, forms, tensors
        self.gemv_raw = gemv_raw      # tensors whose one-row products read the stored rows

    def storage(self, v) -> str:
        """Storage dtype of a value (through views)."""
        r = _root(self.g, v)
        n = self.g.node(r.node)
        if n.op == Op.INPUT:
            return n.meta.get("storage", [n.outputs[0].dtype.value])[0]
        st = n.meta.get("storage")
        return st[r.index] if st else n.outputs[r.index].dtype.value

    def weight(self, v) -> tuple[str, str, tuple]:
        """(tensor, the form a GEMM reads: "bf16" or the ggml type lower-cased, shape) of a weight value."""
        name = self.g.tensor_of(v)
        t = self.tensors[name]
        form = "bf16" if "bf16" in self.forms[name] else _lower(t["ggml_type"])
        return name, form, t["shape"]

    def impl(self, w: str, K: int) -> str:
        ok = self.spec.wgmma and w in WGMMA_TYPES and K % 64 == 0
        if self.o.gemm == "wgmma" and not ok:
            raise GGFuseError(None, f"option gemm=wgmma: the wgmma kernel cannot run {w} weights with K={K} on "
                                    f"target {self.spec.name} (it needs sm_90a, a weight type in "
                                    f"{', '.join(WGMMA_TYPES)} and K % 64 == 0)")
        return "wgmma" if ok and self.o.gemm != "mma" else "mma"

    def gemm(self, a: str, w: str, K: int, c: str, *, swiglu: bool = False, ours: bool = False,
             act: str = "silu") -> dict:
        """A dense GEMM's record (C[M, N] = A[M, K] W[N, K]^T; swiglu: the fused gate+up, its
        gate `act`: "silu", or "gelu" for GELU-tanh, a variant of the same kernels); ours: never cuBLAS."""
        if self.o.precision == "f32":
            rec = {"name": "qf32.gemm_swiglu" if swiglu else "qf32.gemm", "w": w}
            if swiglu and act != "silu":
                rec["act"] = act      # absent: "silu" (plans before Gemma read the same)
            return rec
        if not swiglu and not ours and self.o.dense_gemm == "cublas" and a == "bf16" and w == "bf16":
            return {"name": "cublas.gemm_bf16", "a": a, "c": c, "w": w}
        impl = self.impl(w, K)
        rec = {"name": "gemm.gemm_swiglu" if swiglu else "gemm.gemm", "impl": impl, "a": a, "c": c, "w": w}
        if swiglu and act != "silu":
            rec["act"] = act
        if impl == "wgmma":
            rec.update(persist=self.o.dense_persist, dequant=self.o.dequant)
        return rec

    def gemv_form(self, name: str, w: str, K: int, *, head: bool = False) -> str | None:
        """The form a one-row product of tensor `name` reads (option decode_dense; the LM head's
        last row with head=True), or None where it runs the GEMM: auto, the stored quantised rows
        (kept beside a bf16 copy, forms_of gemv_raw); gemv, those or else the GEMM's bf16 matrix."""
        from ggfuse.kernels.dense.launch import gemv_supported
        if name in self.gemv_raw:           # _gemv_raw_tensors: uploaded raw for this
            return _lower(self.tensors[name]["ggml_type"])
        if head or (self.o.decode_dense == "gemv" and gemv_supported(w, K)):
            return w
        return None

    def check_gemm_weight(self, node, w: str, name: str):
        if self.o.precision != "f32" and w not in GEMM_TYPES:
            raise GGFuseError(None, f"{node.name}: weight {name} of type {w} cannot be read by the tensor-core GEMMs "
                                    f"(types: {', '.join(GEMM_TYPES)})")

    def decode_attention(self, n, rec: dict, impl: str, ws: dict) -> dict:
        """An ATTENTION over the KV cache: with decode_attention "split", the one-token step runs
        the key-split kernel (kernels/attention/decode_attn.cu; by_chunk "1": impl split and its
        number of key ranges, its partials a workspace), every other chunk size `impl` (the
        prefill kernel the record names)."""
        from ggfuse.kernels.attention import launch as fa
        if self.o.decode_attention != "split" or 1 not in self.sizes:
            return rec
        Hq, D = (int(x) for x in self.g.type_of(n.inputs[0]).shape[1:])
        Hkv, Dv = (int(x) for x in self.g.type_of(n.inputs[2]).shape[1:])
        if not fa.decode_supported(D, Dv, Hq, Hkv):
            rec["decode_why"] = (f"decode_attention split: head dims {D}/{Dv} or {Hq} query heads over {Hkv} kv "
                                 f"heads not taken (dims {fa.DECODE_HEAD_DIMS}, at most {fa.DECODE_MAX_GROUP} per kv "
                                 f"head); the one-token step runs {rec['name']}")
            return rec
        splits = fa.decode_splits(Hkv, int(self.o.max_context))
        rec["by_chunk"] = {str(c): ({"impl": "split", "splits": splits} if c == 1 else {"impl": impl})
                           for c in self.sizes}
        ws[1] = {"split": fa.decode_workspace_bytes(Hq, D, splits)}
        return rec

    def node(self, n) -> tuple[dict | None, dict]:
        """(kernel record, {chunk: workspace}) of a node."""
        g, o = self.g, self.o
        ws = {}
        if n.op in (Op.MATMUL, Op.LM_HEAD):
            name, w, shape = self.weight(n.inputs[1])
            self.check_gemm_weight(n, w, name)
            K = int(shape[-1])
            N = int(shape[-2]) if len(shape) > 1 else 1
            a = self.storage(n.inputs[0])
            if n.op == Op.MATMUL:
                rec = self.gemm(a, w, K, "f32")
                if self.o.precision != "f32" and 1 in self.sizes:
                    # the decode step: one row times W, read once (its quantised rows where kept)
                    wv = self.gemv_form(name, w, K)
                    rec["by_chunk"] = {str(c): ({"impl": "gemv", "w": wv} if c == 1 and wv else {"impl": "gemm"})
                                       for c in self.sizes}
                return rec, ws
            # the last row's GEMV reads the stored quantised rows where the plan keeps them
            last_w = self.gemv_form(name, w, K, head=True) or w
            rec = {"name": "lm_head", "all": self.gemm(a, w, K, "f32"), "last": {"name": "dense.gemv", "a": a, "w": last_w},
                   "block_rows": HEAD_BLOCK}
            if n.attrs.get("softcap"):
                rec["softcap"] = float(n.attrs.softcap)      # cap * tanh(logits / cap) on each block / row
            for c in self.sizes:
                ws[c] = _lm_head_ws(min(c, HEAD_BLOCK), N)
            return rec, ws
        if n.op in _GLU:
            name, w, shape = self.weight(n.inputs[1])
            name_u, wu, _ = self.weight(n.inputs[2])
            if w != wu:
                raise GGFuseError(None, f"{n.name}: gate ({w}) and up ({wu}) weights differ in type")
            self.check_gemm_weight(n, w, name)
            return self.gemm(self.storage(n.inputs[0]), w, int(shape[-1]), "f32", swiglu=True,
                             act=_GLU_ACT[n.op]), ws
        if n.op in _ELEMENTWISE:
            rec = {"name": _ELEMENTWISE[n.op]}
            return rec, ws
        if n.op == Op.GET_ROWS:
            name, _, _ = self.weight(n.inputs[0])
            return {"name": "dense.get_rows", "w": _lower(self.tensors[name]["ggml_type"]), "source": "device"}, ws
        if n.op == Op.PLE_GATHER:
            # rows gathered by token id and dequantised on the device, the table resident (a
            # budgeted plan may gather them on the host: schedule_expert_prefetch)
            name, _, _ = self.weight(n.inputs[0])
            return {"name": "dense.ple_gather", "w": _lower(self.tensors[name]["ggml_type"]), "source": "device"}, ws
        if n.op == Op.ATTENTION:
            from ggfuse.kernels.attention.launch import HEAD_DIMS, WINDOW_HEAD_DIMS
            D = int(g.type_of(n.inputs[0]).shape[2])
            Dv = int(g.type_of(n.inputs[2]).shape[2])
            if D in HEAD_DIMS and D == Dv:
                rec = {"name": "attention.flash_prefill", "q": self.storage(n.inputs[0]), "o": self.storage(n.out),
                       "head_dim": D}
                return self.decode_attention(n, rec, "flash", ws), ws
            if D not in WINDOW_HEAD_DIMS or D != Dv:
                raise GGFuseError(None, f"{n.name}: head dims {D}/{Dv} have no attention kernel (tensor cores: "
                                        f"{HEAD_DIMS}; CUDA cores: {WINDOW_HEAD_DIMS}, K and V dims equal)")
            rec = {"name": "attention.window", "impl": "simt", "q": self.storage(n.inputs[0]),
                   "o": self.storage(n.out), "head_dim": D, "ring_rows": 0, "window": 0,
                   "why": f"head dim {D} has no tensor-core flash kernel (have {HEAD_DIMS})"}
            return self.decode_attention(n, rec, "window", ws), ws
        if n.op == Op.ATTENTION_WINDOW:
            from ggfuse.kernels.attention.launch import WINDOW_HEAD_DIMS
            q, k, v, kr, vr = (g.type_of(x) for x in n.inputs)
            D, R = int(q.shape[2]), int(kr.shape[0])
            if D not in WINDOW_HEAD_DIMS or int(v.shape[2]) != D:
                raise GGFuseError(None, f"{n.name}: head dims {D}/{v.shape[2]} have no windowed attention kernel "
                                        f"(have {WINDOW_HEAD_DIMS}, K and V dims equal)")
            for x in n.inputs[1:3]:
                if self.storage(x) != "f32":
                    raise GGFuseError(None, f"{n.name}: the chunk's keys / values must be stored f32, the plan "
                                            f"stores {self.storage(x)}")
            return {"name": "attention.window", "impl": "simt", "q": self.storage(n.inputs[0]),
                    "o": self.storage(n.out), "head_dim": D, "ring_rows": R, "window": int(n.attrs.window)}, ws
        if n.op == Op.KV_RING_APPEND:
            return {"name": "dense.kv_ring_append", "ring_rows": int(g.type_of(n.inputs[0]).shape[0])}, ws
        if n.op == Op.CHUNK_GATED_DELTA_RULE:
            from ggfuse.kernels.deltanet import launch as dn
            _, Hk, K = g.type_of(n.inputs[0]).shape
            _, Hv, V = g.type_of(n.inputs[2]).shape
            if not dn.chunked_supported(K, V) or o.precision == "f32":
                why = "precision f32: the exact f32 token recurrence" if o.precision == "f32" else \
                    f"head dims K={K}, V={V} have no tensor-core chunked kernel"
                rec = {"name": "deltanet.recurrent", "why": why}
                if 1 in self.sizes:     # one token: the step kernel where it takes the head dims
                    rec["by_chunk"] = {str(c): {"kernel": "step" if c == 1 and dn.step_supported(K, V) else "loop"}
                                       for c in self.sizes}
                return rec, ws
            in_dt = self.storage(n.inputs[0])
            rec = {"name": "deltanet.chunk", "in": in_dt, "out": self.storage(n.out),
                   "v_block": dn.default_v_block(V), "by_chunk": {}}
            for c in self.sizes:
                if c == 1 and o.decode_deltanet == "recurrent":
                    # one token: the state update itself, no chunk to factor (recurrent.cu)
                    # (gdr_step_*: one token's state update in registers; gdr_recurrent_*: the loop)
                    rec["by_chunk"][str(c)] = {"impl": "recurrent",
                                               "kernel": "step" if dn.step_supported(K, V) else "loop"}
                    ws[c] = {}
                    continue
                rec["by_chunk"][str(c)] = {"impl": "chunk"}
                ws[c] = dn.workspace(c, Hv, K, V, Hk=Hk, in_dtype=in_dt)
            return rec, ws
        if n.op == Op.MOE_ROUTE:
            return self.moe_route(n, ws)
        if n.op == Op.MOE_GROUPED_GEMM:
            return self.moe_gemm(n, ws)
        if n.op == Op.RESHAPE:
            return None, ws      # decided in run(): view or copy
        raise GGFuseError(None, f"{n.name or n.op.value}: op {n.op.value} has no CUDA kernel"
                                + ("; run the pipeline's fusing passes first" if n.op in
                                   (Op.GATED_DELTA_RULE, Op.SSM_CONV, Op.TOPK, Op.MUL_MAT_ID, Op.SOFTMAX) else ""))

    def moe_route(self, n, ws):
        from ggfuse.kernels.dense import launch as dense
        from ggfuse.kernels.moe import launch as moe
        g, o = self.g, self.o
        E, D = (int(d) for d in g.type_of(n.inputs[1]).shape)
        k = int(n.attrs.k)
        if o.router == "f32simt" or D % 32:
            rec = {"name": "moe.route", "router": "f32simt"}
            if o.router != "f32simt":
                rec["why"] = f"D={D} is not a multiple of 32 (the tensor-core router GEMM's K step)"
        else:
            rec = {"name": "moe.route", "router": o.router, "by_chunk": {}}
            for c in self.sizes:
                tile = o.router_tile if o.router_tile != "auto" else dense.router_tile(c, E, self.spec.sms)
                rec["by_chunk"][str(c)] = {"tile": tile}
        expert_scale = bool(n.attrs.get("expert_scale", False))
        rec["shared_gate"] = len(n.inputs) - expert_scale > 2
        if expert_scale:
            rec["expert_scale"] = True      # route weights times the expert's output scale (Gemma 4)
        by = rec.setdefault("by_chunk", {})
        for c in self.sizes:
            ws[c] = moe.route_workspace(c, k, E)
            if self.decode_gemv(c):
                # the decode step: the router's [E, D] f32 matrix times one row, read once
                by.setdefault(str(c), {})["router"] = "gemv"
            else:
                by.setdefault(str(c), {})
        return rec, ws

    def decode_gemv(self, c: int) -> bool:
        """Whether chunk size c runs the experts and their router as matrix-vector products
        (kernels/moe/gemv.cu): the one-token decode step, by option decode_moe."""
        return c == 1 and self.o.decode_moe == "gemv" and self.o.precision != "f32"

    def moe_gemm(self, n, ws):
        from ggfuse.kernels.moe import launch as moe
        from ggfuse.kernels.moe import launch_f32 as moe32
        g, o = self.g, self.o
        ops = moe_operands(n.attrs, n.inputs)
        _, tg, sg = self.weight(ops.first_gate)
        _, td, sd = self.weight(ops.down)
        if ops.up is not None and self.weight(ops.up)[1] != tg:
            raise GGFuseError(None, f"{n.name}: gate ({tg}) and up ({self.weight(ops.up)[1]}) experts differ in type")
        E, D, F = (int(d) for d in sd)
        k = int(g.type_of(ops.weights).shape[1])
        tile = int(n.attrs.tile)
        Fs = 0
        if ops.shared is not None:
            _, tsg, ssg = self.weight(ops.shared.gate)
            _, tsd, _ = self.weight(ops.shared.down)
            Fs = int(ssg[0])
        x_st = self.storage(ops.x)
        if o.precision == "f32":
            for c in self.sizes:
                ws[c] = moe32.experts_workspace_f32(c, k, E, F, D, tile, shared_ffn=Fs)
            rec = {"name": "moe.grouped_f32", "w_gate_up": tg, "w_down": td, "expert_tables": False}
            if n.attrs.get("act", "silu") != "silu":
                rec["act"] = n.attrs.act
            if ops.shared is not None:
                rec["shared"] = {"w_gate_up": tsg, "w_down": tsd}
            return rec, ws
        for w in (tg, td):
            if w not in GEMM_TYPES:
                raise GGFuseError(None, f"{n.name}: experts of type {w} cannot be read by the grouped GEMMs")
        x_copy = x_st == "f32" and o.moe_x_bf16
        a = "bf16" if x_copy else x_st
        rec = {"name": "moe.grouped", "a": a, "x_copy": x_copy, "w_gate_up": tg, "w_down": td,
               "impl_gate_up": self.impl(tg, D), "impl_down": self.impl(td, F), "dequant": o.dequant,
               "max_blocks": o.moe_blocks, "expert_tables": False, "by_chunk": {}}
        if n.attrs.get("act", "silu") != "silu":
            rec["act"] = n.attrs.act         # absent: "silu"
        # the decode step's matrix-vector kernels, where they take these experts (and the shared one)
        gemv_ok = moe.gemv_supported(tg, td, D, F, k) and (
            ops.shared is None or moe.gemv_supported(tsg, tsd, D, Fs, 1))
        for c in self.sizes:
            if gemv_ok and self.decode_gemv(c):
                # one token: the k picked experts' rows as stored, no tiles (kernels/moe/gemv.cu)
                rec["by_chunk"][str(c)] = {"impl": "gemv", "a": x_st}
                ws[c] = moe.gemv_workspace(c, k, F, shared_ffn=Fs)
                continue
            try:
                sg = moe.pick_schedule(o.moe_schedule, tg, a, c, k, E, K=D, N=F, row_step=16)
                sd = moe.pick_schedule(o.moe_schedule, td, "bf16", c, k, E, K=F, N=D, row_step=32)
            except ValueError as e:
                raise GGFuseError(None, f"{n.name}: moe_schedule: {e}") from None
            if (sg in moe.SMALL_SCHEDULES) != (sd in moe.SMALL_SCHEDULES):
                # the few-rows gate_up leaves h's padding rows unwritten: both halves small or neither
                # (only "auto" gets here: a forced few-rows schedule either fits both or raised)
                sg = moe.tile_schedule("auto", tg, a, c, k, E) if sg in moe.SMALL_SCHEDULES else sg
                sd = moe.tile_schedule("auto", td, "bf16", c, k, E) if sd in moe.SMALL_SCHEDULES else sd
            rec["by_chunk"][str(c)] = {"schedule_gate_up": sg, "schedule_down": sd}
            ws[c] = moe.grouped_workspace(c, k, E, F, D, tile, x_copy=x_copy, shared_ffn=Fs)
        if ops.shared is not None:
            self.check_gemm_weight(n, tsg, "shared expert")
            self.check_gemm_weight(n, tsd, "shared expert")
            # our kernels (not cuBLAS): the SwiGLU is fused, and the shared down reads bf16 h
            rec["shared"] = {"gate_up": self.gemm(a, tsg, D, "bf16", swiglu=True),
                             "down": self.gemm("bf16", tsd, Fs, "f32", ours=True)}
        return rec, ws


def _lm_head_ws(rows: int, N: int) -> dict:
    from ggfuse.kernels.dense.launch import lm_head_workspace
    return lm_head_workspace(rows, N)


def fold_softcap(g: Graph) -> bool:
    """A soft-cap of the logits (Gemma) runs inside the LM head: the head's attribute softcap,
    applied to each block of rows of the all-rows head and to the last row's GEMV output, so the
    logits still come from the LM_HEAD node (the runtime runs it outside the chunk's graph).
    In place; whether it changed the graph."""
    logits = g.outputs.get("logits")
    if logits is None or g.node(logits.node).op != Op.SOFTCAP:
        return False
    cap = g.node(logits.node)
    head = g.node(cap.inputs[0].node)
    if head.op != Op.LM_HEAD or len(g.uses_of(head.out)) != 1 or head.attrs.get("softcap"):
        return False
    g.replace_node(head.id, attrs=head.attrs.updated(softcap=float(cap.attrs.cap)))
    g.replace_uses(cap.out, head.out)
    g.remove(cap.id)
    return True


def _route_slot_experts(g: Graph, fuse: bool = False) -> None:
    """Where a chunk size runs a MoE's experts as matrix-vector products (by_chunk impl gemv),
    they need only each slot's expert, not the sorted layout: its router then records layout
    "slot_expert" (moe_topk writes the slots' experts into the sorted_slots value, the
    histogram, scan and scatter do not run, expert_offsets stays unwritten) and the MoE records
    slots "slot_expert" (it reads them from there). Only where that MoE is the sole reader of
    the router's slots and offsets."""
    for n in g.by_op(Op.MOE_GROUPED_GEMM):
        rec = n.meta.get("kernel") or {}
        ops = moe_operands(n.attrs, n.inputs)
        route = g.node(ops.slots.node)
        if route.op != Op.MOE_ROUTE or ops.offsets.node != route.id or rec.get("name") != "moe.grouped":
            continue
        readers = {u.id for v in (ops.slots, ops.offsets) for u, _ in g.uses_of(v)}
        if readers != {n.id}:
            continue
        route_rec = route.meta.get("kernel") or {}
        by_route = route_rec.get("by_chunk", {})
        E, D = (int(d) for d in g.type_of(route.inputs[1]).shape)
        for c, at in rec.get("by_chunk", {}).items():
            if at.get("impl") == "gemv" and c in by_route:
                at["slots"] = "slot_expert"
                by_route[c]["layout"] = "slot_expert"
                if fuse and c == "1" and by_route[c].get("router") == "gemv" and not route_rec.get("expert_scale") \
                        and D % 4 == 0 and E <= 512:
                    # router GEMV, shared gate and top-k in one launch (kernels/moe/route.cu moe_route1)
                    by_route[c]["router"] = "fused"


GEMV_GROUP_MAX = 4      # matrices one launch of the one-row kernel reads (kernels/dense/gemv.cu Segs)


def _group_decode_gemvs(g: Graph) -> None:
    """The one-token step's one-row products of one input, on matrices of one stored type with
    a one-row kernel and one K (the DeltaNet projections qkv / z / beta / alpha, attention's q /
    k / v), run as one launch (kernels/dense/launch.py gemv_group), up to GEMV_GROUP_MAX each, in
    schedule order: the first records "group" (the others' names, in order), the others
    "in_group" (the first's name) and launch nothing; plan_memory makes their outputs live
    from the first's step, where they are written."""
    from ggfuse.kernels.dense.launch import GEMV1_TYPES
    unique = _unique_names(g)
    groups: dict = {}       # (input, stored type, K) -> the open group's [first node, its record, others' names]
    for n in g.topo():
        if n.op != Op.MATMUL or n.name not in unique:
            continue
        at = ((n.meta.get("kernel") or {}).get("by_chunk") or {}).get("1")
        if not at or at.get("impl") != "gemv" or at.get("w") not in GEMV1_TYPES:
            continue
        key = (n.inputs[0], at["w"], int(g.type_of(n.inputs[1]).shape[-1]))
        grp = groups.get(key)
        if grp is None or len(grp[2]) + 1 >= GEMV_GROUP_MAX:
            groups[key] = [n, at, []]
            if grp is not None and grp[2]:
                grp[1]["group"] = grp[2]
            continue
        grp[2].append(n.name)
        at["in_group"] = grp[0].name
    for _, at, others in groups.values():
        if others:
            at["group"] = others


def _unique_names(g: Graph) -> set:
    """Names that one node of g has (a record may name such a node)."""
    from collections import Counter
    return {name for name, c in Counter(n.name for n in g.nodes()).items() if name and c == 1}


def _stored(g: Graph, v) -> str:
    """The storage dtype the lowering gave value v (meta["storage"]; f32 where none is set)."""
    return g.node(v.node).meta.get("storage", ["f32"])[v.index]


def _mark_folded(n, into: str, sizes: list[int]) -> None:
    """n runs inside step `into` at chunk 1 (by_chunk "folded_into") and as itself elsewhere."""
    n.meta["kernel"]["by_chunk"] = {str(c): ({"folded_into": into} if c == 1 else {}) for c in sizes}


def _fold_decode_deltanet(g: Graph, sizes: list[int]) -> None:
    """The one-token step's delta rule where it runs gdr_step (by_chunk kernel "step") also does
    its q / k l2 normalisation and its gates (kernels/deltanet/launch.py gdr_step_fused): the
    delta rule records "fold" {"q", "k", "gates": the folded nodes' names}, those record
    "folded_into" (its name) at chunk 1 and launch nothing there; plan_memory keeps their inputs
    live to the delta rule's step. Only where the folded nodes feed nothing else and the raw
    q / k / v and the gate inputs are stored f32."""
    def sole_user(v, n) -> bool:
        return {u.id for u, _ in g.uses_of(v)} == {n.id}

    unique = _unique_names(g)
    for n in g.by_op(Op.CHUNK_GATED_DELTA_RULE):
        at = ((n.meta.get("kernel") or {}).get("by_chunk") or {}).get("1")
        if not at or at.get("kernel") != "step":
            continue
        q, k, v, gv, bv = n.inputs[:5]
        lq, lk, gates = g.node(q.node), g.node(k.node), g.node(gv.node)
        if lq.op != Op.L2_NORM or lk.op != Op.L2_NORM or lq.id == lk.id or gates.op != Op.DELTANET_GATES \
                or bv.node != gates.id or gv.index != 0 or bv.index != 1:
            continue
        if not (sole_user(q, n) and sole_user(k, n) and sole_user(gv, n) and sole_user(bv, n)):
            continue
        if any(_stored(g, x) != "f32" for x in (lq.inputs[0], lk.inputs[0], v, gates.inputs[0], gates.inputs[1])):
            continue
        if not {n.name, lq.name, lk.name, gates.name} <= unique:
            continue
        at["fold"] = {"q": lq.name, "k": lk.name, "gates": gates.name}
        for f in (lq, lk, gates):
            _mark_folded(f, n.name, sizes)


def _fold_decode_norms(g: Graph, sizes: list[int]) -> None:
    """The one-token step's add_rms_norm whose first reader is a one-row launch on its normed
    output runs inside that launch: a one-row product (a gemv group's first, or a product of
    its own: the DeltaNet and attention projections after attn_norm; kernels/dense/launch.py
    gemv_group norm=) or the fused router (the MoE after the post-attention norm;
    kernels/moe/launch.py moe_route1 add_norm=). That step records "norm" (the norm's name), the
    norm records "folded_into" (its name) at chunk 1 and launches nothing there; the launch
    writes the norm's sum and normed output for the later readers, and plan_memory keeps the
    norm's inputs live to its step. Only where the norm's operands are stored f32 (for the
    router its outputs too) and no step between the two reads the norm's outputs."""
    from ggfuse.kernels.dense.launch import GEMV1_TYPES

    unique = _unique_names(g)
    step = {n.id: i for i, n in enumerate(g.topo())}
    for n in g.by_op(Op.ADD_RMS_NORM):
        if n.name not in unique or any(_stored(g, v) != "f32" for v in n.inputs[:2]):
            continue
        if g.node(n.inputs[2].node).op not in (Op.WEIGHT, Op.FETCH_WEIGHTS):
            continue
        users = [u for i in range(len(n.outputs)) for u, _ in g.uses_of(n.value(i))]
        if not users:
            continue
        first = min(users, key=lambda u: step[u.id])
        if first.inputs[0] != n.value(0) or first.name not in unique:
            continue
        at = ((first.meta.get("kernel") or {}).get("by_chunk") or {}).get("1")
        if not at or int(g.type_of(first.inputs[1]).shape[-1]) != int(g.type_of(n.value(0)).shape[-1]):
            continue
        if first.op == Op.MATMUL:
            if at.get("impl") != "gemv" or at.get("w") not in GEMV1_TYPES or at.get("in_group"):
                continue
        elif first.op == Op.MOE_ROUTE:
            # the fused router (moe_route1 add_norm=) writes the normed row f32 for the experts
            if at.get("router") != "fused" or _stored(g, n.value(0)) != "f32" or _stored(g, n.value(1)) != "f32":
                continue
        else:
            continue
        at["norm"] = n.name
        _mark_folded(n, first.name, sizes)


def run(g: Graph, *, options, device_free: int | None = None) -> PassResult:
    """options: ggfuse.options.Options with a resolved target (not "auto" or "cpu")."""
    if options.target not in TARGETS:
        raise GGFuseError(None, f"lower_cuda needs a GPU target, got {options.target!r}")
    spec = TARGETS[options.target]
    g = g.copy()
    fold_softcap(g)
    sizes = capture_sizes(options.chunk, options.sub_chunks, options.sub_chunk_min, options.decode)
    tensors = _tensors(g)
    roles = weight_roles(g)
    dense_bf16, why = _dense_policy(g, tensors, roles, options=options, device_free=device_free)
    gemv_raw = _gemv_raw_tensors(g, tensors, options, sizes)
    forms = {name: forms_of(roles.get(name, {"gemm"}), t["ggml_type"], len(t["shape"]), precision=options.precision,
                            dense_bf16=dense_bf16, gemv_raw=name in gemv_raw) for name, t in tensors.items()}
    lay = _layouts(g, sizes)
    # RESHAPE: a view of its input, or a copy into its own buffer (a column slice merged across
    # heads, e.g. the attention gate): decided before the storage dtypes (a copy reads f32)
    for n in g.by_op(Op.RESHAPE):
        if g.node(n.inputs[0].node).op in (Op.WEIGHT, Op.FETCH_WEIGHTS) or \
                g.node(_root(g, n.inputs[0]).node).op in (Op.WEIGHT, Op.FETCH_WEIGHTS):
            n.meta["kernel"] = {"name": "view"}
        else:
            n.meta["kernel"] = {"name": "view"} if lay["views"].get(n.id, True) else {"name": "dense.copy"}
    bf16 = set() if (options.precision == "f32" or not options.bf16_act) else bf16_values(g, lay["views"])
    for n in g.topo():
        if n.op == Op.INPUT:
            st = "bf16" if n.attrs.get("state") in BF16_STATES else n.outputs[0].dtype.value
            n.meta["storage"] = [st]
        elif n.op in (Op.WEIGHT, Op.FETCH_WEIGHTS):
            continue
        elif n.op in (Op.SLICE, Op.RESHAPE) and n.meta.get("kernel", {"name": "view"})["name"] == "view":
            src = g.node(n.inputs[0].node)
            if src.op not in (Op.WEIGHT, Op.FETCH_WEIGHTS):     # a view has its source's storage
                n.meta["storage"] = [src.meta["storage"][n.inputs[0].index]]
        elif n.op in (Op.KV_APPEND, Op.KV_RING_APPEND):         # the value is the cache / ring itself
            n.meta["storage"] = list(g.node(n.inputs[0].node).meta["storage"])
        else:
            n.meta["storage"] = ["bf16" if n.value(i) in bf16 else t.dtype.value for i, t in enumerate(n.outputs)]
    lw = _Lowering(g, spec, options, sizes, forms, tensors, gemv_raw)
    for n in g.topo():
        if n.op in _NO_KERNEL:
            if n.op == Op.SLICE:
                n.meta["kernel"] = {"name": "view"}
            continue
        if n.op == Op.RESHAPE:
            if n.meta["kernel"]["name"] == "dense.copy" and lw.storage(n.inputs[0]) != "f32":
                raise GGFuseError(None, f"{n.name}: a bf16 value cannot be re-viewed as {list(n.outputs[0].shape)} "
                                        f"without a copy (compile with --bf16-act false)")
            continue
        rec, ws = lw.node(n)
        n.meta["kernel"] = rec
        if ws:
            n.meta["workspace"] = {str(c): w for c, w in ws.items()}
    _route_slot_experts(g, fuse=options.decode_router == "fused")
    if options.decode_gemv_group:
        _group_decode_gemvs(g)
    if options.decode_deltanet_fold:
        _fold_decode_deltanet(g, sizes)
    if options.decode_norm_fold:
        _fold_decode_norms(g, sizes)
    logits = g.outputs.get("logits")
    if logits is None or g.node(logits.node).op != Op.LM_HEAD:
        raise GGFuseError(None, "the CUDA lowering needs the logits to come from an LM_HEAD node")
    g.meta["lowering"] = {
        "target": spec.to_json(), "precision": options.precision, "captures": sizes,
        "dense_form": {"form": "bf16" if dense_bf16 else "raw", "why": why},
        "pdl": _pdl(options.pdl, spec),
    }
    g.meta["weights"] = {name: {"roles": sorted(roles.get(name, {"gemm"})), "forms": forms[name],
                                "ggml_type": t["ggml_type"], "shape": list(t["shape"]),
                                "device_bytes": sum(form_bytes(f, t["shape"], t["bytes"]) for f in forms[name])}
                         for name, t in sorted(tensors.items())}
    return PassResult(g, True)
