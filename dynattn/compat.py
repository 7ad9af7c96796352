"""The original prototype's interface, kept alive on top of the exact engine.

``EnhancedDynamicAttention`` keeps the constructor, attributes and methods of the public
prototype this project started from, so code written against it runs unchanged, but it is
built on :class:`~dynattn.engine.LazyAttention` with unscaled logits (``scale=1``) and is
correct: the prototype applied a change to row j of K to *row* j of A, while row j of K is
*column* j of A (every query attends to key j).

Differences a caller may notice: ``query`` and ``get_attention_matrix`` answer exactly
*without* flushing (the prototype flushed first; the answers are the same, the point of the
lazy engine is that they need not cost a flush), and nothing spawns processes.
"""

from __future__ import annotations

import numbers
import time
from collections import deque

import numpy as np

from . import _validate as check
from .engine import LazyAttention
from .policies import OriginalAdaptive, adaptive_threshold
from .reference import dense_attention

__all__ = ["EnhancedDynamicAttention", "adaptive_threshold", "run_demo"]


class EnhancedDynamicAttention:
    """Lazy attention with the original prototype's interface.

    Parameters
    ----------
    Q, K, V : array_like or scipy.sparse matrix, shape (n, d)
    initial_threshold : int, default 10
        Pending updates that trigger a flush, until the adaptive rule changes it.
    sparsity_threshold : float, default 0.1
        Kept for compatibility; the prototype stored sparse K/V as CSR below this density.
        The engine's state is O(n·d) dense either way, so it only needs to lie in [0, 1].
    adaptive_threshold_func : callable ``(avg_updates, matrix_size) -> int``, optional
        Called after each flush with the mean updates per flush (last 10) and ``n·d``; the
        default keeps ``initial_threshold``. Pass :func:`adaptive_threshold` for the
        prototype's rule. It must return a finite number >= 1 (truncated to an int, as the
        prototype's ``int()`` did); it is asked *before* a call that will flush, so a bad
        answer raises with nothing changed.

    Attributes
    ----------
    engine : LazyAttention
        The engine doing the work (scale 1, the prototype's unscaled logits).
    pending_updates_K, pending_updates_V : list of (i, j, delta)
        Updates queued through :meth:`lazy_update_K`/:meth:`lazy_update_V` since the
        engine's last flush, however that flush came (also ``engine.flush()`` called
        directly): derived from the engine's counters on each read, a fresh list.
    """

    def __init__(
        self,
        Q,
        K,
        V,
        initial_threshold: int = 10,
        sparsity_threshold: float = 0.1,
        adaptive_threshold_func=None,
    ):
        if not (isinstance(sparsity_threshold, numbers.Real) and 0 <= sparsity_threshold <= 1):
            raise ValueError(f"sparsity_threshold={sparsity_threshold!r} must be in [0, 1]")
        initial = check.check_int("initial_threshold", initial_threshold)

        def constant(avg_updates, matrix_size):
            return initial

        func = adaptive_threshold_func if adaptive_threshold_func is not None else constant
        # the policy asks func before each flush, however it comes (also engine.flush()), and
        # a bad answer refuses the flush: nothing changes
        self._policy = OriginalAdaptive(initial=initial, func=func, name="adaptive_threshold_func")
        self.sparsity_threshold = float(sparsity_threshold)
        self.engine = LazyAttention(Q, K, V, scale=1.0, policy=self._policy)
        # (update number, "K" or "V", (i, j, delta)) of the updates queued here since the
        # engine's last flush; older ones are dropped on each read, O(pending)
        self._queued: deque[tuple[int, str, tuple]] = deque()

    Q = property(lambda self: self.engine.Q, doc="Queries (n, d).")
    K = property(lambda self: self.engine.K, doc="Current keys (n, d).")
    V = property(lambda self: self.engine.V, doc="Current values (n, d).")
    n = property(lambda self: self.engine.n)
    d = property(lambda self: self.engine.d)

    @property
    def lazy_threshold(self) -> int:
        """Current threshold (moves after flushes with an adaptive function)."""
        return self._policy.current

    @property
    def num_updates(self) -> int:
        """Updates pending since the last flush."""
        return self.engine.pending

    @property
    def pending_updates_K(self) -> list[tuple[int, int, float]]:
        """Updates of K queued here since the engine's last flush, ``[(i, j, delta), ...]``."""
        return self._pending("K")

    @property
    def pending_updates_V(self) -> list[tuple[int, int, float]]:
        """Updates of V queued here since the engine's last flush, ``[(i, j, delta), ...]``."""
        return self._pending("V")

    def _pending(self, which: str) -> list:
        flushed = self.engine.n_updates - self.engine.pending  # updates the caches hold
        queued = self._queued
        while queued and queued[0][0] < flushed:
            queued.popleft()
        return [update for _, w, update in queued if w == which]

    def lazy_update_K(self, updates) -> None:
        """Queue ``[(i, j, delta), ...]`` for K; flushes when the threshold is reached. An
        empty list does nothing, as in the prototype; a bad item changes nothing."""
        self._lazy_update("K", updates)

    def lazy_update_V(self, updates) -> None:
        """Queue ``[(i, j, delta), ...]`` for V; flushes when the threshold is reached. An
        empty list does nothing, as in the prototype; a bad item changes nothing."""
        self._lazy_update("V", updates)

    def _lazy_update(self, which: str, updates) -> None:
        engine = self.engine
        rows, cols, deltas = check.as_triples(
            updates, engine.n, engine.d, engine.dtype, allow_empty=True
        )
        if not len(rows):
            return
        first = engine.n_updates
        apply = engine.update_k_many if which == "K" else engine.update_v_many
        apply(rows, cols, deltas)
        self._queued.extend(
            (first + k, which, (i, j, x))
            for k, (i, j, x) in enumerate(
                zip(rows.tolist(), cols.tolist(), deltas.tolist(), strict=True)
            )
        )

    def apply_lazy_updates(self) -> None:
        """Flush every pending update into the caches."""
        self.engine.flush()

    def query(self, i: int, j: int) -> float:
        """Exact output entry ``O[i, j]``, without flushing (O(|S|·d))."""
        return self.engine.query(i, j)

    def get_attention_matrix(self) -> np.ndarray:
        """The exact attention output ``D⁻¹ A V`` (shape (n, d)), without flushing."""
        return self.engine.output()

    def get_approximation_error(self) -> float:
        """Relative Frobenius error of :meth:`get_attention_matrix` against a dense float64
        recomputation, O(n²·d) like the prototype's. Round-off only: answers are exact.

        For the error of the *stale* caches between flushes, see
        ``engine.approximation_error()``.
        """
        exact = dense_attention(self.engine.Q, self.engine.K, self.engine.V, scale=1.0)
        return float(np.linalg.norm(self.get_attention_matrix() - exact) / np.linalg.norm(exact))


