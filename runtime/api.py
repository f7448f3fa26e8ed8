"""`ggfuse.load(...)`: a plan or a GGUF in, a model with prefill() and reset() out."""
from __future__ import annotations

import functools
import os

import numpy as np

from ggfuse.compiler.driver import check_source, compile_gguf
from ggfuse.compiler.gguf_file import GGUFFile
from ggfuse.compiler.plan import check_weights, load_plan
from ggfuse.errors import DeviceError, GGFuseError, PlanError


def _is_plan(path: str) -> bool:
    if path.endswith(".json"):
        return True
    from ggfuse.fileio import open_input
    try:
        with open_input(path, "rb", what="model") as f:
            return f.read(1) == b"{"
    except (OSError, GGFuseError):
        return False


def token_array(token_ids, n_vocab: int, where=None) -> np.ndarray:
    """Token ids as a 1-D int64 array, each in 0..n_vocab-1: a list (or tuple, or 1-D integer
    array) of Python or numpy integers. Floats, booleans, None, strings, nested or ragged lists
    and out-of-range ids are refused (GGFuseError naming the first bad one) rather than cast."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or not (np.issubdtype(token_ids.dtype, np.integer) and token_ids.dtype != np.bool_):
            raise GGFuseError(where, f"token ids must be a 1-D array of integers, got a {token_ids.ndim}-D "
                                     f"{token_ids.dtype} array")
        items = token_ids.tolist()
    elif isinstance(token_ids, (list, tuple, range)):
        items = list(token_ids)
    else:
        raise GGFuseError(where, f"token ids must be a list of integers, got {type(token_ids).__name__}")
    for i, t in enumerate(items):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise GGFuseError(where, f"expected a list of token ids (integers); item {i} is {t!r}"[:200])
        if not 0 <= int(t) < n_vocab:
            raise GGFuseError(where, f"token id {int(t)} (item {i}) is outside the vocabulary 0..{n_vocab - 1}")
    return np.asarray([int(t) for t in items], dtype=np.int64).reshape(-1)


def check_plan_options(plan, given: dict, plan_path: str) -> None:
    """Refuse to run a plan under compile options other than its own: a plan is a compiled
    artifact (its kernels, memory layout and streaming were decided for them), never silently
    recompiled. given: the compile options the caller set explicitly. The chunk is the device's
    to check (the cpu reference runs any length; the cuda device the sizes the plan captures)."""
    from ggfuse.errors import PlanError
    src = plan.source.get("path", "MODEL.gguf")
    for k, v in sorted(given.items()):
        if k == "chunk":
            if int(v) > plan.chunk:
                raise PlanError(plan_path, f"plan was compiled for chunk {plan.chunk}; chunk {v} needs a larger arena "
                                           f"and other captured graphs: recompile with `ggfuse compile {src} --chunk {v}`")
            continue
        have = plan.options.get(k)
        if have != v:
            def show(x):
                return "none" if x is None else x
            raise PlanError(plan_path, f"plan was compiled with {k}={show(have)}, not {show(v)}; recompile with "
                                       f"`ggfuse compile {src} --{k.replace('_', '-')} {show(v)}` or load the GGUF itself")


_SAID_CPU_FALLBACK = []


def _say_cpu_fallback() -> None:
    """device auto without a usable GPU: say so once per process (stderr), and that it is slow."""
    from ggfuse.options import quiet
    if _SAID_CPU_FALLBACK or quiet():
        return
    _SAID_CPU_FALLBACK.append(True)
    import sys
    print("ggfuse: no CUDA device (or no cupy / cuda-python): running on the cpu reference, which is numpy and "
          "slow (for checking results, not for speed); --device cpu silences this", file=sys.stderr)


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

    def prefill(self, token_ids, logits: str = "all", on_chunk=None) -> np.ndarray:
        """Feed tokens; returns logits [n, vocab] for every position ("all", the default) or only
        the last position's [1, vocab] ("last": what time-to-first-token needs). on_chunk(n_past)
        is called after each chunk (the prefix cache snapshots the state there)."""
        if logits not in ("all", "last"):
            raise GGFuseError(None, f"logits must be 'all' or 'last', got {logits!r}")
        if on_chunk is not None and not callable(on_chunk):
            raise GGFuseError(None, f"on_chunk must be callable, got {type(on_chunk).__name__}")
        ids = token_array(token_ids, self.n_vocab, getattr(getattr(self, "gguf", None), "path", None))
        if ids.size == 0:
            return np.zeros((0, self.n_vocab), dtype=np.float32)
        starts = list(range(0, ids.size, self.chunk))
        outs = []
        for i in starts:
            last = i == starts[-1]
            want = logits if logits == "all" else ("last" if last else "none")
            out = self.backend.run_chunk(ids[i:i + self.chunk], want)
            if out is not None:
                outs.append(out)
            if on_chunk is not None:
                on_chunk(self.n_past)
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


def load(path: str, device: str | None = None, chunk: int | None = None, gguf: str | None = None,
         vram_budget=None, precision: str | None = None, *, options=None, **kw) -> Model:
    """Load a plan (.json) or a GGUF (compiled on the fly).

    device: "cpu" (numpy reference), "cuda", or "auto" (cuda when available, else cpu).
    chunk: prefill chunk length (default: the plan's, or 512 for a GGUF).
    gguf: the GGUF a plan runs against, when it moved since compile time.
    vram_budget: device memory budget ("12GiB", bytes): a GGUF is compiled for it (experts that
    do not fit are streamed).
    precision: "bf16" (default): GEMMs on bf16 tensor cores; "f32": f32-faithful GEMMs and delta
    rule on the cuda device, for verification (slower; see runtime/cuda/ops.py). The cpu device
    always computes in f32.
    options: a ggfuse.options.Options; any other keyword is one of its fields (target=,
    max_context=, moe_schedule=, stream_host=, eager=, ...). A plan must have been compiled
    with the compile options given here (a plan is a compiled artifact: it is never silently
    recompiled); a chunk may be one of the sizes it captures.
    """
    from ggfuse.fileio import check_input
    from ggfuse.options import COMPILE, Options
    check_input(path, "model")
    if gguf is not None:
        check_input(gguf, "GGUF")
    given = dict(kw, device=device, chunk=chunk, vram_budget=vram_budget, precision=precision)
    opts = Options.make(options, **given)
    explicit = {k: getattr(opts, k) for k, v in given.items() if v is not None and k in Options.names(COMPILE)}
    dev = opts.device
    fell_back = dev == "auto" and not cuda_available()
    if dev == "auto":
        dev = "cpu" if fell_back else "cuda"
    if dev == "cuda" and not cuda_available():
        raise DeviceError(path, "the cuda device is not available (no GPU, or cupy/cuda-python not installed); use device='cpu'")
    opts = opts.replace(device=dev)
    if _is_plan(path):
        plan = load_plan(path)
        src = gguf or plan.source["path"]
        if not os.path.isabs(src) and not os.path.exists(src):
            src = os.path.join(os.path.dirname(os.path.abspath(path)), src)
        try:
            check_input(src, "GGUF")
        except GGFuseError as e:
            raise PlanError(path, f"source.path: the plan's GGUF {e}; pass the GGUF it was compiled from "
                                  f"(ggfuse.load(plan, gguf=...))") from None
        try:
            gf = GGUFFile(src)
        except GGFuseError as e:
            raise PlanError(path, f"source.path: {e}") from None
        check_source(plan, gf, path)
        check_weights(plan, gf, path)
        check_plan_options(plan, explicit, path)
        run_chunk = opts.chunk if chunk is not None else plan.chunk
    else:
        gf = GGUFFile(path)
        if dev == "cpu" and opts.target == "auto":
            opts = opts.replace(target="cpu")
        plan = compile_gguf(path, options=opts, gf=gf)
        run_chunk = plan.chunk
    if dev == "cuda":
        from ggfuse.runtime.cuda import CUDABackend
        backend = CUDABackend(plan, gf, chunk=run_chunk, options=opts)
    else:
        from ggfuse.runtime.cpu import CPUBackend
        backend = CPUBackend(plan, gf)
    if fell_back:       # said once the model is loaded: an error is still one line
        _say_cpu_fallback()
    return Model(plan, gf, backend, run_chunk)
