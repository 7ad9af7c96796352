"""Tests of dynattn.workloads: presets, safe .npz loading, update streams."""

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn.workloads import (
    PRESETS,
    STREAMS,
    UPLOADED,
    TickUpdates,
    UpdateStream,
    WorkloadError,
    load_npz,
    make_qkv,
)


def softmax_rows(Q, K):
    """Attention weights at the default scale 1/sqrt(d), computed densely (test oracle)."""
    logits = (Q @ K.T) / np.sqrt(Q.shape[1])
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_preset_shapes_dtypes_finite(preset, dtype):
    Q, K, V = make_qkv(preset, 37, 6, seed=5, dtype=dtype)
    for m in (Q, K, V):
        assert m.shape == (37, 6)
        assert m.dtype == dtype
        assert m.flags.c_contiguous
        assert np.isfinite(m).all()


@settings(max_examples=30, deadline=None)
@given(
    preset=st.sampled_from(PRESETS),
    n=st.integers(1, 40),
    d=st.integers(2, 12),
    seed=st.integers(0, 2**32),
)
def test_presets_reproducible_from_seed(preset, n, d, seed):
    a = make_qkv(preset, n, d, seed=seed)
    b = make_qkv(preset, n, d, seed=seed)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = make_qkv(preset, n, d, seed=seed + 1)
    assert not np.array_equal(a[2], c[2])  # V is random for every preset


def test_uniform_is_unit_interval_and_gaussian_is_standard():
    Q, K, V = make_qkv("uniform", 200, 16, seed=0)
    assert min(Q.min(), K.min(), V.min()) >= 0.0 and max(Q.max(), K.max(), V.max()) < 1.0
    Q, _, _ = make_qkv("gaussian", 400, 16, seed=0)
    assert abs(Q.mean()) < 0.05 and abs(Q.std() - 1.0) < 0.05


@pytest.mark.parametrize(("n", "d", "max_offset"), [(128, 32, 2), (128, 8, 6), (512, 64, 8)])
def test_local_attention_is_a_diagonal_band(n, d, max_offset):
    Q, K, _ = make_qkv("local", n, d, seed=2)
    w = softmax_rows(Q, K)
    i = np.arange(n)
    assert np.abs(w.argmax(axis=1) - i).max() <= max_offset
    near = np.abs(i[:, None] - i[None, :]) <= n // 16
    assert (w * near).sum(axis=1).min() > 0.8  # most of every row's weight is near the diagonal


def test_local_needs_two_columns():
    with pytest.raises(ValueError, match=r"local.*d >= 2.*d=1"):
        make_qkv("local", 10, 1)


def test_clustered_attention_is_block_diagonal():
    n, d = 128, 32
    Q, K, _ = make_qkv("clustered", n, d, seed=4)
    w = softmax_rows(Q, K)
    labels = (np.arange(n) * 8) // n
    same = labels[:, None] == labels[None, :]
    assert (w * same).sum(axis=1).min() > 0.95


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preset": "nope"}, ValueError, "preset='nope'"),
        ({"n": 0}, ValueError, "n=0"),
        ({"d": 2.5}, TypeError, "d=2.5"),
        ({"seed": -1}, ValueError, "seed=-1"),
        ({"dtype": np.int32}, TypeError, "dtype=int32"),
    ],
)
def test_make_qkv_rejects_bad_arguments(kwargs, error, match):
    args = {"preset": "gaussian", "n": 4, "d": 3} | kwargs
    with pytest.raises(error, match=match):
        make_qkv(args.pop("preset"), args.pop("n"), args.pop("d"), **args)


# ------------------------------------------------------------------------------------------
# load_npz


def good_qkv(n=5, d=3):
    return make_qkv("gaussian", n, d, seed=0)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_npz_round_trip_from_path_bytes_and_file(tmp_path):
    Q, K, V = good_qkv()
    path = write_npz(tmp_path / "w.npz", Q=Q, K=K, V=V)
    with open(path, "rb") as file:
        for source in (path, str(path), path.read_bytes(), file):
            got = load_npz(source)
            for x, y in zip(got, (Q, K, V), strict=True):
                np.testing.assert_array_equal(x, y)
                assert x.dtype == np.float64 and x.flags.c_contiguous


