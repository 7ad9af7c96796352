"""A flush policy that raises or answers nonsense leaves the engine as it was (issue 18, 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynattn import LazyAttention, PolicyError
from dynattn.reference import dense_attention


class Broken:
    """Answers ``answer`` (or raises it) from the ``after``-th consultation on; may read an
    exact answer first, which queues the engine's log."""

    def __init__(self, answer, after=0, reads=False, declares=False):
        self.answer, self.after, self.reads, self.asked = answer, after, reads, 0
        if declares:  # says it reads counters only: the engine skips its checkpoint
            self.reads_answers = False

    def threshold(self, engine):
        self.asked += 1
        if self.reads:
            engine.query(0, 0)
        if self.asked <= self.after:
            return math.inf
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


CALLS = {  # the call and its update actions
    "update_k": (lambda e: e.update_k(3, 1, 0.5), 1),
    "update_v": (lambda e: e.update_v(4, 0, -0.5), 1),
    "set_k_row": (lambda e: e.set_k_row(2, np.ones(3)), 1),
    "set_v_row": (lambda e: e.set_v_row(5, np.ones(3)), 1),
    "update_k_many": (lambda e: e.update_k_many([1, 3, 1], [0, 1, 0], [0.1, 0.2, 0.3]), 3),
    "update_v_many": (lambda e: e.update_v_many([(0, 0, 0.1), (6, 2, 0.2)]), 2),
    "set_k_rows": (lambda e: e.set_k_rows([0, 6], np.ones((2, 3))), 2),
    "set_v_rows": (lambda e: e.set_v_rows([3], np.ones((1, 3))), 1),
}
ANSWERS = {
    "raises": RuntimeError("policy failed"),
    "None": None,
    "a string": "5",
    "NaN": math.nan,
    "a bool": True,
}


def state(eng):
    return (
        np.array(eng.K),
        np.array(eng.V),
        eng.pending,
        eng.n_updates,
        eng.touched_k,
        eng.touched_v,
        eng.output(),
        eng.output(stale=True),
    )


@pytest.mark.parametrize(
    "reads, declares",
    [(False, False), (False, True), (True, False)],
    ids=["blind", "blind, declared", "reads exact answers"],
)
@pytest.mark.parametrize("answer", ANSWERS.values(), ids=ANSWERS.keys())
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_failing_policy_takes_the_update_back(call, answer, reads, declares):
    call, actions = call
    rng = np.random.default_rng(7)
    policy = Broken(answer, 4, reads, declares)
    eng = LazyAttention(*rng.standard_normal((3, 8, 3)), policy=policy)
    for u in range(3):  # some updates pending, logged and queued, before the failure
        eng.update_k(u, u, 0.25)
    eng.update_v_many([7], [1], [0.5])
    before = state(eng)
    expected = RuntimeError if isinstance(answer, Exception) else PolicyError
    with pytest.raises(expected):
        call(eng)
    for a, b in zip(before, state(eng), strict=True):
        np.testing.assert_array_equal(a, b)
    # with a working policy the same call applies once, and every answer is exact
    eng.policy = 1000
    call(eng)
    assert eng.pending == before[2] + actions
    np.testing.assert_allclose(eng.output(), dense_attention(eng.Q, eng.K, eng.V), rtol=1e-12)


def test_policy_error_names_the_policy_and_its_answer():
    eng = LazyAttention(*np.ones((3, 4, 2)), policy=lambda engine: "soon")
    with pytest.raises(PolicyError, match=r"returned threshold 'soon'"):
        eng.update_k(0, 0, 1.0)
    assert eng.pending == 0 and eng.K[0, 0] == 1.0


class Refuses:
    """Flushes at 6 pending, but refuses every flush in ``before_flush``."""

    reads_answers = False

    def __init__(self):
        self.told, self.flushed = [], 0

    def threshold(self, engine):
        return 6

    def before_flush(self, updates):
        self.told.append(updates)
        raise RuntimeError("not now")

    def on_flush(self, event):
        self.flushed += 1


FLUSHES = {"flush": lambda e: e.flush(), "rebuild": lambda e: e.rebuild()}


@pytest.mark.parametrize(
    "call", [*CALLS.values(), *((f, 0) for f in FLUSHES.values())], ids=[*CALLS, *FLUSHES]
)
def test_a_refused_flush_changes_nothing(call):
    # the policy is told before every flush, however it comes, and may refuse it: then
    # neither the flush nor the update that triggered it happened (issue 18, 9)
    call, actions = call
    rng = np.random.default_rng(11)
    policy = Refuses()
    eng = LazyAttention(*rng.standard_normal((3, 8, 3)), policy=policy)
    for u in range(5):
        eng.update_k(u, u % 3, 0.25)
    before = state(eng)
    with pytest.raises(RuntimeError, match="not now"):
        call(eng)
    for a, b in zip(before, state(eng), strict=True):
        np.testing.assert_array_equal(a, b)
    assert policy.told == [before[2] + actions]  # told once, with what the flush would apply
    assert policy.flushed == 0 and eng.n_flushes == 0
    np.testing.assert_allclose(eng.output(), dense_attention(eng.Q, eng.K, eng.V), rtol=1e-12)
