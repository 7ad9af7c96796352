"""Argument checks shared by the engine and its front ends.

Every check raises before anything is modified, and every message names the argument and the
offending value, so a caller can fix the call without reading the source.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FINITE_LIMIT = {dt: float(np.finfo(dt).max) for dt in SUPPORTED_DTYPES}  # largest finite value


def resolve_dtype(dtype, *arrays) -> np.dtype:
    """The engine's working dtype.

    ``None`` keeps float32 when every input is float32 (a float32 user keeps float32 memory and
    speed) and otherwise uses float64; an explicit dtype must be float32 or float64.
    """
    if dtype is None:
        kinds = [getattr(a, "dtype", None) for a in arrays]
        return (
            SUPPORTED_DTYPES[0]
            if kinds and all(k == np.float32 for k in kinds)
            else SUPPORTED_DTYPES[1]
        )
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype={dtype!r} is not a numpy dtype; use float32 or float64") from exc
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype={dt} is not supported; use float32 or float64")
    return dt


def as_matrix(
    name: str, value, dtype: np.dtype, shape: tuple | None = None, pad: int = 0
) -> np.ndarray:
    """A finite, C-contiguous 2-D copy of ``value`` (dense or scipy.sparse) in ``dtype``,
    with ``pad`` zero columns after its own."""
    if hasattr(value, "toarray") and hasattr(value, "nnz"):  # scipy.sparse, without importing it
        value = value.toarray()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected real numbers (float32/float64)")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d); got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected {shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column; got {arr.shape}")
    with np.errstate(over="ignore"):  # reported below, naming the array
        out = aligned_copy(arr, dtype, pad)
    check_finite(name, out, source=arr)
    return out


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on a 64-byte cache line. NumPy promises 16 bytes,
    and large arrays come from mmap 16 bytes past a page: rows of 64 numbers then straddle
    one cache line more each, and a fresh query's pass over K took 7-15 % longer."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    buf = np.empty(size + _LINE, dtype=np.uint8)
    start = -buf.ctypes.data % _LINE
    return buf[start : start + size].view(dtype).reshape(shape)


def aligned_copy(arr: np.ndarray, dtype=None, pad: int = 0) -> np.ndarray:
    """A C-contiguous copy of 2-D ``arr`` (cast to ``dtype`` if given) on a cache line (see
    :func:`aligned_empty`), followed in each row by ``pad`` zeros."""
    n, d = arr.shape
    out = aligned_empty((n, d + pad), arr.dtype if dtype is None else dtype)
    out[:, :d] = arr
    out[:, d:] = 0
    return out


_LINE = 64  # bytes in a cache line


def check_finite(name: str, arr: np.ndarray, source=None) -> None:
    """Reject NaN/inf, also values that only overflow when cast down to the working dtype."""
    # a finite sum of squares proves every entry finite, in one pass and without a temporary
    # (half the time of isfinite().all() on a row); vdot, unlike dot, does not warn when the
    # sum overflows, and only then are the entries looked at one by one
    if math.isfinite(np.vdot(arr, arr)):
        return
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        where = tuple(int(b) for b in bad)
        shown = (source if source is not None else arr)[where] if arr.ndim else arr
        raise ValueError(f"{name} must be finite; {name}{list(where)} = {shown!r} (in {arr.dtype})")


def check_index(name: str, value, bound: int) -> int:
    """A Python int in ``[0, bound)``; negative indices are refused rather than wrapped."""
    if type(value) is int and 0 <= value < bound:  # the common case, cheaply
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer index")
    i = int(value)
    if not 0 <= i < bound:
        raise IndexError(f"{name}={i} is out of range [0, {bound})")
    return i


def check_scalar(name: str, value, dtype: np.dtype) -> float:
    """A finite real scalar that stays finite in ``dtype``."""
    limit = FINITE_LIMIT.get(dtype, 0.0)
    if type(value) is float and -limit <= value <= limit:  # the common case, cheaply
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number")
    if not np.isfinite(dtype.type(value)):
        raise ValueError(f"{name}={value!r} must be finite (in {dtype})")
    return float(value)


def entry_sum(which: str, target: np.ndarray, i: int, j: int, delta: float):
    """``(old, new)``: ``target[i, j]`` as a float and ``target[i, j] + delta`` in the target's
    dtype; a ValueError naming the entry when the sum is not finite there (checked before
    anything is written)."""
    dt = target.dtype
    old, step = target[i, j], dt.type(delta)
    before = float(old)
    total = before + float(step)
    limit = FINITE_LIMIT[dt]
    if -limit <= total <= limit:
        return before, old + step
    raise ValueError(
        f"delta={delta!r} would make {which}[{i}, {j}] = {total!r}, not finite in {dt}"
    )


def entry_sums(
    which: str, target: np.ndarray, rows: np.ndarray, cols: np.ndarray, deltas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions and final values of ``target[rows, cols] += deltas`` on a C-contiguous
    2-D ``target`` (repeated entries accumulate in order, as ``np.add.at`` would), checked
    finite as a whole before anything is written; the first bad entry is named."""
    d = target.shape[1]
    flat = rows * d + cols
    with np.errstate(over="ignore", invalid="ignore"):
        if len(set(flat.tolist())) == len(flat):  # no entry twice: one add (no sort)
            final = target.ravel()[flat] + deltas
        else:
            flat, where = np.unique(flat, return_inverse=True)
            final = target.ravel()[flat]
            np.add.at(final, where, deltas)
    ok = np.abs(final) <= FINITE_LIMIT[target.dtype]
    if not ok.all():
        k = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"deltas would make {which}[{flat[k] // d}, {flat[k] % d}] = "
            f"{final[k]!r}, not finite in {target.dtype}"
        )
    return flat, final


def as_indices(name: str, value, bound: int, *, allow_empty: bool = False) -> np.ndarray:
    """A 1-D int64 array of indices in ``[0, bound)``."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        if allow_empty:
            return arr.astype(np.int64)
        raise ValueError(f"{name} is empty; pass at least one index")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected integer indices")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= bound)
    if bad.any():
        k = int(np.argmax(bad))
        raise IndexError(f"{name}[{k}]={int(out[k])} is out of range [0, {bound})")
    return out


def as_selection(name: str, value, bound: int) -> np.ndarray:
    """Indices from a slice, an int or an index array (used by the display views)."""
    if isinstance(value, slice):
        return np.arange(bound, dtype=np.int64)[value]
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return np.array([check_index(name, value, bound)], dtype=np.int64)
    return as_indices(name, value, bound, allow_empty=True)


def as_vector(name: str, value, length: int, dtype: np.dtype) -> np.ndarray:
    """A finite 1-D array of ``length`` reals in ``dtype`` (``value`` itself when it is one
    already: callers copy it where they keep it)."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected real numbers")
    if arr.shape != (length,):
        raise ValueError(f"{name} has shape {arr.shape}; expected ({length},)")
    if arr.dtype == dtype:  # no cast, so nothing can overflow: errstate costs ~1 µs a call
        out = arr
    else:
        with np.errstate(over="ignore"):
            out = arr.astype(dtype)
    check_finite(name, out, source=arr)
    return out
