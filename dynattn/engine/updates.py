"""The update verbs of :class:`~dynattn.engine.LazyAttention` (:class:`UpdateVerbs`).

One verb per action, with vectorised batch forms beside it: ``update_k``/``update_v`` add to
one entry, ``set_k_row``/``set_v_row`` replace a row, and ``update_k_many``,
``update_v_many``, ``set_k_rows``, ``set_v_rows`` do many at once. Each writes K or V at
once and queues the touched rows (:mod:`~dynattn.engine.pending`); the caches change only at
a flush.

Every call is all or nothing: arguments are checked before anything is written, and when the
flush policy, asked after the write, raises or returns something that is not a threshold, the
write and its queueing are taken back before the error propagates. Costs: an entry update is
O(1) (a write and a log entry), a row O(d), a batch of m entries O(m) (m·d for rows); asking
the policy is amortised (see :mod:`~dynattn.engine.schedule`).
"""

from __future__ import annotations

import numpy as np

from .. import _validate as check
from .reports import FlushEvent


def _entry_update(which: str):
    """``update_k`` or ``update_v``, written once and bound to its array here: passing the
    array on to a shared method cost 0.05 µs of a 0.7 µs update."""
    on_k = which == "K"

    def update(self, i, j, delta) -> FlushEvent | None:
        # the hot path of every stream: scalar work and a log entry only; the row joins the
        # queue at the next read, with the others, vectorised
        n = self._n
        i = check.check_index("i", i, n)
        j = check.check_index("j", j, self._d)
        target, limit = (self._K, self._limit_k) if on_k else (self._V, self._limit_v)
        before, new = check.entry_sum(
            which, target, i, j, check.check_scalar("delta", delta, self._dtype), limit
        )
        target[i, j] = new
        log = self._log
        log.append(i if on_k else n + i)
        if len(log) >= self._ask_at:
            return self._ask_policy_or_undo(target, (i, j), before)
        return None

    return _method(
        update,
        f"update_{which.lower()}",
        f"Add ``delta`` to ``{which}[i, j]``; logged, O(1). Returns the flush it caused, if any.",
    )


def _row_update(which: str):
    """``set_k_row`` or ``set_v_row``, as :func:`_entry_update`: the write and the row logged
    (the snapshot holds what it overwrote)."""
    on_k = which == "K"

    def update(self, i, row) -> FlushEvent | None:
        n = self._n
        i = check.check_index("i", i, n)
        # a row of the right type whose sum of squares is within the limit's square is
        # finite and within the limit: one vdot (0.4 µs) where the checks below cost 1.3
        new = row
        if not (
            type(row) is np.ndarray
            and row.dtype == self._dtype
            and row.shape == (self._d,)
            and np.vdot(row, row) <= (self._limit_k2 if on_k else self._limit_v2)
        ):
            new = check.as_vector("row", row, self._d, self._dtype)
            self._limits.check("row", which, new)
        target = self._K if on_k else self._V
        log = self._log
        # the policy is asked after this write: keep what it overwrites, to take it back
        old = target[i].copy() if len(log) + 1 >= self._ask_at else None
        target[i] = new
        log.append(i if on_k else n + i)
        if old is not None:
            return self._ask_policy_or_undo(target, i, old)
        return None

    return _method(
        update,
        f"set_{which.lower()}_row",
        f"Replace ``{which}[i]`` by ``row`` (shape (d,)); one update action, O(d), logged. "
        "Returns the flush it caused, if any.",
    )


def _method(func, name: str, doc: str):
    """``func`` named and documented as the method ``LazyAttention.<name>``."""
    func.__name__, func.__qualname__, func.__doc__ = name, f"LazyAttention.{name}", doc
    return func


