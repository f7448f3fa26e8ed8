"""Device scratch the CUDA runtime keeps beside the activation arena, as a function of the
graph and the chunk: per-op workspaces (the chunked delta rule's, the MoE router logits, route
histograms and the grouped GEMM's hidden rows), the LM head's output block and last row, and
the copies of views that cannot be strided (the attention gate). runtime/cuda/ops.py
allocates exactly these (sub-chunk executors share them); schedule_expert_prefetch counts
them against a --vram-budget. Pure shape arithmetic: no GPU needed.
"""
from __future__ import annotations

import numpy as np

from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType, shape_eval

HEAD_BLOCK = 128    # rows of logits per block of the all-rows LM head (runtime/cuda/ops.py)
HEAD_BLOCK_LEAN = 16  # the same under a --vram-budget that streams: time-to-first-token never uses it


def head_block(lean: bool) -> int:
    """Rows per block of the all-rows LM head: HEAD_BLOCK, or HEAD_BLOCK_LEAN when a budgeted
    plan sheds fixed costs (schedule_expert_prefetch records it as prefetch["head_block"])."""
    return HEAD_BLOCK_LEAN if lean else HEAD_BLOCK


def workspace_bytes(g, chunk: int, precision: str = "bf16", *, head_block: int = HEAD_BLOCK) -> dict:
    """{scratch name: bytes} for a chunk of `chunk` tokens (each name sized by its largest user);
    precision "f32": the f32 kernels' scratch (runtime/cuda/ops.py, precision="f32");
    head_block: rows per block of the all-rows LM head."""
    from ggfuse.kernels.deltanet import launch as dn
    from ggfuse.kernels.moe import launch as moe

    env = {"T": chunk, "P": 0}
    sizes: dict[str, int] = {}

    def put(key: str, n: int) -> None:
        sizes[key] = max(sizes.get(key, 0), int(n))

    def shape(v):
        return [int(d) for d in shape_eval(g.type_of(v).shape, env)]

    logits = g.outputs.get("logits")
    for n in g.nodes():
        if n.op == Op.CHUNK_GATED_DELTA_RULE:
            (T, Hk, K), (_, Hv, V) = shape(n.inputs[0]), shape(n.inputs[2])
            if dn.chunked_supported(K, V) and precision != "f32":
                f32 = g.type_of(n.inputs[0]).dtype == DType.F32
                put("deltanet_ws", dn.workspace_bytes(T, Hv, K, V, Hk=Hk, in_dtype="f32" if f32 else "bf16"))
        elif n.op == Op.MOE_ROUTE:
            E = shape(n.inputs[1])[0]
            put("router_logits", chunk * E * 4)
            put("moe_route_scratch", moe.route_scratch_ints(chunk, n.attrs.k, E) * 4)
        elif n.op == Op.MOE_GROUPED_GEMM:
            S = shape(n.inputs[2])[0]
            i = 4
            wg = shape(n.inputs[i])
            F = wg[1] // 2 if n.attrs.merged_gate_up else wg[1]
            i += 1 if n.attrs.merged_gate_up else 2
            i += 1
            D = shape(n.inputs[0])[1]
            if precision == "f32":
                put("moe_h_f32", S * F * 4)
                put("moe_y_f32", chunk * shape(n.inputs[1])[1] * D * 4)
            else:
                put("moe_h", S * F * 2)
                put("moe_x_bf16", chunk * D * 2)   # the bf16 copy of an f32 x (ops._moe_grouped_gemm)
            if n.attrs.shared:
                Fs = shape(n.inputs[i])[0]
                put("moe_hs_f32" if precision == "f32" else "moe_hs", chunk * Fs * (4 if precision == "f32" else 2))
                put("moe_ys", chunk * D * 4)
        if logits is not None and n.out == logits:
            vocab = shape(n.out)[-1]
            if n.op == Op.MATMUL:
                put("logits_block", min(chunk, head_block) * vocab * 4)
                put("lm_head.last", vocab * 4)
            else:
                put("logits", chunk * vocab * 4)
    # a column slice merged across heads cannot be a strided view: the runtime copies it into
    # buffers reused once their holder is dead (Ctx.scratch_live); the same allocation here
    from ggfuse.runtime.cuda.ops import last_use
    order = g.topo()
    step = {n.id: i for i, n in enumerate(order)}
    pool: list[int] = []                # buffer bytes
    busy: list[int] = []                # last step of each buffer's holder
    for n in order:
        if n.op == Op.RESHAPE and g.node(n.inputs[0].node).op == Op.SLICE:
            nb, first, last = int(np.prod(shape(n.out))) * 4, step[n.id], last_use(g, n.out, step)
            if reuse_slot(pool, busy, nb, first, last) < 0:
                pool.append(max(nb, 256))
                busy.append(last)
    if pool:
        sizes["reshape_copies"] = sum(pool)
    return sizes


def reuse_slot(sizes: list, busy: list, nbytes: int, first: int, last: int) -> int:
    """Buffer reuse by liveness: the index of a buffer of >= nbytes whose holder's last step is
    before `first`, now held until `last`; -1 when none is free (the caller adds one)."""
    for i, size in enumerate(sizes):
        if size >= nbytes and busy[i] < first:
            busy[i] = last
            return i
    return -1


def total_workspace_bytes(g, chunk: int, *, head_block: int = HEAD_BLOCK) -> int:
    return sum(workspace_bytes(g, chunk, head_block=head_block).values())
