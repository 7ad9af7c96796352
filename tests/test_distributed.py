"""ShardedAttention and MultiHeadAttention on a 2-worker LocalCluster, against the dense
float64 oracle: exact answers, batches equal to one-by-one updates, failed calls changing
nothing, shard failures reported with nothing buffered lost."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from contract import CHECKS
from dask.distributed import Client, LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import Oracle, assert_close_natural
from test_policy_failures import CALLS, Broken, state

from dynattn import CostModel, ErrorBudget, Fixed, LazyAttention, dense_attention
from dynattn.distributed import MultiHeadAttention, ShardedAttention, ShardError, limit_blas

TOL = 1e-12


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    )
    client = Client(cluster)
    limit_blas(client, 1)
    yield client
    client.close()
    cluster.close()


def qkv(m=23, n=17, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d))


def check_exact(eng, orc, rows=(0, 7, 22)):
    """Every exact read of ``eng`` against the oracle; the stale view against the oracle's
    last flush."""
    orc.sync_flush()
    np.testing.assert_array_equal(eng.K, orc.K)
    np.testing.assert_array_equal(eng.V, orc.V)
    exact, nat = orc.output(), orc.natural_scale()
    assert_close_natural(eng.output(), exact, nat, TOL, "output")
    stale = orc.output(stale=True)
    assert_close_natural(eng.output(stale=True), stale, orc.natural_scale(True), TOL, "stale")
    rows = [r for r in rows if r < eng.m]
    for i in rows:
        assert_close_natural(eng.query_row(i), exact[i], nat[i], TOL, "query_row")
        j = 1 % eng.d
        assert_close_natural(eng.query(i, j), exact[i, j], nat[i, j], TOL, "query")
    r = np.array(rows * 2)
    c = np.arange(len(r)) % eng.d
    assert_close_natural(eng.query_many(r, c), exact[r, c], nat[r, c], TOL, "query_many")
    np.testing.assert_allclose(eng.weights(rows), orc.weights()[rows], rtol=1e-10, atol=1e-300)
    report = eng.approximation_error()
    diff = stale - exact
    assert report.relative == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(exact), rel=1e-8)
    assert report.max_abs == pytest.approx(np.abs(diff).max(), rel=1e-8, abs=1e-15)


def some_updates(engines, orc, rng):
    """A mix of every update form (13 actions) applied to each of ``engines``, mirrored in
    the oracle (which follows the first engine's flushes)."""
    n, d = engines[0].n, engines[0].d
    singles = [(int(rng.integers(n)), int(rng.integers(d)), float(rng.normal())) for _ in "abc"]
    r, c, dl = rng.integers(n, size=4), rng.integers(d, size=4), rng.normal(size=4)
    row, vals = rng.normal(size=d), rng.normal(size=(2, d))
    steps = [
        *[
            (
                lambda e, u=u: e.update_k(*u),
                lambda o, u=u: o.K.__setitem__(u[:2], o.K[u[:2]] + u[2]),
            )
            for u in singles
        ],
        (lambda e: e.update_v(2, 1, 0.5), lambda o: o.V.__setitem__((2, 1), o.V[2, 1] + 0.5)),
        (lambda e: e.update_k_many(r, c, dl), lambda o: np.add.at(o.K, (r, c), dl)),
        (
            lambda e: e.update_v_many([(3, 0, 1.5), (3, 0, -0.25)]),
            lambda o: np.add.at(o.V, ([3, 3], [0, 0]), [1.5, -0.25]),
        ),
        (lambda e: e.set_k_row(5, row), lambda o: o.K.__setitem__(5, row)),
        (lambda e: e.set_v_rows([0, n - 1], vals), lambda o: o.V.__setitem__([0, n - 1], vals)),
    ]
    for on_engine, on_oracle in steps:
        for eng in engines:
            on_engine(eng)
        on_oracle(orc)
        orc.sync_flush()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_sharded_answers_exactly_like_the_dense_oracle(client, shards):
    Q, K, V = qkv()
    rng = np.random.default_rng(shards)
    # Fixed(7): the client's policy flushes every shard at once, inside the update sequence
    with ShardedAttention(Q, K, V, client=client, shards=shards, policy=Fixed(7)) as eng:
        assert eng.shards == shards and eng.m == 23 and eng.n == 17
        assert next(b[:2] for b in eng.blocks)[0] == 0 and eng.blocks[-1][1] == 23
        orc = Oracle(eng)
        check_exact(eng, orc)
        twin = LazyAttention(Q, K, V, policy=Fixed(7))  # flushes at the same updates
        some_updates([eng, twin], orc, rng)
        assert (eng.n_flushes, eng.pending) == (twin.n_flushes, twin.pending) == (1, 5)
        assert eng.touched_k == twin.touched_k and eng.touched_v == twin.touched_v
        check_exact(eng, orc)
        event, twin_event = eng.flush(), twin.flush()
        assert (event.updates, event.rows, event.k_rows, event.v_rows) == (
            twin_event.updates,
            twin_event.rows,
            twin_event.k_rows,
            twin_event.v_rows,
        )
        assert eng.pending == 0 and eng.touched_rows == 0
        check_exact(eng, orc)
        assert eng.flush() is None
        assert eng.rebuild().kind == "rebuild"
        check_exact(eng, orc)
        assert "shards=" in repr(eng) and f"m={eng.m}" in repr(eng)


def test_multihead_answers_exactly_like_the_dense_oracle(client):
    rng = np.random.default_rng(1)
    H, m, n, d = 3, 9, 11, 4
    Q, (K, V) = rng.standard_normal((H, m, d)), rng.standard_normal((2, H, n, d))
    with MultiHeadAttention(Q, K, V, client=client, policy=Fixed(1000)) as mha:
        assert mha.heads == H and (mha.m, mha.n, mha.d) == (m, n, d)
        assert {w["worker"] for w in mha.memory()} == set(client.scheduler_info()["workers"])
        oracles = [Oracle(mha.head(h)) for h in range(H)]
        mha.update_k(0, 1, 2, 0.75)
        oracles[0].K[1, 2] += 0.75
        mha.update_v_many([2, 2, 1], [3, 3, 0], [1, 1, 0], [0.5, -2.0, 1.0])
        oracles[2].V[3, 1] += 0.5
        oracles[2].V[3, 1] += -2.0
        oracles[1].V[0, 0] += 1.0
        rows = rng.standard_normal((2, d))
        mha.set_k_rows([1, 2], [4, 4], rows)
        oracles[1].K[4], oracles[2].K[4] = rows
        want = np.stack([o.output() for o in oracles])
        nat = np.stack([o.natural_scale() for o in oracles])
        assert_close_natural(mha.output(), want, nat, TOL, "output")
        assert_close_natural(mha.query(2, 5, 1), want[2, 5, 1], nat[2, 5, 1], TOL, "query")
        assert_close_natural(mha.query_row(1, 8), want[1, 8], nat[1, 8], TOL, "query_row")
        h, r, c = np.array([2, 0, 1, 2]), np.array([0, 8, 3, 0]), np.array([1, 0, 3, 2])
        assert_close_natural(mha.query_many(h, r, c), want[h, r, c], nat[h, r, c], TOL, "many")
        errors = mha.approximation_error()
        assert errors[0].relative > 0 and len(errors) == H
        events = mha.flush()
        assert [e.updates if e else 0 for e in events] == [1, 1 + 1, 2 + 1]
        assert mha.pending == 0
        for o in oracles:
            o.sync_flush()
        assert_close_natural(mha.output(stale=True), want, nat, TOL, "stale after flush")
        assert all(e.kind == "rebuild" for e in mha.rebuild())
        assert "heads=3" in repr(mha)


def test_batches_equal_one_by_one(client):
    Q, K, V = qkv(seed=3)
    rng = np.random.default_rng(3)
    r, c, dl = rng.integers(17, size=12), rng.integers(5, size=12), rng.normal(size=12)
    with (
        ShardedAttention(Q, K, V, client=client, shards=2, policy=1000) as one,
        ShardedAttention(Q, K, V, client=client, shards=2, policy=1000) as batch,
    ):
        for i, j, x in zip(r, c, dl, strict=True):
            one.update_k(int(i), int(j), float(x))
            one.update_v(int(j), int(i) % 5, float(x))
        batch.update_k_many(r, c, dl)
        batch.update_v_many(c, r % 5, dl)
        np.testing.assert_array_equal(one.K, batch.K)
        np.testing.assert_array_equal(one.V, batch.V)
        assert one.pending == batch.pending == 24 and one.touched_k == batch.touched_k
        np.testing.assert_allclose(one.output(), batch.output(), rtol=1e-13, atol=1e-15)
        rows = np.arange(0, 23, 3)
        np.testing.assert_allclose(
            batch.query_many(rows, rows % 5),
            [one.query(int(i), int(i) % 5) for i in rows],
            rtol=1e-13,
        )
        np.testing.assert_allclose(one.flush().flops, batch.flush().flops)
    rng = np.random.default_rng(4)
    Qh, Kh, Vh = rng.standard_normal((3, 2, 7, 3))
    with (
        MultiHeadAttention(Qh, Kh, Vh, client=client, policy=1000) as one,
        MultiHeadAttention(Qh, Kh, Vh, client=client, policy=1000) as batch,
    ):
        h, i, j, x = [0, 1, 1, 0], [6, 0, 0, 3], [2, 1, 1, 0], [0.5, 1.0, -3.0, 2.0]
        for args in zip(h, i, j, x, strict=True):
            one.update_k(*args)
        batch.update_k_many(h, i, j, x)
        np.testing.assert_allclose(one.output(), batch.output(), rtol=1e-13, atol=1e-15)
        assert one.pending == batch.pending == 4


def test_a_failed_call_changes_nothing(client):
    Q, K, V = qkv(seed=5)
    with ShardedAttention(Q, K, V, client=client, shards=2, policy=1000) as eng:
        eng.update_k(1, 1, 0.5)
        before = (eng.K.copy(), eng.V.copy(), eng.pending, eng.output())
        bad_calls = [
            (IndexError, lambda: eng.update_k(17, 0, 1.0)),
            (ValueError, lambda: eng.update_v(0, 0, np.nan)),
            (ValueError, lambda: eng.update_k_many([0, 1], [0, 0], [1.0, np.inf])),
            (IndexError, lambda: eng.update_v_many([0, 99], [0, 0], [1.0, 1.0])),
            (ValueError, lambda: eng.update_k_many([(0, 0, 1.0), (1, 2)])),
            (ValueError, lambda: eng.set_k_row(2, np.ones(4))),
            (ValueError, lambda: eng.set_v_rows([3, 3], np.ones((2, 5)))),
            (IndexError, lambda: eng.query(23, 0)),
            (IndexError, lambda: eng.query_many([0, 1], [0, 5])),
        ]
        for error, call in bad_calls:
            with pytest.raises(error):
                call()
            np.testing.assert_array_equal(eng.K, before[0])
            np.testing.assert_array_equal(eng.V, before[1])
            assert eng.pending == before[2]
        np.testing.assert_array_equal(eng.output(), before[3])
        # the entry limits are the whole engine's (all of Q), checked on the client: a sum
        # past the limit for K is refused, one just within it accepted
        limit = eng._limits.k
        eng.update_k(0, 0, 0.5 * limit - eng.K[0, 0])
        with pytest.raises(ValueError, match=r"K\[0, 0\].*limit"):
            eng.update_k(0, 0, 0.6 * limit)
        assert eng.pending == before[2] + 1 and eng.K[0, 0] == pytest.approx(0.5 * limit)
        orc = Oracle(eng)
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), TOL, "output")
    rng = np.random.default_rng(6)
    with MultiHeadAttention(*rng.standard_normal((3, 2, 5, 3)), client=client) as mha:
        for error, call in [
            (IndexError, lambda: mha.update_k(2, 0, 0, 1.0)),
            (ValueError, lambda: mha.update_v_many([0, 1], [0, 0], [0, 0], [1.0, np.nan])),
            (IndexError, lambda: mha.update_v_many([0, 2], [0, 0], [0, 0], [1.0, 1.0])),
            (ValueError, lambda: mha.set_k_rows([1, 1], [2, 2], np.ones((2, 3)))),
        ]:
            with pytest.raises(error):
                call()
            assert mha.pending == 0
        k00 = mha.head(0).K[0, 0]
        with pytest.raises(ValueError, match=r"head 1.*limit"):  # head 0's half is kept out too
            mha.update_k_many([0, 1], [0, 0], [0, 0], [1.0, 1e308])
        with pytest.raises(ValueError, match=r"head 1.*limit"):
            mha.set_v_rows([0, 1], [0, 0], [[1.0, 1.0, 1.0], [1e300, 0.0, 0.0]])
        assert mha.pending == 0 and mha.head(0).K[0, 0] == k00


