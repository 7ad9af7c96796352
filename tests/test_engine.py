"""The engine against a dense float64 oracle, over random sequences and hard cases."""

from __future__ import annotations

import contextlib
import math
import statistics
import tracemalloc
from collections import deque

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from oracle import Oracle, assert_close_natural

from dynattn import (
    CostModel,
    ErrorBudget,
    Fixed,
    LazyAttention,
    OnDemand,
    OriginalAdaptive,
    dense_attention,
)
from dynattn.engine.kernels import PLAIN_LOGITS
from dynattn.engine.planner import QueryPlanner

POLICIES = {
    "fixed": lambda draw: Fixed(draw(st.integers(1, 12))),
    "never": lambda draw: Fixed(10**9),
    "adaptive": lambda draw: OriginalAdaptive(initial=draw(st.integers(1, 8))),
    "cost": lambda draw: CostModel(initial=draw(st.integers(1, 8)), window=16),
    "error": lambda draw: ErrorBudget(draw(st.sampled_from([1e-3, 1e-2, 0.2]))),
    "unbounded": lambda draw: Unbounded(),
}


class Unbounded:
    """Never flush, asked after every update."""

    def threshold(self, engine) -> float:
        return math.inf


@st.composite
def scenarios(draw, hard=False, crowded=False, rectangular=False):
    # crowded: few rows, so updates of every kind keep meeting in the same rows and the
    # queue's paths (logged, written, packed) meet too; rectangular: m query rows, n keys
    n = draw(st.integers(1, 3 if crowded else 12))
    m = draw(st.integers(1, 12)) if rectangular else n
    d = draw(st.integers(1, 3 if crowded else 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shapes = ((m, d), (n, d), (n, d))
    if hard:
        Q, K, V = (rng.normal(0, 10, shape) for shape in shapes)
    else:
        Q, K, V = (rng.random(shape) * 2 - 1 for shape in shapes)
    scale = draw(st.sampled_from([None, 1.0, 0.3]))
    policy = POLICIES[draw(st.sampled_from(sorted(POLICIES)))](draw)
    delta = st.floats(-50, 50) if hard else st.floats(-1, 1)
    i, j = st.integers(0, n - 1), st.integers(0, d - 1)
    qi = st.integers(0, m - 1)  # a query row
    row = st.lists(st.floats(-30, 30) if hard else st.floats(-2, 2), min_size=d, max_size=d)
    op = st.one_of(
        st.tuples(st.just("update_k"), i, j, delta),
        st.tuples(st.just("update_v"), i, j, delta),
        st.tuples(st.just("many_k"), st.lists(st.tuples(i, j, delta), min_size=1, max_size=6)),
        st.tuples(st.just("many_v"), st.lists(st.tuples(i, j, delta), min_size=1, max_size=6)),
        # a run of single entry updates long enough to be queued in vectorised passes
        st.tuples(
            st.just("burst"),
            st.lists(st.tuples(st.booleans(), i, j, delta), min_size=1, max_size=40),
        ),
        st.tuples(st.just("copy")),
        st.tuples(st.just("set_k"), i, row),
        st.tuples(st.just("set_v"), i, row),
        st.tuples(st.just("query"), qi, j),
        st.tuples(st.just("query_row"), qi),
        st.tuples(st.just("query_many"), st.lists(st.tuples(qi, j), min_size=1, max_size=6)),
        st.tuples(st.just("weight"), qi, i),
        st.tuples(st.just("flush")),
        st.tuples(st.just("check_all")),
    )
    ops = draw(st.lists(op, min_size=1, max_size=25))
    # how the entry log is queued: one by one or vectorised, settled often or rarely
    log = (
        draw(st.sampled_from([0, 1] if crowded else [0, 3, 16])),
        draw(st.sampled_from([1, 5, 4096])),
    )
    # what packing costs (cheap enough, at these sizes, for queries to correct rows)
    pack_cost = draw(st.sampled_from([QueryPlanner.pack_cost, (1, 1)]))
    return Q, K, V, scale, policy, ops, (*log, pack_cost)


@contextlib.contextmanager
def correcting_queries(eng):
    """Queries correct the cached rows instead of computing them afresh: at test sizes
    (n·d < 64) the engine would compute almost every query afresh, as it should there."""
    saved = eng._planner.max_rows
    eng._prefers_fresh = lambda: False
    eng._planner.max_rows = 10**9
    try:
        yield
    finally:
        del eng._prefers_fresh
        eng._planner.max_rows = saved


def run_against_oracle(scenario, tol, dtype=np.float64):
    Q, K, V, scale, policy, ops, (short_log, max_log, pack_cost) = scenario
    eng = LazyAttention(Q, K, V, scale=scale, dtype=dtype, policy=policy)
    eng._queue.short_log, eng._queue.max_log = short_log, max_log
    eng._planner.pack_cost = pack_cost
    orc = Oracle(eng)
    updates = 0
    for op in ops:
        kind = op[0]
        if kind in ("update_k", "update_v"):
            _, i, j, delta = op
            getattr(eng, kind)(i, j, delta)
            (orc.K if kind == "update_k" else orc.V)[i, j] += dtype(delta)
            updates += 1
        elif kind == "burst":
            for on_k, i, j, delta in op[1]:
                (eng.update_k if on_k else eng.update_v)(i, j, delta)
                (orc.K if on_k else orc.V)[i, j] += dtype(delta)
                orc.sync_flush()  # the policy may flush inside the burst
            updates += len(op[1])
        elif kind == "copy":  # the twin carries on, in the same state
            eng = eng.copy(policy=eng.policy)
            eng._queue.short_log, eng._queue.max_log = short_log, max_log
            eng._planner.pack_cost = pack_cost
            orc.engine = eng
        elif kind in ("many_k", "many_v"):
            items = op[1]
            target = orc.K if kind == "many_k" else orc.V
            if len(items) % 2:  # both batch forms
                (eng.update_k_many if kind == "many_k" else eng.update_v_many)(items)
            else:
                r, c, dl = (np.array(x) for x in zip(*items, strict=True))
                (eng.update_k_many if kind == "many_k" else eng.update_v_many)(r, c, dl)
            for i, j, delta in items:
                target[i, j] += dtype(delta)
            updates += len(items)
        elif kind in ("set_k", "set_v"):
            _, i, row = op
            (eng.set_k_row if kind == "set_k" else eng.set_v_row)(i, row)
            (orc.K if kind == "set_k" else orc.V)[i] = np.asarray(row, dtype=dtype)
            updates += 1
        elif kind == "flush":
            eng.flush()
        orc.sync_flush()
        # K and V are always current
        np.testing.assert_array_equal(eng.K, orc.K)
        np.testing.assert_array_equal(eng.V, orc.V)
        exact, nat = orc.output(), orc.natural_scale()
        if kind == "query":
            _, i, j = op
            for stale in (False, True):
                o = orc.output(stale)
                s = orc.natural_scale(stale)
                assert_close_natural(
                    eng.query(i, j, stale=stale), o[i, j], s[i, j], tol, f"query stale={stale}"
                )
            with correcting_queries(eng):
                assert_close_natural(eng.query(i, j), exact[i, j], nat[i, j], tol, "query")
        elif kind == "query_row":
            i = op[1]
            assert_close_natural(eng.query_row(i), exact[i], nat[i], tol, "query_row")
            with correcting_queries(eng):
                assert_close_natural(eng.query_row(i), exact[i], nat[i], tol, "query_row")
            assert_close_natural(
                eng.query_row(i, stale=True),
                orc.output(True)[i],
                orc.natural_scale(True)[i],
                tol,
                "stale query_row",
            )
        elif kind == "query_many":
            r, c = (np.array(x) for x in zip(*op[1], strict=True))
            assert_close_natural(eng.query_many(r, c), exact[r, c], nat[r, c], tol, "many")
            with correcting_queries(eng):
                assert_close_natural(eng.query_many(r, c), exact[r, c], nat[r, c], tol, "many")
        elif kind == "weight":
            _, i, j = op
            for stale in (False, True):
                w = orc.weights(stale)[i, j]
                assert abs(eng.weight(i, j, stale=stale) - w) <= tol * max(w, 1e-300) + 1e-300
        elif kind == "check_all":
            assert_close_natural(eng.output(), exact, nat, tol, "output")
            with correcting_queries(eng):
                assert_close_natural(eng.output(), exact, nat, tol, "output")
            assert_close_natural(
                eng.output(stale=True),
                orc.output(True),
                orc.natural_scale(True),
                tol,
                "stale output",
            )
            np.testing.assert_allclose(eng.weights(), orc.weights(), rtol=tol, atol=1e-300)
            np.testing.assert_allclose(
                eng.weights(stale=True), orc.weights(True), rtol=tol, atol=1e-300
            )
            report = eng.approximation_error()
            diff = orc.output(True) - exact
            if np.any(exact):  # each scaled first: squares near 1e±200 under- or overflow
                a, b = np.abs(diff).max(), np.abs(exact).max()
                with np.errstate(over="ignore"):
                    want = (
                        0.0
                        if a == 0
                        else float(a / b * (np.linalg.norm(diff / a) / np.linalg.norm(exact / b)))
                    )
            else:  # relative to an all-zero output, any stale difference is infinite
                want = math.inf if np.any(diff) else 0.0
            # exact and stale are both rounded in the engine's dtype: compare at tol
            assert report.relative == pytest.approx(want, rel=1e-6, abs=tol)
            assert report.max_abs == pytest.approx(
                np.abs(diff).max(), rel=1e-6, abs=tol * np.abs(exact).max()
            )
    assert eng.n_updates == updates
    event(f"ended with {eng.touched_rows} rows touched")
    # what is pending is exactly what happened since the last flush
    assert eng.pending <= updates
    if eng.pending == 0:
        assert eng.touched_rows == 0 and not eng.touched_k and not eng.touched_v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_sequences_match_dense_oracle(scenario):
    run_against_oracle(scenario, tol=1e-12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(rectangular=True))
def test_rectangular_sequences_match_dense_oracle(scenario):
    run_against_oracle(scenario, tol=1e-12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(crowded=True))
def test_crowded_sequences_match_dense_oracle(scenario):
    run_against_oracle(scenario, tol=1e-12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(hard=True))
def test_hard_data_matches_dense_oracle(scenario):
    run_against_oracle(scenario, tol=1e-10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_float32_matches_dense_oracle(scenario):
    run_against_oracle(scenario, tol=1e-4, dtype=np.float32)


def make(n=40, d=6, seed=0, **kw):
    rng = np.random.default_rng(seed)
    Q, K, V = (rng.random((n, d)) for _ in range(3))
    return LazyAttention(Q, K, V, **kw)


def test_touched_rows_and_pending_are_inspectable():
    eng = make(policy=100)
    eng.update_k(3, 1, 0.5)
    eng.update_k(3, 2, 0.5)
    eng.update_v_many([4, 4, 9], [0, 1, 2], [1.0, 2.0, 3.0])
    eng.set_k_row(9, np.ones(6))
    assert eng.pending == 6
    assert eng.touched_k == {3, 9} and eng.touched_v == {4, 9}
    assert eng.touched_rows == 3
    event = eng.flush()
    assert (event.updates, event.rows, event.k_rows, event.v_rows) == (6, 3, 2, 2)
    assert event.kind == "incremental" and event.flops > 0 and event.seconds >= 0
    assert eng.pending == 0 and eng.touched_rows == 0 and eng.flush() is None


def test_threshold_triggers_flush_and_reports_event():
    eng = make(policy=Fixed(3))
    assert eng.update_k(0, 0, 0.1) is None
    assert eng.update_k(1, 0, 0.1) is None
    event = eng.update_v(2, 0, 0.1)
    assert event is not None and event.updates == 3 and eng.last_flush is event
    assert eng.n_flushes == 1 and eng.pending == 0


def test_flush_chooses_rebuild_when_most_rows_are_touched():
    eng = make(n=8, d=2, policy=10**6)
    for i in range(8):
        eng.update_k(i, 0, 0.1)
    assert eng.flush().kind == "rebuild"


def test_flush_prices_the_packed_entries():
    # n = 64, d = 2: correcting a row costs 2P(3d+2) = 16P flops, recomputing it 6nd = 768,
    # so a flush corrects up to P = 48 entries: 40 value-only rows (one entry each), but not
    # 30 rows whose keys changed (two each), though both exceed max_correction_rows = 23
    n, d = 64, 2
    for target, rows, kind, entries in (("v", 40, "incremental", 40), ("k", 30, "rebuild", 0)):
        eng = make(n=n, d=d, seed=9, policy=10**6)
        assert eng.max_correction_rows == 23
        for i in range(rows):
            getattr(eng, f"update_{target}")(i, 1, 0.3)
        want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
        event = eng.flush()
        assert event.kind == kind
        if kind == "incremental":
            assert event.flops == 2.0 * n * entries * (3 * d + 2) + 6.0 * event.repaired * n * d
        np.testing.assert_allclose(eng.output(stale=True), want, rtol=1e-12, atol=1e-12)


def test_single_queries_catch_up_once_a_burst_of_them_has_paid_for_it():
    # n·d = 4,096: catching up on 40 rows (150,000 + 40·10,000 elements) costs ~140 fresh
    # queries' worth beyond a corrected one, so the first queries after the updates compute
    # afresh, and once they have paid that much the pack catches up and later ones correct
    n, d = 512, 8
    eng = make(n=n, d=d, seed=5, policy=10**6)
    for i in range(40):
        eng.update_k(i, 1, 0.2)
    want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
    caught_up_at = None
    for q in range(400):
        assert eng.query(q % n, q % d) == pytest.approx(want[q % n, q % d], rel=1e-12)
        if caught_up_at is None and eng._pack.slots == 40:
            caught_up_at = q
    rent = n * d - 2 * (3 * d + 2) * 40  # what a fresh query costs beyond a corrected one
    fixed, per_row = eng._planner.pack_cost
    assert caught_up_at == -(-(fixed + per_row * 40 - rent) // rent)
    # one query after every update never pays for the catch-up
    eng.flush()
    for i in range(40):
        eng.update_v(i, 2, 0.1)
        eng.query(i, 2)
    assert eng._pack.slots == 0


def test_the_snapshot_holds_what_the_caches_describe_and_updates_copy_nothing():
    # an update writes and logs (its row queued later, without a copy): the old values are in the
    # snapshot, which changes only at a flush (to the flushed rows' values)
    n, d = 64, 8
    eng = make(n=n, d=d, seed=2, policy=Unbounded())
    K_built, V_built = np.array(eng.K), np.array(eng.V)
    nbytes = eng.nbytes
    for u in range(300):
        eng.set_k_row(u % n, np.full(d, u / 10))
        eng.update_v(u % 7, 1, 0.1)
        eng.update_k_many([u % 5], [2], [0.2])
    assert eng.nbytes == nbytes and eng.touched_rows == n
    np.testing.assert_array_equal(eng._queue.K_flushed, K_built)
    np.testing.assert_array_equal(eng._queue.V_flushed, V_built)
    assert eng.flush().rows == n
    np.testing.assert_array_equal(eng._queue.K_flushed, eng.K)
    np.testing.assert_array_equal(eng._queue.V_flushed, eng.V)
    assert not np.shares_memory(eng._queue.K_flushed, eng.K) and not np.shares_memory(
        eng._queue.V_flushed, eng.V
    )


def freeze_timings(eng, ratio: float) -> None:
    """Fresh queries timed at 10 µs and catch-ups at ``ratio`` times a fresh query's element,
    frozen (the engine's own timings are ignored)."""
    eng._planner.fresh_log = _Timings([1e-5] * 3)
    eng._planner.catch_log = _Timings([ratio * 1e-5 / (eng.n * eng.d)])
    eng._planner.measure_catch_ratio()


class Recording(Unbounded):
    """Unbounded, noting the update count at each consultation."""

    def __init__(self):
        self.asked = []

    def threshold(self, engine) -> float:
        self.asked.append(engine.n_updates)
        return math.inf


def test_never_flushing_the_policy_is_asked_at_every_update_whatever_the_updates():
    eng = make(n=64, d=8, seed=7, policy=Recording())
    row = np.ones(8)
    for u in range(20):  # entries (logged) and rows (written) in every order
        [eng.update_k, eng.update_v][u % 2](u % 64, u % 8, 0.1)
        if u % 3 == 0:
            [eng.set_k_row, eng.set_v_row][u % 2](u % 64, row)
    eng.update_v_many([1, 2], [0, 0], [0.5, 0.5])
    assert eng.policy.asked == [*list(range(1, eng.n_updates + 1))[:-2], eng.n_updates]
    assert eng.pending == eng.n_updates == 29


class _Timings(deque):
    """A timing log frozen at given values (the engine's appends are ignored)."""

    def append(self, value):
        pass


@pytest.mark.parametrize("ratio", [0.001, 1.0, 2.5])
def test_single_queries_weigh_the_catch_up_by_measured_costs(ratio):
    # once a fresh query and a catch-up have been timed, the catch-up's estimate is scaled by
    # their measured ratio (seconds per catch-up unit over seconds per element read afresh)
    n, d = 512, 8
    eng = make(n=n, d=d, seed=5, policy=10**6)
    for i in range(40):
        eng.update_k(i, 1, 0.2)
    want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
    fresh_s = 1e-5
    eng._planner.fresh_log = _Timings([fresh_s] * 3)
    eng._planner.catch_log = _Timings([ratio * fresh_s / (n * d)])
    eng._planner.measure_catch_ratio()
    caught_up_at = None
    for q in range(2000):
        assert eng.query(q % n, q % d) == pytest.approx(want[q % n, q % d], rel=1e-12)
        if eng._pack.slots == 40:
            caught_up_at = q
            break
    correct = 2 * (3 * d + 2) * 40
    fixed, per_row = eng._planner.pack_cost
    due = (correct + ratio * (fixed + per_row * 40) - n * d) / (n * d - correct)
    assert caught_up_at == max(0, math.ceil(due))


@pytest.mark.parametrize("ratio", [0.001, 1.0])
def test_a_logged_update_counts_one_row_of_catch_up_before_it_is_queued(ratio):
    # the pack is up to date and an entry of a packed row changes: at n·d = 4,096 a catch-up of
    # even one row (160,000 units at ratio 1) costs more than computing afresh, so the query
    # computes afresh and leaves the log unqueued; when catching up is cheap, it is queued
    n, d = 512, 8
    eng = make(n=n, d=d, seed=5, policy=10**6)
    freeze_timings(eng, 0.001)
    eng.update_k(4, 1, 0.2)
    eng.query(0, 0)
    assert eng._pack.slots == 1 and not eng._log
    eng._planner.catch_log = _Timings([ratio * 1e-5 / (n * d)])
    eng._planner.measure_catch_ratio()
    eng.update_k(4, 2, 0.3)
    want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
    assert eng.query(7, 2) == pytest.approx(want[7, 2], rel=1e-12)
    assert bool(eng._log) == (ratio == 1.0)


# found by a search: the log is settled and the pack caught up (by query_many) after a fresh
# choice; a later, longer log must not reuse that choice
_SETTLED_AFTER_FRESH = (
    "k17.1 Q22.4 q9.2 v19.3 k22.4 v20.4 v5.1 q22.4 q11.3 k23.4 k22.4 k15.3 Q17.1 "
    "q10.3 q9.1 q14.3 q16.2 Q29.1 v5.1 k1.2 k3.1 v12.2 v3.2 v6.2 k2.2 q23.4 k15.4 "
    "q28.2 k9.2 k4.1 k8.5 Q5.3 v26.2 k16.4 q1.5"
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.tuples(st.sampled_from("kkkvvqqqQfr"), st.integers(0, 29), st.integers(0, 5)),
        min_size=20,
        max_size=120,
    ),
    ratio=st.sampled_from([1e-4, 1e-3, 1e-2, 1.0]),
)
@example(
    ops=[
        (w[0], int(w[1:].split(".")[0]), int(w.split(".")[1])) for w in _SETTLED_AFTER_FRESH.split()
    ],
    ratio=1e-2,
)
def test_a_grown_log_repeats_the_fresh_choice_as_the_estimate_would(ops, ratio):
    # the shortcut in _choose_direct against an engine that always runs the estimate, with
    # the same frozen timings (changed by "r"): the same choice at every query (counted by
    # fresh queries and the pack), and both exact
    n, d = 400, 6
    engines = [make(n=n, d=d, seed=9, policy=10**6) for _ in range(2)]
    for eng in engines:
        freeze_timings(eng, ratio)
        eng._planner.n_fresh = 3  # the ratio is next remeasured at the 16th fresh query
    fast, full = engines
    shortcuts = 0
    for op, i, j in ops:
        for eng in engines:
            if op in "kv":
                (eng.update_k if op == "k" else eng.update_v)(i, j, 0.25)
            elif op == "f":
                eng.flush()
            elif op == "r":  # a new measured ratio
                eng._planner.catch_log = _Timings([(1e-4, 1e-3, 1e-2, 1.0)[i % 4] * 1e-5 / (n * d)])
                eng._planner.measure_catch_ratio()
            else:
                if eng is full:
                    eng._planner.fresh_log_len = math.inf
                elif op == "q" and len(eng._log) > eng._planner.fresh_log_len:
                    shortcuts += 1
                value = eng.query(i, j) if op == "q" else eng.query_many([i, j], [j, 0])[0]
                want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)[i, j]
                assert value == pytest.approx(want, rel=1e-12)
        assert (
            fast._planner.n_fresh == full._planner.n_fresh and fast._pack.slots == full._pack.slots
        )
        assert fast._planner.fresh_count == full._planner.fresh_count
    event("shortcut taken" if shortcuts else "shortcut not taken")


def test_the_first_catch_up_waits_for_fresh_queries_to_compare_with():
    # until three fresh queries are timed, a query that would catch up computes afresh
    eng = make(n=40_000, d=8, seed=2, policy=10**6)
    eng.update_v(3, 1, 0.5)
    for q in range(3):  # n·d = 320,000 > the 160,000 estimated for a catch-up: afresh, timed
        eng.query(q, 0)
        assert (
            len(eng._planner.fresh_log) == q + 1
            and eng._pack.slots == 0
            and not eng._planner.catch_log
        )
    eng.query(3, 0)  # then the estimate decides, and the catch-up is timed
    assert (
        eng._pack.slots == 1
        and len(eng._planner.catch_log) == 1
        and len(eng._planner.fresh_log) == 3
    )
    per_element = statistics.median(eng._planner.fresh_log) / (40_000 * 8)
    assert eng._planner.catch_ratio == eng._planner.catch_log[0] / per_element
    # the ratio follows the fresh timings every 16th fresh query (medians cost ~1 µs)
    eng._planner.catch_log = _Timings([2 * eng._planner.catch_log[0]])
    before = eng._planner.catch_ratio
    for k in range(4, 17):
        eng._fresh_entry(0, 0)
        assert (eng._planner.catch_ratio == before) == (k < 16)


def test_the_catch_up_ratio_follows_the_first_three_catch_ups_and_every_16th():
    n, d = 512, 8
    eng = make(n=n, d=d, seed=5, policy=10**6)
    eng._planner.fresh_log = _Timings([1e-5] * 3)
    per_element = 1e-5 / (n * d)
    for k in range(1, 34):
        eng._planner.catch_log = _Timings([k * 1e-9])  # what a measurement after catch-up k sees
        before = eng._planner.catch_ratio
        eng.update_k(k, 1, 0.2)
        eng._drain_log()
        eng._get_pack()  # one catch-up: the new row joins the pack
        measured = eng._planner.catch_ratio == pytest.approx(k * 1e-9 / per_element, rel=1e-12)
        assert measured == (k <= 3 or k % 16 == 0), k
        if not measured:
            assert eng._planner.catch_ratio == before


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_flush_moves_the_precision_guards_by_the_removed_mass(dtype):
    # from exact caches, the guards are -g times the natural mass (s, and per output column
    # the sum of weights times |v|); a flush adds what removals took out, each exponential
    # weighted by w = max(1, (1 + 2·|q|max·|k|) / (1 + PLAIN_LOGITS)): old keys (with their
    # old values), new keys' (w - 1)/2 (an added exponential errs, cancelling nothing) and,
    # for a value change alone, w times |v - v_old|
    n, d = 40, 6
    eng = make(n=n, d=d, seed=3, policy=10**6, dtype=dtype)
    Q, K_then, V_then = (np.array(a, dtype=np.float64) for a in (eng.Q, eng.K, eng.V))
    rng = np.random.default_rng(4)
    eng.set_k_row(3, 4 * rng.random(d))  # a key long enough to weigh more than 1 in float64
    eng.set_k_row(7, rng.random(d))
    eng.set_v_row(7, rng.random(d))
    eng.set_v_row(5, rng.random(d))
    eng.update_v(11, 2, 0.3)
    eng.update_k(13, 0, -0.4)
    event = eng.flush()
    assert event.repaired == 0
    K, V = np.array(eng.K, dtype=np.float64), np.array(eng.V, dtype=np.float64)
    m = np.array(eng._stabiliser, dtype=np.float64)[:, None]
    w_now = np.exp(eng.scale * Q @ K.T - m)
    w_old = np.exp(eng.scale * Q @ K_then.T - m)
    keyed = (K_then != K).any(axis=1)
    valued = (V_then != V).any(axis=1) & ~keyed
    plain = 1 + PLAIN_LOGITS[np.dtype(dtype)]
    qmax = eng.scale * np.linalg.norm(Q, axis=1).max()
    w_then = np.maximum(1, (1 + 2 * qmax * np.linalg.norm(K_then, axis=1)) / plain)
    w_key = np.maximum(1, (1 + 2 * qmax * np.linalg.norm(K, axis=1)) / plain)
    assert (w_key[keyed] > 1).any() == (dtype == np.float64)  # both kinds of weight checked
    gone, come = w_old[:, keyed] * w_then[keyed], w_now[:, keyed] * (w_key[keyed] - 1) / 2
    removed_s = gone.sum(axis=1) + come.sum(axis=1)
    removed_c = gone @ np.abs(V_then[keyed]) + come @ np.abs(V[keyed])
    removed_c += (w_now[:, valued] * w_key[valued]) @ np.abs(V - V_then)[valued]
    g = eng._contrib.growth
    C = np.array(eng._cache, dtype=np.float64)
    tol = dict(rtol=1e-9 if dtype == np.float64 else 2e-4, atol=0)
    np.testing.assert_allclose(C[:, d], w_now.sum(axis=1), **tol)
    np.testing.assert_allclose(C[:, d + 1], removed_s - g * w_now.sum(axis=1), **tol)
    np.testing.assert_allclose(C[:, d + 2 :], removed_c - g * (w_now @ np.abs(V)), **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_the_snapshot_and_packed_rows_start_on_cache_lines(dtype):
    # a row of K straddling one cache line more made a fresh query's pass over K 7-15 % slower
    eng = make(n=33, d=5, seed=1, policy=10**6, dtype=dtype)
    eng.set_k_row(3, np.arange(5.0))
    eng.update_v(4, 1, 0.5)
    eng.query_many([0, 1], [0, 1])  # packs the touched rows
    twin = eng.copy()
    arrays = (
        eng._Q_padded,
        eng._K,
        eng._V,
        eng._queue.K_flushed,
        eng._queue.V_flushed,
        eng._pack.Kp,
        eng._pack.B,
    )
    arrays += (
        twin._K,
        twin._queue.K_flushed,
        twin._queue.V_flushed,
        OnDemand(eng.Q, eng.K, eng.V)._K,
    )
    assert all(a.ctypes.data % 64 == 0 for a in arrays)
    assert all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)


@pytest.mark.parametrize("factor", [1e-200, 1e-150, 1e150, 1e200])
def test_approximation_error_is_scale_free_over_the_whole_float64_range(factor):
    # ‖stale − exact‖ / ‖exact‖ does not change when V is scaled, even where squares of the
    # outputs underflow or overflow (1e-200² and 1e200² are outside float64)
    def report(f):
        eng = make(n=30, d=4, seed=3, policy=10**6)
        eng = LazyAttention(eng.Q, eng.K, np.asarray(eng.V) * f, policy=10**6)
        eng.update_k(2, 1, 0.8)
        eng.update_v(5, 3, 0.4 * f)
        eng.set_v_row(7, np.full(4, -2.0 * f))
        return eng.approximation_error()

    base, scaled = report(1.0), report(factor)
    assert scaled.relative == pytest.approx(base.relative, rel=1e-12)
    assert scaled.max_abs == pytest.approx(base.max_abs * factor, rel=1e-12)
    assert 0 < base.relative < 1


@pytest.mark.parametrize("kind", ["csr", "csc", "coo"])
def test_sparse_inputs(kind):
    rng = np.random.default_rng(1)
    dense = [np.where(rng.random((30, 5)) < 0.3, rng.random((30, 5)), 0.0) for _ in range(3)]
    eng = LazyAttention(
        *(sp.random(30, 5, 0).asformat(kind) + sp.coo_matrix(m).asformat(kind) for m in dense),
        policy=4,
    )
    eng.update_k(2, 3, 0.7)
    eng.update_v(5, 1, -0.2)
    np.testing.assert_allclose(eng.output(), dense_attention(dense[0], eng.K, eng.V), rtol=1e-12)
    np.testing.assert_array_equal(eng.Q, dense[0])


def test_dtype_defaults_and_choices():
    rng = np.random.default_rng(2)
    f32 = [rng.random((5, 3)).astype(np.float32) for _ in range(3)]
    assert LazyAttention(*f32).dtype == np.float32
    assert LazyAttention(*f32, dtype=np.float64).dtype == np.float64
    assert LazyAttention(f32[0], f32[1], f32[2].astype(np.float64)).dtype == np.float64
    ints = [np.arange(15).reshape(5, 3) % 4 for _ in range(3)]
    assert LazyAttention(*ints).dtype == np.float64


@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_large_logits_never_overflow(magnitude):
    rng = np.random.default_rng(3)
    n, d = 16, 1
    Q = rng.choice([-1.0, 1.0], (n, d)) * math.sqrt(magnitude)
    K = rng.choice([-1.0, 1.0], (n, d)) * math.sqrt(magnitude) * rng.random((n, d))
    V = rng.random((n, d))
    eng = LazyAttention(Q, K, V, scale=1.0, policy=5)
    orc = Oracle(eng)
    for step in range(30):
        i = int(rng.integers(n))
        delta = float(rng.normal()) * math.sqrt(magnitude)
        eng.update_k(i, 0, delta)
        orc.K[i, 0] += delta
        orc.sync_flush()
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), 1e-10, f"{step}")
        assert np.isfinite(eng.output(stale=True)).all()
    assert np.abs(orc.Q @ orc.K.T).max() > magnitude / 4  # the logits really were large


