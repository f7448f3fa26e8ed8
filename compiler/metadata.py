"""Typed access to GGUF metadata: every key is read with the type, shape and range it must have.

    md = Metadata(gf)                       # a GGUFFile, or a plain mapping (tests, overrides)
    a = md.scope("qwen35moe.")              # keys relative to the architecture
    n_layer = a.int("block_count", min=1, max=MAX_LAYERS)
    sections = a.int_array("rope.dimension_sections", [0, 0, 0, 0], max_len=4, min=0)
    heads = a.int_per_layer("attention.head_count", n_layer, min=1)
    tokens = md.str_array("tokenizer.ggml.tokens", None)

Every violation (missing key, wrong type, scalar for array or array for scalar, wrong length,
out of range, NaN) is a one-line GGUFFormatError naming the file and the full key. Frontends and
the tokenizer read metadata only through this class, so a hostile value never reaches graph
building as a raw list or a zero divisor.

Numeric arrays come from GGUFFile.raw_value as numpy views, so range checks are vectorised and
only arrays the caller asked for become Python lists.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ggfuse.errors import GGUFFormatError

REQUIRED: Any = object()
_ABSENT: Any = object()

# Generous ceilings for model dimensions: far above any real model, low enough that a hostile
# value cannot make graph building or shape arithmetic allocate or loop without bound.
MAX_LAYERS = 1 << 12
MAX_DIM = 1 << 24
MAX_COUNT = 1 << 16      # heads, experts, groups


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float(v) -> bool:
    return (isinstance(v, (float, np.floating)) or _is_int(v))


def _describe(v) -> str:
    if isinstance(v, np.ndarray):
        kind = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats"}.get(v.dtype.kind, str(v.dtype))
        return f"an array of {len(v)} {kind}"
    if isinstance(v, (list, tuple)):
        kinds = sorted({type(x).__name__ for x in v[:64]})
        return f"an array of {len(v)} " + ("items" if not kinds else "/".join(kinds))
    if isinstance(v, (bool, np.bool_)):
        return f"the boolean {bool(v)}"
    if _is_int(v):
        return f"the integer {int(v)}"
    if isinstance(v, (float, np.floating)):
        return f"the float {float(v)!r}"
    if isinstance(v, str):
        s = v if len(v) <= 40 else v[:40] + "..."
        return f"the string {s!r}"
    return f"a {type(v).__name__}"


class Metadata:
    """Typed reader of one file's metadata (see the module docstring)."""

    def __init__(self, source, path: str | None = None, prefix: str = ""):
        self._src = source
        self.path = path if path is not None else getattr(source, "path", None)
        self.prefix = prefix

    def scope(self, prefix: str) -> Metadata:
        """The same metadata with keys read relative to `prefix` ("gemma4.")."""
        return Metadata(self._src, self.path, self.prefix + prefix)

    def name(self, key: str) -> str:
        return self.prefix + key

    # -- raw access -------------------------------------------------------------------------------
    def _raw(self, key: str):
        full = self.prefix + key
        src = self._src
        if hasattr(src, "raw_value") and hasattr(src, "has_key"):
            return src.raw_value(full) if src.has_key(full) else _ABSENT
        if hasattr(src, "key"):
            return src.key(full, _ABSENT)
        return src.get(full, _ABSENT)

    def is_array(self, key: str) -> bool:
        """Whether the key is present and holds an array (of any item type)."""
        return isinstance(self._raw(key), (np.ndarray, list, tuple))

    def has(self, key: str) -> bool:
        return self._raw(key) is not _ABSENT

    def fail(self, key: str, what: str) -> GGUFFormatError:
        return GGUFFormatError(self.path, f"metadata key '{self.prefix + key}' {what}")

    def _get(self, key: str, default):
        v = self._raw(key)
        if v is _ABSENT or v is None:
            if default is REQUIRED:
                raise GGUFFormatError(self.path, f"missing required metadata key '{self.prefix + key}'")
            return _ABSENT
        return v

    def _range(self, key, v, lo, hi, gt, what="") -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (gt is not None and v <= gt):
            bounds = []
            if gt is not None:
                bounds.append(f"> {gt}")
            if lo is not None:
                bounds.append(f">= {lo}")
            if hi is not None:
                bounds.append(f"<= {hi}")
            raise self.fail(key, f"{what}is {v}, expected a value {' and '.join(bounds)}")

    # -- scalars ----------------------------------------------------------------------------------
    def int(self, key: str, default=REQUIRED, *, min: int | None = None, max: int | None = None) -> int:
        v = self._get(key, default)
        if v is _ABSENT:
            return default
        if not _is_int(v):
            raise self.fail(key, f"is {_describe(v)}, expected an integer")
        v = int(v)
        self._range(key, v, min, max, None)
        return v

    def float(self, key: str, default=REQUIRED, *, min: float | None = None, max: float | None = None,
              gt: float | None = None) -> float:
        v = self._get(key, default)
        if v is _ABSENT:
            return default
        if not _is_float(v):
            raise self.fail(key, f"is {_describe(v)}, expected a number")
        v = float(v)
        if not math.isfinite(v):
            raise self.fail(key, f"is {v}, expected a finite number")
        self._range(key, v, min, max, gt)
        return v

    def bool(self, key: str, default=REQUIRED) -> bool:
        v = self._get(key, default)
        if v is _ABSENT:
            return default
        if not isinstance(v, (bool, np.bool_)):
            raise self.fail(key, f"is {_describe(v)}, expected a boolean")
        return bool(v)

    def str(self, key: str, default=REQUIRED, *, max_len: int = 1 << 20) -> str:
        v = self._get(key, default)
        if v is _ABSENT:
            return default
        if not isinstance(v, str):
            raise self.fail(key, f"is {_describe(v)}, expected a string")
        if len(v) > max_len:
            raise self.fail(key, f"is a string of {len(v)} characters, more than {max_len}")
        return v

    # -- arrays -----------------------------------------------------------------------------------
    def _array(self, key, default, kinds: str, what: str, length, min_len, max_len):
        v = self._get(key, default)
        if v is _ABSENT:
            return _ABSENT
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in kinds:
                raise self.fail(key, f"is {_describe(v)}, expected an array of {what}")
            arr = v
        elif isinstance(v, (list, tuple)):
            check = {"iu": _is_int, "iuf": _is_float, "b": lambda x: isinstance(x, (bool, np.bool_))}[kinds]
            if not all(check(x) for x in v):
                raise self.fail(key, f"is {_describe(v)}, expected an array of {what}")
            arr = np.asarray(v, dtype={"iu": object, "iuf": np.float64, "b": bool}[kinds])
        else:
            raise self.fail(key, f"is {_describe(v)}, expected an array of {what}")
        n = len(arr)
        if length is not None and n != length:
            raise self.fail(key, f"has {n} entries, expected {length}")
        if (min_len is not None and n < min_len) or (max_len is not None and n > max_len):
            lo = min_len if min_len is not None else 0
            raise self.fail(key, f"has {n} entries, expected {lo} to {max_len if max_len is not None else 'any'}")
        return arr

    def _arange(self, key, arr, lo, hi, gt):
        if len(arr) == 0:
            return
        if (lo is not None and arr.min() < lo) or (hi is not None and arr.max() > hi) \
                or (gt is not None and arr.min() <= gt):
            bad = next(x for x in arr.tolist() if (lo is not None and x < lo) or (hi is not None and x > hi)
                       or (gt is not None and x <= gt))
            self._range(key, bad, lo, hi, gt, what="has an entry that ")

    def int_array(self, key: str, default=REQUIRED, *, length: int | None = None, min_len: int | None = None,
                  max_len: int | None = None, min: int | None = None, max: int | None = None) -> list[int]:
        arr = self._array(key, default, "iu", "integers", length, min_len, max_len)
        if arr is _ABSENT:
            return default
        self._arange(key, arr, min, max, None)
        return [int(x) for x in arr.tolist()]

    def float_array(self, key: str, default=REQUIRED, *, length: int | None = None, min_len: int | None = None,
                    max_len: int | None = None, min: float | None = None, max: float | None = None) -> list[float]:
        arr = self._array(key, default, "iuf", "numbers", length, min_len, max_len)
        if arr is _ABSENT:
            return default
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise self.fail(key, "holds NaN or infinite entries")
        self._arange(key, arr, min, max, None)
        return arr.tolist()

    def bool_array(self, key: str, default=REQUIRED, *, length: int | None = None, min_len: int | None = None,
                   max_len: int | None = None) -> list[bool]:
        arr = self._array(key, default, "b", "booleans", length, min_len, max_len)
        if arr is _ABSENT:
            return default
        return [bool(x) for x in arr.tolist()]

    def str_array(self, key: str, default=REQUIRED, *, length: int | None = None, min_len: int | None = None,
                  max_len: int | None = None) -> list[str]:
        v = self._get(key, default)
        if v is _ABSENT:
            return default
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise self.fail(key, f"is {_describe(v)}, expected an array of strings")
        n = len(v)
        if length is not None and n != length:
            raise self.fail(key, f"has {n} entries, expected {length}")
        if (min_len is not None and n < min_len) or (max_len is not None and n > max_len):
            raise self.fail(key, f"has {n} entries, expected {min_len or 0} to {max_len if max_len is not None else 'any'}")
        return list(v)

    # -- llama.cpp's "a scalar or one value per layer" keys ----------------------------------------
    def _per_layer(self, key, n_layer, default, exact, read_scalar, read_array):
        v = self._get(key, default)
        if v is _ABSENT:
            if isinstance(default, (list, tuple)):
                return tuple(default)
            return (default,) * n_layer
        if isinstance(v, (np.ndarray, list, tuple)):
            kw = {"length": n_layer} if exact else {"min_len": n_layer}
            return tuple(read_array(key, **kw)[:n_layer])
        return (read_scalar(key),) * n_layer

    def int_per_layer(self, key: str, n_layer: int, default=REQUIRED, *, exact: bool = False,
                      min: int | None = None, max: int | None = None) -> tuple[int, ...]:
        """A scalar (the same for every layer) or an array of n_layer entries (exact) or at least
        n_layer (cut to n_layer: llama.cpp reads only the first n_layer)."""
        return self._per_layer(key, n_layer, default, exact, lambda k: self.int(k, min=min, max=max),
                               lambda k, **kw: self.int_array(k, min=min, max=max, **kw))

    def bool_per_layer(self, key: str, n_layer: int, default=REQUIRED, *, exact: bool = False) -> tuple[bool, ...]:
        return self._per_layer(key, n_layer, default, exact, self.bool, self.bool_array)


__all__ = ["Metadata", "REQUIRED", "MAX_LAYERS", "MAX_DIM", "MAX_COUNT"]
