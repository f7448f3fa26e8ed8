"""CUDABackend: executes a lowered plan with NVRTC kernels, one CUDA graph per chunk.

The plan says what runs (passes/lower_cuda.py): every kernel and variant, each weight's device
forms, each value's storage dtype, each launch's workspace and where it lives in the arena, the
chunk sizes to capture. This backend only carries it out:
1. weights go from the memory-mapped GGUF to the device once (progress on stderr), in the forms
   the plan lists per tensor (graph meta "weights": raw GGUF bytes, bf16 or f32);
2. one arena of the plan's size (activations and workspace of every captured chunk size: the
   memory plan laid each out), plus state buffers: a bf16 KV cache of max_context rows per
   attention layer, the conv windows and DeltaNet states in f32;
3. the schedule becomes a list of bound kernel launches (runtime/cuda/ops.py: a lookup from the
   kernel record's name to a launcher); the first chunk runs them eagerly (module loading,
   validation), then they are captured once on the compute stream as a CUDA graph and every
   chunk replays it. Everything that changes between chunks (token ids, positions, tokens
   already cached P, valid tokens of a padded last chunk) lives in small device buffers copied
   in before the replay, never in kernel arguments.
Under a --vram-budget plan, the streamed layers' experts are not uploaded: they live in the
memory-mapped GGUF and move into device slots during each chunk (runtime/cuda/streaming.py); a
chunk whose fetches need the host (staged or routed) is captured as several graphs with those
host steps between them. Its one-token step uses an expert cache instead
(runtime/cuda/decode_cache.py): the step is cut after each streamed layer's router, the host
copies the token's missing experts into cache slots and the grouped GEMM reads them through the
cache's expert tables. Such a plan may also gather the token embedding on the host
(prefetch["embedding"] == "host-gathered"): the table stays in the memory-mapped GGUF, and each
chunk's rows (raw bytes) are gathered into a page-locked buffer and uploaded with the chunk's
inputs; the device lookup reads row i for position i (HostEmbedding).
"""
from __future__ import annotations

import copy
import sys
import time

import numpy as np

from ggfuse.errors import DeviceError, GGFuseError, PlanError
from ggfuse.ir.ops import Op
from ggfuse.ir.types import shape_eval
from ggfuse.passes.lower_cuda import context_for, form_bytes, state_bytes  # noqa: F401  (context_for: bench)
from ggfuse.passes.schedule_expert_prefetch import align_up


