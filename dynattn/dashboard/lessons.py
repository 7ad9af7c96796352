"""Guided scenarios ("lessons") of the dashboard: settings, and what to notice.

Each lesson sets the simulation and the view, starts playing, and shows a two-line caption.
Plain data (no plotting import): the view applies them, tests check each one shows what its
caption promises.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LESSONS", "Lesson"]

# What every lesson starts from, so a lesson never inherits a setting of the previous one.
_BASE = {
    "n": 1024,
    "d": 32,
    "preset": "local",
    "stream": "entries",
    "policy": "fixed",
    "threshold": 48,
    "tolerance": 1e-3,
    "updates_per_tick": 16,
    "queries_per_tick": 256,
    "k_share": 0.5,
    "delta_scale": 0.1,
    "scale": "1/sqrt(d)",
    "dtype": "float64",
    "seed": 0,
}
_VIEW = {"view": "weights", "window": 128, "row0": 0, "col0": 0, "ticks_per_frame": 1}


@dataclass(frozen=True)
class Lesson:
    """One guided scenario.

    Attributes
    ----------
    title : str
        Shown in the lesson selector.
    caption : str
        Two lines (Markdown) of what to notice.
    settings : dict
        Simulation settings (:class:`~dynattn.simulation.SimulationConfig` names) on top of
        the common base.
    view : dict
        Dashboard view settings (``view``, ``window``, ``ticks_per_frame``, ...) on top of
        the common base.
    """

    title: str
    caption: str
    settings: dict = field(default_factory=dict)
    view: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        """All simulation settings of the lesson."""
        return {**_BASE, **self.settings}

    @property
    def view_params(self) -> dict:
        """All view settings of the lesson."""
        return {**_VIEW, **self.view}


LESSONS = (
    Lesson(
        "1 · Updates queue up, a flush catches up",
        "Each tick queues 16 updates: the **difference** map fills in, the **error** climbs; "
        "256 exact queries a tick are corrected on the fly.  \nEvery third tick the engine "
        "**flushes** (48 pending): one batched product catches up, the error drops to zero — "
        "a sawtooth — and lazy stays ahead (green).",
    ),
    Lesson(
        "2 · A changed key makes a column of P stale",
        "Only K changes, one entry per tick: every query that attends to that key sees it, so "
        "the difference lights up a **column** (here, within the band of attention).  \nA "
        "flush every 8 updates clears it; queries are exact all along (corrected on the fly).",
        settings={"n": 256, "k_share": 1.0, "updates_per_tick": 1, "threshold": 8},
        view={"window": 64},
    ),
    Lesson(
        "3 · A changed value leaves P alone, only O goes stale",
        "Only V changes: the weights P stay exact, but the **output O = PV** goes stale in "
        "the changed feature **columns**, for every query.  \nSwitch the view to *attention "
        "weights P*: its difference map stays blank.",
        settings={"n": 256, "k_share": 0.0, "updates_per_tick": 2, "threshold": 16},
        view={"view": "output"},
    ),
    Lesson(
        "4 · A query after every update: lazy loses to eager",
        "One update per tick, then every row is queried: each query corrects for every "
        "pending update, so waiting for 512 to flush costs more than flushing at once.  \n"
        "Watch **vs eager** drop below 1 (red), then try the *cost* policy.",
        settings={"n": 256, "updates_per_tick": 1, "threshold": 512},
    ),
    Lesson(
        "5 · Rare queries: answering on demand wins",
        "64 updates per tick and a single query: flushing after every 64 updates keeps caches "
        "fresh that nobody reads.  \nComputing the one queried row from scratch (**on "
        "demand**) is cheaper: **vs on demand** stays below 1.",
        settings={"n": 256, "updates_per_tick": 64, "queries_per_tick": 1, "threshold": 64},
    ),
    Lesson(
        "6 · The cost model finds the threshold",
        "Policy *cost*: the engine times its flushes and queries and picks the threshold with "
        "the lowest cost per update.  \nThe **threshold** slider follows its choice live; "
        "drag it to take over with a fixed threshold.",
        settings={"policy": "cost"},
    ),
    Lesson(
        "7 · An error budget caps the staleness",
        "Policy *error*: the engine flushes before the estimated relative error of its caches "
        "would exceed ε = 10⁻².  \nOn the **error** plot the relative error rises towards the "
        "budget and drops at each flush, staying below it.",
        settings={"n": 256, "policy": "error", "tolerance": 1e-2, "updates_per_tick": 4},
    ),
    Lesson(
        "8 · A hot spot coalesces",
        "All updates hit a small moving band of rows: 64 pending updates touch only a few "
        "rows.  \nEach **flush** spike (rows recomputed) stays far below the pending count: "
        "batching pays most here.",
        settings={"stream": "hotspot", "threshold": 64},
        view={"ticks_per_frame": 2},
    ),
)
