"""``load_npz`` against crafted archives: every file either loads as Q, K, V or is refused
with a WorkloadError naming the file (and the member), and no file makes it decompress or
allocate more than ``max_bytes``. Archives are built here byte by byte with zipfile/struct."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynattn.npz import MAX_MEMBERS, UPLOADED, WorkloadError, load_npz

DEFLATED, STORED = zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype.hasobject)  # an object array is a pickle
    return buf.getvalue()


def npy_header(shape, descr="<f8", fortran=False) -> bytes:
    """A version 1.0 .npy header declaring ``shape`` of ``descr``, without data."""
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def archive(members, compression=DEFLATED) -> bytes:
    """A zip of ``(name, bytes)`` pairs, in order (a name may repeat)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of a repeated name
        with zipfile.ZipFile(buf, "w", compression) as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def qkv_members(n=4, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"{k}.npy", npy(rng.standard_normal((n, d)))) for k in "QKV"]


def patch_headers(data: bytes, name: str, **fields) -> bytes:
    """``data`` with fields of member ``name`` overwritten in its local header and its central
    directory entry: ``flags``, ``method`` (2 bytes each) or ``size`` (declared uncompressed
    size, 4 bytes)."""
    local = {"flags": (6, "<H"), "method": (8, "<H"), "size": (22, "<I")}
    central = {"flags": (8, "<H"), "method": (10, "<H"), "size": (24, "<I")}
    out = bytearray(data)
    encoded = name.encode()
    for sig, name_at, layout in ((b"PK\x03\x04", 30, local), (b"PK\x01\x02", 46, central)):
        pos = out.find(sig)
        while pos >= 0:
            if out[pos + name_at : pos + name_at + len(encoded)] == encoded:
                for field, value in fields.items():
                    at, fmt = layout[field]
                    struct.pack_into(fmt, out, pos + at, value)
                break
            pos = out.find(sig, pos + 1)
        else:
            raise AssertionError(f"member {name} not found")
    return bytes(out)


