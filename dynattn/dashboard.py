"""Live dashboard: watch a lazy attention engine drift from the exact answer and catch up.

One :class:`Dashboard` drives one :class:`~dynattn.simulation.Simulation` (a browser session, or
a notebook cell). Each *frame* runs a few simulation ticks and then renders once:

* :meth:`Dashboard.advance` does the model work and prepares every number the page shows
  (heatmap windows, new time-series rows, counters) without touching a plot, so it can be
  timed on its own;
* :meth:`Dashboard.render` pushes that data into HoloViews streams (one ``Pipe`` for the three
  heatmaps, one bounded ``Buffer`` for the time series) inside a single ``pn.io.hold()``, so
  the browser receives one batch of changes per frame and no plot is ever rebuilt per tick.

The heatmaps compare the *lazy* view (what the caches say, as of the last flush) with the
*exact* attention, for the weights ``P = softmax(scale·QKᵀ)`` or the output ``O = PV``.
Windows larger than :data:`MAX_SIDE` are shown as block averages (the difference as block
maxima, so no error is averaged away): no frame carries more than ``MAX_SIDE²`` values per
image.

Run it with ``panel serve app.py`` or show ``Dashboard()`` in a notebook after
``pn.extension()``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
from dataclasses import dataclass

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the Bokeh renderer, prints nothing)
import numpy as np
import pandas as pd
import panel as pn
import param
from threadpoolctl import ThreadpoolController

from .simulation import REBUILD_PARAMS, Simulation, SimulationConfig

__all__ = ["MAX_SIDE", "Dashboard", "Frame", "Window", "block_max", "block_mean", "plan_window"]

#: Largest side (in values) of an image sent to the browser; larger windows are block-reduced.
MAX_SIDE = 512
#: Seconds of model work per frame above which playing pauses itself.
SLOW_FRAME = 2.0
#: Window sides offered for the heatmaps (clipped to n).
WINDOWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: Error-budget tolerances offered by the tolerance slider (a log scale in discrete steps).
TOLERANCES = tuple(10.0**e for e in range(-8, 1))
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
#: Simulation settings shown as controls, in the order of the sidebar.
SIM_CONTROLS = (
    "policy",
    "threshold",
    "tolerance",
    "updates_per_tick",
    "queries_per_tick",
    "stream",
    "preset",
    "n",
    "d",
    "scale",
    "seed",
    "k_share",
    "delta_scale",
    "dtype",
)

_POLICY_NOTES = {
    "cost": "Picks the threshold itself from the measured costs of flushes and queries "
    "(current value in the counters).",
    "fixed": "Flushes whenever this many updates are pending (1 = eager).",
    "adaptive": "The original prototype's rule: the threshold follows the recent batch sizes "
    "(between 10 and 100).",
    "error": "Flushes before the estimated relative error of the caches exceeds ε.",
}
_VIEWS = {"attention weights P": "weights", "output O = PV": "output"}
_KDIMS = {
    "weights": (hv.Dimension("key", label="key j"), hv.Dimension("query", label="query i")),
    "output": (hv.Dimension("feature", label="feature c"), hv.Dimension("query", label="query i")),
}
# Value dimensions of each heatmap: its own value first (coloured), the others for the hover.
_ROLES = {
    "lazy": ("lazy", "exact", "diff"),
    "exact": ("exact", "lazy", "diff"),
    "diff": ("diff", "lazy", "exact"),
}
_VALUE_LABELS = {"lazy": "lazy (stale)", "exact": "exact", "diff": "|lazy − exact|"}
_TITLES = {
    "lazy": "Lazy: what the caches say",
    "exact": "Exact: the true values",
    "diff": "Difference |lazy − exact|",
}
_CMAPS = {"weights": "viridis", "output": "coolwarm", "diff": "Reds"}
_HEAT_SIZE = (330, 270)  # pixels per heatmap: three fit beside the sidebar at 1366 wide
_SERIES_OPTS = {
    "width": 330,
    "height": 220,
    "legend_position": "top_left",
    "show_grid": True,
    "legend_opts": {
        "background_fill_alpha": 0.6,
        "label_text_font_size": "8pt",
        "spacing": 0,
        "padding": 4,
        "glyph_height": 12,
    },
}


# ------------------------------------------------------------------------------------------
# Windows and block reduction (pure numpy, no plotting)


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
        lazy = engine.weights(rows, cols, stale=True)
        exact = engine.weights(rows, cols)
        blocks = slice(start // win.fr, stop // win.fr)
        out["lazy"][blocks] = block_mean(lazy, win.fr, win.fc)
        out["exact"][blocks] = block_mean(exact, win.fr, win.fc)
        out["diff"][blocks] = block_max(np.abs(lazy - exact), win.fr, win.fc)
    return out


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
        As :func:`weights_window`. Cost O(n · |S| · d): the engine forms the whole exact
        output (without counting it as user queries).
    """
    rows = slice(win.r0, win.r0 + win.rows)
    lazy = engine.output(stale=True)[rows]
    exact = engine.output()[rows]
    return {
        "lazy": block_mean(lazy, win.fr, win.fc).astype(np.float32),
        "exact": block_mean(exact, win.fr, win.fc).astype(np.float32),
        "diff": block_max(np.abs(lazy - exact), win.fr, win.fc).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------
# Plot builders. Module-level functions (not methods) on purpose: a DynamicMap keeps its
# callback alive, and a bound method would tie every stream to the Dashboard (panel#8580).


def heat_image(data: dict, role: str) -> hv.Image:
    """The heatmap of one ``role`` from a frame's heat payload.

    Parameters
    ----------
    data : dict
        A :attr:`Frame.heat` payload.
    role : {"lazy", "exact", "diff"}
        Which value is coloured; the image also carries the other two, so that hovering any
        heatmap shows lazy, exact and their difference.

    Returns
    -------
    holoviews.Image
        Key dimensions ``key``/``feature`` (x) and ``query`` (y) in matrix coordinates. The
        colour range comes from the payload: ``clim``, shared by lazy and exact so that
        equal colours mean equal values, or ``dlim`` for the difference.
    """
    names = _ROLES[role]
    vdims = [hv.Dimension(name, label=_VALUE_LABELS[name]) for name in names]
    vdims[0] = vdims[0].clone(range=tuple(data["dlim" if role == "diff" else "clim"]))
    # An image array's first row is drawn at the top bound (largest y); the plot's y axis is
    # inverted so that query 0 is at the top, hence the flip. One stacked array with bounds
    # builds several times faster than coordinate arrays, which are checked for regularity.
    stacked = np.dstack([data[name][::-1] for name in names])
    return hv.Image(
        stacked,
        bounds=data["bounds"],
        kdims=list(_KDIMS[data["view"]]),
        vdims=vdims,
        label=_TITLES[role],
    )


def _positive(values: pd.Series) -> np.ndarray:
    """Values with zeros replaced by NaN, for a log axis (an exact answer has error 0)."""
    arr = values.to_numpy(dtype=float)
    return np.where(arr > 0, arr, np.nan)


def error_plot(data: pd.DataFrame, log: bool) -> hv.Overlay:
    """Error of the lazy (stale) output over ticks, every flush marked by a vertical line.

    Parameters
    ----------
    data : pandas.DataFrame
        Tick records with the columns :data:`SERIES`.
    log : bool
        For a log axis: errors of 0 (exact ticks) become NaN, gaps in the curves.

    Returns
    -------
    holoviews.Overlay
        Curves of ``rel_error`` (relative Frobenius) and ``max_abs_error``, and ``VLines``.
    """
    layers = []
    for col, label, color in (
        ("rel_error", "relative (Frobenius)", "#1f77b4"),
        ("max_abs_error", "max abs", "#d62728"),
    ):
        values = _positive(data[col]) if log else data[col].to_numpy(dtype=float)
        points = (data["tick"].to_numpy(), values)
        error = hv.Dimension("error", label="error")
        # Markers too: on a log axis a nonzero tick between two exact ones has no line.
        layers += [
            hv.Curve(points, "tick", error, label=label).opts(color=color, backend="bokeh"),
            hv.Scatter(points, "tick", error, label=label).opts(
                color=color, size=3, backend="bokeh"
            ),
        ]
    flushes = hv.VLines(data.loc[data["flushed"] > 0, "tick"].to_numpy(), kdims=["tick"])
    flushes = flushes.opts(color="#888888", alpha=0.35, line_width=1, backend="bokeh")
    return hv.Overlay([*layers, flushes])


def pending_plot(data: pd.DataFrame) -> hv.Overlay:
    """Pending updates and flushes over ticks.

    Parameters
    ----------
    data : pandas.DataFrame
        Tick records with the columns :data:`SERIES`.

    Returns
    -------
    holoviews.Overlay
        The pending count (a sawtooth: it grows each tick and drops at a flush) and one spike
        per flushing tick, as tall as the number of rows recomputed.
    """
    flushed = data.loc[data["flushed"] > 0]
    pending = hv.Curve(data, "tick", hv.Dimension("pending", label="count"), label="pending").opts(
        interpolation="steps-post", backend="bokeh"
    )
    spikes = hv.Spikes(
        flushed, "tick", hv.Dimension("flush_rows", label="count"), label="flush (rows)"
    )
    return pending * spikes


def cost_plot(data: pd.DataFrame, unit: str, log: bool) -> hv.NdOverlay:
    """Cumulative cost of the four strategies over ticks.

    Parameters
    ----------
    data : pandas.DataFrame
        Tick records with the columns :data:`SERIES`.
    unit : {"seconds", "flops"}
    log : bool
        For a log axis: zero costs become NaN.

    Returns
    -------
    holoviews.NdOverlay
        One curve per strategy (:data:`STRATEGIES`), keyed by ``strategy``.
    """
    tick = data["tick"].to_numpy()
    curves = {}
    for key, label in STRATEGIES.items():
        col = data[f"{key}_{unit}"]
        values = _positive(col) if log else col.to_numpy(dtype=float)
        curves[label] = hv.Curve(
            (tick, values), "tick", hv.Dimension("cost", label=f"cumulative {unit}")
        )
    return hv.NdOverlay(curves, kdims="strategy")


# ------------------------------------------------------------------------------------------
# The dashboard


@dataclass
class Frame:
    """Everything one frame shows, prepared by :meth:`Dashboard.advance`.

    Attributes
    ----------
    records : pandas.DataFrame
        The tick records produced in this frame (columns :data:`SERIES`), possibly empty.
    heat : dict
        Heatmap payload: ``view``, ``bounds`` (of the window), ``lazy``, ``exact``,
        ``diff`` (float32 images), ``clim``, ``dlim`` (colour ranges) and ``window`` (text).
    stats : dict
        Counters for the page (ticks, updates, pending, flushes, threshold, last flush,
        speed-ups, tick time).
    seconds : float
        Wall time of the model work and data preparation of this frame.
    ticks : int
        Simulation ticks run in this frame.
    """

    records: pd.DataFrame
    heat: dict
    stats: dict
    seconds: float
    ticks: int


class Dashboard(pn.viewable.Viewer):
    """Interactive view of a :class:`~dynattn.simulation.Simulation`.

    Parameters
    ----------
    simulation : Simulation, optional
        The simulation to drive; if omitted, a new one with default settings except the
        ``local`` preset (banded attention). Every browser session builds its own Dashboard,
        hence its own simulation.
    points : int
        Ticks kept in the browser-side time series (older points scroll out).
    **params
        Initial values of the view parameters below (``view``, ``window``, ...).

    Notes
    -----
    The simulation controls edit a private copy of the simulation's configuration (``form``);
    each change is then applied to the simulation inside a ``try``, so a setting the
    simulation rejects leaves it untouched, resets the control and explains why on the page.
    """

    view = param.Selector(
        default="weights",
        objects=_VIEWS,
        doc="""
        Matrix shown in the heatmaps: the attention weights P or the output O = PV.""",
    )
    window = param.Selector(
        default=128,
        objects=list(WINDOWS),
        doc="""
        Side of the heatmap window in rows and columns (clipped to n; above 512 the
        window is shown in blocks).""",
    )
    row0 = param.Integer(
        default=0,
        bounds=(0, 1),
        label="first query row",
        doc="""
        First row (query) of the heatmap window.""",
    )
    col0 = param.Integer(
        default=0,
        bounds=(0, 1),
        label="first key column",
        doc="""
        First column (key) of the heatmap window (weights view only).""",
    )
    playing = param.Boolean(
        default=False,
        doc="""
        Whether frames run periodically (``Dashboard(playing=True)`` starts playing).""",
    )
    ticks_per_frame = param.Integer(
        default=1,
        bounds=(1, 64),
        doc="""
        Simulation ticks per frame; the page is rendered once per frame.""",
    )
    period = param.Integer(
        default=250,
        bounds=(50, 2000),
        label="frame period (ms)",
        doc="""
        Time between frames while playing.""",
    )
    log_error = param.Boolean(
        default=True,
        label="log scale",
        doc="""
        Logarithmic error axis (errors span many orders of magnitude).""",
    )
    cost_unit = param.Selector(
        default="seconds",
        objects=["seconds", "flops"],
        doc="""
        Unit of the cumulative cost plot.""",
    )
    log_cost = param.Boolean(
        default=True,
        label="log scale",
        doc="""
        Logarithmic cost axis (a full recompute costs orders of magnitude more).""",
    )
    blas_threads = param.Integer(
        default=1,
        bounds=(1, None),
        allow_None=True,
        doc="""
        BLAS threads used by a frame's model work (None: leave the library default). One
        thread by default: a dashboard's matrices are small, a server runs several sessions,
        and idle BLAS threads busy-waiting for work slowed a tick more than tenfold on a
        loaded two-core machine.""",
    )

    def __init__(self, simulation: Simulation | None = None, points: int = 2000, **params):
        super().__init__(**params)
        # Banded ("local") attention shows at a glance that a changed key changes a column
        # of P only where queries attend to it.
        self.sim = simulation if simulation is not None else Simulation(preset="local")
        values = self.sim.config.param.values()
        self.form = SimulationConfig(**{k: values[k] for k in SIM_CONTROLS})
        self._syncing = False
        self._blas = ThreadpoolController()
        self._clim: tuple[float, float] | None = None  # refitted when the view changes
        self.last_frame: Frame | None = None
        self._render_ms: float | None = None
        self._series = hv.streams.Buffer(
            pd.DataFrame({c: np.zeros(0) for c in SERIES}), length=points, index=False
        )
        self._heat_pipe: hv.streams.Pipe | None = None
        self._heatmaps: dict[str, hv.DynamicMap] = {}
        self._build_widgets()
        self._build_panes()
        self._layout = self._build_layout()
        self._callback = pn.state.add_periodic_callback(
            self._on_frame, period=self.period, start=False
        )
        self._session = pn.state.curdoc.session_context if pn.state.curdoc else None
        if self._session is not None:  # outside a server there is no session to clean up
            pn.state.on_session_destroyed(self._on_session_destroyed)
        self.form.param.watch(self._apply_config, list(SIM_CONTROLS))
        self.form.param.watch(self._show_policy_controls, "policy")
        self._show_policy_controls()
        self._fit_window_controls()
        self._rebuild_heatmaps()
        self._on_play()  # Dashboard(playing=True) starts at once (e.g. a classroom display)

    # -------------------------------------------------------------------- public API
    def advance(self, ticks: int | None = None) -> Frame:
        """Run ``ticks`` simulation ticks (default ``ticks_per_frame``) and prepare the frame.

        Nothing is rendered: this is the whole per-frame cost on the Python side, so a
        benchmark can time it (``frame.seconds``).

        Returns
        -------
        Frame
        """
        ticks = self.ticks_per_frame if ticks is None else ticks
        t0 = time.perf_counter()
        with self._blas.limit(limits=self.blas_threads, user_api="blas"):
            records = [self.sim.step() for _ in range(ticks)]
            heat = self._heat_payload()
        rows = pd.DataFrame(
            [{c: r[c] for c in SERIES} for r in records], columns=list(SERIES), dtype=float
        )
        seconds = time.perf_counter() - t0
        frame = Frame(rows, heat, self._stats(seconds, ticks), seconds, ticks)
        self.last_frame = frame
        return frame

    def render(self, frame: Frame) -> None:
        """Push a prepared frame to the plots and counters, in one batch of browser updates."""
        t0 = time.perf_counter()
        doc = pn.state.curdoc
        # Every HoloViews plot update freezes the Bokeh document and, on unfreezing, walks the
        # whole model graph again; one outer freeze makes that one walk per frame, not six.
        freeze = doc.models.freeze() if doc is not None else contextlib.nullcontext()
        with pn.io.hold(), freeze:
            if len(frame.records):
                self._series.send(frame.records)
            self._heat_pipe.send(frame.heat)
            self._window_text.object = frame.heat["window"]
            self._show_stats(frame.stats)
        # shown with the next frame: the Python side of rendering (HoloViews and Bokeh)
        self._render_ms = 1e3 * (time.perf_counter() - t0)

    def step(self, ticks: int | None = None) -> Frame:
        """Advance and render one frame; returns it."""
        frame = self.advance(ticks)
        self.render(frame)
        return frame

    @property
    def heatmaps(self) -> dict[str, hv.DynamicMap]:
        """The three heatmaps, ``{"lazy", "exact", "diff"}`` -> DynamicMap; ``dmap[()]`` is the
        current image (kdims ``key``/``feature`` and ``query``, vdims as in the hover)."""
        return dict(self._heatmaps)

    @property
    def series(self) -> hv.streams.Buffer:
        """The bounded buffer of tick records (columns :data:`SERIES`) behind the time
        series."""
        return self._series

    def template(self) -> pn.template.BootstrapTemplate:
        """The dashboard in a page template (for ``panel serve``); all resources are local."""
        return pn.template.BootstrapTemplate(
            title="dynattn · lazy dynamic attention, live",
            sidebar=[self._sidebar],
            main=[self._main],
            sidebar_width=280,
        )

    def __panel__(self):
        return self._layout

    # ------------------------------------------------------------------ data for a frame
    def _current_window(self) -> Window:
        eng = self.sim.engine
        if self.view == "weights":
            return plan_window(eng.n, eng.n, self.window, self.window, self.row0, self.col0)
        return plan_window(eng.n, eng.d, self.window, eng.d, self.row0, 0)

    def _heat_payload(self) -> dict:
        eng = self.sim.engine
        win = self._current_window()
        fetch = weights_window if self.view == "weights" else output_window
        data = fetch(eng, win)
        if self._clim is None:
            self._clim = _fit_clim(data["exact"], self.view)
        # Below a few hundred ulps of the values, a difference is rounding, not staleness:
        # keep such differences near white instead of stretching them over the colour map.
        floor = 64 * np.finfo(eng.dtype).eps * max(abs(self._clim[0]), abs(self._clim[1]))
        dmax = float(data["diff"].max()) if data["diff"].size else 0.0
        col_name = "keys" if self.view == "weights" else "features"
        return {
            "view": self.view,
            "bounds": win.bounds,
            **data,
            "clim": self._clim,
            "dlim": (0.0, max(dmax, floor)),
            "dmax": dmax,
            "window": f"**Window:** {win.describe('queries', col_name)} "
            f"(n = {eng.n}, d = {eng.d}). Largest difference: {dmax:.3g}.",
        }

    def _stats(self, seconds: float, ticks: int) -> dict:
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
            else {
                "rows": last.rows,
                "seconds": last.seconds,
                "flops": last.flops,
                "kind": last.kind,
            },
            "speedup": speedup,
            "tick_ms": 1e3 * seconds / max(ticks, 1) if ticks else None,
            "render_ms": self._render_ms,
        }

    # ------------------------------------------------------------------ widgets & layout
    def _build_widgets(self) -> None:
        form = self.form
        self.play_toggle = pn.widgets.Toggle.from_param(
            self.param.playing, label="▶ Play", color="success"
        )
        self.step_button = pn.widgets.Button(label="Step one tick")
        self.flush_button = pn.widgets.Button(label="Flush now", color="warning")
        self.reset_button = pn.widgets.Button(label="Reset", color="danger")
        self.step_button.on_click(self._on_step)
        self.flush_button.on_click(self._on_flush)
        self.reset_button.on_click(self._on_reset)
        self.param.watch(self._on_play, "playing")
        self.param.watch(self._on_period, "period")
        self.param.watch(self._on_view_change, ["view", "window", "row0", "col0"])

        w = pn.widgets
        self.controls = {
            "policy": w.RadioButtonGroup.from_param(
                form.param.policy, color="primary", variant="outline"
            ),
            "threshold": w.IntSlider.from_param(
                form.param.threshold, label="threshold (pending updates)"
            ),
            "tolerance": w.DiscreteSlider.from_param(
                form.param.tolerance, options=list(TOLERANCES), label="tolerance ε (relative error)"
            ),
            "updates_per_tick": w.IntSlider.from_param(
                form.param.updates_per_tick, label="updates per tick"
            ),
            "queries_per_tick": w.IntSlider.from_param(
                form.param.queries_per_tick, label="queries per tick"
            ),
            "stream": w.Select.from_param(form.param.stream, label="update stream"),
            "preset": w.Select.from_param(form.param.preset, label="Q, K, V preset"),
            # Size changes rebuild everything: apply them only when the slider is released.
            "n": w.IntSlider.from_param(form.param.n, label="n (sequence length)", throttled=True),
            "d": w.IntSlider.from_param(form.param.d, label="d (head dimension)", throttled=True),
            "scale": w.Select.from_param(form.param.scale, label="logit scale"),
            "seed": w.IntInput.from_param(form.param.seed, label="seed"),
            "k_share": w.FloatSlider.from_param(form.param.k_share, label="share of updates to K"),
            "delta_scale": w.FloatInput.from_param(
                form.param.delta_scale, label="update size (std of δ)"
            ),
            "dtype": w.Select.from_param(form.param.dtype, label="precision"),
        }
        self._policy_note = pn.pane.Markdown("", margin=(0, 10))
        self.file_input = w.FileInput(accept=".npz", multiple=False)
        self.file_input.param.watch(self._on_file, "value")
        self.download = w.FileDownload(
            callback=self._timeline_csv,
            filename="dynattn_timeline.csv",
            label="Download timeline (CSV)",
            color="primary",
        )
        self.view_buttons = w.RadioButtonGroup.from_param(
            self.param.view, variant="outline", color="primary"
        )
        self.window_select = w.Select.from_param(self.param.window, label="window", width=90)
        self.row_slider = w.IntSlider.from_param(self.param.row0, width=200)
        self.col_slider = w.IntSlider.from_param(self.param.col0, width=200)
        self.alert = pn.pane.Alert(
            "", alert_type="danger", visible=False, sizing_mode="stretch_width", margin=(5, 10)
        )
        self._window_text = pn.pane.Markdown("", margin=(0, 10), sizing_mode="stretch_width")
        self._counters = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10))
        self.speedups = {
            key: pn.indicators.Number(
                label=f"vs {STRATEGIES[key]}",
                value=0.0,
                format="{value:.1f}×",
                font_size="22pt",
                title_size="10pt",
                colors=[(1.0, "#b2182b"), (math.inf, "#1a7837")],
                margin=(0, 12),
            )
            for key in ("eager", "ondemand", "recompute")
        }

    def _build_panes(self) -> None:
        self._heat_pane = pn.pane.HoloViews(backend="bokeh", margin=0)
        self._error_pane = pn.pane.HoloViews(self._error_dmap(), backend="bokeh", margin=0)
        self._pending_pane = pn.pane.HoloViews(
            hv.DynamicMap(pending_plot, streams=[self._series]).opts(
                {
                    "Curve": {"color": "#2166ac", "tools": ["hover"]},
                    "Spikes": {"color": "#d6604d", "line_width": 2, "tools": ["hover"]},
                    "Overlay": {"title": "Pending updates and flushes", **_SERIES_OPTS},
                },
                backend="bokeh",
            ),
            backend="bokeh",
            margin=0,
        )
        self._cost_pane = pn.pane.HoloViews(self._cost_dmap(), backend="bokeh", margin=0)
        self.param.watch(self._on_error_axis, "log_error")
        self.param.watch(self._on_cost_axis, ["cost_unit", "log_cost"])

    def _error_dmap(self) -> hv.DynamicMap:
        return hv.DynamicMap(
            functools.partial(error_plot, log=self.log_error), streams=[self._series]
        ).opts(
            {
                "Scatter": {"tools": ["hover"]},
                "Overlay": {
                    "logy": self.log_error,
                    **_SERIES_OPTS,
                    "title": "Lazy output error (grey = flush)",
                },
            },
            backend="bokeh",
        )

    def _cost_dmap(self) -> hv.DynamicMap:
        return hv.DynamicMap(
            functools.partial(cost_plot, unit=self.cost_unit, log=self.log_cost),
            streams=[self._series],
        ).opts(
            {
                "Curve": {"tools": ["hover"]},
                "NdOverlay": {
                    "logy": self.log_cost,
                    **_SERIES_OPTS,
                    "title": f"Cumulative cost ({self.cost_unit})",
                },
            },
            backend="bokeh",
        )

    def _build_layout(self) -> pn.Row:
        c = self.controls
        run = pn.Column(
            "### Run",
            pn.Row(self.play_toggle, self.step_button, sizing_mode="stretch_width"),
            pn.Row(self.flush_button, self.reset_button, sizing_mode="stretch_width"),
            pn.widgets.IntSlider.from_param(self.param.ticks_per_frame, label="ticks per frame"),
            pn.widgets.IntSlider.from_param(self.param.period),
        )
        policy = pn.Column(
            "### Flush policy", c["policy"], c["threshold"], c["tolerance"], self._policy_note
        )
        workload = pn.Column(
            "### Workload",
            c["updates_per_tick"],
            c["queries_per_tick"],
            c["stream"],
            c["preset"],
            c["n"],
            c["d"],
            c["scale"],
            c["seed"],
            pn.pane.Markdown(
                "Your own Q, K, V (`.npz` with arrays `Q`, `K`, `V`, each n×d):",
                margin=(5, 10, 0, 10),
            ),
            self.file_input,
        )
        advanced = pn.Card(
            c["k_share"],
            c["delta_scale"],
            c["dtype"],
            title="Advanced",
            collapsed=True,
            sizing_mode="stretch_width",
        )
        self._sidebar = pn.Column(
            run,
            policy,
            workload,
            advanced,
            "### Export",
            self.download,
            sizing_mode="stretch_width",
        )
        buttons = (self.play_toggle, self.step_button, self.flush_button, self.reset_button)
        for widget in (*c.values(), *buttons, self.file_input, self.download, *run[3:]):
            widget.sizing_mode = "stretch_width"  # the sidebar's width, never wider

        counters_row = pn.Row(
            self._counters,
            pn.Column(
                pn.pane.Markdown("**Lazy speed-up** (cumulative time)", margin=(0, 12)),
                pn.Row(*self.speedups.values()),
            ),
        )
        heat_controls = pn.Row(
            self.view_buttons, self.window_select, self.row_slider, self.col_slider, align="center"
        )
        live = pn.Column(
            self.alert,
            counters_row,
            heat_controls,
            self._window_text,
            self._heat_pane,
            pn.Row(
                pn.Column(self._error_pane, pn.widgets.Checkbox.from_param(self.param.log_error)),
                pn.Column(self._pending_pane),
                pn.Column(
                    self._cost_pane,
                    pn.Row(
                        pn.widgets.RadioButtonGroup.from_param(
                            self.param.cost_unit, variant="outline", width=160
                        ),
                        pn.widgets.Checkbox.from_param(self.param.log_cost),
                    ),
                ),
            ),
        )
        self._main = pn.Tabs(
            ("Live", live), ("What am I looking at?", _explanation()), dynamic=False
        )
        return pn.Row(self._sidebar, self._main)

    def _rebuild_heatmaps(self) -> None:
        """New heatmap plots for the current view (called on view changes, never per tick).

        A fresh ``Pipe`` per build: the old plots, still subscribed to the old pipe, never
        see a payload of the other view.
        """
        self._clim = None
        frame = self.advance(0)
        self._heat_pipe = hv.streams.Pipe(data=frame.heat)
        col_label = "key j" if self.view == "weights" else "feature c"
        for role in ("lazy", "exact", "diff"):
            cmap = _CMAPS["diff" if role == "diff" else self.view]
            # Bokeh names an image's own (coloured) value "image"; the others keep their names.
            fields = {name: "@image" if name == role else f"@{{{name}}}" for name in _ROLES}
            hover = [
                ("query i", "$y{0}"),
                (col_label, "$x{0}"),
                ("lazy", fields["lazy"] + "{%.5g}"),
                ("exact", fields["exact"] + "{%.5g}"),
                ("|lazy − exact|", fields["diff"] + "{%.3g}"),
            ]
            formatters = {field: "printf" for field in fields.values()}
            dmap = hv.DynamicMap(
                functools.partial(heat_image, role=role), streams=[self._heat_pipe]
            )
            # Equal plot sizes with a colour bar each give equal image frames; lazy and exact
            # show the same (shared) colour range.
            self._heatmaps[role] = dmap.opts(
                cmap=cmap,
                framewise=True,
                invert_yaxis=True,
                width=_HEAT_SIZE[0],
                height=_HEAT_SIZE[1],
                tools=["hover"],
                hover_tooltips=hover,
                hover_formatters=formatters,
                title=_TITLES[role],
                colorbar=True,
                clabel=_VALUE_LABELS[role],
                cformatter="%.2g",
                backend="bokeh",
            )
        self._heat_pane.object = (
            hv.Layout(list(self._heatmaps.values())).cols(3).opts(shared_axes=True, backend="bokeh")
        )
        self.render(frame)

    # ------------------------------------------------------------------ event handlers
    def _on_frame(self) -> None:
        """Periodic callback: one frame; any failure pauses and is explained on the page."""
        if self._orphaned():
            return
        try:
            frame = self.step()
        except Exception as exc:  # keep the page alive whatever the simulation raises
            self.playing = False
            self._say(f"Stopped: a tick failed ({type(exc).__name__}: {exc}).")
            return
        if frame.seconds > SLOW_FRAME:
            # The server answers clicks only between frames: never let them queue for long.
            self.playing = False
            self._say(
                f"Paused: one frame took {frame.seconds:.1f} s with these settings. "
                "Use “Step one tick”, or lower n, d or the updates per tick.",
                "warning",
            )

    def _on_play(self, event=None) -> None:
        if self.playing:
            self._callback.period = self.period
            if not self._callback.running:
                self._callback.start()
            self.play_toggle.label = "Pause"
        else:
            self._callback.stop()
            self.play_toggle.label = "▶ Play"

    def _on_period(self, event) -> None:
        self._callback.period = event.new

    def _on_step(self, event=None) -> None:
        self._guarded("Step", lambda: self.step(1))

    def _on_flush(self, event=None) -> None:
        def flush():
            self.sim.flush_now()
            self.step(0)  # render at once: the difference map goes blank

        self._guarded("Flush", flush)

    def _on_reset(self, event=None) -> None:
        def reset():
            self.sim.reset()
            self._restart_view()

        self._guarded("Reset", reset)

    def _on_view_change(self, *events) -> None:
        if self._syncing:
            return
        names = {e.name for e in events}
        if "view" in names:
            self._guarded("Changing the view", self._rebuild_heatmaps)
            return
        if names & {"window"}:
            self._clim = None  # a new window: refit the shared colour range
        self._fit_window_controls()
        self._guarded("Moving the window", lambda: self.step(0))

    def _on_error_axis(self, event) -> None:
        self._error_pane.object = self._error_dmap()

    def _on_cost_axis(self, *events) -> None:
        self._cost_pane.object = self._cost_dmap()

    def _apply_config(self, *events) -> None:
        """Apply edited simulation settings; on failure restore the controls and explain."""
        if self._syncing:
            return
        changes = {e.name: e.new for e in events}
        try:
            self.sim.config.param.update(**changes)
        except Exception as exc:
            self._sync_form()
            shown = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            self._say(f"Could not apply {shown}: {exc}. The previous settings are kept.")
            return
        self._clear_alert()
        if changes.keys() & set(REBUILD_PARAMS):
            self._restart_view()
            if self.playing:
                self._say(
                    f"Rebuilt Q, K, V for n = {self.sim.engine.n}, "
                    f"d = {self.sim.engine.d}; the run restarted at tick 0 and keeps "
                    "playing.",
                    "info",
                )

    def _on_file(self, event) -> None:
        if not event.new:
            return
        name = self.file_input.filename or "the file"
        try:
            self.sim.load_npz(event.new)
        except Exception as exc:
            self._say(f"Could not use {name}: {exc}. The previous Q, K, V are kept.")
            return
        self._sync_form()
        self._restart_view()
        eng = self.sim.engine
        self._say(
            f"Loaded {name}: n = {eng.n}, d = {eng.d}. The run restarted at tick 0.", "success"
        )

    def _on_session_destroyed(self, session_context) -> None:
        """Stop the frames as soon as the browser tab goes away."""
        self._callback.stop()
        self.playing = False

    # ------------------------------------------------------------------ helpers
    def _orphaned(self) -> bool:
        """Whether this server session has lost its browser tab but is not discarded yet.

        Bokeh discards a session only some time after its last connection closed (15 to
        32 s by default); until then a playing dashboard would compute frames for nobody,
        and a few closed tabs can saturate the server.
        """
        if self._session is None:
            return False
        for session in self._session.server_context.sessions:
            if session.id == self._session.id:
                return session.connection_count == 0
        return False

    def _guarded(self, action: str, func) -> None:
        """Run a button action; a failure leaves the page usable and says what happened."""
        try:
            func()
        except Exception as exc:
            self._say(
                f"{action} failed ({type(exc).__name__}: {exc}). The previous state is "
                "kept; try Reset if the view looks wrong."
            )
        else:
            self._clear_alert()

    def _restart_view(self) -> None:
        """After a rebuild or reset: empty the time series, refit windows and colours."""
        self._series.clear()
        self._fit_window_controls()
        self._clim = None
        self.step(0)

    def _sync_form(self) -> None:
        """Copy the simulation's current settings back into the controls."""
        values = self.sim.config.param.values()
        self._syncing = True
        try:
            self.form.param.update(**{k: values[k] for k in SIM_CONTROLS})
        finally:
            self._syncing = False

    def _fit_window_controls(self) -> None:
        """Bounds of the window sliders for the current n; disabled when nothing scrolls."""
        win = self._current_window()
        n = self.sim.engine.n
        spare_rows = n - win.rows
        spare_cols = (n - win.cols) if self.view == "weights" else 0
        self._syncing = True
        try:
            for name, spare, slider in (
                ("row0", spare_rows, self.row_slider),
                ("col0", spare_cols, self.col_slider),
            ):
                # A slider needs end > start; with nothing to scroll it is shown disabled.
                self.param[name].bounds = (0, max(spare, 1))
                setattr(self, name, min(getattr(self, name), max(spare, 0)))
                slider.disabled = spare <= 0
        finally:
            self._syncing = False
        self.col_slider.visible = self.view == "weights"

    def _show_policy_controls(self, *events) -> None:
        policy = self.form.policy
        self.controls["threshold"].visible = policy == "fixed"
        self.controls["tolerance"].visible = policy == "error"
        self._policy_note.object = _POLICY_NOTES[policy]

    def _show_stats(self, stats: dict) -> None:
        self._counters.object = _counters_html(stats)
        for key, number in self.speedups.items():
            ratio = stats["speedup"][key]
            # before the first tick there is no ratio: show a dash rather than a red 0.0×
            number.param.update(
                value=0.0 if ratio is None else round(ratio, 2),
                format="–" if ratio is None else "{value:.1f}×",
            )

    def _timeline_csv(self) -> io.StringIO:
        buf = io.StringIO()
        self.sim.timeline.to_csv(buf)
        buf.seek(0)
        return buf

    def _say(self, message: str, kind: str = "danger") -> None:
        self.alert.alert_type = kind
        self.alert.object = message
        self.alert.visible = True

    def _clear_alert(self) -> None:
        self.alert.visible = False


