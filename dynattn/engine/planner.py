"""Whether a single exact query corrects its cached row or computes it afresh
(:class:`QueryPlanner`).

Costs are counted in *units*: one element of K read by a fresh query (a fresh entry reads
n·d of them). Correcting a cached row reads ``2(3d+2)`` numbers per touched row, once the
correction pack has caught up on the rows updated since its last use; a catch-up costs
``pack_cost = (fixed, per_row)`` units, scaled by the measured ratio of the two costs once a
fresh query and a catch-up have been timed (a catch-up is mostly per-call overhead, a fresh
query memory traffic: how they compare depends on the dtype, n and the machine).

Catching up serves every later query until the next update, so it is bought as in ski rental:
queries compute afresh until what that cost them beyond a corrected query, since the last
update, would have paid for the catch-up (at most twice the better choice in hindsight; one
query after each update never pays for it). Until three fresh queries have been timed (one
alone may be a stall, or cold after a flush) such choices compute afresh, to time them.

The planner holds only numbers and timings; the engine hands it the queue's size and a pack
(anything with ``behind`` and ``rows_behind``), so it can be tested with injected costs.
"""

from __future__ import annotations

import math
import statistics
from collections import deque


class QueryPlanner:
    """Chooses between correcting and computing afresh; records what each choice cost.

    Parameters
    ----------
    n, d : int
        Keys and head dimension: a fresh entry reads ``n·d`` units.
    """

    # measured 30-40 µs + 1.4-2.1 µs a row against 0.09-0.24 ns an element read afresh, at
    # n = 4,096-16,384, d = 64
    pack_cost = (150_000, 10_000)

    def __init__(self, n: int, d: int):
        self.fresh_units = n * d
        self.row_units = 2 * (3 * d + 2)
        self.max_rows = (n * d) // self.row_units  # past this, correcting never pays
        self.fresh_log: deque[float] = deque(maxlen=32)  # seconds of entries computed afresh
        self.catch_log: deque[float] = deque(maxlen=32)  # seconds per catch-up unit
        self.catch_ratio = math.nan  # catch-up unit / fresh unit, measured; NaN before
        self.n_fresh = self.n_catch = 0
        self.fresh_count, self.fresh_mark = 0, 0  # fresh choices since update number mark
        self.fresh_log_len = math.inf  # see repeats_fresh

    @property
    def fresh_seconds(self) -> float:
        """Median seconds of the recent entries computed afresh (NaN before any)."""
        return statistics.median(self.fresh_log) if self.fresh_log else math.nan

    def repeats_fresh(self, logged: int, updates: int) -> bool:
        """Whether a query may repeat the last fresh choice without estimating again.

        Once the estimate chose afresh with the log unsettled, a query after more logged
        updates would come out the same (more rows make correcting and catching up dearer,
        never cheaper, and the estimate sees the log as one row), until the log is settled, a
        flush, or a new measured ratio (:meth:`forget_fresh_choice`).
        """
        if logged > self.fresh_log_len:
            self.fresh_log_len = logged
            self.fresh_count, self.fresh_mark = 1, updates
            return True
        return False

    def forget_fresh_choice(self) -> None:
        self.fresh_log_len = math.inf

    def prefers_fresh(self, touched: int, pack, logged: int, updates: int) -> bool:
        """Whether a query with ``touched`` rows queued (a lower bound on |S| while ``logged``
        updates are not queued) computes afresh; ``updates`` is the engine's update count."""
        fresh = self.fresh_units
        correct = self.row_units * touched
        if correct > fresh:
            return True
        if not (logged or pack.behind):
            return False  # the pack is up to date: the common case
        catch_up = self.catch_up_units(pack.rows_behind)
        if self.fresh_mark != updates:  # what was paid before an update is sunk
            self.fresh_count, self.fresh_mark = 0, updates
        if len(self.fresh_log) < 3:
            self.fresh_count += 1
            return True
        ratio = self.catch_ratio
        if ratio == ratio:  # not NaN: measured
            catch_up *= ratio
        # the queue is constant between updates, so the regret is the count of fresh
        # queries times what each paid beyond a corrected one
        if correct + catch_up <= fresh + self.fresh_count * (fresh - correct):
            return False
        self.fresh_count += 1
        if logged:
            self.fresh_log_len = logged
        return True

    def catch_up_units(self, rows: int) -> int:
        """A catch-up of the pack on ``rows`` rows (at least one: each logged entry makes its
        row new to the pack or dirty), in units."""
        fixed, per_row = self.pack_cost
        return fixed + per_row * max(rows, 1)

    def note_fresh(self, seconds: float) -> None:
        """Record an entry computed afresh."""
        self.fresh_log.append(seconds)
        self.n_fresh += 1
        if self.n_fresh <= 3 or self.n_fresh % 16 == 0:
            self.measure_catch_ratio()

    def note_catch_up(self, seconds: float, units: int) -> None:
        """Record a catch-up of ``units``."""
        self.catch_log.append(seconds / units)
        self.n_catch += 1
        if self.n_catch <= 3 or self.n_catch % 16 == 0:
            self.measure_catch_ratio()

    def measure_catch_ratio(self) -> None:
        """Seconds per catch-up unit over seconds per fresh unit, as medians of the recent
        timings; redone after the first three of each and every 16th (the medians cost
        ~1 µs, as much as the rest of a decision)."""
        if len(self.fresh_log) >= 3:
            unit_s = self.fresh_seconds / self.fresh_units
            if self.catch_log:
                self.catch_ratio = statistics.median(self.catch_log) / unit_s
                self.fresh_log_len = math.inf
