"""Numerical kernels of the lazy engine: exact cache rows, the low-rank correction and the
precision guards, shared with the eager baseline (:class:`~dynattn.strategies.EagerDense`).

A *cache row* of query row ``i`` holds, over the current keys and values,
``[N_i (d) | s_i | guard of s_i | guards of N_i (d)]`` (``2d + 2`` numbers) beside its
stabiliser ``m_i``, with ``ã_ij = exp(scale · q_i·k_j − m_i)``, ``N_i = Σ_j ã_ij v_j`` and
``s_i = Σ_j ã_ij``; the output row is ``N_i / s_i``.

Invariants and costs:

* The guards are ``removed − g · natural``: the mass that removals subtracted since the row was
  last computed exactly (for a value changed under its key, ``ã·|v − v_old|``), each removed
  exponential weighted by the error of recomputing it (``w ≥ 1``, growing with its logit's
  magnitude: :meth:`Contributions.weights`), less ``g``
  (:data:`GROWTH`) times the row's natural scale (``s_i`` and ``Σ_j ã_ij |v_jc|``). Both
  parts are linear in the contributions, so every product that moves N and s moves the guards
  too. A positive guard (or ``s ≤ 0``, or NaN) means the subtractions may have left an error
  above ``2u·(1 + PLAIN_LOGITS)·g`` of the natural scale (u the unit roundoff): that row must be
  recomputed, O(n·d).
* Every exponential stays below ``e^SHIFT_SLACK``: a row is rescaled (online softmax) where
  Cauchy–Schwarz (``|q_i|·|k_j|``) allows a new logit above ``m_i + SHIFT_SLACK``.
* Whole-matrix work runs in row blocks of about :data:`BLOCK_ELEMENTS` numbers, through
  reused scratch (:class:`Workspace`): no n×n array, and no fresh multi-MB temporary per call
  (first touches of fresh pages cost more than the arithmetic).
"""

from __future__ import annotations

import math

import numpy as np

from .._blas import add_product

# g: removed mass, weighted by its logits' magnitude (see Contributions), may grow to this
# multiple of the remaining mass before a row is recomputed. A recomputed exponential
# exp(x − m) carries a relative error of about u·(|x| + |m|) (u the unit roundoff: the
# logit product rounds at that magnitude), the one it cancels carried as much, so removing
# mass R leaves an error of about 2u·(1 + |x| + |m|)·R. With the weights below that is at
# most 2u·(1 + PLAIN_LOGITS)·g of the entry's natural scale, whatever the logits' size:
# 1.0e-14 in float64 (2u·9·5, the floor the precision tests hold it to) and 3e-5 in float32.
# A smaller g costs recomputations: a stream of row rewrites recomputes every row after about
# g·n/w replacements (w the weight of plain keys, 1 to 3 at d = 64).
GROWTH = {np.dtype(np.float64): 5.0, np.dtype(np.float32): 8.0}

# g where removals subtract the very exponentials that were added (EagerDense stores them):
# only the sums' rounding remains, about u·(1 + 2g), 2.3e-13 (float64) and 8e-6 (float32).
GROWTH_EXACT_REMOVAL = {np.dtype(np.float64): 1024.0, np.dtype(np.float32): 64.0}

# Logits up to this magnitude (|x| + |m| for the mass that counts) weigh 1 in the guards;
# larger ones weigh proportionally more (Contributions.weights). Lower in float64, whose floor
# is tight: there keys with small logits may move more mass before a recomputation.
PLAIN_LOGITS = {np.dtype(np.float64): 8.0, np.dtype(np.float32): 32.0}

# From this many rows on, corrections and fresh rows are matrix products (compute-bound)
# rather than matrix-vector products (memory-bound).
MANY_ROWS = 16

# Rows are not rescaled to a new maximum logit while Cauchy–Schwarz keeps every new logit
# below m + this: exponentials up to e^16 overflow nothing, even in float32.
SHIFT_SLACK = 16.0

# Numbers per row block when a computation runs over every row: temporaries of a few MB.
BLOCK_ELEMENTS = 1 << 20

# Corrections exponentiate in base 2 (numpy's exp2 is 1.6x faster than exp in float32 and as
# accurate); the factor log2(e) rides in the logit product for free.
LOG2E = math.log2(math.e)


class Workspace:
    """Named scratch arrays reused across calls (grown, never shrunk, until :meth:`clear`)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A writable ``shape`` array whose contents are undefined."""
        size = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype=self.dtype)
        return buf[:size].reshape(shape)

    def clear(self) -> None:
        self._buffers.clear()


