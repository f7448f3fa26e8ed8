"""Numpy references for the elementwise fusions (passes/fuse_elementwise.py).

Each is written as the composition of the plain references it replaces, so a fused op means
exactly what the unfused ops meant; the CUDA kernels are tested against these. Activations
are float32 with tokens first.
"""
from __future__ import annotations

import numpy as np

from ggfuse.kernels.attention import ref as attn_ref
from ggfuse.kernels.dense import ref as dense_ref


def add_rms_norm(a: np.ndarray, b: np.ndarray, w, *, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Residual add + RMSNorm. a, b [T, D]; w [D] -> (rms_norm(a + b) * w [T, D], a + b [T, D]).
    The sum is the second output because the next residual add reads it too."""
    s = dense_ref.add(a, b)
    return dense_ref.rms_norm(s, w, eps=eps), s


def norm_rope(x: np.ndarray, w, pos: np.ndarray, *, eps: float, n_dims: int, freq_base: float,
              mode: str, freq_scale: float, sections=(), freq_factors=None) -> np.ndarray:
    """q/k RMSNorm over the head dim, then (partial) RoPE of its first n_dims.
    x [T, H, D]; w [D]; pos [T]; freq_factors [n_dims/2] or None -> [T, H, D]."""
    return attn_ref.rope(dense_ref.rms_norm(x, w, eps=eps), pos, n_dims=n_dims, freq_base=freq_base,
                         mode=mode, freq_scale=freq_scale, sections=sections, freq_factors=freq_factors)


def sigmoid_mul(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Output gate x * sigmoid(g). x [T, N]; g [T, N] or [T, 1] (the shared expert's scalar gate)."""
    return dense_ref.mul(x, dense_ref.sigmoid(g))


def gated_rms_norm(o: np.ndarray, w, z: np.ndarray, *, eps: float) -> np.ndarray:
    """Gated DeltaNet output norm: rms_norm(o) * w * silu(z). o, z [T, Hv, V]; w [V] -> [T, Hv, V]."""
    return dense_ref.mul(dense_ref.rms_norm(o, w, eps=eps), dense_ref.silu(z))


def ffn_swiglu(x: np.ndarray, w_gate, w_up) -> np.ndarray:
    """Dense FFN up to the down projection: silu(x @ w_gate^T) * (x @ w_up^T).
    x [T, D]; w_gate, w_up [F, D] -> [T, F]."""
    return dense_ref.mul(dense_ref.silu(dense_ref.matmul(x, w_gate)), dense_ref.matmul(x, w_up))


def ffn_geglu(x: np.ndarray, w_gate, w_up) -> np.ndarray:
    """Gemma's dense FFN up to the down projection: gelu(x @ w_gate^T) * (x @ w_up^T), GELU with
    the tanh approximation. x [T, D]; w_gate, w_up [F, D] -> [T, F]."""
    return dense_ref.mul(dense_ref.gelu(dense_ref.matmul(x, w_gate)), dense_ref.matmul(x, w_up))


def gelu_mul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """gelu(x) * y (the per-layer-embedding gate). x, y [T, N] -> [T, N]."""
    return dense_ref.mul(dense_ref.gelu(x), y)


def norm_add(x: np.ndarray, w, r: np.ndarray, s=None, *, eps: float) -> np.ndarray:
    """Gemma's post-norm residual: rms_norm(x) * w + r, then times the scalar s when given
    (layer_output_scale). x, r [T, D]; w [D]; s [1] -> [T, D]."""
    y = dense_ref.add(dense_ref.rms_norm(x, w, eps=eps), r)
    return y if s is None else dense_ref.mul(y, s)


def norm_add_norm(x: np.ndarray, w, r: np.ndarray, w_next, s=None, *, eps: float,
                  eps_next: float) -> tuple[np.ndarray, np.ndarray]:
    """norm_add, then the next block's RMSNorm of the sum: (rms_norm(sum) * w_next, sum).
    The sum is the second output because the next residual add reads it too."""
    total = norm_add(x, w, r, s, eps=eps)
    return dense_ref.rms_norm(total, w_next, eps=eps_next), total