def test_load_npz_dtypes(tmp_path):
    Q, K, V = (m.astype(np.float32) for m in good_qkv())
    path = write_npz(tmp_path / "f32.npz", Q=Q, K=K, V=V)
    assert all(m.dtype == np.float32 for m in load_npz(path))
    assert all(m.dtype == np.float64 for m in load_npz(path, dtype=np.float64))
    ints = np.arange(6).reshape(2, 3)
    path = write_npz(tmp_path / "int.npz", Q=ints, K=ints, V=ints.astype(np.uint8))
    got = load_npz(path)
    assert all(m.dtype == np.float64 for m in got)
    np.testing.assert_array_equal(got[2], ints)


def test_load_npz_compressed_and_extra_arrays_ignored(tmp_path):
    Q, K, V = good_qkv()
    path = tmp_path / "c.npz"
    np.savez_compressed(path, Q=Q, K=K, V=V, notes=np.array(["ignored"]))
    np.testing.assert_array_equal(load_npz(path)[1], K)


def test_load_npz_missing_file(tmp_path):
    missing = tmp_path / "absent.npz"
    with pytest.raises(WorkloadError, match=f"{missing}: no such file"):
        load_npz(missing)


def test_load_npz_not_a_zip(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("Q,K,V\n1,2,3\n")
    with pytest.raises(WorkloadError, match=f"{text}: not an .npz file"):
        load_npz(text)
    npy = tmp_path / "single.npy"
    np.save(npy, good_qkv()[0])
    with pytest.raises(WorkloadError, match=r"not an .npz file"):
        load_npz(npy)
    with pytest.raises(WorkloadError, match=f"{UPLOADED}: not an .npz file"):
        load_npz(b"")


def test_load_npz_too_large(tmp_path):
    Q, K, V = good_qkv()
    path = write_npz(tmp_path / "w.npz", Q=Q, K=K, V=V)
    size = path.stat().st_size
    with pytest.raises(WorkloadError, match=rf"w.npz: file too large \({size} bytes"):
        load_npz(path, max_bytes=size - 1)
    with pytest.raises(WorkloadError, match=f"{UPLOADED}: file too large"):
        load_npz(path.read_bytes(), max_bytes=100)
    with open(path, "rb") as f, pytest.raises(WorkloadError, match=r"w.npz: file too large"):
        load_npz(f, max_bytes=100)


def test_load_npz_refuses_a_compressed_bomb(tmp_path):
    big = np.zeros((1000, 100))  # 800 kB of zeros compress to about 1 kB
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, Q=big, K=big, V=big)
    assert path.stat().st_size < 100_000
    with pytest.raises(WorkloadError, match=r"bomb.npz: .*Q, K and V too large when decompressed"):
        load_npz(path, max_bytes=100_000)


@pytest.mark.parametrize("missing", ["Q", "K", "V"])
def test_load_npz_missing_array(tmp_path, missing):
    arrays = dict(zip("QKV", good_qkv(), strict=True))
    del arrays[missing]
    arrays[missing.lower()] = np.ones((5, 3))  # names are case-sensitive
    path = write_npz(tmp_path / "m.npz", **arrays)
    with pytest.raises(WorkloadError, match=f"m.npz: missing array '{missing}'.*found"):
        load_npz(path)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[object(), 1]], dtype=object),
        np.array([["a", "b"]]),
        np.ones((2, 2), dtype=complex),
        np.ones((2, 2), dtype=bool),
    ],
)
def test_load_npz_non_numeric_dtype(tmp_path, bad):
    Q, _K, V = good_qkv()
    path = write_npz(tmp_path / "t.npz", Q=Q, K=bad, V=V)  # savez pickles object arrays
    with pytest.raises(WorkloadError, match=r"t.npz: array 'K'"):
        load_npz(path)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_load_npz_non_finite(tmp_path, value):
    Q, K, V = good_qkv()
    V[2, 1] = value
    path = write_npz(tmp_path / "nf.npz", Q=Q, K=K, V=V)
    with pytest.raises(WorkloadError, match=r"nf.npz: array 'V' must be finite; V\[2, 1\]"):
        load_npz(path)


def test_load_npz_overflow_in_requested_dtype(tmp_path):
    Q, K, V = good_qkv()
    Q[0, 0] = 1e300
    path = write_npz(tmp_path / "o.npz", Q=Q, K=K, V=V)
    assert load_npz(path)[0][0, 0] == 1e300
    with pytest.raises(WorkloadError, match=r"array 'Q' must be finite.*float32"):
        load_npz(path, dtype=np.float32)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 1), ()])
