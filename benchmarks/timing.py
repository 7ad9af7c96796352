"""How strategies are driven and timed: update streams as call lists, turns between
strategies, the cycle collector paused, warm-ups, fresh engine copies and best-of repeats.

Every timing is ``time.perf_counter`` wall time. Strategies timed against each other take turns
on the same stream (:func:`drive`), so they see the same moments of a machine whose speed drifts
by tens of percent within seconds. Nothing here knows which section uses it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time

import numpy as np

from dynattn import LazyAttention
from dynattn.workloads import UpdateStream

__all__ = [
    "TURN",
    "Actions",
    "Never",
    "best_of",
    "composed",
    "drive",
    "fresh",
    "gc_paused",
    "interleaved",
    "seconds_each",
    "warm_up",
]

# Updates per turn when strategies take turns (drive): long enough for each to have its own
# data cached, short against the machine's drift (a turn lasts 1-300 ms).
TURN = 256


class Never:
    """Policy that never flushes: the benchmark flushes explicitly where it needs to."""

    def threshold(self, engine) -> float:
        return math.inf

    def valid_until(self, engine) -> float:
        return math.inf

    def __repr__(self) -> str:
        return "Never()"


class Actions:
    """Consecutive update actions of one :class:`~dynattn.workloads.UpdateStream`, as
    ``(code, args)`` pairs.

    Codes: 0 ``update_k(i, j, delta)``, 1 ``update_v``, 2 ``set_k_row(i, row)``, 3
    ``set_v_row``; in the order the stream produces them (16 per tick). Arguments are Python
    numbers and rows in the working dtype, as a caller would pass them.
    """

    def __init__(self, kind: str, n: int, d: int, dtype, seed: int):
        self.stream = UpdateStream(kind, n, d, updates_per_tick=16, seed=seed)
        self.dtype = np.dtype(dtype)
        self._tick = 0
        self._buffer: list = []
        self._rng = np.random.default_rng([seed, n, 17])
        self.n, self.d = n, d

    def take(self, count: int) -> list:
        """The next ``count`` actions of the stream."""
        while len(self._buffer) < count:
            u = self.stream.next_tick(self._tick)
            self._tick += 1
            for code, rows, cols, deltas in (
                (0, u.k_rows, u.k_cols, u.k_deltas),
                (1, u.v_rows, u.v_cols, u.v_deltas),
            ):
                self._buffer.extend(
                    (code, args)
                    for args in zip(rows.tolist(), cols.tolist(), deltas.tolist(), strict=True)
                )
            for code, rows, values in (
                (2, u.k_set_rows, u.k_set_values),
                (3, u.v_set_rows, u.v_set_values),
            ):
                vals = values.astype(self.dtype)
                self._buffer.extend((code, (i, vals[t])) for t, i in enumerate(rows.tolist()))
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        return out

    def positions(self, count: int) -> list:
        """``count`` random ``(row, column)`` positions for exact queries."""
        rows = self._rng.integers(0, self.n, count).tolist()
        cols = self._rng.integers(0, self.d, count).tolist()
        return list(zip(rows, cols, strict=True))


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside (as timeit does): a full collection over the run's
    millions of objects (queued actions, results) takes 40-100 ms and fell on whichever
    strategy was allocating at the time, one query of a cell's twenty."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def drive(
    targets: list, actions: list, query_after=(), positions=(), turn: int = TURN
) -> list[tuple]:
    """Apply ``actions`` to each of ``targets``, one call each; after update index ``t`` in
    ``query_after`` ask each one exact query. Returns, per target, (seconds in updates,
    seconds of each query).

    Several targets take turns, in an order reversed every turn: they see the same moments
    of a machine whose speed drifts by tens of percent within seconds, and none always runs
    right after the other. A turn runs ``turn`` updates or more (up to the next query), so
    each target works for a while with its own data in the shared last-level cache: with
    turns of one update and one query, a target whose queries read all of K and V (on
    demand) kept them cached and the engine, whose fresh queries are rare, found its own
    evicted (its fresh query took 470 µs against 210 at n = 16,384, the same function).
    """
    perf = time.perf_counter
    calls = [
        [((t.update_k, t.update_v, t.set_k_row, t.set_v_row)[code], args) for code, args in actions]
        for t in targets
    ]
    stops = [t + 1 for t in query_after] + [len(actions)]
    turns, first = [[]], 0  # per turn: (start, stop, query index) segments
    for q, stop in enumerate(stops):
        turns[-1].append((stops[q - 1] if q else 0, stop, q))
        if stop - first >= turn:
            turns.append([])
            first = stop
    update_s, query_s = [0.0] * len(targets), [[] for _ in targets]
    order = list(range(len(targets)))
    with gc_paused():
        for segments in filter(None, turns):
            for k in order:
                for start, stop, q in segments:
                    t0 = perf()
                    for call, args in calls[k][start:stop]:
                        call(*args)
                    update_s[k] += perf() - t0
                    if q < len(positions) and q < len(stops) - 1:
                        i, j = positions[q]
                        t0 = perf()
                        targets[k].query(i, j)
                        query_s[k].append(perf() - t0)
            order.reverse()
    return list(zip(update_s, query_s, strict=True))


def warm_up(targets: list, actions: list, query_after=(), positions=()) -> None:
    """Untimed updates (and queries) that let an adaptive policy fit, then an untimed flush:
    the timed window starts with nothing queued, as every other strategy's does, instead of
    paying for rows queued while the clock was off."""
    drive(targets, actions, query_after, positions)
    for target in targets:
        if hasattr(target, "flush"):
            target.flush()


def composed(target, src: Actions, updates: int, samples: int, rng, warmup: int = 0) -> dict:
    """Time ``updates`` updates, with ``samples`` exact queries at random points (timed apart).

    For strategies whose work does not depend on queries: cost at q queries per update is
    ``update_s + q · query_mean``.
    """
    if warmup:
        warm_up([target], src.take(warmup))
    actions = src.take(updates)
    at = np.sort(rng.choice(updates, size=min(samples, updates), replace=False)).tolist()
    [(update_s, query_s)] = drive([target], actions, at, src.positions(len(at)))
    return {
        "updates": updates,
        "update_s": update_s / updates,
        "query_s": float(np.mean(query_s)),
        "query_median_s": float(np.median(query_s)),
        "queries": len(query_s),
        "warmup": warmup,
    }


def interleaved(
    targets: dict, src: Actions, warmup: int, updates: int, rate: float
) -> dict[str, dict]:
    """Run ``targets`` (label: strategy) side by side with real queries every ``1/rate``
    updates, taking turns (:func:`drive`): ``warmup`` untimed updates, then ``updates`` timed
    ones. With no query in the timed window, the query share comes from 8 queries timed after
    it. An engine's threshold at the end is reported."""
    period = round(1 / rate)
    at = list(range(period - 1, warmup + updates, period))
    pos = src.positions(len(at))
    warm_at = [t for t in at if t < warmup]
    warm_up(list(targets.values()), src.take(warmup), warm_at, pos[: len(warm_at)])
    timed_at = [t - warmup for t in at if t >= warmup]
    timed = drive(list(targets.values()), src.take(updates), timed_at, pos[len(warm_at) :])
    if not timed_at:
        after = drive(list(targets.values()), [], range(8), src.positions(8))
    out = {}
    for k, (label, target) in enumerate(targets.items()):
        update_s, query_s = timed[k]
        if query_s:
            per_query = float(np.mean(query_s))
            total_s = (update_s + sum(query_s)) / updates
            method = "interleaved"
        else:
            per_query = float(np.mean(after[k][1]))
            total_s = update_s / updates + rate * per_query
            method = "interleaved (no query in window; share from 8 queries after it)"
        if len(targets) > 1:
            method += ", taking turns with " + " and ".join(t for t in targets if t != label)
        out[label] = {
            "updates": updates,
            "update_s": update_s / updates,
            "query_s": per_query,
            "queries": len(query_s),
            "total_s": total_s,
            "warmup": warmup,
            "threshold_end": getattr(target, "threshold", None),
            "method": method,
        }
    return out


