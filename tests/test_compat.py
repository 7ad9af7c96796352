"""The original prototype's interface, now correct, and the replayed demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------- prototype parity, all or nothing


def small(**kwargs):
    rng = np.random.default_rng(3)
    return EnhancedDynamicAttention(*(rng.random((8, 3)) for _ in range(3)), **kwargs)


def state(att):
    return (
        att.K.copy(),
        att.V.copy(),
        att.engine.pending,
        att.engine.n_updates,
        att.engine.n_flushes,
        att.lazy_threshold,
        att.pending_updates_K,
        att.pending_updates_V,
    )


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_an_empty_update_list_does_nothing_as_in_the_prototype(empty):
    att = small(initial_threshold=3)
    att.lazy_update_K([(1, 1, 0.5)])
    before = state(att)
    att.lazy_update_K(empty)
    att.lazy_update_V(empty)
    assert_same(state(att), before)


def test_bools_are_refused_in_updates():
    att = small()
    before = state(att)
    with pytest.raises(TypeError, match=r"updates\[0\]\[2\] \(delta\)=True"):
        att.lazy_update_V([(0, 0, True)])
    assert_same(state(att), before)


def test_pending_updates_follow_a_direct_engine_flush():
    att = small(initial_threshold=100)
    att.lazy_update_K([(1, 1, 0.5), (2, 0, -0.25)])
    att.lazy_update_V([(3, 2, 1.0)])
    assert att.pending_updates_K == [(1, 1, 0.5), (2, 0, -0.25)]
    att.engine.flush()
    assert att.pending_updates_K == [] and att.pending_updates_V == []
    att.lazy_update_V([(4, 1, 2.0)])
    assert att.pending_updates_K == [] and att.pending_updates_V == [(4, 1, 2.0)]
    att.engine.rebuild()
    assert att.pending_updates_V == [] and att.num_updates == 0


OPS = st.one_of(
    st.tuples(
        st.sampled_from(["K", "V"]),
        st.lists(
            st.tuples(st.integers(0, 7), st.integers(0, 2), st.floats(-1, 1, width=16)),
            max_size=6,
        ),
    ),
    st.just(("flush", None)),
    st.just(("apply", None)),
    st.just(("rebuild", None)),
)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.booleans(), st.lists(OPS, max_size=25))
def test_pending_updates_are_exactly_what_the_caches_lack(initial, adaptive, ops):
    # K = K at the last flush + the listed K updates (V likewise), however flushes come
    func = adaptive_threshold if adaptive else None
    att = small(initial_threshold=initial, adaptive_threshold_func=func)
    base_k, base_v, flushes = att.K.copy(), att.V.copy(), 0
    for op, updates in ops:
        if op in ("K", "V"):
            (att.lazy_update_K if op == "K" else att.lazy_update_V)(updates)
        elif op == "flush":
            att.engine.flush()
        elif op == "apply":
            att.apply_lazy_updates()
        else:
            att.engine.rebuild()
        if att.engine.n_flushes != flushes:
            base_k, base_v, flushes = att.K.copy(), att.V.copy(), att.engine.n_flushes
        for base, pending, now in (
            (base_k, att.pending_updates_K, att.K),
            (base_v, att.pending_updates_V, att.V),
        ):
            expected = base.copy()
            for i, j, delta in pending:
                expected[i, j] += delta
            np.testing.assert_array_equal(expected, now)
        assert len(att.pending_updates_K) + len(att.pending_updates_V) == att.engine.pending


BAD_ANSWERS = [
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (0, ValueError),
    (-3, ValueError),
    (None, TypeError),
    ("5", TypeError),
    (True, TypeError),
    ([10], TypeError),
]


@pytest.mark.parametrize(("answer", "exc"), BAD_ANSWERS)
@pytest.mark.parametrize("flush_by", ["K", "V", "apply", "engine.flush", "engine.rebuild"])
def test_a_bad_threshold_function_raises_before_anything_changes(answer, exc, flush_by):
    # also a flush asked of the engine directly (issue 18, 9: it raised after flushing)
    att = small(initial_threshold=3, adaptive_threshold_func=lambda avg, size: answer)
    K_built = att.K.copy()
    att.lazy_update_K([(0, 0, 0.5)])
    before = state(att)
    calls = {
        "apply": att.apply_lazy_updates,
        "engine.flush": att.engine.flush,
        "engine.rebuild": att.engine.rebuild,
    }
    with pytest.raises(exc, match=r"adaptive_threshold_func\(\d+, 24\) returned"):
        if flush_by in calls:
            calls[flush_by]()
        else:
            getattr(att, f"lazy_update_{flush_by}")([(1, 1, 0.25), (2, 2, 0.125)])
    assert_same(state(att), before)
    np.testing.assert_allclose(
        att.engine.output(stale=True), dense_attention(att.Q, K_built, att.V, scale=1.0)
    )


def test_the_threshold_function_is_asked_once_per_flush():
    calls = []

    def flaky(avg, size):  # a good answer, then garbage: only the first may be used
        calls.append((avg, size))
        return 4.9 if len(calls) % 2 else None

    att = small(initial_threshold=2, adaptive_threshold_func=flaky)
    att.lazy_update_V([(1, 1, 0.5), (2, 2, 0.5)])  # flushes 2 updates
    assert calls == [(2, 24)] and att.lazy_threshold == 4  # truncated, as int() did
    assert att.engine.n_flushes == 1 and att.pending_updates_V == []


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="initial_threshold=0 must be an integer >= 1"):
        small(initial_threshold=0)
    with pytest.raises(TypeError, match="adaptive_threshold_func=5 must be callable"):
        small(adaptive_threshold_func=5)