def test_load_npz_not_2d(tmp_path, shape):
    Q, K, _V = good_qkv()
    path = write_npz(tmp_path / "s.npz", Q=Q, K=K, V=np.zeros(shape))
    with pytest.raises(WorkloadError, match=r"s.npz: array 'V' \(member 'V.npy'\) must be 2-D"):
        load_npz(path)


@pytest.mark.parametrize("shape", [(0, 3), (5, 0)])
def test_load_npz_empty(tmp_path, shape):
    path = write_npz(tmp_path / "e.npz", Q=np.zeros(shape), K=np.zeros(shape), V=np.zeros(shape))
    with pytest.raises(WorkloadError, match=r"e.npz: array 'Q' .*must have n >= 1 rows"):
        load_npz(path)


@pytest.mark.parametrize("k_shape", [(4, 3), (5, 4)])
def test_load_npz_mismatched_shapes(tmp_path, k_shape):
    Q, _, V = good_qkv(5, 3)
    path = write_npz(tmp_path / "x.npz", Q=Q, K=np.zeros(k_shape), V=V)
    with pytest.raises(WorkloadError, match=r"x.npz: Q, K and V must all have the same shape"):
        load_npz(path)


def test_load_npz_corrupt_members():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("Q.npy", b"\x93NUMPY garbage")
        z.writestr("K.npy", b"plain text")
        z.writestr("V.npy", b"")
    data = buf.getvalue()
    with pytest.raises(WorkloadError, match=f"{UPLOADED}: array 'Q' \\(member 'Q.npy'\\)"):
        load_npz(data)


def test_load_npz_member_without_npy_header():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("Q.npy", b"plain text")
        for key in "KV":
            arr = io.BytesIO()
            np.save(arr, np.ones((2, 2)))
            z.writestr(f"{key}.npy", arr.getvalue())
    with pytest.raises(WorkloadError, match=r"array 'Q' \(member 'Q.npy'\) is not stored in .npy"):
        load_npz(buf.getvalue())


def test_load_npz_named_file_object(tmp_path):
    path = write_npz(tmp_path / "named.npz", Q=np.zeros(3), K=np.zeros(3), V=np.zeros(3))
    with open(path, "rb") as f, pytest.raises(WorkloadError, match=r"named.npz: array 'Q'"):
        load_npz(f)
    with pytest.raises(WorkloadError, match=f"{UPLOADED}: array 'Q'"):
        load_npz(io.BytesIO(path.read_bytes()))


def test_load_npz_rejects_text_file_object_and_other_types(tmp_path):
    with pytest.raises(TypeError, match="binary mode"):
        load_npz(io.StringIO("abc"))
    with pytest.raises(TypeError, match="path_or_file=42"):
        load_npz(42)
    with pytest.raises(ValueError, match="max_bytes=0"):
        load_npz(b"", max_bytes=0)


# ------------------------------------------------------------------------------------------
# Update streams


class RecordingEngine:
    """Records the batch calls TickUpdates.apply makes (stand-in for LazyAttention)."""

    def __init__(self):
        self.calls = []

    def _record(self, name):
        def method(rows, *rest):
            assert np.size(rows) > 0, f"{name} called with an empty batch"
            self.calls.append((name, rows, *rest))
            return f"event-{len(self.calls)}" if name == "update_v_many" else None

        return method

    def __getattr__(self, name):
        return self._record(name)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(STREAMS),
    n=st.integers(1, 50),
    d=st.integers(1, 8),
    per_tick=st.integers(0, 40),
    k_share=st.floats(0, 1),
    seed=st.integers(0, 1000),
    tick=st.integers(0, 10_000),
)
def test_stream_indices_in_bounds_and_reproducible(kind, n, d, per_tick, k_share, seed, tick):
    stream = UpdateStream(kind, n, d, updates_per_tick=per_tick, k_share=k_share, seed=seed)
    upd = stream.next_tick(tick)
    for rows in (upd.k_rows, upd.v_rows, upd.k_set_rows, upd.v_set_rows):
        assert rows.dtype == np.int64 and ((rows >= 0) & (rows < n)).all()
    for cols in (upd.k_cols, upd.v_cols):
        assert cols.dtype == np.int64 and ((cols >= 0) & (cols < d)).all()
    assert upd.k_rows.shape == upd.k_cols.shape == upd.k_deltas.shape
    assert upd.v_rows.shape == upd.v_cols.shape == upd.v_deltas.shape
    for rows, values in ((upd.k_set_rows, upd.k_set_values), (upd.v_set_rows, upd.v_set_values)):
        if rows.size:
            assert values.shape == (rows.size, d)
        assert np.unique(rows).size == rows.size
    if kind not in ("bursts", "rows"):
        assert upd.n_updates == per_tick
    again = UpdateStream(kind, n, d, updates_per_tick=per_tick, k_share=k_share, seed=seed)
    twin = again.next_tick(tick)
    for name in ("k_rows", "k_cols", "k_deltas", "v_rows", "v_set_rows", "k_set_values"):
        np.testing.assert_array_equal(getattr(upd, name), getattr(twin, name))
    q_rows, q_cols = stream.queries(tick, 7)
    assert ((q_rows >= 0) & (q_rows < n)).all() and ((q_cols >= 0) & (q_cols < d)).all()
    np.testing.assert_array_equal(q_rows, again.queries(tick, 7)[0])


