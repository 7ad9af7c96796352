"""Magnitude limits of one engine (:class:`EntryLimits`): the largest entries of K and V it
accepts, so that every number its kernels compute stays finite.

Finite inputs could still overflow inside: ``Q·1e160`` squared its logits past the largest
float, a V entry of 1e308 summed over keys to inf. So each engine derives limits from what its
kernels compute (F the largest finite number of the dtype, u its unit roundoff):

* logits and stabilisers: ``|x|, |m| ≤ scale·|q|·|k| ≤ X = 1/(8u)`` (Cauchy–Schwarz), 1.1e15
  in float64 and 2.1e6 in float32. The same logit computed by two different products (a
  row's stabiliser, then a query's logits) may differ by about u·|x|; below X that stays a
  fraction of one, so no exponential meant to be at most e^16 can overflow (past it the logits
  have no correct digit before the point, in any dense computation either). Hence
  ``scale·|q| ≤ X`` for every query row
  (checked once: Q never changes) and every K entry ``≤ X / (scale·max(|q|max, 1)·√d)``, so
  that ``scale·|k| ≤ X`` as well (keys are packed pre-multiplied by the scale).
* sums: exponentials stay below ``e^16`` (rows are rescaled beyond), so ``s ≤ n·e^16`` and
  ``|N| ≤ n·e^16·max|v|``; the guards add removed mass weighted by at most ``1 + 2X + g``
  (:class:`~dynattn.engine.kernels.Contributions`). Hence every V entry
  ``≤ F / (8·(2 + g + 2X)·n·e^16)``: 1e285/n in float64, 1e24/n in float32.

Entry limits rather than row norms keep the single-entry update at one comparison (the range
check it makes anyway). Costs: construction O((m + n)·d), a check O(1) an entry, O(d) a row.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels import SHIFT_SLACK


class EntryLimits:
    """The largest ``|K[i, j]|`` (``k``) and ``|V[i, j]|`` (``v``) an engine accepts.

    Parameters
    ----------
    qnorm_max : float
        Largest query norm (inf if it overflowed).
    scale : float
    n, d : int
        Keys and head dimension.
    dtype : numpy dtype
    growth : float
        The guards' g (:data:`~dynattn.engine.kernels.GROWTH`).

    Raises
    ------
    ValueError
        Naming Q when ``scale·|q|`` exceeds the logit limit.
    """

    def __init__(self, qnorm_max: float, scale: float, n: int, d: int, dtype, growth: float):
        top = float(np.finfo(dtype).max)
        self.logit = logit = 0.25 / float(np.finfo(dtype).eps)
        scale = abs(scale)
        if not scale * qnorm_max <= logit:
            raise ValueError(
                f"Q has a row of norm {qnorm_max:.4g}: scale·|q| = {scale * qnorm_max:.4g} "
                f"exceeds this engine's logit limit {logit:.3g} (in {np.dtype(dtype)}); "
                "its logits could overflow"
            )
        self.k = logit / (scale * max(qnorm_max, 1.0) * math.sqrt(d))
        self.v = top / (8 * (2 + growth + 2 * logit) * n * math.exp(SHIFT_SLACK))
        # squares for a one-pass test; where a limit's square would overflow, a finite sum of
        # squares already bounds every entry by √F, below it
        self.squares = {w: min(x * x, top) for w, x in (("K", self.k), ("V", self.v))}

    def check(self, name: str, which: str, arr: np.ndarray) -> None:
        """Raise a ValueError naming ``name`` when an entry of ``arr`` (new values of K or V,
        as ``which`` says) exceeds its limit; O(arr.size)."""
        k = self._first_beyond(which, arr)
        if k is not None:
            where = [int(x) for x in np.unravel_index(k, arr.shape)]
            self._refuse(f"{name}{where} = {float(arr.reshape(-1)[k])!r}", which)

    def check_sums(self, which: str, flat: np.ndarray, final: np.ndarray, d: int) -> None:
        """As :meth:`check` for a batch of entry updates: ``final`` are the new values of the
        entries at ``flat`` (positions in a C-contiguous (n, d) K or V)."""
        k = self._first_beyond(which, final)
        if k is not None:
            entry = f"{which}[{int(flat[k]) // d}, {int(flat[k]) % d}]"
            self._refuse(f"deltas would make {entry} = {float(final[k])!r}, which", which)

    def _first_beyond(self, which: str, arr: np.ndarray) -> int | None:
        """Flat index of the first entry of ``arr`` beyond the limit, or None: one dot product
        when all are far below it (a sum of squares under the limit's square bounds each)."""
        flat = arr.reshape(-1)
        if np.vdot(flat, flat) <= self.squares[which]:
            return None
        limit = self.k if which == "K" else self.v
        big = np.abs(flat) > limit
        return int(np.argmax(big)) if big.any() else None

    def _refuse(self, what: str, which: str):
        limit = self.k if which == "K" else self.v
        raise ValueError(
            f"{what} exceeds this engine's limit for {which} entries, ±{limit:.4g} "
            "(larger values could overflow its sums)"
        )