def _progress(done: int, total: int, t0: float, what: str, final: bool = False):
    if not sys.stderr.isatty() and not final and done % max(total // 8, 1) > 0:
        return
    el = max(time.perf_counter() - t0, 1e-9)
    msg = f"\r{what}: {done / 2**20:8.1f} / {total / 2**20:.1f} MiB  {done / el / 2**30:5.2f} GiB/s"
    sys.stderr.write(msg + ("\n" if final or not sys.stderr.isatty() else ""))
    sys.stderr.flush()


class DeviceBuffers:
    """Every value of the schedule as a CuPy array: weights, arena views, states, I/O."""

    def __init__(self):
        self.values = {}     # Value -> cupy array (shape at T = chunk)
        self.weights = {}    # (tensor name, format) -> (cupy array, format, ggml type, shape)
        self.formats = {}    # tensor name -> formats uploaded
        self.parts = {}      # streamed tensor name -> its resident experts [0, first) (one format)
        self.tables = {}     # key -> device expert table (kernels/moe/table.py), built before capture
        self.block = None    # the one allocation the uploaded weights are carved from


EMBED_STAGING = 2     # page-locked buffers of gathered embedding rows: one filled while one uploads
RUNTIME_RESERVE = 256 << 20   # device memory kept free beside the plan's buffers at load (graphs, modules)


class HostEmbedding:
    """The token embedding of a plan that gathers it on the host: the GGUF table stays in the
    memory map; each chunk's rows (raw, still quantised) are gathered into a page-locked staging
    buffer and copied to a compact device table of `chunk` rows, stream ordered before the chunk.
    The device lookup reads row i for position i (an identity index), so the embedding kernel is
    unchanged. Sub-chunk executors share the buffers (they use their first rows)."""

    def __init__(self, be, name: str):
        entry = next((w for w in be.plan.weights if w.name == name), None)
        if entry is None or be.weight_info(name).get("roles") != ["rows"]:
            raise GGFuseError(be.gf.path, f"plan gathers {name!r} on the host but the graph does not read it "
                                          f"as an embedding only; recompile the plan")
        self.name, self.ggml_type, self.shape = name, entry.ggml_type, tuple(entry.shape)
        self.rows = int(self.shape[0])
        self.row_bytes = int(entry.nbytes) // self.rows
        self.table = be.gf.raw(name).reshape(self.rows, self.row_bytes)
        self.cp = be.cp
        self.chunk = be.chunk

    def device_bytes(self) -> int:
        return self.chunk * (self.row_bytes + 4)

    def allocate(self, be) -> None:
        cp = self.cp
        self.dev = cp.zeros(self.chunk * self.row_bytes, dtype=cp.uint8)
        self.ids = cp.zeros(self.chunk, dtype=cp.int32)
        self.ids.set(np.arange(self.chunk, dtype=np.int32))
        self._host = []
        for _ in range(EMBED_STAGING):
            mem = cp.cuda.alloc_pinned_memory(self.chunk * self.row_bytes)
            self._host.append((mem, np.frombuffer(mem, dtype=np.uint8, count=self.chunk * self.row_bytes)
                               .reshape(self.chunk, self.row_bytes)))
        self._done = [None] * EMBED_STAGING
        self._next = 0
        # the lookup reads the compact table: what be.weight(name, "rows") returns
        be.buf.weights[(self.name, "raw")] = (self.dev, "raw", self.ggml_type, (self.chunk, self.shape[1]))
        be.buf.formats[self.name] = ["raw"]

    def stage(self, tokens: np.ndarray, stream) -> None:
        """Gather the rows of `tokens` (a chunk's ids, padded) and upload them on `stream`."""
        n = int(tokens.shape[0])
        if n and (int(tokens.min()) < 0 or int(tokens.max()) >= self.rows):
            bad = int(tokens[(tokens < 0) | (tokens >= self.rows)][0])
            raise GGFuseError(None, f"token id {bad} is outside the vocabulary 0..{self.rows - 1}")
        b = self._next
        self._next = (b + 1) % EMBED_STAGING
        if self._done[b] is not None:
            self._done[b].synchronize()   # the buffer's previous upload has finished
        host = self._host[b][1]
        np.take(self.table, tokens, axis=0, out=host[:n], mode="clip")
        self.dev[:n * self.row_bytes].set(host[:n].reshape(-1), stream=stream)
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(stream)
        self._done[b] = ev



class CUDABackend:
    name = "cuda"

    def __init__(self, plan, gf, chunk: int | None = None, *, max_context: int | None = None,
                 progress: bool = True, options=None):
        """options: ggfuse.options.Options (its runtime fields: stream_host, eager)."""
        import cupy as cp
        from ggfuse.kernels import target as tgt
        from ggfuse.options import Options, quiet

        self.cp = cp
        self.plan = plan
        self.gf = gf
        self.options = options if options is not None else Options()
        low = plan.graph.meta.get("lowering")
        if not low:
            raise PlanError(plan.source.get("path"), f"plan was compiled for target {plan.target!r}, not lowered "
                                                     f"for a GPU; recompile with `ggfuse compile --target sm_90a` "
                                                     f"(or sm_89 / sm_80) to run it on cuda")
        self.target = tgt.from_json(low["target"])
        cc = int(cp.cuda.Device().compute_capability)
        if not self.target.runs_on(cc):
            raise DeviceError(gf.path, f"plan was lowered for {self.target.name} (compute capability "
                                       f"{self.target.cc}{' only' if self.target.wgmma else ' or newer'}) but this GPU "
                                       f"has compute capability {cc}; recompile with --target "
                                       f"{tgt.for_device(cc).name if tgt.for_device(cc) else 'cpu'}")
        self.precision = low["precision"]
        # programmatic dependent launch (kernels/graph.py); plans before 8.1 have no record: off
        self.pdl = bool((low.get("pdl") or {}).get("on")) and cc >= 90
        self._pdl_edges = [0]       # shared with the smaller chunk sizes' executors (copies)
        self.captures = [int(c) for c in low["captures"]]
        self.chunk = int(plan.chunk)
        if chunk is not None and int(chunk) not in self.captures:
            raise PlanError(plan.source.get("path"), f"plan captures chunk sizes {self.captures}, not {chunk}; "
                                                     f"recompile with --chunk {chunk}")
        pre = plan.stats.get("prefetch") or {}
        self.max_context = int(max_context or pre.get("max_context") or plan.options.get("max_context") or 8192)
        g = plan.graph
        by_chunk = (g.meta.get("memory") or {}).get("by_chunk") or {}
        missing = [c for c in self.captures if str(c) not in by_chunk]
        if missing:
            raise PlanError(plan.source.get("path"), f"plan has no memory plan for captured chunk sizes {missing}; "
                                                     f"recompile it")
        self.graph = g
        self.env = {"T": self.chunk, "P": self.max_context - self.chunk}
        self._views = {}
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.progress = progress and not quiet()
        self.buf = DeviceBuffers()
        self.budget = pre.get("budget_bytes")
        self.free_at_load = cp.cuda.runtime.memGetInfo()[0]
        self.head_block = None
        self.embedding = self.ple_rows = None
        ple = {g.tensor_of(n.inputs[0]) for n in g.by_op(Op.PLE_GATHER)}
        for name, w in self.weights_meta().items():
            if w.get("residency") == "host-gathered":
                # the token embedding, or Gemma 4's per-layer-embedding table (PLE_GATHER reads it)
                if name in ple:
                    self.ple_rows = HostEmbedding(self, name)
                else:
                    self.embedding = HostEmbedding(self, name)
        self.streamer = None
        if self.graph.by_op(Op.FETCH_WEIGHTS):
            from ggfuse.runtime.cuda.streaming import ExpertStreamer
            self.streamer = ExpertStreamer(self)
        self.decode_cache = None
        dec = self.graph.meta.get("decode_cache") or {}
        if dec.get("slots") and self.streamer is not None:
            from ggfuse.runtime.cuda.decode_cache import DecodeExpertCache
            self.decode_cache = DecodeExpertCache(self, dec)
        try:
            self._check_fits()
            self._upload_weights()
            if self.streamer is not None:
                self.streamer.allocate()
            self._allocate()
            if self.decode_cache is not None:
                self.decode_cache.allocate()      # slots in the prefill slots, the arena, the spare budget
        except cp.cuda.memory.OutOfMemoryError as e:
            raise DeviceError(gf.path, f"out of GPU memory while loading ({e}); try a smaller --chunk, a lower "
                                       f"--max-context, or compile with --vram-budget") from None
        from ggfuse.runtime.cuda.ops import build_launches
        with self.building():
            self.launches = build_launches(self)
        self.graphs = {}      # "body" / "head_last" -> captured CUDA graph
        self.host_stats = {"chunks": 0, "host_s": 0.0}
        self.reset()

    def building(self):
        """Kernels looked up inside are built for the plan's target (kernels/target.py)."""
        from ggfuse.kernels.target import building_for
        return building_for(self.target)

    # ---- memory -------------------------------------------------------------------------------
    def weights_meta(self) -> dict:
        return self.graph.meta.get("weights") or {}

    def weight_info(self, name: str) -> dict:
        w = self.weights_meta().get(name)
        if w is None:
            raise PlanError(self.plan.source.get("path"), f"plan lists no device form for tensor {name!r}; recompile it")
        return w

    def forms(self, name: str) -> list[str]:
        return list(self.weight_info(name)["forms"])

    def _check_fits(self):
        cp = self.cp
        free, total = cp.cuda.runtime.memGetInfo()
        w = sum(int(x["device_bytes"]) for x in self.weights_meta().values())
        if self.streamer is not None:
            w += self.streamer.n_slots * self.streamer.slot_bytes
        if self.decode_cache is not None:
            w += self.decode_cache.spare_bytes()
        for host in self._host_tables():
            w += host.device_bytes()
        states = self._state_bytes()
        arena = self._arena_bytes()
        need = w + states + arena + RUNTIME_RESERVE
        if need > 0.95 * free:
            raise DeviceError(self.gf.path, f"the plan needs {need / 2**30:.2f} GiB on the GPU (weights "
                                            f"{w / 2**30:.2f}, KV cache and states at {self.max_context} tokens "
                                            f"{states / 2**30:.2f}, arena of a {self.chunk}-token chunk "
                                            f"{arena / 2**30:.2f}) but {free / 2**30:.2f} GiB are free of "
                                            f"{total / 2**30:.2f}; compile with --vram-budget "
                                            f"{max(1, int(free * 0.9 / 2**30))}GiB or use a smaller --chunk / --max-context")

    def _host_tables(self) -> list:
        """The tables gathered on the host per chunk: the token embedding, the PLE table."""
        return [t for t in (self.embedding, self.ple_rows) if t is not None]

    def _not_uploaded(self) -> set:
        """Tensors that stay in the GGUF: streamed experts, host-gathered embedding tables."""
        out = set(self.streamer.tensors) if self.streamer is not None else set()
        out |= {t.name for t in self._host_tables()}
        return out

    def _state_bytes(self) -> int:
        return state_bytes(self.graph, self.max_context)

    def _uploads(self) -> list:
        """(weight entry, device forms, numpy shape, bytes, part) of what is uploaded at load:
        every resident tensor whole (part False); of a streamed tensor the plan splits, its
        resident experts [0, first) (part True: runtime/cuda/streaming.py binds them)."""
        streamed = self._not_uploaded()
        out = []
        for w in self.plan.weights:
            if w.name not in streamed:
                out.append((w, self.forms(w.name), tuple(w.shape), w.nbytes, False))
            elif self.streamer is not None and w.name in self.streamer.tensors:
                p = self.streamer.tensors[w.name][0][1]
                if p.first > 0:
                    out.append((w, [p.fmt], (p.first,) + tuple(w.shape[1:]), p.first * p.src_e, True))
        return out

    def _upload_weights(self):
        cp = self.cp
        from ggfuse.kernels.dense import launch as dense
        uploads = self._uploads()
        total = sum(n for _, _, _, n, _ in uploads)
        done = 0
        t0 = time.perf_counter()
        biggest = max((n for _, _, _, n, _ in uploads), default=1)
        pinned = cp.cuda.alloc_pinned_memory(max(biggest, 1))
        staging = np.frombuffer(pinned, dtype=np.uint8, count=max(biggest, 1))
        # every device form in one allocation, carved at 256-byte offsets: hundreds of separate
        # allocations would each round up to the driver's 2 MiB pages (measured: ~0.2 GiB of a
        # 35B-A3B plan under a 12 GiB budget, outside the pool's count)
        sizes = [align_up(form_bytes(fmt, shape, nbytes)) for _, fmts, shape, nbytes, _ in uploads for fmt in fmts]
        block = cp.empty(max(sum(sizes), 256), dtype=cp.uint8)
        self.buf.block = block
        at = 0
        with self.building():
            for w, fmts, shape, nbytes, part in uploads:
                staging[:nbytes] = self.gf.raw(w.name)[:nbytes]
                dev = None
                if "raw" not in fmts:       # a raw copy only to dequantise from: temporary
                    dev = cp.empty(nbytes, dtype=cp.uint8)
                    dev.set(staging[:nbytes], stream=self.copy_stream)
                for fmt in sorted(fmts, key=lambda f: f != "raw"):     # raw first: the others dequantise it
                    size = form_bytes(fmt, shape, nbytes)
                    view = block[at:at + size]
                    at += align_up(size)
                    if fmt == "raw":
                        view.set(staging[:nbytes], stream=self.copy_stream)
                        arr = dev = view
                    else:
                        row = shape[-1]
                        out = view.view(cp.float32 if fmt == "f32" else cp.uint16)
                        dense.dequantize(dev, w.ggml_type, int(np.prod(shape)) // row, row, out, stream=self.copy_stream)
                        arr = out.reshape(shape)
                    if part:
                        self.buf.parts[w.name] = arr
                    else:
                        self.buf.weights[(w.name, fmt)] = (arr, fmt, w.ggml_type, shape)
                if not part:
                    self.buf.formats[w.name] = fmts
                self.copy_stream.synchronize()   # the staging buffer is reused by the next tensor
                done += nbytes
                if self.progress:
                    _progress(done, total, t0, "uploading weights")
        if self.progress:
            _progress(done, total, t0, "uploading weights", final=True)
        pool = getattr(cp, "get_default_memory_pool", None)
        if pool is not None:
            pool().free_all_blocks()      # the raw copies of dequantised tensors

    def weight(self, name: str, role: str):
        """(array, format, ggml type, numpy shape) of a tensor in the form `role` needs, as the
        plan uploaded it ("gemm": bf16 where the plan dequantised it, else raw)."""
        fmts = self.buf.formats[name]
        want = {"rows": ["raw"], "raw": ["raw"], "f32": ["f32"], "gemm": ["bf16", "raw"]}[role]
        for f in want:
            if f in fmts:
                return self.buf.weights[(name, f)]
        raise GGFuseError(None, f"cuda: tensor {name!r} was not uploaded in a form for {role} (have {fmts})")

    def _arena_bytes(self) -> int:
        return max(int(self.graph.meta["memory"]["arena_bytes"]), 256)

    def executor_for(self, n: int) -> "CUDABackend":
        """The executor of an n-token chunk: the smallest captured chunk size that holds it."""
        fits = [c for c in self.captures if c >= n]
        c = min(fits) if fits else self.chunk
        if c >= self.chunk:
            return self
        v = self._views.get(c)
        if v is None:
            from ggfuse.runtime.cuda.ops import build_launches
            v = copy.copy(self)     # shares weights, states, arena, streams, scalars
            v.chunk, v._views, v.graphs = c, {}, {}
            v.env = {"T": c, "P": self.max_context - c}
            v.tokens_dev, v.pos_dev = self.tokens_dev[:c], self.pos_dev[:c]
            with self.building():
                v.launches = build_launches(v)
            self._views[c] = v
        v.n_past = self.n_past
        return v

    def _allocate(self):
        cp = self.cp
        self.arena = cp.empty(self._arena_bytes(), dtype=cp.uint8)
        self.tokens_dev = cp.zeros(self.chunk, dtype=cp.int32)
        self.pos_dev = cp.zeros(self.chunk, dtype=cp.int32)
        self.past_dev = cp.zeros(1, dtype=cp.int32)
        self.nvalid_dev = cp.zeros(1, dtype=cp.int32)
        for host in self._host_tables():
            host.allocate(self)
        self.states = {}
        for name, node in self.graph.states().items():
            t = node.outputs[0]
            shape = shape_eval(t.shape, {"P": self.max_context, "T": 0})
            bf16 = node.meta.get("storage", ["f32"])[0] == "bf16"
            self.states[name] = cp.zeros(shape, dtype=cp.uint16 if bf16 else cp.float32)

    def arena_view(self, node, index: int = 0):
        """The arena bytes of a value as a CuPy array of its shape at T = chunk, in its storage
        dtype, at the offset the memory plan gave it for this chunk size."""
        cp = self.cp
        off = node.meta["arena"][str(self.chunk)][index]
        t = node.outputs[index]
        shape = shape_eval(t.shape, {"T": self.chunk, "P": 0})
        dt = {"f32": cp.float32, "i32": cp.int32, "bf16": cp.uint16}[node.meta.get("storage", [t.dtype.value] * len(node.outputs))[index]]
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        return self.arena[off:off + n].view(dt).reshape(shape)

    def workspace_view(self, node, name: str, shape, dtype):
        """A launch's workspace `name` (passes/lower_cuda.py declared it, plan_memory placed it)
        as a CuPy array of `shape` / `dtype` (at most the declared bytes)."""
        key = str(self.chunk)
        try:
            off = node.meta["workspace_at"][key][name]
            size = node.meta["workspace"][key][name]
        except KeyError:
            raise PlanError(self.plan.source.get("path"), f"{node.name}: the plan places no workspace {name!r} at "
                                                          f"chunk {self.chunk}; recompile it") from None
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes > size:
            raise PlanError(self.plan.source.get("path"), f"{node.name}: workspace {name!r} needs {nbytes} bytes, "
                                                          f"the plan declares {size}")
        return self.arena[off:off + nbytes].view(dtype).reshape(shape)

    # ---- execution ----------------------------------------------------------------------------
    def reset(self) -> None:
        for a in self.states.values():
            a.fill(0)
        self.n_past = 0
        self.cp.cuda.Device().synchronize()

    # ---- snapshots (runtime/snapshot.py): the prefix cache's side of the state -------------------
    def snapshot(self, start: int = 0, where: str = "device"):
        """The state now, copied stream-ordered after the chunks before it: of each KV cache the
        rows [start, n_past) only, every other state (conv windows, DeltaNet states) whole; into
        new device arrays ("device", device-to-device copies) or host arrays ("host")."""
        from ggfuse.runtime.snapshot import WHERE, StateSnapshot, positional_states
        if where not in WHERE:
            raise ValueError(f"snapshot where must be one of {WHERE}, not {where!r}")
        if not 0 <= start <= self.n_past:
            raise ValueError(f"snapshot start {start} is outside 0..{self.n_past}")
        cp, s = self.cp, self.stream
        positional = positional_states(self.graph)
        rows, whole = {}, {}
        with s:
            for name, a in self.states.items():
                src = a[start:self.n_past] if name in positional else a
                (rows if name in positional else whole)[name] = (src.copy() if where == "device"
                                                                 else cp.asnumpy(src, stream=s))
        s.synchronize()
        return StateSnapshot(start, self.n_past, rows, whole, where)

    def restore(self, pieces) -> None:
        """Put back the state of a chain of snapshots covering positions [0, n): each one's KV
        rows into their rows of the caches, the last one's other states whole; stream-ordered
        before the next chunk (the captured graphs read these same buffers)."""
        from ggfuse.runtime.snapshot import check_chain
        check_chain(pieces)
        s = self.stream
        if pieces[-1].stop > self.max_context:
            raise GGFuseError(self.gf.path, f"a snapshot of {pieces[-1].stop} positions does not fit the KV cache "
                                            f"of {self.max_context}")
        def put(dst, src, where):
            if where == "device":
                dst[...] = src              # a device-to-device copy on the current stream
            else:
                dst.set(src, stream=s)

        last = pieces[-1]
        with s:
            for p in pieces:
                for name, a in p.rows.items():
                    put(self.states[name][p.start:p.stop], a, p.where)
            for name, a in last.whole.items():
                put(self.states[name], a, last.where)
        s.synchronize()     # the cache may free a snapshot once it is restored
        self.n_past = last.stop

    def stage_inputs(self, tokens: np.ndarray) -> int:
        """Copy a chunk's token ids, positions, P and n_valid into their device buffers (stream
        ordered before the replay that reads them). Returns n_valid."""
        n = int(tokens.shape[0])
        if n > self.chunk:
            raise GGFuseError(None, f"chunk of {n} tokens is longer than the compiled chunk {self.chunk}")
        if self.n_past + self.chunk > self.max_context:
            # the chunk's graph appends all of its (padded) rows to the KV cache
            raise GGFuseError(self.gf.path, f"a {self.chunk}-token chunk at position {self.n_past} needs "
                                            f"{self.n_past + self.chunk} KV-cache rows but the cache holds "
                                            f"{self.max_context}; use --max-context >= {self.n_past + self.chunk} "
                                            f"or a smaller --chunk")
        if self.decode_cache is not None and self.chunk != self.decode_cache.chunk:
            self.decode_cache.invalidate()      # this chunk overwrites the memory the cache lives in
        host = np.zeros(self.chunk, dtype=np.int32)
        host[:n] = tokens
        pos = (self.n_past + np.arange(self.chunk)).astype(np.int32)
        s = self.stream
        self.tokens_dev.set(host, stream=s)
        self.pos_dev.set(pos, stream=s)
        self.past_dev.set(np.array([self.n_past], np.int32), stream=s)
        self.nvalid_dev.set(np.array([n], np.int32), stream=s)
        for table in self._host_tables():
            table.stage(host, s)
        return n

    def run_chunk(self, tokens: np.ndarray, want: str = "all") -> np.ndarray:
        """One chunk: the body graph, then the LM head for every row ("all"), for the last valid
        row only ("last", a GEMV reading the stored weight) or not at all ("none")."""
        cp = self.cp
        ex = self.executor_for(int(tokens.shape[0]))
        if ex is not self:
            out = ex.run_chunk(tokens, want)
            self.n_past = ex.n_past
            return out
        t0 = time.perf_counter()
        n = self.stage_inputs(tokens)
        s = self.stream
        self._replay("body", self.launches)
        # host time of a chunk: staging its inputs and launching its graph (asynchronous), i.e.
        # what the CPU spends per chunk while the GPU works; shared with the sub-chunk executors
        self.host_stats["chunks"] += 1
        self.host_stats["host_s"] += time.perf_counter() - t0
        self.n_past += n
        if want == "none":
            return None
        if want == "last":
            self._replay("head_last", self.head_last)
            rows = self.logits_last_view
        else:
            with self.building():
                return self.head_all(n)        # every row, in blocks, straight to the host
        out = cp.asnumpy(rows, stream=s)
        s.synchronize()
        return out

    def _replay(self, key: str, launches: list) -> None:
        """Run `launches` on the compute stream: the first time eagerly (module loading, launch
        checks), then captured once as a CUDA graph that every later call replays (several
        graphs with the host steps between them, when the schedule has host steps). With the
        runtime option eager, every call runs eagerly."""
        from ggfuse.runtime.cuda.streaming import HostStep, SegmentedProgram, split_segments
        s = self.stream
        g = self.graphs.get(key)
        if g is not None:
            g.launch(s)
            return
        with self.building(), s:
            for fn in launches:
                fn()
        if self.options.eager:
            return
        s.synchronize()
        with self.building():
            if any(isinstance(fn, HostStep) for fn in launches):
                self.graphs[key] = SegmentedProgram([x if isinstance(x, HostStep) else self._capture(x)
                                                     for x in split_segments(launches)])
            else:
                self.graphs[key] = self._capture(launches)

    def _capture(self, launches: list):
        # Capturing records the launches without running them; the state the eager run
        # produced stays as it is.
        from ggfuse.kernels.graph import capture
        g = capture(self.stream, launches, pdl=self.pdl)
        self._pdl_edges[0] += getattr(g, "pdl_edges", 0)
        return g

    @property
    def pdl_edges(self) -> int:
        """Programmatic edges in every graph captured so far, at every chunk size."""
        return self._pdl_edges[0]

    def device_memory(self) -> dict:
        """Measured device memory: what this process's CuPy pool holds (weights, slots, arena,
        states, scratch) and how much less the device has free than before loading (that also
        counts CUDA graphs, modules and other processes' changes)."""
        cp = self.cp
        free, total = cp.cuda.runtime.memGetInfo()
        pool = getattr(cp, "get_default_memory_pool", None)
        return {"pool_bytes": int(pool().total_bytes()) if pool else None,
                "used_since_load_bytes": int(self.free_at_load - free), "device_total_bytes": int(total)}

    def close(self) -> None:
        """Give the device back: the page-locked GGUF regions and staging threads (streamed
        plans), the captured graphs, and every device array this backend holds (weights, arena,
        states, scratch, the sub-chunk executors'), then CuPy's cached blocks. The backend
        cannot run after this; calling it again does nothing."""
        import gc
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        self.decode_cache = None
        self.graphs, self._views, self.launches = {}, {}, []
        self.head_all = self.head_last = self.logits_last_view = None
        self.ctx = None
        self.buf = DeviceBuffers()
        self.arena, self.states = None, {}
        self.embedding = self.ple_rows = None
        gc.collect()
        cp = self.cp
        for pool in ("get_default_memory_pool", "get_default_pinned_memory_pool"):
            if hasattr(cp, pool):
                getattr(cp, pool)().free_all_blocks()

    def decode_cache_report(self) -> dict | None:
        """The decode expert cache's hit rate and bytes moved per decoded token (None without one)."""
        return self.decode_cache.report() if self.decode_cache is not None else None

    @property
    def cuda_graph(self):
        """The captured graph of the chunk body (None before the first chunk)."""
        return self.graphs.get("body")