def demo_workload() -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The original prototype's demo inputs, drawn exactly as it drew them.

    ``RandomState(42)`` reproduces ``np.random.seed(42)``: n=1000, d=50,
    ``Q, K, V = rand(n, d)`` in that order, then 100 steps, each drawing 10 K updates and then
    10 V updates as ``(randint(0, n), randint(0, d), randn()·0.1)``.

    Returns
    -------
    Q, K, V : ndarray, shape (1000, 50)
    steps : list of (K updates, V updates), each a list of 10 ``(i, j, delta)``
    """
    rs = np.random.RandomState(42)
    n, d = 1000, 50
    Q, K, V = rs.rand(n, d), rs.rand(n, d), rs.rand(n, d)
    steps = []
    for _ in range(100):
        ku = [(rs.randint(0, n), rs.randint(0, d), rs.randn() * 0.1) for _ in range(10)]
        vu = [(rs.randint(0, n), rs.randint(0, d), rs.randn() * 0.1) for _ in range(10)]
        steps.append((ku, vu))
    return Q, K, V, steps


def run_demo(out=print) -> dict:
    """Replay the original prototype's demo workload (:func:`demo_workload`) and report it.

    The updates are applied K list first, as the prototype did, with its adaptive threshold
    rule; then the same workload runs on the engine with its default policy, for comparison.

    Returns
    -------
    dict
        The printed figures: ``O_0_0``, ``O_500_25``, their dense recomputations, the
        approximation errors, ``threshold``, ``flushes`` and ``seconds`` (workload wall time:
        construction, updates and the two queries), and ``default_policy_seconds`` and
        ``default_policy_flushes`` for the default policy's run.
    """
    Q, K, V, steps = demo_workload()
    t0 = time.perf_counter()
    att = EnhancedDynamicAttention(Q, K, V, adaptive_threshold_func=adaptive_threshold)
    for ku, vu in steps:
        att.lazy_update_K(ku)
        att.lazy_update_V(vu)
    o00, o500 = att.query(0, 0), att.query(500, 25)
    seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    engine = LazyAttention(Q, K, V, scale=1.0)
    for ku, vu in steps:
        engine.update_k_many(ku)
        engine.update_v_many(vu)
    default_answers = engine.query(0, 0), engine.query(500, 25)
    default_seconds = time.perf_counter() - t0

    exact = dense_attention(att.Q, att.K, att.V, scale=1.0)
    report = {
        "O_0_0": o00,
        "O_500_25": o500,
        "dense_O_0_0": float(exact[0, 0]),
        "dense_O_500_25": float(exact[500, 25]),
        "approximation_error": att.get_approximation_error(),
        "stale_error": att.engine.approximation_error().relative,
        "threshold": att.lazy_threshold,
        "flushes": att.engine.n_flushes,
        "pending": att.engine.pending,
        "seconds": seconds,
        "default_policy_answers": default_answers,
        "default_policy_seconds": default_seconds,
        "default_policy_flushes": engine.n_flushes,
    }
    out("Original demo workload (n=1000, d=50, seed 42, 100 × (10 K + 10 V) updates)")
    out(f"  Position (0, 0):    {o00:.15f}   dense recomputation {exact[0, 0]:.15f}")
    out(f"  Position (500, 25): {o500:.15f}   dense recomputation {exact[500, 25]:.15f}")
    out(f"  Approximation error (exact answers vs dense): {report['approximation_error']:.3e}")
    out(f"  Stale-cache error ({report['pending']} updates pending): {report['stale_error']:.3e}")
    out(f"  Final lazy threshold: {report['threshold']}   flushes: {report['flushes']}")
    out(f"  Workload wall time: {seconds * 1e3:.1f} ms (the prototype's threshold rule)")
    out(
        f"  Same workload, default policy (cost model): {default_seconds * 1e3:.1f} ms, "
        f"{engine.n_flushes} flushes, the same answers"
    )
    return report
