"""Many independent attention heads placed over Dask workers: :class:`MultiHeadAttention`."""

from __future__ import annotations

import copy
import time

import numpy as np

from .. import _validate as check
from ..engine import ErrorReport, FlushEvent
from ..policies import as_policy
from ._cluster import Cluster, ShardError
from .sharded import ShardedAttention, checked_buffer, checked_inputs

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention:
    """H independent heads, each a :class:`~dynattn.engine.LazyAttention` on a Dask worker
    (head h on worker h mod W), addressed by head.

    Each head is a one-shard :class:`ShardedAttention` (``head(h)`` returns it, with the whole
    engine interface): its updates are checked and buffered on the client and shipped in
    batches, its flush policy runs on the client. The methods here take a head index first;
    the batch forms take an array of heads and are all or nothing across heads; flushes,
    rebuilds, whole outputs and batched queries run on every head involved in parallel.

    Parameters
    ----------
    Q : array_like, shape (H, m, d), or a sequence of H arrays (m, d)
    K, V : array_like, shape (H, n, d), or sequences of H arrays (n, d)
        Every head has the same shapes (a model's heads).
    client : dask.distributed.Client, optional
        As for ShardedAttention: None starts a LocalCluster, stopped by :meth:`close`.
    buffer : int, default 16384
        Buffered update actions per head that trigger sending them.
    **engine_kwargs
        ``scale``, ``dtype`` and ``policy`` for every head (a policy object is copied per
        head, since policies keep per-engine state).

    Notes
    -----
    Memory per worker: its H/W heads' engines, ~(4·n + 3·m)·d numbers each; on the client
    every head's Q, K, V. A flush costs O(m·|S_h|·d) per head, the heads of a worker one after
    another, the workers in parallel.
    """

    def __init__(self, Q, K, V, *, client=None, buffer: int = 16384, **engine_kwargs):
        policy = as_policy(engine_kwargs.pop("policy", None))
        checked_buffer(buffer)
        Qs, Ks, Vs = (list(x) for x in (Q, K, V))
        if not len(Qs) == len(Ks) == len(Vs) >= 1:
            raise ValueError(
                f"Q, K and V hold {len(Qs)}, {len(Ks)} and {len(Vs)} heads; expected the same "
                "number, at least one"
            )
        inputs = []
        for h, arrays in enumerate(zip(Qs, Ks, Vs, strict=True)):
            try:
                inputs.append(checked_inputs(*arrays, engine_kwargs))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"head {h}: {exc}") from exc
            if inputs[h][0].shape != inputs[0][0].shape or inputs[h][1].shape != inputs[0][1].shape:
                raise ValueError(
                    f"head {h} has Q {inputs[h][0].shape} and K {inputs[h][1].shape}; head 0 "
                    f"has Q {inputs[0][0].shape} and K {inputs[0][1].shape}: heads must match"
                )
        self._cluster = Cluster(client)
        try:
            workers = self._cluster.workers()
            shared = Cluster(self._cluster.client)  # the heads use it but never stop it
            self._heads = []
            futures = []
            for h, checked in enumerate(inputs):
                head = ShardedAttention.__new__(ShardedAttention)
                place = [workers[h % len(workers)]]
                head._place(shared, checked, [0, len(checked[0])], place, buffer)
                head._label = f"head {h} ("
                futures.append(head._submit([0]))  # every head's engine builds at once
                self._heads.append(head)
            for head, fut in zip(self._heads, futures, strict=True):
                head._setup(copy.deepcopy(policy), fut)
        except BaseException:
            self._cluster.close()
            raise
        first = self._heads[0]
        self._m, self._n, self._d, self._dtype = first.m, first.n, first.d, first.dtype

    # ------------------------------------------------------------------ properties
    heads = property(lambda self: len(self._heads), doc="Number of heads H.")
    m = property(lambda self: self._m, doc="Queries per head.")
    n = property(lambda self: self._n, doc="Keys and values per head.")
    d = property(lambda self: self._d, doc="Head dimension.")
    dtype = property(lambda self: self._dtype, doc="Working dtype.")
    pending = property(
        lambda self: sum(h.pending for h in self._heads),
        doc="Update actions since each head's last flush, summed over heads.",
    )

    def head(self, h) -> ShardedAttention:
        """Head ``h`` as an engine (the whole LazyAttention interface)."""
        return self._heads[check.check_index("h", h, len(self._heads))]

    # ------------------------------------------------------------------ updates
    def update_k(self, h, i, j, delta) -> FlushEvent | None:
        """Add ``delta`` to ``K_h[i, j]``; buffered, O(1)."""
        return self.head(h).update_k(i, j, delta)

    def update_v(self, h, i, j, delta) -> FlushEvent | None:
        """Add ``delta`` to ``V_h[i, j]``; buffered, O(1)."""
        return self.head(h).update_v(i, j, delta)

    def set_k_row(self, h, i, row) -> FlushEvent | None:
        """Replace ``K_h[i]`` by ``row`` (d,)."""
        return self.head(h).set_k_row(i, row)

    def set_v_row(self, h, i, row) -> FlushEvent | None:
        """Replace ``V_h[i]`` by ``row`` (d,)."""
        return self.head(h).set_v_row(i, row)

    def update_k_many(self, heads, rows, cols, deltas) -> list[FlushEvent]:
        """Add ``deltas`` to ``K[heads, rows, cols]`` (each array of shape (k,)); all or
        nothing across heads. Returns the flushes the batch triggered."""
        return self._entries("K", heads, rows, cols, deltas)

    def update_v_many(self, heads, rows, cols, deltas) -> list[FlushEvent]:
        """Add ``deltas`` to ``V[heads, rows, cols]``; see :meth:`update_k_many`."""
        return self._entries("V", heads, rows, cols, deltas)

    def set_k_rows(self, heads, rows, values) -> list[FlushEvent]:
        """Replace ``K[heads[k], rows[k]]`` by ``values[k]`` (values (k, d)); all or nothing."""
        return self._rows("K", heads, rows, values)

    def set_v_rows(self, heads, rows, values) -> list[FlushEvent]:
        """Replace ``V[heads[k], rows[k]]`` by ``values[k]``; all or nothing."""
        return self._rows("V", heads, rows, values)

    def _groups(self, heads, rows):
        """Checked ``(heads, rows)`` arrays and ``(head, mask)`` for each head addressed."""
        hs = check.as_indices("heads", heads, len(self._heads))
        r = check.as_indices("rows", rows, self._n)
        if len(r) != len(hs):
            raise ValueError(f"heads has {len(hs)} entries but rows has {len(r)}")
        return hs, r, [(h, hs == h) for h in np.unique(hs).tolist()]

    def _entries(self, which, heads, rows, cols, deltas) -> list[FlushEvent]:
        _hs, r, groups = self._groups(heads, rows)
        c = check.as_indices("cols", cols, self._d)
        if len(c) != len(r):
            raise ValueError(f"rows has {len(r)} entries but cols has {len(c)}")
        dl = check.as_vector("deltas", deltas, len(r), self._dtype)
        for h, mask in groups:  # every head's sums checked before any head is written
            head = self._heads[h]
            try:
                target = head._K if which == "K" else head._V
                flat, final = check.entry_sums(which, target, r[mask], c[mask], dl[mask])
                head._limits.check_sums(which, flat, final, self._d)
            except ValueError as exc:
                raise ValueError(f"head {h}: {exc}") from exc
        name = f"update_{which.lower()}_many"
        events = [getattr(self._heads[h], name)(r[m], c[m], dl[m]) for h, m in groups]
        return [e for e in events if e is not None]

    def _rows(self, which, heads, rows, values) -> list[FlushEvent]:
        hs, r, groups = self._groups(heads, rows)
        vals = check.as_matrix("values", values, self._dtype, shape=(len(r), self._d))
        pairs = hs * self._n + r
        if len(np.unique(pairs)) != len(pairs):
            raise ValueError("(heads, rows) repeats a row; a row can be set once per call")
        for h, mask in groups:  # every head's limits checked before any head is written
            try:
                self._heads[h]._limits.check("values", which, vals[mask])
            except ValueError as exc:
                raise ValueError(f"head {h}: {exc}") from exc
        name = f"set_{which.lower()}_rows"
        events = [getattr(self._heads[h], name)(r[m], vals[m]) for h, m in groups]
        return [e for e in events if e is not None]

    # ------------------------------------------------------------------ parallel calls
    def _each(self, operation: str, issue, finish=lambda head, result: result) -> dict:
        """``issue(h, head)`` on every head (starting remote calls), then
        ``finish(head, results)`` as they complete; ShardError naming every head that
        failed (the others' results are lost to the caller, not their effects)."""
        started = {h: issue(h, head) for h, head in enumerate(self._heads)}
        started = {h: s for h, s in started.items() if s is not None}
        out, failures = {}, []
        for h, s in started.items():
            try:
                out[h] = finish(self._heads[h], s)
            except ShardError as exc:
                failures.extend(exc.failures)
        if failures:
            raise ShardError(operation, failures)
        return out

    def _on_all(self, name: str, *args, ship: bool = True) -> list:
        """``name(*args)`` on every head's engine, in parallel; results by head."""
        out = self._each(
            name,
            lambda h, head: [head._issue(0, name, *args, ship=ship)],
            lambda head, calls: head._gather(name, calls)[0],
        )
        return [out[h] for h in range(len(self._heads))]

    def flush(self) -> list[FlushEvent | None]:
        """Flush every head with pending updates, in parallel; one entry per head. Every
        head's policy is told first (``before_flush``): one that refuses stops them all."""
        for head in self._heads:
            head._before_flush()
        out = self._each("flush", lambda h, head: head._begin("flush"), ShardedAttention._end)
        return [out.get(h) for h in range(len(self._heads))]

    def rebuild(self) -> list[FlushEvent]:
        """Recompute every head exactly, in parallel (policies told first, as :meth:`flush`)."""
        for head in self._heads:
            head._before_flush(rebuild=True)
        out = self._each("rebuild", lambda h, head: head._begin("rebuild"), ShardedAttention._end)
        return [out[h] for h in range(len(self._heads))]

    # ------------------------------------------------------------------ queries
    def query(self, h, i, j, stale: bool = False) -> float:
        """Output entry ``O_h[i, j]``; exact, or cached if ``stale``."""
        return self.head(h).query(i, j, stale)

    def query_row(self, h, i, stale: bool = False) -> np.ndarray:
        """Output row ``O_h[i]`` (d,); exact, or cached if ``stale``."""
        return self.head(h).query_row(i, stale)

    def query_many(self, heads, rows, cols, stale: bool = False) -> np.ndarray:
        """Entries ``O[heads[k], rows[k], cols[k]]`` (k,), the heads queried in parallel."""
        hs = check.as_indices("heads", heads, len(self._heads))
        r = check.as_indices("rows", rows, self._m)
        c = check.as_indices("cols", cols, self._d)
        if not len(hs) == len(r) == len(c):
            raise ValueError(f"heads, rows and cols have {len(hs)}, {len(r)} and {len(c)} entries")
        masks = {h: hs == h for h in np.unique(hs).tolist()}
        t0 = time.perf_counter()

        def issue(h, head):
            if h in masks:
                m = masks[h]
                return [head._issue(0, "query_many", r[m], c[m], stale, ship=not stale)]
            return None

        def finish(head, calls):
            result = head._gather("query_many", calls)[0]
            if not stale:
                head._count_queries(len(result), t0)
            return result

        out = np.empty(len(r), dtype=self._dtype)
        for h, values in self._each("query_many", issue, finish).items():
            out[masks[h]] = values
        return out

    def output(self, stale: bool = False) -> np.ndarray:
        """Every head's whole output (H, m, d); exact, or the cached view."""
        return np.stack(self._on_all("output", stale, ship=not stale))

    def approximation_error(self) -> list[ErrorReport]:
        """Each head's stale-vs-exact error, in parallel."""
        parts = self._on_all("norms", None)
        return [head._report([p]) for head, p in zip(self._heads, parts, strict=True)]

    # ------------------------------------------------------------------ life cycle
    def memory(self) -> list[dict]:
        """Per head: its worker, its engine's array bytes, its worker process's RSS."""
        infos = self._on_all("info", ship=False)
        return [dict(i, worker=head._places[0]) for i, head in zip(infos, self._heads, strict=True)]

    def recover(self) -> list[int]:
        """Restart the heads whose worker was lost (see ShardedAttention.recover)."""
        return [h for h, head in enumerate(self._heads) if head.recover()]

    def close(self) -> None:
        """Release every head and stop the cluster if this object started it."""
        for head in self._heads:
            head.close()
        self._cluster.close()

    def __enter__(self) -> MultiHeadAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention(heads={len(self._heads)}, m={self._m}, n={self._n}, "
            f"d={self._d}, dtype={self._dtype}, pending={self.pending}, "
            f"workers={len({h._places[0] for h in self._heads})})"
        )