def test_the_buffer_is_shipped_in_batches_and_queries_take_their_shard_only(client):
    Q, K, V = qkv(seed=7)
    with ShardedAttention(Q, K, V, client=client, shards=2, buffer=8, policy=1000) as eng:
        for k in range(5):
            eng.update_k(k, 0, 0.1)
        assert len(eng._queue.log) == 5 and eng._queue.sent == [0, 0]  # nothing sent yet
        eng.query(22, 0)  # row 22 lives on shard 1: only shard 1 gets the buffer
        assert eng._queue.sent == [0, 5]
        for k in range(3):
            eng.update_v(k, 1, 0.1)
        # the 8th buffered action sends the buffer to every shard, one batch each, without
        # waiting; the log is kept until the shards have applied it
        assert [f[1] for f in eng._queue.inflight] == [8, 8] and eng.pending == 8
        orc = Oracle(eng)
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), TOL, "output")
        assert eng._queue.inflight == [None, None] and len(eng._queue.log) == 0 and eng.pending == 8


def test_a_shard_that_raises_is_named(client):
    Q, K, V = qkv(seed=8)
    with ShardedAttention(Q, K, V, client=client, shards=2, policy=1000) as eng:
        eng.update_k(3, 3, 1.0)
        with pytest.raises(ShardError, match=r"shard 1 of 2 \(query rows 11:23") as info:
            eng._gather("query", [eng._issue(1, "query", 10**6, 0)])  # refused there
        assert isinstance(info.value.failures[0][1], IndexError)
        assert eng.pending == 1  # still buffered, and shard 0 still owes it
        orc = Oracle(eng)
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), TOL, "output")


