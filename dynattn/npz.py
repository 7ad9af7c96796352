"""Reading a user's ``.npz`` file of ``Q``, ``K`` and ``V`` safely, whoever crafted it.

The archive is parsed with :mod:`zipfile` and each array's ``.npy`` header with
:mod:`numpy.lib.format`, never with ``np.load``: numpy reads a member named ``Q`` when it stands
beside ``Q.npy`` and trusts the sizes a zip declares, so a size check made on one member could
be bypassed by another. Here exactly the member that is checked is read; every byte is counted
as it is decompressed; an array's size follows from its header and is checked against the
budget before anything is allocated; and every failure, whatever raised it inside zipfile,
zlib or numpy, becomes a :class:`WorkloadError` naming the file and the member.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

import numpy as np
import numpy.lib.format as npy_format

from ._validate import check_int, resolve_dtype

__all__ = ["MAX_MEMBERS", "MAX_NPZ_BYTES", "UPLOADED", "WorkloadError", "load_npz"]

#: Default cap on the size of a loaded ``.npz`` file, and on its decompressed arrays.
MAX_NPZ_BYTES = 256 * 2**20
#: Most members an archive may list: zipfile builds an object per member (~0.5 kB) before
#: anything can be checked, so a file of empty members would cost 5x its size (measured:
#: 25 MB for 50,000 members in 4.7 MB) before its first check.
MAX_MEMBERS = 1024
#: Name used in messages for data that did not come from a named file.
UPLOADED = "<uploaded file>"

_ZIP_START = b"PK\x03\x04"  # a local file header: how every archive np.savez writes begins
_CENTRAL_ENTRY = b"PK\x01\x02"  # starts each member's entry in the central directory
_CHUNK = 2**20  # bytes decompressed per read: the most a member costs beyond its array
_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}
# What zipfile, zlib and numpy's header parser raise on crafted or damaged data (a corrupt
# deflate stream is zlib.error, an encrypted member RuntimeError, an unknown compression
# NotImplementedError, a bad CRC BadZipFile, a bad header ValueError or SyntaxError).
_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    SyntaxError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
    KeyError,
)


class WorkloadError(ValueError):
    """A workload file or argument that cannot be used; the message names the file and array."""


def load_npz(path_or_file, *, max_bytes: int = MAX_NPZ_BYTES, dtype=None):
    """Read ``(Q, K, V)`` from an ``.npz`` archive, safely.

    No pickle is ever loaded, so a file cannot run code, and no file can make the loader use
    much more memory than ``max_bytes`` beyond the arrays it returns: every problem raises
    :class:`WorkloadError` naming the file and, where it applies, the member.

    Parameters
    ----------
    path_or_file : str, os.PathLike, bytes or binary file-like
        A path, the raw bytes of an upload (called ``"<uploaded file>"`` in messages) or an open
        binary file (named after its ``name`` attribute if it has one).
    max_bytes : int
        Largest accepted file size, also applied to the decompressed size of Q, K and V together
        (counted as they are decompressed, whatever the archive declares).
    dtype : None, float32 or float64
        Working dtype of the result; ``None`` keeps float32 when all three arrays are float32
        and otherwise uses float64.

    Returns
    -------
    Q, K, V : ndarray, each (n, d), C-contiguous, finite, in the resolved dtype

    Raises
    ------
    WorkloadError
        Missing file; not a zip archive (a single ``.npy``, or a zip appended to other data);
        too large (file, arrays or more than :data:`MAX_MEMBERS` members); a member that is
        not ``NAME.npy`` (a bare ``Q`` beside ``Q.npy``, a directory, another file), or a name
        listed twice; missing ``Q.npy``/``K.npy``/``V.npy``; a member encrypted, compressed
        other than stored or deflated, corrupt, truncated or longer than its header says; a
        dtype other than integers and floats (objects, which need pickle, strings, complex,
        bool, records); non-finite values (also after the cast to ``dtype``); an array that
        is not 2-D; mismatched shapes; or ``n < 1``/``d < 1``.

    Notes
    -----
    Cost O(file size + n·d) time, memory the file plus the arrays (plus 1 MiB).
    """
    max_bytes = check_int("max_bytes", max_bytes)
    name, data = _read_limited(path_or_file, max_bytes)
    raw, used = {}, 0
    with _open_archive(name, data) as archive:
        for key in ("Q", "K", "V"):
            raw[key] = _read_member(name, archive, key, max_bytes - used)
            used += raw[key].nbytes
    shapes = {key: arr.shape for key, arr in raw.items()}
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise WorkloadError(f"{name}: Q, K and V must all have the same shape (n, d); got {listed}")
    dt = resolve_dtype(dtype, *raw.values())
    return tuple(_finite_copy(name, key, arr, dt) for key, arr in raw.items())


def _finite_copy(name: str, key: str, arr: np.ndarray, dt: np.dtype) -> np.ndarray:
    """``arr`` as a C-contiguous array of ``dt``, refused if an entry is (or becomes) not
    finite."""
    with np.errstate(over="ignore"):  # overflow in the cast is reported just below
        cast = np.ascontiguousarray(arr, dtype=dt)
    if not np.isfinite(cast).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(cast))[0])
        raise WorkloadError(
            f"{name}: array {key!r} must be finite; {key}{list(where)} = {arr[where]!r} (in {dt})"
        )
    return cast


def _read_limited(source, max_bytes: int) -> tuple[str, bytes]:
    """(name for messages, content) of a path, bytes or binary file-like, size-checked
    before more than ``max_bytes + 1`` bytes are read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_size(UPLOADED, memoryview(source).nbytes, max_bytes)
        return UPLOADED, bytes(source)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise WorkloadError(f"{name}: no such file")
        try:
            with open(name, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise WorkloadError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    elif hasattr(source, "read"):
        name = str(getattr(source, "name", UPLOADED))
        data = source.read(max_bytes + 1)  # reads at most one byte past the limit
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{name}: the file object must be opened in binary mode")
    else:
        raise TypeError(f"path_or_file={source!r} must be a path, bytes or a binary file object")
    _check_size(name, len(data), max_bytes)
    return name, bytes(data)


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise WorkloadError(f"{name}: file too large ({size} bytes > max_bytes={max_bytes})")


def _open_archive(name: str, data: bytes) -> zipfile.ZipFile:
    """The zip archive in ``data``, its member list checked (see :func:`load_npz`)."""
    if not data.startswith(_ZIP_START):
        what = "a single .npy array" if data.startswith(b"\x93NUMPY") else "not a zip archive"
        raise WorkloadError(
            f"{name}: not an .npz file ({what}; expected a zip archive of .npy arrays "
            "Q, K and V, as np.savez writes)"
        )
    # zipfile checks the signature of each entry it lists, so this bounds what it builds
    if data.count(_CENTRAL_ENTRY) > MAX_MEMBERS:
        raise WorkloadError(f"{name}: more than {MAX_MEMBERS} members; refused")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except _READ_ERRORS as exc:
        raise WorkloadError(
            f"{name}: not a readable .npz (zip) archive ({_describe(exc)})"
        ) from None
    try:
        _check_members(name, archive.namelist())
    except WorkloadError:
        archive.close()
        raise
    return archive


def _check_members(name: str, members: list[str]) -> None:
    """Refuse a name listed twice and any member but ``NAME.npy`` (a bare ``Q`` beside
    ``Q.npy`` is what numpy would read instead of the checked member)."""
    seen = set()
    for member in members:
        if member in seen:
            raise WorkloadError(f"{name}: member {member!r} is listed twice (ambiguous); refused")
        seen.add(member)
    for member in members:
        if not member.endswith(".npy"):
            beside = f" beside '{member}.npy'" if f"{member}.npy" in seen else ""
            raise WorkloadError(
                f"{name}: unexpected member {member!r}{beside}; an .npz holds only NAME.npy "
                "arrays (refused: which one is read would be ambiguous)"
            )


def _read_member(name: str, archive: zipfile.ZipFile, key: str, budget: int) -> np.ndarray:
    """Array ``key`` (member ``key.npy``), at most ``budget`` bytes, checked before it is
    allocated and counted while it is decompressed."""
    member = f"{key}.npy"
    try:
        info = archive.getinfo(member)
    except KeyError:
        found = ", ".join(repr(m[:-4]) for m in archive.namelist()) or "none"
        raise WorkloadError(
            f"{name}: missing array {key!r} (need 'Q', 'K' and 'V'; found {found})"
        ) from None
    where = f"{name}: array {key!r} (member {member!r})"
    if info.flag_bits & 0x1:
        raise WorkloadError(f"{where} is encrypted; refused")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise WorkloadError(
            f"{where} uses compression method {info.compress_type}; only stored (0) and "
            "deflated (8), as numpy writes, are read"
        )
    try:
        with archive.open(info) as stream:
            return _read_npy(where, stream, budget)
    except WorkloadError:
        raise
    except _READ_ERRORS as exc:
        raise WorkloadError(f"{where} cannot be read ({_describe(exc)})") from None
    except MemoryError:
        raise WorkloadError(f"{where}: not enough memory to read it") from None


def _read_npy(where: str, stream, budget: int) -> np.ndarray:
    """One ``.npy`` from a stream: header checked, then exactly the bytes it declares."""
    magic = stream.read(6)
    if magic != b"\x93NUMPY":
        raise WorkloadError(f"{where} is not stored in .npy format")
    version = tuple(stream.read(2))
    if version not in _HEADER_READERS:
        raise WorkloadError(f"{where}: .npy format version {version} is not supported")
    try:
        shape, fortran, dt = _HEADER_READERS[version](stream)
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise  # the zip around it is damaged: reported as such by the caller
    except Exception as exc:  # numpy parses the header text with tokenize and literal_eval,
        # which raise TokenError, SyntaxError, ValueError, RecursionError... on hostile text
        raise WorkloadError(f"{where} has an unreadable .npy header ({_describe(exc)})") from None
    if dt.hasobject:
        raise WorkloadError(f"{where} holds Python objects, which need pickle; refused")
    if dt.kind not in "iuf" or dt.itemsize == 0:
        raise WorkloadError(f"{where} has dtype {dt}; expected real numbers (integer or float)")
    if len(shape) != 2:
        raise WorkloadError(f"{where} must be 2-D (n, d); got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise WorkloadError(f"{where} must have n >= 1 rows and d >= 1 columns; got shape {shape}")
    size = shape[0] * shape[1] * dt.itemsize
    if size > budget:
        raise WorkloadError(
            f"{where}: Q, K and V too large when decompressed (its header declares shape "
            f"{shape} of {dt}, {size} bytes; {max(budget, 0)} bytes of max_bytes remain)"
        )
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        chunk = stream.read(min(_CHUNK, size - done))
        if not chunk:
            raise WorkloadError(
                f"{where} is truncated: {done} of the {size} bytes its header declares"
            )
        view[done : done + len(chunk)] = chunk
        done += len(chunk)
    if stream.read(1):  # also makes zipfile check the member's CRC
        raise WorkloadError(f"{where} holds more data than its header declares ({size} bytes)")
    arr = np.frombuffer(buf, dtype=dt)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
