"""The contract every exact strategy keeps (in the manner of river's estimator checks).

Each check takes a *factory* ``(Q, K, V) -> engine`` and exercises one promise of
:class:`dynattn.protocols.ExactAttention` against a plain dense float64 oracle:

* exact answers after any stream of single and batch updates (hypothesis-driven);
* a batch equals the same updates one by one;
* ``copy`` is an independent twin in the same state;
* ``repr`` is one informative line;
* a failed call (bad index, NaN, wrong shape, a batch with one bad item, an overflow) raises
  and changes nothing.

``tests/test_contract.py`` runs them over every strategy and several flush policies; other
test modules (e.g. the distributed engines') reuse :data:`CHECKS` with their own factories.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynattn.protocols import ExactAttention
from dynattn.reference import dense_attention

TOL = 1e-12  # of the entry's natural scale (P·|V|), float64


def inputs(n=9, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, d)) for _ in range(3))


def assert_exact(eng, what=""):
    """Every answer equals the dense float64 oracle on the engine's current K and V."""
    Q, K, V = eng_inputs(eng)
    want = dense_attention(Q, K, V, eng.scale)
    nat = _natural_scale(Q, K, V, eng.scale)
    np.testing.assert_array_less(np.abs(eng.output() - want), TOL * nat + 1e-300, what)
    n, d = want.shape
    for i, j in ((0, 0), (n - 1, d - 1), (n // 2, d // 2)):
        assert abs(eng.query(i, j) - want[i, j]) <= TOL * nat[i, j] + 1e-300, what
        np.testing.assert_array_less(
            np.abs(eng.query_row(i) - want[i]), TOL * nat[i] + 1e-300, what
        )
    rows, cols = np.arange(n) % n, np.arange(n) % d
    got = eng.query_many(rows, cols)
    assert np.all(np.abs(got - want[rows, cols]) <= TOL * nat[rows, cols] + 1e-300), what


def eng_inputs(eng):
    Q = getattr(eng, "Q", None)  # the baselines keep Q private; the contract fixes it at build
    return (
        np.asarray(Q if Q is not None else eng._contract_Q),
        np.asarray(eng.K),
        np.asarray(eng.V),
    )


def _natural_scale(Q, K, V, scale):
    L = scale * Q @ K.T
    P = np.exp(L - L.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    return P @ np.abs(V)


def build(factory, Q, K, V):
    eng = factory(Q, K, V)
    if getattr(eng, "Q", None) is None:
        eng._contract_Q = np.array(Q)
    return eng


# ---------------------------------------------------------------------------- the checks
def check_protocol(factory):
    eng = build(factory, *inputs())
    assert isinstance(eng, ExactAttention)
    assert (eng.n, eng.d) == (9, 4) and eng.dtype == np.float64
    assert eng.scale == 1 / 2


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["update_k", "update_v"]),
            st.integers(0, 8),
            st.integers(0, 3),
            st.floats(-2, 2),
        ),
        st.tuples(
            st.sampled_from(["set_k_row", "set_v_row"]),
            st.integers(0, 8),
            st.lists(st.floats(-3, 3), min_size=4, max_size=4),
        ),
        st.tuples(
            st.sampled_from(["update_k_many", "update_v_many"]),
            st.lists(
                st.tuples(st.integers(0, 8), st.integers(0, 3), st.floats(-2, 2)),
                min_size=1,
                max_size=5,
            ),
        ),
        st.tuples(st.just("query"), st.integers(0, 8), st.integers(0, 3)),
        st.tuples(st.just("flush")),
    ),
    min_size=1,
    max_size=12,
)


def check_exact_under_any_stream(factory, max_examples=25):
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(ops=_ops, seed=st.integers(0, 2**16))
    def run(ops, seed):
        eng = build(factory, *inputs(seed=seed))
        K, V = np.array(eng.K), np.array(eng.V)
        for op in ops:
            kind = op[0]
            if kind in ("update_k", "update_v"):
                getattr(eng, kind)(op[1], op[2], op[3])
                (K if kind == "update_k" else V)[op[1], op[2]] += op[3]
            elif kind in ("set_k_row", "set_v_row"):
                getattr(eng, kind)(op[1], op[2])
                (K if kind == "set_k_row" else V)[op[1]] = op[2]
            elif kind in ("update_k_many", "update_v_many"):
                r, c, dl = (np.array(x) for x in zip(*op[1], strict=True))
                getattr(eng, kind)(r, c, dl)
                np.add.at(K if kind == "update_k_many" else V, (r, c), dl)
            elif kind == "query":
                eng.query(op[1], op[2])
            elif hasattr(eng, "flush"):
                eng.flush()
            np.testing.assert_allclose(eng.K, K, rtol=1e-15, atol=0)
            np.testing.assert_allclose(eng.V, V, rtol=1e-15, atol=0)
        assert_exact(eng, f"after {ops}")

    run()