def fresh(base: LazyAttention, policy) -> LazyAttention:
    """A copy of the built ``base`` engine (O(n·d), no rebuild) with ``policy``, warmed.

    Flushes of 1 and 64 touched rows (rewriting rows with their own values) size the copy's
    reused workspaces, so its first timed flush does not pay page faults that a running
    engine never sees; the logs are then cleared so that adaptive policies fit only their own
    run.
    """
    engine = base.copy(policy=Never())
    rng = np.random.default_rng(engine.n)
    for rows in (1, min(64, engine.n)):
        idx = rng.choice(engine.n, rows, replace=False)
        engine.set_k_rows(idx, np.array(engine.K[idx]))
        engine.flush()
    engine.flush_log.clear()
    engine.query_log.clear()
    engine.policy = policy
    return engine


def seconds_each(calls) -> list[float]:
    """Seconds of each call of ``calls``, pairs ``(func, args)`` run in turn as ``func(*args)``
    (the arguments are made beforehand, outside the clock)."""
    perf = time.perf_counter
    out = []
    for func, args in calls:
        t0 = perf()
        func(*args)
        out.append(perf() - t0)
    return out


def best_of(func, reps: int = 3) -> float:
    """Fewest seconds of ``reps`` calls of ``func()``: slow spells of a shared machine only
    ever add time, so the best run is the comparable one."""
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best