def test_multihead_failures_name_every_head(client):
    rng = np.random.default_rng(12)
    with MultiHeadAttention(*rng.standard_normal((3, 3, 4, 2)), client=client) as mha:
        mha.update_v(2, 1, 1, 0.5)
        with pytest.raises(ShardError, match=r"(?s)query failed on 3 .*head 0 \(.*head 2 \("):
            mha._each(  # every head refuses the row: each is named, none hides another
                "query",
                lambda h, head: [head._issue(0, "query", 10**6, 0)],
                lambda head, calls: head._gather("query", calls)[0],
            )
        assert mha.pending == 1
        want = dense_attention(mha.head(2).Q, mha.head(2).K, mha.head(2).V, mha.head(2).scale)
        np.testing.assert_allclose(mha.output()[2], want, rtol=1e-12)


def test_a_lost_worker_is_reported_and_nothing_buffered_is_lost(client):
    Q, K, V = qkv(seed=9)
    eng = ShardedAttention(Q, K, V, client=client, shards=2, buffer=2, policy=1000)
    try:
        eng.update_v(4, 2, 3.0)
        eng.query(0, 0)  # shard 0 has the update, shard 1 not yet
        victim = eng.blocks[1][2]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 60
        while eng._futures[1].status == "finished" and time.time() < deadline:
            time.sleep(0.1)
        # the 2nd buffered action sends the buffer: shard 1 cannot take it; the update is kept
        with pytest.raises(ShardError, match=f"(?s)sending updates.*shard 1 of 2.*worker {victim}"):
            eng.update_k(1, 0, -1.0)
        with pytest.raises(ShardError, match=f"shard 1 of 2.*worker {victim}.*2 buffered"):
            eng.query(20, 1)
        with pytest.raises(ShardError, match="shard 1"):
            eng.flush()
        assert eng.pending == 2 and eng.K[1, 0] == K[1, 0] - 1.0
        orc = Oracle(eng)
        exact, nat = orc.output(), orc.natural_scale()
        assert_close_natural(eng.query_row(3), exact[3], nat[3], TOL, "the live shard")
        client.wait_for_workers(2, timeout=60)
        assert eng.recover() == [1]
        assert_close_natural(eng.output(), exact, nat, TOL, "after recover")
        assert eng.flush().updates == 2 and eng.pending == 0
        assert_close_natural(eng.output(stale=True), exact, nat, TOL, "stale")
    finally:
        eng.close()