def test_a_flush_rescales_a_row_whose_stabiliser_is_far_below_the_others():
    # row 0's logits are all 0 (its stabiliser m = 0) while every other row's maximum is 2,000;
    # a key update lifts one of row 0's logits to 1,200: only rescaling that row keeps its
    # exponential finite. A bound taken over the whole block must use the lowest m (with the
    # highest, 1,200 < 2,000 + slack would skip the rows' own test, and row 0 would overflow
    # into a repair)
    n, d = 8, 4
    Q = np.zeros((n, d))
    Q[0, 0], Q[1:, 1] = 40.0, 40.0
    K = np.zeros((n, d))
    K[0, 1] = 100.0
    V = np.random.default_rng(0).random((n, d))
    eng = LazyAttention(Q, K, V, scale=0.5, policy=None)
    eng.update_k(3, 0, 60.0)
    K[3, 0] = 60.0
    event = eng.flush()
    assert event.kind == "incremental" and event.repaired == 0
    np.testing.assert_allclose(
        eng.output(stale=True), dense_attention(Q, K, V, scale=0.5), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("correct_single", [False, True])
def test_cancellation_dominant_key_changed_stays_exact(correct_single):
    # row 0 puts all its mass on key 0 (logit 500 against about 0); then key 0 goes away
    n, d = 64, 2  # big enough for a single query to be corrected rather than recomputed
    Q = np.zeros((n, d))
    Q[0] = [10.0, 0.0]
    K = np.full((n, d), 0.01)
    K[0] = [50.0, 0.0]
    V = np.arange(n * d, dtype=float).reshape(n, d) + 1
    eng = LazyAttention(Q, K, V, scale=1.0, policy=10**6)
    assert eng.weight(0, 0) == pytest.approx(1.0)
    eng.update_k(0, 0, -50.0)  # logit 500 -> 0: the remaining mass is e^-500 of what was there
    want = dense_attention(Q, eng.K, eng.V, 1.0)
    with correcting_queries(eng) if correct_single else contextlib.nullcontext():
        assert_close_natural(eng.query_row(0), want[0], (np.abs(V)).mean(0), 1e-13, "row")
        assert_close_natural(eng.query(0, 1), want[0, 1], np.abs(V[:, 1]).mean(), 1e-13, "entry")
    event = eng.flush()
    assert event.repaired >= 1  # the row was recomputed, not subtracted
    assert_close_natural(eng.output(stale=True), want, np.abs(V).max(), 1e-13, "after flush")


@pytest.mark.parametrize("packed_before", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_query_past_exp_overflow_stays_exact(dtype, packed_before):
    # a corrected single query skips rescaling to its new maximum logit only while a bound
    # shows no new logit far above the old one: a key raised by 2,000 would overflow exp
    # (beyond 88 in float32, 709 in float64); errstate makes any overflow an error
    rng = np.random.default_rng(8)
    n, d = 64, 2
    Q = np.zeros((n, d), dtype=dtype)
    Q[:, 0] = 1.0
    K = (0.1 * rng.standard_normal((n, d))).astype(dtype)
    V = rng.standard_normal((n, d)).astype(dtype)
    eng = LazyAttention(Q, K, V, scale=1.0, policy=10**6)
    if packed_before:  # row 5 is in the pack already: the big step patches its entry
        eng.update_k(5, 0, 0.1)
        with correcting_queries(eng):
            eng.query(0, 0)
    eng.update_k(5, 0, 2000.0)
    want = dense_attention(eng.Q, eng.K, eng.V, 1.0)
    np.testing.assert_allclose(want[0], V[5], rtol=1e-6)  # all the weight on key 5
    with correcting_queries(eng), np.errstate(over="raise", invalid="raise"):
        for j in range(d):
            assert eng.query(0, j) == pytest.approx(float(want[0, j]), rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(eng.query_row(3), want[3], rtol=1e-5, atol=1e-6)


def test_value_up_by_1e8_and_back_stays_exact():
    eng = make(n=20, d=3, seed=4, policy=1)
    V_flushed = eng.V.copy()
    eng.update_v(7, 1, 1e8)
    eng.update_v(7, 1, -1e8)
    assert abs(eng.V[7, 1] - V_flushed[7, 1]) < 1e-7  # K/V hold what the user asked, rounding aside
    want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
    nat = dense_attention(eng.Q, eng.K, np.abs(eng.V), eng.scale)
    assert_close_natural(eng.output(stale=True), want, nat, 1e-12, "stale after repair")
    assert eng.last_flush.repaired > 0


def test_single_entry_query_repairs_a_cancelled_column():
    # the caches hold V[7, 1] = 1e8 (flushed); taking it back out while pending cancels ~8
    # digits of N[:, 1] only: an entry query of that column must notice and recompute
    eng = make(n=64, d=3, seed=4, policy=10**6)
    eng.update_v(7, 1, 1e8)
    eng.flush()
    eng.update_v(7, 1, -1e8)
    want = dense_attention(eng.Q, eng.K, eng.V, eng.scale)
    nat = dense_attention(eng.Q, eng.K, np.abs(eng.V), eng.scale)
    with correcting_queries(eng):
        for i in (0, 7, 33):
            for j in range(3):
                assert_close_natural(eng.query(i, j), want[i, j], nat[i, j], 1e-12, f"{i},{j}")


def test_long_run_drift_stays_within_1e_10_of_rebuild():
    rng = np.random.default_rng(5)
    n, d = 48, 8
    eng = LazyAttention(*(rng.normal(0, 1, (n, d)) for _ in range(3)), policy=10)
    rows = rng.integers(0, n, 100_000)
    cols = rng.integers(0, d, 100_000)
    deltas = rng.normal(0, 0.1, 100_000)
    for k in range(0, 100_000, 50):  # batches of 50, 5 flushes each
        sl = slice(k, k + 50)
        for start in range(0, 50, 10):
            s2 = slice(k + start, k + start + 10)
            if (k // 50) % 2:
                eng.update_k_many(rows[s2], cols[s2], deltas[s2])
            else:
                eng.update_v_many(rows[s2], cols[s2], deltas[s2])
        del sl
    assert eng.n_updates == 100_000 and eng.n_flushes == 10_000
    cached = eng.output(stale=True)
    eng.rebuild()
    fresh = eng.output(stale=True)
    nat = dense_attention(eng.Q, eng.K, np.abs(eng.V), eng.scale)
    assert_close_natural(cached, fresh, nat, 1e-10, "drift")


def test_engine_never_allocates_n_by_n():
    n, d = 2048, 16
    eng = make(n=n, d=d, policy=10**6)
    rng = np.random.default_rng(6)
    eng.update_k_many(rng.integers(0, n, 200), rng.integers(0, d, 200), rng.normal(size=200))
    tracemalloc.start()
    eng.query_many(rng.integers(0, n, 100), rng.integers(0, d, 100))
    eng.output()
    eng.approximation_error()
    eng.flush()
    eng.rebuild()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < n * n * 8 / 2, f"peak {peak / 1e6:.1f} MB is n×n-sized"
    assert eng.nbytes < 20 * n * d * 8


def test_weights_window_and_stale_view():
    eng = make(n=30, d=4, policy=10**6)
    eng.update_k(5, 0, 2.0)
    full = eng.weights()
    np.testing.assert_allclose(full.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(eng.weights(rows=slice(3, 9), cols=[5, 1]), full[3:9][:, [5, 1]])
    stale = eng.weights(stale=True)
    assert not np.allclose(stale[:, 5], full[:, 5])
    eng.flush()
    np.testing.assert_allclose(eng.weights(stale=True), full, rtol=1e-12)


def test_policy_forms():
    eng = make(policy=lambda e: 2)
    eng.update_k(0, 0, 1.0)
    assert eng.update_k(0, 0, 1.0) is not None
    eng.policy = 5
    assert isinstance(eng.policy, Fixed) and eng.threshold == 5
    assert isinstance(make().policy, CostModel)
    with pytest.raises(TypeError, match="policy"):
        make(policy="often")


# --------------------------------------------------------------------------- bad input
def snapshot(eng):
    return (
        eng.K.copy(),
        eng.V.copy(),
        eng.pending,
        eng.n_updates,
        eng.touched_rows,
        eng.output(stale=True).copy(),
    )


def assert_unchanged(eng, snap):
    K, V, pending, n_updates, touched, stale = snap
    np.testing.assert_array_equal(eng.K, K)
    np.testing.assert_array_equal(eng.V, V)
    assert (eng.pending, eng.n_updates, eng.touched_rows) == (pending, n_updates, touched)
    np.testing.assert_array_equal(eng.output(stale=True), stale)


BAD_CALLS = [
    (lambda e: e.update_k(40, 0, 1.0), IndexError, "i=40"),
    (lambda e: e.update_k(-1, 0, 1.0), IndexError, "i=-1"),
    (lambda e: e.update_v(0, 6, 1.0), IndexError, "j=6"),
    (lambda e: e.update_k(1.5, 0, 1.0), TypeError, "i=1.5"),
    (lambda e: e.update_k(True, 0, 1.0), TypeError, "i=True"),
    (lambda e: e.update_k(0, 0, float("nan")), ValueError, "delta=nan"),
    (lambda e: e.update_v(0, 0, float("inf")), ValueError, "delta=inf"),
    (lambda e: e.update_k(0, 0, "1"), TypeError, "delta"),
    (lambda e: e.update_k_many([1, 2], [0, 9], [1.0, 1.0]), IndexError, r"cols\[1\]=9"),
    (lambda e: e.update_k_many([1, 2], [0, 1], [1.0, np.nan]), ValueError, "deltas"),
    (lambda e: e.update_v_many([1, 2], [0], [1.0, 1.0]), ValueError, "cols has 1"),
    (lambda e: e.update_v_many([1, 2], [0, 1], [1.0]), ValueError, "deltas has shape"),
    (lambda e: e.update_v_many([], [], []), ValueError, "empty"),
    (lambda e: e.update_k_many([]), ValueError, "empty"),
    (lambda e: e.update_k_many([(1, 2, 0.5), (3, 99, 0.1)]), IndexError, r"updates\[1\]\[1\]"),
    (lambda e: e.update_k_many([(1, 2, 0.5), (3, 1)]), ValueError, r"updates\[1\]"),
    (lambda e: e.update_v_many([(1, 2, float("inf"))]), ValueError, r"updates\[0\]\[2\]"),
    (lambda e: e.update_k_many([1.0, 2.0], [0, 1], [1.0, 1.0]), TypeError, "rows"),
    (lambda e: e.update_k_many([1, 2], [0, 1]), TypeError, "needs rows, cols and deltas"),
    (lambda e: e.set_k_row(0, np.ones(5)), ValueError, "row has shape"),
    (lambda e: e.set_v_row(0, [1, 2, 3, 4, 5, np.inf]), ValueError, "row must be finite"),
    (lambda e: e.set_k_rows([0], np.ones((1, 5))), ValueError, "values has shape"),
    (lambda e: e.set_k_rows([1, 1], np.ones((2, 6))), ValueError, "repeats"),
    (lambda e: e.set_v_rows([1, 99], np.ones((2, 6))), IndexError, "rows"),
    (lambda e: e.set_k_row(0, ["a"] * 6), TypeError, "row has dtype"),
    (lambda e: e.set_v_rows([2], [["a"] * 6]), TypeError, "values has dtype"),
    (lambda e: e.query(0, 6), IndexError, "j=6"),
    (lambda e: e.query_many([0, 1], [0]), ValueError, "cols has 1"),
    (lambda e: e.weight(0, 40), IndexError, "j=40"),
    (lambda e: e.weights(rows=[0, 50]), IndexError, "rows"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_CALLS)
def test_bad_input_names_argument_and_changes_nothing(call, exc, match):
    eng = make(policy=3)
    eng.update_k(2, 2, 0.5)
    snap = snapshot(eng)
    with pytest.raises(exc, match=match):
        call(eng)
    assert_unchanged(eng, snap)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "call",
    [
        lambda e, big: e.update_k(1, 2, big),
        lambda e, big: e.update_v(1, 2, -big),
        lambda e, big: e.update_k_many([0, 1, 1], [0, 2, 2], [1.0, big / 2, big / 2]),
        lambda e, big: e.update_v_many([(1, 2, -big)]),
    ],
)
def test_an_update_that_would_overflow_changes_nothing(call, dtype):
    # K and V entries are bounded by what keeps the engine's sums finite (engine/limits.py)
    eng = make(policy=3, dtype=dtype)
    big = max(eng._limits.k, eng._limits.v)
    eng.update_k(1, 2, 0.75 * eng._limits.k)
    eng.update_v(1, 2, -0.75 * eng._limits.v)
    snap = snapshot(eng)
    with pytest.raises(ValueError, match=r"\[1, 2\] = .*limit"):
        call(eng, 0.5 * big)
    assert_unchanged(eng, snap)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 2))), {}, ValueError, "K has shape"),
        ((np.ones((3, 2)), np.ones((3, 2)), np.ones((4, 2))), {}, ValueError, "V has shape"),
        ((np.ones(3), np.ones(3), np.ones(3)), {}, ValueError, "Q must be 2-D"),
        ((np.ones((0, 2)), np.ones((0, 2)), np.ones((0, 2))), {}, ValueError, "at least one"),
        ((np.ones((3, 2)), np.full((3, 2), np.nan), np.ones((3, 2))), {}, ValueError, "K must be"),
        ((np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)) * 1j), {}, TypeError, "V has dtype"),
        ((np.array([["a", "b"]]),) * 3, {}, TypeError, "Q has dtype"),
        ((np.ones((3, 2)),) * 3, {"dtype": np.float16}, TypeError, "dtype=float16"),
        ((np.ones((3, 2)),) * 3, {"dtype": "int64"}, TypeError, "dtype=int64"),
        ((np.ones((3, 2)),) * 3, {"scale": float("nan")}, ValueError, "scale=nan"),
        ((np.ones((3, 2)),) * 3, {"scale": 0}, ValueError, "scale=0"),
        ((np.ones((3, 2)),) * 3, {"policy": 0}, ValueError, "policy=0"),
        (
            (np.ones((3, 2)), np.full((3, 2), 1e300), np.ones((3, 2))),
            {"dtype": np.float32},
            ValueError,
            "K must be finite",
        ),
    ],
)
def test_bad_construction(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LazyAttention(*args, **kwargs)


def test_row_changing_role_between_queries():
    # a value-only row (one logit column) later gets a new key (two columns): the packed
    # corrections must follow, including when queries built the pack in between
    eng = make(n=10, d=3, policy=10**6)
    orc = Oracle(eng)
    for kind, i, j, delta in [
        ("v", 4, 1, 0.7),
        ("k", 4, 0, 1.3),
        ("v", 4, 2, -0.4),
        ("k", 6, 1, 0.5),
        ("v", 6, 0, 2.0),
        ("k", 4, 2, -0.9),
    ]:
        (eng.update_k if kind == "k" else eng.update_v)(i, j, delta)
        (orc.K if kind == "k" else orc.V)[i, j] += delta
        exact, nat = orc.output(), orc.natural_scale()
        assert_close_natural(eng.query_row(i), exact[i], nat[i], 1e-12, f"{kind} {i}")
        assert_close_natural(
            eng.query_many([0, 9], [j, j]), exact[[0, 9], j], nat[[0, 9], j], 1e-12, "many"
        )


def test_copy_is_independent_and_equal():
    eng = make(n=20, d=3, policy=10**6)
    eng.update_k(3, 1, 0.5)
    eng.update_v(8, 2, -1.0)
    twin = eng.copy(policy=Fixed(1))
    assert isinstance(twin.policy, Fixed) and twin.pending == 2 and twin.touched_k == {3}
    np.testing.assert_array_equal(twin.output(), eng.output())
    np.testing.assert_array_equal(twin.output(stale=True), eng.output(stale=True))
    twin.update_k(0, 0, 1.0)  # flushes the twin only
    assert twin.pending == 0 and eng.pending == 2 and eng.K[0, 0] != twin.K[0, 0]
    orc = Oracle(eng)
    assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), 1e-12, "original")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.integers(0, 3), st.integers(0, 2), st.floats(-1, 1), st.booleans()
        ),
        min_size=1,
        max_size=30,
    )
)
# five entries queue row 0 bare; one more, read alone, is queued entry by entry into its undo
@example([(True, 0, 0, 0.1, False)] * 5 + [(True, 0, 1, 0.2, True)])
def test_entry_log_keeps_each_entrys_value_from_before_the_first_update(steps):
    # logs of more than one entry are queued vectorised, leaving their new rows bare (old
    # rows not copied yet); every 5 entries the log is queued; a read after one entry queues
    # it entry by entry, bare rows included. Whatever the mix, the flush must remove exactly
    # the rows as they were.
    eng = make(n=4, d=3, policy=Fixed(10**9))
    eng._queue.short_log, eng._queue.max_log = 1, 5
    orc = Oracle(eng)
    for on_k, i, j, delta, read in steps:
        (eng.update_k if on_k else eng.update_v)(i, j, delta)
        (orc.K if on_k else orc.V)[i, j] += delta
        if read:
            assert eng.touched_rows >= 1  # reading the queue queues the log
    eng.flush()
    assert_close_natural(
        eng.output(stale=True), orc.output(), orc.natural_scale(), 1e-12, "flushed"
    )


