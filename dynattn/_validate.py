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
    arr = _real_array(name, value, dtype)
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
        raise TypeError(f"{name}={_short(value)} must be an integer index")
    i = int(value)
    if not 0 <= i < bound:
        raise IndexError(f"{name}={i} is out of range [0, {bound})")
    return i


def check_scalar(name: str, value, dtype: np.dtype) -> float:
    """A finite real scalar that stays finite in ``dtype``. Bools are refused (as everywhere a
    number is expected: a flag passed as a value is a mistake); so are Python ints too large
    for a float, with the argument's name rather than a bare OverflowError."""
    limit = FINITE_LIMIT.get(dtype, 0.0)
    if type(value) is float and -limit <= value <= limit:  # the common case, cheaply
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={_short(value)} must be a real number")
    try:
        if isinstance(value, np.longdouble):  # past the float64 range it warns; errstate ~1 µs
            with np.errstate(over="ignore"):
                x = float(value)
        else:
            x = float(value)
    except OverflowError:  # an int or Fraction beyond the float range
        x = math.inf
    if not -limit <= x <= limit:  # NaN fails too
        raise ValueError(f"{name}={_short(value)} must be finite (in {dtype}, |x| <= {limit:.4g})")
    return x


def check_int(name: str, value, low: int = 1) -> int:
    """A Python int ``>= low`` (by default: an integer >= 1, a count or a size).

    Any integral type is accepted (numpy integers too); bools, floats (even ``5.0``) and
    strings are refused with a TypeError, values below ``low`` with a ValueError, both naming
    the argument and the value.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={_short(value)} must be an integer >= {low}")
    i = int(value)
    if i < low:
        raise ValueError(f"{name}={i} must be an integer >= {low}")
    return i


def entry_sum(
    which: str, target: np.ndarray, i: int, j: int, delta: float, limit: float | None = None
):
    """``(old, new)``: ``target[i, j]`` as a float and ``target[i, j] + delta`` in the target's
    dtype; a ValueError naming ``delta`` and the entry when the sum is not finite there, or
    beyond ``limit`` (an engine's limit for the entries of ``which``), checked before
    anything is written. O(1): the one range check every entry update makes."""
    dt = target.dtype
    old, step = target[i, j], dt.type(delta)
    before = float(old)
    total = before + float(step)
    bound = FINITE_LIMIT[dt] if limit is None else limit
    if -bound <= total <= bound:
        return before, old + step
    if limit is None:
        raise ValueError(
            f"delta={delta!r} would make {which}[{i}, {j}] = {total!r}, not finite in {dt}"
        )
    raise ValueError(
        f"delta={delta!r} would make {which}[{i}, {j}] = {total!r}, beyond this engine's "
        f"limit for {which} entries, ±{limit:.4g} (larger values could overflow its sums)"
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
    """A 1-D int64 array of indices in ``[0, bound)``; the first bad entry is named with its
    own value (an unsigned 2**64 - 1 is not reported as the -1 it would wrap to)."""
    arr = _as_array(name, value)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.size == 0:
        if allow_empty:
            return arr.astype(np.int64)
        raise ValueError(f"{name} is empty; pass at least one index")
    if arr.dtype.kind not in "iu":
        # floats, bools, strings, ints past 64 bits (numpy's object or float arrays): the
        # first entry that is not an index in range is named, with its own error
        items = value if isinstance(value, (list, tuple)) else arr
        arr = np.array([check_index(f"{name}[{k}]", v, bound) for k, v in enumerate(items)])
    else:
        _refuse_bool_items(name, value, "an integer index")
        bad = arr >= bound if arr.dtype.kind == "u" else (arr < 0) | (arr >= bound)
        if bad.any():
            k = int(np.argmax(bad))
            raise IndexError(f"{name}[{k}]={int(arr[k])} is out of range [0, {bound})")
    return arr.astype(np.int64)


def as_triples(
    updates, n: int, d: int, dtype: np.dtype, *, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked columns ``(rows, cols, deltas)`` of a sequence of ``(i, j, delta)`` with
    ``0 <= i < n`` and ``0 <= j < d`` (int64, int64, ``dtype``), for ``update_*_many(updates)``.

    Checked as a whole, vectorised, and item by item only to name the first bad item, as
    ``updates[k][0] (i)``, ``updates[k][1] (j)`` or ``updates[k][2] (delta)``; bools are
    refused in every position, as :func:`check_index` and :func:`check_scalar` refuse them.
    An empty sequence is a ValueError unless ``allow_empty`` (then three empty arrays).
    Cost O(len(updates)).
    """
    try:
        items = list(updates)
    except TypeError:
        raise TypeError(f"updates={_short(updates)} must be a sequence of (i, j, delta)") from None
    if not items:
        if allow_empty:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype)
        raise ValueError("updates is empty; pass at least one (i, j, delta)")
    try:
        columns = list(zip(*items, strict=True))
    except (TypeError, ValueError):
        columns = []
    if len(columns) != 3:
        k = next(
            (k for k, u in enumerate(items) if not (isinstance(u, (tuple, list)) and len(u) == 3)),
            0,
        )
        raise ValueError(f"updates[{k}]={_short(items[k])} is not an (i, j, delta) triple")
    out = []
    for pos, (name, bound) in enumerate((("i", n), ("j", d))):
        values = columns[pos]
        arr = _try_array(values)
        if (
            arr.ndim != 1
            or arr.dtype.kind not in "iu"
            or _has_bool(values)
            or ((arr < 0) | (arr >= bound)).any()
        ):
            arr = np.array(
                [
                    check_index(f"updates[{k}][{pos}] ({name})", v, bound)
                    for k, v in enumerate(values)
                ]
            )
        out.append(arr.astype(np.int64, copy=False))
    deltas = columns[2]
    dl = _try_array(deltas)
    ok = dl.ndim == 1 and dl.dtype.kind in "iuf" and not _has_bool(deltas)
    if ok:
        with np.errstate(over="ignore"):  # a delta too large for float32 is named below
            dl = dl.astype(dtype)
        ok = bool(np.isfinite(dl).all())
    if not ok:
        dl = np.array(
            [check_scalar(f"updates[{k}][2] (delta)", v, dtype) for k, v in enumerate(deltas)],
            dtype=dtype,
        )
    return out[0], out[1], dl


