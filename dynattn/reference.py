"""Plain dense attention, the oracle every fast path is checked against.

Costs O(n²·d) time; memory O(block·n) since rows are processed in blocks, so it also serves as
the "recompute everything" baseline at sizes where an n×n array would not fit.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["dense_attention", "dense_weights", "entry_from_scratch"]


def dense_weights(Q, K, scale=None, dtype=np.float64) -> np.ndarray:
    """``P = softmax(scale · Q Kᵀ)`` row-wise (shape (n, n)), stabilised by the row maximum."""
    Q = np.asarray(Q, dtype=dtype)
    K = np.asarray(K, dtype=dtype)
    scale = 1.0 / math.sqrt(Q.shape[1]) if scale is None else scale
    L = (Q * scale) @ K.T
    L -= L.max(axis=1, keepdims=True)
    np.exp(L, out=L)
    L /= L.sum(axis=1, keepdims=True)
    return L


def dense_attention(Q, K, V, scale=None, dtype=np.float64, block: int = 256) -> np.ndarray:
    """``O = softmax(scale · Q Kᵀ) V`` (shape (n, d)) in row blocks, O(n²·d).

    Parameters
    ----------
    Q, K, V : array_like, shape (n, d)
    scale : float, optional
        Default ``1/sqrt(d)``.
    dtype : dtype, default float64
        Precision of the computation.
    block : int
        Rows per block; memory is O(block·n).
    """
    Q = np.asarray(Q, dtype=dtype)
    V = np.asarray(V, dtype=dtype)
    out = np.empty((Q.shape[0], V.shape[1]), dtype=dtype)
    for a in range(0, Q.shape[0], block):
        out[a : a + block] = dense_weights(Q[a : a + block], K, scale, dtype) @ V
    return out


def entry_from_scratch(q, K, v, scale: float) -> float:
    """One output entry ``softmax(scale · K q) · v`` for a query row ``q`` (d,), keys ``K``
    (n, d) and a value column ``v`` (n,), in their dtype: ``2·n·d + 4·n`` flops, vector
    operations only (the largest exponent is 0, so nothing overflows)."""
    a = K @ (q * K.dtype.type(scale))
    a -= a.max()
    np.exp(a, out=a)
    return float(a @ v / a.sum())