READS = {
    "query": lambda e: e.query(0, 0),
    "query_row": lambda e: e.query_row(1),
    "output": lambda e: e.output(),
    "stale output": lambda e: e.output(stale=True),
    "weights": lambda e: e.weights([0], [2, 3]),
    "touched_k": lambda e: e.touched_k,  # queued the log without moving the next check
    "touched_v": lambda e: e.touched_v,
    "touched_rows": lambda e: e.touched_rows,
    "approximation_error": lambda e: e.approximation_error(),
}


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
@pytest.mark.parametrize("read_every", [1, 3, 7])
def test_fixed_threshold_counts_every_update_across_reads(read_every, read):
    # reads queue the entry log; the count the policy sees must not move with them
    eng = make(n=30, d=4, policy=Fixed(5))
    for t in range(40):
        eng.update_k(t % 30, t % 4, 0.1)
        if t % read_every == 0:
            read(eng)
    assert [e.updates for e in eng.flush_log] == [5] * 8 and eng.pending == 0


def test_entry_log_memory_stays_bounded():
    # never flushing and never queried, an engine must not keep every update: the log is
    # queued at _max_log entries
    eng = make(n=64, d=4, policy=Fixed(10**9))
    eng._queue.max_log = 50
    rng = np.random.default_rng(0)
    for _ in range(5000):
        eng.update_v(int(rng.integers(4)), int(rng.integers(4)), 0.01)  # 4 hot rows
        assert len(eng._log) <= eng._queue.max_log
    assert eng.pending == 5000 and eng.touched_v == {0, 1, 2, 3}


