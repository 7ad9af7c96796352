"""The dashboard view: one :class:`Dashboard` (a Panel ``Viewer``) per browser session.

It drives one :class:`~dynattn.simulation.Simulation` in *frames*: each frame runs as much
simulation work as its time budget allows (measured costs decide before any work starts, a
large tick is spread over several frames) and prepares the data with
:class:`~dynattn.dashboard.frames.FrameSource`, in a thread (see
:class:`~dynattn.dashboard.session.SessionLoop`); the event loop only draws it, in one batch
of browser updates, so clicks are answered at once. Slow steps (a rebuild for a new n, an
upload, a flush) show a progress bar meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from ..simulation import Simulation
from .controls import (
    add_display_panes,
    build_layout,
    code_edits,
    fit_window_controls,
    show_stats,
)
from .frames import SERIES, WINDOWS, Frame, FrameSource, Pacer, Player, series_rows
from .heatmaps import MatrixHeatmaps
from .lessons import LESSONS
from .plots import series_plots
from .session import SessionLoop
from .settings import SettingsEditor
from .text import escape

__all__ = ["Dashboard"]

#: Seconds between time-series refreshes while playing (each costs ~0.1 s of HoloViews work).
SERIES_INTERVAL = 0.7
_FREE_PLAY = "Free play (your own settings)"
_VIEWS = {"attention weights P": "weights", "output O = PV": "output"}
_HEAT_SIZE = (330, 280)  # pixels per heatmap: three fit beside the sidebar at 1366 wide


def _batch() -> contextlib.ExitStack:
    """One batch of browser updates. Every HoloViews plot update freezes the Bokeh document
    and, on unfreezing, walks the whole model graph again; one outer freeze makes that one
    walk per batch, not one per plot."""
    batch = contextlib.ExitStack()
    batch.enter_context(pn.io.hold())
    doc = pn.state.curdoc
    if doc is not None:
        batch.enter_context(doc.models.freeze())
    return batch


def _timeline_csv(dash: Dashboard) -> io.StringIO:
    """The simulation's timeline as CSV, for the download button."""
    buf = io.StringIO()
    with dash._loop.lock:  # not while a frame appends to it
        dash.sim.timeline.to_csv(buf)
    buf.seek(0)
    return buf


