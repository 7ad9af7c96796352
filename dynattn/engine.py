"""Exact lazy maintenance of softmax attention under updates to K and V.

Attention is ``O = softmax(scale · Q Kᵀ) V``: with ``A = exp(scale · Q Kᵀ)`` and
``D = diag(A · 1)``, the weights are ``P = D⁻¹ A`` and the output ``O = P V``.

:class:`LazyAttention` never forms an n×n array. Per row ``i`` it caches a stabiliser ``m_i``,
the numerator ``N_i = Σ_j ã_ij v_j`` and the denominator ``s_i = Σ_j ã_ij`` with
``ã_ij = exp(scale · q_i·k_j − m_i)``. Updates to K or V change K and V at once but only *queue*
the touched rows S. A query corrects the stale cache row exactly, in ``O(|S|·d)``, by adding the
touched rows' new contributions and removing their old ones; a flush applies the same
correction to every row as two matrix products (BLAS-3), ``O(n·|S|·d)``.

The old contributions come from a snapshot of K and V as of the last flush (2·n·d numbers,
brought in step with K and V at each flush, O(|S|·d)). It costs memory and buys cheap updates:
an update never copies what it overwrites: an entry update or a row write is the write and its
row logged, queued later with the rest of the log, vectorised. When queries are rare and
computed afresh (O(n·d), cheaper than catching corrections up on many touched rows), the engine
costs what a strategy without caches would, plus the log.

Precision is guarded rather than hoped for: each cache row also carries guards comparing the
mass that removals have taken out with the natural scale of what is left (``s_i`` and
``Σ_j ã_ij |v_j|``). When the removed mass exceeds ``g`` times what is left (a dominant key
changed, a value went up by 1e8 and back, or many flushes piled up), subtraction would have
lost digits, so that row is recomputed exactly in ``O(n·d)``. The stabiliser is rescaled
(online softmax) wherever a new logit may exceed it by more than 16, as bounded by
Cauchy–Schwarz (``|q_i|·|k_j|``), so every exponential stays below e^16 and logits of any
magnitude neither overflow nor give NaN.
"""

from __future__ import annotations

import math
import statistics
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _validate as V_
from ._blas import add_product
from .policies import as_policy
from .reference import entry_from_scratch

__all__ = ["ErrorReport", "FlushEvent", "LazyAttention"]

# g: removed mass may grow to this multiple of the remaining mass before a row is recomputed.
# The incremental error is about unit-roundoff × (1 + 2·removed/remaining), so these bound it
# near 5e-13 (float64) and 8e-6 (float32) of the entry's natural scale.
_GROWTH = {np.dtype(np.float64): 1024.0, np.dtype(np.float32): 64.0}

# From this many rows on, corrections and fresh rows are matrix products (compute-bound)
# rather than matrix-vector products (memory-bound); see LazyAttention._current_rows.
_MANY_ROWS = 16

# Corrections skip rescaling a row to its new maximum logit while Cauchy–Schwarz keeps every
# new logit below m + this: exponentials up to e^16 overflow nothing, even in float32.
_SHIFT_SLACK = 16.0

# Rows per block when a computation runs over every row: bounds temporaries to a few MB.
_BLOCK_ELEMENTS = 1 << 20

# Corrections exponentiate in base 2: numpy's exp2 takes 0.28 ns an element in float32 where
# exp takes 0.46 (and is as accurate: within 1 ulp, exp 2.5), 0.62 against 0.67 in float64;
# the factor log2(e) rides in the logit product for free.
_LOG2E = math.log2(math.e)


class ErrorReport(NamedTuple):
    """Error of the stale (cached) output against the exact current output.

    Attributes
    ----------
    relative : float
        ``‖O_stale − O‖_F / ‖O‖_F`` (0 when both are zero).
    max_abs : float
        ``max |O_stale − O|``.
    """

    relative: float
    max_abs: float


@dataclass(frozen=True)
class FlushEvent:
    """What one flush did.

    Attributes
    ----------
    index : int
        Flush number, from 1.
    at_update : int
        The engine's update counter when the flush ran.
    updates : int
        Pending update actions the flush applied.
    rows : int
        Distinct touched rows |S| (rows of K or V).
    k_rows, v_rows : int
        Touched rows of K and of V.
    flops : float
        Floating-point operations, estimated from the shapes.
    seconds : float
        Wall time of the flush.
    kind : str
        ``"incremental"`` (low-rank correction over S) or ``"rebuild"`` (exact recompute,
        chosen when it is cheaper or asked for).
    repaired : int
        Rows recomputed exactly because the incremental result would have lost precision.
    """

    index: int
    at_update: int
    updates: int
    rows: int
    k_rows: int
    v_rows: int
    flops: float
    seconds: float
    kind: str
    repaired: int


class _Pack:
    """The touched rows packed for one product: logits ``Q[I] @ Kp.T``, contributions ``@ B``.

    Entries ``Kp`` (P, d) hold keys pre-multiplied by the scale, ``B`` (P, 2d+2) the matching
    contributions to the cache columns ``[N | s | guards]``. A row whose key changed has two
    entries: its new key with ``[v, 1, −g, −g|v|]`` and its old key with
    ``[−v_old, −1, 1+g, (1+g)|v_old|]``; a row whose value alone changed has one (its logit
    did not move): ``[v − v_old, 0, 0, (1+g)|v_old| − g|v|]`` (g the growth bound). So one
    product adds new contributions, removes old ones and moves the guards. Entries are
    appended as rows are touched, in any order. When a value-only row's key changes too, its
    entry is zeroed (a dead entry: its old key keeps the exponential finite) and the row is
    appended again with a new and an old entry, so P ≤ 3|S|. ``newpos`` lists the new-key
    entries (the only logits that can exceed a row's stabiliser) and ``new`` selects them: a
    slice while they are contiguous (a view, no copy of the logits), else ``newpos``, or None.
    """

    def __init__(self, d: int, dtype: np.dtype):
        self.Kp = np.empty((0, d), dtype=dtype)
        self.B = np.empty((0, 2 * d + 2), dtype=dtype)
        self.clear()

    def clear(self) -> None:
        """Empty, keeping the capacity: regrowing after every flush cost 15 % of packing."""
        self.size = 0  # entries in use
        self.slots = 0  # touched rows (slots 0..slots-1) packed
        self.entry: list[int] = []  # per slot: its new-key or value-only entry
        self.keyed: list[bool] = []  # per slot: packed as a row whose key changed
        self.newpos = np.empty(0, dtype=np.int64)
        self.new: slice | np.ndarray | None = None
        self.knorm = 0.0  # bound on the norms of the new-key entries
        self.aug: np.ndarray | None = None  # [Kp | 1] for products that subtract m
        self.dirty: set[int] = set()  # packed slots (< slots) updated since
        self.requeue: list[int] = []  # packed slots to append again (role change)
        self.views = (self.Kp[:0], self.B[:0], None)  # (Kp, B, new) in use (_get_pack)

    def reserve(self, size: int) -> None:
        """Capacity for ``size`` entries (appends are amortised O(d))."""
        self.Kp = _grown(self.Kp, self.size, size)
        self.B = _grown(self.B, self.size, size)


def _grown(arr: np.ndarray, used: int, size: int) -> np.ndarray:
    """``arr`` with room for ``size`` rows and its first ``used`` rows kept: the capacity
    doubles, so appending is amortised O(1) a row. The new rows are left unwritten
    (``np.resize`` would fill them, touching every fresh page at once)."""
    if size <= len(arr):
        return arr
    new = V_.aligned_empty((max(2 * len(arr), size, 16), arr.shape[1]), arr.dtype)
    new[:used] = arr[:used]
    return new


