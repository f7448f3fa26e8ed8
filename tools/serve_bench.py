"""`ggfuse serve` under a multi-turn chat: time to first token per turn with the prompt-prefix cache
and without it, the cold prefill of the last turn, and the server's own overhead per request;
optionally llama-server on the same file with the same client.

    ggfuse synth --preset qwen3.5-35b-a3b --quant q4_k_m -o /tmp/q35.gguf
    python tools/serve_bench.py /tmp/q35.gguf --device cuda --out /tmp/serve-bench.json \\
        [--llama-server /path/to/llama-server]

    python tools/serve_bench.py examples/qwen35moe-tiny-q4_k_m.gguf --device cpu \\
        --system-tokens 48 --user-tokens 16 --gen-tokens 4 --turns 3 --overhead-requests 5   # a quick check

The chat: a system prompt of --system-tokens tokens, then --turns user turns of --user-tokens
tokens each (seeded random words), each answered with up to --gen-tokens greedy tokens; every
request sends the whole conversation, as chat clients do. It runs twice against one server:
with the cache (the server's default), then the same conversations' requests again with
"cache_prompt": false (the field llama-server takes too), each a cold prefill. TTFT is measured
at the client: from sending the request to the first streamed chunk. The server's overhead of a
request is that TTFT less the model's own time to the first token (restore, prefill, first
sample: the response's timings.ttft_ms), at the median over --overhead-requests small requests
and over the chat turns: HTTP, JSON, the chat template, tokenizing, the queue.

Servers run as subprocesses on free loopback ports, logs beside --out. Everything is offline.
The JSON (written atomically) has the ggfuse commit, the serve command and its options, every
turn's numbers, and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river mountain garden window kitchen engine signal "
         "ocean forest market station library theory method answer question letter picture music history").split()


def tokenizer_of(path: str):
    from ggfuse.runtime.text_cli import tokenizer_of as of
    return of(path)


def text_of(tok, n_tokens: int, seed: int) -> str:
    """Seeded random words, about n_tokens tokens long (the last words cut to fit)."""
    import random
    rng = random.Random(seed)
    words = []
    while len(tok.encode(" ".join(words), add_special=False)) < n_tokens:
        words.extend(rng.choice(WORDS) for _ in range(max((n_tokens - len(words)) // 2, 8)))
    while len(words) > 1 and len(tok.encode(" ".join(words), add_special=False)) > n_tokens:
        words.pop()
    return " ".join(words).capitalize() + "."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess with its log in a file; stopped with SIGINT, then SIGKILL."""

    def __init__(self, cmd, log_path):
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self):
        if self.alive():
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.log.close()


def start_ggfuse(args, log_path) -> tuple[Proc, str]:
    cmd = [sys.executable, "-m", "ggfuse.compiler.cli", "serve", args.model, "--port", "0", "--device", args.device,
           "--cache-budget", args.cache_budget, "--cache-memory", args.cache_memory,
           "--max-queue", str(max(4, args.overhead_requests))]
    for flag in ("chunk", "max_context", "vram_budget", "precision"):
        v = getattr(args, flag)
        if v is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(v)]
    cmd += args.serve_args.split() if args.serve_args else []
    proc = Proc(cmd, log_path)
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.start_timeout:
        m = re.search(r"at (http://[^\s]+)/v1", proc.text())
        if m:
            return proc, m.group(1)
        if not proc.alive():
            break
        time.sleep(0.2)
    proc.stop()
    raise SystemExit(f"ggfuse serve did not start ({' '.join(cmd)}); its log, {log_path}:\n{proc.text()[-3000:]}")


def start_llama(args, log_path) -> tuple[Proc, str]:
    import httpx
    port = free_port()
    ctx = args.max_context or 8192
    cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-c", str(ctx),
           "-np", "1", "-ngl", "999" if args.device != "cpu" else "0"] + (args.llama_args.split() if args.llama_args else [])
    proc = Proc(cmd, log_path)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.start_timeout:
        if not proc.alive():
            break
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.stop()
    raise SystemExit(f"llama-server did not start ({' '.join(cmd)}); its log, {log_path}:\n{proc.text()[-3000:]}")


