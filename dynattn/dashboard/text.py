"""Words and numbers of the dashboard page: formatting, escaping, the explanation tab.

No plotting import. Every string that comes from a user (an uploaded file's name, the
members of an archive, an exception raised on a user's input) goes through :func:`escape`
before it reaches a Markdown or HTML pane.
"""

from __future__ import annotations

import html
import math
import re

__all__ = [
    "EXPLANATION",
    "POLICY_NOTES",
    "counters_html",
    "escape",
    "fmt_flops",
    "fmt_ratio",
    "fmt_threshold",
    "rejection",
]

POLICY_NOTES = {
    "cost": "Picks the threshold itself from the measured costs of flushes and queries; the "
    "slider follows it. Drag the slider to fix a threshold yourself.",
    "fixed": "Flushes whenever this many updates are pending (1 = eager).",
    "adaptive": "The original prototype's rule: the threshold follows the recent batch sizes "
    "(between 10 and 100); the slider follows it.",
    "error": "Flushes before the estimated relative error of the caches exceeds ε.",
}

# Markdown punctuation that could format or link ("<" and ">" become entities first).
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]!|~])")


def escape(text: object) -> str:
    """``text`` made inert for a Markdown or HTML pane: HTML characters become entities and
    Markdown punctuation is backslash-escaped, so a name like ``<img onerror=…>`` or
    ``[x](javascript:…)`` is shown as typed and never interpreted.

    Examples
    --------
    >>> escape("<b>x</b>_1")
    '&lt;b&gt;x&lt;/b&gt;\\\\_1'
    """
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(text), quote=False))


def fmt_threshold(value: float) -> str:
    """``inf`` -> ``"∞"``, ``48.0`` -> ``"48"``."""
    return "∞" if math.isinf(value) else f"{value:,.0f}"


def fmt_flops(flops: float) -> str:
    """``1.25e6`` -> ``"1.2 Mflop"``."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if flops >= factor:
            return f"{flops / factor:.1f} {prefix}flop"
    return f"{flops:.0f} flop"


def fmt_ratio(ratio: float | None) -> str:
    """A speed-up for a person: ``"–"`` before there is one, two significant digits below 10
    (``0.012×``, never ``0.0×``), whole numbers above (``1,234×``)."""
    if ratio is None:
        return "–"
    if ratio >= 10:
        return f"{ratio:,.0f}×"
    return f"{ratio:.2g}×" if ratio < 1 else f"{ratio:.1f}×"


def rejection(label: str, raw: object, bounds: tuple, integer: bool, exclusive_low: bool) -> str:
    """Why a typed value was refused, e.g. ``seed must be a whole number from 0; -5 is not``."""
    low, high = bounds
    kind = "a whole number" if integer else "a number"
    parts = []
    if low is not None:
        parts.append(f"above {low:g}" if exclusive_low else f"from {low:g}")
    if high is not None:
        parts.append(f"up to {high:g}")
    shown = escape(raw) if str(raw).strip() else "an empty field"
    return f"{label} must be {kind} {' '.join(parts)}; {shown} is not."


def counters_html(s: dict) -> str:
    """The counter strip: small label above a large number, in a grid (numbers only)."""
    last = s["last_flush"]
    last_text = (
        "none yet"
        if last is None
        else f"{1e3 * last['seconds']:.2f} ms · {last['rows']:,} rows · {fmt_flops(last['flops'])}"
    )
    tick_text = "–" if s["tick_ms"] is None else f"{s['tick_ms']:.1f} ms"
    render_text = "–" if s["render_ms"] is None else f"{s['render_ms']:.0f} ms"
    cells = [
        ("ticks", f"{s['ticks']:,}"),
        ("updates", f"{s['updates']:,}"),
        ("pending updates", f"{s['pending']:,}"),
        ("touched rows |S|", f"{s['touched_rows']:,}"),
        ("flushes", f"{s['flushes']:,}"),
        ("threshold", fmt_threshold(s["threshold"])),
        ("last flush", last_text),
        ("tick: model", tick_text),
        ("frame render", render_text),
    ]
    body = "".join(
        f"<div><div style='font-size:11px;color:#666'>{label}</div>"
        f"<div style='font-size:15px;font-weight:600;white-space:nowrap'>{value}</div></div>"
        for label, value in cells
    )
    return (
        "<div style='display:grid;grid-template-columns:repeat(5,max-content);"
        f"column-gap:16px;row-gap:2px'>{body}</div>"
    )


EXPLANATION = """
## Lazy updates in one paragraph

