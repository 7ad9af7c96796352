"""Flush policies: when should a lazy engine apply its queued updates?

A policy is any object with ``threshold(engine) -> float``: the engine flushes as soon as its
pending update count reaches that number (``math.inf`` means "not now"). It may also have
``on_flush(event)``, called after every flush with the :class:`~dynattn.engine.FlushEvent`.
Policies read only the engine's public state (counters, logs, ``rows_error``), so any policy
works with any engine, and users can write their own: a plain callable ``engine -> float`` is
accepted too.
"""

from __future__ import annotations

import math
import numbers
from collections import deque

import numpy as np

__all__ = ["CostModel", "ErrorBudget", "Fixed", "OriginalAdaptive", "adaptive_threshold",
           "as_policy"]


def adaptive_threshold(avg_updates: int, matrix_size: int) -> int:
    """The original prototype's rule: ``max(10, min(100, int(avg · log10(n·d))))``.

    Parameters
    ----------
    avg_updates : int
        Average number of updates per flush over the last 10 flushes.
    matrix_size : int
        ``n · d``.
    """
    return max(10, min(100, int(avg_updates * np.log10(matrix_size))))


class Fixed:
    """Flush every ``k`` update actions (``k=1`` is eager maintenance).

    Parameters
    ----------
    k : int, default 10
        Threshold, at least 1 (the original prototype's default is 10).
    """

    def __init__(self, k: int = 10):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1")
        self.k = int(k)

    def threshold(self, engine) -> float:
        return self.k

    def __repr__(self) -> str:
        return f"Fixed({self.k})"


class OriginalAdaptive:
    """The original prototype's adaptive threshold, with its bookkeeping bug fixed.

    After each flush the threshold becomes ``func(int(avg), n·d)``, where ``avg`` is the mean
    number of updates applied by the last 10 flushes. The original reset its counter before
    recording it, so it averaged zeros and its threshold never left 10; this records the real
    count, so the threshold moves (to 46, then up to 100, for the original demo).

    Parameters
    ----------
    initial : int, default 10
        Threshold before the first flush.
    func : callable ``(avg_updates, matrix_size) -> int``, default :func:`adaptive_threshold`
    window : int, default 10
        Flushes averaged.
    """

    def __init__(self, initial: int = 10, func=adaptive_threshold, window: int = 10):
        if isinstance(initial, bool) or not isinstance(initial, numbers.Integral) or initial < 1:
            raise ValueError(f"initial={initial!r} must be an integer >= 1")
        if not callable(func):
            raise TypeError(f"func={func!r} must be callable (avg_updates, matrix_size) -> int")
        self.initial = int(initial)
        self.func = func
        self.history: deque[int] = deque(maxlen=window)
        self.current = self.initial
        self._size = None

    def threshold(self, engine) -> float:
        self._size = engine.n * engine.d
        return self.current

    def on_flush(self, event) -> None:
        self.history.append(event.updates)
        if self._size is not None:
            avg = sum(self.history) / len(self.history)
            self.current = int(self.func(int(avg), self._size))

    def __repr__(self) -> str:
        return f"OriginalAdaptive(current={self.current})"


