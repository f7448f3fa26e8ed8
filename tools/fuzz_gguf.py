"""GGUF mutation fuzzer: hostile variants of the shipped fixtures must never escape.

    python tools/fuzz_gguf.py --cases 10000 --seed 17 --workers 2     # the campaign in tools/README.md
    python tools/fuzz_gguf.py --replay 4242 --seed 17                 # one case, with its traceback

Each case is made from its own seed (the campaign seed and the case number), so any case can be
replayed alone. A case takes one fixture (tests/fixtures/*/*.gguf, examples/*.gguf), applies one
to three mutations -- byte flips, random words, truncation, metadata keys given another type /
shape / value, dropped / duplicated / added keys, tensor-table edits (dims, type, offsets that
alias or overlap, dropped or renamed tensors), NaN / Inf written into tensor data, huge counts
and oversized arrays -- writes the mutant, and runs in-process: GGUFFile, compile (target cpu),
and for some cases the tokenizer and a short CPU prefill.

Outcomes: ok (it ran), clean (a one-line GGFuseError naming the file), bad_message (a GGFuseError
that does not start with the file's name or has a newline), crash (any other exception), hang
(past --timeout seconds), blowup (MemoryError or the worker's peak RSS past --mem-mb). Workers are
separate processes with an address-space limit; one that dies or stops answering is replaced and
its case counted. Exit status 1 if any case is crash / hang / blowup / bad_message.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __name__ == "__main__" and __package__ is None:   # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(ROOT))

FAILURES = ("crash", "hang", "blowup", "bad_message")
GGUF_MAGIC = 0x46554747

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


def fixtures() -> list[str]:
    out = []
    for d in sorted(os.listdir(os.path.join(ROOT, "tests", "fixtures"))):
        full = os.path.join(ROOT, "tests", "fixtures", d)
        if os.path.isdir(full) and d != "text":
            out += [os.path.join(full, f) for f in ("q4_k_m.gguf", "q8_0.gguf") if os.path.exists(os.path.join(full, f))]
    ex = os.path.join(ROOT, "examples")
    out += sorted(os.path.join(ex, f) for f in os.listdir(ex) if f.endswith(".gguf"))
    return out


# ---- a GGUF as editable parts ------------------------------------------------------------------

class Doc:
    """A parsed GGUF: version, [key, vtype, payload bytes], [name, ne, type, rel offset], data."""

    def __init__(self, path: str):
        from ggfuse.compiler.gguf_file import GGUFFile
        gf = GGUFFile(path)
        blob = open(path, "rb").read()
        self.version = gf.version
        self.kvs = []
        for name in gf.keys():
            f = gf.field(name)
            self.kvs.append([name, f.vtype, blob[f.offset:f.end]])
        self.tis = [[t.name, list(t.ne), t.ggml_type, t.offset - gf.data_offset] for t in gf.tensors.values()]
        self.alignment = gf.alignment
        self.data = bytearray(blob[gf.data_offset:])
        self.n_kv = self.n_ti = None          # header count overrides
        self.arch = gf.arch
        gf.close()

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, self.version,
                                    len(self.tis) if self.n_ti is None else self.n_ti,
                                    len(self.kvs) if self.n_kv is None else self.n_kv))
        for key, vtype, payload in self.kvs:
            k = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
            out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload
        for name, ne, tt, rel in self.tis:
            n = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
            out += struct.pack("<Q", len(n)) + n + struct.pack("<I", len(ne))
            out += b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in ne) + struct.pack("<IQ", tt, rel & (2**64 - 1))
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out + self.data)


def enc(vtype: int, value) -> bytes:
    if vtype == STR:
        b = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b)) + b
    if vtype == ARR:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(enc(itype, x) for x in items)
    fmt = _FMT[vtype]
    if fmt in "fd":
        return struct.pack("<" + fmt, value)
    bits = struct.calcsize(fmt) * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt.islower() else (0, (1 << bits) - 1)
    if fmt == "?":
        return struct.pack("<B", int(value) & 0xFF)
    return struct.pack("<" + fmt, min(max(int(value), lo), hi))


def dec(vtype: int, payload: bytes):
    """A payload decoded (scalars, strings, arrays of scalars or strings); None if it cannot be."""
    try:
        if vtype == STR:
            return payload[8:].decode("utf-8")
        if vtype == ARR:
            itype, n = struct.unpack_from("<IQ", payload)
            if itype == STR:
                out, off = [], 12
                for _ in range(n):
                    ln = struct.unpack_from("<Q", payload, off)[0]
                    out.append(payload[off + 8: off + 8 + ln].decode("utf-8"))
                    off += 8 + ln
                return itype, out
            fmt = _FMT[itype]
            return itype, list(struct.unpack_from(f"<{n}{fmt}", payload, 12))
        return struct.unpack_from("<" + _FMT[vtype], payload)[0]
    except Exception:  # noqa: BLE001
        return None


# ---- mutations ---------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, -1, -2, 7, 8, 15, 16, 31, 32, 63, 64, 255, 256, 1000, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, -1e30, float("nan"), float("inf"), float("-inf"), 3.4e38]
STRINGS = ["", "linear", "none", "yarn", "gpt2", "llama", "qwen2", "qwen35", "gemma4", "qwen35moe", "qwen3moe",
           "qwen3next", "x" * 300, "\u00e9\u4e2d", "{{ bos_token }}"]
# keys the frontends read, for the "add a key" mutation (relative to the architecture)
ARCH_KEYS = ["block_count", "nextn_predict_layers", "embedding_length", "feed_forward_length",
             "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_count",
             "expert_used_count", "expert_weights_scale", "expert_gating_func", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length",
             "attention.layer_norm_rms_epsilon", "attention.scale", "attention.recurrent_layers",
             "rope.dimension_count", "rope.dimension_sections", "rope.freq_base", "rope.scaling.type",
             "rope.scaling.factor", "full_attention_interval", "ssm.conv_kernel", "ssm.inner_size",
             "ssm.state_size", "ssm.time_step_rank", "ssm.group_count", "context_length",
             "attention.sliding_window", "attention.sliding_window_pattern", "attention.shared_kv_layers",
             "attention.key_length_swa", "attention.value_length_swa", "rope.dimension_count_swa",
             "rope.freq_base_swa", "embedding_length_per_layer_input", "final_logit_softcapping"]
TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "general.alignment",
                  "general.architecture"]


def random_value(rng: random.Random, like=None) -> tuple[int, bytes]:
    """A value of a random type: (vtype, payload)."""
    kind = rng.randrange(9)
    if kind == 0:
        t = rng.choice([U8, I8, U16, I16, U32, I32, U64, I64])
        return t, enc(t, rng.choice(INTERESTING))
    if kind == 1:
        t = rng.choice([F32, F64])
        return t, enc(t, rng.choice(FLOATS))
    if kind == 2:
        return BOOL, enc(BOOL, rng.random() < 0.5)
    if kind == 3:
        s = rng.choice(STRINGS)
        return STR, enc(STR, s if rng.random() < 0.9 else b"\xff\xfe" + s.encode())
    n = rng.choice([0, 1, 2, 3, 4, 5, 8, rng.randrange(1, 100)])
    if kind == 4:
        t = rng.choice([I32, U32, I64, U8])
        return ARR, enc(ARR, (t, [rng.choice(INTERESTING[:22]) for _ in range(n)]))
    if kind == 5:
        return ARR, enc(ARR, (BOOL, [rng.random() < 0.5 for _ in range(n)]))
    if kind == 6:
        return ARR, enc(ARR, (F32, [rng.choice(FLOATS) for _ in range(n)]))
    if kind == 7:
        return ARR, enc(ARR, (STR, [rng.choice(STRINGS[:12]) for _ in range(n)]))
    return ARR, struct.pack("<IQ", rng.choice([ARR, 13, 99, STR, U32]), rng.choice(INTERESTING) & (2**64 - 1))  # hostile header


def edit_value(rng: random.Random, vtype: int, payload: bytes) -> tuple[int, bytes]:
    """The same type with another value: neighbours, zero, negatives, huge; arrays re-sized."""
    v = dec(vtype, payload)
    if v is None:
        return random_value(rng)
    if vtype in (U8, I8, U16, I16, U32, I32, U64, I64):
        return vtype, enc(vtype, rng.choice([v + 1, v - 1, 0, -v, 2 * v, v // 2, v * 1000, -1, 2**31, 2**40]))
    if vtype in (F32, F64):
        return vtype, enc(vtype, rng.choice(FLOATS + [v * 2, -v]))
    if vtype == BOOL:
        return vtype, enc(vtype, not v)
    if vtype == STR:
        return vtype, enc(vtype, rng.choice(STRINGS + [v[:-1], v + "x", v * 2]))
    itype, items = v
    items = list(items)
    r = rng.randrange(6)
    if r == 0 and items:
        items.pop(rng.randrange(len(items)))
    elif r == 1:
        items.append(items[-1] if items else 0)
    elif r == 2 and items:
        i = rng.randrange(len(items))
        if itype == STR:
            items[i] = rng.choice(STRINGS + [items[0]])          # often a duplicate token
        elif itype == BOOL:
            items[i] = not items[i]
        elif itype in (F32, F64):
            items[i] = rng.choice(FLOATS)
        else:
            items[i] = rng.choice(INTERESTING)
    elif r == 3:
        items = items[: rng.randrange(len(items) + 1)]
    elif r == 4:
        items = items * 2
    else:
        items = []
    return ARR, enc(ARR, (itype, items))


def mutate(doc: Doc, blob: bytes, rng: random.Random, log: list[str]) -> bytes | None:
    """Apply one mutation: to doc (returns None: serialise doc) or to the raw bytes (returns them)."""
    head = len(blob) - len(doc.data)
    r = rng.random()
    if r < 0.10:                                     # byte flips in the header / metadata / table
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(head)] = rng.randrange(256)
        log.append("flip")
        return bytes(b)
    if r < 0.17:                                     # an interesting word at a random header offset
        b = bytearray(blob)
        at = rng.randrange(0, head - 8)
        if rng.random() < 0.5:
            b[at:at + 8] = (rng.choice(INTERESTING) & (2**64 - 1)).to_bytes(8, "little")
        else:
            b[at:at + 4] = (rng.choice(INTERESTING) & (2**32 - 1)).to_bytes(4, "little")
        log.append(f"word@{at}")
        return bytes(b)
    if r < 0.22:                                     # truncation
        n = rng.randrange(head) if rng.random() < 0.5 else rng.randrange(len(blob))
        log.append(f"truncate@{n}")
        return blob[:n]
    if r < 0.40:                                     # a key given a value of another type / shape
        i = rng.randrange(len(doc.kvs))
        doc.kvs[i][1], doc.kvs[i][2] = random_value(rng)
        log.append(f"retype {doc.kvs[i][0]}")
    elif r < 0.58:                                   # a key given another value of its type
        i = rng.randrange(len(doc.kvs))
        doc.kvs[i][1], doc.kvs[i][2] = edit_value(rng, doc.kvs[i][1], doc.kvs[i][2])
        log.append(f"edit {doc.kvs[i][0]}")
    elif r < 0.63:                                   # drop / duplicate / add a key
        c = rng.randrange(3)
        if c == 0:
            log.append(f"drop {doc.kvs.pop(rng.randrange(len(doc.kvs)))[0]}")
        elif c == 1:
            kv = list(rng.choice(doc.kvs))
            doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), kv)
            log.append(f"dup {kv[0]}")
        else:
            key = (f"{doc.arch}." + rng.choice(ARCH_KEYS)) if rng.random() < 0.7 else rng.choice(TOKENIZER_KEYS)
            vt, pl = random_value(rng)
            doc.kvs = [kv for kv in doc.kvs if kv[0] != key] + [[key, vt, pl]]
            log.append(f"add {key}")
    elif r < 0.80:                                   # tensor table edits
        i = rng.randrange(len(doc.tis))
        t = doc.tis[i]
        c = rng.randrange(9)
        if c == 0:
            t[1] = t[1] + [1]                       # trailing ne of 1 (a leading numpy 1)
        elif c == 1 and len(t[1]) > 1:
            t[1] = t[1][::-1]
        elif c == 2:
            t[1][rng.randrange(len(t[1]))] = rng.choice([1, 2, 0, 2 * t[1][0], 2**40, 2**63])
        elif c == 3:
            t[2] = rng.choice([0, 1, 2, 3, 8, 12, 14, 16, 30, 39, 99, 2**31])
        elif c == 4:
            t[3] = rng.choice(doc.tis)[3]           # alias another tensor's data
        elif c == 5:
            t[3] = t[3] + rng.choice([doc.alignment, -doc.alignment, 1, 2**40, -t[3]])
        elif c == 6:
            doc.tis.pop(i)
        elif c == 7:
            t[0] = rng.choice(doc.tis)[0] if rng.random() < 0.5 else t[0].replace("up", "gate", 1)
        else:
            t[1] = [int(x) for x in t[1][:1]] if len(t[1]) > 1 else t[1] + [2]
        log.append(f"tensor#{i} {t[0]} edit {c}")
    elif r < 0.88:                                   # drop a tensor the architecture needs
        names = [t[0] for t in doc.tis]
        want = [n for n in names if any(s in n for s in ("shexp", "norm", "ssm_", "exps", "rope_freqs", "output"))]
        name = rng.choice(want or names)
        doc.tis = [t for t in doc.tis if t[0] != name]
        log.append(f"drop tensor {name}")
    elif r < 0.95:                                   # NaN / Inf / random bytes in tensor data
        name, ne, tt, rel = rng.choice(doc.tis)
        at = rel + rng.randrange(8) * 2
        val = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", rng.randbytes(4)])
        doc.data[at:at + len(val)] = val
        log.append(f"data {name}")
    else:                                            # huge counts and oversized arrays
        c = rng.randrange(5)
        if c == 0:
            doc.n_kv = rng.choice([2**16 + 1, 2**32, 2**63])
        elif c == 1:
            doc.n_ti = rng.choice([2**16 + 1, 2**20, 2**63])
        elif c == 2:                                 # 2**21 + 1 empty strings: over the array limit
            doc.kvs.append(["fuzz.strings", ARR, struct.pack("<IQ", STR, 2**21 + 1) + b"\0" * 8 * (2**21 + 1)])
        elif c == 3:                                 # many one-element tensors
            k = rng.choice([1000, 2**16 + 1])
            base = len(doc.data) + (-len(doc.data) % doc.alignment)
            doc.data += b"\0" * (base - len(doc.data) + doc.alignment * k)
            doc.tis += [[f"fuzz.{j}", [1], 0, base + doc.alignment * j] for j in range(k)]
        else:                                        # a numeric array of 2**22 zeros (under the limit)
            doc.kvs.append(["fuzz.ints", ARR, struct.pack("<IQ", U8, 2**22) + b"\0" * 2**22])
        log.append(f"huge {c}")
    return None


def make_mutant(seed: int, case: int, path: str) -> tuple[str, list[str], bool]:
    """Write case `case`'s mutant to path; returns (source fixture, mutations, whether to run it)."""
    rng = random.Random(seed * 1_000_003 + case)
    src = rng.choice(fixtures())
    doc = Doc(src)
    blob = doc.to_bytes()
    log: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        raw = mutate(doc, blob, rng, log)
        blob = raw if raw is not None else doc.to_bytes()
        if raw is not None:
            break                                    # raw edits end the chain (doc no longer matches)
    with open(path, "wb") as f:
        f.write(blob)
    return src, log, rng.random() < 0.15