class _Schedule:
    """A policy that names its threshold anew each time it is asked (``values``, in turn) and
    promises it for ``hold`` updates; it records when it was asked."""

    def __init__(self, values, hold):
        self.values, self.hold, self.asked = list(values), hold, []

    def threshold(self, engine):
        self.asked.append(engine.n_updates)
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]

    def valid_until(self, engine):
        return engine.n_updates + self.hold


def test_policy_is_asked_again_when_its_promise_runs_out():
    policy = _Schedule([100, 100, 3], hold=4)
    eng = make(n=30, d=4, policy=policy)
    flushed = [eng.update_k(t, 0, 0.1) is not None for t in range(15)]
    # asked at update 1 (100, held through update 5), 6 (100), 11 (3: flush); after a flush
    # at once (12: 3 again, 1 pending), then when 3 are pending (14: flush), then at once (15)
    assert policy.asked == [1, 6, 11, 12, 14, 15]
    assert [t + 1 for t, f in enumerate(flushed) if f] == [11, 14]


def test_policy_changes_take_effect_at_the_next_update():
    eng = make(n=30, d=4, policy=Fixed(100))
    for t in range(10):
        assert eng.update_k(t, 0, 0.1) is None
    eng.policy = 3  # a new policy is asked at once: 11 pending reach it
    assert eng.update_k(10, 0, 0.1) is not None
    policy = _Schedule([100, 100, 2], hold=10**6)
    eng.policy = policy
    assert eng.update_k(0, 1, 0.1) is None  # asked: 100, promised for long
    assert eng.threshold == 100  # asked again (the second answer) through the engine...
    assert eng.threshold == 2  # ...and again: what it says now holds from the next update
    assert eng.update_k(0, 1, 0.1) is not None


