"""The engine's error stays within 10× that of a dense recomputation in its dtype plus a floor,
what the precision guards allow (1.0e-14 of the natural scale in float64, 3e-5 in float32), on
any sequence: checked against a long-double oracle over random inputs, large logits (±1e4),
dominant keys taken away, crowded rows and sparse integer data (tests/precision.py); the fuzz
of 10,000 sequences is marked slow. Finite inputs give finite answers or a refusal that names
the argument and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from precision import KINDS, floor, random_ops, replay

from dynattn import LazyAttention

sequences = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([np.float64, np.float32]),
        "kind": st.sampled_from(KINDS),
        "n": st.integers(2, 24),
        "d": st.integers(1, 4),
        "seed": st.integers(0, 2**32 - 1),
        "count": st.integers(1, 24),
        "k": st.sampled_from([1, 3, 1000]),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sequences)
def test_error_within_ten_times_dense_recomputation(case):
    ops = random_ops(np.random.default_rng(case["seed"] + 1), case["count"])
    args = (case["dtype"], case["kind"], case["n"], case["d"], case["seed"], ops, case["k"])
    assert replay(*args) <= 1.0


def test_fuzz_find_float32_dominant_key_at_logit_5000():
    # found by 20,000 fuzzed sequences (seed 11): the engine's repaired row erred 9.4e-5 of
    # its natural scale, a dense float32 recomputation 5.3e-7 in blocks of 1-3 rows and 9.4e-5
    # in blocks of 4 or 8-11: the promise is measured against the worst blocking BLAS may use
    seed = 1079109248
    ops = random_ops(np.random.default_rng(seed + 1), 35)
    assert replay(np.float32, "dominant", 32, 8, seed, ops, 2) <= 1.0


@pytest.mark.parametrize(
    "kind, n, d, seed, k, count",
    [("dominant", 21, 8, 3124307036, 5, 28), ("sparse", 9, 5, 3312360539, 1, 33)],
)
def test_fuzz_finds_float64_within_1e14(kind, n, d, seed, k, count):
    # found by 4,000 fuzzed sequences against the 1e-14 floor when float64 rows were allowed
    # to remove 16 times their mass: a dense recomputation erred 1.1e-16 and 6.4e-16 (the row's
    # top key exact), the engine 3.3e-14 (1 % of a row's mass removed at logits of 9,300) and
    # 2.7e-14 (a row's top key removed, integer data)
    ops = random_ops(np.random.default_rng(seed + 1), count)
    assert replay(np.float64, kind, n, d, seed, ops, k) <= 1.0


def test_issue_example_dominant_key_removed_at_large_logits():
    n = 64
    Q, K, V = np.ones((n, 1)), np.full((n, 1), 8994.0), np.ones((n, 1))
    K[:2, 0] = [9994.0, 9987.1]
    V[1] = -1
    eng = LazyAttention(Q, K, V, scale=1.0, policy=1000)
    eng.update_k(0, 0, -50.0)
    eng.flush()
    assert abs(eng.output()[0, 0] + 1.0) <= 1e-14


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_removing_the_top_key_at_logit_90_stays_within_the_floor(dtype):
    # the remaining key's weight is e^-3 of the removed one's; float32 lost 3,500 u here and
    # float64 2,900 u (u the unit roundoff), where a dense recomputation is exact
    n = 32
    Q = np.ones((n, 1), dtype)
    K = np.full((n, 1), -20.0, dtype)
    K[:2, 0] = [90.0, 87.0]
    V = np.ones((n, 1), dtype)
    V[1] = -1
    for policy in (1, 1000):
        eng = LazyAttention(Q, K, V, scale=1.0, policy=policy)
        eng.update_k(0, 0, -100.0)
        assert abs(eng.query(0, 0) + 1.0) <= floor(dtype)
        assert abs(eng.output()[0, 0] + 1.0) <= floor(dtype)


# ---------------------------------------------------------------- finite inputs, finite answers
def _answers_finite(eng) -> bool:
    """Every kind of answer the engine gives, all finite (errstate makes overflow an error)."""
    with np.errstate(over="raise", invalid="raise"):
        answers = [eng.output(), eng.output(stale=True), eng.query_row(0), [eng.query(0, 0)]]
        answers.append(eng.weights([0], [0, 1]))
        eng.flush()
        answers.append(eng.output(stale=True))
    return all(np.isfinite(a).all() for a in answers)


def test_issue_examples_refused_naming_the_argument():
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((3, 9, 4))
    with pytest.raises(ValueError, match=r"^Q .*logit limit"):
        LazyAttention(Q * 1e160, K * 1e160, V, scale=1)
    with pytest.raises(ValueError, match=r"^K\[.*limit for K entries"):
        LazyAttention(Q, K * 1e100, V, scale=1)
    with pytest.raises(ValueError, match=r"^V\[.*limit for V entries"):
        LazyAttention(Q, K, V * 1e300, scale=1)
    eng = LazyAttention(Q, K, V, scale=1, policy=1000)
    eng.update_v(2, 2, 0.5)
    before = (np.array(eng.K), np.array(eng.V), eng.output(), eng.pending)
    calls = [
        (eng.update_k, (3, 1, 1.7e308), r"delta=1\.7e\+308 would make K\[3, 1\]"),
        (eng.update_v, (0, 0, 1e308), r"delta=1e\+308 would make V\[0, 0\]"),
        (eng.set_k_row, (1, np.full(4, 1e200)), r"row\[0\] = 1e\+200"),
        (eng.set_v_rows, ([1, 2], np.full((2, 4), 1e300)), r"values\[0, 0\] = 1e\+300"),
        (eng.update_v_many, ([0, 5], [1, 1], [1.0, 1e300]), r"deltas would make V\[5, 1\]"),
        (eng.update_k_many, ([(0, 0, 1e200)],), r"deltas would make K\[0, 0\]"),
    ]
    for call, args, match in calls:
        with pytest.raises(ValueError, match=match):
            call(*args)
        after = (np.array(eng.K), np.array(eng.V), eng.output(), eng.pending)
        for a, b in zip(before, after, strict=True):
            np.testing.assert_array_equal(a, b, f"{call.__name__}{args} changed the engine")


# decimal exponents of magnitudes: plain, near the limits (logits of 2e6 in float32, 1e15 in
# float64; V near 1e24/n and 1e285/n), or anywhere up to past float64
_EXPONENTS = st.one_of(st.just(0), st.integers(-40, 30), st.integers(-40, 330))


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from([np.float64, np.float32]),
    exponents=st.lists(_EXPONENTS, min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    scale_exp=st.integers(-30, 30),
    updates=st.lists(
        st.tuples(
            st.sampled_from("kvKV"), st.integers(0, 5), st.integers(0, 2), st.integers(-40, 330)
        ),
        max_size=8,
    ),
)
def test_finite_inputs_give_finite_answers_or_a_named_refusal(
    dtype, exponents, seed, scale_exp, updates
):
    # magnitudes from 1e-40 to 1e330 (past float64) for Q, K, V, the scale and every update:
    # each call either succeeds, and then every answer is finite, or raises a ValueError
    # naming its argument and changes nothing
    rng = np.random.default_rng(seed)
    qe, ke, ve = (10.0 ** min(e, 300) for e in exponents)
    Q, K, V = (rng.standard_normal((6, 3)) * f for f in (qe, ke, ve))
    top = float(np.finfo(dtype).max)
    if not all(np.abs(a).max() <= top for a in (Q, K, V)):
        return  # not finite in this dtype: the ordinary validation's business
    try:
        eng = LazyAttention(
            Q.astype(dtype), K.astype(dtype), V.astype(dtype), scale=10.0**scale_exp, policy=3
        )
    except ValueError as exc:
        assert str(exc).split("[")[0].split(" ")[0] in ("Q", "K", "V"), exc
        event("refused at construction")
        return
    event("built")
    assert _answers_finite(eng)
    for which, i, j, e in updates:
        x = float(rng.standard_normal() * 10.0 ** min(e, 300))
        if not abs(x) <= top:
            continue
        state = (np.array(eng.K), np.array(eng.V), eng.pending)
        try:
            if which in "kv":
                getattr(eng, f"update_{which}")(i, j, x)
            else:
                getattr(eng, f"set_{which.lower()}_row")(i, np.full(3, x))
        except ValueError as exc:
            event("update refused")
            assert "delta" in str(exc) or "row" in str(exc), exc
            after = (np.array(eng.K), np.array(eng.V), eng.pending)
            for a, b in zip(state, after, strict=True):
                np.testing.assert_array_equal(a, b)
        assert _answers_finite(eng)


@pytest.mark.slow
def test_fuzz_ten_thousand_sequences():
    # tests/fuzz_precision.py as a test: about a minute on 2 cores
    from fuzz_precision import fuzz

    stats = fuzz(10_000, seed=2026)
    failures = {key: entry[2][:3] for key, entry in stats.items() if entry[2]}
    assert not failures, failures