# ---- running one case ------------------------------------------------------------------------------

class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def run_case(path: str, run: bool, check_all: bool) -> None:
    """What a user would do with the file: open it, compile it, and (run) tokenize and prefill."""
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.compiler.gguf_file import GGUFFile
    gf = GGUFFile(path)
    compile_gguf(path, gf=gf, target="cpu", check_tensors="all" if check_all else None)
    if run:
        import ggfuse
        m = ggfuse.load(path, device="cpu", check_tensors="all" if check_all else None)
        m.prefill([0, 1, 2])
        try:
            tok = m.tokenizer
        except Exception as e:  # noqa: BLE001 -- judged below like any other
            from ggfuse.errors import GGFuseError
            if not isinstance(e, GGFuseError) or "tokenizer" not in str(e):
                raise
        else:
            tok.decode(tok.encode("Hello world"))


def classify(path: str, fn) -> tuple[str, str]:
    from ggfuse.errors import GGFuseError
    try:
        fn()
        return "ok", ""
    except _Timeout:
        return "hang", ""
    except MemoryError:
        return "blowup", "MemoryError"
    except GGFuseError as e:
        msg = str(e)
        if "\n" in msg or not msg.startswith(f"{path}: "):
            return "bad_message", msg[:300]
        return "clean", msg
    except (Exception, BaseException) as e:  # noqa: BLE001 -- the fuzzer's point (a Rust panic is a BaseException)
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{os.path.relpath(tb[-1].filename, ROOT)}:{tb[-1].lineno}" if tb else "?"
        return "crash", f"{type(e).__name__}: {str(e)[:200]} at {where}"