@pytest.mark.parametrize("short_log", [0, 16])
@pytest.mark.parametrize("first", ["log", "set_k_row", "set_v_row"])
@pytest.mark.parametrize(
    "write",
    [
        "update_k",
        "update_v",
        "update_k_many",
        "update_v_many",
        "set_k_row",
        "set_v_row",
        "set_k_rows",
        "set_v_rows",
    ],
)
def test_writes_to_a_row_queued_without_its_old_rows(short_log, first, write):
    # a row queued bare by the log (old K and V not copied yet), or half bare by a row write
    # (old row of the other array not copied): every later write to it must leave the old
    # rows recoverable, logged or not
    eng = make(n=6, d=3, policy=Fixed(10**9))
    eng._queue.short_log = short_log  # 0: every log is queued vectorised, its new rows bare
    orc = Oracle(eng)
    row = np.array([0.9, -1.1, 0.4])
    if first == "log":
        eng.update_k(2, 0, 0.5)
        eng.update_v(2, 1, -0.3)
        orc.K[2, 0] += 0.5
        orc.V[2, 1] -= 0.3
    else:
        getattr(eng, first)(2, -row)
        (orc.K if first == "set_k_row" else orc.V)[2] = -row
    assert eng.touched_rows == 1  # queues the log
    target = orc.K if "_k" in write else orc.V
    if write in ("update_k", "update_v"):
        getattr(eng, write)(2, 2, 0.7)
        target[2, 2] += 0.7
        assert eng.touched_rows == 1  # queues the entry (one by one with short_log 16)
    elif write.endswith("many"):
        getattr(eng, write)([2], [2], [0.7])
        target[2, 2] += 0.7
    elif write.endswith("rows"):
        getattr(eng, write)([2], row[None])
        target[2] = row
    else:
        getattr(eng, write)(2, row)
        target[2] = row
    eng.flush()
    assert_close_natural(
        eng.output(stale=True), orc.output(), orc.natural_scale(), 1e-12, f"{first} then {write}"
    )


