"""Tests of dynattn.simulation: ticks, cost accounting, timeline, rebuilds and policies."""

import io
import sys

import numpy as np
import pytest

from dynattn.policies import CostModel, ErrorBudget, Fixed, OriginalAdaptive
from dynattn.reference import dense_attention
from dynattn.simulation import (
    TIME_COLUMNS,
    TIMELINE_COLUMNS,
    Simulation,
    SimulationConfig,
    Timeline,
)
from dynattn.workloads import PRESETS, STREAMS, WorkloadError, make_qkv

SMALL = {"n": 24, "d": 4, "updates_per_tick": 5, "queries_per_tick": 3}


def record(tick, **values):
    """A full tick record with every column set (value = tick unless given)."""
    return {c: values.get(c, tick) for c in TIMELINE_COLUMNS}


def assert_same_timeline(a, b, skip=TIME_COLUMNS):
    da, db = a.timeline.as_dict(), b.timeline.as_dict()
    for c in TIMELINE_COLUMNS:
        if c not in skip:
            np.testing.assert_array_equal(da[c], db[c], err_msg=c)


# ------------------------------------------------------------------------------------------
# Timeline


def test_timeline_ring_keeps_the_latest_records_oldest_first():
    tl = Timeline(capacity=1000)
    buffers = [id(tl._data[c]) for c in tl.columns]
    for t in range(100_000):
        tl.append(record(t))
    assert len(tl) == 1000 and tl.capacity == 1000
    assert [id(tl._data[c]) for c in tl.columns] == buffers  # preallocated, never regrown
    data = tl.as_dict()
    np.testing.assert_array_equal(data["tick"], np.arange(99_000, 100_000))
    assert data["tick"].dtype == np.int64 and data["rel_error"].dtype == np.float64
    np.testing.assert_array_equal(tl.tail(3)["flush_rows"], [99_997, 99_998, 99_999])
    assert len(tl.tail(5000)["tick"]) == 1000 and len(tl.tail(0)["tick"]) == 0
    data["tick"][0] = -1  # a copy: the timeline is unchanged
    assert tl.as_dict()["tick"][0] == 99_000


def test_timeline_partial_fill_resize_and_errors():
    tl = Timeline(capacity=4)
    assert len(tl) == 0 and tl.as_dict()["tick"].shape == (0,)
    for t in range(6):
        tl.append(record(t))
    tl.resize(10)
    np.testing.assert_array_equal(tl.as_dict()["tick"], [2, 3, 4, 5])
    tl.append(record(6))
    tl.resize(2)
    np.testing.assert_array_equal(tl.as_dict()["tick"], [5, 6])
    with pytest.raises(KeyError, match="rel_error"):
        tl.append({c: 0 for c in TIMELINE_COLUMNS if c != "rel_error"})
    with pytest.raises(ValueError, match="capacity=0"):
        Timeline(0)
    with pytest.raises(ValueError, match="k=-1"):
        tl.tail(-1)


def test_timeline_csv_round_trip(tmp_path):
    tl = Timeline(capacity=8)
    rng = np.random.default_rng(0)
    for t in range(11):
        tl.append(
            record(
                t,
                threshold=np.inf if t % 2 else 0.1 + t,
                rel_error=float(rng.random() * 1e-13),
                lazy_seconds=1 / 3 * t,
            )
        )
    path = tmp_path / "timeline.csv"
    tl.to_csv(path)
    text = path.read_text().splitlines()
    assert text[0] == ",".join(TIMELINE_COLUMNS) and len(text) == 9
    back = Timeline.read_csv(path)
    assert list(back) == list(TIMELINE_COLUMNS)
    for c, values in tl.as_dict().items():
        np.testing.assert_array_equal(back[c], values, err_msg=c)  # bit-identical
        assert back[c].dtype == values.dtype
    buf = io.StringIO()
    tl.to_csv(buf)
    buf.seek(0)
    np.testing.assert_array_equal(Timeline.read_csv(buf)["threshold"], back["threshold"])


