"""`ggfuse.load(...)`: a plan or a GGUF in, a model with prefill() and reset() out."""
from __future__ import annotations

import functools
import os

import numpy as np

from ggfuse.compiler.driver import DEFAULT_CHUNK, check_source, compile_gguf
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.compiler.plan import load_plan
from ggfuse.errors import DeviceError, GGFuseError


def _is_plan(path: str) -> bool:
    if path.endswith(".json"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"{"
    except OSError:
        return False


def check_budget(plan, vram_budget, chunk: int | None, plan_path: str) -> None:
    """Refuse a plan compiled for another --vram-budget than the one asked for, or a larger chunk
    than a budgeted plan's (its arena was sized into the budget)."""
    from ggfuse.errors import PlanError
    from ggfuse.passes.schedule_expert_prefetch import parse_bytes
    have = (plan.stats.get("prefetch") or {}).get("budget_bytes")
    src = plan.source.get("path", "MODEL.gguf")
    if vram_budget is not None and parse_bytes(vram_budget) != have:
        what = f"--vram-budget {have} bytes" if have else "no --vram-budget (everything resident)"
        raise PlanError(plan_path, f"plan was compiled for {what}, not {parse_bytes(vram_budget)} bytes; "
                                   f"recompile with `ggfuse compile {src} --vram-budget {vram_budget}` "
                                   f"or load the GGUF itself")
    if have and chunk and chunk > plan.chunk:
        raise PlanError(plan_path, f"plan was compiled for chunk {plan.chunk} under a {have}-byte budget; "
                                   f"chunk {chunk} needs a larger arena: recompile with --chunk {chunk}")


def cuda_available() -> bool:
    from ggfuse.runtime import cuda
    return cuda.available()


class Model:
    """A loaded model. prefill() feeds tokens and returns logits for every position it was
    given; state (KV cache, conv window, recurrent state) carries over to the next call."""

    def __init__(self, plan, gf, backend, chunk: int):
        self.plan = plan
        self.gguf = gf
        self.backend = backend
        self.chunk = chunk
        self.arch = plan.arch
        self.hparams = plan.hparams
        self.n_vocab = int(plan.hparams.get("n_vocab", 0))
        self.device = backend.name

    @property
    def n_past(self) -> int:
        return self.backend.n_past

    def reset(self) -> None:
        self.backend.reset()

    def prefill(self, token_ids, logits: str = "all") -> np.ndarray:
        """Feed tokens; returns logits [n, vocab] for every position ("all", the default) or only
        the last position's [1, vocab] ("last": what time-to-first-token needs)."""
        if logits not in ("all", "last"):
            raise GGFuseError(None, f"logits must be 'all' or 'last', got {logits!r}")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        if ids.min() < 0 or (self.n_vocab and ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise GGFuseError(self.gguf.path, f"token id {bad} is outside the vocabulary 0..{self.n_vocab - 1}")
        starts = list(range(0, ids.size, self.chunk))
        outs = []
        for i in starts:
            last = i == starts[-1]
            want = logits if logits == "all" else ("last" if last else "none")
            out = self.backend.run_chunk(ids[i:i + self.chunk], want)
            if out is not None:
                outs.append(out)
        return np.concatenate(outs, axis=0)

    def vocab(self):
        return self.gguf.vocab()

    # -- text (runtime/tokenizer.py, runtime/generate.py) -------------------------------------------

    last_stats = None   # the GenerationStats of the last generate() / stream() / chat turn

    @functools.cached_property
    def tokenizer(self):
        """The GGUF's tokenizer (ggfuse.Tokenizer); GGFuseError if the file has none."""
        from ggfuse.runtime.tokenizer import Tokenizer
        return Tokenizer.from_gguf(self.gguf)

    def generate(self, prompt, max_new_tokens: int | None = 128, **kwargs) -> list[int]:
        """The new token ids after `prompt` (a str, tokenized with self.tokenizer, or a list of
        ids). Keywords: temperature=0.0 (greedy), top_k=40, top_p=0.95, min_p=0.05,
        repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=() (strings), reset=True (False:
        continue from the tokens already fed). self.last_stats holds the timings afterwards."""
        from ggfuse.runtime.generate import generate
        return generate(self, prompt, max_new_tokens, **kwargs)

    def stream(self, prompt, max_new_tokens: int | None = 128, **kwargs):
        """Like generate(), but an iterator of the new text, piece by piece as it comes (a
        multi-byte character is never split); its .stats are complete once it is exhausted."""
        from ggfuse.runtime.generate import stream
        return stream(self, prompt, max_new_tokens, **kwargs)


PRECISIONS = ("bf16", "f32")


def resolve_precision(precision: str | None) -> str:
    """The precision asked for, else $GGFUSE_PRECISION, else "bf16"; GGFuseError for others."""
    p = precision if precision is not None else (os.environ.get("GGFUSE_PRECISION") or "bf16")
    if p not in PRECISIONS:
        raise GGFuseError(None, f"unknown precision {p!r} (use bf16 or f32)")
    return p


def load(path: str, device: str = "auto", chunk: int | None = None, gguf: str | None = None,
         vram_budget=None, precision: str | None = None) -> Model:
    """Load a plan (.json) or a GGUF (compiled on the fly).

    device: "cpu" (numpy reference), "cuda", or "auto" (cuda when available, else cpu).
    chunk: prefill chunk length (default: the plan's, or 512 for a GGUF).
    gguf: the GGUF a plan runs against, when it moved since compile time.
    vram_budget: device memory budget ("12GiB", bytes): a GGUF is compiled for it (experts that
    do not fit are streamed); a plan must have been compiled for the same budget (a plan is a
    compiled artifact: it is never silently recompiled), and under a budget it runs at its own
    chunk or a smaller one (a larger chunk needs a larger arena than the budget planned).
    precision: "bf16" (default; $GGFUSE_PRECISION when None): GEMMs on bf16 tensor cores; "f32":
    f32-faithful GEMMs and delta rule on the cuda device, for verification (slower; see
    runtime/cuda/ops.py). The cpu device always computes in f32 and accepts both.
    """
    precision = resolve_precision(precision)
    if device not in ("auto", "cpu", "cuda"):
        raise GGFuseError(None, f"unknown device {device!r} (use auto, cpu or cuda)")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise DeviceError(path, "the cuda device is not available (no GPU, or cupy/cuda-python not installed); use device='cpu'")
    if _is_plan(path):
        plan = load_plan(path)
        src = gguf or plan.source["path"]
        if not os.path.isabs(src) and not os.path.exists(src):
            src = os.path.join(os.path.dirname(os.path.abspath(path)), src)
        gf = GGUFFile(src)
        check_source(plan, gf, path)
        check_budget(plan, vram_budget, chunk, path)
    else:
        gf = GGUFFile(path)
        plan = compile_gguf(path, chunk=chunk or DEFAULT_CHUNK, gf=gf, vram_budget=vram_budget)
    if device == "cuda":
        from ggfuse.runtime.cuda import CUDABackend
        backend = CUDABackend(plan, gf, chunk=chunk or plan.chunk, precision=precision)
    else:
        from ggfuse.runtime.cpu import CPUBackend
        backend = CPUBackend(plan, gf)
    return Model(plan, gf, backend, chunk or plan.chunk)
