"""Item 9: sustained play of the dashboard at n = 8,192 (issue 19): the model time per tick
over minutes of play on the landing lesson's settings, median and 95th percentile (the
measuring code is ``benchmarks/bench_dashboard_play.py``). Five minutes in the full mode,
20 s in the quick mode; not run in the tiny mode."""

from __future__ import annotations

from .. import bench_dashboard_play as play
from ..plans import Plan
from ..section import Run, Section, not_run, skipped, target, verdict
from ..text import table

__all__ = ["SECTION"]

MINUTES = {"full": 5.0, "quick": 1 / 3}
N = 8192


def measure(run: Run) -> dict:
    if run.plan.mode not in MINUTES:
        return not_run(run, "dashboard_play", "it plays for minutes")
    res = play.measure(MINUTES[run.plan.mode], N)
    run.log(
        f"  dashboard play n={N}: tick median {res['tick_median_ms']:.1f} ms, "
        f"p95 {res['tick_p95_ms']:.1f} ms over {res['ticks']} ticks"
    )
    return {"dashboard_play": res}


def targets(res: dict, plan: Plan) -> list[dict]:
    r = res["dashboard_play"]
    names = (
        (f"Dashboard, sustained play n={N:,}: median tick ≤ 50 ms over 5 minutes", 50.0),
        (f"Dashboard, sustained play n={N:,}: 95th-percentile tick ≤ 150 ms", 150.0),
    )
    if r is None or r["minutes"] < 5:
        why = "tiny mode" if r is None else f"played {r['minutes'] * 60:.0f} s, not 5 minutes"
        return skipped(((name, f"≤ {bound:.0f} ms") for name, bound in names), why)
    got = (r["tick_median_ms"], r["tick_p95_ms"])
    return [
        target(
            name,
            verdict(value <= bound),
            f"{value:.1f} ms",
            f"≤ {bound:.0f} ms",
            f"{r['ticks']} ticks, {r['flushes']} flushes",
        )
        for (name, bound), value in zip(names, got, strict=True)
    ]


def render(res: dict, summary: bool) -> list[str]:
    r = res["dashboard_play"]
    if r is None:
        return []
    rows = [
        [
            f"{r['n']:,}",
            f"{r['minutes']:.1f} min",
            r["ticks"],
            r["flushes"],
            f"{r['tick_median_ms']:.1f} ms",
            f"{r['tick_p95_ms']:.1f} ms",
            f"{r['frame_median_ms']:.0f} ms",
            r["max_touched_rows"],
        ]
    ]
    header = [
        "n",
        "played",
        "ticks",
        "flushes",
        "tick median",
        "tick p95",
        "frame median",
        "most touched rows",
    ]
    return ["### 9. Dashboard, sustained play (landing lesson)", table(header, rows)]


SECTION = Section("dashboard_play", measure, targets=targets, render=render)
