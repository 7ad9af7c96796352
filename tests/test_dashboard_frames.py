"""Frame preparation, pacing, lessons and page text without Panel: plain numpy checks."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn.dashboard.frames import Pacer, Player, exact_output_rows, plan_window, weights_window
from dynattn.dashboard.lessons import LESSONS
from dynattn.dashboard.text import escape, fmt_ratio, rejection
from dynattn.simulation import ERROR_ROWS, Simulation, SimulationConfig


def test_exact_output_rows_match_the_engine_by_either_path():
    sim = Simulation(n=300, d=6, policy="fixed", threshold=2048, updates_per_tick=64, seed=2)
    sim.run(6)  # hundreds of touched rows: the window's own rows are the cheaper path
    eng = sim.engine
    assert eng.touched_rows > 16
    rows = slice(40, 56)
    np.testing.assert_allclose(exact_output_rows(eng, rows), eng.output()[rows], rtol=1e-12)
    whole = slice(0, 300)  # the whole output: engine.output() is the cheaper path
    np.testing.assert_allclose(exact_output_rows(eng, whole), eng.output(), rtol=1e-12)
    queries = eng.n_queries
    weights_window(eng, plan_window(300, 300, 64, 64))
    assert eng.n_queries == queries  # the page's own reads are not user queries


def test_sampled_error_once_many_rows_are_touched():
    sim = Simulation(n=1024, d=8, policy="fixed", threshold=2048, updates_per_tick=256, seed=0)
    record = sim.run(3)
    eng = sim.engine
    assert eng.touched_rows > ERROR_ROWS
    exact = eng.approximation_error()
    # a sample of 256 of 1,024 rows: the same order of magnitude, a lower bound for max_abs
    assert record["rel_error"] == pytest.approx(exact.relative, rel=0.5)
    assert 0 < record["max_abs_error"] <= exact.max_abs * (1 + 1e-12)


@settings(max_examples=15, deadline=None)
@given(
    updates=st.integers(1, 64),
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    seed=st.integers(0, 100),
)
def test_a_tick_in_parts_is_the_same_tick(updates, chunks, seed):
    """Whatever the chunk sizes of the eager baseline, a tick run in parts leaves every
    strategy in the same state and records the same values as one run at once."""
    params = dict(n=40, d=4, seed=seed, updates_per_tick=updates, policy="fixed", threshold=7)
    whole, parts = Simulation(**params), Simulation(**params)
    whole.run(2)
    sizes = itertools.cycle(chunks)
    for _ in range(2):
        gen = parts.tick_parts(lambda: next(sizes))
        while True:
            try:
                next(gen)
            except StopIteration:
                break
    for name in ("engine", "eager"):
        np.testing.assert_allclose(
            getattr(whole, name).output(), getattr(parts, name).output(), rtol=1e-12
        )
    for name in ("lazy", "eager", "ondemand"):
        np.testing.assert_array_equal(whole.last_answers[name], parts.last_answers[name])
    a, b = whole.timeline.as_dict(), parts.timeline.as_dict()
    for column in ("updates", "pending", "flushed", "rel_error", "max_abs_error"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-12)


def test_pacer_bounds_chunks_by_measured_cost():
    pacer = Pacer(budget=0.1)
    pacer.start()
    assert pacer.eager_chunk() == 16  # not measured yet: a small first chunk
    pacer.record_part(0.02, eager_actions=20)  # 1 ms an action
    assert 1 <= pacer.eager_chunk() <= 100
    pacer.record_part(0.5)
    assert not pacer.fits(pacer.part_seconds)
    pacer.forget()
    assert pacer.part_seconds == 0 and pacer.tick_seconds is None


def test_player_spreads_a_tick_and_finishes_it_on_request():
    sim = Simulation(n=256, d=8, updates_per_tick=512, policy="fixed", threshold=64)
    player = Player(sim, Pacer())
    assert player.bounded(4, budget=1e-6, threads=1) == []  # one part at least, no tick done
    assert player.tick is not None and sim.tick == 0
    records = player.whole(2, threads=1)  # the tick in flight completes first and counts
    assert [r["tick"] for r in records] == [0, 1] and player.tick is None


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.title[:1] for lesson in LESSONS])
def test_every_lesson_is_valid_and_captioned_on_two_lines(lesson):
    SimulationConfig(**lesson.config)  # every setting within its bounds
    assert set(lesson.view_params) <= {"view", "window", "row0", "col0", "ticks_per_frame"}
    assert lesson.caption.count("  \n") == 1  # two lines


def test_first_lesson_flushes_early_and_lazy_leads():
    sim = Simulation(**LESSONS[0].config)
    sim.run(12)
    data = sim.timeline.as_dict()
    assert data["flushed"][:4].sum() >= 1  # within the first four ticks (one second of play)
    assert data["rel_error"].max() > 0 and 0 in data["pending"]  # the sawtooth


def test_escape_makes_names_inert():
    shown = escape("<img src=x onerror=alert(1)>[a](javascript:x)*b*")
    assert "<" not in shown and ">" not in shown
    assert "\\[a\\]" in shown and "\\*b\\*" in shown


@pytest.mark.parametrize(
    "ratio, text",
    [(None, "–"), (0.0123, "0.012×"), (0.94, "0.94×"), (2.61, "2.6×"), (1234, "1,234×")],
)
def test_ratios_read_well(ratio, text):
    assert fmt_ratio(ratio) == text


def test_rejections_name_the_field_and_the_rule():
    assert rejection("seed", "-5", (0, 9), True, False) == (
        "seed must be a whole number from 0 up to 9; -5 is not."
    )
    assert "an empty field" in rejection("δ", " ", (0, 1), False, True)