class CostModel:
    """Pick the threshold that minimises the measured cost per update (the default policy).

    Model, per update action, for threshold k, r exact queries per update and ρ distinct
    touched rows per pending update::

        cost(k) ≈ (f0 + f1·ρk)/k  +  r·(q0 + q1·ρk/2)
                = f0/k + f1·ρ + r·q0 + r·q1·ρ·k/2

    where ``f0 + f1·rows`` is a flush's cost and ``q0 + q1·S`` an exact query's cost with S
    touched rows pending (on average ρk/2 over a flush cycle). Minimising gives the
    square-root rule ``k* = sqrt(2·f0 / (r·q1·ρ))``: k* = 1 (eager) when queries dominate,
    k* = ∞ (never flush; queries corrected on demand, and computed from scratch once that is
    cheaper) when queries are rare. ``f0, f1`` are fitted to the engine's recorded flush times,
    ``q0, q1`` to its recorded query times, ``r`` and ``ρ`` to the recent stream, so the
    threshold follows the machine and the workload as they change.

    Parameters
    ----------
    initial : int, default 16
        Threshold used until the first flush and query timings exist.
    window : int, default 2048
        Update actions over which the query rate r is measured.
    max_threshold : float, default inf
        Upper bound on k (``inf`` allows the never-flush regime).
    """

    def __init__(self, initial: int = 16, window: int = 2048, max_threshold: float = math.inf):
        if isinstance(initial, bool) or not isinstance(initial, numbers.Integral) or initial < 1:
            raise ValueError(f"initial={initial!r} must be an integer >= 1")
        if not (isinstance(window, numbers.Integral) and window >= 1):
            raise ValueError(f"window={window!r} must be an integer >= 1")
        if not max_threshold >= 1:
            raise ValueError(f"max_threshold={max_threshold!r} must be >= 1")
        self.initial = int(initial)
        self.window = int(window)
        self.max_threshold = max_threshold
        self.current: float = float(initial)
        self._marks: deque[tuple[int, int]] = deque()
        self._next_refit = 0
        self.fitted: dict[str, float] = {}

    def threshold(self, engine) -> float:
        u = engine.n_updates
        if u >= self._next_refit:
            self._marks.append((u, engine.n_queries))
            while len(self._marks) > 2 and u - self._marks[1][0] >= self.window:
                self._marks.popleft()
            self.current = self._optimum(engine)
            # refitting costs a few small least-squares solves; every 32 updates is plenty
            self._next_refit = u + 32
        return self.current

    def on_flush(self, event) -> None:
        self._next_refit = 0

    def query_rate(self) -> float:
        """Exact queries per update action over the recent window."""
        (u0, q0), (u1, q1) = self._marks[0], self._marks[-1]
        return (q1 - q0) / (u1 - u0) if u1 > u0 else 0.0

    def _optimum(self, engine) -> float:
        flushes = [e for e in engine.flush_log if e.kind == "incremental"][-64:]
        queries = list(engine.query_log)
        if not flushes or not queries:
            # no query seen yet in a window: queries are rare, so flushing buys nothing
            if len(self._marks) > 1 and not queries and self._span() >= self.window:
                return self.max_threshold
            return float(self.initial)
        f0, _ = _fit_line([e.rows for e in flushes], [e.seconds for e in flushes])
        q0, q1 = _fit_line([s for s, _, _ in queries], [t / max(m, 1) for _, m, t in queries])
        rho = sum(e.rows for e in flushes) / max(1, sum(e.updates for e in flushes))
        r = self.query_rate()
        self.fitted = {"f0": f0, "q0": q0, "q1": q1, "rho": rho, "r": r}
        if r <= 0 or q1 <= 0:
            return self.max_threshold
        k = math.sqrt(2.0 * f0 / (r * q1 * rho))
        return float(min(self.max_threshold, max(1.0, k)))

    def _span(self) -> int:
        return self._marks[-1][0] - self._marks[0][0]

    def __repr__(self) -> str:
        return f"CostModel(current={self.current:.4g})"


