"""The dashboard's widgets, generated from ``param`` declarations, and its page layout.

Widgets come from the parameters of :class:`~dynattn.simulation.SimulationConfig` (a private
copy per dashboard, the *form*) and of the :class:`~dynattn.dashboard.view.Dashboard` itself
via ``from_param``, so bounds, defaults and labels are declared once. The two typed fields
(seed and update size) are text fields checked by the view, which reverts them and says why
when a value is refused, instead of widgets that would keep showing a rejected value.
"""

from __future__ import annotations

import contextlib
import math

import panel as pn

from .frames import STRATEGIES
from .text import EXPLANATION, counters_html, fmt_ratio

__all__ = [
    "TOLERANCES",
    "TYPED_FIELDS",
    "add_display_panes",
    "build_layout",
    "code_edits",
    "fit_slider",
    "fit_window_controls",
    "show_stats",
    "simulation_controls",
]

#: Error-budget tolerances offered by the tolerance slider (a log scale in discrete steps).
TOLERANCES = tuple(10.0**e for e in range(-8, 1))
#: Settings typed as text: name -> (label, integer?).
TYPED_FIELDS = {"seed": ("seed", True), "delta_scale": ("update size (std of δ)", False)}
_RATIO_COLORS = [(1.0, "#b2182b"), (math.inf, "#1a7837")]  # red when behind, green ahead
_NO_RATIO_COLORS = [(math.inf, "#888888")]


def add_display_panes(dash) -> None:
    """Give ``dash`` its read-only panes: messages, progress bar, counters, speed-ups, the
    lesson caption and the plots' panes (filled later)."""
    dash.policy_note = pn.pane.Markdown("", margin=(0, 10))
    dash.caption = pn.pane.Markdown("", margin=(0, 10), sizing_mode="stretch_width")
    dash.alert = pn.pane.Alert(
        "", alert_type="danger", visible=False, sizing_mode="stretch_width", margin=(5, 10)
    )
    dash.progress = pn.indicators.Progress(
        active=True, visible=False, width=120, margin=(15, 10), bar_color="primary"
    )
    dash.window_text = pn.pane.Markdown("", margin=(0, 10), sizing_mode="stretch_width")
    dash.counters = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 10))
    dash.speedups = speedup_indicators()
    dash.heat_pane = pn.pane.Bokeh(margin=0)
    dash.error_pane, dash.pending_pane, dash.cost_pane = (
        pn.pane.HoloViews(backend="bokeh", margin=0) for _ in range(3)
    )


def simulation_controls(form) -> dict:
    """One widget per simulation setting of ``form`` (a SimulationConfig), by name."""
    w = pn.widgets
    p = form.param
    controls = {
        # no tooltip on the button group: Bokeh's stayed over the heatmaps after a click
        "policy": w.RadioButtonGroup.from_param(
            p.policy, color="primary", variant="outline", description=None
        ),
        "threshold": w.IntSlider.from_param(p.threshold, label="threshold (pending updates)"),
        "tolerance": w.DiscreteSlider.from_param(
            p.tolerance, options=list(TOLERANCES), label="tolerance ε (relative error)"
        ),
        "updates_per_tick": w.IntSlider.from_param(p.updates_per_tick, label="updates per tick"),
        "queries_per_tick": w.IntSlider.from_param(p.queries_per_tick, label="queries per tick"),
        "stream": w.Select.from_param(p.stream, label="update stream"),
        "preset": w.Select.from_param(p.preset, label="Q, K, V preset"),
        # Size changes rebuild everything: apply them only when the slider is released.
        "n": w.IntSlider.from_param(p.n, label="n (sequence length)", throttled=True),
        "d": w.IntSlider.from_param(p.d, label="d (head dimension)", throttled=True),
        "scale": w.Select.from_param(p.scale, label="logit scale"),
        "k_share": w.FloatSlider.from_param(p.k_share, label="share of updates to K"),
        "dtype": w.Select.from_param(p.dtype, label="precision"),
    }
    for name, (label, _) in TYPED_FIELDS.items():
        controls[name] = w.TextInput(label=label, value=f"{getattr(form, name):g}")
    return controls


def speedup_indicators() -> dict:
    """The big "vs eager / on demand / recompute" numbers (text set per frame)."""
    return {
        key: pn.indicators.Number(
            label=f"vs {STRATEGIES[key]}",
            value=0.0,
            format="–",
            font_size="22pt",
            title_size="10pt",
            colors=[(1.0, "#b2182b"), (math.inf, "#1a7837")],
            margin=(0, 12),
        )
        for key in ("eager", "ondemand", "recompute")
    }


