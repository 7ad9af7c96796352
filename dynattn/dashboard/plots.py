"""HoloViews elements and live plots of the dashboard, built from frame data.

The element builders are module-level functions, not methods, on purpose: a DynamicMap keeps
its callback alive, and a bound method would tie every stream to the Dashboard and keep a
closed session's view in memory (panel#8580). Plots are built once per view and fed through
streams (a ``Pipe`` for the heatmaps, a bounded ``Buffer`` for the time series); nothing here
is rebuilt per tick.
"""

from __future__ import annotations

import functools

import holoviews as hv
import holoviews.plotting.bokeh
import numpy as np
import pandas as pd
from bokeh.models import CustomJSTickFormatter

from .frames import STRATEGIES

__all__ = ["cost_plot", "error_plot", "heat_image", "heatmaps", "pending_plot", "series_plots"]

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
_HEAT_SIZE = (330, 280)  # pixels per heatmap: three fit beside the sidebar at 1366 wide
# No wheel zoom: over a plot the mouse wheel scrolls the page, as everywhere else.
_TOOLS = ["pan", "box_zoom", "reset", "save"]
_SERIES_OPTS = {
    "width": 330,
    "height": 250,
    "show_grid": True,
    "default_tools": _TOOLS,
    "legend_position": "top",  # above the plot, never over the curves
    "legend_opts": {
        "orientation": "horizontal",
        "label_text_font_size": "8pt",
        "spacing": 6,
        "padding": 2,
        "glyph_height": 10,
        "glyph_width": 14,
        "margin": 0,
    },
}


# Tick labels as a person writes them: "6e-3", "1e-4", "2.5e-7", "0.5", "20", "1e9", never
# "6.000e-3" (Bokeh's fallback on a log axis spanning less than a decade) nor "0.000007".
# Plain between 0.01 and 10,000; else up to three digits and a short exponent.
_TICK_LABEL_JS = """
if (tick == 0) return "0";
const x = Number(tick.toPrecision(3));
const a = Math.abs(x);
if (a >= 1e-2 && a < 1e4) return String(x);
return x.toExponential().replace("e+", "e");
"""


def _readable_tick_labels(formatted) -> None:
    """Give ``formatted`` (an axis or a colour bar) the labels of ``_TICK_LABEL_JS``; once per
    plot, a model of its own (a Bokeh model belongs to one session's document)."""
    if not isinstance(formatted.formatter, CustomJSTickFormatter):
        formatted.formatter = CustomJSTickFormatter(code=_TICK_LABEL_JS)


def _readable_log_axis(plot, element) -> None:
    """A log axis with a few labelled decades, no minor ticks (Bokeh otherwise draws a black
    block of ticks when the values span twenty decades) and short labels."""
    axis = plot.state.yaxis[0]
    axis.ticker.desired_num_ticks = 4
    axis.minor_tick_line_color = None
    _readable_tick_labels(axis)


def _readable_colorbar(plot, element) -> None:
    """Short colour-bar labels ("7e-6", not "0.000007")."""
    colorbar = plot.handles.get("colorbar")
    if colorbar is not None:
        _readable_tick_labels(colorbar)


