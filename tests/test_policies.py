"""Flush policies. The cost model is checked in a synthetic world whose costs are known
exactly (no wall-clock timing), against the best fixed threshold found by a sweep."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn import CostModel, ErrorBudget, Fixed, LazyAttention, OriginalAdaptive
from dynattn.policies import _effective_rows, adaptive_threshold, as_policy


@dataclass
class Event:
    updates: int
    rows: int
    seconds: float
    kind: str = "incremental"


class World:
    """An engine stand-in with the engine's public surface and known costs: a flush costs
    f0 + f1·rows, a query q0 + q1·S; updates hit rows drawn from ``hot`` of n rows."""

    def __init__(
        self,
        policy,
        n=4096,
        hot=None,
        f0=2e-4,
        f1=2e-5,
        q0=5e-6,
        q1=2e-7,
        r=1.0,
        seed=0,
        trust=False,
        fresh=math.nan,
    ):
        self.policy, self.n, self.d = policy, n, 64
        self.hot = hot or n
        self.f0, self.f1, self.q0, self.q1, self.r = f0, f1, q0, q1, r
        self.rng = np.random.default_rng(seed)
        self.n_updates = self.n_queries = 0
        self.pending, self.rows = 0, set()
        self.flush_log, self.query_log = deque(maxlen=1000), deque(maxlen=256)
        self.max_correction_rows = n // 2
        self.max_query_rows = n // 3
        self.fresh = self.fresh_query_seconds = fresh  # a query computed afresh
        self.cost = 0.0
        self._credit = 0.0
        # trust: ask the policy only when its valid_until runs out or its threshold is
        # reached, as the engine does; else after every update
        self.trust, self._threshold, self._until = trust, math.inf, -1
        self.thresholds = []

    def update(self):
        self.rows.add(int(self.rng.integers(self.hot)))
        self.pending += 1
        self.n_updates += 1
        if not self.trust or self.n_updates > self._until or self.pending >= self._threshold:
            self._threshold = self.policy.threshold(self)
            self._until = self.policy.valid_until(self) if self.trust else -1
        self.thresholds.append(self._threshold)
        if self.pending >= self._threshold:
            rows = min(len(self.rows), self.max_correction_rows)
            event = Event(self.pending, len(self.rows), self.f0 + self.f1 * rows)
            self.cost += event.seconds
            self.flush_log.append(event)
            self.pending, self.rows = 0, set()
            on_flush = getattr(self.policy, "on_flush", None)
            if on_flush:
                on_flush(event)
            self._until = -1  # a flush may change the answer
        self._credit += self.r
        while self._credit >= 1:
            self._credit -= 1
            S = len(self.rows)
            t = min(self.q0 + self.q1 * min(S, self.max_query_rows), self.fresh)
            self.cost += t
            self.n_queries += 1
            self.query_log.append((S, 1, t))

    def run(self, updates):
        for _ in range(updates):
            self.update()
        return self.cost / updates


WORLDS = {
    "uniform, a query per update": {},
    "hot spot, a query per update": {"hot": 40},
    "uniform, rare queries": {"r": 0.01},
}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_cost_model_within_2x_of_best_fixed_threshold(world):
    kw = WORLDS[world]
    sweep = {
        k: World(Fixed(k), **kw).run(6000)
        for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 10**9)
    }
    best_k = min(sweep, key=sweep.get)
    model = CostModel()
    World(model, **kw).run(6000)
    chosen = model.current
    cost_chosen = World(Fixed(int(min(chosen, 10**9))), **kw).run(6000)
    assert cost_chosen <= 1.25 * sweep[best_k], (world, chosen, best_k, sweep)
    if best_k < 10**9:
        assert best_k / 2 <= chosen <= 2 * best_k or cost_chosen <= 1.05 * sweep[best_k]


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_cost_model_keeps_its_promises(world):
    # asked only when valid_until runs out (as the engine asks), the cost model gives the
    # thresholds it gives when asked after every update
    asked_always, trusted = (
        World(CostModel(), **WORLDS[world]),
        World(CostModel(), trust=True, **WORLDS[world]),
    )
    asked_always.run(4000)
    trusted.run(4000)
    assert trusted.thresholds == asked_always.thresholds
    assert trusted.cost == asked_always.cost


def test_cost_model_flush_fit_follows_new_flushes():
    model = CostModel()
    world = World(model)
    world.run(3000)
    world.f0, world.f1 = 3 * world.f0, 3 * world.f1  # flushes get dearer: refit them
    world.run(3000)
    fresh = CostModel()
    fresh._marks = model._marks.copy()
    fresh.fitted = {"f1": model.fitted["f1"]}  # the prior slope a refit starts from
    model._choose(world)
    fresh._choose(world)
    for key in ("f0", "f1", "H"):
        assert model.fitted[key] == pytest.approx(fresh.fitted[key], rel=1e-12), key


def test_cost_model_caps_queries_at_computing_them_afresh():
    # the engine's query log as it looked when the model flushed every 256 updates at
    # n = 16,384, one query per update (2026-11-29): queries seen only with few rows pending,
    # steep from catch-ups (5 + 2·S µs); a query computed afresh costs 20 µs. A line
    # extrapolated to S = max_query_rows says never flushing costs r·(5 + 2·1,365) µs; capped
    # at a fresh query, 20 µs: cheaper than any flush cycle
    world = World(CostModel(), f0=5e-3, fresh=2e-5)
    world.flush_log.extend(Event(16, 16, 5e-3 + 2e-5 * 16) for _ in range(8))
    world.query_log.extend((S, 1, 5e-6 + 2e-6 * S) for S in range(16))
    model = world.policy
    model._marks.extend([(0, 0), (100, 100)])  # one query per update
    assert model._choose(world) == math.inf and model.fitted["fresh"] == 2e-5
    world.fresh_query_seconds = math.nan  # none timed yet: no cap, the line extrapolates
    assert model._choose(world) < math.inf


def test_cost_model_refits_less_often_while_its_choice_holds_up_to_once_a_window():
    # a refit costs ~0.1 ms: with its choice unchanged the period grows fourfold from 32 to
    # the window over which the query rate is measured (refitting more often re-derives it)
    model = CostModel(window=256)
    world = World(model, r=0.0)
    refits = set()
    for _ in range(1500):
        world.update()
        refits.add(model._refit_at)
    periods = np.diff(sorted(refits)).tolist()
    # the first refit measures the query rate (32 updates), the choice then holds
    assert periods == [32, 32, 128] + [256] * 5


def test_cost_model_regimes():
    eager = CostModel()
    World(eager, f0=1e-3, f1=1e-6, q1=1e-4, r=20).run(3000)
    assert eager.current <= 2
    never = CostModel(window=256)
    World(never, r=0.0).run(1000)
    assert never.current == math.inf
    hot, uniform = CostModel(), CostModel()
    World(hot, hot=40).run(6000)
    World(uniform).run(6000)
    assert hot.current > uniform.current  # coalescing makes waiting cheaper


def test_cost_model_learns_from_queries_right_after_flushes():
    # queries always land just after a flush: they still teach the model their cost
    eng = LazyAttention(*np.random.default_rng(0).random((3, 64, 4)), policy=CostModel(4))
    for k in range(400):
        eng.update_k(k % 64, 0, 0.01)
        if eng.pending == 0:
            eng.query(0, 0)
    assert len(eng.query_log) > 0 and eng.policy.fitted


def test_original_adaptive_rule():
    assert adaptive_threshold(0, 50_000) == 10
    assert adaptive_threshold(10, 50_000) == 46
    assert adaptive_threshold(50, 50_000) == 100
    policy = OriginalAdaptive()
    eng = LazyAttention(*np.random.default_rng(1).random((3, 1000, 50)), scale=1.0, policy=policy)
    thresholds = []
    for step in range(60):
        eng.update_k_many([(step % 1000, 0, 0.1)] * 10)
        thresholds.append(policy.current)
    assert thresholds[0] == 46 and max(thresholds) == 100  # it moves, then caps
    assert list(policy.history)[-1] == eng.last_flush.updates > 0


def test_error_budget_tracks_true_error():
    rng = np.random.default_rng(2)
    policy = ErrorBudget(1e-3)
    eng = LazyAttention(*rng.random((3, 50, 8)), policy=policy)
    for _ in range(300):
        eng.update_v(int(rng.integers(50)), int(rng.integers(8)), float(rng.normal()))
        assert eng.approximation_error().relative <= 1e-3
    assert eng.n_flushes > 5


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda: Fixed(0), "k=0"),
        (lambda: Fixed(2.5), "k=2.5"),
        (lambda: CostModel(initial=0), "initial=0"),
        (lambda: CostModel(window=0), "window=0"),
        (lambda: ErrorBudget(0), "tolerance=0"),
        (lambda: ErrorBudget(0.1, sample=0), "sample"),
        (lambda: OriginalAdaptive(func=3), "func=3"),
        (lambda: as_policy("x"), "policy='x'"),
    ],
)
def test_bad_policy_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


@settings(max_examples=200, deadline=None)
@given(
    n=st.sampled_from([4, 1024, 65536]),
    log_h=st.floats(-1.0, 1.0),
    ks=st.lists(st.integers(1, 10**6), min_size=1, max_size=64),
)
def test_effective_rows_recovers_the_spread_of_the_updates(n, log_h, ks):
    # flushes of k updates spread uniformly over H rows touch H·(1 − e^(−k/H)) rows each
    H = n * 10.0 ** (3 * log_h)  # n/1000 … 1000·n
    ks = [min(k, 64 * n) for k in ks]
    rows = [H * -math.expm1(-k / H) for k in ks]
    got = _effective_rows(ks, rows, n)
    if 64 * n > H:
        # the fitted H reproduces the rows to 1e-4 (H itself is ill-determined where every
        # flush touches all H rows or nearly none repeats)
        fitted = sum(got * -math.expm1(-k / got) for k in ks)
        assert fitted == pytest.approx(sum(rows), rel=1e-4)
    assert got <= 64 * n
    assert _effective_rows(ks, ks, n) == 64 * n  # no row ever repeated: the cap


def test_error_budget_is_scale_free_over_the_whole_float64_range():
    # the budget compares a ratio of sums of squares: it must flush at the same updates when
    # V is scaled so far that those squares underflow (1e-200) or overflow (1e200)
    def run(factor):
        rng = np.random.default_rng(0)
        Q, K, V = rng.standard_normal((3, 64, 8))
        eng = LazyAttention(Q, K, V * factor, policy=ErrorBudget(1e-3, sample=64))
        worst, flushed_at = 0.0, []
        for t in range(150):
            if t % 3:
                eng.update_v(
                    int(rng.integers(64)),
                    int(rng.integers(8)),
                    0.3 * factor * float(rng.standard_normal()),
                )
            else:
                eng.update_k(
                    int(rng.integers(64)), int(rng.integers(8)), 0.3 * float(rng.standard_normal())
                )
            if eng.pending == 0:
                flushed_at.append(t)
            worst = max(worst, eng.approximation_error().relative)
        return flushed_at, worst

    base_flushes, base_worst = run(1.0)
    assert 10 < len(base_flushes) < 150 and base_worst < 1e-3
    for factor in (1e-200, 1e200):
        flushes, worst = run(factor)
        assert flushes == base_flushes
        assert worst == pytest.approx(base_worst, rel=1e-9)
