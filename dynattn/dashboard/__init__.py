"""Live dashboard: watch a lazy attention engine drift from the exact answer and catch up.

Three layers, HoloViz style:

* :mod:`.frames` prepares what a frame shows (heatmap windows, block reductions, time-series
  rows, counters, the per-frame work budget) with numpy and pandas only;
* :mod:`.plots` builds HoloViews elements and the live plots fed by streams;
* :mod:`.view` holds :class:`Dashboard`, a Panel ``Viewer`` whose widgets come from ``param``
  declarations (:mod:`.controls`), with guided :mod:`.lessons` and page text in :mod:`.text`;
* :mod:`.text_view` holds :class:`TextExplorer`, a real model's attention over a text and its
  word edits played through a lazy engine, drawn by :mod:`.heatmaps` (plain Bokeh,
  for speed); :mod:`.page` puts both sources on one page
  (:func:`app_page`).

Run it with ``panel serve app.py`` or show ``Dashboard()`` / ``TextExplorer()`` in a notebook
after ``pn.extension()``.
"""

from .frames import (
    MAX_SIDE,
    SERIES,
    STRATEGIES,
    WINDOWS,
    Frame,
    FrameSource,
    Pacer,
    Window,
    block_max,
    block_mean,
    plan_window,
)
from .lessons import LESSONS, Lesson
from .page import app_page
from .text_view import TextExplorer
from .view import Dashboard

__all__ = [
    "LESSONS",
    "MAX_SIDE",
    "SERIES",
    "STRATEGIES",
    "WINDOWS",
    "Dashboard",
    "Frame",
    "FrameSource",
    "Lesson",
    "Pacer",
    "TextExplorer",
    "Window",
    "app_page",
    "block_max",
    "block_mean",
    "plan_window",
]