class Dashboard(pn.viewable.Viewer):
    """Interactive view of a :class:`~dynattn.simulation.Simulation`.

    Parameters
    ----------
    simulation : Simulation, optional
        The simulation to drive. If omitted, a new one set up as the first lesson (every
        browser session builds its own Dashboard, hence its own simulation).
    points : int
        Ticks kept in the browser-side time series (older points scroll out).
    **params
        Initial values of the view parameters below (``view``, ``window``, ...).

    Notes
    -----
    The controls edit a copy of the settings (``form``, see :mod:`.settings`).
    """

    lesson = param.Selector(
        default=LESSONS[0].title,
        objects=[*(lesson.title for lesson in LESSONS), _FREE_PLAY],
        doc="Guided scenario: choosing one sets the controls and plays.",
    )
    view = param.Selector(default="weights", objects=_VIEWS, doc="Matrix in the heatmaps.")
    window = param.Selector(
        default=128,
        objects=list(WINDOWS),
        doc="Side of the heatmap window (clipped to n; above 512 shown in blocks).",
    )
    row0 = param.Integer(default=0, bounds=(0, 1), label="first query row")
    col0 = param.Integer(default=0, bounds=(0, 1), label="first key column")
    playing = param.Boolean(default=False, doc="Whether frames run periodically.")
    ticks_per_frame = param.Integer(
        default=1, bounds=(1, 64), doc="Ticks per frame, as far as the frame's budget allows."
    )
    period = param.Integer(
        default=250, bounds=(50, 2000), label="frame period (ms)", doc="Time between frames."
    )
    log_error = param.Boolean(default=True, label="log scale", doc="Logarithmic error axis.")
    cost_unit = param.Selector(default="seconds", objects=["seconds", "flops"])
    log_cost = param.Boolean(default=True, label="log scale", doc="Logarithmic cost axis.")
    blas_threads = param.Integer(
        default=1,
        bounds=(1, None),
        allow_None=True,
        doc="""
        BLAS threads of a frame's model work (None: the library default). One by default: a
        dashboard's matrices are small, a server runs several sessions, and idle BLAS threads
        busy-waiting slowed a tick more than tenfold on a loaded two-core machine.""",
    )
    frame_budget = param.Number(
        default=0.2, bounds=(0.01, 5.0), doc="Seconds of work per frame while playing."
    )

    def __init__(self, simulation: Simulation | None = None, points: int = 2000, **params):
        if simulation is None:
            first = LESSONS[0]
            simulation = Simulation(**first.config)
            params = {**first.view_params, **params}
        else:
            params.setdefault("lesson", _FREE_PLAY)
        super().__init__(**params)
        self.sim = simulation
        self._syncing = False  # view parameters being set by the code, not the user
        self._said = 0  # messages shown so far
        self._steps_left = 0  # ticks asked for by "Step one tick", run by frames
        self._frame_running = False  # a frame's model work is running off the event loop
        self._unsent: list[pd.DataFrame] = []  # tick records not yet in the time series
        self._clear_series = False  # empty the time series at the next render
        self._series_sent = self._rendered_at = 0.0
        self._source = FrameSource(self.sim)
        self._player = Player(self.sim, Pacer(self.frame_budget))
        self.last_frame: Frame | None = None
        self._render_ms: float | None = None
        self._series = hv.streams.Buffer(
            pd.DataFrame({c: np.zeros(0) for c in SERIES}), length=points, index=False
        )
        self._heatmaps: MatrixHeatmaps | None = None
        self._build_widgets()
        self._sidebar, self._main = build_layout(self)
        self._layout = pn.Row(self._sidebar, self._main)
        self._loop = SessionLoop(
            self._on_frame, self.period, self._on_session_destroyed, self._on_loaded
        )
        self._callback = self._loop.callback
        self.settings.show_policy()
        fit_window_controls(self)
        self._rebuild_heatmaps()
        self._on_play()  # Dashboard(playing=True) starts at once (e.g. a classroom display)

    # -------------------------------------------------------------------- public API
    def advance(self, ticks: int | None = None) -> Frame:
        """Run ``ticks`` whole simulation ticks (default ``ticks_per_frame``) and prepare the
        frame, without rendering it (so a benchmark can time it: ``frame.seconds``)."""
        ticks = self.ticks_per_frame if ticks is None else ticks
        t0 = time.perf_counter()
        return self._frame(self._player.whole(ticks, self.blas_threads), t0)

    def render(self, frame: Frame, series: bool = True) -> None:
        """Push a prepared frame to the plots and counters, in one batch of browser updates.

        ``series=False`` keeps the frame's tick records for a later frame: while playing, the
        time series (the dearest plots to update) are refreshed at most every
        ``SERIES_INTERVAL`` seconds.
        """
        t0 = time.perf_counter()
        if len(frame.records):
            self._unsent.append(frame.records)
        # Before the page has loaded a stream send would leave HoloViews refreshes circulating
        # under the document lock (see .session); the page shows this frame once loaded.
        live = self._loop.loaded
        with _batch():
            if series and self._clear_series and live:
                self._empty_series()
            if series and self._unsent and live:
                self._series.send(pd.concat(self._unsent, ignore_index=True))
                self._unsent = []
                self._series_sent = t0
            self._heatmaps.show(frame.heat)
            self.window_text.object = frame.heat["window"]
            show_stats(self, frame.stats)
        self._render_ms = 1e3 * (time.perf_counter() - t0)  # shown with the next frame
        self._rendered_at = t0

    def _empty_series(self) -> None:
        """Empty the time series if a restart asked for it (about 0.3 s of plot updates)."""
        if self._clear_series and self._loop.loaded:
            with _batch():
                self._series.clear()
            self._clear_series = False

    def step(self, ticks: int | None = None) -> Frame:
        """Advance and render one frame; returns it."""
        frame = self.advance(ticks)
        self.render(frame)
        return frame

    def play_frame(self, ticks: int | None = None) -> Frame:
        """One frame of play: as many ticks (up to ``ticks``, default ``ticks_per_frame``) or
        parts of a tick as fit in ``frame_budget`` by their measured costs, then the frame's
        data."""
        ticks = self.ticks_per_frame if ticks is None else ticks
        t0 = time.perf_counter()
        # rendering comes out of the same budget (what a click waits for is both)
        render = (self._render_ms or 0.0) / 1e3
        budget = max(self.frame_budget - render, 0.5 * self.frame_budget)
        return self._frame(self._player.bounded(ticks, budget, self.blas_threads), t0)

    @property
    def _busy(self) -> str | None:  # what the session does in the background, if anything
        return self._loop.busy

    @property
    def heatmaps(self) -> MatrixHeatmaps:
        """The lazy, exact and difference heatmaps (``.images()``: what they show)."""
        return self._heatmaps

    @property
    def series(self) -> hv.streams.Buffer:
        """The bounded buffer of tick records (columns ``SERIES``) behind the time series."""
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

    # ------------------------------------------------------------------ frames
    def _frame(self, records: list[dict], t0: float) -> Frame:
        view = self.view
        win = self._source.window(view, self.window, self.row0, self.col0)
        heat = self._source.heat(view, win)
        seconds = time.perf_counter() - t0
        tick_seconds = records[-1]["tick_seconds"] if records else None
        stats = self._source.stats(tick_seconds, self._render_ms)
        frame = Frame(series_rows(records), heat, stats, seconds, len(records))
        self.last_frame = frame
        return frame

    def _rebuild_heatmaps(self) -> None:
        """New heatmap figures for the current view (never per tick), filled by a redraw."""
        self._source.clim = None
        self._heatmaps = MatrixHeatmaps(self.view, _HEAT_SIZE)
        self.heat_pane.object = self._heatmaps.layout
        self._redraw("Changing the view")

    def _rebuild_series(self, *events) -> None:
        error, pending, cost = series_plots(
            self._series, self.log_error, self.cost_unit, self.log_cost
        )
        names = {e.name for e in events}
        if not names or "log_error" in names:
            self.error_pane.object = error
        if not names:
            self.pending_pane.object = pending
        if not names or names & {"cost_unit", "log_cost"}:
            self.cost_pane.object = cost

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        add_display_panes(self)
        w = pn.widgets
        self.play_toggle = w.Toggle.from_param(self.param.playing, label="▶ Play", color="success")
        self.step_button = w.Button(label="Step one tick")
        self.flush_button = w.Button(label="Flush now", color="warning")
        self.reset_button = w.Button(label="Reset", color="danger")
        self.step_button.on_click(self._on_step)
        self.flush_button.on_click(self._on_flush)
        self.reset_button.on_click(self._on_reset)
        self.param.watch(self._on_play, "playing")
        self.param.watch(self._on_period, "period")
        self.param.watch(self._on_view_change, ["view", "window", "row0", "col0"])
        self.param.watch(self._on_lesson, "lesson")
        self.settings = SettingsEditor(self)
        self.form, self.controls = self.settings.form, self.settings.controls
        self.lesson_select = w.Select.from_param(self.param.lesson, label="Lesson", width=330)
        self.file_input = w.FileInput(accept=".npz", multiple=False)
        self.file_input.param.watch(
            lambda e: e.new and self.settings.upload(self.file_input.filename, e.new), "value"
        )
        self.download = w.FileDownload(
            callback=functools.partial(_timeline_csv, self),
            filename="dynattn_timeline.csv",
            label="Download timeline (CSV)",
            color="primary",
        )
        self.view_buttons = w.RadioButtonGroup.from_param(
            self.param.view, variant="outline", color="primary", description=None
        )
        self.window_select = w.Select.from_param(self.param.window, label="window", width=90)
        self.row_slider = w.IntSlider.from_param(self.param.row0, width=200)
        self.col_slider = w.IntSlider.from_param(self.param.col0, width=200)
        self._rebuild_series()
        self.param.watch(self._rebuild_series, ["log_error", "cost_unit", "log_cost"])
        self._show_caption()

    def _show_caption(self) -> None:
        self.caption.object = next((x.caption for x in LESSONS if x.title == self.lesson), "")

    # ------------------------------------------------------------------ event handlers
    def _on_frame(self) -> None:
        """Periodic callback: start one bounded frame off the event loop, unless one is still
        running; :meth:`_frame_done` draws it."""
        if self._busy or self._frame_running:
            return
        if self._loop.orphaned():
            # Bokeh discards a closed tab's session only later (under load, it was seen to
            # keep them for minutes): stop now and let the plot data go.
            self._stop()
            self._series.clear()
            for pane in (self.heat_pane, self.error_pane, self.pending_pane, self.cost_pane):
                pane.object = None
            return
        if not self.playing and not self._steps_left:
            self._callback.stop()
            return
        self._frame_running = True
        ticks = None if self.playing else self._steps_left
        self._loop.off_loop(lambda: self.play_frame(ticks), self._frame_done)

    def _frame_done(self, frame: Frame | None, error: Exception | None) -> None:
        """Draw a frame computed off the event loop; any failure pauses and is explained."""
        self._frame_running = False
        try:
            if error is not None:
                raise error
            now = time.perf_counter()
            # a frame that only advanced part of a tick is drawn at most once a second: the
            # time goes to finishing the tick instead
            if frame.ticks or now - self._rendered_at >= 1.0:
                due = not self.playing or now - self._series_sent >= SERIES_INTERVAL
                self.render(frame, series=due)
        except Exception as exc:  # keep the page alive whatever the simulation raises
            with self._loop.lock:
                self._player.restart()
            self._steps_left = 0
            self.playing = False
            self._say(f"Stopped: a tick failed ({type(exc).__name__}: {escape(exc)}).")
            return
        if not self.playing:
            self._steps_left = max(self._steps_left - frame.ticks, 0)

    def _on_play(self, event=None) -> None:
        if self.playing:
            self._loop.start(self.period)
            self.play_toggle.label = "Pause"
        else:
            self._steps_left = 0
            self._loop.stop()
            self.play_toggle.label = "▶ Play"

    def _on_period(self, event) -> None:
        self._callback.period = event.new

    def _on_step(self, event=None) -> None:
        if not self._loop.served:  # a notebook or a test: at once
            self._guarded("Step", lambda: self.step(1))
            return
        # in a server: through bounded frames, so that a heavy tick never blocks the page
        self._steps_left += 1
        self._loop.start(self.period)

    def _on_flush(self, event=None) -> None:
        # O(n·|S|·d): up to a second at the largest sizes, so off the event loop
        self._in_background("Flushing", self.sim.flush_now, self._flushed)

    def _flushed(self, error) -> None:
        if error is not None:
            raise error
        self._redraw("Showing the flush")  # at once: the difference map goes blank

    def _on_reset(self, event=None) -> None:
        def done(error):
            if error is not None:
                raise error
            self._restart_view()

        # rebuilds every strategy, O(n²·d): over a second at the largest sizes
        self._in_background("Resetting", self.sim.reset, done)

    def _on_view_change(self, *events) -> None:
        if self._syncing:
            return
        names = {e.name for e in events}
        if "view" in names:
            fit_window_controls(self)
            self._rebuild_heatmaps()
            return
        if "window" in names:
            self._source.clim = None  # a new window: refit the shared colour range
        fit_window_controls(self)
        self._redraw("Moving the window")

    def _on_lesson(self, event) -> None:
        """Set every control as the lesson says, rebuild, and play."""
        self._show_caption()
        lesson = next((x for x in LESSONS if x.title == event.new), None)
        if lesson is None:
            return
        with code_edits(self):
            self.param.update(**lesson.view_params)

        def done(error):
            self._restart_view()
            self.playing = error is None

        self._in_background(
            f"Setting up “{lesson.title}”",
            lambda: self.sim.config.param.update(**lesson.config),
            done,
        )

    def _on_loaded(self) -> None:
        """The page has loaded: show the latest frame (streams were left alone until now)."""
        self._redraw("Showing the first frame")

    def _on_session_destroyed(self, session_context) -> None:
        """Stop the frames as soon as the browser tab goes away."""
        self._stop()

    # ------------------------------------------------------------------ helpers
    def _stop(self) -> None:
        self._loop.stop()
        with self._loop.lock:  # not under a frame that is running the tick
            self._player.tick = None
        with contextlib.suppress(Exception):  # the session may be half torn down
            self.playing = False

    def _in_background(self, what: str, work, done) -> None:
        """``work()`` off the event loop with a progress bar, then ``done(error)`` (see
        :meth:`SessionLoop.in_background`); frames pause meanwhile."""
        if self._loop.served:
            self.progress.visible = True
            self._say(f"{what} …", "info")

        def finish(error):
            self.progress.visible = False
            self._clear_alert()
            self._guarded(what, lambda: done(error))

        threads = self.blas_threads

        def limited():
            # frames pause meanwhile, so this thread alone sets the process's BLAS threads:
            # at n = 8,192 a rebuild took 0.37 s with one thread, 0.67 s with two busy ones
            with self._player.limited(threads):
                work()

        self._loop.in_background(what, limited, finish)

    def _redraw(self, action: str) -> None:
        """Draw the current state (no tick), its data prepared off the event loop."""

        def done(frame, error):
            if error is not None:
                self._say(f"{action} failed ({type(error).__name__}: {escape(error)}).")
                return
            self.render(frame)

        self._loop.off_loop(lambda: self.advance(0), done)

    def _guarded(self, action: str, func) -> None:
        """Run a button action; a failure leaves the page usable and says what happened."""
        if self._busy:
            self._say(f"Please wait: {self._busy} …", "info")
            return
        said = self._said
        try:
            with self._loop.lock:  # model work off the event loop ends first
                func()
        except Exception as exc:
            self._say(
                f"{action} failed ({type(exc).__name__}: {escape(exc)}). The previous state is "
                "kept; try Reset if the view looks wrong."
            )
        else:
            if self._said == said:  # an old message no longer applies; a new one stays
                self._clear_alert()

    def _restart_view(self) -> None:
        """After a rebuild or reset: empty the time series, refit windows and colours (the
        images carry their own axis ranges, so the axes follow the new n)."""
        self._player.restart()
        self._unsent = []
        self._clear_series = True
        self.settings.sync()
        fit_window_controls(self)
        self._source.clim = None
        # the new matrices first; the series are emptied next (or by the next frame's render,
        # if that comes first), which costs as much again
        self.render(self.advance(0), series=False)
        self._loop.soon(self._empty_series)

    def _say(self, message: str, kind: str = "danger") -> None:
        """Show ``message`` (Markdown; user-derived parts already escaped) above the plots."""
        self._said += 1
        self.alert.alert_type = kind
        self.alert.object = message
        self.alert.visible = True

    def _clear_alert(self) -> None:
        self.alert.visible = False
