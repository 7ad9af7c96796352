"""The simulation's record: one row a tick in a fixed-size ring buffer (:class:`Timeline`),
its columns, and its CSV form (written and read back exactly).

Memory is ``capacity × len(TIMELINE_COLUMNS)`` numbers, fixed at construction, so a simulation
that runs for days keeps the last ``capacity`` ticks; appending is O(columns).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping

import numpy as np

from . import _validate as check

__all__ = ["COST_COLUMNS", "MAX_CAPACITY", "TIMELINE_COLUMNS", "TIME_COLUMNS", "Timeline"]

#: Columns of a tick record, in order. Costs are cumulative since the last rebuild.
TIMELINE_COLUMNS = (
    "tick",
    "updates",
    "pending",
    "touched_rows",
    "flushed",
    "flush_rows",
    "flush_seconds",
    "flush_flops",
    "threshold",
    "rel_error",
    "max_abs_error",
    "lazy_seconds",
    "eager_seconds",
    "ondemand_seconds",
    "recompute_seconds",
    "lazy_flops",
    "eager_flops",
    "ondemand_flops",
    "recompute_flops",
    "tick_seconds",
)
_INT_COLUMNS = frozenset(("tick", "updates", "pending", "touched_rows", "flushed", "flush_rows"))
#: Most records a timeline holds: 256 MiB of columns (1,677,721 ticks), whoever asks
#: (the command line, the dashboard, code): a capacity is allocated at once.
MAX_CAPACITY = (256 * 2**20) // (8 * len(TIMELINE_COLUMNS))

#: The cumulative cost columns (seconds and flops of each strategy).
COST_COLUMNS = TIMELINE_COLUMNS[11:19]
#: Columns holding measured times: the only ones that differ between two identical runs
#: (with the ``cost`` policy, flush decisions follow measured times, so more columns do).
TIME_COLUMNS = (
    "flush_seconds",
    *(c for c in COST_COLUMNS if c.endswith("seconds")),
    "tick_seconds",
)


class Timeline:
    """Fixed-size history of tick records (a ring buffer of preallocated columns).

    Parameters
    ----------
    capacity : int
        Records kept; appending to a full timeline drops the oldest.

    Notes
    -----
    Memory ``O(capacity · len(columns))`` whatever the number of ticks; :meth:`append` is
    O(columns). Readers (:meth:`as_dict`, :meth:`tail`) return oldest-first copies.
    """

    columns = TIMELINE_COLUMNS

    def __init__(self, capacity: int = 10_000):
        self._data = {}
        self._capacity = 0
        self._start = 0
        self._size = 0
        self.resize(capacity)

    @property
    def capacity(self) -> int:
        """Maximum number of records kept."""
        return self._capacity

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"Timeline({self._size} of {self._capacity} records)"

    def append(self, record: Mapping) -> None:
        """Store one record; it must have a value for every column (extra keys are ignored)."""
        missing = [c for c in self.columns if c not in record]
        if missing:
            raise KeyError(f"record lacks column(s) {', '.join(missing)}")
        slot = (self._start + self._size) % self._capacity
        for c in self.columns:
            self._data[c][slot] = record[c]
        if self._size < self._capacity:
            self._size += 1
        else:
            self._start = (self._start + 1) % self._capacity

    def _order(self, k: int) -> np.ndarray:
        """Slots of the last ``k`` records, oldest first."""
        return (self._start + self._size - k + np.arange(k)) % self._capacity

    def tail(self, k: int) -> dict[str, np.ndarray]:
        """The last ``min(k, len(self))`` records as ``{column: array}``, oldest first."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k={k!r} must be an integer >= 0")
        idx = self._order(min(k, self._size))
        return {c: self._data[c][idx] for c in self.columns}

    def as_dict(self) -> dict[str, np.ndarray]:
        """All stored records as ``{column: array}`` (int64 or float64), oldest first."""
        return self.tail(self._size)

    def resize(self, capacity: int) -> None:
        """Change the capacity, keeping the most recent records that fit."""
        capacity = check.check_int("capacity", capacity)
        if capacity > MAX_CAPACITY:
            raise ValueError(
                f"capacity={capacity:,} is more than a timeline holds ({MAX_CAPACITY:,} "
                f"records, 256 MiB); keep fewer ticks"
            )
        kept = self.tail(min(self._size, capacity)) if self._data else {}
        self._data = {
            c: np.zeros(capacity, dtype=np.int64 if c in _INT_COLUMNS else np.float64)
            for c in self.columns
        }
        self._size = len(kept[self.columns[0]]) if kept else 0
        for c, values in kept.items():
            self._data[c][: self._size] = values
        self._capacity = capacity
        self._start = 0

    def to_csv(self, path_or_buf) -> None:
        """Write a header and one line per record, oldest first.

        Floats are written as Python's shortest round-trip representation, so
        :meth:`read_csv` gives back the identical values. ``path_or_buf`` is a path or a text
        file object.
        """
        data = self.as_dict()
        rows = zip(*(data[c].tolist() for c in self.columns), strict=True)
        if isinstance(path_or_buf, (str, os.PathLike)):
            with open(path_or_buf, "w", newline="") as f:
                _write_csv(f, self.columns, rows)
        else:
            _write_csv(path_or_buf, self.columns, rows)

    @staticmethod
    def read_csv(path_or_buf) -> dict[str, np.ndarray]:
        """Read a file written by :meth:`to_csv` back into ``{column: array}``.

        Known integer columns come back as int64, every other column as float64.
        """
        if isinstance(path_or_buf, (str, os.PathLike)):
            with open(path_or_buf, newline="") as f:
                return _read_csv(f, os.fspath(path_or_buf))
        return _read_csv(path_or_buf, str(getattr(path_or_buf, "name", "<buffer>")))

    def to_dataframe(self):
        """The records as a ``pandas.DataFrame`` (needs pandas), oldest first."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "Timeline.to_dataframe needs pandas; install it with "
                "`pip install pandas`, or use Timeline.as_dict()"
            ) from exc
        return pd.DataFrame(self.as_dict(), columns=list(self.columns))


def _write_csv(f, columns, rows) -> None:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def _read_csv(f, name: str) -> dict[str, np.ndarray]:
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{name}: empty file, expected a header line") from None
    lines = list(reader)
    bad = next((k for k, line in enumerate(lines) if len(line) != len(header)), None)
    if bad is not None:
        raise ValueError(
            f"{name}: line {bad + 2} has {len(lines[bad])} fields; the header has {len(header)}"
        )
    columns = list(zip(*lines, strict=True)) if lines else [()] * len(header)
    out = {}
    for c, values in zip(header, columns, strict=True):
        dtype = np.int64 if c in _INT_COLUMNS else np.float64
        try:
            out[c] = np.array(values, dtype=dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: column {c!r} is not {np.dtype(dtype)} ({exc})") from None
    return out
