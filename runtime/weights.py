"""Weights straight from the memory-mapped GGUF, dequantised on demand with gguf.quants.

Rows of a GGML tensor are quantised independently along ne[0], so a row range (an embedding
lookup) or one expert's slice of a stacked [E, N, K] tensor is a contiguous byte range that
dequantises on its own.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from ggfuse.ir.types import DType, nbytes_of


def _dequant(raw: np.ndarray, type_name: str, shape: tuple) -> np.ndarray:
    qt = GGMLQuantizationType[type_name]
    if qt == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    return dequantize(raw, qt).astype(np.float32, copy=False).reshape(shape)


class ExpertCache:
    """Dequantised experts of stacked [E, N, K] tensors, least recently used dropped first once
    their bytes pass `budget`: a prefill call reads each routed expert once, so without it every
    call (a chunk, a cut of the prefix cache, a decode step) dequantises them again."""

    def __init__(self, budget: int):
        import collections
        self.budget = int(budget)
        self.nbytes = 0
        self._d: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        d = self._d.get(key)
        if d is not None:
            self._d.move_to_end(key)
        return d

    def put(self, key, d: np.ndarray) -> None:
        if d.nbytes > self.budget:
            return
        self._d[key] = d
        self.nbytes += d.nbytes
        while self.nbytes > self.budget:
            _, old = self._d.popitem(last=False)
            self.nbytes -= old.nbytes


class LazyWeight:
    """One GGUF tensor as the reference ops see it (see kernels/dequant/ref.py)."""

    def __init__(self, gf, tensor: str, view_shape: tuple | None = None, cache: bool = True,
                 experts: ExpertCache | None = None):
        self.gf = gf
        self.info = gf.tensor(tensor)
        self.shape = tuple(view_shape or self.info.shape)
        self._dense = None
        self._cache = cache
        self._experts = experts

    @property
    def type_name(self) -> str:
        return self.info.type_name

    def _row_bytes(self, row_elems: int) -> int:
        return nbytes_of(DType.from_ggml(self.type_name), row_elems)

    def dense(self) -> np.ndarray:
        if self._dense is not None:
            return self._dense
        d = _dequant(self.gf.raw(self.info.name), self.type_name, self.info.shape).reshape(self.shape)
        if self._cache:
            self._dense = d
        return d

    def __array__(self, dtype=None, copy=None):
        d = self.dense()
        return d if dtype is None else d.astype(dtype)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self._dense is not None:
            return self._dense[ids]
        R, C = self.info.shape[0], int(np.prod(self.info.shape[1:]))
        rb = self._row_bytes(C)
        raw = self.gf.raw(self.info.name)
        uniq, inv = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= R):
            raise IndexError(f"token id out of range 0..{R - 1} for {self.info.name}")
        out = np.empty((uniq.size, C), dtype=np.float32)
        for i, r in enumerate(uniq):
            out[i] = _dequant(raw[r * rb:(r + 1) * rb], self.type_name, (C,))
        return out[inv]

    def expert(self, e: int) -> np.ndarray:
        if self._dense is not None:
            return self._dense[e]
        E = self.info.shape[0]
        per = self.info.shape[1:]
        n = int(np.prod(per))
        eb = self._row_bytes(n)
        raw = self.gf.raw(self.info.name)
        if not 0 <= e < E:
            raise IndexError(f"expert {e} out of range for {self.info.name}")
        key = (self.info.name, int(e))
        if self._experts is not None:
            d = self._experts.get(key)
            if d is not None:
                return d
        d = _dequant(raw[e * eb:(e + 1) * eb], self.type_name, per)
        if self._experts is not None:
            d.flags.writeable = False        # shared by every later call: nobody writes into it
            self._experts.put(key, d)
        return d


class WeightStore:
    """Weights of one model, shared by every chunk; stacked experts are never densified."""

    def __init__(self, gf, dense_limit_bytes: int = 1 << 30, expert_cache_bytes: int = 1 << 30):
        self.gf = gf
        self._w: dict = {}
        self.dense_limit = dense_limit_bytes
        self.experts = ExpertCache(expert_cache_bytes)

    def __call__(self, node) -> LazyWeight:
        key = (node.attrs.tensor, tuple(node.attrs.shape))
        w = self._w.get(key)
        if w is None:
            info = self.gf.tensor(node.attrs.tensor)
            big = int(np.prod(info.shape)) * 4 > self.dense_limit or len(info.shape) == 3
            w = LazyWeight(self.gf, node.attrs.tensor, tuple(node.attrs.shape), cache=not big, experts=self.experts)
            self._w[key] = w
        return w