def test_without_a_client_it_runs_and_stops_its_own_local_cluster():
    Q, K, V = qkv(m=8, n=8, d=3, seed=10)
    with ShardedAttention(Q, K, V, policy=1000) as eng:
        own = eng._cluster
        assert own.owned and 1 <= eng.shards <= os.cpu_count()
        assert all(w.startswith("tcp://127.0.0.1:") for *_, w in eng.blocks)
        eng.update_k(0, 0, 1.0)
        orc = Oracle(eng)
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), TOL, "output")
    assert own.client.status == "closed"


@st.composite
def sequences(draw):
    m, n, d = draw(st.integers(1, 9)), draw(st.integers(1, 7)), draw(st.integers(1, 4))
    i, j, qi = st.integers(0, n - 1), st.integers(0, d - 1), st.integers(0, m - 1)
    delta = st.floats(-2, 2)
    op = st.one_of(
        st.tuples(st.just("k"), i, j, delta),
        st.tuples(st.just("v"), i, j, delta),
        st.tuples(st.just("set_k"), i, st.lists(delta, min_size=d, max_size=d)),
        st.tuples(st.just("many_v"), st.lists(st.tuples(i, j, delta), min_size=1, max_size=4)),
        st.tuples(st.just("query"), qi, j),
        st.tuples(st.just("query_row"), qi),
        st.tuples(st.just("flush")),
        st.tuples(st.just("output")),
    )
    return (
        (m, n, d),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([2, 5, 1000, "cost", "error"])),  # the client-side policy
        draw(st.sampled_from([1, 3, 1000])),  # buffer: sent often (unwaited) or at reads
        draw(st.integers(0, 2**16)),
        draw(st.lists(op, min_size=1, max_size=12)),
    )


