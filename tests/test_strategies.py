"""Tests of dynattn.strategies: every baseline exact against dense attention under updates."""

import warnings

import numpy as np
import pytest
from oracle import assert_close_natural

from dynattn.reference import dense_attention, dense_weights
from dynattn.strategies import (
    EagerDense,
    OnDemand,
    Recompute,
    dense_recompute_seconds,
    eager_dense_nbytes,
)
from dynattn.workloads import UpdateStream, make_qkv

BASELINES = [OnDemand, EagerDense, Recompute]
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def random_actions(strategy, rng, count, big_every=0):
    """Apply ``count`` random entry updates and row rewrites of K and V, one call each;
    every ``big_every``-th delta is large (logits move by tens, values by 1e4)."""
    n, d = strategy.n, strategy.d
    for t in range(count):
        kind = int(rng.integers(4))
        i, j = int(rng.integers(n)), int(rng.integers(d))
        big = big_every and t % big_every == 0
        delta = float(rng.standard_normal() * (1e4 if big and kind == 1 else 30 if big else 0.3))
        row = rng.standard_normal(d) * (3.0 if big else 1.0)
        if kind == 0:
            strategy.update_k(i, j, delta)
        elif kind == 1:
            strategy.update_v(i, j, delta)
        elif kind == 2:
            strategy.set_k_row(i, row)
        else:
            strategy.set_v_row(i, row)


def check_exact(strategy, dtype):
    Q = np.asarray(strategy._Q, dtype=np.float64)
    K, V = np.asarray(strategy.K, np.float64), np.asarray(strategy.V, np.float64)
    exact = dense_attention(Q, K, V, strategy.scale)
    scale = dense_weights(Q, K, strategy.scale) @ np.abs(V)
    n, d = strategy.n, strategy.d
    tol = TOL[dtype]
    assert_close_natural(strategy.query_rows(np.arange(n)), exact, scale, tol, "query_rows")
    rows, cols = np.array([0, 3, 3, n - 1]), np.array([1, 0, d - 1, 2])
    assert_close_natural(
        strategy.query_many(rows, cols), exact[rows, cols], scale[rows, cols], tol, "query_many"
    )
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        assert_close_natural(strategy.query(i, j), exact[i, j], scale[i, j], tol, "query")
        assert_close_natural(strategy.query_row(i), exact[i], scale[i], tol, "query_row")


