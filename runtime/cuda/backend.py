"""CUDABackend: executes a plan's schedule with NVRTC kernels, one CUDA graph per chunk.

Life of a model:
1. weights go from the memory-mapped GGUF to the device once (progress on stderr), each in the
   form the runtime chooses per tensor: 1-D tensors as f32; stacked experts and the embedding
   table kept quantised (raw GGUF bytes, read by the kernels directly); other matrices
   dequantised to bf16 on the device when they fit, else kept quantised;
2. one activation arena laid out by the plan's memory plan (recomputed if the plan was compiled
   for another chunk), plus state buffers: a bf16 KV cache of max_context rows per attention
   layer, the conv windows and DeltaNet states in f32;
3. the schedule becomes a list of bound kernel launches (runtime/cuda/ops.py); the first chunk
   runs them eagerly (module loading, validation), then they are captured once on the compute
   stream as a CUDA graph and every chunk replays it. Everything that changes between chunks
   (token ids, positions, tokens already cached P, valid tokens of a padded last chunk) lives in
   small device buffers copied in before the replay, never in kernel arguments.
Under a --vram-budget plan, the streamed layers' experts are not uploaded: they live in the
memory-mapped GGUF and move into device slots during each chunk (runtime/cuda/streaming.py); a
chunk whose fetches need the host (staged or routed) is captured as several graphs with those
host steps between them. Such a plan may also gather the token embedding on the host
(prefetch["embedding"] == "host-gathered"): the table stays in the memory-mapped GGUF, and each
chunk's rows (raw bytes) are gathered into a page-locked buffer and uploaded with the chunk's
inputs; the device lookup reads row i for position i (HostEmbedding).
"""
from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

from ggfuse.errors import DeviceError, GGFuseError
from ggfuse.ir.ops import Op
from ggfuse.ir.types import DType, shape_eval
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


def _form_bytes(fmt: str, shape: tuple, raw_bytes: int) -> int:
    """Device bytes of a tensor in one form: its GGUF bytes (raw), or 2 / 4 per element."""
    return raw_bytes if fmt == "raw" else int(np.prod(shape)) * (4 if fmt == "f32" else 2)


SUB_CHUNK_MIN = 256
EMBED_STAGING = 2     # page-locked buffers of gathered embedding rows: one filled while one uploads


def sub_chunk_sizes(chunk: int) -> list[int]:
    """The smaller chunk sizes a backend compiles beside `chunk`: halvings down to SUB_CHUNK_MIN
    (env GGFUSE_SUBCHUNK_MIN), multiples of 64 from 128 up; GGFUSE_SUBCHUNKS=0: none."""
    if os.environ.get("GGFUSE_SUBCHUNKS") == "0":
        return []
    lo = int(os.environ.get("GGFUSE_SUBCHUNK_MIN", SUB_CHUNK_MIN))
    out, c = [], chunk // 2
    while c >= max(lo, 1):
        c = c // 64 * 64 if c >= 128 else c
        out.append(c)
        c //= 2
    return out


def context_for(prompt: int, chunk: int) -> int:
    """The KV-cache rows a prompt of `prompt` tokens needs when prefilled in chunks of `chunk`:
    the last piece runs the smallest compiled chunk size that holds it, padded to that size."""
    full = prompt // chunk * chunk
    tail = prompt - full
    if tail == 0:
        return max(prompt, 1)
    return full + min(c for c in sub_chunk_sizes(chunk) + [chunk] if c >= tail)