@settings(max_examples=15, deadline=None)
@given(sequences())
def test_random_sequences_match_the_oracle(client, scenario):
    (m, n, d), shards, k, buffer, seed, ops = scenario
    rng = np.random.default_rng(seed)
    Q, K, V = rng.standard_normal((m, d)), rng.standard_normal((n, d)), rng.standard_normal((n, d))
    shards = min(shards, m)
    k = {"cost": CostModel(initial=3, window=8), "error": ErrorBudget(0.05)}.get(k, k)
    with ShardedAttention(Q, K, V, client=client, shards=shards, buffer=buffer, policy=k) as eng:
        orc = Oracle(eng)
        for op in ops:
            kind = op[0]
            if kind in ("k", "v"):
                getattr(eng, f"update_{kind}")(*op[1:])
                (orc.K if kind == "k" else orc.V)[op[1], op[2]] += op[3]
            elif kind == "set_k":
                eng.set_k_row(op[1], op[2])
                orc.K[op[1]] = op[2]
            elif kind == "many_v":
                eng.update_v_many(op[1])
                for i, j, x in op[1]:
                    orc.V[i, j] += x
            elif kind == "flush":
                eng.flush()
            orc.sync_flush()
            exact, nat = orc.output(), orc.natural_scale()
            if kind == "query":
                assert_close_natural(eng.query(*op[1:]), exact[op[1:]], nat[op[1:]], TOL, "q")
            elif kind == "query_row":
                assert_close_natural(eng.query_row(op[1]), exact[op[1]], nat[op[1]], TOL, "row")
            elif kind == "output":
                assert_close_natural(eng.output(), exact, nat, TOL, "output")
                stale = orc.output(stale=True)
                assert_close_natural(eng.output(True), stale, orc.natural_scale(True), TOL, "st")
        assert eng.n_updates == sum(
            len(op[1]) if op[0] == "many_v" else op[0] in ("k", "v", "set_k") for op in ops
        )