def heat_image(data: dict, role: str) -> hv.Image:
    """The heatmap of one ``role`` from a frame's heat payload.

    Parameters
    ----------
    data : dict
        A :attr:`~dynattn.dashboard.frames.Frame.heat` payload.
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
    left, bottom, right, top = data["bounds"]
    return hv.Image(
        stacked,
        bounds=data["bounds"],
        kdims=list(_KDIMS[data["view"]]),
        vdims=vdims,
        label=_TITLES[role],
    ).opts(xlim=(left, right), ylim=(bottom, top), backend="bokeh")


def heatmaps(pipe: hv.streams.Pipe, view: str) -> dict[str, hv.DynamicMap]:
    """The three live heatmaps (lazy, exact, difference) fed by ``pipe``.

    Equal plot sizes with a colour bar each give equal image frames; lazy and exact show the
    same (shared) colour range. Hovering reads query, key (or feature) and the three values.
    """
    col_label = "key j" if view == "weights" else "feature c"
    out = {}
    for role in ("lazy", "exact", "diff"):
        # Bokeh names an image's own (coloured) value "image"; the others keep their names.
        fields = {name: "@image" if name == role else f"@{{{name}}}" for name in _ROLES}
        hover = [
            ("query i", "$y{0}"),
            (col_label, "$x{0}"),
            ("lazy", fields["lazy"] + "{%.5g}"),
            ("exact", fields["exact"] + "{%.5g}"),
            ("|lazy − exact|", fields["diff"] + "{%.3g}"),
        ]
        dmap = hv.DynamicMap(functools.partial(heat_image, role=role), streams=[pipe])
        out[role] = dmap.opts(
            cmap=_CMAPS["diff" if role == "diff" else view],
            framewise=True,
            invert_yaxis=True,
            width=_HEAT_SIZE[0],
            height=_HEAT_SIZE[1],
            default_tools=_TOOLS,
            tools=["hover"],
            hover_tooltips=hover,
            hover_formatters={field: "printf" for field in fields.values()},
            title=_TITLES[role],
            colorbar=True,
            hooks=[_readable_colorbar],
            backend="bokeh",
        )
    return out


def _positive(values: pd.Series) -> np.ndarray:
    """Values with zeros replaced by NaN, for a log axis (an exact answer has error 0)."""
    arr = values.to_numpy(dtype=float)
    return np.where(arr > 0, arr, np.nan)


def error_plot(data: pd.DataFrame, log: bool) -> hv.Overlay:
    """Error of the lazy (stale) output over ticks, every flush marked by a vertical line.

    Parameters
    ----------
    data : pandas.DataFrame
        Tick records with the columns :data:`~dynattn.dashboard.frames.SERIES`.
    log : bool
        For a log axis: errors of 0 (exact ticks) become NaN, gaps in the curves.

    Returns
    -------
    holoviews.Overlay
        Curves of ``rel_error`` (relative Frobenius) and ``max_abs_error``, and ``VLines``.
        Styles are set once on the live plot (:func:`series_plots`), not per element: a
        frame then costs one element per curve.
    """
    tick = data["tick"].to_numpy()
    error = hv.Dimension("error", label="error of the lazy output")
    curves = [
        hv.Curve(
            (tick, _positive(data[col]) if log else data[col].to_numpy(float)),
            "tick",
            error,
            label=label,
        )
        for col, label in (("rel_error", "relative"), ("max_abs_error", "largest entry"))
    ]
    flushes = hv.VLines(data.loc[data["flushed"] > 0, "tick"].to_numpy(), kdims=["tick"])
    return hv.Overlay([*curves, flushes])


def pending_plot(data: pd.DataFrame) -> hv.Overlay:
    """Pending updates and flushes over ticks: the pending count (a sawtooth: it grows each
    tick and drops at a flush) and one spike per flushing tick, as tall as the rows it
    recomputed."""
    flushed = data.loc[data["flushed"] > 0]
    count = hv.Dimension("pending", label="updates")
    pending = hv.Curve(data, "tick", count, label="pending")
    spikes = hv.Spikes(
        flushed, "tick", hv.Dimension("flush_rows", label="updates"), label="flush (rows)"
    )
    return pending * spikes


def cost_plot(data: pd.DataFrame, unit: str, log: bool) -> hv.NdOverlay:
    """Cumulative cost of the four strategies over ticks.

    Parameters
    ----------
    data : pandas.DataFrame
        Tick records with the columns :data:`~dynattn.dashboard.frames.SERIES`.
    unit : {"seconds", "flops"}
    log : bool
        For a log axis: zero costs become NaN.

    Returns
    -------
    holoviews.NdOverlay
        One curve per strategy (:data:`~dynattn.dashboard.frames.STRATEGIES`), keyed by
        ``strategy``.
    """
    tick = data["tick"].to_numpy()
    curves = {}
    for key, label in STRATEGIES.items():
        col = data[f"{key}_{unit}"]
        values = _positive(col) if log else col.to_numpy(dtype=float)
        curves[label] = hv.Curve((tick, values), "tick", hv.Dimension("cost", label=unit))
    return hv.NdOverlay(curves, kdims="strategy")


def _series_opts(title: str, log: bool) -> dict:
    hooks = [_readable_log_axis] if log else []
    return {**_SERIES_OPTS, "title": title, "logy": log, "hooks": hooks}


def series_plots(buffer: hv.streams.Buffer, log_error: bool, cost_unit: str, log_cost: bool):
    """The three live time series fed by ``buffer``: ``(error, pending, cost)`` DynamicMaps."""
    error = hv.DynamicMap(functools.partial(error_plot, log=log_error), streams=[buffer]).opts(
        {
            "Curve": {"tools": ["hover"], "color": hv.Cycle(["#1f77b4", "#d62728"])},
            "VLines": {"color": "#888888", "alpha": 0.35, "line_width": 1},
            "Overlay": _series_opts("Lazy output error (grey: flushes)", log_error),
        },
        backend="bokeh",
    )
    pending = hv.DynamicMap(pending_plot, streams=[buffer]).opts(
        {
            "Curve": {"color": "#2166ac", "tools": ["hover"], "interpolation": "steps-post"},
            "Spikes": {"color": "#d6604d", "line_width": 2, "tools": ["hover"]},
            "Overlay": _series_opts("Pending updates and flushes", False),
        },
        backend="bokeh",
    )
    cost = hv.DynamicMap(
        functools.partial(cost_plot, unit=cost_unit, log=log_cost), streams=[buffer]
    ).opts(
        {
            "Curve": {"tools": ["hover"]},
            "NdOverlay": _series_opts(f"Cumulative cost ({cost_unit})", log_cost),
        },
        backend="bokeh",
    )
    return error, pending, cost
