"""Query rows replaced and token rows inserted or deleted, against the dense float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import assert_close_natural

from dynattn import CostModel, Fixed, LazyAttention
from dynattn.reference import dense_attention, dense_weights


def _rows(draw, t, d, hard):
    scale = 30.0 if hard else 2.0
    return np.array(
        draw(
            st.lists(
                st.lists(st.floats(-scale, scale), min_size=d, max_size=d), min_size=t, max_size=t
            )
        )
    )


@st.composite
def token_scenarios(draw, hard=False):
    n = draw(st.integers(2, 10))
    d = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    Q, K, V = (rng.normal(0, 10 if hard else 1, (n, d)) for _ in range(3))
    policy = draw(st.sampled_from([Fixed(1), Fixed(3), Fixed(10**9), CostModel(initial=2)]))
    ops = []
    size = n
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(
            st.sampled_from(
                ["insert", "delete", "set_q", "update_k", "set_v", "query", "flush", "check"]
            )
        )
        if kind == "insert":
            t = draw(st.integers(1, 3))
            ops.append(
                (kind, draw(st.integers(0, size)), *(_rows(draw, t, d, hard) for _ in "qkv"))
            )
            size += t
        elif kind == "delete" and size > 1:
            rows = draw(
                st.lists(
                    st.integers(0, size - 1), min_size=1, max_size=min(3, size - 1), unique=True
                )
            )
            ops.append((kind, rows))
            size -= len(rows)
        elif kind == "set_q":
            rows = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3, unique=True))
            ops.append((kind, rows, _rows(draw, len(rows), d, hard)))
        elif kind == "update_k":
            ops.append(
                (
                    kind,
                    draw(st.integers(0, size - 1)),
                    draw(st.integers(0, d - 1)),
                    draw(st.floats(-3, 3)),
                )
            )
        elif kind == "set_v":
            ops.append((kind, draw(st.integers(0, size - 1)), _rows(draw, 1, d, hard)[0]))
        elif kind == "query":
            ops.append((kind, draw(st.integers(0, size - 1)), draw(st.integers(0, d - 1))))
        elif kind in ("flush", "check"):
            ops.append((kind,))
    return Q, K, V, policy, ops


def run(scenario, tol):
    Q, K, V, policy, ops = scenario
    eng = LazyAttention(Q, K, V, policy=policy)
    Q, K, V = Q.copy(), K.copy(), V.copy()
    for op in ops:
        kind = op[0]
        if kind == "insert":
            at, Qr, Kr, Vr = op[1:]
            eng.insert_rows(at, Qr, Kr, Vr)
            Q, K, V = (np.insert(a, at, r, axis=0) for a, r in ((Q, Qr), (K, Kr), (V, Vr)))
        elif kind == "delete":
            eng.delete_rows(op[1])
            Q, K, V = (np.delete(a, op[1], axis=0) for a in (Q, K, V))
        elif kind == "set_q":
            eng.set_q_rows(op[1], op[2])
            Q[op[1]] = op[2]
        elif kind == "update_k":
            eng.update_k(*op[1:])
            K[op[1], op[2]] += op[3]
        elif kind == "set_v":
            eng.set_v_row(op[1], op[2])
            V[op[1]] = op[2]
        elif kind == "flush":
            eng.flush()
        want = dense_attention(Q, K, V, eng.scale)
        nat = dense_weights(Q, K, eng.scale) @ np.abs(V)
        assert (eng.m, eng.n) == (len(Q), len(K))
        np.testing.assert_array_equal(eng.Q, Q)
        np.testing.assert_array_equal(eng.K, K)
        np.testing.assert_array_equal(eng.V, V)
        if kind == "query":
            i, j = op[1:]
            assert_close_natural(eng.query(i, j), want[i, j], nat[i, j], tol, "query")
        elif kind == "check":
            assert_close_natural(eng.output(), want, nat, tol, "output")
            assert_close_natural(eng.query_row(0), want[0], nat[0], tol, "query_row")
    assert_close_natural(
        eng.output(),
        dense_attention(Q, K, V, eng.scale),
        dense_weights(Q, K, eng.scale) @ np.abs(V),
        tol,
        "final output",
    )
    eng.flush()
    assert_close_natural(
        eng.output(stale=True),
        dense_attention(Q, K, V, eng.scale),
        dense_weights(Q, K, eng.scale) @ np.abs(V),
        tol,
        "flushed caches",
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_scenarios())
def test_token_edits_match_the_dense_oracle(scenario):
    run(scenario, tol=1e-12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_scenarios(hard=True))
def test_token_edits_on_hard_data_match_the_dense_oracle(scenario):
    run(scenario, tol=1e-10)


def test_pending_updates_stay_pending_and_follow_their_rows():
    rng = np.random.default_rng(3)
    eng = LazyAttention(*rng.standard_normal((3, 8, 2)), policy=100)
    eng.update_k(5, 0, 0.5)
    eng.update_v(1, 1, 0.5)
    eng.update_k(6, 1, 0.5)
    eng.insert_rows(2, *rng.standard_normal((3, 2, 2)))  # rows 2.. move down by 2
    assert (eng.touched_k, eng.touched_v, eng.pending) == ({7, 8}, {1}, 3)
    eng.delete_rows([1, 8])  # row 1's and old row 6's updates go with their rows
    assert (eng.touched_k, eng.touched_v, eng.pending) == ({6}, frozenset(), 3)
    assert eng.flush().rows == 1


BAD = [
    (lambda e: e.set_q_rows([0, 0], np.ones((2, 2))), ValueError, "repeats"),
    (lambda e: e.set_q_rows([6], np.ones((1, 2))), IndexError, "rows"),
    (lambda e: e.set_q_rows([1], np.ones((1, 3))), ValueError, "values"),
    (lambda e: e.set_q_rows([1], [[np.nan, 0.0]]), ValueError, "values"),
    (
        lambda e: e.insert_rows(7, np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2))),
        IndexError,
        "at",
    ),
    (
        lambda e: e.insert_rows(0, np.ones((1, 2)), np.ones((2, 2)), np.ones((1, 2))),
        ValueError,
        "K_rows",
    ),
    (
        lambda e: e.insert_rows(0, np.ones((1, 3)), np.ones((1, 2)), np.ones((1, 2))),
        ValueError,
        "Q_rows",
    ),
    (
        lambda e: e.insert_rows(0, np.ones((1, 2)), np.ones((1, 2)), [[np.inf, 0]]),
        ValueError,
        "V_rows",
    ),
    (lambda e: e.delete_rows([0, 0]), ValueError, "repeats"),
    (lambda e: e.delete_rows(range(6)), ValueError, "at least one"),
    (lambda e: e.delete_rows([6]), IndexError, "rows"),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_token_edits_name_the_argument_and_change_nothing(call, exc, match):
    rng = np.random.default_rng(4)
    eng = LazyAttention(*rng.standard_normal((3, 6, 2)), policy=100)
    eng.update_k(2, 0, 0.3)
    before = (np.array(eng.Q), np.array(eng.K), np.array(eng.V), eng.output(), eng.pending)
    with pytest.raises(exc, match=match):
        call(eng)
    after = (np.array(eng.Q), np.array(eng.K), np.array(eng.V), eng.output(), eng.pending)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_token_edits_need_a_square_engine():
    rng = np.random.default_rng(5)
    eng = LazyAttention(rng.standard_normal((3, 2)), *rng.standard_normal((2, 5, 2)))
    with pytest.raises(ValueError, match="m=3, n=5"):
        eng.delete_rows([0])
    with pytest.raises(ValueError, match="m = n"):
        eng.insert_rows(0, *np.ones((3, 1, 2)))
    eng.set_q_rows([2], np.ones((1, 2)))  # query rows can change in any engine
    np.testing.assert_allclose(eng.output(), dense_attention(eng.Q, eng.K, eng.V), rtol=1e-12)


def test_token_edits_respect_the_engines_magnitude_limits():
    # a larger query lowers the limit on K entries; more keys lower the limit on V entries
    rng = np.random.default_rng(6)
    eng = LazyAttention(*rng.standard_normal((3, 6, 2)), policy=100)
    big_k = 0.5 * eng._limits.k
    eng.set_k_row(1, [big_k, 0.0])
    before = (np.array(eng.Q), np.array(eng.K), eng.output())
    with pytest.raises(ValueError, match=r"values.*limit|K\[1, 0\]"):
        eng.set_q_rows([0], [[10.0, 0.0]])  # scale·|q|·|k| would pass the logit limit
    with pytest.raises(ValueError, match="V_rows"):
        eng.insert_rows(0, np.zeros((1, 2)), np.zeros((1, 2)), [[eng._limits.v * 2, 0.0]])
    for a, b in zip(before, (np.array(eng.Q), np.array(eng.K), eng.output()), strict=True):
        np.testing.assert_array_equal(a, b)
    eng.set_q_rows([0], [[0.5, 0.0]])  # a smaller query is fine, and exact
    np.testing.assert_allclose(eng.output(), dense_attention(eng.Q, eng.K, eng.V), rtol=1e-12)
