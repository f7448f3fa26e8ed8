"""Every behaviour switch of ggfuse, in one frozen, validated object.

`Options` holds the compile options (they decide the plan: the kernels, their variants, the
memory layout; a plan records them in its "options" section) and the runtime options (how a
plan is executed on this machine: device, host streaming path, capture or not). CLI flags and
`ggfuse.load(...)` keyword arguments map onto these fields one to one (the flag is the field
name with '-' for '_'), and every bench JSON carries the whole object with the ggfuse version
and git commit, so a run can be repeated from its JSON alone.

    opts = Options.make(chunk=4096, vram_budget="12GiB", target="sm_89")
    opts.chunk, opts.vram_budget          # 4096, 12884901888
    opts.replace(precision="f32")         # a new, validated object

Environment variables name paths and verbosity only (GGFUSE_CACHE: the cubin cache folder;
GGFUSE_QUIET=1: no progress lines); this module is the one place that reads them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields

from ggfuse.errors import GGFuseError

COMPILE, RUNTIME = "compile", "runtime"

TARGETS = ("auto", "sm_90a", "sm_89", "sm_80", "cpu")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(s, what: str = "size") -> int:
    """'12GiB', '12GB', '1.5g', '12884901888' -> bytes (positive, finite)."""
    if isinstance(s, bool):
        raise GGFuseError(None, f"{what}: cannot read {s!r} as a size")
    if isinstance(s, (int, float)):
        if not math.isfinite(s) or s < 1 or s > 1 << 60:
            raise GGFuseError(None, f"{what}: {s!r} is not a positive size (1 B .. 1 EiB)")
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise GGFuseError(None, f"{what}: cannot read {s!r} as a size (use e.g. 12GiB, 12GB, 12000000000)")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(v) or v < 1:
        raise GGFuseError(None, f"{what}: {s!r} is not a positive size")
    if v > 1 << 60:
        raise GGFuseError(None, f"{what}: {s!r} is larger than 1 EiB")
    return int(v)


def count(v, what: str, lo: int = 1, hi: int = 1 << 40) -> int:
    """An integer count in lo..hi from a CLI string or an API value (not a bool, not a float
    with a fraction, not NaN); GGFuseError naming `what` otherwise. For flags and arguments that
    are not Options fields (bench --repeat, --prompt, max_new_tokens, ...)."""
    bad = GGFuseError(None, f"{what}: {v!r} is not an integer in {lo}..{hi}"[:200])
    if isinstance(v, bool) or v is None:
        raise bad
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise bad
        v = int(v)
    if isinstance(v, str):
        t = v.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", t):
            raise bad
        v = int(t)
    if hasattr(v, "item") and not isinstance(v, int):    # numpy integers
        v = v.item()
    if not isinstance(v, int) or not lo <= v <= hi:
        raise bad
    return v


def count_list(s, what: str, lo: int = 1, hi: int = 1 << 40) -> list[int]:
    """Comma-separated counts ('512,2048'), each through count(); at least one."""
    items = str(s).replace(" ", "").split(",") if s is not None else []
    if not items or "" in items:
        raise GGFuseError(None, f"{what}: expected comma-separated integers, got {s!r}"[:200])
    return [count(x, what, lo, hi) for x in items]


def _opt(kind: str, help: str, choices=None, check=None, default=None):
    return field(default=default, metadata={"kind": kind, "help": help, "choices": choices, "check": check})


def _positive_int(name, v):
    bad = GGFuseError(None, f"option {name}: {v!r} is not a positive integer")
    if isinstance(v, bool):
        raise bad
    if isinstance(v, float):
        if not v.is_integer():
            raise bad
        v = int(v)
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise bad from None
    if not isinstance(v, int) or v <= 0 or v > 1 << 40:
        raise bad
    return v


def _upto(hi: int):
    """A positive-integer check with a ceiling (a chunk of 2^40 tokens is a typo, not a plan)."""
    def check(name, v):
        v = _positive_int(name, v)
        if v > hi:
            raise GGFuseError(None, f"option {name}: {v} is larger than {hi}")
        return v
    return check


def _bool(name, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise GGFuseError(None, f"option {name}: {v!r} is not a boolean (use true or false)")


def _budget(name, v):
    return None if v is None else parse_bytes(v, f"option {name}")


def _opt_positive(name, v):
    return None if v is None else _positive_int(name, v)


def _fraction(name, v):
    bad = GGFuseError(None, f"option {name}: {v!r} is not a fraction between 0 and 1 (e.g. 0.5)")
    if isinstance(v, bool):
        raise bad
    try:
        f = float(v.strip()) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise bad
    return f


@dataclass(frozen=True)
class Options:
    # ---- compile: they decide the plan ----
    target: str = _opt(COMPILE, "the GPU the plan is lowered for: sm_90a (Hopper: wgmma kernels), sm_89 (Ada), "
                                "sm_80 (Ampere), cpu (the numpy reference; no lowering), or auto (this machine's GPU, "
                                "else cpu). An sm_89 / sm_80 plan also runs on newer GPUs", TARGETS, default="auto")
    chunk: int = _opt(COMPILE, "prefill chunk length: the tokens one captured CUDA graph processes", None,
                      _upto(1 << 20), default=512)
    max_context: int = _opt(COMPILE, "longest sequence the KV cache is sized for", None, _upto(1 << 24),
                            default=8192)
    vram_budget: int | None = _opt(COMPILE, "device memory budget, e.g. 12GiB: experts that do not fit are streamed "
                                            "from the GGUF during each chunk", None, _budget)
    precision: str = _opt(COMPILE, "bf16: tensor-core GEMMs with bf16 operands; f32: f32-faithful GEMMs and delta "
                                   "rule (verification, slower)", ("bf16", "f32"), default="bf16")
    sub_chunks: bool = _opt(COMPILE, "also capture smaller chunk sizes (halvings of --chunk down to "
                                     "--sub-chunk-min) for short prompts and the tail of long ones", None, _bool,
                            default=True)
    sub_chunk_min: int = _opt(COMPILE, "smallest captured sub-chunk size", None, _upto(1 << 20), default=256)
    decode: bool = _opt(COMPILE, "also capture a one-token step, the graph text generation replays per token",
                        None, _bool, default=True)
    decode_cache: str = _opt(COMPILE, "decode under --vram-budget: streamed experts a token routes to are kept in "
                                      "a cache of expert slots in the device memory decoding leaves spare (the "
                                      "prefill slots, the arena above the one-token step's, the unused budget); "
                                      "misses are copied right after the router. slru: segmented LRU whose "
                                      "protected segment keeps the experts hit more than once; lru; off: every "
                                      "streamed expert copied per token as in prefill",
                             ("slru", "lru", "off"), default="slru")
    decode_cache_slots: int | None = _opt(COMPILE, "cap on the decode expert cache's slots (default: as many as the "
                                                   "spare memory holds)", None, _opt_positive)
    decode_cache_protected: float = _opt(COMPILE, "slru: the share of the decode cache's slots that the protected "
                                                  "(hot) segment may hold", None, _fraction, default=0.8)
    deltanet_chunk: int = _opt(COMPILE, "chunk length of the chunked (WY) delta rule", None, _upto(4096),
                            default=64)
    gemm: str = _opt(COMPILE, "tensor-core GEMM family: auto (wgmma on sm_90a where the weight type allows, else "
                              "mma.sync), mma, wgmma (an error where it cannot run)", ("auto", "mma", "wgmma"),
                     default="auto")
    dequant: str = _opt(COMPILE, "how the wgmma kernels dequantise GGML weights: fast (word-wise) or generic "
                                 "(element-wise, for comparison)", ("fast", "generic"), default="fast")
    dense_persist: bool = _opt(COMPILE, "sm_90a dense GEMMs as persistent blocks (else one block per tile)", None,
                               _bool, default=True)
    dense_gemm: str = _opt(COMPILE, "bf16 x bf16 dense GEMMs through cublas (inside the captured graph) or our "
                                    "ggfuse kernels", ("cublas", "ggfuse"), default="cublas")
    dense_form: str = _opt(COMPILE, "device form of dense quantised matrices: auto (dequantised to bf16 where that "
                                    "fits the budget or the device), raw (as stored), bf16", ("auto", "raw", "bf16"),
                           default="auto")
    bf16_act: bool = _opt(COMPILE, "store norm / gate outputs that only GEMMs read as bf16 (the GEMMs round them to "
                                   "bf16 anyway)", None, _bool, default=True)
    moe_x_bf16: bool = _opt(COMPILE, "the expert GEMMs read a bf16 copy of the (f32) MoE input", None, _bool,
                            default=True)
    moe_schedule: str = _opt(COMPILE, "grouped-GEMM schedule: auto (the few-rows kernels up to 16 rows per "
                                      "expert; beyond, on sm_90a: persist, wide 256-row tiles from 96), small, smallq (few rows, "
                                      "Q4_K / Q6_K quants as integers), and on sm_90a wide, persist, tiles",
                             ("auto", "small", "smallq", "wide", "persist", "tiles"),
                             default="auto")
    moe_blocks: int | None = _opt(COMPILE, "cap on the persistent grouped GEMMs' blocks (testing)", None,
                                  _opt_positive)
    router: str = _opt(COMPILE, "MoE router GEMM: f16x3 (tensor cores on split f16 halves), bf16x3, f32simt "
                                "(CUDA cores)", ("f16x3", "bf16x3", "f32simt"), default="f16x3")
    router_tile: str = _opt(COMPILE, "router GEMM tile: auto (by shape), 128x64, 64x64k2",
                            ("auto", "128x64", "64x64k2"), default="auto")
    decode_moe: str = _opt(COMPILE, "experts and router of the one-token (decode) step: gemv (matrix-vector "
                                    "products on the k picked experts' stored rows, the router in f32) or grouped "
                                    "(the prefill's grouped GEMMs)", ("gemv", "grouped"), default="gemv")
    decode_deltanet: str = _opt(COMPILE, "delta rule of the one-token (decode) step: recurrent (the state "
                                         "update for one token) or chunk (the prefill's chunked kernels)",
                                ("recurrent", "chunk"), default="recurrent")
    decode_dense: str = _opt(COMPILE, "dense matmuls of the one-token (decode) step and the LM head's last row: "
                                      "auto (a matrix-vector kernel on the GGUF's quantised rows, kept on the device "
                                      "beside a bf16 copy where the GEMMs read one, for the types whose one-row "
                                      "kernel is faster than cuBLAS on that copy: Q4_K, Q6_K; the GEMMs otherwise), gemm (the prefill's GEMMs: cuBLAS on bf16 matrices; the "
                                      "head's last row on the GEMMs' form) or gemv (auto, and the bf16 matrices too)",
                             ("auto", "gemm", "gemv"), default="auto")
    decode_attention: str = _opt(COMPILE, "attention of the one-token (decode) step over the KV cache: flash (the "
                                          "prefill's kernel, a block per query head walking every key) or split (the "
                                          "keys cut into ranges folded in parallel, then combined: flash-decoding; "
                                          "not yet measured on a GPU)", ("flash", "split"), default="flash")
    decode_router: str = _opt(COMPILE, "router of the one-token step's matrix-vector experts: fused (the f32 router "
                                       "GEMV, the shared expert's gate and the top-k in one launch) or gemv (a launch "
                                       "each)", ("fused", "gemv"), default="fused")
    decode_deltanet_fold: bool = _opt(COMPILE, "the one-token delta rule also normalises q and k and computes its "
                                               "gates (one launch instead of four per DeltaNet layer)", None, _bool,
                                      default=True)
    decode_norm_fold: bool = _opt(COMPILE, "the one-token step's residual add + RMSNorm runs inside the next launch "
                                           "(the projections' one-row kernel, the fused router): two launches fewer "
                                           "per layer, but each of that launch's blocks computes the norm before it "
                                           "reads its weights (off by default: 1.8% slower decode on an H200)",
                                  None, _bool, default=False)
    decode_gemv_group: bool = _opt(COMPILE, "the one-token step's one-row products of one input on matrices of one "
                                            "type (qkv, z, beta, alpha; q, k, v) as one launch", None, _bool,
                                   default=True)
    pdl: str = _opt(COMPILE, "programmatic dependent launch in the captured graphs: auto (on for sm_90a targets: a "
                             "kernel's blocks start while the kernel before it drains, and wait in the kernel for its "
                             "results), on (an error where the target lacks it), off", ("auto", "on", "off"),
                    default="auto")
    check_tensors: str = _opt(COMPILE, "check weight values for NaN / Inf before compiling: small (vectors: norms, "
                                       "biases, scales; and tensors of at most 4096 elements; cheap) or all (every weight "
                                       "the graph reads, dequantised block by block, with a progress bar; as "
                                       "llama.cpp's --check-tensors)", ("small", "all"), default="small")
    # ---- runtime: how this machine executes a plan ----
    device: str = _opt(RUNTIME, "auto (cuda when available, else the cpu reference), cpu, cuda",
                       ("auto", "cpu", "cuda"), default="auto")
    stream_host: str = _opt(RUNTIME, "host side of streamed experts: auto (page-lock the GGUF's mapping, else "
                                     "stage), registered, staged", ("auto", "registered", "staged"), default="auto")
    eager: bool = _opt(RUNTIME, "run every chunk eagerly instead of replaying captured CUDA graphs (debugging)",
                       None, _bool, default=False)

    # ---- construction ----
    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            md = f.metadata
            if md.get("check") is not None:
                v = md["check"](f.name, v)
            elif md.get("choices") is not None:
                if not isinstance(v, str) or v.strip().lower() not in md["choices"]:
                    raise GGFuseError(None, f"option {f.name}: {v!r} is not one of {', '.join(md['choices'])}")
                v = v.strip().lower()
            object.__setattr__(self, f.name, v)

    @classmethod
    def make(cls, options: "Options | None" = None, **kw) -> "Options":
        """Options from keyword arguments (None means: the default, or `options`' value)."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise GGFuseError(None, f"unknown option {bad[0]!r} (options: {', '.join(sorted(names))})")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **{k: v for k, v in kw.items() if v is not None})

    def replace(self, **kw) -> "Options":
        return dataclasses.replace(self, **kw)

    # ---- views ----
    @classmethod
    def names(cls, kind: str | None = None) -> list[str]:
        return [f.name for f in fields(cls) if kind is None or f.metadata["kind"] == kind]

    def to_json(self, kind: str | None = None) -> dict:
        return {k: getattr(self, k) for k in self.names(kind)}

    def compile_json(self) -> dict:
        return self.to_json(COMPILE)

    @classmethod
    def from_json(cls, d: dict, what: str = "options") -> "Options":
        if not isinstance(d, dict):
            raise GGFuseError(None, f"{what}: expected an object of options, got {type(d).__name__}")
        names = set(cls.names())
        bad = sorted(set(d) - names)
        if bad:
            raise GGFuseError(None, f"{what}: unknown option {bad[0]!r}")
        return cls(**d)

    def differs(self, other: "Options", kind: str = COMPILE) -> dict:
        """{name: (self's value, other's value)} of the options of `kind` that differ."""
        return {k: (getattr(self, k), getattr(other, k)) for k in self.names(kind)
                if getattr(self, k) != getattr(other, k)}


def add_arguments(parser, kind: str | None = None, skip=()) -> None:
    """One CLI flag per option (--max-context for max_context), its help from the field. Every
    flag defaults to None, meaning "not given": Options.make keeps the default then."""
    for f in fields(Options):
        if (kind is not None and f.metadata["kind"] != kind) or f.name in skip:
            continue
        md = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{md['help']} (default {default})" if default is not None else md["help"]
        # values are checked by Options (one line naming the option), not by argparse's choices
        metavar = "{" + ",".join(md["choices"]) + "}" if md.get("choices") else f.name.upper()
        parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_)


def from_args(args, kind: str | None = None) -> Options:
    """Options from an argparse namespace filled by add_arguments (errors name the flag)."""
    try:
        return Options.make(**{k: getattr(args, k) for k in Options.names(kind) if hasattr(args, k)})
    except GGFuseError as e:
        m = re.match(r"option (\w+):", e.message)
        if m is None or e.path is not None:
            raise
        raise GGFuseError(None, "--" + m.group(1).replace("_", "-") + e.message[m.end() - 1:]) from None


# ---- paths and verbosity: the only environment this package reads ----

def cache_dir_env() -> str | None:
    return os.environ.get("GGFUSE_CACHE") or None


def quiet() -> bool:
    return os.environ.get("GGFUSE_QUIET") == "1"


def cuda_homes() -> list[str]:
    """CUDA toolkit folders named by CUDA_HOME / CUDA_PATH (where NVRTC finds its headers)."""
    return [os.environ[k] for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
