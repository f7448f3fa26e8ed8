"""Mutation fuzzer for plan files and command lines: hostile input must end in one line.

    python tools/fuzz_plan.py --plans 3000 --args 3000 --seed 1

Compiles plans of the shipped fixtures (tests/fixtures/*, cpu and lowered targets), then:
- plan mutants: JSON structure edits (deleted / duplicated / swapped keys and items), type
  swaps, huge / negative / NaN / non-finite numbers, graph edits (cycles, dangling inputs,
  duplicate ids, other ops, a missing "logits"), deep nesting, weights-table edits, text-level
  damage (truncation, flipped bytes) and hostile file kinds (a FIFO, a directory, a name with a
  newline); each is fed to `ggfuse inspect` or `ggfuse run --tokens ... --device cpu`;
- argument mutants: valid command lines (compile, run, inspect, bench, tokenize) with a value
  replaced by a hostile one (0, -5, 2^64, nan, '', a FIFO, a directory, a missing folder, the
  input itself as the output, ...), a flag added, dropped or repeated.

Every case runs in this process through `ggfuse.compiler.cli.main` with a wall-clock limit
(SIGALRM) and an address-space limit (RLIMIT_AS), and is classified:
  ok      exit 0
  clean   exit 2, the last line `ggfuse: error: ...` and no other error line (progress lines
          may precede it); for plan mutants the line names the plan file
  unclear exit 2 but the error spread over lines, or a plan error not naming the file
  crash   a traceback (an exception escaping main, or main's bug-report line)
  hang    over the time limit
  blowup  out of memory, or the resident set grew by more than --rss-growth
  leftover a temp file left beside an output
Failures are written to WORKDIR/failures/ with the command to reproduce them. Exit status 1 if
any case is not ok / clean.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# (fixture, quant, target): cpu plans and lowered ones (the cpu reference runs both)
BASES = [("qwen35moe", "q4_k_m", "cpu"), ("qwen35moe", "q4_k_m", "sm_90a"), ("qwen35", "q8_0", "cpu"),
         ("qwen3moe", "q4_k_m", "sm_89"), ("qwen3next", "q8_0", "cpu"), ("gemma4-dense", "q8_0", "cpu"),
         ("gemma4-moe", "q4_k_m", "cpu")]


class Timeout(BaseException):
    """Raised by SIGALRM: not an Exception, so nothing in ggfuse can swallow it."""


def _alarm(signum, frame):
    raise Timeout()


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(argv, timeout: float, stdin: str = ""):
    """(exit code or None, stdout, stderr, escaped exception text or None, seconds, timed out)."""
    from ggfuse.compiler import cli
    out, err = io.StringIO(), io.StringIO()
    old_in = sys.stdin
    sys.stdin = io.StringIO(stdin)
    t0 = time.perf_counter()
    code, exc, hung = None, None, False
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(argv))
    except Timeout:
        hung = True
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except MemoryError:
        exc = "MemoryError"
    except BaseException as e:  # noqa: BLE001 -- what the fuzzer exists to find
        import traceback
        exc = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdin = old_in
    return code, out.getvalue(), err.getvalue(), exc, time.perf_counter() - t0, hung


def classify(code, err, exc, hung, must_name=None) -> str:
    if hung:
        return "hang"
    if exc == "MemoryError" or "out of host memory" in err:
        return "blowup"
    if exc is not None or "Traceback" in err or "this is a bug in ggfuse" in err:
        return "crash"
    if code == 0:
        return "ok"
    # the error is the last line and the only one of its kind (progress lines may come before it)
    lines = err.strip("\n").split("\n")
    errors = [ln for ln in lines if "error" in ln.lower()]
    if code == 2 and lines[-1].startswith("ggfuse: error: ") and errors == [lines[-1]]:
        if must_name is not None and must_name not in lines[-1]:
            return "unclear"
        return "clean"
    return "unclear"


# ---- base plans ------------------------------------------------------------------------------

# and one that streams experts under a budget (the golden plan's settings)
BUDGETED = ("qwen35moe", "q4_k_m", "sm_90a", {"vram_budget": 1_100_000, "max_context": 64, "dense_form": "raw"})


def make_bases(workdir: str):
    from ggfuse.compiler.driver import compile_gguf
    out = []
    for arch, quant, target, *kw in [BUDGETED] + BASES:
        gguf = os.path.join(FIXTURES, arch, f"{quant}.gguf")
        if not os.path.exists(gguf):
            continue
        plan = compile_gguf(gguf, target=target, chunk=16 if target != "cpu" else 512, **(kw[0] if kw else {}))
        path = os.path.join(workdir, f"base-{arch}-{quant}-{target}{'-budget' if kw else ''}.ggfuse.json")
        plan.save(path)
        out.append((path, json.loads(plan.dumps()), gguf))
    return out


# ---- plan mutations --------------------------------------------------------------------------

HOSTILE_VALUES = [None, True, False, 0, -1, 1, -2**63, 2**63, 2**64 + 1, 10**30, 1.5, -0.0, 1e308, "", "x",
                  "%99999", "T", "P*P", "NaN", [], {}, [1, 2], {"a": 1}, [[[]]], "\n", "a" * 5000]
HOSTILE_NUMBERS = [0, -1, -5, 1, 2, 2**31, 2**32 + 7, 2**53 + 1, 2**62, 2**63, -2**63, 2**64, 10**25, 0.5, -1e9,
                   1e308, float("nan"), float("inf"), float("-inf")]


def _slots(d):
    """Every (container, key) pair in a JSON tree, iteratively."""
    out, stack = [], [d]
    while stack:
        x = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            out.append((x, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    return out


def _pick_slot(rng, d, want=None):
    slots = _slots(d)
    if want is not None:
        slots = [s for s in slots if want(s[0][s[1]])] or slots
    return rng.choice(slots)


def m_delete(rng, d):
    c, k = _pick_slot(rng, d)
    del c[k]
    return f"delete {k!r}"


def m_duplicate(rng, d):
    c, k = _pick_slot(rng, d, lambda v: isinstance(v, list) and v)
    v = c[k]
    if isinstance(v, list) and v:
        i = rng.randrange(len(v))
        v.insert(rng.randrange(len(v) + 1), copy.deepcopy(v[i]))
        return f"duplicate an item of {k!r}"
    return "noop"


def m_swap(rng, d):
    c, k = _pick_slot(rng, d, lambda v: isinstance(v, list) and len(v) > 1)
    v = c[k]
    if isinstance(v, list) and len(v) > 1:
        i, j = rng.sample(range(len(v)), 2)
        v[i], v[j] = v[j], v[i]
        return f"swap items of {k!r}"
    return "noop"


def m_type(rng, d):
    c, k = _pick_slot(rng, d)
    c[k] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    return f"type swap {k!r} -> {str(c[k])[:20]!r}"


def m_number(rng, d):
    c, k = _pick_slot(rng, d, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    c[k] = rng.choice(HOSTILE_NUMBERS)
    return f"number {k!r} -> {c[k]!r}"


def m_graph(rng, d):
    steps = d.get("steps")
    if not isinstance(steps, list) or len(steps) < 3:
        return "noop"
    i = rng.randrange(1, len(steps))
    st = steps[i]
    if not isinstance(st, dict):
        return "noop"
    kind = rng.randrange(9)
    ids = [s.get("id") for s in steps if isinstance(s, dict)]
    if kind == 0 and st.get("inputs"):            # a cycle: read a later step (or itself)
        j = rng.randrange(i, len(steps))
        st["inputs"][rng.randrange(len(st["inputs"]))] = f"%{steps[j].get('id')}"
        return "cycle"
    if kind == 1 and st.get("inputs"):
        st["inputs"][0] = rng.choice(["%999999", "%5.9", "5", "%-1", "%1.2.3", ""])
        return "dangling input"
    if kind == 2:
        st["id"] = rng.choice(ids)
        return "duplicate id"
    if kind == 3:
        from ggfuse.ir.ops import Op
        st["op"] = rng.choice([o.value for o in Op] + ["bogus", ""])
        return f"op -> {st['op']}"
    if kind == 4:
        outs = d.get("outputs")
        if isinstance(outs, dict):
            outs.pop("logits", None) if rng.random() < 0.5 else outs.update(logits=f"%{rng.choice(ids)}")
        return "logits output"
    if kind == 5 and isinstance(st.get("attrs"), dict) and st["attrs"]:
        a = rng.choice(sorted(st["attrs"]))
        st["attrs"][a] = copy.deepcopy(rng.choice(HOSTILE_VALUES + HOSTILE_NUMBERS))
        return f"attr {a}"
    if kind == 6 and isinstance(st.get("outputs"), list) and st["outputs"]:
        o = st["outputs"][0]
        if isinstance(o, dict) and isinstance(o.get("shape"), list) and o["shape"]:
            o["shape"][rng.randrange(len(o["shape"]))] = rng.choice([0, 1, 2**40, 2**41, -3, "X", "T*T", "2*T+1", 7])
        return "output shape"
    if kind == 7 and isinstance(st.get("meta"), dict):
        st["meta"][rng.choice(["sched_key", "layer", "kernel", "arena", "storage", "workspace"])] = \
            copy.deepcopy(rng.choice(HOSTILE_VALUES))
        return "meta"
    if kind == 8:
        del steps[i]
        return "step deleted"
    return "noop"


def m_special(rng, d):
    kind = rng.randrange(12)
    if kind == 0:
        d["chunk"] = rng.choice([0, -5, 2**40, None, "512"])
    elif kind == 1:
        d["version"] = rng.choice([None, [5, 0], [3, 9], [4], "4.0", [4, -1], [4.0, 0]])
    elif kind == 2:
        d["format"] = rng.choice([None, "ggfuse-plan2", 1])
    elif kind == 3 and d.get("weights"):
        w = rng.choice(d["weights"])
        if isinstance(w, dict):
            f = rng.choice(["offset", "nbytes", "shape", "ggml_type", "name"])
            w[f] = {"offset": (w.get("offset") or 0) + rng.choice([1, -1, 2**40]),
                    "nbytes": (w.get("nbytes") or 0) * 2, "shape": [1, 2, 3], "ggml_type": "Q8_0",
                    "name": "no.such.tensor"}[f]
            return f"weights {f}"
    elif kind == 4 and isinstance(d.get("source"), dict):
        d["source"][rng.choice(["size", "header_sha256", "path"])] = rng.choice([0, "0" * 64, "/nonexistent.gguf", None])
    elif kind == 5 and isinstance(d.get("options"), dict):
        d["options"][rng.choice(["chunk", "target", "bogus_option", "max_context"])] = rng.choice([0, "sm_99", True, None, -1])
    elif kind == 6 and isinstance(d.get("hparams"), dict):
        d["hparams"]["n_vocab"] = rng.choice([0, -1, 1, 10**9, None, "320"])
    elif kind == 7:
        d.pop(rng.choice(["steps", "outputs", "weights", "hparams", "source", "options", "arch"]), None)
    elif kind == 8 and isinstance(d.get("graph_meta"), dict):
        d["graph_meta"][rng.choice(["lowering", "memory", "prefetch", "segments", "weights"])] = \
            copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif kind == 9 and isinstance(d.get("stats"), dict):
        d["stats"][rng.choice(["memory", "prefetch", "segments", "op_counts_before"])] = \
            copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif kind == 10:
        d["steps"] = []
    else:
        d[rng.choice(["extra_field", "arch"])] = "x" * rng.choice([1, 300])
    return f"special {kind}"


PLAN_MUTATORS = [m_delete, m_duplicate, m_swap, m_type, m_number, m_number, m_graph, m_graph, m_graph,
                 m_special, m_special]


def text_mutation(rng, text: str) -> tuple[str | bytes, str]:
    kind = rng.randrange(7)
    if kind == 0:
        return text[:rng.randrange(len(text))], "truncated"
    if kind == 1:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "flipped bytes"
    if kind == 2:
        depth = rng.choice([40, 1000, 100000])
        return text.replace('"passes":', '"passes": ' + "[" * depth + "]" * depth + ', "x":', 1), f"nesting {depth}"
    if kind == 3:
        return text.replace('"chunk": 512', '"chunk": ' + rng.choice(["1e999", "NaN", "-Infinity", "9" * 5000, "1" * 40]), 1), "number text"
    if kind == 4:
        return rng.choice(["", "{}", "[]", "null", "\ufeff" + text, "GGUF" + text]), "whole file"
    if kind == 5:
        i = rng.randrange(len(text))
        return text[:i] + text[i:].replace("}", "", 1), "dropped brace"
    return text + rng.choice(["x", "{}", "\n\n"]), "trailing bytes"


def plan_mutant(rng, base: dict, base_text: str):
    """(contents as str or bytes, description)."""
    if rng.random() < 0.15:
        return text_mutation(rng, base_text)
    d = copy.deepcopy(base)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        try:
            what.append(rng.choice(PLAN_MUTATORS)(rng, d))
        except (IndexError, KeyError, TypeError, ValueError, AttributeError):
            what.append("noop")
    return json.dumps(d, sort_keys=True, indent=rng.choice([None, 1])), "; ".join(what)


def plan_commands(path: str, rng) -> list[str]:
    return rng.choice([
        ["run", path, "--tokens", "1,2,3", "--device", "cpu"],
        ["run", path, "--tokens", "5", "--device", "cpu"],
        ["inspect", path],
        ["inspect", path, "--summary"],
        ["inspect", path, "--json"],
        ["inspect", path, "--text"],
        ["inspect", path, "--dot", os.path.join(os.path.dirname(path), "out.dot"), "--dot-weights"],
    ])


def fuzz_plans(n: int, rng, bases, workdir: str, timeout: float, rss_growth: int, log):
    counts: dict = {}
    fails = []
    mdir = os.path.join(workdir, "plans")
    os.makedirs(mdir, exist_ok=True)
    base_texts = {p: open(p).read() for p, _, _ in bases}
    for i in range(n):
        base_path, base, gguf = rng.choice(bases)
        body, what = plan_mutant(rng, base, base_texts[base_path])
        # the mutant lies beside its GGUF's path as recorded (source.path is absolute)
        name = f"m{i}.ggfuse.json"
        kind = rng.random()
        path = os.path.join(mdir, name)
        for leftover in os.listdir(mdir):
            p = os.path.join(mdir, leftover)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        if kind < 0.02:
            os.mkfifo(path)
            what = "a FIFO"
        elif kind < 0.03:
            os.mkdir(path)
            what = "a directory"
        else:
            if kind < 0.05:
                path = os.path.join(mdir, f"m{i}\nsecond line.ggfuse.json")
                what += "; newline in the name"
            with open(path, "wb" if isinstance(body, bytes) else "w") as f:
                f.write(body)
        argv = plan_commands(path, rng)
        before = rss_bytes()
        code, out, err, exc, dt, hung = run_case(argv, timeout)
        from ggfuse.errors import escape
        cls = classify(code, err, exc, hung, must_name=escape(path))
        if cls == "ok" and rss_bytes() - before > rss_growth:
            cls = "blowup"
        counts[cls] = counts.get(cls, 0) + 1
        if cls not in ("ok", "clean"):
            keep = os.path.join(workdir, "failures", f"plan-{i}.json")
            os.makedirs(os.path.dirname(keep), exist_ok=True)
            if os.path.isfile(path):
                shutil.copy(path, keep)
            fails.append({"case": i, "class": cls, "mutation": what, "argv": argv, "stderr": err[-2000:],
                          "exception": exc, "kept": keep})
            log(f"plan {i}: {cls}: {what}: {(exc or err).strip().splitlines()[-1:] if (exc or err).strip() else ''}")
        if (i + 1) % 250 == 0:
            log(f"plans {i + 1}/{n}: {counts}")
    return counts, fails


# ---- argument mutations ----------------------------------------------------------------------

HOSTILE_ARGS = ["0", "-5", "-1", "99999999999999999999", "1e9", "nan", "inf", "-inf", "", " ", "abc", "1.5",
                "1,,2", ",", "2**63", "0x10", "\n", "a\nb", "--", "-", "12GiB", "0B", "1e999", "1_000",
                "9" * 400, "-0", "+3", "１２"]


def arg_bases(bases, workdir: str):
    # copies of the fixtures: a mutant that writes onto an input must not be able to reach the originals
    gguf = os.path.join(workdir, "args", "model.gguf")
    plan = os.path.join(workdir, "args", "plan.ggfuse.json")
    vocab = os.path.join(workdir, "args", "vocab.gguf")
    out = os.path.join(workdir, "args", "out.ggfuse.json")
    return [
        ["compile", gguf, "-o", out, "--target", "cpu", "--chunk", "64"],
        ["compile", gguf, "-o", out, "--target", "sm_90a", "--chunk", "32", "--max-context", "256"],
        ["run", plan, "--tokens", "1,2,3", "--device", "cpu", "--logits", os.path.join(workdir, "args", "l.npy")],
        ["run", gguf, "--tokens", "7,8", "--device", "cpu", "--chunk", "16"],
        ["run", vocab, "-p", "hi", "-n", "3", "--device", "cpu", "--temp", "0.5", "--seed", "1"],
        ["inspect", plan, "--summary"],
        ["inspect", plan, "--dot", os.path.join(workdir, "args", "g.dot")],
        ["bench", gguf, "--prompt", "8", "--repeat", "1", "--chunk", "16", "--device", "cpu", "--tg", "0",
         "--json", os.path.join(workdir, "args", "b.json")],
        ["tokenize", vocab, "hello world", "--ids"],
    ]


def arg_mutant(rng, argv: list[str], special: dict) -> tuple[list[str], str]:
    from ggfuse.compiler.cli import build_parser
    a = list(argv)
    kind = rng.randrange(6)
    if kind <= 1 and len(a) > 2:           # a value replaced
        i = rng.randrange(1, len(a))
        a[i] = rng.choice(HOSTILE_ARGS + list(special.values()))
        return a, f"arg {i} -> {a[i]!r}"
    if kind == 2:                          # a flag of this command with a hostile value
        sub = build_parser()._subparsers._group_actions[0].choices[a[0]]
        flags = [s for act in sub._actions for s in act.option_strings if s.startswith("--") and s != "--help"]
        f = rng.choice(flags)
        v = rng.choice(HOSTILE_ARGS + list(special.values()))
        a += [f, v]
        return a, f"{f} {v!r}"
    if kind == 3 and len(a) > 2:
        i = rng.randrange(1, len(a))
        del a[i]
        return a, f"arg {i} dropped"
    if kind == 4 and len(a) > 3:
        i = rng.randrange(2, len(a) - 1)
        a += a[i:i + 2]
        return a, "flag repeated"
    # a file argument replaced by a hostile file
    key = rng.choice(sorted(special))
    i = rng.randrange(1, len(a))
    a[i] = special[key]
    return a, f"arg {i} -> {key}"


def fuzz_args(n: int, rng, bases, workdir: str, timeout: float, rss_growth: int, log):
    adir = os.path.join(workdir, "args")
    os.makedirs(adir, exist_ok=True)
    fifo = os.path.join(adir, "fifo")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    gguf = os.path.join(adir, "model.gguf")
    shutil.copy(os.path.join(FIXTURES, "qwen35moe", "q4_k_m.gguf"), gguf)
    shutil.copy(os.path.join(FIXTURES, "qwen35", "q8_0.gguf"), os.path.join(adir, "vocab.gguf"))
    fixtures = {p: os.path.getsize(p) for p in (os.path.join(FIXTURES, "qwen35moe", "q4_k_m.gguf"), bases[0][2])}
    special = {"fifo": fifo, "dir": adir, "missing dir": os.path.join(adir, "no", "such", "x.json"),
               "missing": os.path.join(adir, "missing.gguf"), "newline": os.path.join(adir, "a\nb.json"),
               "the input": gguf, "plan": bases[0][0], "empty": os.path.join(adir, "empty.gguf"),
               "noext": os.path.join(adir, "noext"), "devnull": os.devnull}
    open(special["empty"], "w").close()
    shutil.copy(bases[0][0], os.path.join(adir, "plan.ggfuse.json"))
    before_gguf = os.path.getsize(gguf)
    cwd = os.getcwd()
    os.chdir(adir)            # relative names a mutant makes up land here
    try:
        return _fuzz_args(n, rng, bases, workdir, timeout, rss_growth, log, adir, special, gguf, before_gguf,
                          fixtures)
    finally:
        os.chdir(cwd)


def _fuzz_args(n, rng, bases, workdir, timeout, rss_growth, log, adir, special, gguf, before_gguf, fixtures):
    counts: dict = {}
    fails = []
    keep = set(os.listdir(adir))
    for i in range(n):
        argv, what = arg_mutant(rng, rng.choice(arg_bases(bases, workdir)), special)
        argv = [x for x in argv if x != "--debug"]
        before = rss_bytes()
        code, out, err, exc, dt, hung = run_case(argv, timeout)
        cls = classify(code, err, exc, hung)
        if cls == "ok" and rss_bytes() - before > rss_growth:
            cls = "blowup"
        temps = [f for f in os.listdir(adir) if f.endswith((".tmp", ".partial"))]
        if temps and cls in ("ok", "clean"):
            cls = "leftover"
        for f in set(os.listdir(adir)) - keep:        # whatever the case wrote, for the next one
            p = os.path.join(adir, f)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        shutil.copy(bases[0][0], os.path.join(adir, "plan.ggfuse.json"))
        if os.path.getsize(gguf) != before_gguf:
            cls = "clobbered"
            shutil.copy(os.path.join(FIXTURES, "qwen35moe", "q4_k_m.gguf"), gguf)
        for p, size in fixtures.items():
            if os.path.getsize(p) != size:
                raise SystemExit(f"case {i} changed the fixture {p}: {argv}")
        counts[cls] = counts.get(cls, 0) + 1
        if cls not in ("ok", "clean"):
            fails.append({"case": i, "class": cls, "mutation": what, "argv": argv, "stderr": err[-2000:],
                          "exception": exc})
            log(f"args {i}: {cls}: {what}: {argv}: {(exc or err).strip().splitlines()[-1:] if (exc or err).strip() else ''}")
        if (i + 1) % 250 == 0:
            log(f"args {i + 1}/{n}: {counts}")
    return counts, fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=3000, help="plan mutants (default 3000)")
    ap.add_argument("--args", type=int, default=3000, help="argument mutants (default 3000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per case (default 30)")
    ap.add_argument("--memory", default="6GiB", help="address-space limit of this process (default 6GiB)")
    ap.add_argument("--rss-growth", default="1GiB", help="peak-RSS growth in one case that counts as a blow-up")
    ap.add_argument("--workdir", default=None, help="where mutants and failures go (default: a temp folder)")
    ap.add_argument("--json", help="write the counts and failures here")
    a = ap.parse_args(argv)
    os.environ.setdefault("GGFUSE_QUIET", "1")
    from ggfuse.options import parse_bytes
    limit = parse_bytes(a.memory)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    signal.signal(signal.SIGALRM, _alarm)
    workdir = a.workdir or tempfile.mkdtemp(prefix="ggfuse-fuzz-")
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(a.seed)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    bases = make_bases(workdir)
    log(f"{len(bases)} base plans in {workdir}")
    growth = parse_bytes(a.rss_growth)
    pc, pf = fuzz_plans(a.plans, rng, bases, workdir, a.timeout, growth, log)
    ac, af = fuzz_args(a.args, rng, bases, workdir, a.timeout, growth, log)
    res = {"seed": a.seed, "plans": a.plans, "args": a.args, "plan_counts": pc, "arg_counts": ac,
           "seconds": round(time.time() - t0, 1), "failures": pf + af,
           "command": "python tools/fuzz_plan.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps({k: v for k, v in res.items() if k != "failures"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if pf or af else 0


if __name__ == "__main__":
    sys.exit(main())