class UpdateVerbs:
    """The update methods of :class:`~dynattn.engine.LazyAttention`, kept apart from its
    queries; they use its state (``_K``, ``_V``, ``_log``, ``_queue``, ``_ask_policy``)."""

    update_k = _entry_update("K")
    update_v = _entry_update("V")
    set_k_row = _row_update("K")
    set_v_row = _row_update("V")

    def _ask_policy_or_undo(self, target: np.ndarray, where, old) -> FlushEvent | None:
        """Ask the policy after a single update; if that fails, ``target[where] = old`` and the
        queue is as before the update. A policy may read exact answers, which queues the log,
        so the queue is checkpointed with every other logged update already in it; a policy
        that declares ``reads_answers = False`` spares that (queueing the log at every
        consultation cost the cost model's streams up to 1.5 µs an update). (Apart
        from the update itself: a closure there would make its locals cells, 10 % of it.)"""
        log, queue = self._log, self._queue
        if not self._schedule.reads_answers:  # the update's log entry stays the last one
            return self._ask_policy(lambda: (target.__setitem__(where, old), log.pop()))
        flag = log.pop()
        self._drain_log()
        mark, was = queue.checkpoint(), queue.moved[flag : flag + 1].copy()
        log.append(flag)
        self._plan_next_ask()

        def undo():
            target[where] = old
            queue.rollback(mark, np.array([flag]), queue.moved, was)

        return self._ask_policy(undo)

    def update_k_many(self, rows, cols=None, deltas=None) -> FlushEvent | None:
        """Add ``deltas`` to ``K[rows, cols]`` (repeats accumulate); all or nothing.

        Parameters
        ----------
        rows, cols : array_like of int, shape (m,)
            Entry positions. Alternatively pass a sequence of ``(i, j, delta)`` tuples as
            ``rows`` alone, the original prototype's form.
        deltas : array_like of float, shape (m,)

        Returns
        -------
        FlushEvent or None
            The flush the batch triggered (the policy is asked once, after the batch).
        """
        return self._update_entries("K", rows, cols, deltas)

    def update_v_many(self, rows, cols=None, deltas=None) -> FlushEvent | None:
        """Add ``deltas`` to ``V[rows, cols]``; see :meth:`update_k_many`."""
        return self._update_entries("V", rows, cols, deltas)

    def set_k_rows(self, rows, values) -> FlushEvent | None:
        """Replace ``K[rows]`` by ``values`` (shape (m, d)); m update actions, all or nothing."""
        return self._set_rows("K", rows, values)

    def set_v_rows(self, rows, values) -> FlushEvent | None:
        """Replace ``V[rows]`` by ``values`` (shape (m, d)); m update actions, all or nothing."""
        return self._set_rows("V", rows, values)

    def _update_entries(self, which: str, rows, cols, deltas) -> FlushEvent | None:
        if cols is None and deltas is None:
            r, c, dl = check.as_triples(rows, self._n, self._d, self._dtype)
        elif cols is None or deltas is None:
            raise TypeError(
                f"update_{which.lower()}_many needs rows, cols and deltas, or one "
                "sequence of (i, j, delta) tuples"
            )
        else:
            r = check.as_indices("rows", rows, self._n)
            c = check.as_indices("cols", cols, self._d)
            if len(c) != len(r):
                raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
            dl = check.as_vector("deltas", deltas, len(r), self._dtype)
        target = self._K if which == "K" else self._V
        flat, final = check.entry_sums(which, target, r, c, dl)
        self._limits.check_sums(which, flat, final, self._d)
        old = target.ravel()[flat]
        return self._apply_batch(
            which, r, lambda values: target.ravel().put(flat, values), final, old
        )

    def _set_rows(self, which: str, rows, values) -> FlushEvent | None:
        r = check.as_indices("rows", rows, self._n)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row; a row can be set once per call")
        new = check.as_matrix("values", values, self._dtype, shape=(len(r), self._d))
        self._limits.check("values", which, new)
        target = self._K if which == "K" else self._V
        return self._apply_batch(which, r, lambda v: target.__setitem__(r, v), new, target[r])

    def _apply_batch(self, which: str, rows, write, new, old) -> FlushEvent | None:
        """Queue ``rows`` of K or V, ``write(new)`` and ask the policy once its last answer
        has run out; if asking fails, ``write(old)`` and the queue as it was."""
        self._drain_log()  # a policy reading exact answers would queue the log: not undoable
        queue = self._queue
        moved = queue.moved_k if which == "K" else queue.moved_v
        mark, flags = queue.checkpoint(), moved[rows]
        queue.touch(rows, moved, len(rows))
        write(new)
        if queue.count + len(self._log) >= self._schedule.check_at:
            return self._ask_policy(lambda: (write(old), queue.rollback(mark, rows, moved, flags)))
        self._ask_at -= len(rows)  # _plan_next_ask, for what just changed
        return None
