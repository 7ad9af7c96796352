"""Flush policies: when should a lazy engine apply its queued updates?

A policy is any object with ``threshold(engine) -> float``: the engine flushes as soon as its
pending update count reaches that number (``math.inf`` means "not now"). The engine asks after
every update action, unless the policy also has ``valid_until(engine) -> float``: the update
count (``engine.n_updates``) up to which its threshold stays what it just said, barring a
flush; it is then asked again only after that count or at the threshold (asking costs as much
as an update). It may also have ``on_flush(event)``, called after every flush with the
:class:`~dynattn.engine.FlushEvent`.
Policies read only the engine's public state (counters, logs, ``rows_error``), so any policy
works with any engine, and users can write their own: a plain callable ``engine -> float`` is
accepted too.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter, deque

import numpy as np

from ._validate import check_int
from .protocols import FlushPolicy

__all__ = [
    "CostModel",
    "ErrorBudget",
    "Fixed",
    "OriginalAdaptive",
    "adaptive_threshold",
    "as_policy",
]


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

    reads_answers = False  # counters and logs only: see FlushPolicy

    def __init__(self, k: int = 10):
        self._k = check_int("k", k)

    k = property(
        lambda self: self._k,
        doc="The threshold (read-only: engines rely on it "
        "holding; assign a new policy to change it).",
    )

    def threshold(self, engine) -> float:
        return self._k

    def valid_until(self, engine) -> float:
        return math.inf

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
        Asked once per flush, before it (:meth:`before_flush`): an answer that is not a
        finite number ≥ 1 refuses the flush, which then changes nothing. Truncated to int.
    window : int, default 10
        Flushes averaged.
    name : str, default "func"
        How error messages call ``func``.
    """

    reads_answers = False  # counters and logs only: see FlushPolicy

    def __init__(
        self, initial: int = 10, func=adaptive_threshold, window: int = 10, *, name: str = "func"
    ):
        initial = check_int("initial", initial)
        if not callable(func):
            raise TypeError(f"{name}={func!r} must be callable (avg_updates, matrix_size) -> int")
        self.initial = int(initial)
        self.func, self.name = func, name
        self.history: deque[int] = deque(maxlen=window)
        self.current = self.initial
        self._size = None
        self._next = None  # (updates, threshold after a flush of that many), from before_flush

    def threshold(self, engine) -> float:
        self._size = engine.n * engine.d
        return self.current

    def valid_until(self, engine) -> float:
        return math.inf  # it moves only in on_flush

    def before_flush(self, updates: int) -> None:
        """Ask ``func`` for the threshold after a flush of ``updates`` and check the answer;
        raises (naming ``func`` and its arguments) before the flush when it is no threshold."""
        self._next = None
        if self._size is not None:  # asked by an engine: its size is known
            counts = [*self.history, updates][-self.history.maxlen :]
            args = (int(sum(counts) / len(counts)), self._size)
            self._next = (updates, self._checked(args, self.func(*args)))

    def _checked(self, args, value) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{self.name}{args} returned {value!r}; expected a number >= 1")
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(f"{self.name}{args} returned {value!r}; expected a finite number >= 1")
        return int(value)

    def on_flush(self, event) -> None:
        prepared, self._next = self._next, None
        if prepared is None or prepared[0] != event.updates:  # a flush the engine did not announce
            self.before_flush(event.updates)
            prepared, self._next = self._next, None
        self.history.append(event.updates)
        if prepared is not None:
            self.current = prepared[1]

    def __repr__(self) -> str:
        return f"OriginalAdaptive(current={self.current})"


_FIT_QUERIES = 128  # queries of the engine's log that a refit uses at most
_MIN_PERIOD = 32  # updates between two refits of the cost model, at the least


