"""What lives on a Dask worker: one :class:`~dynattn.engine.LazyAttention` held by an actor.

The engine never flushes by itself there: the client owns the policy, so every shard's stale
view is as of the same flush. Imported on the workers (by pickle reference): it imports the
engine and nothing of Dask.
"""

from __future__ import annotations

import os

import numpy as np
import psutil  # a dependency of dask.distributed

from ..engine import LazyAttention
from ..engine.reports import FrobeniusNorm
from ..policies import Fixed

__all__ = ["EngineHost", "copy_engine"]


# the shards' policy: never flush unasked (the client decides, for every shard at once)
_NEVER = Fixed(2**62)


class EngineHost:
    """A ``LazyAttention(Q, K, V)`` on a worker, driven by :meth:`run` calls from the client.

    Created with ``client.submit(EngineHost, Q, K, V, kwargs, actor=True, workers=[w])``; its
    methods run one at a time in the worker's actor thread, so the engine needs no lock.
    Memory: the engine's ~8·n·d numbers for n keys (K, V, their snapshot, Q block, caches).
    """

    def __init__(self, Q, K, V, engine_kwargs: dict, engine: LazyAttention | None = None):
        # ``engine``: adopt one made on this worker (:func:`copy_engine`) instead of building
        self.engine = engine or LazyAttention(Q, K, V, policy=_NEVER, **engine_kwargs)

    def run(self, batch, name: str | None, *args):
        """Apply ``batch`` (rows of K and V with their current values, from the client's
        buffer), then call the engine method ``name`` (or the host's ``norms``, ``info``)
        with ``args`` and return its result.

        ``batch`` is ``(k_rows, k_values, v_rows, v_values)`` or None: writing rows to the
        values the client holds is idempotent, so a batch sent twice (a retry after a failure)
        does no harm. Costs O(|batch|·d) plus the call.
        """
        eng = self.engine
        if batch is not None:
            k_rows, k_vals, v_rows, v_vals = batch
            if len(k_rows):
                eng.set_k_rows(k_rows, k_vals)
            if len(v_rows):
                eng.set_v_rows(v_rows, v_vals)
        if name is None:
            return None
        target = self if name in ("norms", "info") else eng
        return getattr(target, name)(*args)

    def norms(self, rows=None) -> tuple[float, float, float, float]:
        """``(scale, ssq)`` of ``O_stale − O`` and of ``O`` over the output ``rows`` (all when
        None), as the engine's error norms accumulate them (see ``FrobeniusNorm``), so the
        client can merge the shards' parts without overflow; O(rows·|S|·d)."""
        eng = self.engine
        if rows is None:
            exact, stale = eng.output(), eng.output(stale=True)
        else:
            idx = np.asarray(rows, dtype=np.int64)
            exact = eng._rows_out(idx, stale=False, count=0)  # not a user query: not counted
            stale = eng._rows_out(idx, stale=True, count=0)
        diff, total = FrobeniusNorm(), FrobeniusNorm()
        diff.add(stale - exact)
        total.add(exact)
        return diff.scale, diff.ssq, total.scale, total.ssq

    def info(self) -> dict:
        """Where the engine lives and what it holds (bytes of its arrays, the process RSS)."""
        eng = self.engine
        return {
            "pid": os.getpid(),
            "nbytes": eng.nbytes,
            "rss": psutil.Process().memory_info().rss,
            "max_correction_rows": eng.max_correction_rows,
            "max_query_rows": eng.max_query_rows,
        }


def copy_engine(key: str) -> LazyAttention:
    """A copy of the engine of the actor ``key``, made on the worker that holds it (run as a
    task there, so the copy never travels): O((m + n)·d), no rebuild. The caller has no call
    to that actor running."""
    from distributed import get_worker  # on the worker, where Dask is loaded anyway

    return get_worker().state.actors[key].engine.copy(policy=_NEVER)