def build_layout(dash) -> tuple[pn.Column, pn.Tabs]:
    """The sidebar and the main area of ``dash`` (a Dashboard whose widgets exist)."""
    c = dash.controls
    pw = pn.widgets
    run = pn.Column(
        "### Run",
        pn.Row(dash.play_toggle, dash.step_button, sizing_mode="stretch_width"),
        pn.Row(dash.flush_button, dash.reset_button, sizing_mode="stretch_width"),
        pw.IntSlider.from_param(dash.param.ticks_per_frame, label="ticks per frame"),
        pw.IntSlider.from_param(dash.param.period),
    )
    policy = pn.Column(
        "### Flush policy", c["policy"], c["threshold"], c["tolerance"], dash.policy_note
    )
    workload = pn.Column(
        "### Workload",
        *(c[k] for k in ("updates_per_tick", "queries_per_tick", "stream", "preset", "n", "d")),
        *(c[k] for k in ("scale", "seed")),
        pn.pane.Markdown(
            "Your own Q, K, V (`.npz` with arrays `Q`, `K`, `V`, each n×d):",
            margin=(5, 10, 0, 10),
        ),
        dash.file_input,
    )
    advanced = pn.Card(
        c["k_share"],
        c["delta_scale"],
        c["dtype"],
        title="Advanced",
        collapsed=True,
        sizing_mode="stretch_width",
    )
    sidebar = pn.Column(
        run, policy, workload, advanced, "### Export", dash.download, sizing_mode="stretch_width"
    )
    buttons = (dash.play_toggle, dash.step_button, dash.flush_button, dash.reset_button)
    for widget in (*c.values(), *buttons, dash.file_input, dash.download, *run[3:]):
        widget.sizing_mode = "stretch_width"  # the sidebar's width, never wider

    counters_row = pn.Row(
        dash.counters,
        pn.Column(
            pn.pane.Markdown("**Lazy speed-up** (cumulative time)", margin=(0, 12)),
            pn.Row(*dash.speedups.values()),
        ),
    )
    heat_controls = pn.Row(
        dash.view_buttons, dash.window_select, dash.row_slider, dash.col_slider, align="center"
    )
    lesson_bar = pn.Row(dash.lesson_select, dash.caption, sizing_mode="stretch_width")
    series = pn.Row(
        pn.Column(dash.error_pane, pw.Checkbox.from_param(dash.param.log_error)),
        pn.Column(dash.pending_pane),
        pn.Column(
            dash.cost_pane,
            pn.Row(
                pw.RadioButtonGroup.from_param(
                    dash.param.cost_unit, variant="outline", width=160, description=None
                ),
                pw.Checkbox.from_param(dash.param.log_cost),
            ),
        ),
    )
    live = pn.Column(
        lesson_bar,
        pn.Row(dash.progress, dash.alert, sizing_mode="stretch_width"),
        counters_row,
        heat_controls,
        dash.window_text,
        dash.heat_pane,
        series,
    )
    explanation = pn.pane.Markdown(EXPLANATION, sizing_mode="stretch_width", max_width=900)
    main = pn.Tabs(("Live", live), ("What am I looking at?", explanation), dynamic=False)
    return sidebar, main


@contextlib.contextmanager
def code_edits(owner):
    """Inside, ``owner._syncing`` is True: the owner's watchers ignore settings the code
    makes, and act on a person's edits only."""
    owner._syncing = True
    try:
        yield
    finally:
        owner._syncing = False


def fit_slider(owner, name: str, spare: int, widget) -> None:
    """Bound the window slider ``owner.<name>`` to ``spare`` scroll positions (its value kept
    within them). A slider needs end > start: with nothing to scroll it is shown disabled."""
    owner.param[name].bounds = (0, max(spare, 1))
    setattr(owner, name, min(getattr(owner, name), max(spare, 0)))
    widget.disabled = spare <= 0


def fit_window_controls(dash) -> None:
    """Bounds of a dashboard's window sliders for the current n; disabled when nothing
    scrolls."""
    win = dash._source.window(dash.view, dash.window, dash.row0, dash.col0)
    n = dash.sim.engine.n
    spare_rows = n - win.rows
    spare_cols = (n - win.cols) if dash.view == "weights" else 0
    with code_edits(dash):
        fit_slider(dash, "row0", spare_rows, dash.row_slider)
        fit_slider(dash, "col0", spare_cols, dash.col_slider)
    dash.col_slider.visible = dash.view == "weights"


def show_stats(dash, stats: dict) -> None:
    """A frame's counters, live threshold and speed-ups (:meth:`FrameSource.stats`) on the
    dashboard's page."""
    dash.counters.object = counters_html(stats)
    dash.settings.follow_threshold(stats["threshold"])
    for key, number in dash.speedups.items():
        ratio = stats["speedup"][key]
        # no ratio yet: a grey dash, not a red one
        colors = _NO_RATIO_COLORS if ratio is None else _RATIO_COLORS
        value = 1.0 if ratio is None else ratio
        number.param.update(value=value, format=fmt_ratio(ratio), colors=colors)
