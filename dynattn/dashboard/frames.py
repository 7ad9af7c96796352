"""What a dashboard frame shows, prepared without any plotting library.

A *frame* is the unit of work between two renders: some simulation ticks, the heatmap
window of the lazy and exact matrices, the new time-series rows and the counters. This module
computes all of it from a :class:`~dynattn.simulation.Simulation` with numpy and pandas only,
so it can be unit-tested and timed apart from Panel and HoloViews.

Costs: a window of the weights costs O(rows·(|S| + cols)·d), a window of the output
O(min(n·|S|, rows·(n + |S|))·d) (both independent of the frame's ticks); no image sent to the
browser exceeds ``MAX_SIDE²`` values (larger windows are block-reduced).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

__all__ = [
    "MAX_SIDE",
    "SERIES",
    "STRATEGIES",
    "WINDOWS",
    "Frame",
    "FrameSource",
    "Pacer",
    "Player",
    "Window",
    "block_max",
    "block_mean",
    "fit_clim",
    "output_window",
    "plan_window",
    "weights_window",
]

#: Largest side (in values) of an image sent to the browser; larger windows are block-reduced.
MAX_SIDE = 512
#: Window sides offered for the heatmaps (clipped to n). 2,048 at most: a window's exact
#: weights cost O(side²·d), about 0.1 s at d = 256, and the image shows 512 values a side.
WINDOWS = (16, 32, 64, 128, 256, 512, 1024, 2048)
#: The four maintenance strategies whose cumulative costs the simulation records.
STRATEGIES = {"lazy": "lazy", "eager": "eager", "ondemand": "on demand", "recompute": "recompute"}
#: Tick-record columns kept in the browser-side time series.
SERIES = (
    "tick",
    "rel_error",
    "max_abs_error",
    "pending",
    "flushed",
    "flush_rows",
    *(f"{s}_{unit}" for unit in ("seconds", "flops") for s in STRATEGIES),
)


# ------------------------------------------------------------------------------------------
# Windows and block reduction


def _block_reduce(a: np.ndarray, fr: int, fc: int, op: np.ufunc) -> np.ndarray:
    # Combining strided slices (fc + fr elementwise operations on shrinking arrays) is several
    # times faster than reshaping to 4-D and reducing over the short block axes.
    if fc > 1:
        a = functools.reduce(op, [a[:, k::fc] for k in range(fc)])
    if fr > 1:
        a = functools.reduce(op, [a[k::fr] for k in range(fr)])
    return a


def block_mean(a: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """Means of the non-overlapping ``fr × fc`` blocks of ``a``.

    Parameters
    ----------
    a : ndarray, shape (h, w)
        ``h`` a multiple of ``fr`` and ``w`` a multiple of ``fc``.
    fr, fc : int
        Block height and width (1 keeps that axis).

    Returns
    -------
    ndarray, shape (h // fr, w // fc)
        A new array (also when ``fr = fc = 1``). Cost O(h·w).

    Examples
    --------
    >>> block_mean(np.arange(16.0).reshape(4, 4), 2, 2)
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    if fr == fc == 1:
        return a.copy()
    return _block_reduce(a, fr, fc, np.add) / (fr * fc)


def block_max(a: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """Maxima of the non-overlapping ``fr × fc`` blocks of ``a`` (same contract as
    :func:`block_mean`); used for differences so that one bad entry still shows.

    Examples
    --------
    >>> block_max(np.arange(16.0).reshape(4, 4), 2, 4)
    array([[ 7.],
           [15.]])
    """
    if fr == fc == 1:
        return a.copy()
    return _block_reduce(a, fr, fc, np.maximum)


@dataclass(frozen=True)
class Window:
    """The part of a matrix shown in a heatmap.

    Rows ``r0 .. r0 + rows - 1`` and columns ``c0 .. c0 + cols - 1`` are shown as blocks of
    ``fr × fc`` values; ``rows`` and ``cols`` are multiples of the block sides.
    """

    r0: int
    rows: int
    fr: int
    c0: int
    cols: int
    fc: int

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the image sent to the browser, ``(rows // fr, cols // fc)``."""
        return self.rows // self.fr, self.cols // self.fc

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Image bounds ``(left, bottom, right, top)`` in matrix coordinates: entry ``(i, j)``
        (or the block starting there) is centred near ``x = j``, ``y = i``."""
        return (self.c0 - 0.5, self.r0 - 0.5, self.c0 + self.cols - 0.5, self.r0 + self.rows - 0.5)

    def describe(self, row_name: str, col_name: str) -> str:
        """One line for the page, e.g. ``queries 0–127 × keys 0–127, every value``."""
        text = (
            f"{row_name} {self.r0}–{self.r0 + self.rows - 1} × "
            f"{col_name} {self.c0}–{self.c0 + self.cols - 1}"
        )
        if self.fr == self.fc == 1:
            return text + ", every value shown"
        return (
            text + f", in blocks of {self.fr}×{self.fc} (lazy and exact: block means; "
            "difference: block maxima)"
        )


def plan_window(n_rows: int, n_cols: int, rows: int, cols: int, r0: int = 0, c0: int = 0) -> Window:
    """Fit a requested window into an ``n_rows × n_cols`` matrix and choose its blocks.

    The window is clipped to the matrix, its start moved so that it fits, and each side
    reduced to a multiple of its block side ``ceil(side / MAX_SIDE)`` (dropping at most
    ``block - 1`` trailing rows or columns), so the image is at most ``MAX_SIDE`` per side.

    Examples
    --------
    >>> plan_window(1000, 1000, 2048, 2048)
    Window(r0=0, rows=1000, fr=2, c0=0, cols=1000, fc=2)
    >>> plan_window(300, 8, 128, 8, r0=250)
    Window(r0=172, rows=128, fr=1, c0=0, cols=8, fc=1)
    """
    rows, cols = min(rows, n_rows), min(cols, n_cols)
    fr, fc = -(-rows // MAX_SIDE), -(-cols // MAX_SIDE)
    rows, cols = rows - rows % fr, cols - cols % fc
    r0 = min(max(r0, 0), n_rows - rows)
    c0 = min(max(c0, 0), n_cols - cols)
    return Window(r0, rows, fr, c0, cols, fc)


def _reduced(lazy: np.ndarray, exact: np.ndarray, win: Window) -> dict[str, np.ndarray]:
    """Block means of lazy and exact, block maxima of their difference, as float32."""
    return {
        "lazy": block_mean(lazy, win.fr, win.fc).astype(np.float32),
        "exact": block_mean(exact, win.fr, win.fc).astype(np.float32),
        "diff": block_max(np.abs(lazy - exact), win.fr, win.fc).astype(np.float32),
    }


def weights_window(engine, win: Window, chunk: int = 1 << 20) -> dict[str, np.ndarray]:
    """Lazy and exact attention weights in a window, block-reduced, and their difference.

    Parameters
    ----------
    engine : LazyAttention
    win : Window
    chunk : int
        Largest number of weights formed at once: rows are processed in slices so that a
        large window never allocates an n×n array.

    Returns
    -------
    dict
        ``lazy`` and ``exact`` (block means) and ``diff`` (block maxima of
        ``|lazy − exact|``), float32 arrays of shape ``win.shape``. Cost
        O(win.rows · (|S| + win.cols) · d) for the exact part.
    """
    h, w = win.shape
    out = {k: np.empty((h, w), dtype=np.float32) for k in ("lazy", "exact", "diff")}
    cols = slice(win.c0, win.c0 + win.cols)
    step = win.fr * max(1, chunk // (win.cols * win.fr))
    for start in range(0, win.rows, step):
        stop = min(start + step, win.rows)
        rows = slice(win.r0 + start, win.r0 + stop)
        part = _reduced(engine.weights(rows, cols, stale=True), engine.weights(rows, cols), win)
        blocks = slice(start // win.fr, stop // win.fr)
        for key, values in part.items():
            out[key][blocks] = values
    return out


def exact_output_rows(engine, rows: slice, chunk: int = 1 << 20) -> np.ndarray:
    """Exact output rows ``O[rows]`` at the lower of two costs, not counted as user queries.

    ``engine.output()`` corrects all n rows, O(n·|S|·d); the window's own rows cost
    O(rows·(n + |S|)·d) through their weights (in slices of ``chunk`` weights). Taking the
    cheaper keeps the page's work bounded however many rows are touched.
    """
    n, touched = engine.n, engine.touched_rows
    count = rows.stop - rows.start
    if n * touched <= count * (n + touched):
        return engine.output()[rows]
    step = max(1, chunk // n)
    values = np.asarray(engine.V)
    parts = [
        engine.weights(slice(start, min(start + step, rows.stop))) @ values
        for start in range(rows.start, rows.stop, step)
    ]
    return np.concatenate(parts)


def output_window(engine, win: Window) -> dict[str, np.ndarray]:
    """Lazy and exact output rows in a window, block-reduced, and their difference.

    Parameters
    ----------
    engine : LazyAttention
    win : Window
        Rows of the window; its columns are all ``d`` features.

    Returns
    -------
    dict
        As :func:`weights_window`. Cost O(n·d) for the lazy rows plus
        :func:`exact_output_rows`.
    """
    rows = slice(win.r0, win.r0 + win.rows)
    return _reduced(engine.output(stale=True)[rows], exact_output_rows(engine, rows), win)


def fit_clim(exact: np.ndarray, view: str) -> tuple[float, float]:
    """Shared colour range of the lazy and exact heatmaps, from the exact values.

    Weights are non-negative: ``(0, max)``. Outputs are signed: symmetric about zero so that
    white (in a diverging map) means zero.
    """
    top = float(np.abs(exact).max()) if exact.size else 0.0
    top = top if top > 0 else 1.0  # an all-zero window still needs a valid range
    return (0.0, top) if view == "weights" else (-top, top)


# ------------------------------------------------------------------------------------------
# Frames


@dataclass
class Frame:
    """Everything one frame shows.

    Attributes
    ----------
    records : pandas.DataFrame
        The tick records completed in this frame (columns :data:`SERIES`), possibly empty.
    heat : dict
        Heatmap payload: ``view``, ``bounds`` (of the window), ``lazy``, ``exact``,
        ``diff`` (float32 images), ``clim``, ``dlim`` (colour ranges), ``dmax`` and
        ``window`` (text).
    stats : dict
        Counters for the page (ticks, updates, pending, flushes, threshold, last flush,
        speed-ups, tick time).
    seconds : float
        Wall time of the model work and data preparation of this frame.
    ticks : int
        Simulation ticks completed in this frame.
    """

    records: pd.DataFrame
    heat: dict
    stats: dict
    seconds: float
    ticks: int


def series_rows(records: list[dict]) -> pd.DataFrame:
    """Tick records as the rows of the browser-side time series (columns :data:`SERIES`)."""
    return pd.DataFrame(
        [{c: r[c] for c in SERIES} for r in records], columns=list(SERIES), dtype=float
    )


class FrameSource:
    """Heatmap payloads and counters of one simulation, for one view of it.

    Parameters
    ----------
    sim : Simulation

    Attributes
    ----------
    clim : tuple or None
        Shared colour range of lazy and exact; ``None`` refits it at the next payload (set so
        when the view, the window or the matrices change).
    """

    def __init__(self, sim):
        self.sim = sim
        self.clim: tuple[float, float] | None = None

    def window(self, view: str, side: int, row0: int, col0: int) -> Window:
        """The window shown for ``view`` ("weights" or "output") at the requested place."""
        eng = self.sim.engine
        if view == "weights":
            return plan_window(eng.n, eng.n, side, side, row0, col0)
        return plan_window(eng.n, eng.d, side, eng.d, row0, 0)

    def heat(self, view: str, win: Window) -> dict:
        """The heatmap payload of ``win`` (see :attr:`Frame.heat`)."""
        eng = self.sim.engine
        data = (weights_window if view == "weights" else output_window)(eng, win)
        if self.clim is None:
            self.clim = fit_clim(data["exact"], view)
        # Below a few hundred ulps of the values, a difference is rounding, not staleness:
        # keep such differences near white instead of stretching them over the colour map.
        floor = 64 * np.finfo(eng.dtype).eps * max(abs(self.clim[0]), abs(self.clim[1]))
        dmax = float(data["diff"].max()) if data["diff"].size else 0.0
        col_name = "keys" if view == "weights" else "features"
        return {
            "view": view,
            "bounds": win.bounds,
            **data,
            "clim": self.clim,
            "dlim": (0.0, max(dmax, floor)),
            "dmax": dmax,
            "window": f"**Window:** {win.describe('queries', col_name)} "
            f"(n = {eng.n:,}, d = {eng.d}). Largest difference: {dmax:.3g}.",
        }

    def stats(self, tick_seconds: float | None, render_ms: float | None) -> dict:
        """Counters of the page; ``tick_seconds`` is the model time of the last tick."""
        eng, sim = self.sim.engine, self.sim
        last = eng.last_flush
        tail = sim.timeline.tail(1)
        cost = {s: float(tail[f"{s}_seconds"][0]) if len(tail["tick"]) else 0.0 for s in STRATEGIES}
        speedup = {
            s: cost[s] / cost["lazy"] if cost["lazy"] > 0 else None
            for s in ("eager", "ondemand", "recompute")
        }
        return {
            "ticks": sim.tick,
            "updates": eng.n_updates,
            "pending": eng.pending,
            "touched_rows": eng.touched_rows,
            "flushes": eng.n_flushes,
            "threshold": eng.threshold,
            "queries": eng.n_queries,
            "last_flush": None
            if last is None
            else {"rows": last.rows, "seconds": last.seconds, "flops": last.flops},
            "speedup": speedup,
            "tick_ms": None if tick_seconds is None else 1e3 * tick_seconds,
            "render_ms": render_ms,
        }


class Pacer:
    """Plans a frame's work from measured costs, so that no frame outlasts its budget.

    Before each piece of work (a tick's next part, a heatmap payload) the frame asks whether
    its measured cost still fits in the time left; a tick too large for one frame is split
    into parts (:meth:`~dynattn.simulation.Simulation.tick_parts`), its eager baseline in
    chunks of :meth:`eager_chunk` actions.

    Parameters
    ----------
    budget : float
        Seconds of work per frame (clicks are answered between frames).
    """

    def __init__(self, budget: float = 0.2):
        self.budget = budget
        self.part_seconds = 0.0  # the dearest tick part seen lately (decays)
        self.eager_action_seconds = 0.0  # per update action of the eager baseline
        self.heat_seconds = 0.0
        self.tick_seconds: float | None = None  # model time of the last whole tick
        self._deadline = 0.0

    def start(self) -> None:
        """Open a frame: its budget starts now."""
        self._deadline = time.perf_counter() + self.budget

    def left(self) -> float:
        """Seconds left in the current frame (negative when over)."""
        return self._deadline - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        """Whether work measured at ``seconds`` fits in what is left of the frame."""
        return seconds <= self.left()

    def eager_chunk(self) -> int:
        """Eager update actions that fit in the time left (at least one, so work advances)."""
        per = self.eager_action_seconds
        if per <= 0:
            return 16  # not measured yet: a small first chunk measures it
        return max(1, int(max(self.left(), 0.25 * self.budget) / per))

    def record_part(self, seconds: float, eager_actions: int = 0) -> None:
        """Learn from a finished part (``eager_actions`` > 0 for a chunk of the eager baseline)."""
        if eager_actions:
            per = seconds / eager_actions
            old = self.eager_action_seconds
            self.eager_action_seconds = per if old == 0 else 0.7 * old + 0.3 * per
        else:
            self.part_seconds = max(seconds, 0.9 * self.part_seconds)

    def forget(self) -> None:
        """Settings changed: costs are measured again."""
        self.part_seconds = self.eager_action_seconds = self.heat_seconds = 0.0
        self.tick_seconds = None


class Player:
    """Runs a simulation's ticks for a dashboard: whole ticks on request, or as much of them
    as fits a frame's budget (a tick too large for one frame stays *in flight*, a
    :meth:`~dynattn.simulation.Simulation.tick_parts` generator resumed by the next frame).

    Parameters
    ----------
    sim : Simulation
    pacer : Pacer
    """

    def __init__(self, sim, pacer: Pacer):
        self.sim = sim
        self.pacer = pacer
        self.tick = None  # the tick in flight, if any
        self._blas = ThreadpoolController()

    def limited(self, threads: int | None):
        """Context manager: at most ``threads`` BLAS threads (None: the library default)."""
        return self._blas.limit(limits=threads, user_api="blas")

    def whole(self, ticks: int, threads: int | None) -> list[dict]:
        """Records of ``ticks`` complete ticks (a tick in flight is finished first and counts),
        with at most ``threads`` BLAS threads."""
        with self.limited(threads):
            records = self.finish() if ticks else []
            records += [self.sim.step() for _ in range(ticks - len(records))]
        return records

    def bounded(self, ticks: int, budget: float, threads: int | None) -> list[dict]:
        """Records of the (at most ``ticks``) ticks completed within about ``budget`` seconds:
        before each tick and each part, its measured cost must fit in what is left."""
        pacer, records = self.pacer, []
        pacer.budget = budget
        pacer.start()
        with self.limited(threads):
            while len(records) < ticks:
                if self.tick is None:
                    if records and not pacer.fits(pacer.tick_seconds or 0.0):
                        break
                    self.tick = self.sim.tick_parts(pacer.eager_chunk)
                started = time.perf_counter()
                try:
                    _, actions = next(self.tick)
                except StopIteration as done:
                    self.tick = None
                    if done.value is not None:
                        records.append(done.value)
                        pacer.tick_seconds = done.value["tick_seconds"]
                    continue
                pacer.record_part(time.perf_counter() - started, actions)
                if not pacer.fits(pacer.part_seconds):
                    break
        return records

    def finish(self) -> list[dict]:
        """Complete the tick in flight; its record (none if it was abandoned or absent)."""
        tick, self.tick = self.tick, None
        while tick is not None:
            try:
                next(tick)
            except StopIteration as done:
                return [] if done.value is None else [done.value]
        return []

    def restart(self) -> None:
        """The simulation was rebuilt or reset: drop the tick in flight, measure costs anew."""
        self.tick = None
        self.pacer.forget()
