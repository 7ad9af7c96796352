"""Tests of dynattn.strategies: the on-demand baseline and the dense-recompute timing."""

import numpy as np
import pytest

from dynattn.reference import dense_attention
from dynattn.strategies import OnDemand, dense_recompute_seconds
from dynattn.workloads import UpdateStream, make_qkv


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_on_demand_matches_dense_after_updates(dtype, scale):
    Q, K, V = make_qkv("gaussian", 40, 6, seed=1, dtype=dtype)
    od = OnDemand(Q, K, V, scale=scale)
    assert od.dtype == dtype
    for t in range(3):
        for kind in ("entries", "rows"):
            UpdateStream(kind, 40, 6, updates_per_tick=5, seed=t).next_tick(t).apply(od)
    exact = dense_attention(Q, od.K, od.V, od.scale)
    rows = np.array([0, 5, 5, 39])
    cols = np.array([1, 0, 2, 5])
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(od.query_many(rows, cols), exact[rows, cols], rtol=rtol, atol=rtol)
    np.testing.assert_allclose(od.query_rows(np.arange(40)), exact, rtol=rtol, atol=rtol)


def test_on_demand_copies_inputs_and_exposes_read_only_views():
    Q, K, V = make_qkv("uniform", 5, 3)
    od = OnDemand(Q, K, V)
    od.update_k_many([1, 1], [2, 2], [0.5, 0.25])  # repeats accumulate
    od.set_v_rows([4], np.full((1, 3), 7.0))
    assert od.K[1, 2] == pytest.approx(K[1, 2] + 0.75)
    assert (od.V[4] == 7.0).all() and not (V[4] == 7.0).all()
    with pytest.raises(ValueError, match="read-only"):
        od.K[0, 0] = 1.0


def test_on_demand_large_logits_do_not_overflow():
    Q = np.array([[1000.0], [-1000.0]])
    od = OnDemand(Q, np.array([[1.0], [2.0]]), np.array([[3.0], [5.0]]), scale=1.0)
    np.testing.assert_allclose(od.query_rows([0, 1]), [[5.0], [3.0]])


def test_on_demand_rejects_bad_input():
    Q, K, V = make_qkv("uniform", 5, 3)
    od = OnDemand(Q, K, V)
    with pytest.raises(IndexError, match=r"rows\[0\]=5"):
        od.query_many([5], [0])
    with pytest.raises(ValueError, match="rows has 2 entries but cols has 1"):
        od.update_v_many([0, 1], [0], [1.0, 2.0])
    with pytest.raises(ValueError, match="deltas must be finite"):
        od.update_k_many([0], [0], [np.nan])
    with pytest.raises(ValueError, match=r"values has shape \(1, 2\)"):
        od.set_k_rows([0], np.ones((1, 2)))
    with pytest.raises(ValueError, match="K has shape"):
        OnDemand(Q, K[:4], V)


def test_dense_recompute_seconds_scales_a_sample():
    Q, K, V = make_qkv("gaussian", 300, 8)
    seconds = dense_recompute_seconds(Q, K, V, sample_rows=100)
    assert 0 < seconds < 10
    with pytest.raises(ValueError, match="sample_rows=0"):
        dense_recompute_seconds(Q, K, V, sample_rows=0)
