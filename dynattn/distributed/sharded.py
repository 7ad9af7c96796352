"""Lazy attention with its query rows split over Dask workers: :class:`ShardedAttention`."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from .. import _validate as check
from ..engine import ErrorReport, FlushEvent, LazyAttention, QueryRecord
from ..engine.attention import checked_inputs as engine_inputs
from ..engine.kernels import GROWTH, row_norms
from ..engine.limits import EntryLimits
from ..engine.reports import FrobeniusNorm
from ..engine.schedule import FlushSchedule
from ..engine.updates import UpdateVerbs
from ._buffer import ClientLog, ShardCalls
from ._cluster import Cluster, ShardError
from ._host import copy_engine

__all__ = ["ShardedAttention"]


def checked_inputs(Q, K, V, engine_kwargs: dict):
    """``(Q, K, V, kwargs, limits)``: the arrays validated and copied as the engine does
    (:func:`dynattn.engine.attention.checked_inputs`: bad input is refused before any worker
    is asked), the engine keywords the shards get, and the entry limits of the whole engine
    (all of Q: no shard's are tighter)."""
    kwargs = dict(engine_kwargs)
    unknown = set(kwargs) - {"scale", "dtype"}
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {sorted(unknown)}; engines take "
            "scale, dtype and policy"
        )
    Qa, Ka, Va, scale, limits = engine_inputs(Q, K, V, kwargs.get("scale"), kwargs.get("dtype"))
    kwargs.update(scale=scale, dtype=Ka.dtype)
    return Qa, Ka, Va, kwargs, limits


def checked_buffer(buffer) -> None:
    """Refuse a buffer size that is not a positive integer."""
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"buffer={buffer!r} must be an integer >= 1")