def _fit_clim(exact: np.ndarray, view: str) -> tuple[float, float]:
    """Shared colour range of the lazy and exact heatmaps, from the exact values.

    Weights are non-negative: ``(0, max)``. Outputs are signed: symmetric about zero so that
    white (in a diverging map) means zero.
    """
    top = float(np.abs(exact).max()) if exact.size else 0.0
    top = top if top > 0 else 1.0  # an all-zero window still needs a valid range
    return (0.0, top) if view == "weights" else (-top, top)


def _fmt_threshold(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:,.0f}"


def _fmt_flops(flops: float) -> str:
    """``1.25e6`` -> ``"1.2 Mflop"``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= factor:
            return f"{flops / factor:.1f} {prefix}flop"
    return f"{flops:.0f} flop"


def _counters_html(s: dict) -> str:
    """The counter strip: small label above a large number, in a grid."""
    last = s["last_flush"]
    last_text = (
        "none yet"
        if last is None
        else f"{1e3 * last['seconds']:.2f} ms · {last['rows']} rows · {_fmt_flops(last['flops'])}"
    )
    tick_text = "–" if s["tick_ms"] is None else f"{s['tick_ms']:.1f} ms"
    render_text = "–" if s["render_ms"] is None else f"{s['render_ms']:.0f} ms"
    cells = [
        ("ticks", f"{s['ticks']:,}"),
        ("updates", f"{s['updates']:,}"),
        ("pending updates", f"{s['pending']:,}"),
        ("touched rows |S|", f"{s['touched_rows']:,}"),
        ("flushes", f"{s['flushes']:,}"),
        ("threshold", _fmt_threshold(s["threshold"])),
        ("last flush", last_text),
        ("tick: model + plot data", tick_text),
        ("frame render", render_text),
    ]
    body = "".join(
        f"<div><div style='font-size:11px;color:#666'>{label}</div>"
        f"<div style='font-size:16px;font-weight:600;white-space:nowrap'>{value}</div></div>"
        for label, value in cells
    )
    return (
        "<div style='display:grid;grid-template-columns:repeat(5,max-content);"
        f"column-gap:16px;row-gap:2px'>{body}</div>"
    )


def _explanation() -> pn.pane.Markdown:
    return pn.pane.Markdown(EXPLANATION, sizing_mode="stretch_width", max_width=900)


EXPLANATION = """
## Lazy updates in one paragraph

