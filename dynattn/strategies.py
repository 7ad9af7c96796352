"""Baseline exact strategies the lazy engine is compared against.

All of them answer exact queries of ``O = softmax(scale · Q Kᵀ) V`` under updates to K and V
through the interface they share with :class:`~dynattn.engine.LazyAttention`,
:class:`~dynattn.protocols.ExactAttention` (single and batch updates, queries, ``output``,
``copy``), so one update/query stream drives every strategy.

* :class:`OnDemand` keeps no caches: an update only writes K or V (O(1)), and every query
  computes its output row from scratch (O(n·d)).
* :class:`EagerDense` stores the n×n matrix ``Ã`` of stabilised exponentials: a K update
  recomputes one column of Ã (O(n·d)), a V entry update costs O(n), a query O(1).
  Memory O(n²): see :func:`eager_dense_nbytes` before building one.
* :class:`Recompute` rebuilds the whole output after every update (O(n²·d)); a query is O(1).
* :func:`dense_recompute_seconds` measures what one such rebuild costs without paying for it at
  every update.

Eager maintenance with O(n·d) memory is :class:`~dynattn.engine.LazyAttention` itself with the
policy ``Fixed(1)``: every update is absorbed into the caches at once.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from . import _validate as check
from .engine.kernels import BLOCK_ELEMENTS, Contributions, guards_hold, lost_precision
from .reference import dense_attention, entry_from_scratch

__all__ = ["EagerDense", "OnDemand", "Recompute", "dense_recompute_seconds", "eager_dense_nbytes"]

# How far (in logits) an entry of Ã may rise above its row's stabiliser: e^64 (float64) and
# e^16 (float32) times n stay far below overflow, and recomputing a row whenever a logit beat
# its maximum would cost O(n·d) on most K updates.
_HEADROOM = {np.dtype(np.float64): 64.0, np.dtype(np.float32): 16.0}

# Rows per block of EagerDense's rank-2 cache updates (about 2 MB of float64 at d = 64).
_UPDATE_ROWS = 2048


class _Baseline:
    """Inputs, validation and the shared update/query entry points of the baselines.

    Subclasses implement ``_rows_changed(which, rows, old_rows)`` (called after rows of K or
    V have been written, with what they held before) and ``_rows(idx) -> (len(idx), d)``
    exact output rows; they may override the single-entry forms with cheaper special cases.
    Every call checks all its arguments before it writes anything.

    Parameters
    ----------
    Q, K, V : array_like, shape (n, d)
        Copied.
    scale : float, optional
        Logit scale, default ``1/sqrt(d)``.
    dtype : {None, float32, float64}
        Working precision; ``None``: float32 if all inputs are float32, else float64.
    """

    def __init__(self, Q, K, V, *, scale=None, dtype=None):
        dt = check.resolve_dtype(dtype, Q, K, V)
        self._Q = check.as_matrix("Q", Q, dt)
        n, d = self._Q.shape
        self._K = check.as_matrix("K", K, dt, shape=(n, d))
        self._V = check.as_matrix("V", V, dt, shape=(n, d))
        self.scale = check.check_scalar("scale", 1.0 / math.sqrt(d) if scale is None else scale, dt)
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

    def copy(self):
        """An independent baseline in the same state."""
        return copy.deepcopy(self)

    # ------------------------------------------------------------------ updates
    def update_k(self, i, j, delta) -> None:
        """Add ``delta`` to ``K[i, j]``."""
        self._add_entry("K", self._K, i, j, delta)

    def update_v(self, i, j, delta) -> None:
        """Add ``delta`` to ``V[i, j]``."""
        self._add_entry("V", self._V, i, j, delta)

    def set_k_row(self, i, row) -> None:
        """Replace ``K[i]`` by ``row`` (shape (d,))."""
        self._set_row("K", self._K, i, row)

    def set_v_row(self, i, row) -> None:
        """Replace ``V[i]`` by ``row`` (shape (d,))."""
        self._set_row("V", self._V, i, row)

    def _add_entry(self, which: str, target: np.ndarray, i, j, delta) -> None:
        i, j, delta = self._check_entry(i, j, delta)
        old = target[i].copy()
        target[i, j] = check.entry_sum(which, target, i, j, delta)[1]
        self._rows_changed(which, np.array([i]), old[None])

    def _set_row(self, which: str, target: np.ndarray, i, row) -> None:
        i, row = self._check_row(i, row)
        old = target[i].copy()
        target[i] = row
        self._rows_changed(which, np.array([i]), old[None])

    def update_k_many(self, rows, cols, deltas) -> None:
        """Add ``deltas`` to ``K[rows, cols]`` (repeats accumulate); all or nothing."""
        self._add("K", rows, cols, deltas)

    def update_v_many(self, rows, cols, deltas) -> None:
        """Add ``deltas`` to ``V[rows, cols]`` (repeats accumulate); all or nothing."""
        self._add("V", rows, cols, deltas)

    def set_k_rows(self, rows, values) -> None:
        """Replace ``K[rows]`` by ``values`` (m, d); all or nothing."""
        self._set("K", rows, values)

    def set_v_rows(self, rows, values) -> None:
        """Replace ``V[rows]`` by ``values`` (m, d); all or nothing."""
        self._set("V", rows, values)

    def _add(self, which: str, rows, cols, deltas) -> None:
        r = check.as_indices("rows", rows, self.n)
        c = check.as_indices("cols", cols, self.d)
        if len(c) != len(r):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        target = self._K if which == "K" else self._V
        flat, final = check.entry_sums(
            which, target, r, c, check.as_vector("deltas", deltas, len(r), self.dtype)
        )
        changed = np.unique(r)
        old = target[changed]
        target.ravel()[flat] = final
        self._rows_changed(which, changed, old)

    def _set(self, which: str, rows, values) -> None:
        r = check.as_indices("rows", rows, self.n)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row; a row can be set once per call")
        target = self._K if which == "K" else self._V
        new = check.as_matrix("values", values, self.dtype, shape=(len(r), self.d))
        old = target[r]
        target[r] = new
        self._rows_changed(which, r, old)

    def _check_entry(self, i, j, delta) -> tuple[int, int, float]:
        return (
            check.check_index("i", i, self.n),
            check.check_index("j", j, self.d),
            check.check_scalar("delta", delta, self.dtype),
        )

    def _check_row(self, i, row) -> tuple[int, np.ndarray]:
        return (check.check_index("i", i, self.n), check.as_vector("row", row, self.d, self.dtype))

    def _rows_changed(self, which: str, rows: np.ndarray, old_rows: np.ndarray) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ queries
    def query(self, i, j) -> float:
        """Exact output entry ``O[i, j]``."""
        j = check.check_index("j", j, self.d)
        return float(self.query_row(i)[j])

    def query_row(self, i) -> np.ndarray:
        """Exact output row ``O[i]`` (shape (d,))."""
        i = check.check_index("i", i, self.n)
        return self._rows(np.array([i]))[0]

    def query_rows(self, rows) -> np.ndarray:
        """Exact output rows ``O[rows]`` (shape (len(rows), d)); ``rows`` may repeat."""
        return self._rows(check.as_indices("rows", rows, self.n))

    def query_many(self, rows, cols) -> np.ndarray:
        """Exact output entries ``O[rows[k], cols[k]]`` (shape (m,)); each distinct row is
        computed once."""
        r = check.as_indices("rows", rows, self.n)
        c = check.as_indices("cols", cols, self.d)
        if len(c) != len(r):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        distinct, inverse = np.unique(r, return_inverse=True)
        return self._rows(distinct)[inverse, c]

    def output(self) -> np.ndarray:
        """The exact output O (shape (n, d))."""
        return self._rows(np.arange(self.n))

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, d={self.d}, dtype={self.dtype}, "
            f"scale={self.scale:.4g})"
        )


class OnDemand(_Baseline):
    """Exact attention answered on demand: O(1) updates, O(n·d) per queried row.

    Parameters: ``Q, K, V, *, scale=None, dtype=None`` as for every baseline (see
    :class:`_Baseline`).

    Notes
    -----
    Memory O(n·d). An entry update costs O(1) and a row rewrite O(d); a query of u distinct rows
    costs ``4·u·n·d`` flops (logits, then weights times V), stabilised by the row maximum.
    """

    def update_k(self, i, j, delta) -> None:
        """Add ``delta`` to ``K[i, j]``; O(1)."""
        i, j, delta = self._check_entry(i, j, delta)
        self._K[i, j] = check.entry_sum("K", self._K, i, j, delta)[1]

    def update_v(self, i, j, delta) -> None:
        """Add ``delta`` to ``V[i, j]``; O(1)."""
        i, j, delta = self._check_entry(i, j, delta)
        self._V[i, j] = check.entry_sum("V", self._V, i, j, delta)[1]

    def set_k_row(self, i, row) -> None:
        """Replace ``K[i]`` by ``row`` (shape (d,)); O(d)."""
        i, row = self._check_row(i, row)
        self._K[i] = row

    def set_v_row(self, i, row) -> None:
        """Replace ``V[i]`` by ``row`` (shape (d,)); O(d)."""
        i, row = self._check_row(i, row)
        self._V[i] = row

    def _rows_changed(self, which: str, rows: np.ndarray, old_rows: np.ndarray) -> None:
        pass  # nothing is cached

    def query(self, i, j) -> float:
        """Exact ``O[i, j]`` from scratch: ``2·n·d + 4·n`` flops (one logit row, one column of
        V), with vector operations only."""
        i = check.check_index("i", i, self.n)
        j = check.check_index("j", j, self.d)
        return entry_from_scratch(self._Q[i], self._K, self._V[:, j], self.scale)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        logits = (self._Q[idx] * self.dtype.type(self.scale)) @ self._K.T
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        out = logits @ self._V
        out /= logits.sum(axis=1, keepdims=True)
        return out


def eager_dense_nbytes(n: int, d: int, dtype=np.float64) -> int:
    """Bytes an :class:`EagerDense` of this shape holds (the n×n matrix dominates)."""
    item = np.dtype(dtype).itemsize
    return item * (n * n + n * (2 * d + 2) + 4 * n * d + 3 * n + min(n, _UPDATE_ROWS) * (2 * d + 2))


class EagerDense(_Baseline):
    """Eager maintenance with the n×n matrix of exponentials stored: O(1) queries.

    Stores ``Ã[i, j] = exp(scale·q_i·k_j − m_i)`` (as its transpose, so the column of one key is
    contiguous), the row stabilisers ``m`` and per row the numerator ``N_i = Σ_j Ã_ij v_j`` and
    denominator ``s_i = Σ_j Ã_ij``, with the engine's precision guards (the mass that removals
    took out, compared with ``g`` times what is left; see
    :class:`~dynattn.engine.LazyAttention`). Every update is applied at once.

    Parameters: ``Q, K, V, *, scale=None, dtype=None`` as for every baseline (see
    :class:`_Baseline`).

    Notes
    -----
    Build O(n²·d). A K update (entry or row) recomputes column j of Ã and moves its old and new
    contributions in and out of N, s and the guards: O(n·d). A V entry update changes one column
    of N and of the guards: O(n). A V row rewrite is O(n·d). A query is O(1). A row whose guard
    fails, or whose new logit exceeds its stabiliser by more than e^64 (float64; e^16 in
    float32), is recomputed exactly in O(n·d).
    Memory :func:`eager_dense_nbytes` (``n²`` elements: 2 GiB at n = 16,384 in float64).
    """

    def __init__(self, Q, K, V, *, scale=None, dtype=None):
        super().__init__(Q, K, V, scale=scale, dtype=dtype)
        n, d = self.n, self.d
        self._contrib = Contributions(d, self.dtype)  # the engine's guards, the same rows
        self._g = self._contrib.growth
        self._Qs = self._Q * self.dtype.type(self.scale)
        self._At = np.empty((n, n), dtype=self.dtype)  # At[j, i] = Ã[i, j]
        self._stabiliser = np.empty(n, dtype=self.dtype)
        # cache columns as in the engine: N (d) | s | guard of s | guard of N (d)
        self._cache = np.empty((n, 2 * d + 2), dtype=self.dtype)
        self._pair = np.empty((n, 2), dtype=self.dtype)
        # rank-2 updates of the caches run over row blocks through this small buffer: one
        # n×(2d+2) temporary would push the caches out of the last-level cache every update
        self._block = np.empty((min(n, _UPDATE_ROWS), 2 * d + 2), dtype=self.dtype)
        self._build()

    def _build(self) -> None:
        """Ã, m and the caches from scratch, O(n²·d), writing Ã one key block at a time.

        The row stabilisers come first (one pass over the logits by query blocks), so that each
        block of keys can then be written contiguously into the transposed store; writing
        query blocks into it instead is a strided transpose that costs several times more.
        """
        n = self.n
        step = max(1, BLOCK_ELEMENTS // n)
        for a in range(0, n, step):
            self._stabiliser[a : a + step] = (self._Qs[a : a + step] @ self._K.T).max(axis=1)
        for a in range(0, n, step):
            block = self._At[a : a + step]
            np.matmul(self._K[a : a + step], self._Qs.T, out=block)
            block -= self._stabiliser
            np.exp(block, out=block)
        np.matmul(self._At.T, self._weights(), out=self._cache)

    def _weights(self) -> np.ndarray:
        """``[V, 1, −g, −g|V|]`` (n, 2d+2): ``Ã @`` this is N | s | guard of s | guard of N."""
        W = np.empty((self.n, 2 * self.d + 2), dtype=self.dtype)
        self._contrib.new(W, self._V)
        return W

    def _contributions(self, new_v: np.ndarray, old_v: np.ndarray) -> np.ndarray:
        """A new value in and an old one out: weights times these rows move N, s and both
        guards (:class:`~dynattn.engine.kernels.Contributions`)."""
        B = np.empty((2, 2 * self.d + 2), dtype=self.dtype)
        self._contrib.new(B[:1], new_v[None])
        self._contrib.old(B[1:], old_v[None])
        return B

    def update_v(self, i, j, delta) -> None:
        """Add ``delta`` to ``V[i, j]``: one column of N and of its guards moves, O(n)."""
        i, j, delta = self._check_entry(i, j, delta)
        old = float(self._V[i, j])
        self._V[i, j] = check.entry_sum("V", self._V, i, j, delta)[1]
        self._v_entry_changed(i, j, old)

    def _rows_changed(self, which: str, rows: np.ndarray, old_rows: np.ndarray) -> None:
        changed = self._k_changed if which == "K" else self._v_changed
        for i, old in zip(rows.tolist(), old_rows, strict=True):
            changed(i, old)

    def _k_changed(self, i: int, old_row: np.ndarray) -> None:
        a_new = self._Qs @ self._K[i]
        a_new -= self._stabiliser
        # A new logit may exceed its row's stabiliser by the headroom before that row is
        # recomputed (re-stabilised); below it the exponentials stay far from overflow.
        headroom = _HEADROOM[self.dtype]
        above = a_new > headroom
        np.minimum(a_new, headroom, out=a_new)
        np.exp(a_new, out=a_new)
        self._pair[:, 0] = a_new
        self._pair[:, 1] = self._At[i]
        self._At[i] = a_new
        v = self._V[i]
        bad = self._add_product(self._pair, self._contributions(v, v))
        self._repair(above if bad is None else bad | above)

    def _v_changed(self, i: int, old_row: np.ndarray) -> None:
        # s keeps its value; N moves by a·(new − old) and the guard of N by the mass of the
        # old value removed, less g times the change of the natural scale Σ ã|v|
        b = np.empty((1, 2 * self.d + 2), dtype=self.dtype)
        with np.errstate(over="ignore"):  # a guard that overflows is +inf: recomputed
            self._contrib.changed(b, self._V[i][None], old_row[None])
        self._repair(self._add_product(self._At[i][:, None], b))

    def _v_entry_changed(self, i: int, j: int, old: float) -> None:
        d, g = self.d, self._g
        new = float(self._V[i, j])
        a = self._At[i]
        guard = self._cache[:, d + 2 + j]
        with np.errstate(over="ignore"):  # a guard that overflows is +inf: the row is recomputed
            self._cache[:, j] += a * (new - old)
            guard += a * ((1.0 + g) * abs(old) - g * abs(new))
        self._repair(guard > 0)

    def _add_product(self, A: np.ndarray, B: np.ndarray) -> np.ndarray | None:
        """``C += A @ B`` (A (n, k), B (k, 2d+2)) one row block at a time, checking each block's
        guards while it is in cache. Returns the rows that lost precision, or None."""
        step, d = len(self._block), self.d
        flagged = False
        # an infinite or NaN sum (a huge row) fails the guard test below and is recomputed
        with np.errstate(over="ignore", invalid="ignore"):
            for a in range(0, self.n, step):
                C = self._cache[a : a + step]
                out = self._block[: len(C)]
                np.matmul(A[a : a + step], B, out=out)
                C += out
                flagged |= not guards_hold(C, d)
        return lost_precision(self._cache, d) if flagged else None

    def _repair(self, bad: np.ndarray | None) -> None:
        if bad is not None and bad.any():
            self._exact_rows(np.flatnonzero(bad))

    def _exact_rows(self, idx: np.ndarray) -> None:
        """Recompute rows ``idx`` of Ã, m and the caches from scratch: O(len(idx)·n·d)."""
        W = self._weights()
        step = max(1, BLOCK_ELEMENTS // self.n)
        for a in range(0, len(idx), step):
            rows = idx[a : a + step]
            L = self._Qs[rows] @ self._K.T
            m = L.max(axis=1)
            L -= m[:, None]
            np.exp(L, out=L)
            self._stabiliser[rows] = m
            for k, r in enumerate(rows.tolist()):  # fancy indexing of columns is far slower
                self._At[:, r] = L[k]
            self._cache[rows] = L @ W

    def query(self, i, j) -> float:
        """Exact ``O[i, j]`` from the caches: O(1)."""
        i = check.check_index("i", i, self.n)
        j = check.check_index("j", j, self.d)
        return float(self._cache[i, j] / self._cache[i, self.d])

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        C = self._cache[idx]
        return C[:, : self.d] / C[:, self.d, None]


class Recompute(_Baseline):
    """Recompute the whole output after every update: O(n²·d) per update, O(1) per query.

    Uses :func:`~dynattn.reference.dense_attention` (row blocks, no n×n array). Parameters
    as for every baseline (see :class:`_Baseline`).
    """

    def __init__(self, Q, K, V, *, scale=None, dtype=None):
        super().__init__(Q, K, V, scale=scale, dtype=dtype)
        self._recompute()

    def _recompute(self) -> None:
        self._O = dense_attention(self._Q, self._K, self._V, self.scale, dtype=self.dtype)

    def _rows_changed(self, which: str, rows: np.ndarray, old_rows: np.ndarray) -> None:
        self._recompute()

    def query(self, i, j) -> float:
        """Exact ``O[i, j]``: O(1)."""
        return float(self._O[check.check_index("i", i, self.n), check.check_index("j", j, self.d)])

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        return self._O[idx].copy()


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


def dense_recompute_seconds(
    Q, K, V, *, scale=None, dtype=np.float64, sample_rows: int = 512
) -> float:
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
    sample_rows = check.check_int("sample_rows", sample_rows)
    n = Q.shape[0]
    rows = min(n, sample_rows)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dense_attention(Q[:rows], K, V, scale, dtype=dtype)
        best = min(best, time.perf_counter() - t0)
    return best * n / rows
