"""Markdown tables and time formatting shared by the sections' reports."""

from __future__ import annotations

import math

__all__ = ["table", "us"]


def us(seconds) -> str:
    """Seconds as ``"4.2 µs"``, ``"152 µs"`` or ``"85 ms"``; ``"-"`` for None, inf or NaN."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    micro = seconds * 1e6
    if micro >= 1e5:
        return f"{micro / 1e3:,.0f} ms"
    return f"{micro:,.1f} µs" if micro < 100 else f"{micro:,.0f} µs"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table with padded columns (readable as plain text too)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