class HostEmbedding:
    """The token embedding of a plan that gathers it on the host: the GGUF table stays in the
    memory map; each chunk's rows (raw, still quantised) are gathered into a page-locked staging
    buffer and copied to a compact device table of `chunk` rows, stream ordered before the chunk.
    The device lookup reads row i for position i (an identity index), so the embedding kernel is
    unchanged. Sub-chunk executors share the buffers (they use their first rows)."""

    def __init__(self, be, name: str):
        entry = next((w for w in be.plan.weights if w.name == name), None)
        if entry is None or be._roles.get(name) != {"rows"}:
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
                 progress: bool = True, precision: str = "bf16"):
        import cupy as cp
        from ggfuse.passes import plan_memory

        self.cp = cp
        self.plan = plan
        # "f32": f32-faithful GEMMs on weights kept as the GGUF stores them (runtime/cuda/ops.py)
        self.precision = precision
        self.gf = gf
        self.chunk = int(chunk or plan.chunk)
        pre = plan.stats.get("prefetch") or {}
        self.max_context = int(max_context or pre.get("max_context") or 8192)
        g = plan.graph
        if (g.meta.get("memory") or {}).get("chunk") != self.chunk:
            g = plan_memory.run(g, chunk=self.chunk).graph
        self.graph = g
        self.env = {"T": self.chunk, "P": self.max_context - self.chunk}
        # smaller chunk sizes for short prompts and the tail of long ones: their own memory plan
        # and graphs, sharing the weights, states and arena (never two chunks at once)
        self.sub_graphs = {c: plan_memory.run(plan.graph, chunk=c).graph for c in self._sub_chunk_sizes()}
        self._views = {}
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.copy_stream = cp.cuda.Stream(non_blocking=True)
        self.progress = progress and os.environ.get("GGFUSE_QUIET") != "1"
        self.buf = DeviceBuffers()
        self.budget = (plan.stats.get("prefetch") or {}).get("budget_bytes")
        self.free_at_load = cp.cuda.runtime.memGetInfo()[0]
        self._bf16_dense = False
        self._roles = self._weight_roles()
        self.head_block = int(pre.get("head_block") or 0) or None    # None: workspace.HEAD_BLOCK
        self.embedding = None
        if pre.get("embedding") == "host-gathered":
            self.embedding = HostEmbedding(self, pre["embedding_tensor"])
        self.streamer = None
        if self.graph.by_op(Op.FETCH_WEIGHTS):
            from ggfuse.runtime.cuda.streaming import ExpertStreamer
            self.streamer = ExpertStreamer(self, self._roles)
        try:
            self._check_fits()
            self._upload_weights()
            if self.streamer is not None:
                self.streamer.allocate()
            self._allocate()
        except cp.cuda.memory.OutOfMemoryError as e:
            raise DeviceError(gf.path, f"out of GPU memory while loading ({e}); try a smaller --chunk, a lower "
                                       f"--max-context, or compile with --vram-budget") from None
        from ggfuse.runtime.cuda.ops import build_launches
        self.launches = build_launches(self)
        self.graphs = {}      # "body" / "head_last" -> captured CUDA graph
        self.host_stats = {"chunks": 0, "host_s": 0.0}
        self.reset()

    # ---- memory -------------------------------------------------------------------------------
    def _weight_roles(self) -> dict[str, set]:
        """How each GGUF tensor is read: "gemm" (a matmul / expert operand), "rows" (embedding
        lookup) or "f32" (norm weights, conv taps, gates). A tied embedding is both rows and gemm."""
        roles: dict[str, set] = {}
        g = self.graph

        def consumers(v):
            for u, i in g.uses_of(v):
                if u.op in (Op.RESHAPE, Op.FETCH_WEIGHTS):
                    yield from consumers(u.value(i if u.op == Op.FETCH_WEIGHTS else 0))
                else:
                    yield u, i
        for w in g.weights():
            r = roles.setdefault(w.attrs.tensor, set())
            for u, i in consumers(w.out):
                if u.op == Op.GET_ROWS:
                    r.add("rows")
                elif (u.op == Op.MATMUL and i == 1) or (u.op == Op.FFN_SWIGLU and i in (1, 2)) or \
                        (u.op == Op.MOE_GROUPED_GEMM and i >= 4):
                    r.add("gemm")
                else:
                    r.add("f32")
        return roles

    def _formats(self, name: str, roles: set, ggml_type: str, shape: tuple) -> list[str]:
        """Device forms of one tensor: "raw" GGUF bytes, "bf16" or "f32"."""
        out = []
        if "f32" in roles:
            out.append("f32")
        if "rows" in roles:
            out.append("raw")
        if "gemm" in roles and self.precision == "f32":
            out.append("raw")        # the f32 kernels dequantise GGUF blocks themselves, in f32
        elif "gemm" in roles:
            floaty = ggml_type in ("F32", "F16", "BF16")
            dense = len(shape) == 2
            out.append("bf16" if floaty or (dense and self._bf16_dense) else "raw")
        return list(dict.fromkeys(out))

    def _check_fits(self):
        cp = self.cp
        free, total = cp.cuda.runtime.memGetInfo()
        streamed = self._not_uploaded()
        w_raw = sum(w.nbytes for w in self.plan.weights if w.name not in streamed)
        if self.streamer is not None:
            w_raw += self.streamer.device_bytes()
        if self.embedding is not None:
            w_raw += self.embedding.device_bytes()
        dense_bf16 = sum(int(np.prod(w.shape)) * 2 for w in self.plan.weights if len(w.shape) == 2)
        states = self._state_bytes()
        arena = self._arena_bytes()
        need_raw = w_raw + states + arena + (256 << 20)
        # dense matrices go bf16 (faster GEMMs) only when that still fits the device and the
        # plan's budget; GGFUSE_DENSE=raw|bf16 forces it (tests compare like with like)
        room = 0.92 * (free if not self.budget else min(free, self.budget))
        force = os.environ.get("GGFUSE_DENSE", "auto")
        self._bf16_dense = force == "bf16" or (force != "raw" and need_raw + dense_bf16 < room)
        if need_raw > 0.95 * free:
            raise DeviceError(self.gf.path, f"the model needs {need_raw / 2**30:.2f} GiB on the GPU (weights "
                                            f"{w_raw / 2**30:.2f}, KV cache and states at {self.max_context} tokens "
                                            f"{states / 2**30:.2f}, activations of a {self.chunk}-token chunk "
                                            f"{arena / 2**30:.2f}) but {free / 2**30:.2f} GiB are free of "
                                            f"{total / 2**30:.2f}; compile with --vram-budget "
                                            f"{max(1, int(free * 0.9 / 2**30))}GiB or use a smaller --chunk / --max-context")

    def _not_uploaded(self) -> set:
        """Tensors that stay in the GGUF: streamed experts, a host-gathered embedding table."""
        out = set(self.streamer.tensors) if self.streamer is not None else set()
        if self.embedding is not None:
            out.add(self.embedding.name)
        return out

    def _state_bytes(self) -> int:
        n = 0
        for name, node in self.graph.states().items():
            shape = shape_eval(node.outputs[0].shape, {"P": self.max_context, "T": 0})
            n += int(np.prod(shape)) * (2 if "k_cache" in name or "v_cache" in name else 4)
        return n

    def _uploads(self) -> list:
        """(weight entry, device forms, numpy shape, bytes, part) of what is uploaded at load:
        every resident tensor whole (part False); of a streamed tensor the plan splits, its
        resident experts [0, first) (part True: runtime/cuda/streaming.py binds them)."""
        roles = self._roles
        streamed = self._not_uploaded()
        out = []
        for w in self.plan.weights:
            if w.name not in streamed:
                fmts = self._formats(w.name, roles.get(w.name, {"gemm"}), w.ggml_type, tuple(w.shape))
                out.append((w, fmts, tuple(w.shape), w.nbytes, False))
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
        sizes = [align_up(_form_bytes(fmt, shape, nbytes)) for _, fmts, shape, nbytes, _ in uploads for fmt in fmts]
        block = cp.empty(max(sum(sizes), 256), dtype=cp.uint8)
        self.buf.block = block
        at = 0
        for w, fmts, shape, nbytes, part in uploads:
            staging[:nbytes] = self.gf.raw(w.name)[:nbytes]
            dev = None
            if "raw" not in fmts:       # a raw copy only to dequantise from: temporary
                dev = cp.empty(nbytes, dtype=cp.uint8)
                dev.set(staging[:nbytes], stream=self.copy_stream)
            for fmt in sorted(fmts, key=lambda f: f != "raw"):     # raw first: the others dequantise it
                size = _form_bytes(fmt, shape, nbytes)
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
        """(array, format, ggml type, numpy shape) of a tensor in the form `role` needs."""
        fmts = self.buf.formats[name]
        want = {"rows": ["raw"], "f32": ["f32"], "gemm": ["bf16", "raw"]}[role]
        for f in want:
            if f in fmts:
                return self.buf.weights[(name, f)]
        raise GGFuseError(None, f"cuda: tensor {name!r} was not uploaded in a form for {role} (have {fmts})")

    def _sub_chunk_sizes(self) -> list[int]:
        return sub_chunk_sizes(self.chunk)

    def _arena_bytes(self) -> int:
        return max([self.graph.meta["memory"]["peak_bytes"], 256] +
                   [g.meta["memory"]["peak_bytes"] for g in self.sub_graphs.values()])

    def executor_for(self, n: int) -> "CUDABackend":
        """The executor of an n-token chunk: the smallest compiled chunk size that holds it."""
        fits = [c for c in self.sub_graphs if c >= n]
        if not fits:
            return self
        c = min(fits)
        v = self._views.get(c)
        if v is None:
            from ggfuse.runtime.cuda.ops import build_launches
            v = copy.copy(self)     # shares weights, states, arena, streams, scalars
            v.chunk, v.graph, v.sub_graphs, v._views, v.graphs = c, self.sub_graphs[c], {}, {}, {}
            v.env = {"T": c, "P": self.max_context - c}
            v.tokens_dev, v.pos_dev = self.tokens_dev[:c], self.pos_dev[:c]
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
        if self.embedding is not None:
            self.embedding.allocate(self)
        self.states = {}
        for name, node in self.graph.states().items():
            t = node.outputs[0]
            if "P" in str(t.shape[0]):
                shape = (self.max_context,) + tuple(int(d) for d in t.shape[1:])
                self.states[name] = cp.zeros(shape, dtype=cp.uint16)  # bf16 bits
            else:
                self.states[name] = cp.zeros(tuple(int(d) for d in t.shape), dtype=cp.float32)

    def arena_view(self, node, index: int = 0, dtype=None):
        """The arena bytes of a value as a CuPy array of its shape at T = chunk (in `dtype`
        when given: a bf16 copy of an f32 value takes the first half of its slot)."""
        cp = self.cp
        off = node.meta["arena"][index]
        t = node.outputs[index]
        shape = shape_eval(t.shape, {"T": self.chunk, "P": 0})
        dt = dtype or {DType.F32: cp.float32, DType.I32: cp.int32, DType.BF16: cp.uint16}[t.dtype]
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        return self.arena[off:off + n].view(dt).reshape(shape)

    # ---- execution ----------------------------------------------------------------------------
    def reset(self) -> None:
        for a in self.states.values():
            a.fill(0)
        self.n_past = 0
        self.cp.cuda.Device().synchronize()

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
        host = np.zeros(self.chunk, dtype=np.int32)
        host[:n] = tokens
        pos = (self.n_past + np.arange(self.chunk)).astype(np.int32)
        s = self.stream
        self.tokens_dev.set(host, stream=s)
        self.pos_dev.set(pos, stream=s)
        self.past_dev.set(np.array([self.n_past], np.int32), stream=s)
        self.nvalid_dev.set(np.array([n], np.int32), stream=s)
        if self.embedding is not None:
            self.embedding.stage(host, s)
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
        if self.head_all is None:          # logits not from a matmul: computed inside the body
            logits = self.logits_view
            rows = logits[n - 1:n] if want == "last" else logits[:n]
        elif want == "last":
            self._replay("head_last", self.head_last)
            rows = self.logits_last_view
        else:
            return self.head_all(n)        # every row, in blocks, straight to the host
        out = cp.asnumpy(rows, stream=s)
        s.synchronize()
        return out

    def _replay(self, key: str, launches: list) -> None:
        """Run `launches` on the compute stream: the first time eagerly (module loading, launch
        checks), then captured once as a CUDA graph that every later call replays (several
        graphs with the host steps between them, when the schedule has host steps)."""
        from ggfuse.runtime.cuda.streaming import HostStep, SegmentedProgram, split_segments
        s = self.stream
        g = self.graphs.get(key)
        if g is not None:
            g.launch(s)
            return
        with s:
            for fn in launches:
                fn()
        if os.environ.get("GGFUSE_EAGER") == "1":
            return
        s.synchronize()
        if any(isinstance(fn, HostStep) for fn in launches):
            self.graphs[key] = SegmentedProgram([x if isinstance(x, HostStep) else self._capture(x)
                                                 for x in split_segments(launches)])
        else:
            self.graphs[key] = self._capture(launches)

    def _capture(self, launches: list):
        s = self.stream
        # Capturing records the launches without running them; the state the eager run
        # produced stays as it is.
        s.begin_capture()
        try:
            with s:   # launches that use "the current stream" must record into the capture too
                for fn in launches:
                    fn()
        finally:
            g = s.end_capture()
        return g

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
        self.graphs, self._views, self.launches = {}, {}, []
        self.head_all = self.head_last = self.logits_view = self.logits_last_view = None
        self.ctx = None
        self.buf = DeviceBuffers()
        self.arena, self.states = None, {}
        self.embedding = None
        self.scratch_shared = {"named": {}, "live": []}
        gc.collect()
        cp = self.cp
        for pool in ("get_default_memory_pool", "get_default_pinned_memory_pool"):
            if hasattr(cp, pool):
                getattr(cp, pool)().free_all_blocks()

    @property
    def cuda_graph(self):
        """The captured graph of the chunk body (None before the first chunk)."""
        return self.graphs.get("body")