class Contributions:
    """Rows that move the cache columns ``[N | s | guards]`` when multiplied by weights.

    ``new``: a key-value pair coming in, ``[v, 1, a−g, (a−g)|v|]`` with ``a = (w − 1)/2``;
    ``old``: one going out, ``[−v, −1, w+g, (w+g)|v|]``; ``changed``: a value replaced under
    an unchanged key, ``[v − v_old, 0, 0, w|v − v_old| + g|v_old| − g|v|]`` (s is untouched,
    so nothing cancels in it). O(rows·d) each.

    ``w`` weighs removed mass by the error of recomputing it (:meth:`weights`); ``g`` is
    :data:`GROWTH`. With ``qnorm_max`` None removals are exact (the caller subtracts the very
    exponentials it added, as :class:`~dynattn.strategies.EagerDense` does): they weigh 1,
    and ``g`` is :data:`GROWTH_EXACT_REMOVAL`.
    """

    def __init__(self, d: int, dtype: np.dtype, qnorm_max: float | None = None):
        self.d, self.dtype = d, dtype
        self.growth = g = (GROWTH if qnorm_max is not None else GROWTH_EXACT_REMOVAL)[dtype]
        self.qnorm_max = qnorm_max
        self.plain = PLAIN_LOGITS[dtype]
        # s and its guard, as arrays: a tuple is converted at every call, and a catch-up
        # after one update is all such calls
        self._marks_new = np.array([1, -g], dtype=dtype)
        self._marks_old = np.array([-1, 1 + g], dtype=dtype)

    def weights(self, keys: np.ndarray | None) -> np.ndarray | None:
        """Weights ``w + g`` of removing the entries of the packed ``keys`` (pre-scaled),
        shape (rows,), or None for ``1 + g`` each.

        A logit x = q·k is computed with an error of about u·|q|·|k| (Cauchy–Schwarz bounds
        the magnitudes its rounding sees), and the stabiliser m of a row where this entry
        carries mass lies within a few units of x; so ``w = max(1, (1 + 2·|q|max·|k|) /
        (1 + PLAIN_LOGITS))``: plain logits weigh 1 (GROWTH is calibrated for them), and a
        logit of 10,000 some 2,000 (float64) or 600 (float32) times more. O(rows·d).
        """
        if self.qnorm_max is None or keys is None:
            return None
        w = np.sqrt(np.einsum("ij,ij->i", keys, keys))
        w *= 2 * self.qnorm_max / (1 + self.plain)
        w += 1 / (1 + self.plain)
        np.maximum(w, 1.0, out=w)
        w += self.growth
        return w

    def new(self, out: np.ndarray, v: np.ndarray, keys: np.ndarray | None = None) -> None:
        d, g = self.d, self.growth
        out[:, :d] = v
        w = self.weights(keys)
        if w is None:
            out[:, d : d + 2] = self._marks_new
            np.multiply(np.abs(v), -g, out=out[:, d + 2 :])
        else:
            # an added exponential errs by as much as a removed one, but cancels nothing: half
            # the weight beyond 1 (plain logits add nothing to the guards' g per unit mass)
            w -= 1 + 3 * g  # weights() gave w + g
            w *= 0.5
            out[:, d] = 1
            out[:, d + 1] = w
            np.multiply(np.abs(v), w[:, None], out=out[:, d + 2 :])

    def old(self, out: np.ndarray, v: np.ndarray, keys: np.ndarray | None = None) -> None:
        d = self.d
        np.negative(v, out=out[:, :d])
        w = self.weights(keys)
        if w is None:
            out[:, d : d + 2] = self._marks_old
            np.multiply(np.abs(v), 1 + self.growth, out=out[:, d + 2 :])
        else:
            out[:, d] = -1
            out[:, d + 1] = w
            np.multiply(np.abs(v), w[:, None], out=out[:, d + 2 :])

    def changed(
        self, out: np.ndarray, v: np.ndarray, v_old: np.ndarray, keys: np.ndarray | None = None
    ) -> None:
        d, g = self.d, self.growth
        np.subtract(v, v_old, out=out[:, :d])
        out[:, d : d + 2] = 0
        w = self.weights(keys)
        # the product adds ã·(v − v_old): what it cancels in N errs by at most what was added
        # for v_old, and that stays covered by the natural scale as long as |v| does not fall
        # below it, so the error it leaves weighs w·|v − v_old|; a small change to one column
        # charges little, and nothing to the others (charging all of |v_old|, as a removal
        # does, would recompute every row after ~g·n value updates of 0.1)
        np.abs(out[:, :d], out=out[:, d + 2 :])
        if w is not None:  # weights() gave w + g (None: removals weigh 1)
            out[:, d + 2 :] *= w[:, None] - g
        out[:, d + 2 :] += g * np.abs(v_old)
        out[:, d + 2 :] -= g * np.abs(v)


