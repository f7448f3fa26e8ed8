"""Streamed experts on the CUDA device: the plan's FETCH_WEIGHTS steps as host -> device copies
into fixed device slots, overlapped with compute.

The plan (passes/schedule_expert_prefetch.py) pins some MoE layers and streams the others through
`slots` device buffers; a layer's fetch uses slot `attrs.slot` and sits in the schedule right
after the last reader of that slot's previous layer (and, "routed", after the layer's routing).

- Device: a slot is one buffer holding a layer's stacked expert tensors back to back, each laid
  out exactly as the GGUF stores it ([E, N, K], expert e at e * N * row_bytes), so a streamed
  layer's grouped GEMM gets the slot's address where a resident layer's gets its weight's: one
  kernel, no change. Streamed tensors are never uploaded.
- Host, "registered" (the fast path): the GGUF's memory-mapped expert regions are page-locked in
  place (cudaHostRegister, portable + read-only), so the copies DMA straight from the page cache.
  "staged" (registration refused, F32/F16 experts the host must convert to bf16, or the
  runtime option stream_host=staged): a ring of pinned staging buffers allocated once, filled one fetch ahead
  by a thread pool (numpy copies release the GIL), with madvise(WILLNEED) read-ahead of the
  following fetches' regions, so a cold page cache reads from disk while the GPU works.
- Ordering, by events both ways: a fetch records `fork` on the compute stream (the slot's last
  reader is before it) and the copy stream waits for it, copies, records `done`; the compute
  stream waits for `done` right before the layer's first expert consumer ("join"). In registered
  "all" mode these are plain stream operations, so they are captured into the chunk's one CUDA
  graph (the copy stream forks from and joins back into the capture). A staged fetch needs a
  filled staging buffer and a routed fetch needs the routing read back, so those are HostSteps:
  the backend runs them between separately captured segments (runtime/cuda/backend.py).

Telemetry: with `timing` set (an eager instrumented run, runtime/bench.py), each fetch records
timed events around its copies and each join around its wait.
"""
from __future__ import annotations

import collections
import concurrent.futures
import mmap
import os
import sys
from dataclasses import dataclass

import numpy as np

from ggfuse.errors import DeviceError, GGFuseError
from ggfuse.ir.ops import Op
from ggfuse.passes.schedule_expert_prefetch import SLOT_ALIGN, align_up

ALIGN = SLOT_ALIGN             # byte alignment of each tensor inside a slot (the plan's layout)
H2D = 1                        # cudaMemcpyHostToDevice
REGISTER_PORTABLE = 0x01       # cudaHostRegisterPortable
REGISTER_READ_ONLY = 0x08      # cudaHostRegisterReadOnly: the mapping is PROT_READ
STAGING_BUFFERS = 2            # one being copied while the next is filled
FILL_PIECE = 64 << 20          # bytes per thread-pool task when filling a staging buffer
READ_AHEAD = 2                 # fetches whose regions are madvised while one is filled


def note(msg: str) -> None:
    print(f"ggfuse: note: {msg}", file=sys.stderr)


@dataclass(frozen=True)
class Piece:
    """One streamed tensor in one fetch: its experts [first, end) arrive in this fetch's slot
    (a layer's fetches cover [first of the first, E); before that the experts stay resident).
    Where the streamed bytes are in the file and in the slot."""
    name: str
    fmt: str            # device form: "raw" GGUF bytes, or "bf16"
    ggml_type: str
    shape: tuple        # numpy order [E, N, K]
    file_offset: int    # the tensor's first byte in the GGUF (expert 0)
    src_e: int          # bytes of one expert in the GGUF
    dev_e: int          # bytes of one expert on the device
    first: int          # the first expert of this fetch
    end: int            # one past its last
    slot_offset: int

    @property
    def src_bytes(self) -> int:
        """Streamed bytes in the GGUF (experts [first, end)), from src_offset on."""
        return (self.end - self.first) * self.src_e

    @property
    def src_offset(self) -> int:
        return self.file_offset + self.first * self.src_e

    @property
    def dev_bytes(self) -> int:
        """Streamed bytes in the slot."""
        return (self.end - self.first) * self.dev_e

    @property
    def convert(self) -> bool:
        """F32/F16 experts: the grouped GEMM reads bf16, so the host converts while staging."""
        return self.fmt == "bf16" and self.ggml_type in ("F32", "F16")

    @property
    def n_experts(self) -> int:
        return int(self.shape[0])


