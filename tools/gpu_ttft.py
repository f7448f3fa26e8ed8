"""Time to first token of the text path against a bare prefill of the same prompt (run on a GPU
machine): the text path (tokenizing, prefill with last-token logits, the first sample) should add
no hidden cost to the prefill `ggfuse bench` measures.

    python tools/gpu_ttft.py MODEL.gguf [--prompt 2048] [--chunk 2048] [--repeat 5] [--device cuda]

MODEL: e.g. `ggfuse synth --preset qwen3.5-35b-a3b --quant q4_k_m -o /tmp/q35.gguf` (synth
writes a real tokenizer). Prints the median prefill time, the median TTFT of m.stream(text, 1)
(tokenizing included) and their ratio.
"""
import argparse
import statistics
import time

import ggfuse

PARAGRAPH = ("The quick brown fox jumps over the lazy dog. Numbers like 3.14159 and 2026 appear, "
             "as do names, places and code such as `for i in range(10): print(i)`.\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vram-budget", default=None)
    args = ap.parse_args()

    m = ggfuse.load(args.model, device=args.device, chunk=args.chunk, vram_budget=args.vram_budget)
    tok = m.tokenizer
    text = PARAGRAPH
    while len(tok.encode(text)) < args.prompt:
        text += PARAGRAPH
    ids = tok.encode(text)[:args.prompt]
    text = tok.decode(ids)
    ids = tok.encode(text, parse_special=True)
    print(f"prompt: {len(ids)} tokens ({len(text)} characters)")

    def prefill():
        m.reset()
        t = time.perf_counter()
        m.prefill(ids, logits="last")
        return time.perf_counter() - t

    def ttft():
        s = m.stream(text, 1)
        for _ in s:
            pass
        return s.stats.ttft_s, s.stats.tokenize_s

    prefill(); ttft()   # warm-up: graph capture, first tokenizer use
    p = statistics.median(prefill() for _ in range(args.repeat))
    runs = [ttft() for _ in range(args.repeat)]
    t, tk = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"prefill {p * 1e3:.2f} ms ({len(ids) / p:.0f} tok/s); TTFT {t * 1e3:.2f} ms "
          f"(tokenizing {tk * 1e3:.2f} ms); TTFT / prefill = {t / p:.3f}")


if __name__ == "__main__":
    main()