A transformer's attention computes **O = softmax(scale · Q Kᵀ) V**: row *i* of the weight
matrix **P = softmax(scale · Q Kᵀ)** says how much query *i* attends to each key *j*, and
row *i* of **O = P V** is the matching weighted average of the value rows. When K and V keep
changing (a stream of edits), recomputing everything after each change costs O(n²·d).
This engine keeps **caches** (the softmax denominators and the unnormalised output) and
treats changes **lazily**: an update is only *queued* (O(d) work), an exact query corrects
the cached answer for the queued changes (O(|S|·d), S the touched rows), and once enough
updates are pending the engine **flushes**: it applies them all in two matrix products
(O(n·|S|·d)), which is much faster per update than applying them one by one. The
**threshold** decides when to flush: flushing often keeps the caches fresh; flushing rarely
batches more work but lets the caches go stale and makes exact queries dearer.

Queries are always **exact**. What goes stale are the caches: the *lazy* view below shows
what the caches hold, the answer you would get if you skipped the correction.

## The heatmaps

* **Lazy** — weights (or outputs) as of the last flush: old keys, old denominators.
* **Exact** — the true values right now. Lazy and exact share one colour range, so equal
  colours mean equal values.
* **Difference |lazy − exact|** — where the caches are stale. It has its own colour range
  (white = no difference) and goes **blank at every flush**, then fills in again as new
  updates queue up. A K update changes one key, hence a whole **column** of P (every query
  sees that key); a V update changes no weight at all, only the output O.