A transformer's attention computes **O = softmax(scale · Q Kᵀ) V**: row *i* of the weight
matrix **P = softmax(scale · Q Kᵀ)** says how much query *i* attends to each key *j*, and
row *i* of **O = P V** is the matching weighted average of the value rows. When K and V keep
changing (a stream of edits), recomputing everything after each change costs O(n²·d).
This engine keeps **caches** (the softmax denominators and the unnormalised output) and
treats changes **lazily**: an update is only *queued* (O(d) work), an exact query corrects
the cached answer for the queued changes (O(|S|·d), S the touched rows), and once enough
updates are pending the engine **flushes**: it applies them all in two matrix products
(O(n·|S|·d)), which is much faster per update than applying them one by one. The
**threshold** decides when to flush: flushing often keeps the caches fresh; flushing rarely
batches more work but lets the caches go stale and makes exact queries dearer.

Queries are always **exact**. What goes stale are the caches: the *lazy* view below shows
what the caches hold, the answer you would get if you skipped the correction.

## The lessons

The selector at the top plays guided scenarios, each with two lines of what to notice.
Every control stays yours: change anything while a lesson plays.

## The heatmaps

* **Lazy** — weights (or outputs) as of the last flush: old keys, old denominators.
* **Exact** — the true values right now. Lazy and exact share one colour range, so equal
  colours mean equal values.
* **Difference |lazy − exact|** — where the caches are stale. It has its own colour range
  (white = no difference) and goes **blank at every flush**, then fills in again as new
  updates queue up. A K update changes one key, hence a whole **column** of P (every query
  sees that key); a V update changes no weight at all, only the output O.
* Switch between the **attention weights P** (n×n; you see a window of it) and the
  **output O = PV** (n×d). A window wider than 512 is shown in blocks: lazy and exact
  are block averages, the difference is the block maximum. Hover any heatmap to read the
  query *i*, key *j* (or feature *c*), lazy, exact and difference values.

## The time series

* **Error of the lazy output** — how far the cached output is from the exact one:
  relative Frobenius error ‖O_lazy − O‖ / ‖O‖ and the largest single deviation.
  Grey vertical lines mark flushes; the error drops to zero there (on the log scale the
  curve simply stops, since log 0 does not exist). Once more than 256 rows are touched the
  error is measured on 256 sampled query rows, so a tick's cost stays bounded.
* **Pending updates and flushes** — the queue length grows each tick and falls to zero at a
  flush (a sawtooth); each red spike is one flush, as tall as the number of rows it
  recomputed.
* **Cumulative cost** — wall-clock seconds (or floating-point operations) spent so far by
  four ways of keeping the answers exact on the same workload: this **lazy** engine;
  **eager** maintenance (an engine that flushes after every single update); **on demand**
  (no caches at all: each queried output row is computed from scratch in O(n·d)); and a
  **full recompute** of O after every update (not run: each update is charged the measured
  time of one dense recompute). The big numbers above are the current ratios
  *other strategy / lazy*: above 1 (green) the lazy engine is ahead, below 1 (red) it is
  behind. Lazy wins when updates arrive in batches between queries; it loses to on-demand
  answering when queries are rare and to eager maintenance when every update is
  immediately followed by a query, which is why the **cost** policy measures both
  and picks its threshold itself.

## The controls

* **Flush policy** — *fixed*: flush every *threshold* updates (1 = eager); *adaptive*:
  the original prototype's rule, which grows the threshold with recent batch sizes;
  *error*: flush when the estimated relative error would exceed the tolerance ε;
  *cost*: pick the threshold that minimises measured time per update. The threshold
  slider always shows the threshold in force; dragging it switches to *fixed*.
* **Workload** — how many updates and exact queries each tick brings, what kind of
  updates (single entries, whole rows, a moving hot spot, bursts), the starting Q, K, V
  (random presets or your own `.npz` file with arrays `Q`, `K`, `V` of shape n×d), the
  sizes n and d (changing them rebuilds and restarts the run), and the logit scale
  (1/√d as in transformers, or 1 as in the original prototype).
* **Flush now** applies all pending updates at once; **Reset** restarts the run with the
  same settings. **Download timeline** saves every recorded tick as CSV.
* Heavy settings never freeze the page: each frame does at most about 0.2 s of work, and a
  tick too large for one frame is spread over several (the counters show its progress).
"""
