"""The query verbs of :class:`~dynattn.engine.LazyAttention` (:class:`QueryVerbs`) and its
error reports.

Every answer is exact unless ``stale=True`` asks for what the caches say (as of the last
flush). A single query chooses between correcting its cached row, ``O(|S|·d)``, and
computing it afresh, ``O(n·d)`` (:mod:`~dynattn.engine.planner`); many rows at once are
corrected with matrix products. Each user query is timed into ``query_log`` for cost models.
Display windows of the weights are computed for the window only, never as an n×n array.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .. import _validate as check
from ..reference import entry_from_scratch
from .kernels import correct_row
from .reports import ErrorReport, FrobeniusNorm, QueryRecord

# Largest weights window returned (2,048 × 2,048: 32 MB in float64): a display or a test
# needs far less, and the default window (all of P) would be the n×n array the engine avoids
MAX_WINDOW = 1 << 22

# QueryRecord(...) goes through a Python __new__: 0.23 µs of a 6 µs query; this is 0.09
_record = tuple.__new__


class QueryVerbs:
    """Exact and stale queries of :class:`~dynattn.engine.LazyAttention`, kept apart from its
    updates; they read its caches, queue, pack and planner."""

    def query(self, i, j, stale: bool = False) -> float:
        """Output entry ``O[i, j]``; exact in O(|S|·d), or the cached value if ``stale``."""
        i = check.check_index("i", i, self._nq)
        j = check.check_index("j", j, self._d)
        if not stale and self._choose_fresh():
            return self._fresh_entry(i, j)
        row = self._row(i, stale, col=j, fresh=False)  # asked just above
        return float(row[j] / row[self._d])

    def query_row(self, i, stale: bool = False) -> np.ndarray:
        """Output row ``O[i]`` (shape (d,)); exact in O(|S|·d), or cached if ``stale``."""
        i = check.check_index("i", i, self._nq)
        row = self._row(i, stale)
        return row[: self._d] / row[self._d]

    def query_many(self, rows, cols, stale: bool = False) -> np.ndarray:
        """Output entries ``O[rows[k], cols[k]]`` (shape (k,)), vectorised.

        Each distinct row is corrected once: O(u·|S|·d) for u distinct rows.
        """
        r = check.as_indices("rows", rows, self._nq)
        c = check.as_indices("cols", cols, self._d)
        if len(r) != len(c):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        uniq, inv = np.unique(r, return_inverse=True)
        return self._rows_out(uniq, stale, count=len(r))[inv, c]

    def output(self, stale: bool = False) -> np.ndarray:
        """The whole output O (shape (m, d)): exact in O(m·|S|·d), or the cached view."""
        self._drain_log()
        if stale or not self._queue.rows:  # nothing pending: the caches are exact
            return _out(self._cache, self._d)
        out = np.empty((self._nq, self._d), dtype=self._dtype)
        for blk in self._blocks(2 * len(self._queue.rows) + 1):
            out[blk] = _out(self._current_rows(np.arange(blk.start, blk.stop))[1], self._d)
        return out

    def weight(self, i, j, stale: bool = False) -> float:
        """Attention weight ``P[i, j]``; exact in O(|S|·d), or as of the last flush."""
        i = check.check_index("i", i, self._nq)
        j = check.check_index("j", j, self._n)
        return float(self.weights([i], [j], stale=stale)[0, 0])

    def weights(self, rows=slice(None), cols=slice(None), stale: bool = False) -> np.ndarray:
        """A window of the attention weights ``P[rows][:, cols]`` without forming P.

        Parameters
        ----------
        rows, cols : slice, int or array of int
            The window, at most :data:`MAX_WINDOW` entries (the default, all of P, only
            where m·n is that small).
        stale : bool
            Weights as of the last flush (old keys, cached denominators) instead of exact.

        Returns
        -------
        ndarray, shape (len(rows), len(cols))
            Cost O(len(rows)·(|S| + len(cols))·d).
        """
        I = check.as_selection("rows", rows, self._nq)
        J = check.as_selection("cols", cols, self._n)
        if len(I) * len(J) > MAX_WINDOW:
            raise ValueError(
                f"weights(rows, cols) would return {len(I):,} × {len(J):,} = "
                f"{len(I) * len(J):,} weights, more than {MAX_WINDOW:,}; pass a window, e.g. "
                "weights(slice(0, 512), slice(0, 512)) (a display needs no more)"
            )
        d = self._d
        if stale:
            m, s, keys = self._stabiliser[I], self._cache[I, d], self._queue.K_flushed[J]
        else:
            m, C, _ = self._current_rows(I)
            s, keys = C[:, d], self._K[J]
        L = (self._Q[I] * self._dtype.type(self._scale)) @ keys.T
        L -= m[:, None]
        np.exp(L, out=L)
        L /= s[:, None]
        return L

    # ------------------------------------------------------------------ single queries
    def _choose_fresh(self) -> bool:
        """Whether this single exact query computes its row afresh (see the planner).

        The log is settled only when the rows queued without it do not already decide: more
        rows make correcting and catching up dearer, never cheaper, so a query that computes
        afresh anyway leaves the log to be queued later with more entries at once.
        """
        if self._log:
            if self._planner.repeats_fresh(len(self._log), self.n_updates):
                return True
            if self._prefers_fresh():
                return True
            self._drain_log()
        return self._prefers_fresh()

    def _prefers_fresh(self) -> bool:
        queue, logged = self._queue, len(self._log)
        updates = queue.done + queue.count + logged
        return self._planner.prefers_fresh(len(queue.rows), self._pack, logged, updates)

    def _fresh_entry(self, i: int, j: int) -> float:
        """``O[i, j]`` from scratch, reading one column of V: 2n·d + 4n flops."""
        t0 = time.perf_counter()
        value = entry_from_scratch(self._Q[i], self._K, self._V[:, j], self._scale)
        self._n_queries += 1
        seconds = time.perf_counter() - t0
        self.query_log.append(_record(QueryRecord, (len(self._queue.rows), 1, seconds)))
        self._planner.note_fresh(seconds)
        return value

    def _row(self, i: int, stale: bool, col: int | None = None, fresh: bool | None = None):
        """One cache row, current unless ``stale``: the single-query fast path. With ``col``
        only ``N[col]`` and ``s`` are guaranteed; ``fresh``: the caller's choice, if made."""
        if stale:
            return self._cache[i]
        t0 = time.perf_counter()
        if fresh is None:
            fresh = self._choose_fresh()
        S = len(self._queue.rows)
        if fresh:
            row = self._exact(np.array([i]), guards=False)[1][0]
        elif S == 0:
            row = self._cache[i]
        else:
            self._get_pack()
            row = self._corrected_row(i, col)
            if row is None and self._refresh(np.array([i]))[0]:  # lost precision: see _refresh
                row = self._corrected_row(i, col)
            if row is None:  # its correction alone would lose precision
                row = self._exact(np.array([i]))[1][0]
        self._n_queries += 1
        self.query_log.append(_record(QueryRecord, (S, 1, time.perf_counter() - t0)))
        return row

    def _corrected_row(self, i: int, col: int | None):
        """Cache row ``i`` corrected (a copy), or None when it lost precision (``correct_row``)."""
        cached = self._cache[i]
        return correct_row(self._Q[i], self._qnorm[i], self._stabiliser[i], cached, self._pack, col)

    def _rows_out(self, idx: np.ndarray, stale: bool, count: int) -> np.ndarray:
        """Output rows ``idx``; ``count`` user queries are logged (0: internal use)."""
        if stale:
            return _out(self._cache[idx], self._d)
        t0 = time.perf_counter()
        C = self._current_rows(idx)[1]
        if count:
            self._n_queries += count
            self.query_log.append(
                QueryRecord(len(self._queue.rows), count, time.perf_counter() - t0)
            )
        return _out(C, self._d)

    # ------------------------------------------------------------------ error
    def rows_error(self, rows) -> tuple[float, float]:
        """``(Σ (O_stale − O)², Σ O²)`` over the output rows ``rows``, both divided by the
        square of the largest entry of either, so that their ratio survives outputs of any
        magnitude (squares of 1e-200 underflow, of 1e200 overflow); O(len(rows)·|S|·d).

        The building block of sampled error estimates (see ``policies.ErrorBudget``).
        """
        idx = check.as_indices("rows", rows, self._nq)
        exact = self._rows_out(idx, stale=False, count=0)
        diff = self._rows_out(idx, stale=True, count=0) - exact
        norms = FrobeniusNorm(), FrobeniusNorm()
        norms[0].add(diff)
        norms[1].add(exact)
        top = max(norms[0].scale, norms[1].scale)
        if top == 0.0:
            return 0.0, 0.0
        sq_diff, sq_exact = (norm.ssq * (norm.scale / top) ** 2 for norm in norms)
        return sq_diff, sq_exact

    def approximation_error(self) -> ErrorReport:
        """Error of the stale output against the exact output, O(m·|S|·d), no m×n array."""
        self._drain_log()
        norm_diff, norm_exact = FrobeniusNorm(), FrobeniusNorm()
        for blk in self._blocks(2 * len(self._queue.rows) + 1):
            exact = _out(self._current_rows(np.arange(blk.start, blk.stop))[1], self._d)
            norm_diff.add(_out(self._cache[blk], self._d) - exact)
            norm_exact.add(exact)
        if norm_exact.scale == 0.0:
            rel = 0.0 if norm_diff.scale == 0.0 else math.inf
        else:
            rel = norm_diff / norm_exact
        return ErrorReport(rel, norm_diff.scale)


def _out(C: np.ndarray, d: int) -> np.ndarray:
    """Output rows ``N / s`` from cache rows."""
    return C[:, :d] / C[:, d, None]
