"""Baseline exact strategies the lazy engine is compared against.

* :class:`OnDemand` keeps no caches at all: an update only writes K or V, and every query
  computes its output row from scratch.
* :func:`dense_recompute_seconds` measures what recomputing the whole output after every update
  would cost, without paying for it at every update.

The third baseline, eager maintenance, is :class:`~dynattn.engine.LazyAttention` itself with
the policy ``Fixed(1)`` and one call per update action.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import _validate as V_
from .reference import dense_attention

__all__ = ["OnDemand", "dense_recompute_seconds"]


class OnDemand:
    """Exact attention answered on demand: O(1) updates, O(n·d) per queried row.

    Has the update methods of :class:`~dynattn.engine.LazyAttention` that
    :meth:`dynattn.workloads.TickUpdates.apply` uses, so the same workload drives both.

    Parameters
    ----------
    Q, K, V : array_like, shape (n, d)
        Copied.
    scale : float, optional
        Logit scale, default ``1/sqrt(d)``.
    dtype : {None, float32, float64}
        Working precision; ``None``: float32 if all inputs are float32, else float64.

    Notes
    -----
    Memory O(n·d). An entry update costs O(1) and a row rewrite O(d); a query of u distinct rows
    costs ``4·u·n·d`` flops (logits, then weights times V) in one matrix product per step.
    """

    def __init__(self, Q, K, V, *, scale=None, dtype=None):
        dt = V_.resolve_dtype(dtype, Q, K, V)
        self._Q = V_.as_matrix("Q", Q, dt)
        n, d = self._Q.shape
        self._K = V_.as_matrix("K", K, dt, shape=(n, d))
        self._V = V_.as_matrix("V", V, dt, shape=(n, d))
        self.scale = V_.check_scalar("scale", 1.0 / math.sqrt(d) if scale is None else scale, dt)
        self.dtype = dt
        self.n, self.d = n, d

    @property
    def K(self) -> np.ndarray:
        """Current keys (n, d), read-only view."""
        return _read_only(self._K)

    @property
    def V(self) -> np.ndarray:
        """Current values (n, d), read-only view."""
        return _read_only(self._V)

    def update_k_many(self, rows, cols, deltas) -> None:
        """Add ``deltas`` to ``K[rows, cols]`` (repeats accumulate); O(m)."""
        self._add(self._K, rows, cols, deltas)

    def update_v_many(self, rows, cols, deltas) -> None:
        """Add ``deltas`` to ``V[rows, cols]`` (repeats accumulate); O(m)."""
        self._add(self._V, rows, cols, deltas)

    def set_k_rows(self, rows, values) -> None:
        """Replace ``K[rows]`` by ``values`` (m, d); O(m·d)."""
        self._set(self._K, rows, values)

    def set_v_rows(self, rows, values) -> None:
        """Replace ``V[rows]`` by ``values`` (m, d); O(m·d)."""
        self._set(self._V, rows, values)

    def _add(self, target, rows, cols, deltas) -> None:
        r = V_.as_indices("rows", rows, self.n)
        c = V_.as_indices("cols", cols, self.d)
        if len(c) != len(r):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        np.add.at(target, (r, c), V_.as_vector("deltas", deltas, len(r), self.dtype))

    def _set(self, target, rows, values) -> None:
        r = V_.as_indices("rows", rows, self.n)
        target[r] = V_.as_matrix("values", values, self.dtype, shape=(len(r), self.d))

    def query_rows(self, rows) -> np.ndarray:
        """Output rows ``O[rows]`` (shape (u, d)) from scratch: ``4·u·n·d`` flops.

        ``rows`` is any 1-D integer index array (repeats are computed again).
        """
        idx = V_.as_indices("rows", rows, self.n)
        logits = (self._Q[idx] * self.dtype.type(self.scale)) @ self._K.T
        logits -= logits.max(axis=1, keepdims=True)  # largest exponent 0: no overflow
        np.exp(logits, out=logits)
        out = logits @ self._V
        out /= logits.sum(axis=1, keepdims=True)
        return out

    def query_many(self, rows, cols) -> np.ndarray:
        """Output entries ``O[rows[k], cols[k]]`` (shape (m,)); each distinct row computed once,
        ``4·u·n·d`` flops for u distinct rows."""
        r = V_.as_indices("rows", rows, self.n)
        c = V_.as_indices("cols", cols, self.d)
        if len(c) != len(r):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        distinct, inverse = np.unique(r, return_inverse=True)
        return self.query_rows(distinct)[inverse, c]

    def __repr__(self) -> str:
        return f"OnDemand(n={self.n}, d={self.d}, dtype={self.dtype}, scale={self.scale:.4g})"


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


def dense_recompute_seconds(Q, K, V, *, scale=None, dtype=np.float64,
                            sample_rows: int = 512) -> float:
    """Measured seconds of one full dense recompute of ``O = softmax(scale·Q Kᵀ) V``.

    Times :func:`~dynattn.reference.dense_attention` on the first ``min(n, sample_rows)`` rows
    of Q against all of K and V and scales by ``n / rows``: a full recompute is row-separable,
    so this is its cost at the same throughput, measured in ``O(sample_rows·n·d)`` rather than
    ``O(n²·d)``. The best of three runs is kept, which discards first-touch page faults.

    Parameters
    ----------
    Q, K, V : ndarray, shape (n, d)
    scale : float, optional
        Default ``1/sqrt(d)``.
    dtype : float32 or float64
    sample_rows : int >= 1

    Returns
    -------
    float
        Seconds for all n rows.
    """
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ValueError(f"sample_rows={sample_rows!r} must be an integer >= 1")
    n = Q.shape[0]
    rows = min(n, sample_rows)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dense_attention(Q[:rows], K, V, scale, dtype=dtype)
        best = min(best, time.perf_counter() - t0)
    return best * n / rows