class CostModel:
    """Pick the flush threshold that minimises the measured cost per update (the default).

    For a threshold k, with r exact query entries per update and ``rows(k)`` distinct rows
    touched by k updates, the cost per update is modelled as ::

        cost(k) = (f0 + f1·min(rows(k), Fmax)) / k  +  r·min(q0 + q1·min(rows̄(k), Smax), Qf)

    * ``f0 + f1·rows`` is one flush (f0 holds the O(n·d) passes every flush makes over the
      caches, f1 the O(n·d) GEMM work per touched row), fitted to the engine's flush log;
    * ``q0 + q1·S`` is one query entry with S touched rows pending, fitted to its query log,
      and ``Qf = engine.fresh_query_seconds`` one computed afresh: the engine never pays more
      (the line, fitted mostly where few rows are pending, would extrapolate far past it);
    * ``rows(k) = H·(1 − e^(−k/H))`` is the expected number of distinct rows hit by k updates
      spread over H equally likely rows; H is fitted to the flushes' (updates, rows) pairs, so
      a hot spot (small H) is seen to coalesce and a uniform stream (H ≈ n) is not;
      ``rows̄(k)`` is its average over a flush cycle (what a query sees);
    * ``Fmax = engine.max_correction_rows`` and ``Smax = engine.max_query_rows``: beyond them
      flushes and queries recompute instead, so their costs stop growing; ``k = ∞`` (never
      flush) costs ``r·min(q0 + q1·Smax, Qf)`` per update.

    The threshold is the best of k ∈ {1, 2, 4, …} ∪ {∞}: k = 1 is eager maintenance (queries
    dominate), ∞ answers queries on demand (queries rare), and in between the square-root
    trade-off ``k* ≈ sqrt(2·f0 / (r·q1·ρ))`` of flush overhead against query corrections.
    r is measured over the last ``window`` updates, so the choice follows the stream; with no
    query in that window the policy does not flush at all. The model is refitted every 32
    updates, and less often (up to every ``window``) while its choice stays the same.

    Parameters
    ----------
    initial : int, default 16
        Threshold until the query rate is measured (32 updates) and, when queries arrive,
        until a flush and a query have been timed.
    window : int, default 2048
        Updates over which the query rate r is measured.
    max_threshold : float, default inf
        Upper bound on k (``inf`` allows the never-flush regime).
    """

    reads_answers = False  # counters and logs only: see FlushPolicy

    def __init__(self, initial: int = 16, window: int = 2048, max_threshold: float = math.inf):
        initial, window = check_int("initial", initial), check_int("window", window)
        if not max_threshold >= 1:
            raise ValueError(f"max_threshold={max_threshold!r} must be >= 1")
        self.initial = int(initial)
        self.window = int(window)
        self.max_threshold = max_threshold
        self.current: float = float(initial)
        self.fitted: dict[str, float] = {}
        self._flush_fit: tuple = (None, None)  # (last flush fitted, (f0, f1, H))
        self._marks: deque[tuple[int, int]] = deque()
        self._refit_at = self._next_refit = 0
        self._period = _MIN_PERIOD

    def threshold(self, engine) -> float:
        u = engine.n_updates
        if u >= self._next_refit:
            self._marks.append((u, engine.n_queries))
            while len(self._marks) > 2 and u - self._marks[1][0] >= self.window:
                self._marks.popleft()
            choice = self._choose(engine)
            # a refit costs 50-100 µs (cold, as it runs among updates), as much as a hundred
            # updates: refit less often while the choice holds, soon again once it moves; the
            # period grows fourfold, reaching a default window in 3 refits rather than 6
            if choice == self.current:
                self._period = min(4 * self._period, max(_MIN_PERIOD, self.window))
            else:
                self._period = _MIN_PERIOD
            self.current = choice
            self._refit_at, self._next_refit = u, u + self._period
        return self.current

    def valid_until(self, engine) -> float:
        return self._next_refit - 1

    def on_flush(self, event) -> None:
        # a flush brings a new timing: take it into account soon (not after every flush,
        # which would be every update when eager)
        self._next_refit = min(self._next_refit, self._refit_at + _MIN_PERIOD)

    def query_rate(self) -> float:
        """Exact query entries per update over the recent window."""
        (u0, q0), (u1, q1) = self._marks[0], self._marks[-1]
        return (q1 - q0) / (u1 - u0) if u1 > u0 else 0.0

    def _choose(self, engine) -> float:
        if len(self._marks) < 2:  # the query rate is not measured yet
            return float(min(self.initial, self.max_threshold))
        r = self.query_rate()
        if r == 0:
            # no query lately: a flush buys nothing now, and deferring it costs nothing later
            # (a deferred flush is never dearer than the flushes it replaces: past
            # max_correction_rows it becomes a rebuild, which is cheaper by that definition)
            return self.max_threshold
        queries = list(engine.query_log)
        # the fit's sorts cost ~0.1 µs a point: it takes at most _FIT_QUERIES, evenly spread
        queries = queries[:: math.ceil(len(queries) / _FIT_QUERIES) or 1]
        # the last 64, found from the end: the log holds up to a thousand
        flushes = list(
            itertools.islice((e for e in reversed(engine.flush_log) if e.kind == "incremental"), 64)
        )[::-1]
        if not flushes or not queries:
            return float(min(self.initial, self.max_threshold))
        # the flush fit (~35 µs cold, most of it H's bisection): redone only after new flushes
        if self._flush_fit[0] is not flushes[-1]:
            f0, f1 = _fit_line(
                [e.rows for e in flushes], [e.seconds for e in flushes], self.fitted.get("f1")
            )
            H = _effective_rows([e.updates for e in flushes], [e.rows for e in flushes], engine.n)
            self._flush_fit = (flushes[-1], (f0, f1, H))
        f0, f1, H = self._flush_fit[1]
        q0, q1 = _fit_line(
            [s for s, _, _ in queries], [t / c for _, c, t in queries], self.fitted.get("q1")
        )
        fmax, smax = engine.max_correction_rows, engine.max_query_rows
        # a query never costs more than computing it afresh: the line, fitted mostly where
        # few rows are pending (and catch-ups steepen it), must not extrapolate past that
        cap = engine.fresh_query_seconds
        cap = math.inf if math.isnan(cap) else cap
        self.fitted = {"f0": f0, "f1": f1, "q0": q0, "q1": q1, "H": H, "r": r, "fresh": cap}
        best_k, best = math.inf, r * min(q0 + q1 * smax, cap)
        k = 1
        while k <= min(self.max_threshold, 64 * engine.n):
            rows = H * -math.expm1(-k / H)
            mean_rows = H - H * rows / k  # average of rows(p) over p < k
            cost = (f0 + f1 * min(rows, fmax)) / k + r * min(q0 + q1 * min(mean_rows, smax), cap)
            if cost < best:
                best_k, best = float(k), cost
            k *= 2
        self.fitted["cost"] = best
        return min(best_k, self.max_threshold)

    def __repr__(self) -> str:
        return f"CostModel(current={self.current:.4g})"