def test_timeline_read_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="empty file"):
        Timeline.read_csv(io.StringIO(""))
    with pytest.raises(ValueError, match="line 3 has 1 fields; the header has 2"):
        Timeline.read_csv(io.StringIO("tick,rel_error\n1,0.5\n2\n"))
    with pytest.raises(ValueError, match="column 'tick' is not int64"):
        Timeline.read_csv(io.StringIO("tick,rel_error\n1.5,0.5\n"))
    empty = Timeline.read_csv(io.StringIO("tick,rel_error\n"))
    assert empty["tick"].shape == (0,) and empty["tick"].dtype == np.int64


def test_timeline_to_dataframe(monkeypatch):
    tl = Timeline(capacity=3)
    for t in range(5):
        tl.append(record(t))
    df = tl.to_dataframe()
    assert list(df.columns) == list(TIMELINE_COLUMNS)
    assert df["tick"].tolist() == [2, 3, 4]
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="to_dataframe needs pandas"):
        tl.to_dataframe()


# ------------------------------------------------------------------------------------------
# Simulation: records, costs, exactness


def test_config_bounds_and_defaults():
    cfg = SimulationConfig()
    assert (cfg.n, cfg.d, cfg.policy, cfg.history) == (256, 32, "cost", 10_000)
    for bad in (
        {"n": 1},
        {"d": 257},
        {"policy": "lazy"},
        {"tolerance": 0.0},
        {"queries_per_tick": -1},
        {"delta_scale": 0.0},
    ):
        with pytest.raises(ValueError):
            SimulationConfig(**bad)


def test_step_record_and_cumulative_costs():
    sim = Simulation(policy="fixed", threshold=7, seed=3, **SMALL)
    records = [sim.step() for _ in range(12)]
    assert list(records[0]) == list(TIMELINE_COLUMNS)
    assert [r["tick"] for r in records] == list(range(12)) and sim.tick == 12
    n, d = 24, 4
    data = sim.timeline.as_dict()
    updates = np.cumsum(data["updates"])
    np.testing.assert_allclose(data["recompute_flops"], 4.0 * n * n * d * updates)
    for c in (
        "lazy_seconds",
        "eager_seconds",
        "ondemand_seconds",
        "lazy_flops",
        "eager_flops",
        "ondemand_flops",
    ):
        assert (np.diff(data[c]) >= 0).all() and data[c][-1] > 0, c
    assert (data["pending"] < 7).all() and (data["threshold"] == 7).all()
    assert data["flushed"].sum() == sim.engine.n_flushes
    np.testing.assert_array_equal(data["flushed"], data["flush_rows"] > 0)
    assert sim.eager.n_flushes == sim.eager.n_updates == updates[-1]  # one flush per action
    assert sim.engine.n_updates == updates[-1]
    # on-demand flops count each distinct queried row once: 4 n d per row
    assert data["ondemand_flops"][-1] <= 4.0 * n * d * 3 * 12


@pytest.mark.parametrize("k_share", [0.0, 0.5, 1.0])
def test_query_flops_matches_the_engines_flush_count(k_share):
    n, d = 64, 5
    sim = Simulation(n=n, d=d, policy="fixed", threshold=1000, updates_per_tick=3, k_share=k_share)
    assert sim.engine.query_flops(7) == 7 * d  # nothing pending: cached rows
    for target in (1, 4, sim.engine.max_query_rows):
        while sim.engine.touched_rows < target:
            sim.step()
        estimate = sim.engine.query_flops(n)
        event = sim.flush_now()
        assert event.repaired == 0
        # a flush does the work of a query on every row, without the final division
        assert estimate - n * d == event.flops
    while sim.engine.touched_rows <= sim.engine.max_query_rows:
        sim.step()
    # beyond the limit query rows are computed afresh: two products of n·d each
    assert sim.engine.query_flops(n) == n * (4 * n * d + d)


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exact_strategies_agree(stream, dtype):
    sim = Simulation(stream=stream, dtype=dtype, policy="cost", seed=1, **SMALL)
    tol = 1e-4 if dtype == "float32" else 1e-12
    for _ in range(15):
        sim.step()
        a = sim.last_answers
        np.testing.assert_allclose(a["eager"], a["lazy"], rtol=tol, atol=tol)
        np.testing.assert_allclose(a["ondemand"], a["lazy"], rtol=tol, atol=tol)
    Q, K, V = sim.qkv
    exact = dense_attention(Q, K, V, sim.engine.scale)
    np.testing.assert_allclose(a["lazy"], exact[a["rows"], a["cols"]], rtol=tol, atol=tol)
    for other in (sim.eager, sim.ondemand):
        np.testing.assert_array_equal(other.K, K)
        np.testing.assert_array_equal(other.V, V)