* Switch between the **attention weights P** (n×n; you see a window of it) and the
  **output O = PV** (n×d). A window wider than 512 is shown in blocks: lazy and exact
  are block averages, the difference is the block maximum. Hover any heatmap to read the
  query *i*, key *j* (or feature *c*), lazy, exact and difference values.

## The time series

* **Error of the lazy output** — how far the cached output is from the exact one:
  relative Frobenius error ‖O_lazy − O‖ / ‖O‖ and the largest single deviation.
  Grey vertical lines mark flushes; the error drops to zero there (on the log scale the
  curve simply stops, since log 0 does not exist).
* **Pending updates and flushes** — the queue length grows each tick and falls to zero at a
  flush (a sawtooth); each red spike is one flush, as tall as the number of rows it
  recomputed.
* **Cumulative cost** — wall-clock seconds (or floating-point operations) spent so far by
  four ways of keeping the answers exact on the same workload: this **lazy** engine;
  **eager** maintenance (an engine that flushes after every single update); **on demand**
  (no caches at all: each queried output row is computed from scratch in O(n·d)); and a
  **full recompute** of O after every update (not run: each update is charged the measured
  time of one dense recompute). The big numbers above are the current ratios
  *other strategy / lazy*: above 1 (green) the lazy engine is ahead, below 1 (red) it is
  behind. Lazy wins when updates arrive in batches between queries; it loses to on-demand
  answering when queries are rare and to eager maintenance when every update is
  immediately followed by a query, which is why the default **cost** policy measures both
  and picks its threshold itself.

## The controls

* **Flush policy** — *fixed*: flush every *threshold* updates (1 = eager); *adaptive*:
  the original prototype's rule, which grows the threshold with recent batch sizes;
  *error*: flush when the estimated relative error would exceed the tolerance ε;
  *cost*: pick the threshold that minimises measured time per update.
* **Workload** — how many updates and exact queries each tick brings, what kind of
  updates (single entries, whole rows, a moving hot spot, bursts), the starting Q, K, V
  (random presets or your own `.npz` file with arrays `Q`, `K`, `V` of shape n×d), the
  sizes n and d (changing them rebuilds and restarts the run), and the logit scale
  (1/√d as in transformers, or 1 as in the original prototype).
* **Flush now** applies all pending updates at once; **Reset** restarts the run with the
  same settings. **Download timeline** saves every recorded tick as CSV.
"""