def member_data_offset(data: bytes, name: str) -> int:
    """Where the (compressed) data of member ``name`` starts."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo(name)
    start = info.header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, start + 26)
    return start + 30 + name_len + extra_len


def refused(data, match, **kwargs):
    with pytest.raises(WorkloadError, match=match) as info:
        load_npz(data, **kwargs)
    assert str(info.value).startswith(UPLOADED + ":")
    return str(info.value)


# ------------------------------------------------------------------ item 4: aliasing, members


def test_a_bare_member_beside_the_checked_one_is_refused():
    # numpy reads a member named 'Q' before 'Q.npy': the size check looked at Q.npy while a
    # 1 MB file decompressed gigabytes from Q. Here: 8 MB of zeros behind a 1 MB limit.
    bomb = npy(np.zeros((1000, 1000)))
    data = archive([*qkv_members(), ("Q", bomb)])
    assert len(data) < 100_000
    refused(data, r"unexpected member 'Q' beside 'Q.npy'", max_bytes=1_000_000)


@pytest.mark.parametrize("extra", ["K", "notes.txt", "folder/", "V.npy.bak"])
def test_members_that_are_not_npy_arrays_are_refused(extra):
    data = archive([*qkv_members(), (extra, b"x")])
    refused(data, f"unexpected member '{extra}'")


def test_a_member_listed_twice_is_refused():
    data = archive([*qkv_members(), ("K.npy", npy(np.ones((4, 3))))])
    refused(data, "member 'K.npy' is listed twice")


def test_extra_npy_arrays_are_ignored_and_never_decompressed():
    bomb = npy(np.zeros((2000, 1000)))  # 16 MB, beyond max_bytes: never read
    data = archive([*qkv_members(), ("notes.npy", bomb)])
    Q, _K, _V = load_npz(data, max_bytes=1_000_000)
    assert Q.shape == (4, 3)


def test_too_many_members_are_refused_before_zipfile_lists_them():
    data = archive([*qkv_members(), *((f"x{i}.npy", b"") for i in range(MAX_MEMBERS))])
    refused(data, f"more than {MAX_MEMBERS} members")


@pytest.mark.parametrize("compression", [STORED, DEFLATED])
def test_a_header_declaring_a_huge_shape_is_refused_before_allocating(compression):
    # (10**6, 10**6) float64 is 8 TB: refused from the header alone (was a MemoryError)
    data = archive([("Q.npy", npy_header((10**6, 10**6)) + bytes(64)), *qkv_members()[1:]])
    tracemalloc.start()
    try:
        message = refused(
            data, r"array 'Q' \(member 'Q.npy'\): Q, K and V too large", max_bytes=10**6
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "8000000000000 bytes" in message
    assert peak < 2 * 10**6


def test_the_budget_counts_q_k_and_v_together():
    members = [(f"{k}.npy", npy(np.zeros((100, 100)))) for k in "QKV"]  # 80 kB each
    data = archive(members)
    assert load_npz(data, max_bytes=250_000)[2].shape == (100, 100)
    refused(data, r"array 'V' .*Q, K and V too large .*80000 bytes", max_bytes=200_000)


def test_more_data_than_the_header_declares_is_refused():
    # numpy would read the declared 96 bytes and never look at the 16 MB behind them
    data = archive(
        [("Q.npy", npy(np.ones((4, 3))) + bytes(16 * 2**20)), *qkv_members()[1:]], DEFLATED
    )
    assert len(data) < 100_000
    refused(data, r"array 'Q' \(member 'Q.npy'\) holds more data than its header declares")


def test_less_data_than_the_header_declares_is_refused():
    data = archive([("Q.npy", npy(np.ones((4, 3)))[:-8]), *qkv_members()[1:]])
    refused(data, r"array 'Q' \(member 'Q.npy'\) is truncated: 88 of the 96 bytes")


@pytest.mark.parametrize("declared", [10, 2**32 - 2])
def test_declared_sizes_are_not_trusted(declared):
    # a size that lies low truncates the member (its CRC then fails), one that lies high is
    # never the limit: bytes are counted as they come out of the decompressor
    data = archive(qkv_members())
    lied = patch_headers(data, "K.npy", size=declared)
    try:
        _Q, K, _V = load_npz(lied, max_bytes=10_000)
    except WorkloadError as exc:
        assert "array 'K' (member 'K.npy')" in str(exc)
    else:
        np.testing.assert_array_equal(K, load_npz(data)[1])


# ------------------------------------------------------------------ item 7: raw exceptions


def test_corrupt_deflate_stream():
    members = [(f"{k}.npy", npy(np.arange(400.0).reshape(20, 20))) for k in "QKV"]
    data = bytearray(archive(members, DEFLATED))
    at = member_data_offset(bytes(data), "K.npy")
    data[at : at + 8] = b"\xff" * 8  # was zlib.error
    refused(bytes(data), r"array 'K' \(member 'K.npy'\) cannot be read \((error|BadZipFile)")


def test_encrypted_member():
    data = patch_headers(archive(qkv_members()), "V.npy", flags=1)  # was RuntimeError
    refused(data, r"array 'V' \(member 'V.npy'\) is encrypted")


@pytest.mark.parametrize("method", [12, 14, 99])  # bzip2, lzma, unknown
def test_compression_other_than_stored_or_deflated(method):
    data = patch_headers(archive(qkv_members()), "Q.npy", method=method)  # NotImplementedError
    refused(data, rf"array 'Q' \(member 'Q.npy'\) uses compression method {method}")


def test_npy_with_a_zip_appended():
    data = npy(np.ones((4, 3))) + archive(qkv_members())  # was a TypeError
    refused(data, r"not an .npz file \(a single .npy array")


def test_zip_with_other_data_in_front():
    refused(b"MZ" + archive(qkv_members()), r"not an .npz file \(not a zip archive")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (npy(np.array([[object()]], dtype=object)), "need pickle"),
        (npy_header((2, 2), "|O"), "need pickle"),
        (npy(np.ones((2, 2), dtype=bool)), "dtype bool"),
        (npy(np.ones((2, 2), dtype=complex)), "dtype complex128"),
        (npy(np.zeros((2, 2), dtype=[("a", "<f8")])), "dtype"),
        (npy(np.zeros((2, 2), dtype="(2,)f8")), "must be 2-D|dtype"),
        (npy_header((2, 2), "<U3") + bytes(48), "dtype <U3"),
        (npy_header("(2, -3)") + bytes(16), "unreadable .npy header|must have n >= 1"),
        (npy_header("{'nested': 1}"), "unreadable .npy header"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'\n", "unreadable .npy header"),  # TokenError
        (b"\x93NUMPY\x01\x00\x10\x00" + b"(" * 14 + b"\n", "unreadable .npy header"),
        (b"\x93NUMPY\x03\x00" + bytes(12), "version"),
    ],
)
def test_dtypes_and_headers_other_than_real_2d_arrays(content, match):
    data = archive([("Q.npy", content), *qkv_members()[1:]])
    refused(data, rf"array 'Q' \(member 'Q.npy'\).*({match})")


@pytest.mark.parametrize(
    "convert",
    [
        np.asfortranarray,
        lambda a: a.astype(">f8"),
        lambda a: a.astype(np.float16),
        lambda a: (a * 100).astype(">i4"),
        lambda a: a.astype(np.float32)[:, ::-1],
    ],
)
def test_real_dtypes_byte_orders_and_fortran_order_load_exactly(convert):
    rng = np.random.default_rng(1)
    arrays = [convert(rng.standard_normal((5, 3))) for _ in "QKV"]
    data = archive([(f"{k}.npy", npy(a)) for k, a in zip("QKV", arrays, strict=True)])
    for got, want in zip(load_npz(data), arrays, strict=True):
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, want.astype(got.dtype))


# ------------------------------------------------------------------ any damage: WorkloadError


def _damaged(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = where % (len(out) + 1)
        if kind == "flip" and out:
            out[min(at, len(out) - 1)] ^= value or 1
        elif kind == "cut":
            del out[at:]
        elif kind == "field":  # a size, offset or count field set to an extreme
            out[at : at + 4] = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f")[
                value % 3
            ]
        else:
            out[at:at] = bytes([value])
    return bytes(out)


VALID = {
    compression: archive(qkv_members(n=6, d=4), compression) for compression in (STORED, DEFLATED)
}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([STORED, DEFLATED]),
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert", "field"]),
            st.integers(0, 2**16),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_a_damaged_archive_loads_or_raises_workload_error_only(compression, edits):
    data = _damaged(VALID[compression], edits)
    try:
        Q, K, V = load_npz(data, max_bytes=10_000)
    except WorkloadError as exc:
        assert str(exc).startswith(UPLOADED + ": ")
    else:
        assert Q.shape == K.shape == V.shape and Q.ndim == 2
        assert all(np.isfinite(m).all() for m in (Q, K, V))