@dataclass
class Fetch:
    layer: int
    slot: int
    mode: str           # "all" or "routed"
    pieces: list
    node_id: int

    @property
    def dev_bytes(self) -> int:
        return sum(p.dev_bytes for p in self.pieces)

    @property
    def first(self) -> int:
        """This fetch's first expert (the same for every tensor of the layer)."""
        return self.pieces[0].first if self.pieces else 0

    @property
    def end(self) -> int:
        return self.pieces[0].end if self.pieces else 0


def _nothing():
    """A schedule step with no work (a prefill fetch in the decode cache's one-token step)."""


class HostStep:
    """A schedule step that needs the host (a filled staging buffer, a routing read back): the
    backend cuts the capture around it and runs it eagerly between the captured segments."""

    def __init__(self, fn, what: str):
        self.fn = fn
        self.what = what

    def __call__(self):
        self.fn()

    def __repr__(self):
        return f"HostStep({self.what})"


def split_segments(launches: list) -> list:
    """[closures..., HostStep, closures...] -> [[closures], HostStep, [closures]] (no empties)."""
    out, cur = [], []
    for fn in launches:
        if isinstance(fn, HostStep):
            if cur:
                out.append(cur)
                cur = []
            out.append(fn)
        else:
            cur.append(fn)
    if cur:
        out.append(cur)
    return out


class SegmentedProgram:
    """A chunk captured as several CUDA graphs with host steps between: launch() runs them in
    order on the compute stream (graph launches are stream ordered; host steps enqueue their
    own stream work)."""

    def __init__(self, items: list):
        self.items = items

    @property
    def n_graphs(self) -> int:
        return sum(1 for x in self.items if not isinstance(x, HostStep))

    def launch(self, stream):
        for x in self.items:
            if isinstance(x, HostStep):
                with stream:
                    x()
            else:
                x.launch(stream)


def fetch_of(g, value):
    """The FETCH_WEIGHTS node a value comes from (through reshapes), or None."""
    n = g.node(value.node)
    while n.op == Op.RESHAPE:
        n = g.node(n.inputs[0].node)
    return n if n.op == Op.FETCH_WEIGHTS else None


def fetch_chain(g, value) -> list:
    """Every FETCH_WEIGHTS a value passed through, first to last: a layer streamed in pieces
    has one fetch per piece, each passing the weights on to the next."""
    out = []
    n = fetch_of(g, value)
    while n is not None:
        out.append(n)
        n = fetch_of(g, n.inputs[0])
    return out[::-1]