def test_no_queries_and_unscaled_logits():
    sim = Simulation(queries_per_tick=0, scale="1 (unscaled)", n=8, d=2)
    rec = sim.step()
    assert sim.engine.scale == 1.0 and sim.ondemand.scale == 1.0
    assert sim.last_answers["lazy"].shape == (0,) and rec["ondemand_flops"] == 0


@pytest.mark.parametrize("policy", ["fixed", "adaptive", "error"])
def test_same_config_and_seed_give_the_same_timeline(policy):
    kwargs = dict(
        SMALL,
        policy=policy,
        threshold=4,
        tolerance=1e-4,
        delta_scale=1e-4,
        stream="hotspot",
        seed=5,
    )
    a, b = Simulation(**kwargs), Simulation(**kwargs)
    a.run(30)
    b.run(30)
    assert_same_timeline(a, b)
    np.testing.assert_array_equal(a.engine.K, b.engine.K)
    assert a.timeline.as_dict()["rel_error"].max() > 0  # the runs are not trivially equal
    c = Simulation(**dict(kwargs, seed=6))
    c.run(30)
    assert not np.array_equal(c.timeline.as_dict()["rel_error"], a.timeline.as_dict()["rel_error"])


def test_history_bounds_memory_over_many_ticks():
    sim = Simulation(n=4, d=2, updates_per_tick=1, queries_per_tick=1, history=50)
    sim.run(300)
    data = sim.timeline.as_dict()
    np.testing.assert_array_equal(data["tick"], np.arange(250, 300))
    assert sim.tick == 300 and sim.timeline.capacity == 50
    sim.config.history = 20  # applies at once, keeping the latest
    np.testing.assert_array_equal(sim.timeline.as_dict()["tick"], np.arange(280, 300))


def test_flush_now_is_recorded_in_the_next_tick():
    sim = Simulation(policy="fixed", threshold=1000, **SMALL)
    sim.run(3)
    assert sim.engine.pending == 15
    before = sim.timeline.as_dict()["lazy_seconds"][-1]
    event = sim.flush_now()
    assert event.updates == 15 and sim.engine.pending == 0
    assert sim.flush_now() is None
    rec = sim.step()
    assert rec["flushed"] == 1 and rec["flush_rows"] == event.rows
    assert rec["lazy_seconds"] >= before + event.seconds


def test_run_validates_and_shows_progress(capsys):
    sim = Simulation(**SMALL)
    assert sim.run(0) is None
    with pytest.raises(ValueError, match="ticks=-1"):
        sim.run(-1)
    assert sim.run(2, progress=True)["tick"] == 1
    assert "2/2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Changing the configuration


def test_rebuild_on_n_change():
    sim = Simulation(**SMALL)
    sim.run(4)
    old_engine = sim.engine
    sim.config.n = 32
    assert sim.engine is not old_engine and sim.engine.n == 32 and sim.ondemand.n == 32
    assert sim.tick == 0 and len(sim.timeline) == 0
    rec = sim.step()
    assert rec["tick"] == 0
    assert sim.last_answers["rows"].max() < 32