def _try_array(items) -> np.ndarray:
    """``np.asarray(items)``, or an object array when numpy cannot make one (ragged items):
    the caller then checks item by item and names the bad one."""
    try:
        return np.asarray(items)
    except (ValueError, TypeError):
        return np.empty(0, dtype=object)


def _has_bool(items) -> bool:
    """Whether a flat sequence holds a bool, O(len(items)) in C."""
    return not _BOOLS.isdisjoint(map(type, items))


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
    if type(value) is np.ndarray and value.dtype == dtype and value.shape == (length,):
        check_finite(name, value)  # the common case: nothing to convert or cast
        return value
    arr = _real_array(name, value, dtype)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (length,):
        raise ValueError(f"{name} has shape {arr.shape}; expected ({length},)")
    if arr.dtype == dtype:  # no cast, so nothing can overflow: errstate costs ~1 µs a call
        out = arr
    else:
        with np.errstate(over="ignore"):
            out = arr.astype(dtype)
    check_finite(name, out, source=arr)
    return out


def _real_array(name: str, value, dtype: np.dtype) -> np.ndarray:
    """``value`` as an array of real numbers (not yet cast to ``dtype``).

    Refused, naming the argument: ragged nesting, bools (a bool array, or a bool among the
    items of a list), strings and other non-numbers. An object array (Python ints past 64
    bits, fractions, None) is checked entry by entry, so the first bad entry is named with its
    value, and converted to float64 when every entry is a finite real.
    """
    arr = _as_array(name, value)
    kind = arr.dtype.kind
    if kind == "O":
        for where, item in np.ndenumerate(arr):
            check_scalar(f"{name}{list(where)}", item, dtype)
        return arr.astype(np.float64)
    _refuse_bool_items(name, value, "a real number")
    if kind == "b":
        raise TypeError(f"{name} has dtype bool; expected real numbers (bools are refused)")
    if kind not in "iuf":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected real numbers (float32/float64)")
    return arr


def _as_array(name: str, value) -> np.ndarray:
    """``np.asarray(value)``, with a message naming ``name`` and where it is ragged."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{name} is not a rectangular array of numbers: {_ragged(name, value) or exc}"
        ) from None


def _ragged(name: str, value) -> str | None:
    """Where nested sequences disagree in length, e.g. ``"x[0] has 2 entries, x[1] has 1"``."""
    if not isinstance(value, (list, tuple)):
        return None
    sizes = [len(x) if isinstance(x, (list, tuple, np.ndarray)) else None for x in value]
    for k, size in enumerate(sizes):
        if size != sizes[0]:
            say = [
                "is a number" if s is None else f"has {s} entr{'y' if s == 1 else 'ies'}"
                for s in (sizes[0], size)
            ]
            return f"{name}[0] {say[0]}, {name}[{k}] {say[1]}"
    return next((r for k, x in enumerate(value) if (r := _ragged(f"{name}[{k}]", x))), None)


def _refuse_bool_items(name: str, value, expected: str) -> None:
    """A TypeError naming the first bool among the items of a (nested) list or tuple, which
    numpy would silently turn into 0 or 1 beside numbers. O(items), for lists only: a numpy
    array says what it holds in its dtype."""
    if not isinstance(value, (list, tuple)) or _SUSPECTS.isdisjoint(map(type, value)):
        return  # the common case, a flat list of numbers, in C: 0.1 µs for 16 items
    for k, item in enumerate(value):
        if type(item) in _BOOLS:
            raise TypeError(f"{name}[{k}]={item!r} is a bool; expected {expected}")
        if isinstance(item, np.ndarray) and item.dtype == np.bool_:
            raise TypeError(f"{name}[{k}] is a bool array; expected {expected}s")
        if isinstance(item, (list, tuple)):
            _refuse_bool_items(f"{name}[{k}]", item, expected)


_BOOLS = frozenset((bool, np.bool_))
_SUSPECTS = _BOOLS | {list, tuple, np.ndarray}  # a bool, or items that may hold one


def _short(value) -> str:
    """``repr(value)``, shortened past 60 characters (a 400-digit int stays readable)."""
    text = repr(value)
    if len(text) <= 60:
        return text
    return f"{text[:24]}...{text[-12:]} ({len(text)} characters)"