@pytest.mark.parametrize("cls", BASELINES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_baseline_exact_under_random_updates(cls, dtype, scale):
    Q, K, V = make_qkv("gaussian", 40, 6, seed=1, dtype=dtype)
    strategy = cls(Q, K, V, scale=scale)
    assert strategy.dtype == dtype
    check_exact(strategy, dtype)
    random_actions(strategy, np.random.default_rng(2), 300)
    check_exact(strategy, dtype)


@pytest.mark.parametrize("cls", BASELINES)
def test_baseline_exact_under_large_changes(cls):
    """Dominant keys raised and removed, values up by 1e4 and back: the guards of EagerDense
    must recompute the rows whose subtraction would have cancelled digits."""
    Q, K, V = make_qkv("gaussian", 30, 4, seed=3)
    strategy = cls(Q, K, V, scale=1.0)
    random_actions(strategy, np.random.default_rng(4), 200, big_every=5)
    check_exact(strategy, np.float64)
    strategy.update_v(7, 2, 1e8)  # a value far above the rest, then back
    strategy.update_v(7, 2, -1e8)
    strategy.set_k_row(3, np.full(4, 40.0))  # a key that dominates every row, then removed
    strategy.set_k_row(3, np.zeros(4))
    check_exact(strategy, np.float64)


def test_baselines_agree_with_lazy_on_the_same_stream():
    from dynattn import LazyAttention

    Q, K, V = make_qkv("clustered", 64, 8, seed=5)
    lazy = LazyAttention(Q, K, V, policy=16)
    others = [cls(Q, K, V) for cls in BASELINES]
    stream = UpdateStream("hotspot", 64, 8, updates_per_tick=10, seed=6)
    for t in range(6):
        tick = stream.next_tick(t)
        for s in [lazy, *others]:
            tick.apply_each(s)
    rows, cols = stream.queries(0, 20)
    want = lazy.query_many(rows, cols)
    for s in others:
        np.testing.assert_array_equal(s.K, lazy.K)
        np.testing.assert_allclose(s.query_many(rows, cols), want, rtol=1e-11, atol=1e-12)


def test_on_demand_batch_methods_and_read_only_views():
    Q, K, V = make_qkv("uniform", 5, 3)
    od = OnDemand(Q, K, V)
    od.update_k_many([1, 1], [2, 2], [0.5, 0.25])  # repeats accumulate
    od.set_v_rows([4], np.full((1, 3), 7.0))
    assert od.K[1, 2] == pytest.approx(K[1, 2] + 0.75)
    assert (od.V[4] == 7.0).all() and not (V[4] == 7.0).all()
    with pytest.raises(ValueError, match="read-only"):
        od.K[0, 0] = 1.0
    od.update_v_many([0], [0], [1.0])
    od.set_k_rows([0, 2], np.zeros((2, 3)))
    np.testing.assert_allclose(
        od.query_rows(np.arange(5)), dense_attention(Q, od.K, od.V), rtol=1e-12
    )


@pytest.mark.parametrize("cls", BASELINES)
def test_large_logits_do_not_overflow(cls):
    Q = np.array([[1000.0], [-1000.0]])
    s = cls(Q, np.array([[1.0], [2.0]]), np.array([[3.0], [5.0]]), scale=1.0)
    np.testing.assert_allclose(s.query_rows([0, 1]), [[5.0], [3.0]])
    s.update_k(0, 0, 5.0)  # key 0 now wins row 0 by 4000 in the logits
    np.testing.assert_allclose(s.query_rows([0, 1]), [[3.0], [5.0]])


@pytest.mark.parametrize("cls", BASELINES)
def test_bad_input_is_refused_and_state_kept(cls):
    Q, K, V = make_qkv("uniform", 5, 3)
    s = cls(Q, K, V)
    before = s.query_rows(np.arange(5))
    with pytest.raises(IndexError, match=r"i=5 is out of range"):
        s.update_k(5, 0, 1.0)
    with pytest.raises(IndexError, match=r"j=3 is out of range"):
        s.update_v(0, 3, 1.0)
    with pytest.raises(ValueError, match="delta=nan must be finite"):
        s.update_k(0, 0, float("nan"))
    with pytest.raises(ValueError, match=r"row has shape \(2,\)"):
        s.set_v_row(0, np.ones(2))
    with pytest.raises(IndexError, match=r"rows\[0\]=5"):
        s.query_many([5], [0])
    with pytest.raises(ValueError, match="rows has 2 entries but cols has 1"):
        s.query_many([0, 1], [0])
    with pytest.raises(ValueError, match="K has shape"):
        cls(Q, K[:4], V)
    np.testing.assert_array_equal(s.query_rows(np.arange(5)), before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("cls", "call"),
    [
        (cls, call)
        for cls in BASELINES
        for call in (
            lambda s, big: s.update_k(1, 2, big),
            lambda s, big: s.update_v(1, 2, -big),
        )
    ]
    + [
        (OnDemand, lambda s, big: s.update_k_many([0, 1, 1], [0, 2, 2], [1.0, big / 2, big / 2])),
        (OnDemand, lambda s, big: s.update_v_many([1], [2], [-big])),
    ],
)
def test_an_update_that_would_overflow_changes_nothing(cls, call, dtype):
    Q, K, V = make_qkv("uniform", 5, 3, dtype=dtype)
    s = cls(Q, K, V)
    big = float(np.finfo(dtype).max)
    s.update_k(1, 2, 0.75 * big)
    s.update_v(1, 2, -0.75 * big)
    K0, V0, out = s.K.copy(), s.V.copy(), s.query_rows(np.arange(5))
    with pytest.raises(ValueError, match=r"\[1, 2\] = .*not finite"):
        call(s, 0.5 * big)
    np.testing.assert_array_equal(s.K, K0)
    np.testing.assert_array_equal(s.V, V0)
    np.testing.assert_array_equal(s.query_rows(np.arange(5)), out)


def test_eager_dense_memory_estimate():
    Q, K, V = make_qkv("uniform", 16, 4)
    s = EagerDense(Q, K, V)
    assert eager_dense_nbytes(16, 4) >= s._At.nbytes + s._cache.nbytes
    assert eager_dense_nbytes(65536, 64) > 32 * 2**30  # why the benchmark skips it there


def test_dense_recompute_seconds_scales_a_sample():
    Q, K, V = make_qkv("gaussian", 300, 8)
    seconds = dense_recompute_seconds(Q, K, V, sample_rows=100)
    assert 0 < seconds < 10
    with pytest.raises(ValueError, match="sample_rows=0"):
        dense_recompute_seconds(Q, K, V, sample_rows=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", ["LazyAttention", *BASELINES])
def test_rows_are_copied_and_checked_whatever_their_magnitude(cls, dtype):
    # a row already in the working dtype is used as given (not converted), so each strategy
    # must copy it; the finiteness check sums squares, which overflow for large finite rows
    import dynattn

    cls = getattr(dynattn, cls) if isinstance(cls, str) else cls
    Q, K, V = make_qkv("uniform", 5, 3, dtype=dtype)
    s = cls(Q, K, V)
    top = 0.5 * float(np.finfo(dtype).max)
    # within the lazy engine's limit for V entries (its sums stay finite), squares still past
    # the largest float
    big = np.full(3, min(top, getattr(getattr(s, "_limits", None), "v", top)), dtype=dtype)
    row = np.array([0.5, -1.0, 2.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.set_v_row(1, big)
        s.set_k_row(2, row)
    np.testing.assert_array_equal(s.V[1], big)
    row[:] = 7.0  # the caller reuses its buffer
    np.testing.assert_array_equal(s.K[2], [0.5, -1.0, 2.0])
    s.set_v_row(1, V[1])
    K0, V0 = s.K.copy(), s.V.copy()
    for bad, shown in (
        ([0.0, np.nan, 1.0], r"row\[1\] = .*nan"),
        ([0.0, 1.0, -np.inf], r"row\[2\] = .*inf"),
    ):
        with pytest.raises(ValueError, match=shown):
            s.set_k_row(0, np.array(bad, dtype=dtype))
    if dtype == np.float32:  # finite as given, infinite once cast to the working dtype
        with pytest.raises(ValueError, match=r"row\[0\] = .*1e\+39"):
            s.set_v_row(3, np.array([1e39, 0.0, 0.0]))
    np.testing.assert_array_equal(s.K, K0)
    np.testing.assert_array_equal(s.V, V0)
    Kd, Vd = np.asarray(s.K, np.float64), np.asarray(s.V, np.float64)
    np.testing.assert_allclose(
        [s.query_row(i) for i in range(5)],
        dense_attention(np.asarray(Q, np.float64), Kd, Vd),
        rtol=TOL[dtype],
        atol=TOL[dtype],
    )