@pytest.mark.parametrize(
    "change",
    [{"d": 8}, {"preset": "local"}, {"seed": 9}, {"dtype": "float32"}, {"scale": "1 (unscaled)"}],
)
def test_each_rebuild_parameter_rebuilds(change):
    sim = Simulation(**SMALL)
    sim.run(2)
    old = sim.engine
    sim.config.param.update(**change)
    assert sim.engine is not old and sim.tick == 0
    Q, _, _ = sim.qkv
    expected = make_qkv(
        sim.config.preset, sim.config.n, sim.config.d, seed=sim.config.seed, dtype=sim.config.dtype
    )[0]
    np.testing.assert_array_equal(Q, expected)


def test_failed_rebuild_keeps_state_and_reverts_the_parameter():
    sim = Simulation(n=24, d=4, preset="gaussian")
    sim.run(3)
    engine, timeline = sim.engine, sim.timeline
    sim.config.d = 1
    sim.run(1)
    engine, timeline = sim.engine, sim.timeline
    with pytest.raises(ValueError, match="preset 'local' needs d >= 2"):
        sim.config.preset = "local"
    assert sim.config.preset == "gaussian" and sim.config.d == 1
    assert sim.engine is engine and sim.timeline is timeline and sim.tick == 1
    with pytest.raises(ValueError, match=r"load a .npz file first"):
        sim.config.preset = "file"
    assert sim.config.preset == "gaussian"
    sim.step()  # still usable
    assert sim.tick == 2


def test_other_watchers_see_the_revert():
    sim = Simulation(n=24, d=1)
    seen = []
    sim.config.param.watch(lambda e: seen.append(e.new), ["preset"])
    with pytest.raises(ValueError):
        sim.config.preset = "local"
    # this simulation's watcher raised before the later one saw "local"; the revert reaches
    # every watcher, so a dashboard widget snaps back to the kept value
    assert seen[-1] == "gaussian" == sim.config.preset


def test_load_npz_rebuilds_on_the_file_and_keeps_state_on_failure(tmp_path):
    Q, K, V = make_qkv("clustered", 16, 3, seed=2)
    good = tmp_path / "good.npz"
    np.savez(good, Q=Q, K=K, V=V)
    sim = Simulation(**SMALL)
    sim.run(2)
    engine = sim.engine
    with pytest.raises(WorkloadError, match="missing array 'V'"):
        bad = io.BytesIO()
        np.savez(bad, Q=Q, K=K)
        sim.load_npz(bad.getvalue())
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, Q=Q[:1], K=K[:1], V=V[:1])
    with pytest.raises(WorkloadError, match="n=1; the simulation needs 2 <= n <= 8192"):
        sim.load_npz(tiny)
    assert sim.engine is engine and sim.config.preset == "gaussian" and sim.tick == 2

    sim.load_npz(good.read_bytes())
    assert (sim.config.preset, sim.config.n, sim.config.d) == ("file", 16, 3)
    np.testing.assert_array_equal(sim.qkv[1], K)
    sim.run(2)
    with pytest.raises(ValueError, match="preset 'file' fixes n and d"):
        sim.config.n = 20
    assert sim.config.n == 16 and sim.tick == 2
    sim.config.dtype = "float32"  # a file can change precision
    assert sim.engine.dtype == np.float32 and sim.tick == 0
    sim.reset()
    np.testing.assert_array_equal(sim.qkv[0], Q.astype(np.float32))
    sim.config.preset = "uniform"
    sim.config.preset = "file"  # the loaded arrays are kept
    np.testing.assert_array_equal(sim.qkv[2], V.astype(np.float32))


