"""What the engine reports: :class:`FlushEvent` (one flush), :class:`ErrorReport` (the stale
view's error), :class:`QueryRecord` (one exact query, for cost models) and
:class:`FrobeniusNorm`, the scale-free accumulator behind the error reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class ErrorReport(NamedTuple):
    """Error of the stale (cached) output against the exact current output.

    Attributes
    ----------
    relative : float
        ``‖O_stale − O‖_F / ‖O‖_F`` (0 when both are zero).
    max_abs : float
        ``max |O_stale − O|``.
    """

    relative: float
    max_abs: float


class QueryRecord(NamedTuple):
    """One exact query in ``LazyAttention.query_log``.

    Attributes
    ----------
    touched : int
        Touched rows |S| queued when it ran.
    entries : int
        Output entries (or rows) it answered.
    seconds : float
        Its wall time.
    """

    touched: int
    entries: int
    seconds: float


@dataclass(frozen=True)
class FlushEvent:
    """What one flush did.

    Attributes
    ----------
    index : int
        Flush number, from 1.
    at_update : int
        The engine's update counter when the flush ran.
    updates : int
        Pending update actions the flush applied.
    rows : int
        Distinct touched rows |S| (rows of K or V).
    k_rows, v_rows : int
        Touched rows of K and of V.
    flops : float
        Floating-point operations, estimated from the shapes.
    seconds : float
        Wall time of the flush.
    kind : str
        ``"incremental"`` (low-rank correction over S) or ``"rebuild"`` (exact recompute,
        chosen when it is cheaper or asked for).
    repaired : int
        Rows recomputed exactly because the incremental result would have lost precision.
    """

    index: int
    at_update: int
    updates: int
    rows: int
    k_rows: int
    v_rows: int
    flops: float
    seconds: float
    kind: str
    repaired: int


class FrobeniusNorm:
    """A Frobenius norm accumulated block by block, as LAPACK's nrm2 does: the largest
    magnitude so far and the sum of squares relative to it, so tiny or huge entries neither
    underflow to 0 (outputs of 1e-200 would report an infinite relative error) nor overflow.
    """

    def __init__(self):
        self.scale = 0.0  # max |x| so far
        self.ssq = 0.0  # Σ (x / scale)²

    def add(self, x: np.ndarray) -> None:
        big = float(np.abs(x).max()) if x.size else 0.0
        if big == 0.0:
            return
        if big > self.scale:
            self.ssq *= (self.scale / big) ** 2
            self.scale = big
        y = x / self.scale
        self.ssq += float(np.vdot(y, y))

    def __truediv__(self, other: FrobeniusNorm) -> float:
        """``‖self‖ / ‖other‖`` without forming either (inf past the float range)."""
        with np.errstate(over="ignore"):
            return float(np.float64(self.scale) / other.scale * math.sqrt(self.ssq / other.ssq))