def test_stream_ticks_are_independent_of_call_order_and_queries():
    a = UpdateStream("entries", 100, 4, seed=9)
    b = UpdateStream("entries", 100, 4, seed=9)
    a.queries(3, 100)
    first = [a.next_tick(t).k_deltas for t in range(5)]
    second = [b.next_tick(t).k_deltas for t in reversed(range(5))][::-1]
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.next_tick(0).k_rows, a.next_tick(1).k_rows)
    assert not np.array_equal(
        a.next_tick(0).k_rows, UpdateStream("entries", 100, 4, seed=10).next_tick(0).k_rows
    )


@pytest.mark.parametrize("kind", ["entries", "rows", "hotspot", "bursts"])
@pytest.mark.parametrize("k_share", [0.0, 0.3, 1.0])
def test_stream_k_share(kind, k_share):
    stream = UpdateStream(kind, 500, 4, updates_per_tick=20, k_share=k_share, seed=1)
    ticks = [stream.next_tick(t) for t in range(300)]
    on_k = sum(u.k_rows.size + u.k_set_rows.size for u in ticks)
    total = sum(u.n_updates for u in ticks)
    assert total > 0
    assert abs(on_k / total - k_share) < 0.03


def test_entries_deltas_scale():
    stream = UpdateStream("entries", 50, 4, updates_per_tick=100, delta_scale=0.5, seed=0)
    deltas = np.concatenate(
        [np.r_[u.k_deltas, u.v_deltas] for u in map(stream.next_tick, range(100))]
    )
    assert abs(deltas.std() - 0.5) < 0.02 and abs(deltas.mean()) < 0.02


def test_rows_stream_rewrites_rows_with_row_scale():
    stream = UpdateStream("rows", 30, 5, updates_per_tick=8, row_scale=2.0, seed=0)
    upd = stream.next_tick(4)
    assert upd.n_updates == 8 and upd.k_rows.size == upd.v_rows.size == 0
    values = np.concatenate([stream.next_tick(t).v_set_values for t in range(200)])
    assert abs(values.std() - 2.0) < 0.05
    # more rewrites than rows: capped at n distinct rows per matrix
    capped = UpdateStream("rows", 3, 2, updates_per_tick=50, k_share=1.0).next_tick(0)
    np.testing.assert_array_equal(capped.k_set_rows, [0, 1, 2])


def test_hotspot_concentrates_in_a_drifting_band():
    n = 2000
    stream = UpdateStream("hotspot", n, 4, updates_per_tick=64, drift=0.5, seed=3)
    assert stream.band_width == 20
    inside = total = 0
    for t in range(0, 400):
        upd = stream.next_tick(t)
        rows = np.r_[upd.k_rows, upd.v_rows]
        offset = (rows - stream.band_start(t)) % n
        inside += int((offset < stream.band_width).sum())
        total += rows.size
    assert inside / total >= 0.97
    assert stream.band_start(0) != stream.band_start(399)  # the band moves
    assert stream.band_start(2 * n * 2) == stream.band_start(0)  # and wraps around


def test_bursts_mean_rate_and_variation():
    stream = UpdateStream(
        "bursts",
        100,
        4,
        updates_per_tick=16,
        burst_period=64,
        burst_duty=0.125,
        burst_contrast=16.0,
        seed=2,
    )
    counts = np.array([stream.next_tick(t).n_updates for t in range(64 * 40)])
    assert abs(counts.mean() - 16) < 0.5
    per_phase = counts.reshape(40, 64).mean(axis=0)
    assert per_phase[:8].mean() > 8 * per_phase[8:].mean()  # bursts, then quiet
    assert stream.rate(0) == pytest.approx(16 * stream.rate(63))