def do_case(seed: int, case: int, tmpdir: str, timeout: float) -> dict:
    path = os.path.join(tmpdir, f"case-{case}.gguf")
    src, log, run = make_mutant(seed, case, path)
    check_all = (case % 3) == 0
    signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        outcome, detail = classify(path, lambda: run_case(path, run, check_all))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    dt = time.perf_counter() - t0
    try:
        os.unlink(path)
    except OSError:
        pass
    return {"case": case, "src": os.path.relpath(src, ROOT), "mutations": log, "run": run, "outcome": outcome,
            "detail": detail, "seconds": round(dt, 3),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


# ---- workers ---------------------------------------------------------------------------------------

def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return 4 << 30


def _worker(conn, seed, timeout, mem_mb, tmpdir):
    os.environ.setdefault("GGFUSE_QUIET", "1")     # this process only: no progress lines per case
    soft = _vm_size() + ((mem_mb + 1024) << 20)      # address space: what is mapped now, plus the bound
    try:
        resource.setrlimit(resource.RLIMIT_AS, (soft, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
    import ggfuse.compiler.driver  # noqa: F401 -- import before the first case's clock starts
    while True:
        case = conn.recv()
        if case is None:
            return
        rec = do_case(seed, case, tmpdir, timeout)
        if rec["outcome"] not in ("hang", "blowup") and rec["maxrss_mb"] > mem_mb:
            rec["outcome"], rec["detail"] = "blowup", f"peak RSS {rec['maxrss_mb']} MiB"
        conn.send(rec)
        if rec["outcome"] in ("hang", "blowup"):
            return                                   # a fresh process: state and peak RSS reset


def campaign(cases, *, seed: int, workers: int, timeout: float, mem_mb: int, progress=None) -> list[dict]:
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    todo = collections.deque(cases)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmpdir:
        slots: list = [None] * workers

        def start(i):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(b, seed, timeout, mem_mb, tmpdir), daemon=True)
            p.start()
            slots[i] = [p, a, None, 0.0]

        for i in range(workers):
            start(i)
        while todo or any(s[2] is not None for s in slots):
            for i, s in enumerate(slots):
                p, conn, case, since = s
                if case is None and todo:
                    s[2], s[3] = todo.popleft(), time.monotonic()
                    conn.send(s[2])
                    continue
                if case is None:
                    continue
                if conn.poll(0.01):
                    try:
                        rec = conn.recv()
                    except EOFError:
                        rec = None
                    if rec is not None:
                        results.append(rec)
                        s[2] = None
                        if progress:
                            progress(rec)
                        if rec["outcome"] in ("hang", "blowup"):
                            p.join(5)
                            start(i)
                        continue
                dead = not p.is_alive()
                late = time.monotonic() - since > 2 * timeout + 30
                if dead or late:
                    if not dead:
                        p.kill()
                    p.join(5)
                    outcome = "hang" if late else ("blowup" if p.exitcode in (-9,) else "crash")
                    rec = {"case": case, "outcome": outcome, "detail": f"worker exit code {p.exitcode}",
                           "mutations": [], "src": "?", "run": False, "seconds": None, "maxrss_mb": None}
                    results.append(rec)
                    if progress:
                        progress(rec)
                    start(i)
        for p, conn, _, _ in slots:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            p.join(5)
    return sorted(results, key=lambda r: r["case"])


def summarize(results: list[dict]) -> dict:
    counts = collections.Counter(r["outcome"] for r in results)
    return {k: counts.get(k, 0) for k in ("ok", "clean", *FAILURES)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000, help="number of mutants (default 1000)")
    ap.add_argument("--start", type=int, default=0, help="first case number (default 0)")
    ap.add_argument("--seed", type=int, default=17, help="campaign seed (default 17)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it is a hang (default 20)")
    ap.add_argument("--mem-mb", type=int, default=2048, help="peak RSS per worker that is a blow-up (default 2048)")
    ap.add_argument("--out", help="write every case's record to this JSON file")
    ap.add_argument("--replay", type=int, help="run this one case in this process and show its traceback")
    args = ap.parse_args(argv)
    if args.replay is not None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"case-{args.replay}.gguf")
            src, log, run = make_mutant(args.seed, args.replay, path)
            print(f"case {args.replay}: {os.path.relpath(src, ROOT)} {log} run={run}")
            run_case(path, run, args.replay % 3 == 0)
            print("ok")
        return 0
    t0 = time.time()
    done = [0]

    def progress(rec):
        done[0] += 1
        if rec["outcome"] in FAILURES:
            print(f"  case {rec['case']}: {rec['outcome']}: {rec['detail']} ({rec['src']} {rec['mutations']})",
                  file=sys.stderr)
        if done[0] % 500 == 0:
            print(f"  {done[0]}/{args.cases} cases, {time.time() - t0:.0f} s", file=sys.stderr)

    results = campaign(range(args.start, args.start + args.cases), seed=args.seed, workers=args.workers,
                       timeout=args.timeout, mem_mb=args.mem_mb, progress=progress)
    summary = summarize(results)
    slowest = max((r["seconds"] or 0 for r in results), default=0)
    peak = max((r["maxrss_mb"] or 0 for r in results), default=0)
    print(json.dumps({"cases": len(results), "seed": args.seed, **summary, "seconds": round(time.time() - t0, 1),
                      "slowest_case_s": slowest, "peak_rss_mb": peak}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)
    return 1 if any(summary[k] for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