class ShardedAttention(UpdateVerbs, ShardCalls):
    """:class:`~dynattn.engine.LazyAttention` with its m query rows split into blocks, each
    block a ``LazyAttention(Q_block, K, V)`` on a Dask worker (an actor), K and V replicated.

    The public interface is LazyAttention's (same names, arguments, results and errors), so
    code written for one engine runs on a cluster. Updates are checked and applied on the
    client, to its copy of K and V, and *buffered*: the touched rows are sent to the shards
    as arrays (their current values, |S|·d numbers per shard, never one message per update)
    when the buffer reaches ``buffer`` update actions, before a flush, and to one shard before
    a query it answers. Queries go to the shard owning their row and are exact. The flush
    policy runs here, on the client: every shard flushes at once (in parallel), so the stale
    view is as of one flush everywhere.

    Parameters
    ----------
    Q : array_like, shape (m, d)
    K, V : array_like, shape (n, d)
    client : dask.distributed.Client, optional
        The cluster to use (``Client("tcp://scheduler:8786")`` for any Dask cluster). None
        starts a LocalCluster with one single-threaded worker process per core on 127.0.0.1
        and stops it in :meth:`close` (or at the end of a ``with`` block).
    shards : int, optional
        Query-row blocks, placed round-robin over the workers; default one per worker.
    buffer : int, default 16384
        Buffered update actions that trigger sending them to every shard.
    **engine_kwargs
        ``scale``, ``dtype`` (as LazyAttention) and ``policy`` (run on the client, asked with
        this object as the engine; default :class:`~dynattn.policies.CostModel`).

    Notes
    -----
    Costs, W shards of m/W query rows each: an update O(1) on the client (its row O(d)
    shipped later, once however often it changes), a query one round trip to one shard plus
    O(|S|·d) there, a flush O(m·|S|·d / W) per shard in parallel, a rebuild O(m·n·d / W).
    Memory: per shard ~4·n·d + 3·(m/W)·d numbers (K, V, their snapshot, its Q block and
    caches); on the client Q, K, V (~(m + 2n)·d) and at most ``buffer`` logged rows.
    Raises :class:`~dynattn.distributed.ShardError` naming the shard when one fails; nothing
    buffered is lost, and :meth:`recover` restarts lost shards.
    """

    def __init__(self, Q, K, V, *, client=None, shards=None, buffer: int = 16384, **engine_kwargs):
        policy = engine_kwargs.pop("policy", None)
        Qa, Ka, Va, kwargs, limits = checked_inputs(Q, K, V, engine_kwargs)
        if shards is not None:
            shards = check.check_index("shards", shards, len(Qa) + 1)
            if shards < 1:
                raise ValueError("shards=0: there must be at least one shard")
        checked_buffer(buffer)
        cluster = Cluster(client, workers=shards)
        try:
            workers = cluster.workers()
            count = shards or len(workers)
            starts = [len(Qa) * s // count for s in range(count + 1)]
            places = [workers[s % len(workers)] for s in range(count)]
            self._place(cluster, (Qa, Ka, Va, kwargs, limits), starts, places, buffer)
            self._setup(policy, self._submit(range(count)))
        except BaseException:
            cluster.close()
            raise

    def _place(self, cluster, inputs, starts, places, buffer) -> None:
        """Take the :func:`checked_inputs` (the client's Q, K, V copies, the engine keywords,
        the entry limits), the shards' layout (shard s holds query rows
        ``starts[s]:starts[s+1]`` on worker ``places[s]``) and an empty buffer sent to the
        shards at ``buffer`` actions."""
        Qa, Ka, Va, kwargs, limits = inputs
        self._set_limits(limits)  # the update verbs check new entries against them
        self._cluster, self._places, self._starts = cluster, places, starts
        self._kwargs, self._label = kwargs, "shard {s} of {count} (query rows {a}:{b}, "
        self._nq, (self._n, self._d), self._dtype = len(Qa), Ka.shape, Ka.dtype
        self._scale = kwargs["scale"]
        self._Qm, self._K, self._V = Qa, Ka, Va  # the client's copies: K, V kept current
        self._queue = ClientLog(self._n, len(places), buffer)
        self._log = self._queue.log  # the update verbs append to it directly

    def _submit(self, shards) -> list:
        """Start the actors of ``shards`` (the engines build in parallel) from the client's Q
        blocks and *current* K and V: scattered once to each worker used, each Q block to its
        worker; returns their futures."""
        client = self._cluster.client
        shards = list(shards)
        places = [self._places[s] for s in shards]
        Kf, Vf = client.scatter(
            [self._K, self._V], workers=sorted(set(places)), broadcast=True, hash=False
        )
        args = []
        for s, w in zip(shards, places, strict=True):
            Qf = client.scatter(
                self._Qm[self._starts[s] : self._starts[s + 1]], workers=[w], hash=False
            )
            args.append((w, (Qf, Kf, Vf, self._kwargs)))
        return self._cluster.submit_hosts(args)

    def _setup(self, policy, futures) -> None:
        """Counters, buffer and views; waits for the shards' actors (``futures``): a shard
        that fails to start raises ShardError."""
        self._futures = futures
        self._views = {}
        for name, arr in (("Q", self._Qm), ("K", self._K), ("V", self._V)):
            view = arr.view()
            view.flags.writeable = False
            self._views[name] = view
        self._schedule = FlushSchedule(policy)
        self._n_queries = self._n_flushes = 0
        self.flush_log: deque[FlushEvent] = deque(maxlen=1000)
        self.query_log: deque[QueryRecord] = deque(maxlen=2048)
        self._hosts = list(futures)  # placeholders while they start, for _describe
        started = self._gather("start", [(s, f, 0) for s, f in enumerate(futures)])
        self._hosts = [started[s] for s in range(len(futures))]
        info = self._hosts[0].run(None, "info").result()
        self._max_query_rows = info["max_query_rows"]
        self._max_correction_rows = info["max_correction_rows"]
        self._ask_policy_next()

    # ------------------------------------------------------------------ properties
    # the engine's own properties: this class keeps the state they read under the same names
    # (K and V are the client's copies, kept current by every update)
    n, m, d, dtype, scale = (
        LazyAttention.n,
        LazyAttention.m,
        LazyAttention.d,
        LazyAttention.dtype,
        LazyAttention.scale,
    )
    Q, K, V = LazyAttention.Q, LazyAttention.K, LazyAttention.V
    pending, n_updates = LazyAttention.pending, LazyAttention.n_updates
    n_queries, n_flushes = LazyAttention.n_queries, LazyAttention.n_flushes
    shards = property(lambda self: len(self._hosts), doc="Number of shards (query-row blocks).")
    max_query_rows = property(
        lambda self: self._max_query_rows, doc=LazyAttention.max_query_rows.__doc__
    )
    max_correction_rows = property(
        lambda self: self._max_correction_rows, doc=LazyAttention.max_correction_rows.__doc__
    )
    fresh_query_seconds = property(
        lambda self: float("nan"), doc="Not measured here (each shard chooses for itself)."
    )
    policy = LazyAttention.policy
    threshold = LazyAttention.threshold
    last_flush = LazyAttention.last_flush
    weight = LazyAttention.weight
    # the engine's policy consultation, on this class's ClientLog (as the engine's queue)
    _ask_policy = LazyAttention._ask_policy
    _before_flush = LazyAttention._before_flush
    _set_limits = LazyAttention._set_limits
    _plan_next_ask = LazyAttention._plan_next_ask
    _ask_policy_next = LazyAttention._ask_policy_next

    @property
    def touched_rows(self) -> int:
        """Distinct rows of K or V touched since the last flush, |S|."""
        self._queue.note()
        return self._queue.touched

    @property
    def touched_k(self) -> frozenset[int]:
        """Rows of K changed since the last flush."""
        self._queue.note()
        return frozenset(np.flatnonzero(self._queue.moved_k).tolist())

    @property
    def touched_v(self) -> frozenset[int]:
        """Rows of V changed since the last flush."""
        self._queue.note()
        return frozenset(np.flatnonzero(self._queue.moved_v).tolist())

    @property
    def blocks(self) -> list[tuple[int, int, str]]:
        """``(start, stop, worker)`` of each shard's query rows."""
        return [(self._starts[s], self._starts[s + 1], self._places[s]) for s in range(self.shards)]

    # ------------------------------------------------------------------ updates
    # The engine's update verbs (UpdateVerbs) run here unchanged on the client's K and V, with
    # the same checks, errors and all-or-nothing batches; what they queue goes to _queue.

    def set_q_rows(self, rows, values) -> None:
        """Replace ``Q[rows]`` by ``values`` (shape (t, d)) on the shards owning them, which
        recompute those cache rows exactly, O(t·n·d) in all, in parallel. Checked as a whole
        before any shard is asked; a shard that fails leaves its rows (and only those) as
        they were, here too."""
        r = check.as_indices("rows", rows, self._nq)
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows={r.tolist()} repeats a row; a row can be set once per call")
        new = check.as_matrix("values", values, self._dtype, shape=(len(r), self._d))
        masks = dict(self._by_shard(r))
        calls = [
            self._issue(s, "set_q_rows", r[mask] - self._starts[s], new[mask])
            for s, mask in masks.items()
        ]
        failures = []
        for call in calls:
            try:
                self._gather("set_q_rows", [call])
            except ShardError as exc:
                failures.extend(exc.failures)
                continue
            self._Qm[r[masks[call[0]]]] = new[masks[call[0]]]
        qnorm_max = float(row_norms(self._Qm).max())  # the shards took these rows: limits follow
        limits = EntryLimits(
            qnorm_max, self._scale, self._n, self._d, self._dtype, GROWTH[self._dtype]
        )
        self._set_limits(limits)
        if failures:
            raise ShardError("set_q_rows", failures)

    # ------------------------------------------------------------------ flush
    def flush(self) -> FlushEvent | None:
        """Send the buffer and flush every shard in parallel; None when nothing is pending.

        Each shard corrects its m/W rows over the touched rows S, O(m·|S|·d / W), or rebuilds
        when that is cheaper. If a shard fails, the others have flushed and ``pending`` stays
        as it was: a later flush() (after :meth:`recover`) completes it. A policy's
        ``before_flush`` that raises stops it before anything changes.
        """
        self._before_flush()
        return self._flush()

    def _flush(self) -> FlushEvent | None:
        started = self._begin("flush")
        return None if started is None else self._end(started)

    def rebuild(self) -> FlushEvent:
        """Recompute every shard's caches exactly, in parallel, O(m·n·d / W) each."""
        self._before_flush(rebuild=True)
        return self._end(self._begin("rebuild"))

    def _begin(self, kind: str):
        """Start a flush or rebuild on every shard: ``(kind, calls, t0)``, or None when a
        flush has nothing to do."""
        if kind == "flush" and self.pending == 0:
            return None
        t0 = time.perf_counter()
        return kind, [self._issue(s, kind) for s in range(self.shards)], t0

    def _end(self, started) -> FlushEvent:
        """Wait for :meth:`_begin`'s calls and record the flush as one event."""
        kind, calls, t0 = started
        events = [e for e in self._gather(kind, calls).values() if e is not None]
        queue = self._queue
        queue.note()
        event = FlushEvent(
            index=self._n_flushes + 1,
            at_update=self.n_updates,
            updates=self.pending,
            rows=queue.touched,
            k_rows=int(np.count_nonzero(queue.moved_k)),
            v_rows=int(np.count_nonzero(queue.moved_v)),
            flops=sum(e.flops for e in events),
            seconds=time.perf_counter() - t0,
            kind="rebuild" if any(e.kind == "rebuild" for e in events) else "incremental",
            repaired=sum(e.repaired for e in events),
        )
        self._n_flushes += 1
        queue.clear()
        self._ask_policy_next()  # a flush may change the policy's answer
        self.flush_log.append(event)
        if self._schedule.on_flush is not None:
            self._schedule.on_flush(event)
        return event

    # ------------------------------------------------------------------ queries
    def _ask(self, shard: int, name: str, *args, stale: bool = False, count: int = 1):
        """One call to one shard, timed into the query log (exact queries only)."""
        t0 = time.perf_counter()
        result = self._gather(name, [self._issue(shard, name, *args, ship=not stale)])[shard]
        if not stale:
            self._count_queries(count, t0)
        return result

    def _count_queries(self, count: int, t0: float) -> None:
        """Count ``count`` exact entries answered since ``t0`` (for policies' cost models)."""
        self._n_queries += count
        seconds = time.perf_counter() - t0
        self.query_log.append(QueryRecord(self._queue.touched, count, seconds))

    def query(self, i, j, stale: bool = False) -> float:
        """Output entry ``O[i, j]``; exact (one round trip to the shard owning row i, which
        first applies its share of the buffer), or the cached value if ``stale``."""
        i = check.check_index("i", i, self._nq)
        j = check.check_index("j", j, self._d)
        s = self._owner(i)
        return self._ask(s, "query", i - self._starts[s], j, stale, stale=stale)

    def query_row(self, i, stale: bool = False) -> np.ndarray:
        """Output row ``O[i]`` (shape (d,)); exact, or cached if ``stale``."""
        i = check.check_index("i", i, self._nq)
        s = self._owner(i)
        return self._ask(s, "query_row", i - self._starts[s], stale, stale=stale)

    def query_many(self, rows, cols, stale: bool = False) -> np.ndarray:
        """Output entries ``O[rows[k], cols[k]]`` (shape (k,)): one call per shard involved,
        all in parallel."""
        r = check.as_indices("rows", rows, self._nq)
        c = check.as_indices("cols", cols, self._d)
        if len(r) != len(c):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        t0 = time.perf_counter()
        out = np.empty(len(r), dtype=self._dtype)
        self._scatter_rows(out, r, "query_many", lambda sel: (c[sel], stale), ship=not stale)
        if not stale:
            self._count_queries(len(r), t0)
        return out

    def _scatter_rows(self, out, rows, name, extra, ship=True) -> None:
        """``out[mask] = shard.name(local rows, *extra(mask))`` for each shard owning some of
        ``rows``, all shards called in parallel."""
        masks = dict(self._by_shard(rows))
        calls = [
            self._issue(s, name, rows[mask] - self._starts[s], *extra(mask), ship=ship)
            for s, mask in masks.items()
        ]
        for s, result in self._gather(name, calls).items():
            out[masks[s]] = result

    def output(self, stale: bool = False) -> np.ndarray:
        """The whole output O (shape (m, d)), gathered from every shard: exact (each shard
        O(m·|S|·d / W), in parallel), or the cached view."""
        return np.concatenate(self._run_all("output", stale, ship=not stale))

    def weights(self, rows=slice(None), cols=slice(None), stale: bool = False) -> np.ndarray:
        """A window ``P[rows][:, cols]`` of the attention weights (see LazyAttention.weights),
        each row from its shard."""
        I = check.as_selection("rows", rows, self._nq)
        J = check.as_selection("cols", cols, self._n)
        out = np.empty((len(I), len(J)), dtype=self._dtype)
        self._scatter_rows(out, I, "weights", lambda sel: (J, stale), ship=not stale)
        return out

    # ------------------------------------------------------------------ error
    def _norms(self, parts) -> tuple[FrobeniusNorm, FrobeniusNorm]:
        """The shards' ``(scale, ssq)`` pairs merged into the norms of ``O_stale − O`` and O."""
        merged = FrobeniusNorm(), FrobeniusNorm()
        for part in parts:
            for k, norm in enumerate(merged):
                scale, ssq = part[2 * k], part[2 * k + 1]
                if scale > norm.scale:
                    norm.ssq *= (norm.scale / scale) ** 2
                    norm.scale = scale
                if scale > 0:
                    norm.ssq += ssq * (scale / norm.scale) ** 2
        return merged

    def approximation_error(self) -> ErrorReport:
        """Error of the stale output against the exact one, every shard in parallel."""
        return self._report(self._run_all("norms", None))

    def _report(self, parts) -> ErrorReport:
        """The ErrorReport of the shards' :meth:`EngineHost.norms` ``parts``."""
        diff, exact = self._norms(parts)
        if exact.scale == 0.0:
            return ErrorReport(0.0 if diff.scale == 0.0 else np.inf, diff.scale)
        return ErrorReport(diff / exact, diff.scale)

    def rows_error(self, rows) -> tuple[float, float]:
        """``(Σ (O_stale − O)², Σ O²)`` over the output ``rows``, both divided by the square
        of the largest entry of either (see LazyAttention.rows_error)."""
        idx = check.as_indices("rows", rows, self._nq)
        masks = dict(self._by_shard(idx))
        calls = [self._issue(s, "norms", idx[mask] - self._starts[s]) for s, mask in masks.items()]
        diff, exact = self._norms(self._gather("rows_error", calls).values())
        top = max(diff.scale, exact.scale)
        if top == 0.0:
            return 0.0, 0.0
        return diff.ssq * (diff.scale / top) ** 2, exact.ssq * (exact.scale / top) ** 2

    # ------------------------------------------------------------------ life cycle
    def copy(self, policy=None) -> ShardedAttention:
        """An independent twin in the same state, on the same workers, with its own
        ``policy`` (None: CostModel) and empty logs: every shard's engine is copied where it
        lives (O((m/W + n)·d) each, no rebuild), the client's arrays and buffer here. It uses
        this object's cluster, so it lives as long as that does."""
        self._run_all(None)  # every shard has the whole buffer: the copies need none of it
        client = self._cluster.client
        new = object.__new__(type(self))
        arrays = tuple(check.aligned_copy(a) for a in (self._Qm, self._K, self._V))
        inputs = (*arrays, self._kwargs, self._limits)
        new._place(
            Cluster(client), inputs, list(self._starts), list(self._places), self._queue.max_log
        )
        new._label = self._label
        engines = [
            client.submit(copy_engine, f.key, workers=[w], pure=False)
            for f, w in zip(self._futures, self._places, strict=True)
        ]
        places = zip(self._places, engines, strict=True)
        hosts = [(w, (None, None, None, None, e)) for w, e in places]
        new._setup(policy, new._cluster.submit_hosts(hosts))
        mine, theirs = self._queue, new._queue
        theirs.count, theirs.done, theirs.touched = mine.count, mine.done, mine.touched
        theirs.moved[...], theirs.hit[...] = mine.moved, mine.hit
        new._n_queries, new._n_flushes = self._n_queries, self._n_flushes
        new._ask_policy_next()
        return new

    def memory(self) -> list[dict]:
        """Per shard: its worker, its engine's array bytes and its worker process's RSS."""
        infos = self._run_all("info", ship=False)
        return [dict(info, worker=w) for info, w in zip(infos, self._places, strict=True)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the shards' engines, summed (one call to every shard)."""
        return sum(info["nbytes"] for info in self.memory())

    def recover(self) -> list[int]:
        """Restart every shard whose worker was lost, on a live worker, from the client's Q
        block and current K, V (so no buffered update is lost); returns their numbers.

        A restarted shard's caches are exact as of now (a rebuild of its block,
        O(m·n·d / W)): its stale view is newer than the other shards' until the next flush.
        """
        lost = [s for s, f in enumerate(self._futures) if f.status != "finished"]
        if not lost:
            return []
        workers = self._cluster.workers()
        for k, s in enumerate(lost):
            self._places[s] = workers[k % len(workers)]
        futures = self._submit(lost)
        calls = [(s, f, len(self._log)) for s, f in zip(lost, futures, strict=True)]
        hosts = self._gather("recover", calls)
        for s, f in zip(lost, futures, strict=True):
            self._futures[s], self._hosts[s] = f, hosts[s]
            self._queue.inflight[s] = None
        return lost

    def close(self) -> None:
        """Release the shards (their actors end) and stop the cluster if this object started
        it. Idempotent."""
        self._hosts, self._futures = [], []
        self._cluster.close()

    def __enter__(self) -> ShardedAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShardedAttention({'' if self._nq == self._n else f'm={self._nq}, '}n={self._n}, "
            f"d={self._d}, dtype={self._dtype}, scale={self._scale:.4g}, shards={self.shards}, "
            f"pending={self.pending}, touched_rows={self.touched_rows}, "
            f"flushes={self._n_flushes}, policy={self.policy!r})"
        )
