"""``C += A @ B`` in one GEMM (β = 1), in the BLAS that NumPy itself calls.

NumPy has no accumulating product: ``C += A @ B`` writes the product to a temporary and then
adds it, a pass over C that took 8-10 % of a flush (n = 4,096, 128 touched rows: 143 µs of
1.85 ms in float32). SciPy's BLAS wrappers accumulate, but SciPy's PyPI wheels bundle a second
OpenBLAS, whose idle threads spin against NumPy's on a 2-core machine (a 10× slowdown seen on
this machine class). So the GEMM is called with ctypes in the OpenBLAS that NumPy's wheels
bundle (``scipy-openblas``, 64-bit integers: CBLAS symbols ``scipy_cblas_?gemm64_``), found in
NumPy's own library folder: the same library, already loaded, with the same thread pool.

Anywhere else (another build or BLAS, or a first product that disagrees with NumPy's)
:func:`add_product` returns False and the caller keeps the temporary and the add.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import numpy as np

__all__ = ["add_product"]

_ROW_MAJOR, _NO_TRANS = 101, 111  # CBLAS enums (C ints whatever the integer width)


def add_product(C: np.ndarray, A: np.ndarray, B: np.ndarray) -> bool:
    """``C += A @ B`` in place by one BLAS call; False, with C untouched, where it cannot.

    A (m, k), B (k, p) and C (m, p) must share a dtype, float32 or float64, be row-major with
    unit column stride (row strides may be larger), and C must be writable and share no
    memory with A or B (BLAS would read what it has overwritten). Costs the GEMM's
    ``2·m·k·p`` flops and nothing more: no temporary, no second pass over C.
    """
    gemm = _gemm(C.dtype)
    if gemm is None or not (A.dtype == B.dtype == C.dtype and C.flags.writeable):
        return False
    if np.may_share_memory(C, A) or np.may_share_memory(C, B):
        return False
    lds = [_leading(X) for X in (A, B, C)]
    if None in lds:
        return False
    (m, k), (k2, p) = A.shape, B.shape
    if k2 != k or C.shape != (m, p):
        return False
    if m and p and k:  # with k = 0 the product is zero; BLAS would refuse lda = 0
        _accumulate(gemm, A, B, C, *lds)
    return True


def _accumulate(gemm, A, B, C, lda: int, ldb: int, ldc: int) -> None:
    """``C += A @ B`` by ``gemm`` on row-major arrays with these leading dimensions."""
    m, k = A.shape
    p = B.shape[1]
    args = (m, p, k, 1.0, A.ctypes.data, lda, B.ctypes.data, ldb, 1.0, C.ctypes.data, ldc)
    gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, *args)


def _leading(X: np.ndarray) -> int | None:
    """Leading dimension of an aligned row-major 2-D array with unit column stride, else None
    (strides that are never followed, of an empty array or a single row, are not asked)."""
    if X.ndim != 2 or not X.flags.aligned:
        return None
    size, (m, p), (row, col) = X.itemsize, X.shape, X.strides
    if m * p == 0:
        return max(p, 1)
    if p > 1 and col != size:
        return None
    if m == 1:
        return p
    if row % size or row < size * p:
        return None
    return row // size


@functools.cache
def _gemm(dtype: np.dtype):
    """The checked ``cblas_?gemm`` of NumPy's bundled OpenBLAS for ``dtype``, or None."""
    kind = {
        np.dtype(np.float32): ("s", ctypes.c_float),
        np.dtype(np.float64): ("d", ctypes.c_double),
    }.get(np.dtype(dtype))
    lib = _numpy_openblas()
    if kind is None or lib is None:
        return None
    letter, real = kind
    try:
        gemm = getattr(lib, f"scipy_cblas_{letter}gemm64_")
    except AttributeError:
        return None
    gemm.restype = None
    i64, ptr, enum = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    gemm.argtypes = [enum, enum, enum, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
    # a first product, against NumPy's, before any caller relies on it
    rng = np.random.default_rng(0)
    A, B, C = (rng.standard_normal(shape).astype(dtype) for shape in ((5, 3), (3, 4), (5, 4)))
    expected = C + A @ B
    _accumulate(gemm, A, B, C, 3, 4, 4)
    return gemm if np.allclose(C, expected, rtol=1e-5, atol=1e-5) else None


def _numpy_built_with_wheel_blas() -> bool:
    """Whether NumPy's build configuration names scipy-openblas with 64-bit integers."""
    config = getattr(getattr(np, "__config__", None), "CONFIG", {})
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return blas.get("name") == "scipy-openblas" and "USE64BITINT" in blas.get(
        "openblas configuration", ""
    )


@functools.cache
def _numpy_openblas():
    """NumPy's bundled scipy-openblas (ILP64), as a ctypes library, or None."""
    if not _numpy_built_with_wheel_blas():
        return None
    root = pathlib.Path(np.__file__).parent
    # wheels keep it beside the package (Linux, Windows) or inside it (macOS)
    for folder in (root.parent / "numpy.libs", root / ".dylibs"):
        for path in sorted(folder.glob("libscipy_openblas64_*")):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    return None