def test_fresh_query_seconds_reports_queries_computed_afresh():
    eng = make(n=50, d=4, policy=Fixed(10**9))
    assert math.isnan(eng.fresh_query_seconds)
    eng.query(0, 0)  # nothing pending: read from the caches, not afresh
    assert math.isnan(eng.fresh_query_seconds)
    for t in range(20):
        eng.update_k(t, 0, 0.1)  # 20 rows pending: afresh is cheaper at this size
    for t in range(5):
        eng.query(t, 1)
    assert 0 < eng.fresh_query_seconds < 1


def test_policy_with_a_broken_promise_is_asked_every_update():
    class Muddled(_Schedule):
        def valid_until(self, engine):
            return math.nan

    policy = Muddled([100, 100, 2], hold=0)
    eng = make(n=30, d=4, policy=policy)
    flushed = [eng.update_k(t, 0, 0.1) is not None for t in range(4)]
    assert policy.asked[:3] == [1, 2, 3] and flushed == [False, False, True, False]


def test_fixed_threshold_counts_every_kind_of_update_alike():
    # entries are counted by the log's length, batches and rows by a counter: the policy
    # must see their sum, in any order
    eng = make(n=30, d=4, policy=Fixed(5))
    rng = np.random.default_rng(3)
    for _ in range(60):
        kind = int(rng.integers(4))
        i, j = int(rng.integers(30)), int(rng.integers(4))
        if kind == 0:
            eng.update_k(i, j, 0.1)
        elif kind == 1:
            eng.update_v_many([i], [j], [0.1])
        elif kind == 2:
            eng.set_k_row(i, np.full(4, 0.2))
        else:
            eng.update_v(i, j, -0.1)
    assert [e.updates for e in eng.flush_log] == [5] * 12 and eng.pending == 0