class _Norm:
    """A Frobenius norm accumulated block by block, as LAPACK's nrm2 does: the largest
    magnitude so far and the sum of squares relative to it, so tiny or huge entries neither
    underflow to 0 (outputs of 1e-200 would report an infinite relative error) nor overflow.
    """

    def __init__(self):
        self.scale = 0.0  # max |x| so far
        self.ssq = 0.0  # Σ (x / scale)²

    def add(self, x: np.ndarray) -> None:
        big = float(np.abs(x).max()) if x.size else 0.0
        if big == 0.0:
            return
        if big > self.scale:
            self.ssq *= (self.scale / big) ** 2
            self.scale = big
        y = x / self.scale
        self.ssq += float(np.vdot(y, y))

    def __truediv__(self, other: _Norm) -> float:
        """``‖self‖ / ‖other‖`` without forming either (inf past the float range)."""
        with np.errstate(over="ignore"):
            return float(np.float64(self.scale) / other.scale * math.sqrt(self.ssq / other.ssq))


def _max_norm(rows: np.ndarray) -> float:
    """Largest Euclidean norm among ``rows`` (0 for none; inf if a norm overflows)."""
    if not len(rows):
        return 0.0
    if len(rows) == 1:  # a catch-up after one update: vdot neither warns nor needs errstate
        return math.sqrt(np.vdot(rows, rows))
    with np.errstate(over="ignore"):
        return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max()))


def _entry_update(which: str):
    """``LazyAttention.update_k`` or ``update_v``: written once for both, and bound to its array
    here rather than passing it on to a shared method, a call that cost 0.05 µs of 0.7."""
    on_k = which == "K"

    def update(self, i, j, delta) -> FlushEvent | None:
        # the single update is the hot path of every stream: scalar work and a log entry only;
        # its row joins the queue at the next read (_settle), with the others, vectorised
        n = self._n
        i = V_.check_index("i", i, n)
        j = V_.check_index("j", j, self._d)
        target = self._K if on_k else self._V
        _, new = V_.entry_sum(which, target, i, j, V_.check_scalar("delta", delta, self._dtype))
        target[i, j] = new
        log = self._log
        log.append(i if on_k else n + i)
        if len(log) >= self._ask_at:
            return self._consult()
        return None

    return _method(
        update,
        f"update_{which.lower()}",
        f"Add ``delta`` to ``{which}[i, j]``; logged, O(1). Returns the flush it caused, if any.",
    )


def _row_update(which: str):
    """``LazyAttention.set_k_row`` or ``set_v_row``, as :func:`_entry_update`: the write, and
    the row logged, as an entry update's is (queued with the log; the snapshot holds what it
    overwrote). Queueing the row here, in scalars, cost 0.3-0.5 µs more, a third of the
    write's own cost."""
    on_k = which == "K"

    def update(self, i, row) -> FlushEvent | None:
        n = self._n
        i = V_.check_index("i", i, n)
        (self._K if on_k else self._V)[i] = V_.as_vector("row", row, self._d, self._dtype)
        log = self._log
        log.append(i if on_k else n + i)
        if len(log) >= self._ask_at:
            return self._consult()
        return None

    return _method(
        update,
        f"set_{which.lower()}_row",
        f"Replace ``{which}[i]`` by ``row`` (shape (d,)); one update action, O(d), "
        "logged. Returns the flush it caused, if any.",
    )


def _method(func, name: str, doc: str):
    """``func`` named and documented as the method ``LazyAttention.<name>``."""
    func.__name__, func.__qualname__, func.__doc__ = name, f"LazyAttention.{name}", doc
    return func


