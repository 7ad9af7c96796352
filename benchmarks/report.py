"""The results as text: ``results.md`` (machine, targets, every section's tables), the README's
summary between its ``<!-- bench:start -->`` and ``<!-- bench:end -->`` lines, and ``bench.json``
made valid JSON."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .section import Section
from .sections import load
from .text import table

__all__ = ["README_MARKERS", "finite", "render_markdown", "update_readme"]

README_MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def render_markdown(res: dict, summary: bool = False, sections: list[Section] | None = None) -> str:
    """The results as markdown: machine, targets, then each section's parts (with ``summary``,
    only those a section puts in the README, after a link to ``benchmarks/results/``)."""
    sections = load() if sections is None else sections
    m = res["meta"]
    mach = m["machine"]
    blas = "; ".join(
        f"{p['internal_api']} {p['version']}, {p['num_threads']} threads" for p in mach["blas"]
    )
    parts = [
        f"Mode `{m['mode']}`, {m['started'][:19]}, {m.get('seconds', 0):.0f} s. Machine: "
        f"{mach['cpus']} CPUs ({mach['cpu_model']}), BLAS {blas}, numpy {mach['numpy']}; "
        f"load average at start {mach['loadavg_start'][0]:.2f}, at end "
        f"{mach.get('loadavg_end', [float('nan')])[0]:.2f}. d = {m['d']}, Q/K/V standard "
        "normal.",
        "### Targets",
        table(
            ["target", "measured", "required", "status"],
            [
                [
                    t["target"],
                    t["measured"] + (f" — {t['detail']}" if t["detail"] else ""),
                    t["required"],
                    f"**{t['status']}**",
                ]
                for t in res["targets"]
            ],
        ),
    ]
    if summary:
        parts.append(
            "Every table (cost per update for each strategy, query latency, flush "
            "efficiency) and the plots: [benchmarks/results/](benchmarks/results/"
            "results.md); how they are measured: [benchmarks/README.md]"
            "(benchmarks/README.md)."
        )
    for section in sections:
        parts += section.render(res, summary)
    if res["notes"]:
        parts.append("Notes: " + " ".join(res["notes"]))
    return "\n\n".join(parts) + "\n"


def update_readme(path: Path, res: dict) -> str:
    """Replace the text between :data:`README_MARKERS` in ``path`` by the summary of ``res``
    (:func:`render_markdown` with ``summary``); returns what was done, for the log."""
    start, end = README_MARKERS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{path} not found: no README updated"
    a, b = text.find(start), text.find(end)
    if a < 0 or b < a:
        return f"{path} has no {start} … {end} markers: not updated"
    body = render_markdown(res, summary=True)
    path.write_text(f"{text[: a + len(start)]}\n{body}{text[b:]}", encoding="utf-8")
    return f"updated the results in {path}"


def finite(obj):
    """``obj`` with numpy scalars as Python numbers and inf/NaN as strings (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
