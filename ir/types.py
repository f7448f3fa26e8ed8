"""Tensor types of the IR: a dtype and a shape whose dims may be symbolic.

Shape letters follow one convention everywhere: T tokens in the chunk, P tokens already in the
KV cache before this chunk. A dim is an int or a small linear expression over those symbols,
written as a string ("T", "P+T", "8*T"), so a graph built once serves every chunk length.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Union

import numpy as np

Dim = Union[int, str]
Shape = tuple  # tuple[Dim, ...]


class DType(str, Enum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    I32 = "i32"
    # GGML block-quantised weight types (only weights carry them; activations are float).
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"

    @property
    def is_quantized(self) -> bool:
        return self not in (DType.F32, DType.F16, DType.BF16, DType.I32)

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16)

    @classmethod
    def from_ggml(cls, type_name: str) -> "DType":
        return cls(type_name.lower())

    @property
    def ggml_name(self) -> str:
        return self.value.upper()


# (elements per block, bytes per block) as ggml lays them out.
_BLOCK = {
    DType.F32: (1, 4), DType.F16: (1, 2), DType.BF16: (1, 2), DType.I32: (1, 4),
    DType.Q4_0: (32, 18), DType.Q4_1: (32, 20), DType.Q5_0: (32, 22), DType.Q5_1: (32, 24),
    DType.Q8_0: (32, 34), DType.Q2_K: (256, 84), DType.Q3_K: (256, 110), DType.Q4_K: (256, 144),
    DType.Q5_K: (256, 176), DType.Q6_K: (256, 210),
}


def block_size(dtype: DType) -> tuple[int, int]:
    return _BLOCK[dtype]


def nbytes_of(dtype: DType, n_elements: int) -> int:
    per, nb = _BLOCK[dtype]
    return (n_elements // per) * nb if per > 1 else n_elements * nb


# ---- symbolic dims ---------------------------------------------------------------------------

_TERM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)$|^(\d+)$")


def _parse(d: Dim) -> dict[str, int]:
    """Linear combination {symbol: coeff, '': const}."""
    if isinstance(d, (int, np.integer)):
        return {"": int(d)}
    out: dict[str, int] = {}
    for term in str(d).replace(" ", "").split("+"):
        m = _TERM.match(term)
        if not m:
            raise ValueError(f"bad dim expression {d!r}")
        if m.group(3) is not None:
            out[""] = out.get("", 0) + int(m.group(3))
        else:
            coeff = int(m.group(1)) if m.group(1) else 1
            out[m.group(2)] = out.get(m.group(2), 0) + coeff
    return out


def _format(lin: dict[str, int]) -> Dim:
    const = lin.get("", 0)
    syms = sorted((s, c) for s, c in lin.items() if s and c)
    if not syms:
        return const
    parts = [s if c == 1 else f"{c}*{s}" for s, c in syms]
    if const:
        parts.append(str(const))
    return "+".join(parts)


def dim_add(a: Dim, b: Dim) -> Dim:
    la, lb = _parse(a), _parse(b)
    return _format({k: la.get(k, 0) + lb.get(k, 0) for k in set(la) | set(lb)})


def dim_mul(a: Dim, k: int) -> Dim:
    return _format({s: c * k for s, c in _parse(a).items()})


def dim_eval(d: Dim, env: Mapping[str, int]) -> int:
    total = 0
    for s, c in _parse(d).items():
        if s == "":
            total += c
        elif s in env:
            total += c * int(env[s])
        else:
            raise KeyError(f"dim {d!r} needs a value for symbol {s!r}")
    return total


def dim_eq(a: Dim, b: Dim) -> bool:
    return _format(_parse(a)) == _format(_parse(b))


def shape_eval(shape: Shape, env: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(dim_eval(d, env) for d in shape)


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def norm_shape(shape) -> Shape:
    return tuple(_format(_parse(d)) for d in shape)


@dataclass(frozen=True)
class TensorType:
    shape: Shape
    dtype: DType = DType.F32

    def __post_init__(self):
        object.__setattr__(self, "shape", norm_shape(self.shape))
        object.__setattr__(self, "dtype", DType(self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self, env: Mapping[str, int]) -> int:
        n = 1
        for d in shape_eval(self.shape, env):
            n *= d
        return n

    def nbytes(self, env: Mapping[str, int]) -> int:
        return nbytes_of(self.dtype, self.numel(env))

    def __str__(self) -> str:
        return f"{self.dtype.value}{shape_str(self.shape)}"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype.value}

    @classmethod
    def from_json(cls, d: dict) -> "TensorType":
        return cls(tuple(d["shape"]), DType(d["dtype"]))