def row_norms(rows: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row, O(rows·d); inf where a norm overflows (no warning)."""
    with np.errstate(over="ignore"):
        return np.sqrt(np.einsum("ij,ij->i", rows, rows))


def augmented_keys(Kp: np.ndarray) -> np.ndarray:
    """``log₂e·[Kp | 1]`` (P, d+1) for packed keys ``Kp``: the logit product then subtracts m
    and gives base-2 exponents (see :func:`correct_rows`). O(P·d)."""
    aug = np.empty((len(Kp), Kp.shape[1] + 1), dtype=Kp.dtype)
    np.multiply(Kp, LOG2E, out=aug[:, :-1])
    aug[:, -1] = LOG2E
    return aug


def max_norm(rows: np.ndarray) -> float:
    """Largest Euclidean norm among ``rows`` (0 for none; inf if a norm overflows)."""
    if not len(rows):
        return 0.0
    if len(rows) == 1:  # a catch-up after one update: vdot neither warns nor needs errstate
        return math.sqrt(np.vdot(rows, rows))
    with np.errstate(over="ignore"):
        return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max()))


def guards_hold(C: np.ndarray, d: int) -> bool:
    """Whether every row of ``C`` keeps its precision: ``s > 0`` and every guard ``≤ 0``, in
    two whole-block reductions (NaN fails both). Row-wise reductions over short rows cost as
    much as the exponentials of a small flush, so this usual case goes first."""
    return len(C) == 0 or bool(C[:, d].min() > 0 and C[:, d + 1 :].max() <= 0)


def lost_precision(C: np.ndarray, d: int) -> np.ndarray:
    """Rows of ``C`` whose incremental value may have lost digits, or is not finite (bool).

    With g the growth bound, each row carries the guards ``removed_s − g·s`` and, per output
    column, ``removed_c − g·Σ_j ã_ij|v_jc|``. A positive guard means the removed mass exceeds g
    times the remaining natural scale, so the subtraction may have cancelled more than
    log10(g) digits. O(rows·d).
    """
    if guards_hold(C, d):
        return np.zeros(len(C), dtype=bool)
    bad = ~(C[:, d] > 0) | ~(C[:, d + 1] <= 0)  # negated comparisons also catch NaN
    bad |= ~(C[:, d + 2 :] <= 0).all(axis=1)
    return bad


def exact_rows(
    Q: np.ndarray,
    K: np.ndarray,
    V: np.ndarray,
    scale: float,
    growth: float,
    idx: np.ndarray,
    work: Workspace,
    out_m: np.ndarray | None = None,
    out_C: np.ndarray | None = None,
    guards: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact stabilisers and cache rows of query rows ``idx`` from scratch, in row blocks.

    Cost O(len(idx)·n·d) for n keys; memory one block of logits. Writes into ``out_m`` /
    ``out_C`` (indexed like ``idx``) when given, so a full rebuild needs no second cache array.
    Without ``guards`` the guard columns are zero: a third of the work saved where the rows are
    only read, never corrected later.
    """
    n, d = K.shape
    dt = K.dtype
    m = np.empty(len(idx), dtype=dt) if out_m is None else out_m
    C = np.empty((len(idx), 2 * d + 2), dtype=dt) if out_C is None else out_C
    abs_v = np.abs(V) if guards else None
    step = min(len(idx), max(32, BLOCK_ELEMENTS // n))
    block = work.get("exact", (step, n))
    scale = dt.type(scale)
    for a in range(0, len(idx), step):
        blk = slice(a, a + step)
        L = block[: len(idx[blk])]
        np.matmul(Q[idx[blk]] * scale, K.T, out=L)
        mb = L.max(axis=1)
        L -= mb[:, None]
        np.exp(L, out=L)
        m[blk] = mb
        np.matmul(L, V, out=C[blk, :d])
        L.sum(axis=1, out=C[blk, d])
        if guards:
            np.multiply(C[blk, d], -growth, out=C[blk, d + 1])
            np.matmul(L, abs_v, out=C[blk, d + 2 :])
            C[blk, d + 2 :] *= -growth
        else:
            C[blk, d + 1 :] = 0
    return m, C


def correct_rows(
    QA: np.ndarray,
    qnorm: np.ndarray,
    qnorm_max: float,
    m: np.ndarray,
    C: np.ndarray,
    pack,
    work: Workspace | None = None,
) -> np.ndarray:
    """Bring cache rows ``(m, C)`` from the last flush to now, in place; returns the rows that
    lost precision (:func:`lost_precision`).

    ``C ← e^(m − m')·C + exp₂(QA·augᵀ) B`` with ``m'`` the rescaled stabiliser: new
    contributions in, old ones out, guards moved, all in two matrix products over the P packed
    entries, O(rows·P·d). ``QA`` is ``[Q[rows] | ·]`` with a spare column that receives ``−m``,
    so the first product subtracts m itself and turns the logits into base 2
    (``pack.augmented()`` is ``log₂e·[Kp | 1]``: an inner dimension of d+1 costs what d does,
    a pass over the logits does not). ``qnorm``: the rows' query norms; ``qnorm_max``: a bound
    on them. The second product accumulates into C where NumPy's BLAS allows
    (:mod:`dynattn._blas`), else through a temporary. ``work``: scratch for the logits and that
    temporary (the flush's hot loop), else fresh arrays. Rows are rescaled only where
    Cauchy–Schwarz allows a new logit above ``m + SHIFT_SLACK``; elsewhere every exponential
    stays below e^16 and a common factor cancels in N/s and the guards.
    """
    d = QA.shape[1] - 1
    np.negative(m, out=QA[:, d])
    aug = pack.augmented()
    L = np.matmul(
        QA, aug.T, out=work.get("logits", (len(m), len(aug))) if work is not None else None
    )
    new = pack.new
    # one bound for the whole block first: the rows' own bounds cost four passes over them
    if new is not None and qnorm_max * pack.knorm > m.min(initial=math.inf) + SHIFT_SLACK:
        near = np.flatnonzero(qnorm * pack.knorm > m + SHIFT_SLACK)
        if len(near):  # online softmax: rescale only the rows whose maximum moved
            logits = L[near][:, new]
            at = logits.argmax(axis=1)
            top = logits[np.arange(len(near)), at]
            grew, up = near[top > 0], top[top > 0]
            if len(grew):
                rows = C[grew] * np.exp2(-up)[:, None]
                rescaled_guards(rows, pack.views[1][_entries(new, at[top > 0])], pack)
                C[grew] = rows
                m[grew] += up / LOG2E
                L[grew] -= up[:, None]
    np.exp2(L, out=L)
    B = pack.views[1]
    if not add_product(C, L, B):  # where NumPy's BLAS is out of reach: a temporary
        C += np.matmul(L, B, out=work.get("product", C.shape) if work is not None else None)
    return lost_precision(C, d)


def rescaled_guards(C: np.ndarray, top: np.ndarray, pack) -> None:
    """Guards of cache rows ``C`` just rescaled (in place) to the logit of a new entry, whose
    contributions are ``top`` (one row each): that entry's exponential is exactly 1, so it
    errs by nothing, while all the old mass was scaled by one factor that errs by the logit's
    error. The weight that entry adds (``a``, see :class:`Contributions`) moves onto the old
    mass, ``s`` and ``|N|``. O(rows·d); rescaling is rare.
    """
    d, g = pack.contrib.d, pack.contrib.growth
    a = top[:, d + 1] + g  # the entry's guard of s is a − g
    C[:, d + 1] += a * (C[:, d] - 1)
    C[:, d + 2 :] += a[:, None] * (np.abs(C[:, :d]) - np.abs(top[:, :d]))


def _entries(new: slice | np.ndarray, at):
    """Packed entries of positions ``at`` among the new-key entries ``new``."""
    return new.start + at if isinstance(new, slice) else new[at]


def correct_row(q, qnorm: float, m: float, cached: np.ndarray, pack, col: int | None):
    """One cache row brought up to date, or None when its guards say it lost precision.

    The arithmetic of :func:`correct_rows` on one row, with vector operations only: a single
    query is dominated by per-call overhead, not flops (O(P·d)). With ``col`` only ``N[col]``
    and ``s`` of the result are guaranteed (theirs are the guards checked).
    """
    Kp, B, new = pack.views
    # ndarray.dot, not @: the same BLAS gemv without the matmul ufunc's dispatch (0.3 µs of a
    # ~6 µs query)
    L = Kp.dot(q)
    m_new = m
    # rescaling to the new maximum costs a reduction, as much as the exponentials: skipped
    # while Cauchy–Schwarz bounds every new logit by m + SHIFT_SLACK
    if new is not None and qnorm * pack.knorm > m + SHIFT_SLACK:
        at = int(L[new].argmax())
        m_new = max(m, L[new][at])
    L -= m_new
    np.exp(L, out=L)
    row = L.dot(B)
    if m_new != m:
        scaled = cached[None] * math.exp(m - m_new)
        rescaled_guards(scaled, B[_entries(new, at)][None], pack)
        row += scaled[0]
    else:
        row += cached
    d = len(q)
    if not (row[d] > 0 and row[d + 1] <= 0) or not (
        row[d + 2 :].max() <= 0 if col is None else row[d + 2 + col] <= 0
    ):
        return None
    return row