def _fit_line(x, y) -> tuple[float, float]:
    """Least-squares ``y ≈ a + b·x`` with a, b ≥ 0; a through-origin slope when x is constant."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) >= 3 and np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
        if a >= 0 and b >= 0:
            return float(a), float(b)
        if b < 0:  # cost does not grow with rows in this range: all of it is overhead
            return float(max(np.median(y), 0.0)), 0.0
        return 0.0, float(max(np.dot(x, y) / np.dot(x, x), 0.0))
    # one size seen: split the cost evenly between overhead and per-row part
    med_x = float(np.median(x)) if len(x) else 1.0
    med_y = float(np.median(y)) if len(y) else 0.0
    return 0.5 * med_y, 0.5 * med_y / max(med_x, 1.0)


class ErrorBudget:
    """Flush when the stale view's relative error would exceed ``tolerance``.

    After every update the policy measures the stale-vs-exact error exactly on a fixed set of
    output rows (``engine.rows_error``, O(sample·|S|·d)) and flushes once that estimate reaches
    ``safety · tolerance``. The rows are evenly spaced with a random offset, redrawn at every
    flush, so banded (local) attention patterns are not missed systematically.

    Guarantee: with ``sample >= n`` the estimate *is* the true relative Frobenius error, so the
    stale view's error stays below ``tolerance`` after every update, except where one single
    update alone moves it past the budget (it is then flushed at once). With fewer rows the
    estimate is a ratio of two sampled sums, accurate when the error is spread over rows; the
    ``safety`` margin (default 0.5) absorbs sampling error.

    Parameters
    ----------
    tolerance : float
        Relative Frobenius error allowed, in (0, 1].
    sample : int, default 64
        Output rows checked.
    safety : float, default 0.5
        Flush when the estimate reaches ``safety · tolerance``.
    seed : int, default 0
    """

    def __init__(self, tolerance: float, sample: int = 64, safety: float = 0.5, seed: int = 0):
        if not (isinstance(tolerance, numbers.Real) and 0 < tolerance <= 1):
            raise ValueError(f"tolerance={tolerance!r} must be in (0, 1]")
        if not (isinstance(sample, numbers.Integral) and sample >= 1):
            raise ValueError(f"sample={sample!r} must be an integer >= 1")
        if not (isinstance(safety, numbers.Real) and 0 < safety <= 1):
            raise ValueError(f"safety={safety!r} must be in (0, 1]")
        self.tolerance = float(tolerance)
        self.sample = int(sample)
        self.safety = float(safety)
        self._rng = np.random.default_rng(seed)
        self._rows = None
        self.estimate = 0.0
        self.current: float = math.inf

    def threshold(self, engine) -> float:
        pending = engine.pending
        if pending == 0:
            return math.inf
        if self._rows is None or self._rows.max(initial=0) >= engine.n:
            self._draw(engine.n)
        diff, total = engine.rows_error(self._rows)
        if total == 0.0:
            self.estimate = 0.0 if diff == 0.0 else math.inf
        else:
            self.estimate = math.sqrt(diff / total)
        budget = self.safety * self.tolerance
        # report the pending count at which the budget would be met if error grows linearly
        self.current = pending * budget / self.estimate if self.estimate > 0 else math.inf
        if self.estimate >= budget:
            self.current = float(pending)
        return self.current

    def on_flush(self, event) -> None:
        self._rows = None
        self.estimate = 0.0

    def _draw(self, n: int) -> None:
        if self.sample >= n:
            self._rows = np.arange(n)
        else:
            step = n / self.sample
            self._rows = (self._rng.random() * step + step * np.arange(self.sample)).astype(int)

    def __repr__(self) -> str:
        return f"ErrorBudget(tolerance={self.tolerance:g})"


class _CallablePolicy:
    def __init__(self, func):
        self.func = func

    def threshold(self, engine) -> float:
        return self.func(engine)

    def __repr__(self) -> str:
        return f"callable({getattr(self.func, '__name__', self.func)!r})"


def as_policy(policy):
    """A policy object from ``None`` (CostModel), an int k (Fixed), a policy or a callable."""
    if policy is None:
        return CostModel()
    if isinstance(policy, numbers.Integral) and not isinstance(policy, bool):
        return Fixed(policy)
    if callable(getattr(policy, "threshold", None)):
        return policy
    if callable(policy):
        return _CallablePolicy(policy)
    raise TypeError(f"policy={policy!r} must be None, an int, a callable engine -> threshold, "
                    "or an object with threshold(engine)")
