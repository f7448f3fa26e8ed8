"""Where a budgeted plan's device memory goes (a diagnostic, run on the device):

    python tools/gpu_memstages.py MODEL.gguf [budget=12GiB] [chunk=2048]

prints device-wide use (memGetInfo against the start), the CuPy pool and what lies outside it
after each load stage (weights, streaming slots, arena and states, launches) and after an eager,
a captured and a replayed chunk. Measured for the synthetic Qwen3.5-35B-A3B Q4_K_M at 2048 under
12 GiB (session 4): 32.5 MiB outside the pool at the end, which sized the plan's reserve."""
import sys, numpy as np, cupy as cp
from ggfuse.compiler.driver import compile_gguf
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.runtime.cuda import backend as B
path = sys.argv[1]
budget = sys.argv[2] if len(sys.argv) > 2 else "12GiB"
chunk = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
cp.cuda.runtime.memGetInfo(); free0 = cp.cuda.runtime.memGetInfo()[0]
pool = cp.get_default_memory_pool()
def show(what):
    free = cp.cuda.runtime.memGetInfo()[0]
    print(f"{what:<28} device-wide {(free0 - free) / 2**30:7.3f} GiB  pool {pool.total_bytes() / 2**30:7.3f} GiB  "
          f"outside {((free0 - free) - pool.total_bytes()) / 2**20:8.1f} MiB", flush=True)
for name in ("_upload_weights", "_allocate"):
    orig = getattr(B.CUDABackend, name)
    def wrap(self, *a, __o=orig, __n=name, **k):
        r = __o(self, *a, **k); show("after " + __n); return r
    setattr(B.CUDABackend, name, wrap)
from ggfuse.runtime.cuda import streaming as S
orig_alloc = S.ExpertStreamer.allocate
def alloc(self):
    r = orig_alloc(self); show("after streamer.allocate"); return r
S.ExpertStreamer.allocate = alloc
gf = GGUFFile(path)
plan = compile_gguf(path, chunk=chunk, gf=gf, vram_budget=budget, max_context=chunk)
show("compiled")
from ggfuse.runtime.api import Model
be = B.CUDABackend(plan, gf, chunk=chunk, progress=False)
show("backend built")
m = Model(plan, gf, be, chunk)
tok = np.random.default_rng(0).integers(0, plan.hparams["n_vocab"], chunk)
m.prefill(tok, logits="last"); cp.cuda.Device().synchronize(); show("eager chunk")
m.reset(); m.prefill(tok, logits="last"); cp.cuda.Device().synchronize(); show("captured + replay")
m.reset(); m.prefill(tok, logits="last"); cp.cuda.Device().synchronize(); show("replay")
print("device_memory()", be.device_memory(), "plan budget", plan.stats["prefetch"]["budget_bytes"])
