"""The dashboard's heatmaps: stale (lazy), exact and difference maps, redrawn in place.

Two kinds, both three Bokeh figures over **one** shared data source, so that a redraw replaces
the source's columns once and hovering any map reads all three values:

* :class:`MatrixHeatmaps` (the synthetic source): images of a window of P or O in matrix
  coordinates;
* :class:`TokenHeatmaps` (the Text source): rectangles on categorical axes whose factors are
  the window's ``"3 the"`` token labels.

Why plain Bokeh and not HoloViews elements: HoloViews builds new elements, applies options and
re-derives ranges on every update (65 ms per 128 × 128 image; for a categorical heatmap it also
groups the cells by label and formats a hover string per cell, 37 ms per 32 × 32 window), and
that ran on the event loop three times per frame, where a click waits for it. Replacing a
source's columns costs about a millisecond. The time series stay HoloViews plots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from bokeh.layouts import gridplot
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    CustomJSTickFormatter,
    FactorRange,
    HoverTool,
    LinearColorMapper,
    Range1d,
)
from bokeh.plotting import figure
from holoviews.plotting.util import process_cmap

__all__ = ["TICK_LABEL_JS", "TOOLS", "MatrixHeatmaps", "TokenHeatmaps"]

# Tick labels as a person writes them: "6e-3", "1e-4", "2.5e-7", "0.5", "20", "1e9", never
# "6.000e-3" (Bokeh's fallback on a log axis spanning less than a decade) nor "0.000007".
# Plain between 0.01 and 10,000; else up to three digits and a short exponent.
TICK_LABEL_JS = """
if (tick == 0) return "0";
const x = Number(tick.toPrecision(3));
const a = Math.abs(x);
if (a >= 1e-2 && a < 1e4) return String(x);
return x.toExponential().replace("e+", "e");
"""


#: Tools of every dashboard plot besides the hover. No wheel zoom: over a plot the mouse wheel
#: scrolls the page, as everywhere else.
TOOLS = ("pan", "box_zoom", "reset", "save")


def _palette(name: str) -> list[str]:
    return process_cmap(name, 256)  # the same colours HoloViews gave these maps


def _heat_figures(titles: dict, mappers: dict, draw, labels, ranges, size, tools, hover) -> dict:
    """One figure per role of ``titles``, ``draw(fig, role, mapper)`` adding its glyph: the
    difference coloured by ``mappers["diff"]``, the others by ``mappers["values"]``; all on
    the same ``ranges`` (panning one pans all), each with its colour bar (short labels) and
    a hover tool of its own, ``HoverTool(**hover)``; no grid, no tick marks."""
    figures = {}
    for role, title in titles.items():
        mapper = mappers["diff" if role == "diff" else "values"]
        fig = figure(
            title=title,
            x_range=ranges[0],
            y_range=ranges[1],
            width=size[0],
            height=size[1],
            tools=[*tools, HoverTool(**hover)],
            x_axis_label=labels[0],
            y_axis_label=labels[1],
        )
        labels_js = CustomJSTickFormatter(code=TICK_LABEL_JS)
        fig.add_layout(ColorBar(color_mapper=mapper, width=12, formatter=labels_js), "right")
        fig.title.text_font_size = "10pt"
        fig.grid.visible = False
        fig.axis.major_tick_line_color = None
        fig.axis.minor_tick_line_color = None
        draw(fig, role, mapper)
        figures[role] = fig
    return figures


def _set_range(mapper: LinearColorMapper, lim) -> None:
    low, high = (float(x) for x in lim)
    if (mapper.low, mapper.high) != (low, high):
        mapper.update(low=low, high=high)


#: The synthetic source's three maps and their titles.
MATRIX_TITLES = {
    "lazy": "Lazy: what the caches say",
    "exact": "Exact: the true values",
    "diff": "Difference |lazy − exact|",
}


class MatrixHeatmaps:
    """Lazy, exact and difference images of a window of P (``view="weights"``) or O
    (``"output"``), side by side.

    Parameters
    ----------
    view : {"weights", "output"}
        Axis labels and colour map (viridis for P, diverging coolwarm for O).
    size : (int, int)
        Width and height of each figure in pixels.
    tools : sequence of str, optional
        Bokeh tools besides the hover (default :data:`TOOLS`); one toolbar above the row
        serves all three.

    Attributes
    ----------
    source : bokeh.models.ColumnDataSource
        One image each of ``lazy``, ``exact`` and ``diff`` and their placement ``x``, ``y``,
        ``dw``, ``dh`` (the window's bounds in matrix coordinates).
    figures : dict of str to bokeh.plotting.figure
        ``"lazy"``, ``"exact"``, ``"diff"``; their axes are linked (query 0 at the top).
    layout : bokeh.models.GridPlot
    """

    def __init__(self, view: str, size: tuple[int, int], tools=TOOLS):
        self.view = view
        columns = (*MATRIX_TITLES, "x", "y", "dw", "dh")
        self.source = ColumnDataSource({name: [] for name in columns})
        self.x_range, self.y_range = Range1d(0, 1), Range1d(1, 0)
        values = "viridis" if view == "weights" else "coolwarm"
        self.mappers = {
            "values": LinearColorMapper(palette=_palette(values)),
            "diff": LinearColorMapper(palette=_palette("Reds")),
        }
        column = "key j" if view == "weights" else "feature c"
        hover = [
            ("query i", "$y{0}"),
            (column, "$x{0}"),
            ("lazy", "@lazy{%.5g}"),
            ("exact", "@exact{%.5g}"),
            ("|lazy − exact|", "@diff{%.3g}"),
        ]
        formats = {"@lazy": "printf", "@exact": "printf", "@diff": "printf"}

        def draw(fig, role, mapper):
            place = {"x": "x", "y": "y", "dw": "dw", "dh": "dh"}
            fig.image(image=role, **place, source=self.source, color_mapper=mapper)

        self.figures = _heat_figures(
            MATRIX_TITLES,
            self.mappers,
            draw,
            (column, "query i"),
            (self.x_range, self.y_range),
            size,
            tools,
            {"tooltips": hover, "formatters": formats},
        )
        self.layout = gridplot([list(self.figures.values())], toolbar_location="above")

    def show(self, heat: dict) -> None:
        """Draw a frame's heat payload (:attr:`~dynattn.dashboard.frames.Frame.heat`: the
        three images, ``bounds``, ``clim`` and ``dlim``). O(window); call it inside
        ``pn.io.hold()`` to send one message."""
        left, bottom, right, top = (float(x) for x in heat["bounds"])
        # an image's first row is drawn at y (the bottom bound); the inverted y range puts
        # that row, query 0 of the window, at the top
        self.source.data = {
            "lazy": [heat["lazy"]],
            "exact": [heat["exact"]],
            "diff": [heat["diff"]],
            "x": [left],
            "y": [bottom],
            "dw": [right - left],
            "dh": [top - bottom],
        }
        if (self.x_range.start, self.x_range.end) != (left, right):
            self.x_range.update(start=left, end=right)
        if (self.y_range.start, self.y_range.end) != (top, bottom):
            self.y_range.update(start=top, end=bottom)
        _set_range(self.mappers["values"], heat["clim"])
        _set_range(self.mappers["diff"], heat["dlim"])

    def images(self) -> dict[str, np.ndarray]:
        """The images drawn now, ``{"lazy", "exact", "diff"}`` -> (rows, cols) array, row 0
        the window's first query."""
        return {role: self.source.data[role][0] for role in MATRIX_TITLES}

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of the images drawn now, in matrix coordinates."""
        d = self.source.data
        return d["x"][0], d["y"][0], d["x"][0] + d["dw"][0], d["y"][0] + d["dh"][0]


#: The Text source's three maps and their titles.
TOKEN_TITLES = {
    "exact": "Exact: the current text's attention",
    "diff": "Difference |stale − exact|",
    "stale": "Stale: what the engine's caches hold",
}
_COLUMNS = ("query", "key", "stale", "exact", "diff")
_TOOLTIPS = [
    ("query", "@query"),
    ("key", "@key"),
    ("stale", "@stale{0.0000}"),
    ("exact", "@exact{0.0000}"),
    ("|stale − exact|", "@diff{0.0e0}"),
]


class TokenHeatmaps:
    """Stale, exact and difference heatmaps of one token window, updated in place.

    Parameters
    ----------
    size : (int, int)
        Width and height of each figure in pixels.
    tools : sequence of str, optional
        Bokeh tools besides the hover (default :data:`TOOLS`); one toolbar above the grid
        serves all three.

    Attributes
    ----------
    figures : dict of str to bokeh.plotting.figure
        ``"exact"``, ``"diff"``, ``"stale"``; they share their axes' ranges (panning one pans
        all) and one data source.
    layout : bokeh.models.GridPlot
        Exact and difference side by side, stale below exact.

    Notes
    -----
    Stale and exact share one colour mapper, so equal colours mean equal weights; the
    difference has its own, white at zero.
    """

    def __init__(self, size: tuple[int, int], tools=TOOLS):
        self.source = ColumnDataSource({name: [] for name in _COLUMNS})
        self.x_range, self.y_range = FactorRange(), FactorRange()
        self.mappers = {
            "values": LinearColorMapper(palette=_palette("viridis"), low=0.0, high=1.0),
            "diff": LinearColorMapper(palette=_palette("Reds"), low=0.0, high=1.0),
        }

        def draw(fig, role, mapper):
            fill = {"field": role, "transform": mapper}
            fig.rect("key", "query", 1, 1, source=self.source, fill_color=fill, line_color=None)
            fig.axis.major_label_text_font_size = "7pt"
            fig.axis.axis_line_color = None
            fig.xaxis.major_label_orientation = np.pi / 2

        self.figures = _heat_figures(
            TOKEN_TITLES,
            self.mappers,
            draw,
            ("key token", "query token"),
            (self.x_range, self.y_range),
            size,
            tools,
            {"tooltips": _TOOLTIPS},
        )
        f = self.figures
        self.layout = gridplot(
            [[f["exact"], f["diff"]], [f["stale"], None]], toolbar_location="above"
        )

    def show(self, frame: pd.DataFrame, clim: tuple[float, float], dlim: tuple[float, float]):
        """Draw ``frame`` (columns ``query``, ``key``, ``stale``, ``exact``, ``diff``, one row
        per cell, queries major) with colour ranges ``clim`` (stale and exact) and ``dlim``
        (difference). O(cells); call it inside ``pn.io.hold()`` to send one message."""
        self.source.data = {name: frame[name].to_numpy() for name in _COLUMNS}
        keys = list(dict.fromkeys(frame["key"]))
        queries = list(dict.fromkeys(frame["query"]))
        if self.x_range.factors != keys:
            self.x_range.factors = keys
        if self.y_range.factors != queries[::-1]:  # query 0 at the top
            self.y_range.factors = queries[::-1]
        _set_range(self.mappers["values"], clim)
        _set_range(self.mappers["diff"], dlim)
