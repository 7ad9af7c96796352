"""``C += A @ B`` through NumPy's own BLAS (dynattn._blas), and the engine without it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn import LazyAttention, _blas
from dynattn.engine import kernels

NUMPY_WHEEL_BLAS = _blas._numpy_built_with_wheel_blas()  # as NumPy's PyPI wheels, in CI


def _view(rng, dtype, shape, pad):
    """A (shape) array whose rows sit ``pad`` elements apart beyond their length (a column
    slice of a wider array), and the wider array itself."""
    base = rng.standard_normal((shape[0], shape[1] + pad)).astype(dtype)
    return base[:, pad // 2 : pad // 2 + shape[1]], base


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(0, 9),
    k=st.integers(0, 9),
    p=st.integers(0, 9),
    pads=st.tuples(*[st.integers(0, 3)] * 3),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_add_product_adds_the_product_and_touches_nothing_else(m, k, p, pads, dtype, seed):
    rng = np.random.default_rng(seed)
    (A, _), (B, _), (C, C_base) = (
        _view(rng, dtype, shape, pad)
        for shape, pad in zip(((m, k), (k, p), (m, p)), pads, strict=True)
    )
    before = C_base.copy()
    want = C.astype(np.float64) + A.astype(np.float64) @ B.astype(np.float64)
    if _blas.add_product(C, A, B):
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(
            C, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max(initial=0.0))
        )
        outside = np.ones(C_base.shape, dtype=bool)
        outside[:, pads[2] // 2 : pads[2] // 2 + p] = False
        np.testing.assert_array_equal(C_base[outside], before[outside])
    else:
        np.testing.assert_array_equal(C_base, before)
        assert not NUMPY_WHEEL_BLAS  # with NumPy's wheel BLAS every case here is supported


@pytest.mark.parametrize(
    "case",
    [
        "fortran C",
        "fortran A",
        "mixed dtypes",
        "float16",
        "read-only C",
        "shapes",
        "3-D",
        "B inside C",
    ],
)
def test_add_product_declines_what_it_cannot_do_and_leaves_c_alone(case):
    rng = np.random.default_rng(0)
    A, B, C = (rng.standard_normal(s) for s in ((4, 3), (3, 5), (4, 5)))
    if case == "fortran C":
        C = np.asfortranarray(C)
    elif case == "fortran A":
        A = np.asfortranarray(A)
    elif case == "mixed dtypes":
        A = A.astype(np.float32)
    elif case == "float16":
        A, B, C = (X.astype(np.float16) for X in (A, B, C))
    elif case == "read-only C":
        C.flags.writeable = False
    elif case == "shapes":
        B = B[:2]
    elif case == "3-D":
        A = A[None]
    elif case == "B inside C":
        B = C[:3]  # BLAS would read rows of B it has already overwritten
    before = C.copy()
    assert _blas.add_product(C, A, B) is False
    np.testing.assert_array_equal(C, before)


@pytest.mark.skipif(not NUMPY_WHEEL_BLAS, reason="NumPy here is not built with scipy-openblas")
def test_numpy_wheels_blas_is_found_for_both_dtypes():
    # the flush relies on it for speed: losing it silently (a renamed symbol, a moved
    # library) would only show as a slower benchmark
    for dtype in (np.float32, np.float64):
        assert _blas._gemm(np.dtype(dtype)) is not None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_flushes_and_queries_match_without_the_accumulating_product(monkeypatch, dtype):
    # the fallback (a temporary and an add) gives the same caches as the single GEMM
    rng = np.random.default_rng(3)
    n, d = 48, 8
    Q, K, V = (rng.standard_normal((n, d)).astype(dtype) for _ in range(3))
    engines = [LazyAttention(Q, K, V, policy=None) for _ in range(2)]
    script = [
        (rng.integers(0, n, 6), rng.integers(0, d, 6), rng.standard_normal(6)) for _ in range(8)
    ]
    results = []
    for use_blas, eng in zip((True, False), engines, strict=True):
        with monkeypatch.context() as patch:
            if not use_blas:
                patch.setattr(kernels, "add_product", lambda C, A, B: False)
            outs = []
            for t, (rows, cols, deltas) in enumerate(script):
                (eng.update_k_many if t % 2 else eng.update_v_many)(rows, cols, deltas)
                outs.append(eng.query_many(rows, cols))  # corrected rows (multi-row path)
                eng.flush()
                outs.append(eng.output(stale=True))
            results.append(outs)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
