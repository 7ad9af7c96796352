"""The shared argument checks: every refusal names the argument and the value, bools are
refused on every path, and no input escapes as numpy's or Python's own exception."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dynattn import LazyAttention
from dynattn import _validate as V_

F64, F32 = np.dtype(np.float64), np.dtype(np.float32)
HUGE = 10**400  # a Python int no float can hold
U64_MAX = np.uint64(2**64 - 1)


# ------------------------------------------------------------------ scalars


@pytest.mark.parametrize("value", [HUGE, -HUGE, Fraction(HUGE, 3)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_scalar_beyond_the_float_range_names_the_argument(value, dtype):
    with pytest.raises(ValueError, match=r"^delta=(-?\d|Fraction).*must be finite \(in float"):
        V_.check_scalar("delta", value, dtype)


def test_scalar_too_large_for_float32_is_a_value_error_not_a_warning():
    # np.float32(1e39) warns "overflow encountered in cast": under -W error a RuntimeWarning
    with pytest.raises(ValueError, match=r"delta=1e\+39 must be finite \(in float32"):
        V_.check_scalar("delta", 1e39, F32)
    with pytest.raises(ValueError, match="must be finite"):
        V_.check_scalar("delta", np.longdouble(10) ** 400, F64)


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", None, 1j])
def test_scalar_refuses_bools_and_non_reals(value):
    with pytest.raises(TypeError, match=r"^delta=.* must be a real number"):
        V_.check_scalar("delta", value, F64)


def _fits_float64(value) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@given(
    st.one_of(
        st.integers(),
        st.integers(2**1000, 2**1100).map(lambda v: v * (-1) ** v),
        st.fractions(),
        st.floats(allow_nan=True),
    )
)
@example(HUGE)
def test_scalar_is_the_value_or_a_value_error_naming_it(value):
    if _fits_float64(value):
        assert V_.check_scalar("x", value, F64) == float(value)
    else:
        with pytest.raises(ValueError, match=r"^x=.* must be finite \(in float64"):
            V_.check_scalar("x", value, F64)


# ------------------------------------------------------------------ integers >= low


@pytest.mark.parametrize("value", [1, 7, np.int8(3), np.uint64(2**64 - 1), 10**30])
def test_check_int_accepts_integers_from_one(value):
    assert V_.check_int("n", value) == int(value)
    assert type(V_.check_int("n", value)) is int


@pytest.mark.parametrize(
    ("value", "low", "exc", "match"),
    [
        (0, 1, ValueError, r"^n=0 must be an integer >= 1$"),
        (-5, 0, ValueError, r"^n=-5 must be an integer >= 0$"),
        (2.0, 1, TypeError, r"^n=2\.0 must be an integer >= 1$"),
        (True, 1, TypeError, r"^n=True must be an integer"),
        (np.bool_(True), 0, TypeError, "n=.*True"),
        ("5", 1, TypeError, r"^n='5'"),
        (None, 1, TypeError, r"^n=None"),
    ],
)
def test_check_int_refusals_name_the_argument_and_the_value(value, low, exc, match):
    with pytest.raises(exc, match=match):
        V_.check_int("n", value, low)


# ------------------------------------------------------------------ index arrays


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (np.array([0, U64_MAX], dtype=np.uint64), r"rows\[1\]=18446744073709551615 is out"),
        ([2**64 - 1], r"rows\[0\]=18446744073709551615 is out of range"),
        ([0, 2**64], r"rows\[1\]=18446744073709551616 is out of range"),
        ([-1, 2**64 - 1], r"rows\[0\]=-1 is out of range"),  # numpy makes these floats
        (np.array([3, 2**63 + 5], dtype=np.uint64), r"rows\[1\]=9223372036854775813"),
    ],
)
def test_indices_are_reported_as_given_not_wrapped(rows, match):
    with pytest.raises(IndexError, match=match):
        V_.as_indices("rows", rows, 5)


@given(st.lists(st.integers(0, 20) | st.integers(2**63, 2**64 - 1), min_size=1, max_size=8))
@example([2**64 - 1])
def test_unsigned_indices_in_range_or_named_with_their_value(values):
    arr = np.array(values, dtype=np.uint64)
    bad = [k for k, v in enumerate(values) if v >= 10]
    if bad:
        with pytest.raises(IndexError, match=rf"rows\[{bad[0]}\]={values[bad[0]]} "):
            V_.as_indices("rows", arr, 10)
    else:
        np.testing.assert_array_equal(V_.as_indices("rows", arr, 10), values)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([1, True], r"rows\[1\]=True is a bool"),
        ([True], r"rows\[0\]=True must be an integer index"),
        (np.array([True, False]), r"rows\[0\]=.*True.* must be an integer index"),
        ([1.0, 2.0], r"rows\[0\]=1\.0 must be an integer index"),
        (["a"], r"rows\[0\]='a' must be an integer index"),
    ],
)
def test_indices_refuse_bools_and_non_integers_by_position(rows, match):
    with pytest.raises(TypeError, match=match):
        V_.as_indices("rows", rows, 5)


def test_object_indices_that_are_all_valid_are_accepted():
    out = V_.as_indices("rows", np.array([1, 2], dtype=object), 5)
    assert out.dtype == np.int64 and out.tolist() == [1, 2]


# ------------------------------------------------------------------ ragged input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: V_.as_indices("rows", [[1, 2], [3]], 5), r"rows\[0\] has 2 entries, rows\[1\] "),
        (lambda: V_.as_vector("deltas", [1.0, [2.0]], 2, F64), r"deltas\[0\] is a number"),
        (lambda: V_.as_matrix("values", [[1.0], [1.0, 2.0]], F64), r"values\[1\] has 2"),
        (lambda: V_.as_matrix("Q", [[[1.0], [2.0, 3.0]]], F64), r"Q\[0\]\[0\] has 1 entry"),
    ],
)
def test_ragged_lists_are_named_where_they_break(call, match):
    with pytest.raises(ValueError, match=r"is not a rectangular array of numbers: .*" + match):
        call()


# ------------------------------------------------------------------ real arrays


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (np.array([True, False]), TypeError, "deltas has dtype bool"),
        ([0.5, True], TypeError, r"deltas\[1\]=True is a bool"),
        ([1, np.bool_(False)], TypeError, r"deltas\[1\]=.*False.* is a bool"),
        ([HUGE, 1.0], ValueError, r"deltas\[0\]=1000.*must be finite"),
        ([1.0, None], TypeError, r"deltas\[1\]=None must be a real number"),
        ([1.0, "x"], TypeError, "deltas has dtype <U"),
    ],
)
def test_vectors_name_the_first_bad_entry(value, exc, match):
    with pytest.raises(exc, match=match):
        V_.as_vector("deltas", value, 2, F64)


def test_vectors_of_python_objects_that_are_reals_are_converted():
    out = V_.as_vector("deltas", [Fraction(1, 4), 2**70], 2, F64)
    assert out.dtype == F64 and out.tolist() == [0.25, 2.0**70]


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=12),
    st.data(),
)
def test_a_bool_anywhere_in_a_vector_or_matrix_is_named(values, data):
    k = data.draw(st.integers(0, len(values) - 1))
    values[k] = data.draw(st.booleans())
    with pytest.raises(TypeError, match=rf"deltas\[{k}\]=(True|False) is a bool"):
        V_.as_vector("deltas", values, len(values), F64)
    with pytest.raises(TypeError, match=rf"values\[0\]\[{k}\]=(True|False) is a bool"):
        V_.as_matrix("values", [values], F64)


def test_bool_matrices_are_refused():
    with pytest.raises(TypeError, match="Q has dtype bool"):
        V_.as_matrix("Q", np.ones((2, 2), dtype=bool), F64)


# ------------------------------------------------------------------ (i, j, delta) triples


def test_triples_are_split_into_checked_columns():
    r, c, d = V_.as_triples([(1, 2, 0.5), (np.int64(3), np.uint8(0), Fraction(1, 2))], 4, 3, F32)
    assert (r.dtype, c.dtype, d.dtype) == (np.int64, np.int64, F32)
    assert (r.tolist(), c.tolist(), d.tolist()) == ([1, 3], [2, 0], [0.5, 0.5])


@pytest.mark.parametrize(
    ("updates", "exc", "match"),
    [
        ([(0, 0, True)], TypeError, r"updates\[0\]\[2\] \(delta\)=True"),
        ([(0, 0, 0.5), (True, 0, 0.5)], TypeError, r"updates\[1\]\[0\] \(i\)=True"),
        ([(0, 0, 0.5), (1, np.bool_(True), 0.5)], TypeError, r"updates\[1\]\[1\] \(j\)"),
        ([(0, 0, HUGE)], ValueError, r"updates\[0\]\[2\] \(delta\)=1000.*must be finite"),
        ([(2**64 - 1, 0, 1.0)], IndexError, r"updates\[0\]\[0\] \(i\)=18446744073709551615"),
        ([(0, [1], 0.5)], TypeError, r"updates\[0\]\[1\] \(j\)=\[1\]"),
        ([(0, 0, [1.0])], TypeError, r"updates\[0\]\[2\] \(delta\)=\[1\.0\]"),
        ([(0, 0, 1.0), (0, 0)], ValueError, r"updates\[1\]=\(0, 0\) is not an \(i, j, delta\)"),
        ([], ValueError, "updates is empty"),
        (5, TypeError, "updates=5 must be a sequence"),
        ([(0, 0, 1e39)], ValueError, r"updates\[0\]\[2\] \(delta\)=1e\+39 must be finite"),
    ],
)
def test_triples_name_the_first_bad_item(updates, exc, match):
    with pytest.raises(exc, match=match):
        V_.as_triples(updates, 4, 3, F32)


# ------------------------------------------------------------------ through the engine


def _engine():
    rng = np.random.default_rng(0)
    eng = LazyAttention(*rng.standard_normal((3, 6, 3)), policy=100)
    eng.update_k(1, 1, 0.5)
    return eng


BOOL_CALLS = [
    lambda e: e.update_k(0, 0, True),
    lambda e: e.update_v_many([0], [0], [True]),
    lambda e: e.update_v_many(np.array([0, 1]), np.array([0, 1]), np.array([True, False])),
    lambda e: e.update_k_many([0, 1], [0, 1], [0.5, True]),
    lambda e: e.update_k_many([0, True], [0, 1], [0.5, 0.5]),
    lambda e: e.set_k_row(0, [1.0, True, 0.0]),
    lambda e: e.set_v_row(0, np.array([True, True, False])),
    lambda e: e.set_k_rows([0], [[1.0, 0.0, False]]),
    lambda e: e.set_v_rows([0], np.ones((1, 3), dtype=bool)),
]


@pytest.mark.parametrize(
    "call",
    [
        *BOOL_CALLS,
        lambda e: e.update_k_many([(0, 0, True)]),
        lambda e: e.update_v_many([(0, 0, 0.5), (True, 1, 0.5)]),
    ],
)
def test_bools_are_refused_on_every_engine_path_and_change_nothing(call):
    eng = _engine()
    K, V, pending = eng.K.copy(), eng.V.copy(), eng.pending
    with pytest.raises(TypeError, match=r"bool|True|False"):
        call(eng)
    np.testing.assert_array_equal(eng.K, K)
    np.testing.assert_array_equal(eng.V, V)
    assert eng.pending == pending


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda e: e.update_k(0, 0, HUGE), ValueError, "delta=1000"),
        (lambda e: e.update_v_many([0], [0], [HUGE]), ValueError, r"deltas\[0\]=1000"),
        (lambda e: e.update_k_many([[0, 1], [2]], [0, 0], [1.0, 1.0]), ValueError, "rows"),
        (lambda e: e.update_k_many(np.array([U64_MAX]), [0], [1.0]), IndexError, "18446744"),
        (lambda e: e.set_k_rows([0, 1], [[1.0, 2.0, 3.0], [1.0]]), ValueError, r"values\[1\]"),
        pytest.param(
            lambda e: e.update_k_many([(0, [1, 2], 0.5), (1, [0], 0.5)]),
            TypeError,
            r"updates\[0\]\[1\] \(j\)=\[1, 2\]",
        ),
    ],
)
def test_engine_errors_name_the_argument_and_change_nothing(call, exc, match):
    eng = _engine()
    K, V, pending = eng.K.copy(), eng.V.copy(), eng.pending
    with pytest.raises(exc, match=match):
        call(eng)
    np.testing.assert_array_equal(eng.K, K)
    np.testing.assert_array_equal(eng.V, V)
    assert eng.pending == pending