def test_failed_load_with_file_rebuild_error_reverts(tmp_path):
    Q, K, V = make_qkv("gaussian", 16, 3)
    K[0, 0] = 1e10  # fine in float64, beyond float32's limit for keys (logits past 2e6)
    path = tmp_path / "big.npz"
    np.savez(path, Q=Q, K=K, V=V)
    sim = Simulation(**SMALL)
    sim.load_npz(path)
    with pytest.raises(ValueError, match="limit"):
        sim.config.dtype = "float32"
    assert sim.config.dtype == "float64" and sim.engine.dtype == np.float64


def test_policy_changes_apply_from_the_next_tick():
    sim = Simulation(policy="cost", **SMALL)
    assert isinstance(sim.engine.policy, CostModel)
    sim.run(2)
    sim.config.param.update(policy="fixed", threshold=3)
    assert isinstance(sim.engine.policy, Fixed) and sim.engine.policy.k == 3
    assert sim.tick == 2  # no rebuild
    assert sim.step()["threshold"] == 3
    sim.config.threshold = 6
    assert sim.engine.policy.k == 6
    sim.config.policy = "adaptive"
    assert isinstance(sim.engine.policy, OriginalAdaptive)
    adaptive = sim.engine.policy
    sim.config.threshold = 9  # irrelevant to the active policy: kept as it is
    assert sim.engine.policy is adaptive
    sim.config.param.update(policy="error", tolerance=1e-2)
    assert isinstance(sim.engine.policy, ErrorBudget) and sim.engine.policy.tolerance == 1e-2
    sim.config.tolerance = 1e-5
    assert sim.engine.policy.tolerance == 1e-5


def test_rate_and_stream_changes_apply_from_the_next_tick():
    sim = Simulation(**SMALL)
    sim.run(2)
    sim.config.param.update(updates_per_tick=3, queries_per_tick=7, stream="rows", k_share=1.0)
    assert sim.tick == 2
    K, V = sim.ondemand.K.copy(), sim.ondemand.V.copy()
    rec = sim.step()
    assert rec["updates"] == 3 and sim.last_answers["rows"].shape == (7,)
    changed = (sim.ondemand.K != K).any(axis=1)
    assert changed.sum() == 3 and (sim.ondemand.K != K)[changed].all()  # 3 whole K rows
    np.testing.assert_array_equal(sim.ondemand.V, V)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stream", STREAMS)
def test_error_budget_keeps_the_true_error_within_tolerance(preset, stream):
    # n <= the policy's sample (64 rows): its estimate is the true error, so after every tick
    # the stale caches are within safety * tolerance (0.5 * tolerance) of the exact output.
    tolerance = 1e-3
    sim = Simulation(
        n=32,
        d=4,
        preset=preset,
        stream=stream,
        policy="error",
        tolerance=tolerance,
        delta_scale=1e-3,
        updates_per_tick=4,
        queries_per_tick=1,
        seed=2,
    )
    sim.run(40)
    data = sim.timeline.as_dict()
    assert data["rel_error"].max() <= 0.5 * tolerance
    if stream != "rows":  # small entry updates: the budget is used, not just flushed at once
        assert data["pending"].max() > 4


def test_lazy_beats_eager_and_recompute_at_scale():
    sim = Simulation(
        n=4096,
        d=64,
        preset="gaussian",
        stream="entries",
        policy="cost",
        updates_per_tick=16,
        queries_per_tick=16,
        seed=0,
    )
    rec = sim.run(100)
    assert rec["lazy_seconds"] < rec["eager_seconds"]
    assert rec["lazy_seconds"] * 20 < rec["recompute_seconds"]
    assert rec["lazy_flops"] * 100 < rec["recompute_flops"]


def test_a_timeline_is_bounded_before_it_allocates():
    # history sized from a huge tick count reserved ~150 GB (issue 18, item 8)
    from dynattn.timeline import MAX_CAPACITY

    with pytest.raises(ValueError, match="more than a timeline holds"):
        Timeline(MAX_CAPACITY + 1)
    with pytest.raises(ValueError, match="history"):
        SimulationConfig(history=10**9)
    assert Timeline(MAX_CAPACITY).capacity == MAX_CAPACITY
