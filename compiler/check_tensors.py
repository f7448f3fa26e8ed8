"""Check weight values before compiling: NaN and Inf, as llama.cpp's --check-tensors does.

A NaN in one norm weight turns every logit into NaN while ggfuse exits 0, so the cheap default
(`check_tensors="small"`) reads the tensors whose size is small beside the model: vectors (norms,
biases, scales, gates: one dimension above 1) and anything of at most SMALL_ELEMENTS elements; a
few hundred KiB for a 35B model. `"all"`
dequantises every weight the graph reads, block by block (memory bounded by BLOCK_BYTES), with a
progress bar on stderr. Quantised blocks carry f16 scales, so a NaN or Inf there shows up in the
dequantised values like any other.
"""
from __future__ import annotations

import sys

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as _gguf_dequantize

from ggfuse.errors import GGUFFormatError

SMALL_ELEMENTS = 4096


def is_small(info) -> bool:
    return sum(d > 1 for d in info.ne) <= 1 or info.n_elements <= SMALL_ELEMENTS
BLOCK_BYTES = 64 << 20      # raw bytes dequantised at a time


def _rows(gf, info) -> np.ndarray:
    """The tensor's bytes as [rows, bytes per row] (a row is ne[0] elements)."""
    block, type_size = GGML_QUANT_SIZES[QT(info.ggml_type)]
    row_bytes = info.ne[0] // block * type_size
    return gf.raw(info.name).reshape(-1, row_bytes)


def check_tensor(gf, name: str) -> None:
    """GGUFFormatError naming the file and the tensor if any value is NaN or infinite."""
    info = gf.tensor(name)
    rows = _rows(gf, info)
    qt = QT(info.ggml_type)
    step = max(1, BLOCK_BYTES // max(rows.shape[1], 1))
    for r0 in range(0, rows.shape[0], step):
        with np.errstate(all="ignore"):       # a NaN scale is what we are looking for
            vals = _gguf_dequantize(rows[r0:r0 + step], qt)
        ok = np.isfinite(vals)
        if not ok.all():
            flat = int(np.argmin(ok.reshape(-1)))
            bad = vals.reshape(-1)[flat]
            raise GGUFFormatError(gf.path, f"tensor '{name}' holds {'NaN' if np.isnan(bad) else 'infinite'} "
                                           f"values (first at element {r0 * info.ne[0] + flat}); the file is "
                                           f"corrupt")


def check_weights(gf, names, mode: str, *, progress: bool = True) -> int:
    """Check the tensors `names` (each once) by `mode` ("small" or "all"); returns how many were
    checked. "all" shows a tqdm bar over the bytes when stderr is a terminal and progress is on."""
    infos = [gf.tensor(n) for n in dict.fromkeys(names)]
    if mode == "small":
        infos = [t for t in infos if is_small(t)]
    bar = None
    if mode == "all" and progress:
        # tqdm (a pyproject dependency): a well-kept bar with rate and ETA that turns itself off
        # when stderr is not a terminal (disable=None), so logs and tests stay clean
        from tqdm import tqdm
        bar = tqdm(total=sum(t.nbytes for t in infos), unit="B", unit_scale=True, unit_divisor=1024,
                   desc="checking tensors", file=sys.stderr, disable=None, leave=False)
    try:
        for t in infos:
            check_tensor(gf, t.name)
            if bar is not None:
                bar.update(t.nbytes)
    finally:
        if bar is not None:
            bar.close()
    return len(infos)


__all__ = ["check_weights", "check_tensor", "SMALL_ELEMENTS"]
