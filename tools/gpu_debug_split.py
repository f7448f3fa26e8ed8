"""Diagnose a streamed plan against resident on the device (not a test; run by hand):

    python tools/gpu_debug_split.py [layers_of_room=2.5]

writes a 4-layer synthetic Qwen3.5-35B-A3B Q4_K_M to /tmp (once), plans it with room for that
many layers' experts beside the fixed part, runs one 512-token chunk launch by launch on both
plans, reads every streamed tensor's experts back through its expert table right after the
layer's MoE (they must equal the GGUF's bytes), and prints each layer's MoE input and output
error against resident. Session 4 used it to tell f32-atomics noise (growing through the random
router's near ties) from a streaming fault."""
import os, sys, ctypes
import numpy as np
import cupy as cp
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from ggfuse.compiler.synth import write_synth
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.ir.ops import Op
from ggfuse.runtime.cuda.backend import CUDABackend
from ggfuse.kernels.moe.table import ExpertTable
from test_cuda_streaming import compile_gguf, tight_budget   # lowered for sm_90a, dense matrices raw
path = "/tmp/q35-4l.gguf"
if not os.path.exists(path):
    write_synth("qwen3.5-35b-a3b", "q4_k_m", path, layers=4, progress=False)
gf = GGUFFile(path)
full = compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048)
layers = float(sys.argv[1]) if len(sys.argv) > 1 else 2.5
plan = compile_gguf(gf.path, chunk=512, gf=gf, max_context=2048, vram_budget=tight_budget(full, layers=layers))
print("split", plan.stats["prefetch"]["streamed_experts"], "slots", plan.stats["prefetch"]["slots"])
tokens = np.random.default_rng(0).integers(0, plan.hparams["n_vocab"], size=512)

def step_run(p, check_tables=False):
    be = CUDABackend(p, gf, chunk=512, progress=False)
    be.stage_inputs(tokens)
    outs = {}
    for node, fn in zip(be.launch_nodes, be.launches):
        with be.stream:
            with be.building():
                fn()
        be.stream.synchronize(); be.copy_stream.synchronize()
        if node.op == Op.MOE_GROUPED_GEMM:
            outs[node.name] = (cp.asnumpy(be.ctx.v(node.inputs[0])), cp.asnumpy(be.ctx.v(node.out)))
            if check_tables and be.streamer is not None:
                layer = int(node.name.split(".")[1])
                f = be.streamer.by_layer.get(layer)
                if f is None:
                    continue
                for pc in f.pieces:
                    arr = be.weight(pc.name, "gemm")[0]
                    raw = gf.raw(pc.name)
                    bad = []
                    for e in range(pc.n_experts):
                        ptr = int(arr.ptrs[e]) if isinstance(arr, ExpertTable) else arr.data.ptr + e * pc.dev_e
                        host = np.empty(pc.dev_e, np.uint8)
                        cp.cuda.runtime.memcpy(host.ctypes.data, ptr, pc.dev_e, 2)
                        if not np.array_equal(host, raw[e * pc.src_e:(e + 1) * pc.src_e]):
                            bad.append(e)
                    print(f"  {pc.name}: first {pc.first}, experts wrong through the table: {bad[:10]} ({len(bad)})")
    be.close()
    return outs

ref = step_run(full)
got = step_run(plan, check_tables=True)
for k in ref:
    xr, yr = ref[k]; xg, yg = got[k]
    sc = np.abs(yr).max()
    print(f"{k}: x err {np.abs(xr - xg).max() / np.abs(xr).max():.2e}  out err {np.abs(yr - yg).max() / sc:.2e}")