def ask(client, url, model, messages, max_tokens, cache_prompt=True) -> dict:
    """One streamed chat request: client TTFT and total, the answer, usage and the server's timings."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if not cache_prompt:
        body["cache_prompt"] = False
    t0 = time.perf_counter()
    ttft, text, use, timings = None, [], None, {}
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=None) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {r.read().decode(errors='replace')[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise SystemExit(f"{url}: error in the stream: {ev['error']}")
            if ev.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(ev["choices"][0].get("delta", {}).get("content") or "")
            use = ev.get("usage") or use
            timings = ev.get("timings") or timings
    total = time.perf_counter() - t0
    use = use or {}
    cached = ((use.get("prompt_tokens_details") or {}).get("cached_tokens")
              if use.get("prompt_tokens_details") else timings.get("cache_n"))
    model_ttft = timings.get("ttft_ms", timings.get("prompt_ms"))     # ggfuse / llama-server
    return {"ttft_ms": 1e3 * ttft if ttft is not None else None, "total_ms": 1e3 * total, "text": "".join(text),
            "prompt_tokens": use.get("prompt_tokens"), "completion_tokens": use.get("completion_tokens"),
            "cached_tokens": cached, "server_ttft_ms": model_ttft,
            "overhead_ms": (1e3 * ttft - model_ttft) if ttft is not None and model_ttft is not None else None,
            "timings": timings}


def run_server(url: str, args, system: str, users: list[str], label: str) -> dict:
    import httpx
    with httpx.Client() as c:
        model = c.get(url + "/v1/models").json()["data"][0]["id"]
        # warm-up: a conversation the measured one shares nothing with
        ask(c, url, model, [{"role": "user", "content": "Warm up " * 8}], 2)
        msgs = [{"role": "system", "content": system}]
        cached, cold = [], []
        for k, u in enumerate(users):
            msgs.append({"role": "user", "content": u})
            r = ask(c, url, model, msgs, args.gen_tokens)
            r["messages"] = len(msgs)
            cached.append(r)
            msgs.append({"role": "assistant", "content": r["text"]})
            print(f"{label} turn {k + 1}: prompt {r['prompt_tokens']}, cached {r['cached_tokens']}, "
                  f"TTFT {r['ttft_ms']:.1f} ms", file=sys.stderr, flush=True)
        # the same requests again, each a cold prefill (the conversations are the same)
        for k in range(len(users)):
            r = ask(c, url, model, msgs[:2 + 2 * k], args.gen_tokens, cache_prompt=False)
            cold.append(r)
            print(f"{label} turn {k + 1} without the cache: prompt {r['prompt_tokens']}, TTFT {r['ttft_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
        small = [ask(c, url, model, [{"role": "user", "content": "Hi"}], 1) for _ in range(args.overhead_requests)]
    for r in cached + cold:
        r.pop("text", None)
    for r in small:
        r.pop("text", None)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    last_cached, last_cold = cached[-1], cold[-1]
    return {"model_id": model, "turns": cached, "cold_turns": cold, "small_requests": small,
            "summary": {
                "ttft_ms": [r["ttft_ms"] for r in cached],
                "ttft_cold_ms": [r["ttft_ms"] for r in cold],
                "new_tokens": [(r["prompt_tokens"] or 0) - (r["cached_tokens"] or 0) for r in cached],
                "cold_prefill_last_turn_ms": last_cold["ttft_ms"],
                "speedup_last_turn": (last_cold["ttft_ms"] / last_cached["ttft_ms"]
                                      if last_cached["ttft_ms"] else None),
                "overhead_ms_median_small": med(r["overhead_ms"] for r in small),
                "overhead_ms_median_turns": med(r["overhead_ms"] for r in cached + cold),
                "tokenize_ms_median_turns": med(r["timings"].get("tokenize_ms") for r in cached + cold),
            }}


def table(results: dict) -> str:
    lines = []
    for label, res in results.items():
        s = res["summary"]
        lines.append(f"\n{label} ({res['model_id']})")
        lines.append(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'new':>6} {'TTFT ms':>9} {'ms/new tok':>10} "
                     f"{'cold TTFT ms':>12} {'cold/cached':>11}")
        for k, (r, c) in enumerate(zip(res["turns"], res["cold_turns"])):
            new = (r["prompt_tokens"] or 0) - (r["cached_tokens"] or 0)
            per = r["ttft_ms"] / new if new else float("nan")
            lines.append(f"{k + 1:>4} {r['prompt_tokens'] or 0:>7} {r['cached_tokens'] or 0:>7} {new:>6} "
                         f"{r['ttft_ms']:>9.1f} {per:>10.3f} {c['ttft_ms']:>12.1f} {c['ttft_ms'] / r['ttft_ms']:>11.2f}")

        def f(x, unit=" ms"):
            return "n/a" if x is None else f"{x:.2f}{unit}"
        lines.append(f"cold prefill of the last turn: {f(s['cold_prefill_last_turn_ms'])}; with the cache "
                     f"{f(s['speedup_last_turn'], 'x')} faster")
        lines.append(f"server overhead per request (client TTFT - model TTFT), median: {f(s['overhead_ms_median_small'])} "
                     f"(small requests), {f(s['overhead_ms_median_turns'])} (chat turns; tokenizing "
                     f"{f(s['tokenize_ms_median_turns'])})")
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".serve-bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF with a tokenizer and a chat template")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--chunk", default=None, help="ggfuse's --chunk (default: ggfuse's)")
    ap.add_argument("--max-context", type=int, default=None, help="context of both servers (default 8192)")
    ap.add_argument("--vram-budget", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--cache-budget", default="8GiB", help="ggfuse's --cache-budget (default 8GiB)")
    ap.add_argument("--cache-memory", default="auto")
    ap.add_argument("--serve-args", default="", help="more `ggfuse serve` flags, one string")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--user-tokens", type=int, default=500)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--overhead-requests", type=int, default=20)
    ap.add_argument("--llama-server", metavar="PATH", help="also run this llama-server binary on the same file")
    ap.add_argument("--llama-args", default="", help="more llama-server flags, one string")
    ap.add_argument("--start-timeout", type=float, default=1800.0, help="seconds a server may take to start")
    ap.add_argument("--out", default="serve-bench.json", help="JSON results (written atomically)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.model):
        raise SystemExit(f"{args.model}: no such file")
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"{args.llama_server}: not an executable file")

    from ggfuse.compiler.buildinfo import build_info
    tok = tokenizer_of(args.model)
    system = text_of(tok, args.system_tokens, seed=0)
    users = [text_of(tok, args.user_tokens, seed=k + 1) for k in range(args.turns)]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.out))[0]
    results, commands = {}, {}

    proc, url = start_ggfuse(args, os.path.join(out_dir, f"{stem}.ggfuse.log"))
    commands["ggfuse"] = proc.cmd
    try:
        results["ggfuse serve"] = run_server(url, args, system, users, "ggfuse")
    finally:
        proc.stop()
    if args.llama_server:
        proc, url = start_llama(args, os.path.join(out_dir, f"{stem}.llama-server.log"))
        commands["llama-server"] = proc.cmd
        try:
            results["llama-server"] = run_server(url, args, system, users, "llama-server")
        finally:
            proc.stop()
    report = table(results)
    print(report)
    # the options the server ran with: its own command line through the CLI's parser and
    # `ggfuse serve`'s defaults (runtime/serve/cli.py serve_options), not Options' defaults
    from ggfuse.compiler.cli import build_parser
    from ggfuse.runtime.serve.cli import serve_options
    served = serve_options(build_parser().parse_args(commands["ggfuse"][3:]))
    write_json(args.out, {"ggfuse": build_info(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
                          "commands": commands, "options": served.to_json(), "results": results,
                          "table": report})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
