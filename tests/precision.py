"""Random update sequences replayed on the lazy engine and checked against a long-double oracle
(shared by tests/test_precision.py and its slow fuzz).

The promise checked: for every sequence, the engine's error is at most ``RATIO`` times the
error of a dense recomputation in the engine's dtype on the same inputs, plus ``FLOOR`` units
of roundoff of the entry's natural scale ``(P·|V|)[i, j]``. Errors are measured against
``np.longdouble`` (80-bit on x86), entry by entry, relative to that natural scale.
"""

from __future__ import annotations

import math

import numpy as np

from dynattn import Fixed, LazyAttention
from dynattn.reference import dense_attention

RATIO = 10.0
# the floor in units u of the dtype's roundoff (1.1e-16 in float64, 6e-8 in float32): what
# the precision guards allow, 2·(1 + PLAIN_LOGITS)·g u (see dynattn.engine.kernels), 1.0e-14
# in float64 (the floor) and 3e-5 in float32
FLOOR_UNITS = {np.dtype(np.float64): 2 * 9 * 5.0, np.dtype(np.float32): 2 * 33 * 8.0}
KINDS = ("ordinary", "large", "crowded", "sparse", "dominant")


def inputs(kind: str, n: int, d: int, rng: np.random.Generator):
    """Q, K, V (float64) and the scale for one kind of input, with the size of a key step."""
    Q, K, V = (rng.standard_normal((n, d)) for _ in range(3))
    scale, step = 1 / math.sqrt(d), 1.0
    if kind == "large":  # logits of ±1e4, a few keys near each row's top
        direction = rng.standard_normal(d)
        K = 1e4 * np.round(rng.random((n, 1)) * 4) / 4 * direction / np.linalg.norm(direction)
        K += rng.standard_normal((n, d)) * rng.choice([1e-3, 1.0, 30.0])
        Q = np.abs(Q)
        scale, step = 1.0, 30.0
    elif kind == "crowded":  # every key nearly the same: mass spread over all of them
        K = np.ones((n, d)) * 3 + 1e-3 * K
        scale, step = 1.0, 1e-3
    elif kind == "sparse":  # small integers, mostly zero: dense rounding is often exact
        Q, K, V = (np.round(a * 2) * (rng.random((n, d)) < 0.3) for a in (Q, K, V))
        scale = 1.0
    elif kind == "dominant":  # the example: one key carries a row's mass
        Q = np.abs(Q)
        K = np.full((n, d), 8994.0 / d) + rng.standard_normal((n, d)) * 1e-2
        K[0] += 1000.0 / d
        K[1] += rng.uniform(980, 999) / d
        V = np.where(rng.random((n, d)) < 0.5, 1.0, -1.0)
        scale, step = 1.0, 50.0
    return Q, K, V, scale, step


def errors(got, Q, K, V, scale, dtype) -> tuple[float, float]:
    """(engine error, dense error in ``dtype``), each the largest over the entries of
    ``|x − exact| / (P·|V|)``, with exact and P·|V| in long double.

    The dense error is the largest over dense recomputations in row blocks of every size
    (1 … n rows per matrix product). BLAS rounds a row differently with the number of rows
    beside it, and where the logits' terms cancel (``|q|·|k|`` far above ``|q·k|``) one
    blocking may be luckier than another by orders of magnitude: at logits near 5,000 in
    float32 one row erred 5e-7 in blocks of 1-3, 5-7 or 12+ rows and 9e-5 in blocks of 4 or
    8-11. The engine recomputes whatever rows need it, in blocks of any size.
    """
    ld = np.longdouble
    exact = dense_attention(Q, K, V, scale, dtype=ld)
    natural = dense_attention(Q, K, np.abs(V), scale, dtype=ld)
    natural = np.maximum(natural, np.finfo(ld).tiny)
    mine = np.abs(np.asarray(got, dtype=ld) - exact) / natural
    base = 0.0
    for rows in range(1, len(Q) + 1):
        dense = dense_attention(Q, K, V, scale, dtype=dtype, block=rows)
        base = max(base, float((np.abs(dense.astype(ld) - exact) / natural).max()))
    return float(mine.max()), base


def floor(dtype) -> float:
    return FLOOR_UNITS[np.dtype(dtype)] * float(np.finfo(dtype).eps) / 2


def replay(dtype, kind: str, n: int, d: int, seed: int, ops: list, k: int) -> float:
    """Run ``ops`` (see :func:`random_ops`) on an engine flushing every ``k`` updates; returns
    the worst ratio of the engine's error to what the promise allows (≤ 1 passes). With an odd
    ``seed`` every query corrects cached rows (at these sizes the engine would compute most of
    them afresh, as it should there)."""
    rng = np.random.default_rng(seed)
    Q, K, V, scale, step = inputs(kind, n, d, rng)
    eng = LazyAttention(
        Q.astype(dtype), K.astype(dtype), V.astype(dtype), scale=scale, policy=Fixed(k)
    )
    if seed % 2:
        eng._prefers_fresh = lambda: False
        eng._planner.max_rows = 10**9
    Q = np.asarray(eng.Q, dtype=np.float64)
    scale = float(dtype(scale))  # what the engine computes with
    worst = 0.0
    for op, i_drawn, j_drawn, x in ops:
        i, j = i_drawn % n, j_drawn % d
        if op == "top":  # the key carrying row i's largest weight moves down
            top = int(np.argmax(Q[i] @ np.asarray(eng.K, np.float64).T * scale))
            eng.update_k(top, j, -abs(x) * step - step)
        elif op == "k":
            eng.update_k(i, j, x * step)
        elif op == "v":
            eng.update_v(i, j, x)
        elif op == "K":
            eng.set_k_row(i, np.asarray(eng.K[(i + j + 1) % n]) + x * step)
        elif op == "V":
            eng.set_v_row(i, np.full(d, x))
        elif op == "flush":
            eng.flush()
        else:
            K, V = np.asarray(eng.K, np.float64), np.asarray(eng.V, np.float64)
            for got in _answers(eng, op, i, j):
                mine, base = errors(got, Q, K, V, scale, dtype)
                worst = max(worst, mine / (RATIO * base + floor(dtype)))
    return worst


def _answers(eng, op, i, j):
    """The engine's answers to check for a query op: the whole output, or one row and one
    entry in place of the oracle's (the rest of the oracle's answer taken as exact)."""
    if op == "out":
        yield eng.output()
        if not eng.pending:
            yield eng.output(stale=True)
        return
    # a single row or entry: compare it within an otherwise exact answer (the dense output)
    full = np.array(eng.output(), dtype=np.float64)
    full[i] = eng.query_row(i)
    yield full
    full[i, j] = eng.query(i, j)
    yield full


def random_ops(rng: np.random.Generator, count: int) -> list:
    """``count`` random operations: entry and row updates of K and V, flushes and queries."""
    names = ["k", "k", "top", "v", "v", "K", "V", "flush", "out", "row"]
    ops = []
    for _ in range(count):
        op = names[rng.integers(len(names))]
        ops.append((op, int(rng.integers(64)), int(rng.integers(8)), float(rng.normal())))
    return ops
