"""The `ggfuse` command: compile, inspect, run, synth, bench, serve.

Every user-facing failure (bad GGUF, unsupported input, wrong plan, a bad flag value, no
device, a file that cannot be read or written) is one line on stderr, `ggfuse: error: FILE:
PROBLEM`, and exit code 2. Only a bug in ggfuse shows a traceback, with a line asking for a
report; --debug (anywhere on the command line) shows the traceback of any error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ggfuse.errors import GGFuseError

EXAMPLE_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                             "qwen35moe-tiny-q4_k_m.gguf")


def _human(n: float, unit: str = "B") -> str:
    """Bytes in binary units (ggfuse/fileio.py, the convention --vram-budget reads); other
    quantities (FLOP) in decimal prefixes."""
    if unit == "B":
        from ggfuse.fileio import format_bytes
        return format_bytes(n)
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000.0
    return f"{n} {unit}"


def _passes_list(s):
    return [p for p in s.split(",") if p] if s else None


# ---- compile ---------------------------------------------------------------------------------

def cmd_compile(args) -> int:
    from ggfuse.compiler.driver import compile_gguf
    from ggfuse.fileio import check_input, check_output
    from ggfuse.options import COMPILE, from_args
    check_input(args.model, "model")
    options = from_args(args, COMPILE)
    out = args.output or (os.path.splitext(args.model)[0] + ".ggfuse.json")
    check_output(out, inputs=[args.model], what="plan")     # before the compile, not after it
    plan = compile_gguf(args.model, options=options, passes=_passes_list(args.passes),
                        skip=_passes_list(args.skip_pass) or (), dump_dir=args.dump_dir)
    plan.save(out, inputs=[args.model])
    s = plan.stats
    print(f"wrote {out}: {plan.arch}, target {plan.target}, {len(plan.graph)} nodes, chunk {plan.chunk}, "
          f"{_human(s['flops_per_chunk'], 'FLOP')}/chunk, weights {_human(s['weight_bytes'])}")
    return 0


# ---- inspect ---------------------------------------------------------------------------------

def inspect_summary(plan) -> dict:
    from ggfuse.compiler.stats import graph_stats
    s = graph_stats(plan.graph, plan.chunk)
    hp = plan.hparams
    return {
        "arch": plan.arch,
        "version": list(plan.version),
        "source": plan.source,
        "chunk": plan.chunk,
        "passes": plan.passes,
        "hparams": {k: hp[k] for k in sorted(hp) if k not in ("extra",)},
        "n_nodes": len(plan.graph),
        "ops": s["op_counts"],
        "ops_before_passes": plan.stats.get("op_counts_before"),
        "weights_by_type": s["weights_by_type"],
        "weight_bytes": s["weight_bytes"],
        "flops_per_chunk": s["flops_per_chunk"],
        "flops_by_op": s["flops_by_op"],
        "activation_bytes_naive": s["activation_bytes_naive"],
        "bytes_per_chunk": s["bytes_per_chunk"],
        "memory": plan.stats.get("memory"),
        "prefetch": plan.stats.get("prefetch"),
        "segments": plan.stats.get("segments"),
        "decode_cache": plan.stats.get("decode_cache"),
        "states": {k: {**n.outputs[0].to_json(), "kind": n.attrs.get("state"),
                       "storage": (n.meta.get("storage") or [None])[0]}
                   for k, n in sorted(plan.graph.states().items())},
        "options": plan.options,
        "ggfuse": plan.ggfuse,
        "lowering": plan.lowering,
        "kernels": kernel_counts(plan),
        "steps": plan_steps(plan),
        "weights": [{"name": w.name, "ggml_type": w.ggml_type, "shape": list(w.shape), "bytes": w.nbytes,
                     **((plan.graph.meta.get("weights") or {}).get(w.name) or {})} for w in plan.weights],
    }


def _variant(rec: dict, chunk: int) -> dict:
    """A kernel record's fields at one chunk size (by_chunk folded in), the name left out."""
    out = {k: v for k, v in rec.items() if k not in ("name", "by_chunk")}
    out.update((rec.get("by_chunk") or {}).get(str(chunk), {}))
    return out


