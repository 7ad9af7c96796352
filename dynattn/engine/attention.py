"""The lazy engine's public face: :class:`LazyAttention`.

It owns Q, K, V and the caches (per query row a stabiliser and a cache row, see
:mod:`~dynattn.engine.kernels`) and composes the parts: the pending updates and snapshot
(:mod:`~dynattn.engine.pending`), the correction pack (:mod:`~dynattn.engine.pack`), the
query planner (:mod:`~dynattn.engine.planner`) and the flush schedule
(:mod:`~dynattn.engine.schedule`); its verbs live in :mod:`~dynattn.engine.updates` (K and V),
:mod:`~dynattn.engine.tokens` (query rows, token rows inserted and deleted) and
:mod:`~dynattn.engine.queries`.

Invariants: K and V are always current; the caches describe the snapshot (K and V as of the
last flush), and every exact answer is the cache row plus a correction for the touched rows.
No n×n array is formed: memory O((m + n)·d) plus the pending queue.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from .. import _validate as check
from .kernels import (
    BLOCK_ELEMENTS,
    GROWTH,
    MANY_ROWS,
    Contributions,
    Workspace,
    correct_rows,
    exact_rows,
    row_norms,
)
from .limits import EntryLimits
from .pack import CorrectionPack
from .pending import PendingUpdates
from .planner import QueryPlanner
from .queries import QueryVerbs
from .reports import FlushEvent, QueryRecord
from .schedule import FlushSchedule
from .tokens import TokenVerbs
from .updates import UpdateVerbs


def checked_inputs(Q, K, V, scale=None, dtype=None, pad: int = 0):
    """``(Q, K, V, scale, limits)``: owned copies of the inputs in the working dtype (Q with
    ``pad`` zero columns after its d), the scale and the entry limits they imply, every
    argument checked as an engine checks it (an exception naming it); O((m + n)·d).

    Shared by every engine built from Q, K and V (also :mod:`dynattn.distributed`), so bad
    input is refused the same way before anything is built anywhere.
    """
    dt = check.resolve_dtype(dtype, Q, K, V)
    Qa = check.as_matrix("Q", Q, dt, pad=pad)
    d = Qa.shape[1] - pad
    Ka = check.as_matrix("K", K, dt)
    if Ka.shape[1] != d:
        raise ValueError(f"K has shape {Ka.shape}; expected (n, {d}): as many columns as Q")
    Va = check.as_matrix("V", V, dt, shape=Ka.shape)
    scale = check.check_scalar("scale", 1.0 / math.sqrt(d) if scale is None else scale, dt)
    if scale == 0:
        raise ValueError("scale=0 makes every row uniform; use a nonzero scale")
    Q = Qa[:, :d]
    qnorm_max = float(row_norms(Q).max())  # an infinite norm is refused by the limits
    limits = EntryLimits(qnorm_max, scale, len(Ka), d, dt, GROWTH[dt])
    limits.check("K", "K", Ka)
    limits.check("V", "V", Va)
    return Qa, Ka, Va, scale, limits


class LazyAttention(UpdateVerbs, TokenVerbs, QueryVerbs):
    """Attention output kept exact under updates to K and V, with deferred (lazy) cache work.

    Parameters
    ----------
    Q : array_like or scipy.sparse matrix, shape (m, d)
        Queries: the rows of the output. Copied; Q never changes afterwards.
    K, V : array_like or scipy.sparse matrix, shape (n, d)
        Keys and values. Copied. Usually m = n (self-attention); m ≠ n is a block of query
        rows against all keys (what one shard of :mod:`dynattn.distributed` holds).
    scale : float, optional
        Logit scale; default ``1/sqrt(d)``. ``scale=1.0`` is the unscaled form of the original
        prototype and of van den Brand, Song & Zhou (2023).
    dtype : {None, float32, float64}
        Working precision. ``None``: float32 if Q, K and V are all float32, else float64.
    policy : None, int, callable or policy object
        When to flush. ``None`` uses :class:`~dynattn.policies.CostModel`; an int ``k`` uses
        ``Fixed(k)``; any object with ``threshold(engine) -> float`` (and optionally
        ``valid_until(engine)`` and ``on_flush(event)``: :class:`~dynattn.protocols.FlushPolicy`)
        or a callable ``engine -> float`` works. The engine flushes when the pending update
        count reaches the threshold.

    Notes
    -----
    Costs, with S the touched rows: an entry update is O(1) (a write and a log entry; its row is
    queued later, amortised O(1)), a row update O(d), an exact query O(|S|·d) (O(n·d) when
    that is cheaper), a flush O(m·|S|·d) in two matrix products, a rebuild O(m·n·d) in row
    blocks. Memory is O((m + n)·d): Q, K, V, the snapshot of K and V as of the last flush and
    the caches (about 8·n·d numbers when m = n), O(n) flags and at most 16,384 logged entries
    (128 KB; the log is queued then); no n×n array is formed.

    Examples
    --------
    >>> import numpy as np
    >>> from dynattn import LazyAttention
    >>> rng = np.random.default_rng(0)
    >>> Q, K, V = rng.random((3, 100, 8))
    >>> eng = LazyAttention(Q, K, V, policy=1000)
    >>> eng.update_k(5, 2, 0.3)          # queued: K changes now, caches later
    >>> eng.update_v(7, 0, -1.0)
    >>> eng.pending, sorted(eng.touched_k | eng.touched_v)
    (2, [5, 7])
    >>> from dynattn.reference import dense_attention
    >>> bool(np.isclose(eng.query(0, 0), dense_attention(Q, eng.K, eng.V, eng.scale)[0, 0]))
    True
    >>> eng.flush().rows
    2
    """

    def __init__(self, Q, K, V, *, scale=None, dtype=None, policy=None):
        QA, Ka, Va, scale, _ = checked_inputs(Q, K, V, scale, dtype, pad=1)
        self._adopt(QA, Ka, Va, scale, policy)
        self._store_exact()
        # the snapshot is made after the build and its scratch block are gone, while the
        # caller's inputs may still be alive: this keeps the peak at n = 50,000 under 300 MB
        self._work.clear()
        self._queue.snapshot()

    def _adopt(self, QA, K, V, scale: float, policy) -> None:
        """Take owned, validated arrays: ``QA = [Q | ·]`` (m, d+1) with a spare column (the
        flush's logit product takes ``[Q | −m]`` as it stands, rather than copying Q beside
        the stabilisers), K and V (n, d). Caches allocated, queue empty, counters zero, the
        entry limits set (inputs as :func:`checked_inputs` returns them); the caller fills the
        caches and takes the snapshot."""
        n, d = K.shape
        dt = K.dtype
        self._dtype, self._scale = dt, scale
        self._nq, self._n, self._d = len(QA), n, d
        self._Q_padded, self._K, self._V = QA, K, V
        Q = self._Q = QA[:, :d]
        self._qnorm = row_norms(Q)  # an infinite norm only disables a shortcut
        self._qnorm_max = float(self._qnorm.max(initial=0.0))  # Q never changes
        self._set_limits(EntryLimits(self._qnorm_max, scale, n, d, dt, GROWTH[dt]))
        self._views = {}
        for name, arr in (("Q", Q), ("K", K), ("V", V)):
            view = arr.view()
            view.flags.writeable = False  # users read K and V; only update methods write them
            self._views[name] = view
        self._cache = np.empty((self._nq, 2 * d + 2), dtype=dt)
        self._stabiliser = np.empty(self._nq, dtype=dt)
        self._work = Workspace(dt)
        self._contrib = Contributions(d, dt, self._qnorm_max)
        self._queue = PendingUpdates(K, V)
        self._log = self._queue.log  # the hot path appends to it directly
        self._pack = self._queue.pack = CorrectionPack(self._queue, scale, self._contrib)
        self._planner = QueryPlanner(n, d)
        self._schedule = FlushSchedule(policy)
        self._ask_policy_next()
        self._n_queries = self._n_flushes = 0
        self._refreshed: set[int] = set()  # cache rows refreshed since the last flush
        self.flush_log: deque[FlushEvent] = deque(maxlen=1000)
        # long enough to span many touched-row counts even with a query after every update
        # (256 spanned one flush cycle there, and a slope fitted over it flipped the choice)
        self.query_log: deque[QueryRecord] = deque(maxlen=2048)

    def _set_limits(self, limits: EntryLimits) -> None:
        self._limits = limits
        self._limit_k, self._limit_v = limits.k, limits.v  # for the hot paths
        self._limit_k2, self._limit_v2 = limits.squares["K"], limits.squares["V"]

    def copy(self, policy=None) -> LazyAttention:
        """An independent engine in the same state (arrays, caches, pending queue, counters),
        with its own ``policy`` (None: CostModel) and empty logs. O((m + n)·d), no rebuild."""
        self._drain_log()
        new = object.__new__(type(self))
        arrays = (check.aligned_copy(a) for a in (self._Q_padded, self._K, self._V))
        new._adopt(*arrays, self._scale, policy)
        new._queue.copy_state(self._queue)
        new._cache[...] = self._cache
        new._stabiliser[...] = self._stabiliser
        new._n_queries, new._n_flushes = self._n_queries, self._n_flushes
        new._plan_next_ask()
        return new

    # ------------------------------------------------------------------ properties
    n = property(lambda self: self._n, doc="Number of keys and values (rows of K and V).")
    m = property(lambda self: self._nq, doc="Number of queries (rows of Q and of the output).")
    d = property(lambda self: self._d, doc="Head dimension.")
    dtype = property(lambda self: self._dtype, doc="Working dtype (float32 or float64).")
    scale = property(lambda self: self._scale, doc="Logit scale.")
    Q = property(lambda self: self._views["Q"], doc="Queries (m, d), read-only view.")
    K = property(lambda self: self._views["K"], doc="Current keys (n, d), read-only view.")
    V = property(lambda self: self._views["V"], doc="Current values (n, d), read-only view.")
    pending = property(
        lambda self: self._queue.count + len(self._log),
        doc="Update actions since the last flush (an entry update or a row set counts one).",
    )
    n_updates = property(
        lambda self: self._queue.done + self._queue.count + len(self._log),
        doc="Update actions so far.",
    )
    n_queries = property(lambda self: self._n_queries, doc="Exact entries/rows queried so far.")
    n_flushes = property(lambda self: self._n_flushes, doc="Flushes so far (rebuilds included).")

    @property
    def touched_rows(self) -> int:
        """Distinct rows of K or V touched since the last flush, |S|."""
        self._drain_log()
        return len(self._queue.rows)

    @property
    def touched_k(self) -> frozenset[int]:
        """Rows of K changed since the last flush."""
        self._drain_log()
        return frozenset(self._queue.touched(self._queue.moved_k).tolist())

    @property
    def touched_v(self) -> frozenset[int]:
        """Rows of V changed since the last flush."""
        self._drain_log()
        return frozenset(self._queue.touched(self._queue.moved_v).tolist())

    @property
    def policy(self):
        """The flush policy; assign an int, callable or policy object to change it."""
        return self._schedule.policy

    @policy.setter
    def policy(self, value) -> None:
        self._schedule = FlushSchedule(value)
        self._ask_policy_next()

    @property
    def threshold(self) -> float:
        """The policy's current flush threshold (pending count that triggers a flush)."""
        self._ask_policy_next()  # asking may have moved it
        return float(self._schedule.ask(self)[0])

    @property
    def fresh_query_seconds(self) -> float:
        """Median seconds of the recent single exact queries computed afresh, O(n·d), or nan
        before any: what an exact entry costs at most, however much is pending (cost models
        cap their query cost with it)."""
        return self._planner.fresh_seconds

    @property
    def last_flush(self) -> FlushEvent | None:
        """The most recent flush, or None."""
        return self.flush_log[-1] if self.flush_log else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the engine's arrays (state and pending queue; the entry log, at most
        16,384 8-byte flags, aside)."""
        q, pack = self._queue, self._pack
        arrays = (
            self._Q_padded,
            self._K,
            self._V,
            q.K_flushed,
            q.V_flushed,
            self._cache,
            self._stabiliser,
        )
        arrays += (q.slot, q.moved, pack.Kp, pack.B)
        return sum(a.nbytes for a in arrays)

    @property
    def max_correction_rows(self) -> int:
        """Touched rows beyond which a flush rebuilds instead of correcting, when every touched
        row changed its key.

        A flush corrects each row with 2P·(3d+2) flops over its P packed entries (matrix
        products) against 6n·d to compute it afresh with its guards. A row whose key changed
        has two entries, one whose value alone changed one, so a flush corrects up to twice
        this many value-only rows.
        """
        return (3 * self._n * self._d - 1) // (2 * (3 * self._d + 2))

    @property
    def max_query_rows(self) -> int:
        """Touched rows beyond which exact queries compute their rows directly, O(n·d).

        A query is memory-bound: correcting a row reads the ~2|S| packed entries of 3d+2
        numbers, computing an entry afresh reads K and a column of V, about n·d numbers.
        """
        return self._planner.max_rows

    def correction_flops(self) -> float:
        """Flops to bring one output row up to date now (logits and contributions of the
        packed touched rows, or a fresh row past :attr:`max_query_rows`)."""
        self._drain_log()
        if not self._queue.rows:
            return 0.0
        if len(self._queue.rows) > self.max_query_rows:
            return 4.0 * self._n * self._d
        return 2.0 * len(self._get_pack()[0]) * (3 * self._d + 2)

    def query_flops(self, rows: int = 1) -> float:
        """Estimated flops of exact queries on ``rows`` distinct output rows now."""
        return rows * (self.correction_flops() + self._d)

    # ------------------------------------------------------------------ the queue and policy
    def _drain_log(self) -> None:
        """Queue the logged updates (see :meth:`PendingUpdates.settle`)."""
        if self._log and self._queue.settle():
            self._planner.forget_fresh_choice()
            self._plan_next_ask()

    def _ask_policy(self, undo=None) -> FlushEvent | None:
        """Flush if the policy's threshold is reached; else note when to ask it again. When
        the policy raises or answers nonsense, ``undo()`` takes back the update that asked."""
        queue, log = self._queue, self._log
        pending = queue.count + len(log)
        try:
            threshold, hold = self._schedule.ask(self)
            if pending >= threshold:
                self._before_flush()
        except BaseException:
            if undo is not None:
                undo()
            raise
        if pending >= threshold:
            return self._flush()
        if len(log) >= queue.max_log:
            self._drain_log()
        self._schedule.plan(pending, threshold, hold, queue.max_log - len(log))
        self._plan_next_ask()
        return None

    def _plan_next_ask(self) -> None:
        """Turn the schedule's pending count into the log length at which an entry update
        consults the policy: the hot path then counts nothing itself."""
        self._ask_at = self._schedule.check_at - self._queue.count

    def _ask_policy_next(self) -> None:
        self._schedule.check_at = 0
        self._plan_next_ask()

    def _get_pack(self) -> tuple[np.ndarray, np.ndarray, slice | np.ndarray | None]:
        """The touched rows packed, ``(Kp, B, new)``, caught up if behind (timed, per unit,
        for the planner). Callers settle the log first."""
        pack = self._pack
        if pack.behind:
            t0 = time.perf_counter()
            units = self._planner.catch_up_units(pack.rows_behind)
            pack.catch_up()
            self._planner.note_catch_up(time.perf_counter() - t0, units)
        return pack.views

    # ------------------------------------------------------------------ exact rows
    def _exact(
        self, idx, out_m=None, out_C=None, guards=True, snapshot=False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cache rows of query rows ``idx``, O(len(idx)·n·d); see ``exact_rows``. With
        ``snapshot``, as of the last flush (K and V from the snapshot): what the caches hold."""
        K, V = (self._queue.K_flushed, self._queue.V_flushed) if snapshot else (self._K, self._V)
        args = (self._Q, K, V, self._scale, self._contrib.growth, idx, self._work)
        return exact_rows(*args, out_m=out_m, out_C=out_C, guards=guards)

    def _store_exact(self) -> None:
        self._exact(np.arange(self._nq), out_m=self._stabiliser, out_C=self._cache)

    def _blocks(self, width: int):
        """Slices covering all m query rows, each about ``BLOCK_ELEMENTS / width`` rows."""
        step = max(1, BLOCK_ELEMENTS // max(1, width))
        for a in range(0, self._nq, step):
            yield slice(a, min(a + step, self._nq))

    def _current_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Exact current ``(stabilisers, cache rows)`` of ``idx`` (copies) and the count of
        rows recomputed because their correction would have lost precision.

        O(len(idx)·|S|·d), or O(len(idx)·n·d) past :attr:`max_query_rows` (twice that for
        many rows at once: matrix products are compute-bound, and a fresh row without guards
        costs 4n·d flops against 4|S|·(3d+2) to correct it), where the guard columns are zero.
        """
        self._drain_log()
        S = len(self._queue.rows)
        limit = self.max_query_rows * (1 if len(idx) < MANY_ROWS else 2)
        if limit < S:
            m, C = self._exact(idx, guards=False)
            return m, C, 0
        m, C = self._stabiliser[idx], self._cache[idx]
        if S == 0:
            return m, C, 0
        self._get_pack()
        bad = self._corrected(idx, m, C)
        refreshed = 0
        if bad.any():
            pos = np.flatnonzero(bad)
            fresh = self._refresh(idx[pos])
            if fresh.any():  # corrected again from their refreshed cache rows
                refreshed = int(fresh.sum())
                pos = pos[fresh]
                sub = idx[pos]
                m_sub, C_sub = self._stabiliser[sub], self._cache[sub]
                bad[pos] = self._corrected(sub, m_sub, C_sub)
                m[pos], C[pos] = m_sub, C_sub
        if bad.any():
            m[bad], C[bad] = self._exact(idx[bad])
        return m, C, refreshed + int(bad.sum())

    def _corrected(self, idx: np.ndarray, m: np.ndarray, C: np.ndarray) -> np.ndarray:
        """Correct copies ``(m, C)`` of the cache rows ``idx`` in place; returns the rows that
        lost precision (see ``correct_rows``)."""
        QA, qnorm = self._Q_padded[idx], self._qnorm[idx]
        return correct_rows(QA, qnorm, self._qnorm_max, m, C, self._pack)

    def _refresh(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows``, whose corrections lost precision, were not refreshed since the
        last flush (bool, shape (len(rows),)): those are recomputed exactly as of that flush
        into the caches. O(len·n·d), what computing them afresh costs.

        A row near its guards' limit, pushed over by the pending corrections, then takes them
        again at every later query instead of being computed afresh each time until the next
        flush (which no longer needs to repair it); a row whose pending corrections alone
        cancel too much (a dominant key removed) is refreshed once, in vain. The stale view
        keeps its meaning (the caches as of the last flush), more precisely.
        """
        done = self._refreshed
        fresh = np.array([r not in done for r in rows.tolist()], dtype=bool)
        if fresh.any():
            rows = rows[fresh]
            done.update(rows.tolist())
            self._stabiliser[rows], self._cache[rows] = self._exact(rows, snapshot=True)
        return fresh

    # ------------------------------------------------------------------ flush
    def flush(self) -> FlushEvent | None:
        """Apply every pending update to the caches; None when nothing is pending.

        An incremental flush corrects all m rows at once over the touched rows S with two
        matrix products, ``O(m·|S|·d)``; when S is so large that recomputing is cheaper, the
        engine rebuilds instead, ``O(m·n·d)``. Rows that would lose precision are recomputed.
        A policy's ``before_flush`` that raises stops it before anything changes.
        """
        self._before_flush()
        return self._flush()

    def _before_flush(self, rebuild: bool = False) -> None:
        """The policy's optional ``before_flush(updates)``, before anything changes (and may
        raise): before every flush with something pending, and before every rebuild."""
        hook = self._schedule.before_flush
        if hook is not None and (rebuild or self.pending):
            hook(self.pending)

    def _flush(self) -> FlushEvent | None:
        self._drain_log()
        if not self._queue.rows:
            return None
        t0 = time.perf_counter()
        S, n, d = len(self._queue.rows), self._n, self._d
        # correcting a row costs 2P(3d+2) flops over the P packed entries (P ≥ |S|, so past
        # the first test nothing is packed), recomputing it with its guards 6n·d
        P = len(self._get_pack()[0]) if S * (3 * d + 2) <= 3 * n * d else None
        if P is not None and P * (3 * d + 2) <= 3 * n * d:
            repaired = self._correct_all(P)
            flops = 2.0 * self._nq * P * (3 * d + 2) + 6.0 * repaired * n * d
            return self._record("incremental", flops, repaired, t0)
        self._store_exact()
        return self._record("rebuild", 6.0 * self._nq * n * d, 0, t0)

    def _correct_all(self, entries: int) -> int:
        """Correct every cache row in place, block by block; returns the rows repaired."""
        repaired = 0
        for blk in self._blocks(entries):
            m, C = self._stabiliser[blk], self._cache[blk]
            bad = correct_rows(
                self._Q_padded[blk], self._qnorm[blk], self._qnorm_max, m, C, self._pack, self._work
            )
            if bad.any():
                rows = np.arange(blk.start, blk.stop)[bad]
                self._stabiliser[rows], self._cache[rows] = self._exact(rows)
                repaired += len(rows)
        return repaired

    def rebuild(self) -> FlushEvent:
        """Recompute every cache row exactly, ``O(m·n·d)``; also clears the pending queue."""
        self._before_flush(rebuild=True)
        t0 = time.perf_counter()
        self._drain_log()
        self._store_exact()
        return self._record("rebuild", 6.0 * self._nq * self._n * self._d, 0, t0)

    def _record(self, kind: str, flops: float, repaired: int, t0: float) -> FlushEvent:
        seconds = time.perf_counter() - t0
        self._n_flushes += 1
        queue = self._queue
        rows = np.array(queue.rows, dtype=np.intp)  # converted once, not at each use
        event = FlushEvent(
            index=self._n_flushes,
            at_update=self.n_updates,
            updates=self.pending,
            rows=len(rows),
            k_rows=int(queue.moved_k[rows].sum()),
            v_rows=int(queue.moved_v[rows].sum()),
            flops=flops,
            seconds=seconds,
            kind=kind,
            repaired=repaired,
        )
        queue.clear(rows)
        self._pack.clear()
        self._refreshed.clear()
        self._planner.forget_fresh_choice()
        self._ask_policy_next()  # a flush may change the policy's answer
        self.flush_log.append(event)
        if self._schedule.on_flush is not None:
            self._schedule.on_flush(event)
        return event

    def __repr__(self) -> str:
        shape = f"m={self._nq}, n={self._n}" if self._nq != self._n else f"n={self._n}"
        return (
            f"LazyAttention({shape}, d={self._d}, dtype={self._dtype}, scale={self._scale:.4g}, "
            f"pending={self.pending}, touched_rows={self.touched_rows}, "
            f"flushes={self._n_flushes}, policy={self.policy!r})"
        )