def test_rectangular_engine_reports_its_shape_and_refuses_mismatched_keys():
    rng = np.random.default_rng(3)
    Q, K, V = rng.random((5, 4)), rng.random((9, 4)), rng.random((9, 4))
    eng = LazyAttention(Q, K, V, policy=100)
    assert (eng.m, eng.n, eng.d) == (5, 9, 4)
    assert repr(eng).startswith("LazyAttention(m=5, n=9, d=4,")
    assert eng.output().shape == (5, 4) and eng.weights().shape == (5, 9)
    eng.update_k(8, 3, 0.5)  # a key row beyond the query rows
    with pytest.raises(IndexError, match="i=5"):
        eng.query(5, 0)
    np.testing.assert_allclose(eng.output(), dense_attention(Q, eng.K, eng.V), rtol=1e-12)
    assert eng.flush().flops > 0
    with pytest.raises(ValueError, match="K has shape"):
        LazyAttention(Q, rng.random((9, 3)), rng.random((9, 3)))
    with pytest.raises(ValueError, match="V has shape"):
        LazyAttention(Q, K, rng.random((8, 4)))


def test_weights_refuses_windows_larger_than_a_display_needs():
    # the default window is all of P: n×n, the array the engine exists to avoid
    n = 2049
    eng = LazyAttention(np.zeros((n, 2)), np.zeros((n, 2)), np.ones((n, 2)), policy=10)
    with pytest.raises(ValueError, match=r"2,049 × 2,049 = 4,198,401 weights"):
        eng.weights()
    window = eng.weights(slice(0, 512), slice(0, 512))
    np.testing.assert_allclose(window, 1 / n, rtol=1e-12)
    assert eng.weights(slice(0, 2048), slice(0, 2048)).shape == (2048, 2048)