def _fit_line(x, y, slope=None) -> tuple[float, float]:
    """Robust ``y ≈ a + b·x`` with a, b ≥ 0: a line through the medians of the lower and upper
    halves in x, so a few timings inflated by a busy machine do not move it. When x does not
    vary the slope cannot be seen: the previous ``slope`` is kept if there is one (an eager
    engine only ever queries with nothing pending), else a and b split the cost evenly.

    In plain Python: a refit runs among updates, where NumPy's ~15 calls on a few dozen
    points cost 40-110 µs cold (the sorts here, on at most a few hundred, 5-30 µs).
    """
    m = len(x)
    if m >= 4 and max(x) - min(x) > 0.1 * max(sum(x) / m, 1.0):
        order = sorted(range(m), key=x.__getitem__)  # stable: ties keep their order
        x, y = [x[i] for i in order], [y[i] for i in order]
        half = m // 2
        dx = _median(x[half:]) - _median(x[:half])
        b = max(0.0, (_median(y[half:]) - _median(y[:half])) / dx) if dx > 0 else 0.0
        return max(0.0, _median([v - b * u for u, v in zip(x, y, strict=True)])), b
    mx, my = _median(x), _median(y)
    if slope is not None:
        return max(0.0, my - slope * mx), slope
    return 0.5 * my, 0.5 * my / max(mx, 1.0)


def _median(a) -> float:
    """Median of a short sequence of numbers."""
    a = sorted(a)
    k = len(a)
    return 0.5 * float(a[(k - 1) // 2] + a[k // 2])


def _effective_rows(updates, rows, n: int) -> float:
    """H with ``Σ rows = Σ H·(1 − e^(−k/H))``: how many rows the updates effectively spread
    over (occupancy model); at most a large multiple of n when no update ever repeated a row.

    rows(H) increases with H: bisection on log H to a bracket of ratio 1 + 4e-5, over the few
    distinct k a policy flushes at, in plain Python (~10-20 µs; NumPy grids took 130-170 µs
    cold, among updates).
    """
    counts = Counter(updates)
    target = float(sum(rows))

    def total(h):
        return sum(c * h * -math.expm1(-k / h) for k, c in counts.items())

    lo, hi = 1e-3, 64.0 * n
    if target >= total(hi):
        return hi
    for _ in range(math.ceil(math.log2(math.log(hi / lo) / 4e-5))):
        mid = math.sqrt(lo * hi)
        if total(mid) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


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
        sample = check_int("sample", sample)
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
        if self._rows is None or self._rows.max(initial=0) >= engine.m:
            self._draw(engine.m)
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
    """A policy object from ``None`` (CostModel), an int k (Fixed), a policy
    (:class:`~dynattn.protocols.FlushPolicy`) or a callable ``engine -> threshold``."""
    if policy is None:
        return CostModel()
    if isinstance(policy, numbers.Integral) and not isinstance(policy, bool):
        return Fixed(check_int("policy", policy))  # flush every `policy` updates
    if isinstance(policy, FlushPolicy) and callable(policy.threshold):
        return policy
    if callable(policy):
        return _CallablePolicy(policy)
    raise TypeError(
        f"policy={policy!r} must be None, an int, a callable engine -> threshold, "
        "or an object with threshold(engine)"
    )