def check_batch_equals_one_by_one(factory):
    rng = np.random.default_rng(5)
    rows, cols = rng.integers(0, 9, 12), rng.integers(0, 4, 12)
    rows[3] = rows[7]  # repeats accumulate
    cols[3] = cols[7]
    deltas = rng.standard_normal(12)
    new_rows = rng.standard_normal((3, 4))
    batch, single = (build(factory, *inputs(seed=2)) for _ in range(2))
    batch.update_k_many(rows, cols, deltas)
    batch.update_v_many(rows[::-1], cols, deltas)
    batch.set_k_rows([1, 4, 6], new_rows)
    batch.set_v_rows([0, 8, 2], new_rows[::-1])
    for i, j, delta in zip(rows, cols, deltas, strict=True):
        single.update_k(int(i), int(j), float(delta))
    for i, j, delta in zip(rows[::-1], cols, deltas, strict=True):
        single.update_v(int(i), int(j), float(delta))
    for i, row in zip([1, 4, 6], new_rows, strict=True):
        single.set_k_row(i, row)
    for i, row in zip([0, 8, 2], new_rows[::-1], strict=True):
        single.set_v_row(i, row)
    np.testing.assert_array_equal(batch.K, single.K)
    np.testing.assert_array_equal(batch.V, single.V)
    np.testing.assert_allclose(batch.output(), single.output(), rtol=1e-12, atol=1e-14)
    assert_exact(batch, "batch")


def check_copy_is_an_independent_twin(factory):
    eng = build(factory, *inputs(seed=3))
    eng.update_k(2, 1, 0.5)
    eng.set_v_row(4, np.ones(4))
    twin = eng.copy()
    if getattr(twin, "Q", None) is None:
        twin._contract_Q = eng._contract_Q
    before = twin.output()
    np.testing.assert_allclose(before, eng.output(), rtol=1e-12)
    eng.update_v(4, 0, 3.0)
    eng.set_k_row(0, np.full(4, 2.0))
    np.testing.assert_allclose(twin.output(), before, rtol=1e-12)
    assert_exact(twin, "twin")
    assert_exact(eng, "original after the twin was made")
    twin.update_k(1, 1, -1.0)
    assert_exact(twin, "twin after its own update")


def check_repr(factory):
    eng = build(factory, *inputs())
    text = repr(eng)
    assert "\n" not in text and type(eng).__name__ in text and "n=9" in text and "d=4" in text


def _bad_calls():
    nan = math.nan
    return [
        ("update_k", (9, 0, 0.1), IndexError, "i"),
        ("update_v", (0, -1, 0.1), IndexError, "j"),
        ("update_k", (0, 0, nan), ValueError, "delta"),
        ("set_k_row", (0, [1.0, 2.0]), ValueError, "row"),
        ("set_v_row", (0, [1.0, nan, 0.0, 0.0]), ValueError, "row"),
        ("update_k_many", ([0, 1], [0, 1], [0.1]), ValueError, "deltas"),
        ("update_v_many", ([0, 1, 9], [0, 1, 2], [0.1, 0.2, 0.3]), IndexError, "rows"),
        ("update_k_many", ([0, 1], [0, 1], [0.1, nan]), ValueError, "deltas"),
        ("set_k_rows", ([0, 1], np.ones((2, 3))), ValueError, "values"),
        ("set_v_rows", ([0, 0], np.ones((2, 4))), ValueError, "repeats"),
        ("query", (0, 4), IndexError, "j"),
        ("query_many", ([0], [0, 1]), ValueError, "rows"),
    ]


def check_failed_calls_change_nothing(factory):
    import pytest

    eng = build(factory, *inputs(seed=4))
    eng.update_k(3, 2, 0.25)  # something pending, for the engines that queue
    for name, args, exc, match in _bad_calls():
        K, V, out = np.array(eng.K), np.array(eng.V), eng.output()
        pending = getattr(eng, "pending", None)
        with pytest.raises(exc, match=match):
            getattr(eng, name)(*args)
        np.testing.assert_array_equal(eng.K, K, f"{name}{args} changed K")
        np.testing.assert_array_equal(eng.V, V, f"{name}{args} changed V")
        np.testing.assert_array_equal(eng.output(), out, f"{name}{args} changed O")
        assert getattr(eng, "pending", None) == pending, f"{name}{args} changed pending"
    check_huge_values_refused_or_exact(eng)
    assert_exact(eng, "after the failed calls")


def check_huge_values_refused_or_exact(eng):
    """A finite value too large for a strategy's sums (V[0, 0] = 1e308) is either refused,
    naming the argument and changing nothing, or taken with every answer finite and exact; a
    sum past the largest float (1e308 + 1e308) is always refused."""
    import pytest

    K, V, out = np.array(eng.K), np.array(eng.V), eng.output()
    try:
        eng.update_v(0, 0, 1e308 - float(eng.V[0, 0]))
    except ValueError as exc:
        assert "delta" in str(exc) and "V[0, 0]" in str(exc), exc
        np.testing.assert_array_equal(eng.V, V, "a refused update changed V")
        np.testing.assert_array_equal(eng.K, K, "a refused update changed K")
        np.testing.assert_array_equal(eng.output(), out, "a refused update changed O")
    else:
        assert np.isfinite(eng.output()).all() and np.isfinite(eng.query(0, 0))
        assert_exact(eng, "after V[0, 0] = 1e308")
    V = np.array(eng.V)
    with pytest.raises(ValueError, match="delta"):
        eng.update_v(0, 0, 1e308)  # past the largest float64 if 1e308 was taken, else refused
    np.testing.assert_array_equal(eng.V, V, "a refused update changed V")


CHECKS = [
    check_protocol,
    check_exact_under_any_stream,
    check_batch_equals_one_by_one,
    check_copy_is_an_independent_twin,
    check_repr,
    check_failed_calls_change_nothing,
]
