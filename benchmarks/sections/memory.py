"""Items 5–6: peak resident memory of the engine at n = 50,000 (build, 1,000 updates, a
flush) and of a ticking dashboard, and the dashboard's tick time (model work and plot data, no
rendering), each in a fresh process (:func:`benchmarks.child.in_fresh_process`); the
dashboard-tick and peak-memory targets.

Peak RSS is ``VmHWM`` (Linux); ``ru_maxrss`` is in the JSON too but survives fork/exec, so in a
child it reports the benchmark's own peak.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from dynattn import LazyAttention, make_qkv

from ..child import in_fresh_process
from ..plans import TARGET_DASHBOARD_N, TARGET_RSS_N, Plan
from ..section import Run, Section, target, verdict
from ..text import table
from ..timing import Actions, Never, drive

__all__ = ["SECTION", "dashboard_ticks", "engine_memory", "measure"]


def engine_memory(n: int, d: int, updates: int) -> dict:
    """(Child) build an engine at (n, d), apply ``updates`` uniform entry updates, flush."""
    t0 = time.perf_counter()
    engine = LazyAttention(*make_qkv("gaussian", n, d, seed=0), policy=Never())
    build = time.perf_counter() - t0
    drive([engine], Actions("entries", n, d, np.float64, seed=2).take(updates))
    event = engine.flush()
    return {
        "n": n,
        "d": d,
        "updates": updates,
        "build_s": build,
        "flush_s": event.seconds,
        "engine_bytes": engine.nbytes,
    }


def dashboard_ticks(n: int, d: int, ticks: int) -> dict:
    """(Child) a dashboard at (n, d), 16 updates a tick: median and worst of ``ticks`` ticks."""
    from dynattn.dashboard import Dashboard  # panel, holoviews and bokeh: in this child only
    from dynattn.simulation import Simulation

    dash = Dashboard(Simulation(n=n, d=d, updates_per_tick=16))
    dash.advance(3)  # first ticks fit the cost model and warm caches
    seconds = [dash.advance(1).seconds for _ in range(ticks)]
    return {
        "n": n,
        "d": d,
        "updates_per_tick": 16,
        "ticks": ticks,
        "tick_s": statistics.median(seconds),
        "tick_max_s": max(seconds),
    }


def measure(run: Run) -> dict:
    """The engine's and each dashboard size's child run."""
    plan, log = run.plan, run.log
    out = {"engine": in_fresh_process(engine_memory, plan.rss_n, plan.d, plan.rss_updates)}
    log(f"  memory n={plan.rss_n}: {out['engine']}")
    out["dashboard"] = []
    for n in plan.dashboard_ns:
        res = in_fresh_process(dashboard_ticks, n, plan.d, plan.dashboard_ticks)
        out["dashboard"].append({"n": n, **res})
        log(f"  dashboard n={n}: {res}")
    return {"memory": out}


def targets(res: dict, plan: Plan) -> list[dict]:
    """Dashboard tick ≤ 50 ms at n = 1,024; peak RSS < 300 MB at n = 50,000."""
    return [_dashboard_target(res["memory"]), _rss_target(res["memory"])]


def _dashboard_target(mem: dict) -> dict:
    dash = [r for r in mem["dashboard"] if r["n"] == TARGET_DASHBOARD_N]
    if not (dash and "tick_s" in dash[0]):
        return target(
            "Dashboard tick ≤ 50 ms, n=1,024",
            "SKIP",
            "-",
            "≤ 50 ms",
            dash[0].get("error", "") if dash else "n=1,024 not in this mode",
        )
    return target(
        "Dashboard tick ≤ 50 ms, n=1,024 (d=64, 16 updates/tick)",
        verdict(dash[0]["tick_s"] <= 0.05),
        f"{dash[0]['tick_s'] * 1e3:.1f} ms median",
        "≤ 50 ms",
    )


def _rss_target(mem: dict) -> dict:
    engine = mem["engine"]
    if not (engine.get("n") == TARGET_RSS_N and "peak_rss_mb" in engine):
        return target(
            "Peak RSS < 300 MB, n=50,000",
            "SKIP",
            "-",
            "< 300 MB",
            engine.get("error", f"n={engine.get('n')} in this mode"),
        )
    return target(
        "Peak RSS < 300 MB, n=50,000 engine + 1,000 updates + flush",
        verdict(engine["peak_rss_mb"] < 300),
        f"{engine['peak_rss_mb']:.0f} MB",
        "< 300 MB",
    )


def render(res: dict, summary: bool) -> list[str]:
    """Items 5–6's table (also in the README's summary)."""
    mem, plan = res["memory"], res["meta"]["plan"]
    e = mem["engine"]
    rows = [
        [
            f"engine n={plan['rss_n']:,}, {plan['rss_updates']} updates + flush",
            f"{e['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in e else e.get("error", "-"),
            f"build {e['build_s']:.1f} s" if "build_s" in e else "",
        ]
    ]
    for t in mem["dashboard"]:
        rows.append(
            [
                f"dashboard tick n={t['n']:,}",
                f"{t['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in t else t.get("error", "-"),
                f"tick {t['tick_s'] * 1e3:.1f} ms median" if "tick_s" in t else "",
            ]
        )
    return [
        "### 5–6. Memory and dashboard (each in a fresh process)",
        table(["workload", "peak RSS", "time"], rows),
    ]


SECTION = Section("memory", measure, targets=targets, render=render)