class LazyAttention:
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
        ``on_flush(event)``) or a callable ``engine -> float`` works. The engine flushes when
        the pending update count reaches the threshold.

    Notes
    -----
    Costs, with S the touched rows: an entry update is O(1) (a write and a log entry; its row is
    queued later, amortised O(1)), a row update O(d), an exact query O(|S|·d) (O(n·d) when
    that is cheaper), a flush O(n·|S|·d) in two matrix products, a rebuild O(n²·d) in row
    blocks. Memory is O(n·d): Q, K, V, the snapshot of K and V as of the last flush and the
    caches (about 8·n·d numbers in all), O(n) flags and at most 16,384 logged entries (128 KB;
    the log is queued then); no n×n array is formed.

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

    # Bringing the pack up to date costs about as much as a fresh query reading 150,000
    # elements of K, plus 10,000 per row (gathers, fills, first writes to new pages): measured
    # 30-40 µs + 1.4-2.1 µs a row, against 0.09-0.24 ns an element, at n = 4,096-16,384, d = 64.
    # The ratio varies with dtype and n (float32 halves a fresh query's traffic, not the
    # overhead), so once both have been timed in this engine, the measured ratio scales it.
    _pack_cost = (150_000, 10_000)

    # Logged entry updates up to _short_log are queued one by one (NumPy's ~1 µs a call would
    # dominate), more in vectorised passes; the log is queued when it reaches _max_log entries,
    # so its memory stays bounded whatever the policy. Queueing it runs cold, among updates
    # (~100 µs for 4,096 entries, 30 warm), so a long log makes it rare: at 4,096 it was 0.05 µs
    # of an update that costs 0.8-1.
    _short_log = 16
    _max_log = 16384

    def __init__(self, Q, K, V, *, scale=None, dtype=None, policy=None):
        dt = V_.resolve_dtype(dtype, Q, K, V)
        Qa = V_.as_matrix("Q", Q, dt, pad=1)
        d = Qa.shape[1] - 1
        Ka = V_.as_matrix("K", K, dt)
        if Ka.shape[1] != d:
            raise ValueError(f"K has shape {Ka.shape}; expected (n, {d}): as many columns as Q")
        Va = V_.as_matrix("V", V, dt, shape=Ka.shape)
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        scale = V_.check_scalar("scale", scale, dt)
        if scale == 0:
            raise ValueError("scale=0 makes every row uniform; use a nonzero scale")
        self._adopt(Qa, Ka, Va, scale, as_policy(policy))
        self._store_exact()
        # the snapshot is made after the build and its scratch block are gone, while the
        # caller's inputs may still be alive: this keeps the peak at n = 50,000 under 300 MB
        self._buffers.clear()
        self._K0, self._V0 = V_.aligned_copy(Ka), V_.aligned_copy(Va)

    def _adopt(self, QA, K, V, scale: float, policy) -> None:
        """Take owned, validated arrays, Q with a spare column, ``QA = [Q | ·]`` of shape
        (m, d+1), K and V (n, d); caches allocated, queue empty, counters zero. The caller sets
        the snapshot ``_K0``, ``_V0`` (K and V as the caches describe them)."""
        n, d = K.shape
        dt = K.dtype
        self._policy = policy
        self._dtype = dt
        self._nq = len(QA)  # query rows: rows of Q, of the caches and of the output
        self._n, self._d = n, d
        self._scale = scale
        self._growth = _GROWTH[dt]
        # s and its guard for a new and an old entry (_fill_new, _fill_old): as arrays, since
        # a tuple is converted at every call, and a catch-up after one update is all such calls
        self._marks = (
            np.array([1, -self._growth], dtype=dt),
            np.array([-1, 1 + self._growth], dtype=dt),
        )
        self._max_query_rows = (n * d) // (2 * (3 * d + 2))  # see max_query_rows
        # the flush's logit product takes [Q | −m] as it stands: the stabilisers are written
        # into the spare column rather than the queries copied beside them (3-5 % of a flush)
        self._QA = QA
        Q = self._Q = QA[:, :d]
        self._K, self._V = K, V
        with np.errstate(over="ignore"):  # an infinite norm only disables a shortcut
            self._qnorm = np.sqrt(np.einsum("ij,ij->i", Q, Q))
        self._qnorm_max = float(self._qnorm.max(initial=0.0))  # Q never changes
        self._views = {}
        for name, arr in (("Q", Q), ("K", K), ("V", V)):
            view = arr.view()
            view.flags.writeable = False  # users read K and V; only update methods write them
            self._views[name] = view
        # cache columns: N (d) | s | guard of s | guard of N (d); see _lost_precision
        self._C = np.empty((self._nq, 2 * d + 2), dtype=dt)
        self._m = np.empty(self._nq, dtype=dt)
        self._buffers: dict[str, np.ndarray] = {}
        self._K0, self._V0 = K, V  # the caller replaces them by copies: the snapshot
        self._slot = np.full(n, -1, dtype=np.intp)  # per row: its slot in the queue, or -1
        self._rows: list[int] = []  # the touched rows, in slot order
        # per row: its key changed since the flush (_moved_k), its value (_moved_v)
        self._moved = np.zeros(2 * n, dtype=bool)
        self._moved_k, self._moved_v = self._moved[:n], self._moved[n:]
        self._done = 0  # update actions applied by flushes; n_updates adds the pending ones
        # the rows of the updates not yet queued, as flags (K's row i, V's n + i: the index of
        # its flag in _moved), in an array of int64: as cheap to append to as a list, and
        # NumPy reads it at once (a list of 4,096 took 58 µs to convert, 14 ns an update)
        self._log = array("q")
        self._pack = _Pack(d, dt)
        self._reset_pending()
        self._n_queries = 0
        self._fresh_count, self._fresh_mark = 0, 0  # see _prefers_fresh
        self._n_flushes = 0
        self.flush_log: deque[FlushEvent] = deque(maxlen=1000)
        # (touched rows, entries answered, seconds) of recent exact queries, for cost models;
        # long enough to span many touched-row counts even with a query after every update
        # (256 spanned one flush cycle there, and a slope fitted over it flipped the choice)
        self.query_log: deque[tuple[int, int, float]] = deque(maxlen=2048)
        self._fresh_log: deque[float] = deque(maxlen=32)  # seconds of entries computed afresh
        self._catch_log: deque[float] = deque(maxlen=32)  # seconds per _pack_cost unit caught up
        self._catch_ratio = math.nan  # see _measure_catch_ratio
        # seconds of one _pack_cost unit, an element read by a fresh query: as last measured
        # (_measure_catch_ratio), 0.25 ns before
        self._unit_s = 2.5e-10
        self._n_fresh = self._n_catch = 0

    def copy(self, policy=None) -> LazyAttention:
        """An independent engine in the same state (arrays, caches, pending queue, counters),
        with its own ``policy`` (None: CostModel) and empty logs. O(n·d), no rebuild."""
        self._settle()
        new = object.__new__(type(self))
        new._adopt(
            *(V_.aligned_copy(a) for a in (self._QA, self._K, self._V)),
            self._scale,
            as_policy(policy),
        )
        new._K0, new._V0 = V_.aligned_copy(self._K0), V_.aligned_copy(self._V0)
        new._C[...] = self._C
        new._m[...] = self._m
        new._pending, new._done = self._pending, self._done
        new._n_queries, new._n_flushes = self._n_queries, self._n_flushes
        new._slot[...] = self._slot
        new._rows = list(self._rows)
        new._moved[...] = self._moved
        return new

    # ------------------------------------------------------------------ properties
    n = property(lambda self: self._n, doc="Number of keys and values (rows of K and V).")
    m = property(lambda self: self._nq, doc="Number of queries (rows of Q and of the output).")
    d = property(lambda self: self._d, doc="Head dimension.")
    dtype = property(lambda self: self._dtype, doc="Working dtype (float32 or float64).")
    scale = property(lambda self: self._scale, doc="Logit scale.")
    Q = property(lambda self: self._views["Q"], doc="Queries (n, d), read-only view.")
    K = property(lambda self: self._views["K"], doc="Current keys (n, d), read-only view.")
    V = property(lambda self: self._views["V"], doc="Current values (n, d), read-only view.")
    pending = property(
        lambda self: self._pending + len(self._log),
        doc="Update actions since the last flush (an entry update or a row set counts one).",
    )
    n_updates = property(lambda self: self._done + self.pending, doc="Update actions so far.")
    n_queries = property(lambda self: self._n_queries, doc="Exact entries/rows queried so far.")
    n_flushes = property(lambda self: self._n_flushes, doc="Flushes so far (rebuilds included).")

    @property
    def touched_rows(self) -> int:
        """Distinct rows of K or V touched since the last flush, |S|."""
        self._settle()
        return len(self._rows)

    @property
    def touched_k(self) -> frozenset[int]:
        """Rows of K changed since the last flush."""
        return frozenset(self._moved_rows(self._moved_k).tolist())

    @property
    def touched_v(self) -> frozenset[int]:
        """Rows of V changed since the last flush."""
        return frozenset(self._moved_rows(self._moved_v).tolist())

    def _moved_rows(self, moved: np.ndarray) -> np.ndarray:
        """The queued rows flagged in ``moved`` (``_moved_k`` or ``_moved_v``), O(|S|)."""
        self._settle()
        rows = np.array(self._rows, dtype=np.intp)
        return rows[moved[rows]]

    @property
    def policy(self):
        """The flush policy; assign an int, callable or policy object to change it."""
        return self._policy

    @policy.setter
    def policy(self, value) -> None:
        self._policy = as_policy(value)
        self._ask_policy_next()

    @property
    def threshold(self) -> float:
        """The policy's current flush threshold (pending count that triggers a flush)."""
        self._ask_policy_next()  # asking may have moved it
        return float(self._policy.threshold(self))

    @property
    def fresh_query_seconds(self) -> float:
        """Median seconds of the recent single exact queries computed afresh, O(n·d), or nan
        before any: what an exact entry costs at most, however much is pending (cost models
        cap their query cost with it)."""
        return statistics.median(self._fresh_log) if self._fresh_log else math.nan

    @property
    def last_flush(self) -> FlushEvent | None:
        """The most recent flush, or None."""
        return self.flush_log[-1] if self.flush_log else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the engine's arrays (state and pending queue; the entry log, at most
        ``_max_log`` 8-byte flags, aside)."""
        arrays = (
            self._QA,
            self._K,
            self._V,
            self._K0,
            self._V0,
            self._C,
            self._m,
            self._slot,
            self._moved,
            self._pack.Kp,
            self._pack.B,
        )
        return sum(a.nbytes for a in arrays)

    # ------------------------------------------------------------------ updates
    update_k = _entry_update("K")
    update_v = _entry_update("V")

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
        return self._update_entries(self._K, self._moved_k, rows, cols, deltas)

    def update_v_many(self, rows, cols=None, deltas=None) -> FlushEvent | None:
        """Add ``deltas`` to ``V[rows, cols]``; see :meth:`update_k_many`."""
        return self._update_entries(self._V, self._moved_v, rows, cols, deltas)

    set_k_row = _row_update("K")
    set_v_row = _row_update("V")

    def set_k_rows(self, rows, values) -> FlushEvent | None:
        """Replace ``K[rows]`` by ``values`` (shape (m, d)); m update actions, all or nothing."""
        return self._set_rows(self._K, self._moved_k, rows, values)

    def set_v_rows(self, rows, values) -> FlushEvent | None:
        """Replace ``V[rows]`` by ``values`` (shape (m, d)); m update actions, all or nothing."""
        return self._set_rows(self._V, self._moved_v, rows, values)

    def _update_entries(self, target, moved, rows, cols, deltas):
        which = "K" if target is self._K else "V"
        if cols is None and deltas is None:
            r, c, dl = self._split_tuples(rows)
        elif cols is None or deltas is None:
            raise TypeError(
                f"update_{which.lower()}_many needs rows, cols and deltas, or one "
                "sequence of (i, j, delta) tuples"
            )
        else:
            r = V_.as_indices("rows", rows, self._n)
            c = V_.as_indices("cols", cols, self._d)
            if len(c) != len(r):
                raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
            dl = V_.as_vector("deltas", deltas, len(r), self._dtype)
        flat, final = V_.entry_sums(which, target, r, c, dl)
        self._touch(r, moved)
        target.ravel()[flat] = final
        return self._counted(len(r))

    def _split_tuples(self, updates):
        """Checked columns ``(rows, cols, deltas)`` of a sequence of ``(i, j, delta)``: checked
        as a whole, item by item only to name the first bad item in the error."""
        try:
            items = list(updates)
        except TypeError:
            raise TypeError(f"updates={updates!r} must be a sequence of (i, j, delta)") from None
        if not items:
            raise ValueError("updates is empty; pass at least one (i, j, delta)")
        try:
            rows, cols, deltas = zip(*items, strict=True)
        except (TypeError, ValueError):
            k = next(
                k for k, u in enumerate(items) if not (isinstance(u, (tuple, list)) and len(u) == 3)
            )
            raise ValueError(f"updates[{k}]={items[k]!r} is not an (i, j, delta) triple") from None
        out = []
        for pos, (name, values, bound) in enumerate((("i", rows, self._n), ("j", cols, self._d))):
            arr = np.asarray(values)
            if arr.dtype.kind not in "iu" or ((arr < 0) | (arr >= bound)).any():
                arr = np.array(
                    [
                        V_.check_index(f"updates[{k}][{pos}] ({name})", v, bound)
                        for k, v in enumerate(values)
                    ]
                )
            out.append(arr.astype(np.int64, copy=False))
        dl = np.asarray(deltas)
        ok = dl.dtype.kind in "biuf"
        if ok:
            with np.errstate(over="ignore"):  # a delta too large for float32 is named below
                dl = dl.astype(self._dtype)
            ok = np.isfinite(dl).all()
        if not ok:
            dl = np.array(
                [
                    V_.check_scalar(f"updates[{k}][2] (delta)", v, self._dtype)
                    for k, v in enumerate(deltas)
                ],
                dtype=self._dtype,
            )
        return out[0], out[1], dl

    def _set_rows(self, target, moved, rows, values):
        r = V_.as_indices("rows", rows, self._n)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row; a row can be set once per call")
        vals = V_.as_matrix("values", values, self._dtype, shape=(len(r), self._d))
        self._touch(r, moved)
        target[r] = vals
        return self._counted(len(r))

    def _touch(self, rows: np.ndarray, moved: np.ndarray) -> None:
        """Queue ``rows`` of K (``moved`` is ``_moved_k``) or V and flag them, O(len(rows))."""
        self._queue(rows)
        moved[rows] = True

    def _queue(self, rows: np.ndarray) -> None:
        """Give the rows new to the queue a slot, vectorised, and mark the packed ones for a
        refresh. The caller flags the rows in ``_moved_k`` or ``_moved_v``."""
        slot = self._slot
        had = slot[rows]
        new = rows[had < 0]
        # one of each new row without sorting: of repeated writes to a row, exactly one lands
        ticket = np.arange(len(new))
        slot[new] = ticket
        fresh = new[slot[new] == ticket]
        if len(fresh):
            start = len(self._rows)
            slot[fresh] = np.arange(start, start + len(fresh))
            self._rows.extend(fresh.tolist())
        packed = self._pack.slots
        if packed:
            self._pack.dirty.update(had[(had >= 0) & (had < packed)].tolist())

    def _settle(self) -> None:
        """Queue the rows of the logged entry updates: a short log (a query after each
        update) one by one in scalars, where NumPy's ~1 µs a call would dominate, a longer one
        vectorised."""
        log = self._log
        if not log:
            return
        self._fresh_log_len = math.inf  # see _choose_direct
        self._pending += len(log)
        n, moved = self._n, self._moved
        if len(log) <= self._short_log:
            slot, pack = self._slot, self._pack
            for flag in log:
                i = flag - n if flag >= n else flag
                k = slot.item(i)
                if k < 0:
                    slot[i] = len(self._rows)
                    self._rows.append(i)
                elif k < pack.slots:
                    pack.dirty.add(k)
                moved[flag] = True
        else:
            flags = np.array(log, dtype=np.intp)  # a copy, from the log's buffer
            moved[flags] = True
            self._queue(flags - n * (flags >= n))
        del log[:]
        self._arm()

    def _counted(self, count: int) -> FlushEvent | None:
        """Count ``count`` update actions; ask the policy once its last answer has run out."""
        self._pending += count
        if self._pending + len(self._log) >= self._check_at:
            return self._consult()
        self._ask_at -= count  # _arm, for what just changed
        return None

    def _consult(self) -> FlushEvent | None:
        """Flush if the policy's threshold is reached; else note when to ask it again.

        Asking after every update costs as much as the update: a policy that can tell how long
        its threshold holds (``valid_until(engine)``, an update count) is asked again only
        then, or at the threshold. The log is settled at ``_max_log`` entries, so its memory
        stays bounded whatever the policy does.
        """
        policy = self._policy
        threshold = policy.threshold(self)
        pending = self.pending
        if pending >= threshold:
            return self.flush()
        until = getattr(policy, "valid_until", None)
        hold = until(self) - self.n_updates if until is not None else 0
        hold = min(hold, self._max_log) if hold >= 0 else 0  # NaN or past: ask next update
        if len(self._log) >= self._max_log:
            self._settle()
        ask = pending + 1 + hold
        ask = min(ask, pending + self._max_log - len(self._log))
        self._check_at = threshold if threshold < ask else ask
        self._arm()
        return None

    def _arm(self) -> None:
        """Turn ``_check_at`` (a pending count) into the log length at which an entry update
        consults the policy: the hot path then counts nothing itself."""
        self._ask_at = self._check_at - self._pending

    def _ask_policy_next(self) -> None:
        self._check_at = 0
        self._arm()

    def _reset_pending(self, rows: np.ndarray | None = None) -> None:
        """Empty the queue; ``rows``: its rows as an index array, if the caller made one."""
        self._pending = 0
        self._ask_policy_next()  # a flush may change the policy's answer
        if rows is None:  # converted once, not at each use
            rows = np.array(self._rows, dtype=np.intp)
        self._slot[rows] = -1  # O(|S|), not O(n)
        # the flushed rows' values are now the caches' values
        for moved, now, then in (
            (self._moved_k, self._K, self._K0),
            (self._moved_v, self._V, self._V0),
        ):
            changed = rows[moved[rows]]
            then[changed] = now[changed]
            moved[rows] = False
        self._rows = []
        del self._log[:]
        self._fresh_log_len = math.inf  # see _choose_direct
        self._pack.clear()

    # ------------------------------------------------------------------ the correction
    def _get_pack(self) -> tuple[np.ndarray, np.ndarray, slice | np.ndarray | None]:
        """The touched rows packed for one product (see :class:`_Pack`): ``(Kp, B, new)``.

        Kept up to date incrementally: rows touched since the last use are appended, rows
        updated again are patched in place, so a query after a few new updates costs
        O(new rows·d) here rather than O(|S|·d). Callers settle the log first. A catch-up is
        timed, per ``_pack_cost`` unit, for :meth:`_prefers_fresh`.
        """
        pack = self._pack
        if pack.dirty or pack.slots < len(self._rows) or pack.requeue:
            t0 = time.perf_counter()
            units = self._catch_up_units()
            pack.aug = None
            if pack.dirty:
                self._patch(pack)
            if pack.slots < len(self._rows) or pack.requeue:
                slots = list(range(pack.slots, len(self._rows))) + pack.requeue
                pack.requeue = []
                self._append(pack, slots)
            self._catch_log.append((time.perf_counter() - t0) / units)
            self._n_catch += 1
            if self._n_catch <= 3 or self._n_catch % 16 == 0:
                self._measure_catch_ratio()
            pack.views = (pack.Kp[: pack.size], pack.B[: pack.size], pack.new)
        return pack.views

    def _append(self, pack: _Pack, slots: list[int]) -> None:
        """Pack entries for ``slots`` (new to the pack, or re-queued after a role change).

        Plain lists and skipped empty groups: a query after one update packs one row, where
        NumPy's per-call overhead, not the O(d) work, is the cost.
        """
        rows = self._rows
        keyed = self._moved_k[[rows[k] for k in slots]].tolist()
        ks = [k for k, key in zip(slots, keyed, strict=True) if key]
        vs = [k for k, key in zip(slots, keyed, strict=True) if not key]
        nk, nv = len(ks), len(vs)
        p, q = pack.size, pack.size + 2 * nk
        pack.reserve(q + nv)
        Kp, B = pack.Kp, pack.B
        if nk:
            kr = np.array([rows[k] for k in ks], dtype=np.intp)  # converted once, used 4 times
            np.multiply(self._K[kr], self._scale, out=Kp[p : p + nk])
            np.multiply(self._K0[kr], self._scale, out=Kp[p + nk : q])
            self._fill_new(B[p : p + nk], self._V[kr])
            self._fill_old(B[p + nk : q], self._V0[kr])
            pack.knorm = max(pack.knorm, _max_norm(Kp[p : p + nk]))
            pos = pack.newpos = np.concatenate([pack.newpos, np.arange(p, p + nk)])
            contiguous = pos[-1] - pos[0] + 1 == len(pos)
            pack.new = slice(int(pos[0]), int(pos[-1]) + 1) if contiguous else pos
        if nv:
            vr = np.array([rows[k] for k in vs], dtype=np.intp)
            np.multiply(self._K[vr], self._scale, out=Kp[q : q + nv])
            self._fill_changed(B[q : q + nv], self._V[vr], self._V0[vr])
        grow = max(max(slots) + 1 - len(pack.entry), 0)
        pack.entry.extend([-1] * grow)
        pack.keyed.extend([False] * grow)
        for e, k in enumerate(ks, p):
            pack.entry[k], pack.keyed[k] = e, True
        for e, k in enumerate(vs, q):
            pack.entry[k], pack.keyed[k] = e, False
        pack.size = q + nv
        pack.slots = max(pack.slots, len(rows))

    def _patch(self, pack: _Pack) -> None:
        """Refresh the entries of packed rows updated since (a row whose key now changed too
        gets its value-only entry zeroed and is re-queued with a new and an old entry)."""
        new_e, new_r, chg_e, chg_r = [], [], [], []
        for k in pack.dirty:
            e, r = pack.entry[k], self._rows[k]
            if pack.keyed[k]:
                new_e.append(e)
                new_r.append(r)
            elif self._moved_k[r]:
                pack.B[e] = 0  # its key still is the old one: exp stays finite, times 0
                pack.requeue.append(k)
            else:
                chg_e.append(e)
                chg_r.append(r)
        pack.dirty = set()
        if new_e:
            keys = self._K[new_r] * self._dtype.type(self._scale)
            pack.Kp[new_e] = keys
            pack.knorm = max(pack.knorm, _max_norm(keys))
            B_new = np.empty((len(new_e), pack.B.shape[1]), dtype=self._dtype)
            self._fill_new(B_new, self._V[new_r])
            pack.B[new_e] = B_new
        if chg_e:
            B_chg = np.empty((len(chg_e), pack.B.shape[1]), dtype=self._dtype)
            self._fill_changed(B_chg, self._V[chg_r], self._V0[chg_r])
            pack.B[chg_e] = B_chg

    def _fill_new(self, out: np.ndarray, v: np.ndarray) -> None:
        d, g = self._d, self._growth
        out[:, :d] = v
        out[:, d : d + 2] = self._marks[0]
        np.multiply(np.abs(v), -g, out=out[:, d + 2 :])

    def _fill_old(self, out: np.ndarray, v: np.ndarray) -> None:
        d, g = self._d, self._growth
        np.negative(v, out=out[:, :d])
        out[:, d : d + 2] = self._marks[1]
        np.multiply(np.abs(v), 1 + g, out=out[:, d + 2 :])

    def _fill_changed(self, out: np.ndarray, v: np.ndarray, v_old: np.ndarray) -> None:
        d, g = self._d, self._growth
        np.subtract(v, v_old, out=out[:, :d])
        out[:, d : d + 2] = 0  # the key did not move: s is untouched, nothing cancels in it
        np.multiply(np.abs(v_old), 1 + g, out=out[:, d + 2 :])
        out[:, d + 2 :] -= g * np.abs(v)

    def correction_flops(self) -> float:
        """Flops to bring one output row up to date now (logits and contributions of the
        packed touched rows, or a fresh row past :attr:`max_query_rows`)."""
        self._settle()
        if not self._rows:
            return 0.0
        if len(self._rows) > self.max_query_rows:
            return 4.0 * self._n * self._d
        return 2.0 * len(self._get_pack()[0]) * (3 * self._d + 2)

    def query_flops(self, rows: int = 1) -> float:
        """Estimated flops of exact queries on ``rows`` distinct output rows now."""
        return rows * (self.correction_flops() + self._d)

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
        numbers, computing an entry afresh reads K and a column of V, about n·d numbers
        (measured at n=16,384, d=64: 80 µs against 220 µs at |S|=1,000, 344 against 223 at
        |S|=4,000).
        """
        return self._max_query_rows

    def _current_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Exact current cache rows ``(m, C)`` for the index array ``idx`` (copies).

        Cost O(len(idx)·|S|·d), or O(len(idx)·n·d) past :attr:`max_query_rows` (twice that
        for many rows at once: matrix products are compute-bound, and a fresh row without
        guards costs 4n·d flops against 4|S|·(3d+2) to correct it), where the guard columns of
        C are left zero (only corrected rows need them). Rows whose correction would lose
        precision are recomputed exactly; the count is returned third.
        """
        self._settle()
        S = len(self._rows)
        if S > (self._max_query_rows if len(idx) < _MANY_ROWS else 2 * self._max_query_rows):
            m, C = self._exact(idx, guards=False)
            return m, C, 0
        if S == 0:
            return self._m[idx], self._C[idx], 0
        m, C = self._m[idx], self._C[idx]
        bad = self._correct(idx, m, C)
        if bad.any():
            m[bad], C[bad] = self._exact(idx[bad])
        return m, C, int(bad.sum())

    def _correct(self, rows, m: np.ndarray, C: np.ndarray, workspace: bool = False):
        """Bring cache rows ``(m, C)`` of ``rows`` from the last flush to now, in place.

        ``C ← e^(m − m')·C + exp(Q[rows] Kpᵀ − m') B`` with ``m'`` the rescaled stabiliser:
        new contributions in, old ones out, guards moved, all in two matrix products, the
        second accumulating into C where NumPy's BLAS allows (:mod:`dynattn._blas`). Returns
        the rows that lost precision (see :meth:`_lost_precision`). With ``workspace`` the
        temporaries live in reused buffers (the flush's hot loop). ``m`` and ``C`` must be
        writable arrays (copies, or views of the caches when flushing).

        The first product subtracts m itself and turns the logits into base 2 for ``exp2``
        (``[Q | −m] @ (log₂e·[Kp | 1])ᵀ``: an inner dimension of d+1 costs what d does, a pass
        over the logits does not), and rows are rescaled only
        where Cauchy–Schwarz allows a new logit above ``m + _SHIFT_SLACK``: elsewhere every
        exponential stays below e^16, and a common factor cancels in N/s and in the guards.
        """
        Kp, B, new = self._get_pack()
        pack = self._pack
        if pack.aug is None:
            pack.aug = np.empty((len(Kp), self._d + 1), dtype=self._dtype)
            np.multiply(Kp, _LOG2E, out=pack.aug[:, : self._d])
            pack.aug[:, self._d] = _LOG2E
        QA = self._QA[rows]  # the caches' own rows when flushing (a slice), else a copy
        np.negative(m, out=QA[:, self._d])
        L = self._buffer("logits", (len(m), len(Kp))) if workspace else None
        L = np.matmul(QA, pack.aug.T, out=L)
        # one bound for the whole block first: the rows' own bounds cost four passes over them
        if new is not None and (
            self._qnorm_max * pack.knorm > m.min(initial=math.inf) + _SHIFT_SLACK
        ):
            near = np.flatnonzero(self._qnorm[rows] * pack.knorm > m + _SHIFT_SLACK)
            if len(near):  # online softmax: rescale only the rows whose maximum moved
                top = L[near][:, new].max(axis=1)
                grew, up = near[top > 0], top[top > 0]
                if len(grew):
                    C[grew] *= np.exp2(-up)[:, None]
                    m[grew] += up / _LOG2E
                    L[grew] -= up[:, None]
        np.exp2(L, out=L)
        if not add_product(C, L, B):  # where NumPy's BLAS is out of reach: a temporary
            C += np.matmul(L, B, out=self._buffer("product", C.shape) if workspace else None)
        return self._lost_precision(C)

    def _buffer(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A reused scratch array: fresh multi-MB temporaries are page-faulted on every use."""
        size = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype=self._dtype)
        return buf[:size].reshape(shape)

    def _lost_precision(self, C: np.ndarray) -> np.ndarray:
        """Rows whose incremental value may have lost digits (or is not finite).

        With g the growth bound, each row carries the guards ``removed_s − g·s`` and, per output
        column, ``removed_c − g·Σ_j ã_ij|v_jc|``, where ``removed`` is the mass that removals
        subtracted since the row was last computed exactly. Both are linear in the
        contributions, so the flush product maintains them like N and s. A positive guard means
        the removed mass exceeds g times the remaining natural scale: the subtraction may have
        cancelled more than log10(g) digits, so the row must be recomputed.
        """
        d = self._d
        s = C[:, d]
        # the usual case in two whole-block reductions (NaN fails both): row-wise reductions
        # over short rows cost as much as the exponentials of a small flush
        if len(C) == 0 or (s.min() > 0 and C[:, d + 1 :].max() <= 0):
            return np.zeros(len(C), dtype=bool)
        bad = ~(s > 0) | ~(C[:, d + 1] <= 0)  # negated comparisons also catch NaN
        bad |= (C[:, d + 2 :] > 0).any(axis=1)
        return bad

    def _logits(self, idx: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``(scale · Q[idx]) @ keys.T`` for display windows of the weights."""
        return (self._Q[idx] * self._dtype.type(self._scale)) @ keys.T

    def _exact(
        self, idx: np.ndarray, out_m=None, out_C=None, guards: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cache rows for ``idx`` from scratch: O(len(idx)·n·d), in row blocks.

        Writes into ``out_m``/``out_C`` (indexed like ``idx``) when given, so a full rebuild
        needs no second n×(2d+2) array. Without ``guards`` the guard columns are zero: a
        third of the work saved where the rows are only read, not corrected later.
        """
        d = self._d
        m = np.empty(len(idx), dtype=self._dtype) if out_m is None else out_m
        C = np.empty((len(idx), 2 * d + 2), dtype=self._dtype) if out_C is None else out_C
        abs_v = np.abs(self._V) if guards else None
        step = min(len(idx), max(32, _BLOCK_ELEMENTS // self._n))
        work = self._buffer("exact", (step, self._n))
        scale = self._dtype.type(self._scale)
        for a in range(0, len(idx), step):
            blk = slice(a, a + step)
            L = work[: len(idx[blk])]
            np.matmul(self._Q[idx[blk]] * scale, self._K.T, out=L)
            mb = L.max(axis=1)
            L -= mb[:, None]
            np.exp(L, out=L)
            m[blk] = mb
            np.matmul(L, self._V, out=C[blk, :d])
            L.sum(axis=1, out=C[blk, d])
            if guards:
                np.multiply(C[blk, d], -self._growth, out=C[blk, d + 1])
                np.matmul(L, abs_v, out=C[blk, d + 2 :])
                C[blk, d + 2 :] *= -self._growth
            else:
                C[blk, d + 1 :] = 0
        return m, C

    def _store_exact(self) -> None:
        self._exact(np.arange(self._nq), out_m=self._m, out_C=self._C)

    def _blocks(self, width: int):
        """Slices covering all m query rows, each about ``_BLOCK_ELEMENTS / width`` rows."""
        step = max(1, _BLOCK_ELEMENTS // max(1, width))
        for a in range(0, self._nq, step):
            yield slice(a, min(a + step, self._nq))

    # ------------------------------------------------------------------ flush
    def flush(self) -> FlushEvent | None:
        """Apply every pending update to the caches; None when nothing is pending.

        An incremental flush corrects all n rows at once over the touched rows S with two
        matrix products, ``O(n·|S|·d)``; when S is so large that recomputing is cheaper, the
        engine rebuilds instead, ``O(n²·d)``. Rows that would lose precision are recomputed.
        """
        self._settle()
        if not self._rows:
            return None
        t0 = time.perf_counter()
        S, n, d = len(self._rows), self._n, self._d
        # correcting a row costs 2P(3d+2) flops over the P packed entries (P ≥ |S|, so past
        # the first test nothing is packed), recomputing it with its guards 6n·d
        P = len(self._get_pack()[0]) if S * (3 * d + 2) <= 3 * n * d else None
        if P is not None and P * (3 * d + 2) <= 3 * n * d:
            repaired = 0
            for blk in self._blocks(P):
                bad = self._correct(blk, self._m[blk], self._C[blk], workspace=True)
                if bad.any():
                    rows = np.arange(blk.start, blk.stop)[bad]
                    self._m[rows], self._C[rows] = self._exact(rows)
                    repaired += len(rows)
            flops = 2.0 * self._nq * P * (3 * d + 2) + 6.0 * repaired * n * d
            kind = "incremental"
        else:
            self._store_exact()
            repaired, flops, kind = 0, 6.0 * self._nq * n * d, "rebuild"
        return self._record(kind, flops, repaired, t0)

    def rebuild(self) -> FlushEvent:
        """Recompute every cache row exactly, ``O(n²·d)``; also clears the pending queue."""
        t0 = time.perf_counter()
        self._settle()
        self._store_exact()
        return self._record("rebuild", 6.0 * self._nq * self._n * self._d, 0, t0)

    def _record(self, kind, flops, repaired, t0) -> FlushEvent:
        seconds = time.perf_counter() - t0
        self._n_flushes += 1
        rows = np.array(self._rows, dtype=np.intp)
        event = FlushEvent(
            index=self._n_flushes,
            at_update=self.n_updates,
            updates=self.pending,
            rows=len(rows),
            k_rows=int(self._moved_k[rows].sum()),
            v_rows=int(self._moved_v[rows].sum()),
            flops=flops,
            seconds=seconds,
            kind=kind,
            repaired=repaired,
        )
        self._done += self.pending
        self._reset_pending(rows)
        self.flush_log.append(event)
        on_flush = getattr(self._policy, "on_flush", None)
        if on_flush is not None:
            on_flush(event)
        return event

    # ------------------------------------------------------------------ queries
    def query(self, i, j, stale: bool = False) -> float:
        """Output entry ``O[i, j]``; exact in O(|S|·d), or the cached value if ``stale``."""
        i = V_.check_index("i", i, self._nq)
        j = V_.check_index("j", j, self._d)
        if not stale and self._choose_direct():
            return self._direct_entry(i, j)
        row = self._row(i, stale, col=j, direct=False)  # asked just above
        return float(row[j] / row[self._d])

    def _choose_direct(self) -> bool:
        """Whether this single exact query computes its row afresh rather than correcting it.

        In units of one element of K read by a fresh query (n·d of them): correcting reads
        2(3d+2) numbers per touched row (so |S| > :attr:`max_query_rows` alone decides it),
        once the pack has caught up on the rows updated since its last use (``_pack_cost``,
        scaled by the measured ratio of the two costs once a fresh query and a catch-up have
        been timed; a first catch-up waits for three fresh queries to compare with).
        Catching up serves every later query until the next update, so it is bought as in
        ski rental: queries compute afresh until what that cost them beyond a corrected query,
        since the last update, would have paid for the catch-up (at most twice the better
        choice in hindsight; one query after each update never pays for it).

        The log is settled only when the queued rows without it do not already decide: more
        rows make correcting and catching up dearer, never cheaper, so a query that computes
        afresh anyway leaves the log to be queued later with more entries at once. For the
        same reason, once the estimate has chosen afresh with the log unsettled, a query
        after more logged updates chooses afresh without it (the estimate would come out the
        same: it sees the log as one row; ~2 µs of a fresh query's 20 at n = 1,024), until
        the log is settled, a flush, or a new measured ratio.
        """
        if self._log:
            if len(self._log) > self._fresh_log_len:
                self._fresh_log_len = len(self._log)
                self._fresh_count, self._fresh_mark = 1, self.n_updates  # as _prefers_fresh
                return True
            if self._prefers_fresh():
                return True
            self._settle()
        return self._prefers_fresh()

    def _prefers_fresh(self) -> bool:
        """:meth:`_choose_direct` for the rows queued so far (a lower bound on S)."""
        S = len(self._rows)
        fresh = self._n * self._d
        correct = 2 * (3 * self._d + 2) * S
        if correct > fresh:
            return True
        pack = self._pack
        if not (pack.dirty or S > pack.slots or pack.requeue or self._log):
            return False  # the pack is up to date: the common case, without a call
        catch_up = self._catch_up_units()
        updates = self._done + self._pending + len(self._log)  # n_updates, inlined
        if self._fresh_mark != updates:  # what was paid before an update is sunk
            self._fresh_count, self._fresh_mark = 0, updates
        # a catch-up is mostly per-call overhead, a fresh query memory traffic: how their
        # costs compare depends on the dtype, n and the machine, so once both have been timed
        # the measured ratio replaces the estimate (_pack_cost); until three fresh queries
        # have been timed (one alone may be a stall, or cold after a flush) such choices
        # compute afresh, to time them
        if len(self._fresh_log) < 3:
            self._fresh_count += 1
            return True
        catch_up = self._measured(catch_up)
        # S is constant between updates, so the regret is the count of fresh queries times
        # what each paid beyond a corrected one
        if correct + catch_up <= fresh + self._fresh_count * (fresh - correct):
            return False
        self._fresh_count += 1
        if self._log:
            self._fresh_log_len = len(self._log)  # see _choose_direct
        return True

    def _catch_up_units(self, rows: int | None = None) -> int:
        """A catch-up of the pack on ``rows`` rows, by default those updated since its last
        use, in ``_pack_cost`` units. Callers ask only when it is behind, so at least one row:
        a lower bound while the log is not queued, as each logged entry makes its row new to
        the pack or dirty."""
        if rows is None:
            pack = self._pack
            rows = len(pack.dirty) + len(self._rows) - pack.slots + len(pack.requeue)
        fixed, per_row = self._pack_cost
        return fixed + per_row * max(rows, 1)

    def _measured(self, units: float) -> float:
        """Catch-up ``units`` scaled by the measured ratio, once there is one (see
        :meth:`_measure_catch_ratio`)."""
        ratio = self._catch_ratio
        return units * ratio if ratio == ratio else units  # not NaN: measured

    def _direct_entry(self, i: int, j: int) -> float:
        """``O[i, j]`` from scratch, reading one column of V: 2n·d + 4n flops."""
        t0 = time.perf_counter()
        value = entry_from_scratch(self._Q[i], self._K, self._V[:, j], self._scale)
        self._n_queries += 1
        seconds = time.perf_counter() - t0
        self.query_log.append((len(self._rows), 1, seconds))
        self._fresh_log.append(seconds)
        self._n_fresh += 1
        if self._n_fresh <= 3 or self._n_fresh % 16 == 0:
            self._measure_catch_ratio()
        return value

    def _measure_catch_ratio(self) -> None:
        """Seconds per catch-up unit over seconds per element read afresh, as medians of the
        recent timings; NaN until three fresh queries and a catch-up have been timed. Redone
        after the first three catch-ups and fresh queries and every 16th of each: the medians
        cost ~1 µs (2-3 µs between a query's other work), as much as the rest of the
        decision."""
        if len(self._fresh_log) >= 3:
            self._unit_s = self.fresh_query_seconds / (self._n * self._d)
            if self._catch_log:
                self._catch_ratio = statistics.median(self._catch_log) / self._unit_s
                self._fresh_log_len = math.inf  # see _choose_direct

    def query_row(self, i, stale: bool = False) -> np.ndarray:
        """Output row ``O[i]`` (shape (d,)); exact in O(|S|·d), or cached if ``stale``."""
        i = V_.check_index("i", i, self._nq)
        row = self._row(i, stale)
        return row[: self._d] / row[self._d]

    def _row(
        self, i: int, stale: bool, col: int | None = None, direct: bool | None = None
    ) -> np.ndarray:
        """One cache row, current unless ``stale``: the single-query fast path.

        Same arithmetic as :meth:`_current_rows` on one row, with vector operations only,
        because a single query is dominated by per-call overhead, not flops. With ``col``
        only ``N[col]`` and ``s`` of the result are guaranteed (their guards are the ones
        checked). ``direct``: the caller's :meth:`_choose_direct`, when it has asked already.
        """
        if stale:
            return self._C[i]
        t0 = time.perf_counter()
        if direct is None:
            direct = self._choose_direct()
        S = len(self._rows)
        if direct:
            row = self._exact(np.array([i]), guards=False)[1][0]
        elif S == 0:
            row = self._C[i]
        else:
            Kp, B, new = self._get_pack()
            # ndarray.dot, not @: the same BLAS gemv without the matmul ufunc's dispatch,
            # 0.3 µs a product of a ~6 µs query
            L = Kp.dot(self._Q[i])
            m_old = m = self._m[i]
            # Rescaling to the new maximum logit costs a reduction, as much as the exponentials:
            # skip it while Cauchy–Schwarz bounds every new logit by m + _SHIFT_SLACK (a common
            # factor of at most e^_SHIFT_SLACK then cancels in N/s and in the guards)
            if new is not None and self._qnorm[i] * self._pack.knorm > m + _SHIFT_SLACK:
                m = max(m, L[new].max())
            L -= m
            np.exp(L, out=L)
            row = L.dot(B)
            row += self._C[i] * math.exp(m_old - m) if m != m_old else self._C[i]
            d = self._d
            # _lost_precision for one row, in scalars: it costs more than the query otherwise
            if not (row[d] > 0 and row[d + 1] <= 0) or not (
                row[d + 2 :].max() <= 0 if col is None else row[d + 2 + col] <= 0
            ):
                row = self._exact(np.array([i]))[1][0]
        self._n_queries += 1
        self.query_log.append((S, 1, time.perf_counter() - t0))
        return row

    def query_many(self, rows, cols, stale: bool = False) -> np.ndarray:
        """Output entries ``O[rows[k], cols[k]]`` (shape (m,)), vectorised.

        Each distinct row is corrected once: O(u·|S|·d) for u distinct rows.
        """
        r = V_.as_indices("rows", rows, self._nq)
        c = V_.as_indices("cols", cols, self._d)
        if len(r) != len(c):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        uniq, inv = np.unique(r, return_inverse=True)
        return self._rows_out(uniq, stale, count=len(r))[inv, c]

    def _rows_out(self, idx: np.ndarray, stale: bool, count: int) -> np.ndarray:
        if stale:
            C = self._C[idx]
        elif count == 0:  # internal use (error estimates): not a user query, not timed
            _, C, _ = self._current_rows(idx)
        else:
            t0 = time.perf_counter()
            _, C, _ = self._current_rows(idx)
            self._n_queries += count
            self.query_log.append((len(self._rows), count, time.perf_counter() - t0))
        return self._out(C)

    def _out(self, C: np.ndarray) -> np.ndarray:
        """Output rows ``N / s`` from cache rows."""
        return C[:, : self._d] / C[:, self._d, None]

    def output(self, stale: bool = False) -> np.ndarray:
        """The whole output O (shape (n, d)): exact in O(n·|S|·d), or the cached view."""
        if stale:
            return self._out(self._C)
        d = self._d
        self._settle()
        if not self._rows:  # nothing pending: the caches are exact
            return self._out(self._C)
        out = np.empty((self._nq, d), dtype=self._dtype)
        for blk in self._blocks(2 * len(self._rows) + 1):
            _, C, _ = self._current_rows(np.arange(blk.start, blk.stop))
            out[blk] = self._out(C)
        return out

    def weight(self, i, j, stale: bool = False) -> float:
        """Attention weight ``P[i, j]``; exact in O(|S|·d), or as of the last flush."""
        i = V_.check_index("i", i, self._nq)
        j = V_.check_index("j", j, self._n)
        return float(self.weights([i], [j], stale=stale)[0, 0])

    def weights(self, rows=slice(None), cols=slice(None), stale: bool = False) -> np.ndarray:
        """A window of the attention weights ``P[rows][:, cols]`` without forming P.

        Parameters
        ----------
        rows, cols : slice, int or array of int
            The window; keep ``len(rows)·len(cols)`` display-sized.
        stale : bool
            Weights as of the last flush (old keys, cached denominators) instead of exact.

        Returns
        -------
        ndarray, shape (len(rows), len(cols))
            Cost O(len(rows)·(|S| + len(cols))·d).
        """
        I = V_.as_selection("rows", rows, self._nq)
        J = V_.as_selection("cols", cols, self._n)
        d = self._d
        if stale:
            m, s, keys = self._m[I], self._C[I, d], self._K0[J]
        else:
            m, C, _ = self._current_rows(I)
            s, keys = C[:, d], self._K[J]
        L = self._logits(I, keys)
        L -= m[:, None]
        np.exp(L, out=L)
        L /= s[:, None]
        return L

    # ------------------------------------------------------------------ error
    def rows_error(self, rows) -> tuple[float, float]:
        """``(Σ (O_stale − O)², Σ O²)`` over the output rows ``rows``, both divided by the
        square of the largest entry of either, so that their ratio survives outputs of any
        magnitude (squares of 1e-200 underflow, of 1e200 overflow); O(len(rows)·|S|·d).

        The building block of sampled error estimates (see ``policies.ErrorBudget``).
        """
        idx = V_.as_indices("rows", rows, self._nq)
        exact = self._rows_out(idx, stale=False, count=0)
        diff = self._rows_out(idx, stale=True, count=0) - exact
        norms = _Norm(), _Norm()
        norms[0].add(diff)
        norms[1].add(exact)
        top = max(norms[0].scale, norms[1].scale)
        if top == 0.0:
            return 0.0, 0.0
        sq_diff, sq_exact = (norm.ssq * (norm.scale / top) ** 2 for norm in norms)
        return sq_diff, sq_exact

    def approximation_error(self) -> ErrorReport:
        """Error of the stale output against the exact output, O(n·|S|·d), no n×n array."""
        self._settle()
        norm_diff, norm_exact = _Norm(), _Norm()
        for blk in self._blocks(2 * len(self._rows) + 1):
            _, C, _ = self._current_rows(np.arange(blk.start, blk.stop))
            exact = self._out(C)
            diff = self._out(self._C[blk]) - exact
            norm_diff.add(diff)
            norm_exact.add(exact)
        if norm_exact.scale == 0.0:
            rel = 0.0 if norm_diff.scale == 0.0 else math.inf
        else:
            rel = norm_diff / norm_exact
        return ErrorReport(rel, norm_diff.scale)

    def __repr__(self) -> str:
        return (
            f"LazyAttention({'' if self._nq == self._n else f'm={self._nq}, '}n={self._n}, "
            f"d={self._d}, dtype={self._dtype}, "
            f"scale={self._scale:.4g}, pending={self.pending}, "
            f"touched_rows={self.touched_rows}, "
            f"flushes={self._n_flushes}, policy={self._policy!r})"
        )
