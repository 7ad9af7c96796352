"""Live dashboard: watch a lazy attention engine drift from the exact answer and catch up.

Three layers, HoloViz style:

* :mod:`.frames` prepares what a frame shows (heatmap windows, block reductions, time-series
  rows, counters, the per-frame work budget) with numpy and pandas only;
* :mod:`.plots` builds HoloViews elements and the live plots fed by streams;
* :mod:`.view` holds :class:`Dashboard`, a Panel ``Viewer`` whose widgets come from ``param``
  declarations (:mod:`.controls`), with guided :mod:`.lessons` and page text in :mod:`.text`.

Run it with ``panel serve app.py`` or show ``Dashboard()`` in a notebook after
``pn.extension()``.
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
    "Window",
    "block_max",
    "block_mean",
    "plan_window",
]
