"""Diagnose a GPU/CPU mismatch node by node: run one chunk on the GPU one launch at a time and
compare every value it writes with the CPU reference interpreter's value for the same node.

    python tools/gpu_debug_compare.py MODEL.gguf [n_tokens] [chunk] [target]
"""
import sys

import numpy as np

from ggfuse.compiler.driver import compile_gguf
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.interpret import interpret_values
from ggfuse.ir.ops import Op
from ggfuse.runtime.weights import WeightStore


def cpu_values(graph, gf, tokens, past=0, state=None, weights=None):
    """Every value of one chunk on the CPU reference (ir.interpret_values); `state` maps state
    names to carried arrays (zeros when absent)."""
    from ggfuse.ir.types import shape_eval
    weights = weights or WeightStore(gf)
    env = {"T": len(tokens), "P": past}
    feeds = {"tokens": tokens.astype(np.int32), "positions": (past + np.arange(len(tokens))).astype(np.int32)}
    for name, n in graph.states().items():
        feeds[name] = state[name] if state is not None and name in state else \
            np.zeros(shape_eval(n.outputs[0].shape, env), np.float32)
    feeds = {k: v for k, v in feeds.items() if k in graph.inputs()}
    return interpret_values(graph, feeds, weights, env)


def to_f32(cp, a):
    h = cp.asnumpy(a)
    if h.dtype == np.uint16:
        h = (h.astype(np.uint32) << 16).view(np.float32)
    return h.astype(np.float32)


def _check_attention(cp, be, node, cpu, past, nv):
    """Split an attention mismatch: are the KV caches right, and is the kernel right on its own
    (GPU) inputs?"""
    from ggfuse.kernels.attention import ref as aref
    q = to_f32(cp, be.ctx.vals[node.inputs[0]])[:nv]
    kc = to_f32(cp, be.ctx.vals[node.inputs[1]])[: past + nv]
    vc = to_f32(cp, be.ctx.vals[node.inputs[2]])[: past + nv]
    kr, vr = np.asarray(cpu[node.inputs[1]]), np.asarray(cpu[node.inputs[2]])
    for nm, g, r in (("k cache", kc, kr), ("v cache", vc, vr)):
        print(f"      {nm}: rows {g.shape} vs {r.shape}, err {np.max(np.abs(g - r)) / (np.max(np.abs(r)) or 1):.2e}")
    own = aref.attention(q, kc, vc, scale=node.attrs.scale)
    out = to_f32(cp, be.ctx.vals[node.out])[:nv]
    print(f"      kernel vs numpy on the GPU's own inputs: {np.max(np.abs(out - own)) / (np.max(np.abs(own)) or 1):.2e}")
    print(f"      q strides {be.ctx.vals[node.inputs[0]].strides} out strides {be.ctx.vals[node.out].strides} "
          f"k_cache {be.ctx.vals[node.inputs[1]].shape} scale {node.attrs.scale}")


def main(path, n=16, chunk=None, target="auto"):
    """n tokens in chunks of `chunk` (default: one chunk); every chunk compared node by node."""
    import cupy as cp
    from ggfuse.runtime.cuda.backend import CUDABackend
    chunk = chunk or n
    gf = GGUFFile(path)
    plan = compile_gguf(path, chunk=chunk, gf=gf, target=target)
    be = CUDABackend(plan, gf, chunk=chunk, progress=False)
    tokens = np.random.default_rng(0).integers(0, plan.hparams["n_vocab"], n)
    weights = WeightStore(gf)
    state = None
    worst = 0.0
    for c0 in range(0, n, chunk):
        tk = tokens[c0:c0 + chunk]
        nv = len(tk)
        cpu = cpu_values(be.graph, gf, tk, past=c0, state=state, weights=weights)
        state = {k: cpu[v] for k, v in be.graph.outputs.items() if k != "logits"}
        be.stage_inputs(tk)
        print(f"--- chunk at {c0}: {nv} valid of {chunk}")
        for node, fn in zip(be.launch_nodes, be.launches):   # the LM head runs after the body
            with be.building(), be.stream:
                fn()
            be.stream.synchronize()
            for i in range(len(node.outputs)):
                v = node.value(i)
                arr = be.ctx.vals.get(v)
                if arr is None or v not in cpu:
                    continue
                g = to_f32(cp, arr)
                r = np.asarray(cpu[v], dtype=np.float32)
                if g.shape != r.shape and g.ndim and r.ndim and g.shape[1:] == r.shape[1:] and g.shape[0] >= r.shape[0]:
                    g = g[c0:c0 + r.shape[0]] if g.shape[0] > chunk else g[: r.shape[0]]   # KV cache rows / padding
                if g.shape != r.shape:
                    print(f"  skip {node.name} {node.op.value}:{i} shapes gpu {g.shape} cpu {r.shape}")
                    continue
                scale = float(np.max(np.abs(r))) or 1.0
                err = float(np.nanmax(np.abs(g - r))) / scale if np.isfinite(g).all() else float("inf")
                flag = "  <-- " if err > 2e-2 else ""
                worst = max(worst, err)
                print(f"{err:10.2e}  {node.op.value:<24} {node.name}:{i} {list(r.shape)}{flag}")
            if node.op == Op.ATTENTION:
                _check_attention(cp, be, node, cpu, c0, nv)
        be.n_past += nv
    print("worst", worst)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16,
         int(sys.argv[3]) if len(sys.argv) > 3 else None, sys.argv[4] if len(sys.argv) > 4 else "auto")
