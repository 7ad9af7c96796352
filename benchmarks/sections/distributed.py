"""Item 8: sharded lazy attention on a 2-worker Dask LocalCluster against one process (the
measuring code is ``benchmarks/bench_distributed.py``): a flush of 512 touched rows and a
rebuild at n = 65,536, d = 64, the client's cost per buffered update, and each worker's peak
memory. Not run in the tiny mode (a cluster takes seconds to start)."""

from __future__ import annotations

from .. import bench_distributed
from ..plans import Plan
from ..section import Run, Section, not_run, skipped, target, verdict

__all__ = ["SECTION"]

TARGET_N = 65536


def measure(run: Run) -> dict:
    if run.plan.mode == "tiny":
        return not_run(run, "distributed", "a cluster takes seconds")
    res = bench_distributed.measure(quick=run.plan.mode == "quick")
    run.log(
        f"  distributed n={res['n']}: flush {res['sharded_flush'] / res['single_flush']:.2f}×, "
        f"rebuild {res['sharded_rebuild'] / res['single_rebuild']:.2f}×, "
        f"update {res['update_call'] * 1e6:.2f} µs"
    )
    return {"distributed": res}


def targets(res: dict, plan: Plan) -> list[dict]:
    r = res["distributed"]
    names = (
        ("Distributed: flush of 512 rows on 2 workers ≤ 1.5× one process, n=65,536", "≤ 1.5×"),
        ("Distributed: rebuild on 2 workers ≤ 1.3× one process, n=65,536", "≤ 1.3×"),
        ("Distributed: client cost per buffered update ≤ 2 µs", "≤ 2 µs"),
    )
    if r is None or r["n"] != TARGET_N:
        why = "tiny mode" if r is None else f"measured at n={r['n']:,}"
        return skipped(names, why)
    flush = r["sharded_flush"] / r["single_flush"]
    rebuild = r["sharded_rebuild"] / r["single_rebuild"]
    return [
        target(names[0][0], verdict(flush <= 1.5), f"{flush:.2f}×", names[0][1]),
        target(names[1][0], verdict(rebuild <= 1.3), f"{rebuild:.2f}×", names[1][1]),
        target(
            names[2][0],
            verdict(r["update_call"] <= 2e-6),
            f"{r['update_call'] * 1e6:.2f} µs",
            names[2][1],
        ),
    ]


def render(res: dict, summary: bool) -> list[str]:
    if res["distributed"] is None:
        return []
    return [
        "### 8. Distributed (Dask LocalCluster, 2 workers)",
        bench_distributed.table(res["distributed"]),
    ]


SECTION = Section("distributed", measure, targets=targets, render=render)
