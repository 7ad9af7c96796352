"""The Text source's heatmaps: a query × key window of attention weights on token axes.

Three Bokeh figures (stale, exact, difference) draw one shared data source as rectangles on
categorical axes whose factors are the window's ``"3 the"`` token labels; hovering any cell of
any of them reads the query and key tokens and all three values.

Why plain Bokeh here and not a HoloViews ``HeatMap``: HoloViews re-aggregates a categorical
heatmap on every update (a group-by over the token labels to grid the cells, then a formatted
string per cell for the hover), about 37 ms per 32 × 32 window on this machine class, three
windows per edit. Replacing the columns of one ``ColumnDataSource`` costs under a millisecond,
which is what lets an edit at 512 tokens re-draw within 200 ms (issue 20). The synthetic
dashboard's numeric heatmaps stay HoloViews ``Image``\\ s, where HoloViews is fast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from bokeh.layouts import gridplot
from bokeh.models import ColorBar, ColumnDataSource, FactorRange, HoverTool, LinearColorMapper
from bokeh.palettes import Reds256, Viridis256
from bokeh.plotting import figure

__all__ = ["ROLES", "TokenHeatmaps"]

#: The three maps: title and colour-bar label of each.
ROLES = {
    "exact": ("Exact: the current text's attention", "weight"),
    "diff": ("Difference |stale − exact|", "|stale − exact|"),
    "stale": ("Stale: what the engine's caches hold", "weight"),
}
_COLUMNS = ("query", "key", "stale", "exact", "diff")
_TOOLTIPS = [
    ("query", "@query"),
    ("key", "@key"),
    ("stale", "@stale{0.0000}"),
    ("exact", "@exact{0.0000}"),
    ("|stale − exact|", "@diff{0.0e0}"),
]
_TICK_FONT = "7pt"


class TokenHeatmaps:
    """Stale, exact and difference heatmaps of one token window, updated in place.

    Parameters
    ----------
    size : (int, int)
        Width and height of each figure in pixels.
    tools : list of str
        Bokeh tools besides the hover (one toolbar above the grid serves all three).

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

    def __init__(self, size: tuple[int, int], tools: list[str]):
        self.source = ColumnDataSource({name: [] for name in _COLUMNS})
        self.x_range, self.y_range = FactorRange(), FactorRange()
        self.mappers = {
            "weight": LinearColorMapper(palette=Viridis256, low=0.0, high=1.0),
            "diff": LinearColorMapper(palette=Reds256[::-1], low=0.0, high=1.0),
        }
        self.figures = {role: self._figure(role, size, tools) for role in ROLES}
        f = self.figures
        self.layout = gridplot(
            [[f["exact"], f["diff"]], [f["stale"], None]], toolbar_location="above"
        )

    def _figure(self, role: str, size: tuple[int, int], tools: list[str]):
        title, bar_label = ROLES[role]
        mapper = self.mappers["diff" if role == "diff" else "weight"]
        fig = figure(
            title=title,
            x_range=self.x_range,
            y_range=self.y_range,
            width=size[0],
            height=size[1],
            tools=[*tools, HoverTool(tooltips=_TOOLTIPS)],
            x_axis_label="key token",
            y_axis_label="query token",
        )
        fig.rect(
            "key",
            "query",
            1,
            1,
            source=self.source,
            fill_color={"field": role, "transform": mapper},
            line_color=None,
        )
        fig.add_layout(ColorBar(color_mapper=mapper, title=bar_label, width=14), "right")
        fig.title.text_font_size = "10pt"
        fig.grid.visible = False
        fig.axis.major_tick_line_color = None
        fig.axis.major_label_text_font_size = _TICK_FONT
        fig.axis.axis_line_color = None
        fig.xaxis.major_label_orientation = np.pi / 2
        return fig

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
        for mapper, (low, high) in zip(self.mappers.values(), (clim, dlim), strict=True):
            mapper.update(low=float(low), high=float(high))