def plan_steps(plan) -> list[dict]:
    """Every executed step in schedule order: op, name, kernel and variant (at the plan's chunk),
    storage dtypes, workspace bytes per chunk size, layer."""
    out = []
    for n in plan.graph.topo():
        if n.op.value in ("input", "weight"):
            continue
        rec = n.meta.get("kernel")
        step = {"id": n.id, "op": n.op.value, "name": n.name}
        if rec is not None:
            step["kernel"] = rec["name"]
            step["variant"] = _variant(rec, plan.chunk)
            if rec.get("by_chunk"):
                step["by_chunk"] = rec["by_chunk"]
        if n.meta.get("storage"):
            step["storage"] = n.meta["storage"]
        if n.meta.get("workspace"):
            step["workspace"] = n.meta["workspace"]
        if n.meta.get("layer") is not None:
            step["layer"] = n.meta["layer"]
        out.append(step)
    return out


def kernel_counts(plan) -> dict:
    counts: dict = {}
    for n in plan.graph.nodes():
        rec = n.meta.get("kernel")
        if rec is not None:
            counts[rec["name"]] = counts.get(rec["name"], 0) + 1
    return dict(sorted(counts.items()))


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_short(x)}" for k, x in v.items() if x is not None) + "}"
    return str(v)


def print_steps(d: dict) -> None:
    print(f"\nsteps (kernel and variant at chunk {d['chunk']}; workspace at that chunk):")
    for st in d["steps"]:
        k = st.get("kernel", "-")
        var = " ".join(f"{a}={_short(b)}" for a, b in st.get("variant", {}).items() if b is not None)
        ws = (st.get("workspace") or {}).get(str(d["chunk"])) or {}
        wss = ("  ws " + ", ".join(f"{a} {_human(b)}" for a, b in ws.items())) if ws else ""
        stg = ("  out " + ",".join(st["storage"])) if st.get("storage") else ""
        print(f"  %{st['id']:<5} {st['op']:<24} {st['name'][:34]:<34} {k}{(' ' + var) if var else ''}{wss}{stg}")