def test_the_interface_is_the_engines():
    public = {a for a in dir(LazyAttention) if not a.startswith("_")}
    # not offered: the flop estimates (per shard), inserting and deleting tokens (they would
    # move rows between shards)
    missing = (
        public
        - set(dir(ShardedAttention))
        - {
            "correction_flops",
            "query_flops",
            "insert_rows",
            "delete_rows",
        }
    )
    assert not missing, f"ShardedAttention lacks {sorted(missing)}"


# the shared contract (tests/contract.py), with engines on the module's cluster
def sharded(shards, policy=None):
    def factory(Q, K, V):
        return ShardedAttention(Q, K, V, client=CLUSTER["client"], shards=shards, policy=policy)

    return factory


def a_head_of_many(Q, K, V):
    mha = MultiHeadAttention([Q, Q[::-1]], [K, K], [V, -V], client=CLUSTER["client"])
    return mha.head(0)


CLUSTER = {}
CONTRACT_FACTORIES = {
    "1 shard": sharded(1),
    "2 shards, flush every 3": sharded(2, Fixed(3)),
    "3 shards": sharded(3),
    "multi-head, one head": a_head_of_many,
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[] if name.startswith("2") else [pytest.mark.slow])
        for name in CONTRACT_FACTORIES
    ],
)
def test_contract(client, name, check):
    CLUSTER["client"] = client
    check(CONTRACT_FACTORIES[name])


def test_set_q_rows_goes_to_the_shards_owning_them(client):
    Q, K, V = qkv(seed=11)
    with ShardedAttention(Q, K, V, client=client, shards=3, policy=1000) as eng:
        eng.update_k(2, 1, 0.5)
        rows, values = [1, 12, 22], np.random.default_rng(11).standard_normal((3, 5))
        eng.set_q_rows(rows, values)
        np.testing.assert_array_equal(eng.Q[rows], values)
        orc = Oracle(eng)
        assert_close_natural(eng.output(), orc.output(), orc.natural_scale(), TOL, "output")
        with pytest.raises(ValueError, match="repeats"):
            eng.set_q_rows([1, 1], np.ones((2, 5)))
        with pytest.raises(IndexError, match="rows"):
            eng.set_q_rows([23], np.ones((1, 5)))
        np.testing.assert_array_equal(eng.Q[rows], values)


@pytest.mark.parametrize("reads", [False, True], ids=["blind", "reads exact answers"])
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_failing_policy_takes_the_update_back_on_every_shard(client, call, reads):
    # a policy that queries first has sent the update to a shard before failing: the
    # shards must get the old values back
    call, actions = call
    rng = np.random.default_rng(7)
    eng = ShardedAttention(
        *rng.standard_normal((3, 8, 3)),
        client=client,
        shards=2,
        buffer=2,
        policy=Broken(RuntimeError("policy failed"), 4, reads),
    )
    with eng:
        for u in range(3):
            eng.update_k(u, u, 0.25)
        eng.update_v_many([7], [1], [0.5])
        before = state(eng)
        with pytest.raises(RuntimeError, match="policy failed"):
            call(eng)
        for a, b in zip(before, state(eng), strict=True):
            np.testing.assert_array_equal(a, b)
        eng.policy = 1000
        call(eng)
        assert eng.pending == before[2] + actions
        want = dense_attention(eng.Q, eng.K, eng.V)
        np.testing.assert_allclose(eng.output(), want, rtol=1e-12)
        eng.flush()
        np.testing.assert_allclose(eng.output(stale=True), want, rtol=1e-12)
