"""Sustained play of the dashboard at a large n: model time per tick over minutes.

A playing dashboard must not slow down as the run goes on (issue: at n = 8,192 the tick grew
from ~56 ms to 300-580 ms in 2.5 minutes while nothing flushed). This drives a
:class:`~dynattn.dashboard.Dashboard` outside any server, frame after frame as a browser
session would (``play_frame`` with its time budget, plus the frame's heatmap data), on the
landing lesson's settings at the requested n, and reports the median and 95th percentile of
the model time per tick (``tick_seconds`` of the simulation's records) and of the frames.

Run: ``python benchmarks/bench_dashboard_play.py [minutes] [n]`` (default 5 minutes,
n = 8,192); it prints one markdown table row. Targets: median ≤ 50 ms, p95 ≤ 150 ms.
"""

from __future__ import annotations

import sys
import time

import numpy as np

TARGET_MEDIAN_MS = 50.0
TARGET_P95_MS = 150.0


def measure(minutes: float, n: int) -> dict:
    """Play the first lesson at size ``n`` for ``minutes`` of wall time.

    Returns
    -------
    dict
        ``n``, ``minutes``, ``ticks``, ``frames``, ``tick_median_ms``, ``tick_p95_ms``,
        ``frame_median_ms``, ``frame_p95_ms``, ``flushes``, ``max_touched_rows`` and
        ``passed`` (both tick targets met).
    """
    import panel as pn  # noqa: F401  (the dashboard needs Panel; imported here, not by dynattn)

    from dynattn.dashboard import LESSONS, Dashboard
    from dynattn.simulation import Simulation

    lesson = LESSONS[0]
    dash = Dashboard(Simulation(**{**lesson.config, "n": n}), **lesson.view_params)
    frames = []
    deadline = time.perf_counter() + 60.0 * minutes
    while time.perf_counter() < deadline:
        frames.append(dash.play_frame().seconds)
    timeline = dash.sim.timeline.as_dict()
    ticks = 1e3 * timeline["tick_seconds"]
    result = {
        "n": n,
        "minutes": minutes,
        "ticks": int(ticks.size),
        "frames": len(frames),
        "tick_median_ms": float(np.median(ticks)) if ticks.size else float("nan"),
        "tick_p95_ms": float(np.percentile(ticks, 95)) if ticks.size else float("nan"),
        "frame_median_ms": 1e3 * float(np.median(frames)),
        "frame_p95_ms": 1e3 * float(np.percentile(frames, 95)),
        "flushes": int(timeline["flushed"].sum()),
        "max_touched_rows": int(timeline["touched_rows"].max()) if ticks.size else 0,
    }
    result["passed"] = (
        result["tick_median_ms"] <= TARGET_MEDIAN_MS and result["tick_p95_ms"] <= TARGET_P95_MS
    )
    return result


def markdown_row(r: dict) -> str:
    """``| workload | median | p95 | frames | status |`` for the README's benchmark table."""
    status = "**PASS**" if r["passed"] else "**MISS**"
    return (
        f"| dashboard play n={r['n']:,}, {r['minutes']:g} min ({r['ticks']:,} ticks, "
        f"{r['flushes']:,} flushes, touched rows ≤ {r['max_touched_rows']:,}) "
        f"| tick {r['tick_median_ms']:.1f} ms median, {r['tick_p95_ms']:.1f} ms p95 "
        f"(targets ≤ {TARGET_MEDIAN_MS:g} / ≤ {TARGET_P95_MS:g}) "
        f"| frame {r['frame_median_ms']:.0f} ms median, {r['frame_p95_ms']:.0f} ms p95 "
        f"| {status} |"
    )


if __name__ == "__main__":
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    print(markdown_row(measure(minutes, n)))
