"""HoloViews elements and live plots of the dashboard's time series, built from frame data.

The element builders are module-level functions, not methods, on purpose: a DynamicMap keeps
its callback alive, and a bound method would tie every stream to the Dashboard and keep a
closed session's view in memory (panel#8580). Plots are built once and fed through a bounded
``Buffer`` of tick records; nothing here is rebuilt per tick. (The heatmaps are plain Bokeh:
:mod:`.heatmaps`.)
"""

from __future__ import annotations

import functools

import holoviews as hv
import holoviews.plotting.bokeh
import numpy as np
import pandas as pd
from bokeh.models import CustomJSTickFormatter

from .frames import STRATEGIES
from .heatmaps import TICK_LABEL_JS, TOOLS

__all__ = ["cost_plot", "error_plot", "pending_plot", "series_plots"]

_SERIES_OPTS = {
    "width": 330,
    "height": 250,
    "show_grid": True,
    "default_tools": list(TOOLS),
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


def _readable_tick_labels(formatted) -> None:
    """Give ``formatted`` (an axis or a colour bar) the labels of ``_TICK_LABEL_JS``; once per
    plot, a model of its own (a Bokeh model belongs to one session's document)."""
    if not isinstance(formatted.formatter, CustomJSTickFormatter):
        formatted.formatter = CustomJSTickFormatter(code=TICK_LABEL_JS)


def _readable_log_axis(plot, element) -> None:
    """A log axis with a few labelled decades, no minor ticks (Bokeh otherwise draws a black
    block of ticks when the values span twenty decades) and short labels."""
    axis = plot.state.yaxis[0]
    axis.ticker.desired_num_ticks = 4
    axis.minor_tick_line_color = None
    _readable_tick_labels(axis)


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