def print_summary(d: dict) -> None:
    hp = d["hparams"]
    print(f"plan  {d['arch']}  format {'.'.join(map(str, d['version']))}  chunk {d['chunk']}  nodes {d['n_nodes']}")
    print(f"source {d['source'].get('path')}  ({_human(d['source'].get('size', 0))}, header {str(d['source'].get('header_sha256'))[:16]})")
    rec = hp.get("recurrent") or []
    print(f"layers {hp.get('n_layer')}  (deltanet {sum(rec)}, attention {len(rec) - sum(rec)})  "
          f"d_model {hp.get('n_embd')}  vocab {hp.get('n_vocab')}  experts {hp.get('n_expert')} top-{hp.get('n_expert_used')}")
    if d["passes"]:
        print("passes " + ", ".join(d["passes"]))
    print("\nops by kind" + ("                      before passes" if d.get("ops_before_passes") else ""))
    before = d.get("ops_before_passes") or {}
    for op in sorted(set(d["ops"]) | set(before)):
        b = f"{before.get(op, 0):>8}" if before else ""
        print(f"  {op:<28}{d['ops'].get(op, 0):>6}   {b}")
    print("\nweights by type")
    for t, e in d["weights_by_type"].items():
        print(f"  {t:<8}{e['count']:>6} tensors {_human(e['bytes']):>12}")
    print(f"  {'total':<8}{'':>14}{_human(d['weight_bytes']):>13}")
    print(f"\nper chunk of {d['chunk']} tokens (first chunk)")
    print(f"  FLOPs            {_human(d['flops_per_chunk'], 'FLOP')}")
    for op, f in sorted(d["flops_by_op"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {op:<24}{_human(f, 'FLOP'):>14}  {100.0 * f / max(d['flops_per_chunk'], 1):5.1f}%")
    print(f"  weight bytes     {_human(d['weight_bytes'])}")
    print(f"  activations      {_human(d['activation_bytes_naive'])} (naive sum of every value)")
    if d.get("memory"):
        m = d["memory"]
        print(f"  activation arena {_human(m['peak_bytes'])} planned peak vs {_human(m['naive_bytes'])} naive")
    p = d.get("prefetch") or {}
    if p.get("budget_bytes"):
        print(f"\nvram budget {_human(p['budget_bytes'])}: resident {_human(p['resident_bytes'])} "
              f"({', '.join(f'{k} {_human(v)}' for k, v in p['fixed_bytes'].items())}, every expert of "
              f"{len(p['pinned_layers'])} layers and the first ones of the others, {p['slots']} streaming slots of "
              f"{_human(p.get('slot_bytes', 0))}, {p.get('pieces_per_layer', 1)} fetch(es) per streamed layer)")
        if p.get("embedding") == "host-gathered":
            print(f"  token embedding gathered on the host per chunk ({p.get('embedding_tensor')}); "
                  f"all-rows LM head in blocks of {p.get('head_block')} rows")
        split = p.get("streamed_experts") or {}
        which = (", ".join(f"{l}:{m}" for l, m in split.items()) if split else str(p["streamed_layers"]))
        print(f"  streamed (layer:last experts of {p.get('n_experts', '?')}) {which} ({p['mode']} fetch), "
              f"moved per chunk {_human(p['bytes_moved_per_chunk'])}")
        if p.get("predicted"):
            q = p["predicted"]
            print(f"  predicted per chunk: transfer {q['transfer_ms']:.2f} ms at {q['h2d_gbps']} GB/s, compute "
                  f"{q['compute_ms']:.2f} ms, chunk {q['chunk_ms']:.2f} ms, {100 * q['hidden_fraction']:.0f}% of transfer hidden")
        dc = d.get("decode_cache")
        if dc:
            print(f"  decode: {dc['why']}" if dc["policy"] == "off" else
                  f"  decode: expert cache ({dc['policy']}) of {dc['slots']} slots of {_human(dc['slot_bytes'])} ("
                  + ", ".join(f"{r['kind']} {r['slots']}" for r in dc["regions"] if r["slots"]) +
                  f"), the step cut after {len(dc['split_points'])} routers; streaming every expert would move "
                  f"{_human(dc['bytes_per_token_all'])} per token")
    elif p:
        print(f"\nall weights resident: {_human(p['resident_bytes'])} with KV cache at {p.get('max_context')} tokens")
    if d.get("segments"):
        print(f"capture segments {len(d['segments'])}: " + "; ".join(
            f"#{s['id']} {s['n_nodes']} nodes ({s['starts_with']})" for s in d["segments"][:4]) +
            (" ..." if len(d["segments"]) > 4 else ""))
    print(f"\nstates carried between calls: {len(d['states'])}")
    gg = d.get("ggfuse") or {}
    print(f"\ncompiled by ggfuse {gg.get('version')} (commit {str(gg.get('commit'))[:12]}) with options:")
    print("  " + " ".join(f"{k}={v}" for k, v in sorted((d.get('options') or {}).items())))
    low = d.get("lowering") or {}
    if low:
        t = low["target"]
        print(f"lowered for {t['name']} (cc {t['cc']}, {t['sms']} SMs assumed), precision {low['precision']}, "
              f"captured chunk sizes {low['captures']}; dense matrices {low['dense_form']['why']}")
        if low.get("pdl"):
            print(f"programmatic dependent launch {'on' if low['pdl']['on'] else 'off'}: {low['pdl']['why']}")
        print("kernels: " + ", ".join(f"{k} x{v}" for k, v in d["kernels"].items()))
        forms: dict = {}
        for w in d["weights"]:
            key = "+".join(w.get("forms") or []) + (f" ({w['residency']})" if w.get("residency") else "")
            e = forms.setdefault(key, [0, 0])
            e[0] += 1
            e[1] += int(w.get("device_bytes") or 0)
        print("weights on the device: " + "; ".join(f"{k}: {c} tensors {_human(b)}" for k, (c, b) in sorted(forms.items())))
    else:
        print("not lowered (target cpu): the cpu reference interprets the graph")


def cmd_inspect(args) -> int:
    from ggfuse.compiler.plan import load_plan
    plan = load_plan(args.plan)
    d = inspect_summary(plan)
    if args.dot:
        from ggfuse.errors import escape
        from ggfuse.fileio import write_atomic
        from ggfuse.ir.printer import to_dot
        write_atomic(args.dot, to_dot(plan.graph, weights=args.dot_weights), inputs=[args.plan], what="dot file")
        print(f"wrote {escape(args.dot)} (render: dot -Tsvg {escape(args.dot)} -o graph.svg)", file=sys.stderr)
    if args.text:
        from ggfuse.ir.printer import to_text
        sys.stdout.write(to_text(plan.graph))
    elif args.json:
        print(json.dumps(d, indent=1, sort_keys=True))
    elif not args.dot:
        print_summary(d)
        if not args.summary:
            print_steps(d)
    return 0


# ---- run -------------------------------------------------------------------------------------

def _parse_tokens(s: str) -> list[int]:
    from ggfuse.options import count_list
    return count_list(s, "--tokens", 0, (1 << 63) - 1)


def _logits_path(path: str) -> str:
    """--logits FILE: written as .npy; a name without that extension is refused rather than
    silently becoming FILE.npy (what np.save would do)."""
    if not path.endswith(".npy"):
        raise GGFuseError(path, "--logits writes a NumPy .npy file: give a name ending in .npy")
    return path


def _progress(total: int, chunk: int, device: str):
    """A per-chunk progress line on stderr for long cpu-reference prefills (None otherwise)."""
    from ggfuse.options import quiet
    if device != "cpu" or total <= chunk or quiet():
        return None
    done = [0]

    def on_chunk(n_past):
        done[0] = min(total, done[0] + chunk)
        print(f"prefill {done[0]}/{total} tokens", file=sys.stderr, flush=True)
    return on_chunk


def cmd_run(args) -> int:
    import ggfuse
    from ggfuse.options import from_args
    model_path = args.model or EXAMPLE_MODEL
    if not args.model:
        print(f"no model given: running the example model {os.path.relpath(model_path)}", file=sys.stderr)
    options = from_args(args)          # bad option values fail before the model loads
    if args.tokens is None:
        from ggfuse.runtime.text_cli import run_text, sampling_kwargs
        if args.logits:
            raise GGFuseError(None, "--logits needs --tokens (it saves the logits of given token ids)")
        sampling_kwargs(args)   # bad flag values fail before the model loads
        m = ggfuse.load(model_path, options=options)
        return run_text(args, m)
    tokens = _parse_tokens(args.tokens)
    if args.logits:
        from ggfuse.fileio import check_output
        check_output(_logits_path(args.logits), inputs=[model_path], what="--logits file")
    m = ggfuse.load(model_path, options=options)
    logits = m.prefill(tokens, on_chunk=_progress(len(tokens), m.chunk, m.device))
    from ggfuse.runtime.generate import check_finite
    check_finite(m, logits)
    if args.logits:
        from ggfuse.errors import escape
        from ggfuse.fileio import atomic_output
        with atomic_output(args.logits, "wb", inputs=[model_path], what="--logits file") as f:
            np.save(f, logits)
        print(f"wrote logits {logits.shape} to {escape(args.logits)}", file=sys.stderr)
    last = logits[-1].astype(np.float64)
    p = np.exp(last - last.max())
    p /= p.sum()
    vocab = m.vocab()
    print(f"{m.arch} on {m.device}: {len(tokens)} tokens in, top-5 next tokens:")
    for t in np.argsort(-last, kind="stable")[:5]:
        text = f"  {vocab[t]!r}" if vocab is not None and t < len(vocab) else ""
        print(f"  {int(t):>8}  logit {last[t]:9.4f}  p {p[t]:.4f}{text}")
    return 0


# ---- main ------------------------------------------------------------------------------------

class UsageError(GGFuseError):
    """A command line argparse cannot read (an unknown flag, a missing argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse with ggfuse's one-line errors (and exit code 2) instead of usage + error."""

    def error(self, message):
        raise UsageError(None, f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    from ggfuse.compiler.buildinfo import build_info
    info = build_info()
    commit = f" (commit {info['commit'][:12]}{', modified' if info.get('dirty') else ''})" if info.get("commit") else ""
    return f"ggfuse {info['version']}{commit}"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ggfuse", description="Compile GGUF hybrid GDN + MoE models into a fused prefill plan and run it.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (accepted anywhere on the command line)")
    ap.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    from ggfuse.options import COMPILE, add_arguments
    c = sub.add_parser("compile", help="GGUF -> plan file")
    c.add_argument("model", help="the GGUF to compile")
    c.add_argument("-o", "--output", help="plan path (default MODEL.ggfuse.json)")
    c.add_argument("--passes", help="comma-separated passes to run (default: the whole pipeline)")
    c.add_argument("--skip-pass", help="comma-separated passes to skip")
    c.add_argument("--dump-dir", help="write the graph as text after each pass into this folder")
    add_arguments(c, COMPILE)
    c.set_defaults(fn=cmd_compile)

    i = sub.add_parser("inspect", help="summarise a plan")
    i.add_argument("plan", help="a plan file (ggfuse compile writes one)")
    i.add_argument("--json", action="store_true", help="the summary as JSON")
    i.add_argument("--dot", metavar="FILE", help="write the graph as Graphviz dot")
    i.add_argument("--dot-weights", action="store_true", help="include weight nodes in --dot")
    i.add_argument("--text", action="store_true", help="print the whole graph, one node per line")
    i.add_argument("--summary", action="store_true", help="the summary only, without the table of steps")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("run", help="generate text from a prompt (or, with --tokens, print the top-5 next tokens)")
    r.add_argument("model", nargs="?", help="GGUF or plan (default: the example model)")
    r.add_argument("--tokens", default=None, help="comma-separated token ids: prefill them and print the top-5 "
                                                  "next tokens instead of generating text")
    r.add_argument("--logits", help="with --tokens: save all logits [n_tokens, vocab] to this .npy")
    # compile options apply when MODEL is a GGUF (compiled on the fly); a plan must have been
    # compiled with the ones given
    add_arguments(r)
    from ggfuse.runtime.text_cli import add_text_run_arguments, add_tokenize_parser
    add_text_run_arguments(r)
    r.set_defaults(fn=cmd_run)
    add_tokenize_parser(sub)

    try:
        from ggfuse.compiler.synth import add_synth_parser
        add_synth_parser(sub)
    except ImportError:
        pass
    try:
        from ggfuse.runtime.bench import add_bench_parser
        add_bench_parser(sub)
    except ImportError:
        pass
    from ggfuse.runtime.serve.cli import add_serve_parser
    add_serve_parser(sub)
    return ap


REPORT = ("ggfuse: this is a bug in ggfuse, not a problem with your input: please report it with the command line "
          "and the traceback above")


def _one_line_oserror(e: OSError) -> str:
    from ggfuse.errors import escape
    name = e.filename if e.filename is not None else None
    what = e.strerror or e.__class__.__name__
    return f"{escape(os.fsdecode(name))}: {what}" if name is not None else what


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (before or after the command, among its flags); not after a bare "--"
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
        return int(args.fn(args) or 0)
    except GGFuseError as e:
        if debug:
            raise
        print(f"ggfuse: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("ggfuse: error: out of host memory (try a smaller --chunk)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`ggfuse inspect plan | head`): not an error worth a traceback
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except OSError as e:
        # a file the user named that cannot be read or written (permissions, a full disk, ...)
        if debug:
            raise
        print(f"ggfuse: error: {_one_line_oserror(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ggfuse: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception:
        import traceback
        traceback.print_exc()
        print(REPORT, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