def test_tick_updates_apply_uses_batch_methods_and_skips_empty():
    engine = RecordingEngine()
    upd = UpdateStream("entries", 10, 3, updates_per_tick=6, k_share=0.5, seed=0).next_tick(0)
    events = upd.apply(engine)
    assert [c[0] for c in engine.calls] == ["update_k_many", "update_v_many"]
    np.testing.assert_array_equal(engine.calls[0][3], upd.k_deltas)
    assert events == ["event-2"]
    engine = RecordingEngine()
    TickUpdates(v_set_rows=np.array([1]), v_set_values=np.ones((1, 3))).apply(engine)
    assert [c[0] for c in engine.calls] == ["set_v_rows"]
    engine = RecordingEngine()
    assert TickUpdates().apply(engine) == [] and engine.calls == []
    assert TickUpdates().n_updates == 0


def test_tick_updates_apply_each_makes_one_call_per_action():
    engine = RecordingEngine()
    upd = TickUpdates(
        k_rows=np.array([0, 2]),
        k_cols=np.array([1, 1]),
        k_deltas=np.array([0.5, -0.5]),
        v_set_rows=np.array([3, 1]),
        v_set_values=np.arange(6.0).reshape(2, 3),
    )
    upd.apply_each(engine)
    assert [(c[0], c[1]) for c in engine.calls] == [
        ("update_k", 0),
        ("update_k", 2),
        ("set_v_row", 3),
        ("set_v_row", 1),
    ]
    np.testing.assert_array_equal(engine.calls[3][2], [3.0, 4.0, 5.0])


@pytest.mark.parametrize("kind", STREAMS)
def test_apply_and_apply_each_reach_the_same_state(kind):
    from dynattn.engine import LazyAttention

    Q, K, V = make_qkv("gaussian", 12, 3, seed=0)
    batched = LazyAttention(Q, K, V, policy=1000)
    eager = LazyAttention(Q, K, V, policy=1)
    stream = UpdateStream(kind, 12, 3, updates_per_tick=6, seed=4)
    for t in range(5):
        upd = stream.next_tick(t)
        upd.apply(batched)
        upd.apply_each(eager)
    np.testing.assert_allclose(batched.K, eager.K, rtol=0, atol=1e-15)
    np.testing.assert_allclose(batched.V, eager.V, rtol=0, atol=1e-15)
    assert eager.n_flushes == eager.n_updates == batched.n_updates


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "walk"}, ValueError, "kind='walk'"),
        ({"n": 0}, ValueError, "n=0"),
        ({"d": "4"}, TypeError, "d='4'"),
        ({"updates_per_tick": -1}, ValueError, "updates_per_tick=-1"),
        ({"k_share": 1.5}, ValueError, "k_share=1.5"),
        ({"k_share": float("nan")}, ValueError, "k_share=nan"),
        ({"delta_scale": 0}, ValueError, "delta_scale=0"),
        ({"seed": -3}, ValueError, "seed=-3"),
        ({"row_scale": -1}, ValueError, "row_scale=-1"),
        ({"band_fraction": 0}, ValueError, "band_fraction=0"),
        ({"band_share": 2}, ValueError, "band_share=2"),
        ({"drift": float("inf")}, ValueError, "drift=inf"),
        ({"burst_period": 0}, ValueError, "burst_period=0"),
        ({"burst_duty": 1}, ValueError, "burst_duty=1"),
        ({"burst_contrast": 0.5}, ValueError, "burst_contrast=0.5"),
        ({"k_share": True}, TypeError, "k_share=True"),
    ],
)
def test_stream_rejects_bad_arguments(kwargs, error, match):
    args = {"kind": "entries", "n": 10, "d": 3} | kwargs
    with pytest.raises(error, match=match):
        UpdateStream(args.pop("kind"), args.pop("n"), args.pop("d"), **args)


def test_stream_rejects_bad_tick_and_count():
    stream = UpdateStream("entries", 10, 3)
    with pytest.raises(ValueError, match="tick=-1"):
        stream.next_tick(-1)
    with pytest.raises(TypeError, match=r"tick=1.5"):
        stream.queries(1.5, 3)
    with pytest.raises(ValueError, match="count=-2"):
        stream.queries(0, -2)