class ExpertStreamer:
    """Slots, the host side and the fetch/join steps of a backend's streamed layers. One per
    backend; the sub-chunk executors share it (their schedules fetch the same layers in the
    same order, and never two chunks run at once)."""

    def __init__(self, be):
        self.be = be
        self.cp = be.cp
        g = be.graph
        entries = {w.name: w for w in be.plan.weights}
        order = {n.id: i for i, n in enumerate(g.topo())}
        self.fetches: list[Fetch] = []
        for n in sorted(g.by_op(Op.FETCH_WEIGHTS), key=lambda n: order[n.id]):
            pieces, off = [], 0
            first = int(n.attrs.get("first_expert", 0) or 0)
            end = n.attrs.get("end_expert")
            for v in n.inputs[: n.attrs.n_weights]:
                try:
                    name = g.tensor_of(v)
                except KeyError as e:
                    raise GGFuseError(None, f"fetch {n.name}: {e}") from None
                w = entries[name]
                fmts = be.forms(name)
                if fmts not in (["raw"], ["bf16"]):
                    raise DeviceError(be.gf.path, f"streamed tensor {name} is read as {fmts}; only grouped-GEMM "
                                                  f"expert operands can stream")
                dev = w.nbytes if fmts[0] == "raw" or w.ggml_type == "BF16" else int(np.prod(w.shape)) * 2
                E = int(w.shape[0])
                stop = E if end is None else int(end)
                if not 0 <= first < stop <= E or w.nbytes % E or dev % E:
                    raise DeviceError(be.gf.path, f"streamed tensor {name}: cannot stream experts "
                                                  f"{first}..{stop} of {E}")
                p = Piece(name, fmts[0], w.ggml_type, tuple(w.shape), int(w.offset), int(w.nbytes) // E,
                          dev // E, first, stop, off)
                pieces.append(p)
                off = align_up(off + p.dev_bytes)
            self.fetches.append(Fetch(int(n.attrs.layer), int(n.attrs.slot), n.attrs.mode, pieces, n.id))
        self.by_node = {f.node_id: f for f in self.fetches}
        self.by_layer: dict[int, list[Fetch]] = {}
        for f in self.fetches:
            self.by_layer.setdefault(f.layer, []).append(f)
        self.tensors: dict[str, list] = {}          # tensor -> [(fetch, piece)] in expert order
        for f in self.fetches:
            for p in f.pieces:
                self.tensors.setdefault(p.name, []).append((f, p))
        for name, fps in self.tensors.items():
            fps.sort(key=lambda fp: fp[1].first)
            if fps[-1][1].end != fps[-1][1].n_experts or any(a[1].end != b[1].first for a, b in zip(fps, fps[1:])):
                raise DeviceError(be.gf.path, f"streamed tensor {name}: the fetches do not cover its last experts "
                                              f"in one run ({[(p.first, p.end) for _, p in fps]})")
        self.n_slots = max((f.slot for f in self.fetches), default=-1) + 1
        self.slot_bytes = max((align_up(sum(align_up(p.dev_bytes) for p in f.pieces)) for f in self.fetches), default=0)
        self.host_mode = None
        self.timing = None          # a dict while an instrumented run records copy / wait events
        self.routed_counts = {}     # layer -> experts copied by the last routed fetch
        self.routed_totals = {}     # layer -> experts routed to in that chunk (resident ones too)
        self._registered = []
        self._pool = self._filler = None
        self._ring = collections.deque()
        self._seq = 0

    # ---- sizes --------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """The slots and the streamed layers' resident experts."""
        return self.n_slots * self.slot_bytes + sum(fps[0][1].first * fps[0][1].dev_e for fps in self.tensors.values())

    def resident_experts(self, name: str) -> int:
        """How many of a streamed tensor's experts stay resident (uploaded at load): [0, this)."""
        return self.tensors[name][0][1].first

    def bytes_per_chunk(self) -> int:
        return sum(f.dev_bytes for f in self.fetches if f.mode == "all")

    # ---- set-up -------------------------------------------------------------------------------
    def allocate(self) -> None:
        """Slot buffers, and each streamed tensor bound to what backend.weight() returns for it:
        a whole streamed layer's tensor is its view in the slot; a split one (experts [0, first)
        resident, uploaded by the backend into buf.parts) an ExpertTable of per-expert addresses,
        the resident experts' and the slot's. Then the host side."""
        from ggfuse.kernels.moe.table import ExpertTable, strided
        cp = self.cp
        be = self.be
        self.slot_buffers = [cp.empty(max(self.slot_bytes, ALIGN), dtype=cp.uint8) for _ in range(self.n_slots)]
        for name, fps in self.tensors.items():
            f0, p0 = fps[0]
            if len(fps) == 1 and p0.first == 0:     # a whole layer in one fetch: its view in the slot
                base = self.slot_buffers[f0.slot]
                raw = base[p0.slot_offset:p0.slot_offset + p0.dev_bytes]
                arr = raw if p0.fmt == "raw" else raw.view(cp.uint16).reshape(p0.shape)
            else:
                ptrs = np.zeros(p0.n_experts, dtype=np.uint64)
                keep = []
                if p0.first:
                    part = be.buf.parts[name]
                    keep.append(part)
                    ptrs[:p0.first] = strided(part.data.ptr, p0.first, p0.dev_e)
                for f, p in fps:
                    base = self.slot_buffers[f.slot]
                    keep.append(base)
                    ptrs[p.first:p.end] = strided(base.data.ptr + p.slot_offset, p.end - p.first, p.dev_e)
                arr = ExpertTable(ptrs, p0.shape, keep=keep)
            be.buf.weights[(name, p0.fmt)] = (arr, p0.fmt, p0.ggml_type, p0.shape)
            be.buf.formats[name] = [p0.fmt]
        self._setup_host()

    def _setup_host(self) -> None:
        want = self.be.options.stream_host
        self.file_base = int(self.be.gf._data.ctypes.data)
        if any(p.convert for f in self.fetches for p in f.pieces):
            if want == "registered":
                note(f"{self.be.gf.path}: F32/F16 experts are converted to bf16 on the host; staging them")
            want = "staged"
        if want != "staged":
            err = self._register()
            if err is None:
                self.host_mode = "registered"
                return
            note(f"{self.be.gf.path}: cannot page-lock the GGUF's expert regions ({err}); "
                 f"staging them through pinned buffers instead (slower)")
        self.host_mode = "staged"
        self._setup_staging()

    def _regions(self) -> list[tuple[int, int]]:
        """Page-aligned, merged [start, end) file ranges of every streamed tensor."""
        page = mmap.PAGESIZE
        spans = sorted((p.src_offset // page * page, align_up(p.src_offset + p.src_bytes, page))
                       for f in self.fetches for p in f.pieces)
        merged = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b) for a, b in merged]

    def _register(self):
        """Page-lock the streamed regions of the mapping; None on success, else the reason."""
        rt = self.cp.cuda.runtime
        try:
            for a, b in self._regions():
                rt.hostRegister(self.file_base + a, b - a, REGISTER_PORTABLE | REGISTER_READ_ONLY)
                self._registered.append(self.file_base + a)
        except Exception as e:  # noqa: BLE001 -- any refusal (flag unsupported, memlock limit) falls back
            self._unregister()
            return f"{type(e).__name__}: {e}"
        self._keep_map = self.be.gf._data     # the mapping must outlive the registration
        return None

    def _unregister(self) -> None:
        rt = self.cp.cuda.runtime
        while self._registered:
            try:
                rt.hostUnregister(self._registered.pop())
            except Exception:  # noqa: BLE001 -- best effort at teardown
                pass

    def close(self) -> None:
        """Give back the page locks and the fill threads (the device buffers go with the backend)."""
        self._unregister()
        for ex in (self._filler, self._pool):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
        self._filler = self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ---- staged host side ---------------------------------------------------------------------
    def _setup_staging(self) -> None:
        cp = self.cp
        n = max(self.slot_bytes, ALIGN)
        self._staging = []
        for _ in range(STAGING_BUFFERS):
            mem = cp.cuda.alloc_pinned_memory(n)
            self._staging.append((mem, np.frombuffer(mem, dtype=np.uint8, count=n)))
        self._staging_free = [None] * STAGING_BUFFERS     # copy-done event of the buffer's last copy
        workers = max(1, min(8, os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ggfuse-stage")
        self._filler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ggfuse-fill")
        self._mm = getattr(self.be.gf._data, "_mmap", None)
        # the ring: whole-layer fills of the "all" fetches, in schedule order, one ahead per buffer
        self._cycle = [i for i, f in enumerate(self.fetches) if f.mode == "all"]
        self._seq = 0
        for k in range(min(STAGING_BUFFERS, len(self._cycle))):
            self._ring.append(self._submit_fill(k))

    def _advise(self, f: Fetch) -> None:
        for p in f.pieces:
            page = mmap.PAGESIZE
            a = p.src_offset // page * page
            try:
                if self._mm is not None:
                    self._mm.madvise(mmap.MADV_WILLNEED, a, p.src_offset + p.src_bytes - a)
                else:
                    fd = os.open(self.be.gf.path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, a, p.src_offset + p.src_bytes - a, os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
            except (OSError, ValueError, AttributeError):
                return      # read-ahead is a hint

    def _copy_into(self, dst: np.ndarray, p: Piece, e0: int = 0, e1: int | None = None) -> list:
        """Thread-pool tasks that write experts [e0, e1) of `p` (within [p.first, p.end); default:
        all of them) into dst (slot layout: expert e at p.slot_offset + (e - p.first) * dev_e)."""
        e0 = max(e0, p.first)
        e1 = p.end if e1 is None else min(e1, p.end)
        src_e, dev_e = p.src_e, p.dev_e
        raw = self.be.gf.raw(p.name)
        at = p.slot_offset - p.first * dev_e      # where expert 0 would be
        if p.convert:
            from ggfuse.kernels.dequant.ref import f32_to_bf16_bits
            dt = np.float32 if p.ggml_type == "F32" else np.float16
            per = max(1, FILL_PIECE // max(src_e, 1))
            tasks = []
            for a in range(e0, e1, per):
                b = min(e1, a + per)

                def conv(a=a, b=b):
                    x = raw[a * src_e:b * src_e].view(dt).astype(np.float32)
                    dst[at + a * dev_e:at + b * dev_e].view(np.uint16)[:] = f32_to_bf16_bits(x)
                tasks.append(self._pool.submit(conv))
            return tasks
        lo, hi = e0 * src_e, e1 * src_e
        return [self._pool.submit(np.copyto, dst[at + a:at + min(hi, a + FILL_PIECE)],
                                  raw[a:min(hi, a + FILL_PIECE)])
                for a in range(lo, hi, FILL_PIECE)]

    def _submit_fill(self, k: int):
        """Fill staging buffer k % STAGING_BUFFERS with fetch self._cycle[k % len(cycle)], once
        the buffer's previous copy has finished; returns (fetch index, buffer, future)."""
        fi = self._cycle[k % len(self._cycle)]
        b = k % STAGING_BUFFERS
        wait = self._staging_free[b]
        f = self.fetches[fi]
        nxt = [self.fetches[self._cycle[(k + j) % len(self._cycle)]] for j in range(1, READ_AHEAD + 1)]

        def fill():
            if wait is not None:
                wait.synchronize()
            for x in nxt:
                self._advise(x)
            tasks = [t for p in f.pieces for t in self._copy_into(self._staging[b][1], p)]
            for t in tasks:
                t.result()
        return fi, b, self._filler.submit(fill)

    def _next_filled(self, fi: int) -> int:
        """Wait for the ring's fill of fetch `fi`; returns its staging buffer."""
        want_fi, b, fut = self._ring.popleft()
        if want_fi != fi:     # an interrupted chunk broke the cycle: start it again here
            for _, _, pending in [(want_fi, b, fut)] + list(self._ring):
                pending.result()
            self._ring.clear()
            self._seq = self._cycle.index(fi)
            for j in range(STAGING_BUFFERS):
                self._ring.append(self._submit_fill(self._seq + j))
            want_fi, b, fut = self._ring.popleft()
        fut.result()
        return b

    def _refill(self, b: int, done) -> None:
        self._staging_free[b] = done
        self._seq += 1
        self._ring.append(self._submit_fill(self._seq + STAGING_BUFFERS - 1))

    # ---- schedule steps -----------------------------------------------------------------------
    @staticmethod
    def _decoding(be) -> bool:
        """Is `be` the one-token executor of a plan with a decode cache (runtime/cuda/decode_cache.py)?"""
        dc = getattr(be, "decode_cache", None)
        return dc is not None and be.chunk == dc.chunk

    def step(self, ctx, node):
        """The fetch step of a FETCH_WEIGHTS node: a capturable closure (registered, all) or a
        HostStep. Its `done` event is remembered for the join."""
        cp = self.cp
        be = ctx.be
        if self._decoding(be):
            return _nothing         # the one-token step copies its misses at the router instead
        f = self.by_node[node.id]
        fi = self.fetches.index(f)
        fork = cp.cuda.Event(disable_timing=True)
        done = cp.cuda.Event(disable_timing=True)
        ctx.fetch_done = getattr(ctx, "fetch_done", {})
        ctx.fetch_done[node.id] = done
        slot = self.slot_buffers[f.slot].data.ptr
        rt = cp.cuda.runtime

        def issue(copies, nbytes):
            s, c = be.stream, be.copy_stream
            fork.record(s)            # the slot's last reader (and, routed, the routing) is before
            c.wait_event(fork)
            t = self.timing
            if t is not None:
                e0 = cp.cuda.Event()
                e0.record(c)
            for dst, src, n in copies:
                rt.memcpyAsync(dst, src, n, H2D, c.ptr)
            if t is not None:
                e1 = cp.cuda.Event()
                e1.record(c)
                t.setdefault("copies", []).append((f.layer, nbytes, e0, e1))
            done.record(c)

        if f.mode == "routed":
            offsets = ctx.v(next(v for v in node.inputs[node.attrs.n_weights:]
                                 if ctx.t(v).dtype.value == "i32"))
            return HostStep(lambda: self._routed(f, offsets, issue), f"routed fetch of layer {f.layer}")
        if self.host_mode == "registered":
            copies = [(slot + p.slot_offset, self.file_base + p.src_offset, p.src_bytes) for p in f.pieces]
            nbytes = f.dev_bytes
            return lambda: issue(copies, nbytes)

        def staged():
            b = self._next_filled(fi)
            host = self._staging[b][1].ctypes.data
            issue([(slot + p.slot_offset, host + p.slot_offset, p.dev_bytes) for p in f.pieces], f.dev_bytes)
            self._refill(b, done)
        return HostStep(staged, f"staged fetch of layer {f.layer}")

    def _routed(self, f: Fetch, offsets, issue) -> None:
        """Copy only the experts the chunk routed to (the host reads the layer's offsets: a sync)."""
        cp = self.cp
        s = self.be.stream
        offs = cp.asnumpy(offsets, stream=s)
        s.synchronize()
        used = np.flatnonzero(np.diff(offs.astype(np.int64)) > 0)
        resident = self.resident_experts(f.pieces[0].name)
        self.routed_totals[f.layer] = int(used.size)
        if f.first == resident:
            self.routed_counts[f.layer] = 0
        used = used[(used >= f.first) & (used < f.end)]      # this fetch's experts only
        self.routed_counts[f.layer] += int(used.size)
        runs = []
        for e in used:        # contiguous runs of routed experts: one copy each
            if runs and runs[-1][1] == e:
                runs[-1][1] = e + 1
            else:
                runs.append([int(e), int(e) + 1])
        slot = self.slot_buffers[f.slot].data.ptr
        copies = []
        if self.host_mode == "registered":
            for p in f.pieces:
                se, de = p.src_e, p.dev_e
                copies += [(slot + p.slot_offset + (a - p.first) * de, self.file_base + p.file_offset + a * se,
                            (b - a) * se) for a, b in runs]
        else:
            b_ = self._seq_buffer_for_routed()
            buf = self._staging[b_][1]
            tasks = [t for p in f.pieces for a, b in runs for t in self._copy_into(buf, p, a, b)]
            for t in tasks:
                t.result()
            host = buf.ctypes.data
            for p in f.pieces:
                de = p.dev_e
                copies += [(slot + p.slot_offset + (a - p.first) * de, host + p.slot_offset + (a - p.first) * de,
                            (b - a) * de) for a, b in runs]
        nbytes = sum(c[2] for c in copies)
        issue(copies, nbytes)
        if self.host_mode != "registered":
            self._staging_free[b_] = self._routed_done_event()

    def _seq_buffer_for_routed(self) -> int:
        """Routed fetches fill synchronously: take the next buffer once its last copy is done."""
        self._routed_b = (getattr(self, "_routed_b", -1) + 1) % STAGING_BUFFERS
        ev = self._staging_free[self._routed_b]
        if ev is not None:
            ev.synchronize()
        return self._routed_b

    def _routed_done_event(self):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.be.copy_stream)
        return ev

    def join(self, ctx, fetch_node):
        """The compute stream waits for a fetch's copies: a capturable closure, or a HostStep
        when the fetch itself is one (its event is recorded outside any capture)."""
        be = ctx.be
        f = self.by_node[fetch_node.id]
        if self._decoding(be):
            # the decode cache's host step: read the routing, copy the misses, wait for them
            joined = ctx.__dict__.setdefault("decode_joined", set())
            if f.layer in joined:
                return _nothing
            joined.add(f.layer)
            return be.decode_cache.step(ctx, f.layer)
        done = ctx.fetch_done[fetch_node.id]
        cp = self.cp

        def wait():
            t = self.timing
            if t is not None:
                a = cp.cuda.Event()
                a.record(be.stream)
            be.stream.wait_event(done)
            if t is not None:
                b = cp.cuda.Event()
                b.record(be.stream)
                t.setdefault("waits", []).append((f.layer, a, b))
        if f.mode == "routed" or self.host_mode != "registered":
            return HostStep(wait, f"wait for layer {f.layer}'s experts")
        return wait


def telemetry(model, backend, tokens, *, replay_ms: float | None = None, h2d_ceiling_gbs: float | None = None) -> dict:
    """Streaming figures of one prompt, from one instrumented eager prefill (timed events around
    every fetch's copies on the copy stream and every join's wait on the compute stream):

    - per layer: resident or streamed, experts fetched per chunk, hit rate (the share of the
      experts a chunk reads that were already on the device: 1 pinned, 0 streamed);
    - bytes moved per chunk; the link rate while copying (bytes / copy time) against the pinned
      ceiling measured in the same run; with replay_ms (the timed graph replays), the effective
      rate over the whole prefill;
    - the fraction of transfer time hidden under compute: 1 - (compute-stream wait) / (copy time);
    - device memory measured (CuPy pool, and device-wide use since load)."""
    import cupy as cp
    st = backend.streamer
    model.reset()
    s = backend.stream
    st.timing = {}
    n_chunks = 0
    try:
        a = cp.cuda.Event()
        a.record(s)
        for i in range(0, len(tokens), backend.chunk):
            piece = tokens[i:i + backend.chunk]
            ex = backend.executor_for(len(piece))
            ex.stage_inputs(piece)
            with s:
                for fn in ex.launches:
                    fn()
            backend.n_past += len(piece)
            n_chunks += 1
        b = cp.cuda.Event()
        b.record(s)
        b.synchronize()
        backend.copy_stream.synchronize()
        t = st.timing
    finally:
        st.timing = None
    eager_ms = cp.cuda.get_elapsed_time(a, b)
    copies = [(layer, n, cp.cuda.get_elapsed_time(e0, e1)) for layer, n, e0, e1 in t.get("copies", [])]
    waits = [(layer, cp.cuda.get_elapsed_time(e0, e1)) for layer, e0, e1 in t.get("waits", [])]
    moved = sum(n for _, n, _ in copies)
    copy_ms = sum(ms for _, _, ms in copies)
    wait_ms = sum(ms for _, ms in waits)
    pre = backend.plan.stats.get("prefetch") or {}
    per_layer = []
    streamed = st.by_layer
    for layer in list(pre.get("pinned_layers", [])) + list(streamed):
        fs = streamed.get(layer)
        if fs is None:
            per_layer.append({"layer": layer, "resident": True, "experts_fetched_per_chunk": 0, "hit_rate": 1.0})
            continue
        f = fs[0]
        E = f.pieces[0].n_experts
        first = st.resident_experts(f.pieces[0].name)
        got = st.routed_counts.get(layer, E - first) if f.mode == "routed" else E - first
        # hit rate: the share of the experts the chunk reads that were on the device already
        # (the layer's resident first experts; routed: of the experts routed to)
        if f.mode == "routed":
            read = st.routed_totals.get(layer, 0)
            hit = 1.0 - got / read if read else 1.0
        else:
            hit = first / E
        per_layer.append({"layer": layer, "resident": False, "slots": [x.slot for x in fs], "mode": f.mode,
                          "experts_fetched_per_chunk": got, "of_experts": E, "resident_experts": first,
                          "hit_rate": hit,
                          "bytes_per_chunk": sum(n for lay, n, _ in copies if lay == layer) / max(n_chunks, 1),
                          "copy_ms": sum(ms for lay, _, ms in copies if lay == layer) / max(n_chunks, 1),
                          "wait_ms": sum(ms for lay, ms in waits if lay == layer) / max(n_chunks, 1)})
    per_layer.sort(key=lambda r: r["layer"])
    out = {
        "host_mode": st.host_mode, "slots": st.n_slots, "slot_bytes": st.slot_bytes,
        "chunks": n_chunks, "bytes_per_chunk": moved / max(n_chunks, 1),
        "copy_ms": copy_ms, "wait_ms": wait_ms, "eager_ms": eager_ms,
        "link_gbs": moved / copy_ms / 1e6 if copy_ms else None,
        "hidden_fraction": max(0.0, 1.0 - wait_ms / copy_ms) if copy_ms else 1.0,
        "h2d_pinned_gbs": h2d_ceiling_gbs,
        "hit_rate": sum(r["hit_rate"] for r in per_layer) / max(len(per_layer), 1),
        "layers": per_layer, "memory": backend.device_memory(), "budget_bytes": pre.get("budget_bytes"),
    }
    if h2d_ceiling_gbs and out["link_gbs"]:
        out["link_of_ceiling"] = out["link_gbs"] / h2d_ceiling_gbs
    if replay_ms:
        out["effective_gbs"] = moved / replay_ms / 1e6
        if h2d_ceiling_gbs:
            out["effective_of_ceiling"] = out["effective_gbs"] / h2d_ceiling_gbs
    return out


def format_telemetry(t: dict) -> list[str]:
    """The bench's lines for one prompt's streaming figures."""
    gb = 1e9
    mem = t["memory"]
    lines = [f"streaming ({t['host_mode']}, {t['slots']} slots of {t['slot_bytes'] / 2**20:.0f} MiB): "
             f"{t['bytes_per_chunk'] / gb:.2f} GB moved per chunk over {t['chunks']} chunk(s); "
             f"experts already resident when read (hit rate) {100 * t['hit_rate']:.0f}%"]
    link = f"{t['link_gbs']:.1f} GB/s while copying" if t.get("link_gbs") else "no copies"
    if t.get("h2d_pinned_gbs"):
        link += f" ({100 * t.get('link_of_ceiling', 0):.0f}% of the pinned ceiling {t['h2d_pinned_gbs']:.1f} GB/s)"
    if t.get("effective_gbs"):
        link += f"; {t['effective_gbs']:.1f} GB/s over the whole replayed prefill"
        if t.get("effective_of_ceiling"):
            link += f" ({100 * t['effective_of_ceiling']:.0f}%)"
    lines.append("  host->device " + link)
    lines.append(f"  transfer hidden under compute {100 * t['hidden_fraction']:.0f}% (copy {t['copy_ms']:.1f} ms, "
                 f"compute stream waited {t['wait_ms']:.1f} ms, eager instrumented run {t['eager_ms']:.1f} ms)")
    budget = f" of a {t['budget_bytes'] / 2**30:.2f} GiB budget" if t.get("budget_bytes") else ""
    pool = mem.get("pool_bytes")
    lines.append(f"  device memory measured: CuPy pool {pool / 2**30:.2f} GiB{budget}; device-wide "
                 f"{mem['used_since_load_bytes'] / 2**30:.2f} GiB more in use than before loading"
                 if pool is not None else "  device memory: n/a")
    per = ", ".join(f"{r['layer']}:{'R' if r['resident'] else str(r['experts_fetched_per_chunk'])}"
                    for r in t["layers"])
    lines.append(f"  per layer (R: every expert resident; else experts fetched per chunk, the layer's others "
                 f"resident): {per}")
    return lines
