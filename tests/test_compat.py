"""The original prototype's interface, now correct, and the replayed demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dynattn import EnhancedDynamicAttention, adaptive_threshold, dense_attention
from dynattn.compat import run_demo


def original_k_bug(Q, K, V, updates):
    """What the prototype computed: a change to K[i] rewrote *row* i of A."""
    A = np.exp(Q @ K.T)
    K = K.copy()
    for i, j, delta in updates:
        K[i, j] += delta
        A[i] = np.exp(Q[i] @ K.T)
    return (A / A.sum(1, keepdims=True)) @ V


def test_k_update_changes_a_column_not_a_row():
    rng = np.random.default_rng(0)
    Q, K, V = (rng.random((30, 4)) for _ in range(3))
    updates = [(3, 1, 0.8), (17, 2, -0.5)]
    att = EnhancedDynamicAttention(Q, K, V, initial_threshold=1)
    att.lazy_update_K(updates)
    K2 = K.copy()
    for i, j, delta in updates:
        K2[i, j] += delta
    exact = dense_attention(Q, K2, V, scale=1.0)
    np.testing.assert_allclose(att.get_attention_matrix(), exact, rtol=1e-13)
    # the prototype's answer differs from exact recomputation well beyond round-off
    assert np.abs(original_k_bug(Q, K, V, updates) - exact).max() > 1e-4


def test_original_interface_attributes_and_threshold_rule():
    rng = np.random.default_rng(1)
    Q, K, V = (rng.random((100, 10)) for _ in range(3))
    att = EnhancedDynamicAttention(Q, K, V, adaptive_threshold_func=adaptive_threshold)
    assert att.lazy_threshold == 10
    att.lazy_update_K([(1, 2, 0.1)] * 4)
    att.lazy_update_V([(5, 0, 0.2)] * 3)
    assert len(att.pending_updates_K) == 4 and len(att.pending_updates_V) == 3
    att.lazy_update_V([(6, 0, 0.2)] * 3)  # 10 pending: flush, threshold from the real count
    assert att.pending_updates_K == [] and att.pending_updates_V == []
    assert att.lazy_threshold == adaptive_threshold(10, 100 * 10) == 30
    assert att.query(0, 0) == pytest.approx(
        dense_attention(Q, att.K, att.V, scale=1.0)[0, 0], rel=1e-13
    )
    assert att.get_approximation_error() < 1e-14
    att.lazy_update_K([(2, 2, 0.3)])
    att.apply_lazy_updates()
    assert att.num_updates == 0 and att.engine.pending == 0


def test_default_threshold_stays_fixed_and_bad_updates_change_nothing():
    rng = np.random.default_rng(2)
    att = EnhancedDynamicAttention(*(rng.random((10, 3)) for _ in range(3)), initial_threshold=5)
    att.lazy_update_K([(0, 0, 1.0)] * 5)
    assert att.lazy_threshold == 5 and att.engine.n_flushes == 1
    att.lazy_update_V([(1, 1, 1.0)])
    with pytest.raises(IndexError, match=r"updates\[1\]"):
        att.lazy_update_V([(1, 1, 1.0), (10, 0, 1.0)])
    assert att.pending_updates_V == [(1, 1, 1.0)] and att.engine.pending == 1
    with pytest.raises(ValueError, match="sparsity_threshold"):
        EnhancedDynamicAttention(*(rng.random((10, 3)) for _ in range(3)), sparsity_threshold=2)


def test_demo_matches_dense_recomputation():
    report = run_demo(out=lambda *a: None)
    assert report["O_0_0"] == pytest.approx(report["dense_O_0_0"], rel=1e-12, abs=1e-12)
    assert report["O_500_25"] == pytest.approx(report["dense_O_500_25"], rel=1e-12, abs=1e-12)
    assert report["approximation_error"] < 1e-12
    # the fixed rule records real counts: the threshold moves from 10 to its cap
    assert report["threshold"] == 100
    assert 0 < report["flushes"] < 200
    # the default policy's run gives the same answers, with (almost) no flush: no query came
    dense = report["dense_O_0_0"], report["dense_O_500_25"]
    assert report["default_policy_answers"] == pytest.approx(dense, rel=1e-12, abs=1e-12)
    assert report["default_policy_flushes"] <= 2


def test_demo_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "dynattn", "demo"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "Position (0, 0)" in out and "Final lazy threshold: 100" in out


def test_import_is_light():
    code = (
        "import sys, dynattn; heavy = {'panel', 'holoviews', 'bokeh'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
