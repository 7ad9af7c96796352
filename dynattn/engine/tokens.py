"""Token-level verbs of :class:`~dynattn.engine.LazyAttention` (:class:`TokenVerbs`): query
rows replaced, and token rows (a query, a key and a value each) inserted or deleted, as a
language-model edit produces them.

Invariant kept: the caches describe the snapshot (K and V as of the last flush). So

* a new query row is computed exactly against the snapshot, ``O(n·d)`` a row;
* an inserted key joins the snapshot at once: its contribution is added to every cache row
  by one rank-t product (the flush's kernel with new entries only), ``O(m·t·d)``;
* a deleted key leaves the snapshot at once: its snapshot contribution is removed by one
  rank-t product (old entries only), ``O(m·t·d)``;
* pending updates of the other rows stay pending, renumbered; those of deleted rows go.

Arrays are copied to their new size, ``O((m + n)·d)``. Rows whose correction would lose
precision are recomputed exactly. Every call checks all its arguments first and is applied
whole or not at all.
"""

from __future__ import annotations

import numpy as np

from .. import _validate as check
from .kernels import (
    GROWTH,
    Contributions,
    augmented_keys,
    correct_rows,
    exact_rows,
    max_norm,
    row_norms,
)
from .limits import EntryLimits


class _OneSided:
    """A correction pack of keys that only enter (``add``) or only leave the snapshot, in the
    form :func:`~dynattn.engine.kernels.correct_rows` reads."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, scale: float, contrib, add: bool):
        t, d = keys.shape
        Kp = keys * keys.dtype.type(scale)
        B = np.empty((t, 2 * d + 2), dtype=keys.dtype)
        (contrib.new if add else contrib.old)(B, values, Kp)  # weighted by the keys' logits
        self.contrib = contrib
        self.views = (Kp, B, slice(0, t) if add else None)
        self.new = self.views[2]
        self.knorm = max_norm(Kp) if add else 0.0  # leaving keys raise no logit

    def augmented(self) -> np.ndarray:
        return augmented_keys(self.views[0])


class TokenVerbs:
    """Query-row replacement and token insertion and deletion for a square engine (m = n,
    one row of Q, K and V per token); they use and rebuild the engine's state."""

    def set_q_rows(self, rows, values) -> None:
        """Replace ``Q[rows]`` by ``values`` (shape (t, d)); each row's cache is recomputed
        exactly, ``O(t·n·d)``. Nothing is queued: a query row has no lazy form."""
        r = check.as_indices("rows", rows, self._nq)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row; a row can be set once per call")
        new = check.as_matrix("values", values, self._dtype, shape=(len(r), self._d))
        qnorm = self._qnorm.copy()
        qnorm[r] = row_norms(new)  # an infinite norm is refused by the limits
        self._drain_log()
        q = self._queue
        limits = self._limits_for(float(qnorm.max()), self._n, "values", q.K_flushed)
        m, C = exact_rows(
            new,
            q.K_flushed,
            q.V_flushed,
            self._scale,
            self._contrib.growth,
            np.arange(len(r)),
            self._work,
        )
        self._Q_padded[r, : self._d] = new
        self._stabiliser[r], self._cache[r] = m, C
        self._qnorm = qnorm
        if qnorm.max() > self._qnorm_max:  # removals may now err more: weigh them so
            self._contrib = self._pack.contrib = Contributions(self._d, self._dtype, qnorm.max())
            self._pack.clear()  # repacked with the new weights at its next use
        self._qnorm_max = float(qnorm.max())
        self._set_limits(limits)

    def insert_rows(self, at, Q_rows, K_rows, V_rows) -> None:
        """Insert t token rows before row ``at`` (0 ≤ at ≤ n; n appends): rows ``at`` and later
        move down by t. Costs ``O(m·t·d)`` for the new keys, ``O(t·n·d)`` for the new query
        rows, ``O((m + n)·d)`` to copy."""
        self._require_square("insert_rows")
        at = check.check_index("at", at, self._n + 1)
        Qr = check.as_matrix("Q_rows", Q_rows, self._dtype)
        t, d = len(Qr), self._d
        Kr = check.as_matrix("K_rows", K_rows, self._dtype, shape=(t, d))
        Vr = check.as_matrix("V_rows", V_rows, self._dtype, shape=(t, d))
        if Qr.shape[1] != d:
            raise ValueError(f"Q_rows has shape {Qr.shape}; expected ({t}, {d})")
        qmax = max(self._qnorm_max, float(row_norms(Qr).max()))
        self._drain_log()
        q = self._queue
        limits = self._limits_for(qmax, self._n + t, "Q_rows", q.K_flushed)
        limits.check("K_rows", "K", Kr)
        limits.check("V_rows", "V", Vr)
        # the existing query rows take in the new keys (snapshot = current for new rows)
        stab, cache = self._stabiliser.copy(), self._cache.copy()
        pack = _OneSided(Kr, Vr, self._scale, self._contrib, add=True)
        QA = self._Q_padded.copy()
        bad = correct_rows(QA, self._qnorm, self._qnorm_max, stab, cache, pack)
        spot = np.arange(self._n)
        spot[at:] += t  # old row -> new row
        grow = lambda a, new: np.insert(a, at, new, axis=0)  # noqa: E731
        QA_new = grow(QA, np.hstack([Qr, np.zeros((t, 1), dtype=self._dtype)]))
        arrays = [
            grow(a, b)
            for a, b in ((self._K, Kr), (self._V, Vr), (q.K_flushed, Kr), (q.V_flushed, Vr))
        ]
        width = cache.shape[1]
        cache = grow(cache, np.zeros((t, width), dtype=self._dtype))
        stab = grow(stab, np.zeros(t, dtype=self._dtype))
        fresh = np.concatenate([np.arange(at, at + t), spot[bad]])
        self._rebuild_state(QA_new, *arrays, cache, stab, spot, fresh)

    def delete_rows(self, rows) -> None:
        """Delete token rows ``rows`` (distinct; at least one row must remain): later rows
        move up. Costs ``O(m·t·d)`` to remove their keys, ``O((m + n)·d)`` to copy."""
        self._require_square("delete_rows")
        r = check.as_indices("rows", rows, self._n)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row")
        if len(r) >= self._n:
            raise ValueError(f"rows would delete all {self._n} rows; at least one must remain")
        self._drain_log()
        q = self._queue
        stab, cache = self._stabiliser.copy(), self._cache.copy()
        pack = _OneSided(q.K_flushed[r], q.V_flushed[r], self._scale, self._contrib, add=False)
        bad = correct_rows(self._Q_padded.copy(), self._qnorm, self._qnorm_max, stab, cache, pack)
        keep = np.ones(self._n, dtype=bool)
        keep[r] = False
        spot = np.cumsum(keep) - 1
        spot[~keep] = -1
        arrays = [a[keep] for a in (self._K, self._V, q.K_flushed, q.V_flushed)]
        fresh = spot[bad & keep]
        self._rebuild_state(self._Q_padded[keep], *arrays, cache[keep], stab[keep], spot, fresh)

    def _limits_for(self, qnorm_max: float, n: int, q_name: str, K_flushed) -> EntryLimits:
        """The entry limits after a change of Q or of n, checked against the keys and values
        the engine holds (current and snapshot): a ValueError, and nothing changed, when a
        larger query or more keys would let them overflow."""
        try:
            limits = EntryLimits(
                qnorm_max, self._scale, n, self._d, self._dtype, GROWTH[self._dtype]
            )
        except ValueError as exc:
            raise ValueError(f"{q_name}: {exc}") from None
        for name, which, arr in (
            ("K", "K", self._K),
            ("K (as of the last flush)", "K", K_flushed),
            ("V", "V", self._V),
            ("V (as of the last flush)", "V", self._queue.V_flushed),
        ):
            limits.check(name, which, arr)
        return limits

    def _require_square(self, verb: str) -> None:
        if self._nq != self._n:
            raise ValueError(
                f"{verb} needs one query row per key (m = n); this engine has m={self._nq}, "
                f"n={self._n}"
            )

    def _rebuild_state(self, QA, K, V, K_flushed, V_flushed, cache, stab, spot, fresh) -> None:
        """Adopt resized arrays, keep counters, logs and the pending queue (renumbered by
        ``spot``: old row -> new row, -1 for a deleted row), recompute rows ``fresh``."""
        q = self._queue
        touched = np.array(q.rows, dtype=np.intp)
        flags = q.moved_k[touched], q.moved_v[touched]
        keep = spot[touched] >= 0 if len(touched) else np.zeros(0, dtype=bool)
        count, done = q.count, q.done
        kept = (self.flush_log, self.query_log, self._n_queries, self._n_flushes)
        self._adopt(*(check.aligned_copy(a) for a in (QA, K, V)), self._scale, self.policy)
        self._cache, self._stabiliser = cache, stab
        self.flush_log, self.query_log, self._n_queries, self._n_flushes = kept
        queue = self._queue
        queue.K_flushed, queue.V_flushed = (
            check.aligned_copy(K_flushed),
            check.aligned_copy(V_flushed),
        )
        rows = spot[touched[keep]]
        if len(rows):
            queue.queue(rows)
            queue.moved_k[rows] = flags[0][keep]
            queue.moved_v[rows] = flags[1][keep]
        queue.count, queue.done = count, done
        self._plan_next_ask()
        if len(fresh):
            fresh = np.unique(fresh)
            self._stabiliser[fresh], self._cache[fresh] = self._exact(fresh, snapshot=True)