def test_a_copy_asks_its_policy_when_the_original_would():
    # copy() queues the original's log; both must still ask their policy at every update
    eng = make(n=32, d=4, seed=8, policy=Recording())
    for u in range(5):
        eng.update_k(u, 1, 0.1)
    twin = eng.copy(policy=Recording())
    for u in range(4):
        eng.update_v(u, 2, 0.1)
        twin.update_v(u, 2, 0.1)
    assert eng.policy.asked == list(range(1, 10))
    assert twin.policy.asked == list(range(6, 10))


def _row_stream_fresh_rows(refresh: bool) -> int:
    """Row computations from scratch by the queries of a row stream (rows near their guards'
    limit, pushed over by pending updates), with or without refreshing cache rows; every
    answer checked against the oracle, and the stale view against itself before the query."""
    n, d = 48, 4
    rng = np.random.default_rng(0)
    eng = LazyAttention(*rng.standard_normal((3, n, d)), policy=10**9)
    oracle, fresh = Oracle(eng), [0]
    exact = eng._exact

    def counted(idx, **kw):
        fresh[0] += len(idx)
        return exact(idx, **kw)

    eng._exact = counted  # refreshes too compute their rows through it
    if not refresh:
        eng._refresh = lambda rows: np.zeros(len(rows), dtype=bool)
    for step in range(30 * n):
        eng.set_k_row(int(rng.integers(n)), rng.standard_normal(d))
        oracle.K[:] = eng.K
        stale = eng.output(stale=True)
        got = eng.output()
        assert_close_natural(got, oracle.output(), oracle.natural_scale(), 1e-13, "exact")
        # refreshed rows are the caches as of the last flush, recomputed
        assert_close_natural(eng.output(stale=True), stale, oracle.natural_scale(True), 1e-13)
        if step % 8 == 7:
            eng.flush()
            oracle.sync_flush()
    return fresh[0]


def test_a_row_pushed_over_its_guards_by_pending_updates_is_refreshed_from_the_snapshot():
    # A row whose correction loses precision was computed afresh at every query until the
    # next flush; refreshed once as of the last flush, it is corrected again at the next
    # queries (and the flush need not repair it). Fewer rows computed from scratch, the same
    # exact answers.
    without, with_refresh = _row_stream_fresh_rows(False), _row_stream_fresh_rows(True)
    assert with_refresh < 0.5 * without, (with_refresh, without)
