"""Item 1: seconds per update, per query and per (update + its share of queries) for every
strategy, on each stream and query rate; full recompute; lazy against recompute.

A cell is (n, dtype, stream, q). Strategies whose work does not depend on queries run the
stream once and are "composed" (``update + q · mean query``); the cost model runs per rate with
real queries, taking turns with on-demand (:func:`benchmarks.timing.interleaved`). Recompute is
timed at ``plan.recompute_ns`` and extrapolated as n² beyond. Called per (n, dtype) context by
:mod:`benchmarks.sections.engine`; the cost-model, hot-spot and recompute targets are here.
"""

from __future__ import annotations

import copy
import statistics

import numpy as np

from dynattn import CostModel, ErrorBudget, Fixed, OnDemand, OriginalAdaptive, make_qkv
from dynattn.strategies import Recompute

from ..plans import (
    ERROR_TOLERANCE,
    STREAM_LABELS,
    STREAMS,
    TARGET_HOTSPOT_N,
    TARGET_RATE,
    TARGET_RECOMPUTE_N,
    Plan,
)
from ..section import target, verdict
from ..text import table, us
from ..timing import Actions, composed, fresh, interleaved, seconds_each

__all__ = [
    "cell_lookup",
    "cost_ratios",
    "lazy_vs_recompute",
    "measure_recompute",
    "recompute_at",
    "render",
    "strategy_runs",
    "targets",
]


def strategy_runs(plan: Plan, n: int, dtype: str, ctx: dict, stream: str, log) -> list[dict]:
    """Every strategy on one (n, dtype, stream): a list of cell rows (one per rate).

    Each strategy starts from the same state and replays the same stream from its start, with
    its exact queries at the same positions.
    """
    once = _composed_runs(plan, n, dtype, ctx, stream, log)
    per_rate = _cost_beside_on_demand(plan, n, dtype, ctx, stream, log)
    rc = ctx["recompute"]
    recompute = {
        "update_s": rc["per_update"],
        "query_s": rc["per_query"],
        "updates": rc["updates"],
        "queries": rc["queries"],
        "warmup": 0,
        "threshold_end": None,
    }
    rows = []
    for rate in plan.rates:
        cell = {"n": n, "dtype": dtype, "stream": stream, "rate": rate}
        rows += [_row(cell, label, m, "composed") for label, m in once.items()]
        rows += [_row(cell, label, m, m["method"]) for label, m in per_rate[rate].items()]
        rows.append(_row(cell, "recompute", recompute, rc["method"]))
    return rows


def _row(cell: dict, label: str, m: dict, method: str) -> dict:
    """One strategy's row of a cell; ``m`` holds its run's figures (``total_s`` when measured
    with real queries, else composed as ``update_s + rate · query_s``)."""
    per_total = m.get("total_s", m["update_s"] + cell["rate"] * m["query_s"])
    return {
        **cell,
        "strategy": label,
        "per_update": m["update_s"],
        "per_query": m["query_s"],
        "per_total": per_total,
        "updates": m["updates"],
        "queries_timed": m["queries"],
        "warmup": m["warmup"],
        "threshold_end": m.get("threshold_end"),
        "method": method,
    }


def _streams(plan: Plan, n: int, dtype: str, stream: str):
    """Factories of the same stream from its start and of the same query positions' RNG."""

    def src():
        return Actions(stream, n, plan.d, dtype, seed=1)

    def rng():
        return np.random.default_rng([n, STREAMS.index(stream)])

    return src, rng


def _composed_runs(plan: Plan, n: int, dtype: str, ctx: dict, stream: str, log) -> dict:
    """Strategies whose work does not depend on queries, each run once: label -> figures."""
    src, rng = _streams(plan, n, dtype, stream)
    base = ctx["engine"]
    u_min, u_ad, samples = plan.u_min[n], plan.u_adaptive[n], plan.query_samples
    out: dict[str, dict] = {}
    if ctx.get("dense") is not None:
        # the n×n store is mutated by the run: each stream starts from a copy of the built one
        out["eager Ã"] = composed(copy.deepcopy(ctx["dense"]), src(), u_min, samples, rng())
    variants = [("eager O(nd)", Fixed(1), u_min, 0)]
    variants += [(f"lazy k={k}", Fixed(k), k * max(1, -(-u_min // k)), 0) for k in plan.ks]
    variants += [
        ("lazy adaptive", OriginalAdaptive(), u_ad, plan.warmup_adaptive),
        ("lazy error", ErrorBudget(ERROR_TOLERANCE), u_ad, 0),
    ]
    for label, policy, updates, warmup in variants:
        engine = fresh(base, policy)
        out[label] = composed(engine, src(), updates, samples, rng(), warmup)
        out[label]["threshold_end"] = engine.threshold
        del engine
        log(
            f"    {label:<14} {out[label]['update_s'] * 1e6:10.1f} µs/update "
            f"{out[label]['query_s'] * 1e6:9.1f} µs/query"
        )
    return out


def _cost_beside_on_demand(plan: Plan, n: int, dtype: str, ctx: dict, stream: str, log) -> dict:
    """The cost model and on-demand taking turns with real queries: rate -> label -> figures.

    The cost model adapts to the query rate, so it runs once per rate; on-demand, whose cost
    at rare queries is nearly all its queries, takes turns with it on the same stream: timed
    minutes apart, the machine's drift alone moved their ratio up to 2.7x. Best of repeats,
    each strategy its own, as every timing here: one stall of the shared machine among a
    run's 20-40 queries once put a cell's mean query 6x too high.
    """
    src, _ = _streams(plan, n, dtype, stream)
    out = {}
    for rate in plan.rates:
        runs = [
            interleaved(
                {
                    "lazy cost": fresh(ctx["engine"], CostModel()),
                    "on-demand": OnDemand(ctx["Q"], ctx["K"], ctx["V"]),
                },
                src(),
                plan.warmup_cost,
                plan.u_adaptive[n],
                rate,
            )
            for _ in range(plan.cost_repeats)
        ]
        out[rate] = {
            label: min((run[label] for run in runs), key=lambda m: m["total_s"])
            for label in runs[0]
        }
        for m in out[rate].values():
            m["method"] += f"; best of {len(runs)} runs" if len(runs) > 1 else ""
        m, od = out[rate]["lazy cost"], out[rate]["on-demand"]
        log(
            f"    lazy cost @{rate:g}: {m['total_s'] * 1e6:10.1f} µs per update+share "
            f"(threshold {m['threshold_end']:.4g}; on-demand {od['total_s'] * 1e6:.1f})"
        )
    return out


def measure_recompute(plan: Plan, dtype: str, log) -> dict:
    """Full recompute timed at ``plan.recompute_ns``: median seconds per update and query."""
    out = {}
    for n in plan.recompute_ns:
        Q, K, V = make_qkv("gaussian", n, plan.d, seed=0, dtype=dtype)
        rc = Recompute(Q, K, V)
        rng = np.random.default_rng(n)
        updates = []
        for t in range(plan.recompute_updates):
            i, j = int(rng.integers(n)), int(rng.integers(plan.d))
            updates.append(((rc.update_k, rc.update_v)[t % 2], (i, j, 0.1)))
        times = seconds_each(updates)
        positions = [(int(rng.integers(n)), int(rng.integers(plan.d))) for _ in range(51)]
        q = seconds_each((rc.query, ij) for ij in positions)
        out[n] = {
            "per_update": statistics.median(times),
            "per_query": statistics.median(q),
            "updates": len(times),
            "queries": len(q),
            "method": "measured",
        }
        log(f"  recompute n={n} {dtype}: {out[n]['per_update'] * 1e3:.1f} ms/update")
    return out


def recompute_at(measured: dict, n: int) -> dict:
    """Measured figure at n, or the largest measured size's extrapolated as n²·d."""
    if n in measured:
        return measured[n]
    ref = max(measured)
    m = measured[ref]
    return {
        **m,
        "per_update": m["per_update"] * (n / ref) ** 2,
        "method": f"extrapolated as n² from n={ref}",
    }


def lazy_vs_recompute(plan: Plan, n: int, dtype: str, ctx: dict) -> dict:
    """The cost model's cost per update (queries at :data:`TARGET_RATE` included) against one
    full recompute, on the uniform stream."""
    lazy = interleaved(
        {"lazy cost": fresh(ctx["engine"], CostModel())},
        Actions("entries", n, plan.d, dtype, seed=1),
        plan.warmup_cost,
        plan.u_adaptive.get(n, 2048),
        TARGET_RATE,
    )["lazy cost"]
    rc = ctx["recompute"]
    return {
        "n": n,
        "dtype": dtype,
        "stream": "entries",
        "rate": TARGET_RATE,
        "lazy_total_s": lazy["total_s"],
        "recompute_s": rc["per_update"],
        "recompute_method": rc["method"],
        "speedup": rc["per_update"] / lazy["total_s"],
    }


def cell_lookup(rows, n, dtype, stream, rate) -> dict:
    """Strategy -> seconds per (update + share of queries) in one cell of item 1."""
    return {
        r["strategy"]: r["per_total"]
        for r in rows
        if r["n"] == n and r["dtype"] == dtype and r["stream"] == stream and r["rate"] == rate
    }


def cost_ratios(rows) -> list[dict]:
    """Cost model / best strategy per cell of item 1."""
    keys = sorted(
        {(r["n"], r["dtype"], r["stream"], r["rate"]) for r in rows},
        key=lambda k: (k[0], k[1], STREAMS.index(k[2]), -k[3]),
    )
    out = []
    for key in keys:
        cell = cell_lookup(rows, *key)
        best = min(cell, key=cell.get)
        out.append(
            {
                "n": key[0],
                "dtype": key[1],
                "stream": key[2],
                "rate": key[3],
                "best": best,
                "best_s": cell[best],
                "cost": cell["lazy cost"],
                "ratio": cell["lazy cost"] / cell[best],
            }
        )
    return out


def targets(res: dict, plan: Plan) -> list[dict]:
    """Cost model within 1.25× of the best; hot-spot lazy ≥ 10× eager; lazy ≥ 1,000× recompute."""
    out = []
    ratios = cost_ratios(res["updates"])
    if ratios:
        bad = [r for r in ratios if r["ratio"] > 1.25]
        worst = max(ratios, key=lambda r: r["ratio"])
        out.append(
            target(
                "Cost model within 1.25× of the best strategy in hindsight, every cell",
                verdict(not bad),
                f"worst {worst['ratio']:.2f}× (n={worst['n']} {worst['dtype']} "
                f"{STREAM_LABELS[worst['stream']]} q={worst['rate']:g}: "
                f"{us(worst['cost'])} vs {worst['best']} {us(worst['best_s'])})",
                "≤ 1.25×",
                f"{len(bad)} of {len(ratios)} cells above 1.25×",
            )
        )
    return [*out, _hotspot_target(res), _recompute_target(res)]


def _hotspot_target(res: dict) -> dict:
    hot = cell_lookup(res["updates"], TARGET_HOTSPOT_N, "float64", "hotspot", TARGET_RATE)
    if not hot:
        return target(
            "Hot-spot n=16,384: lazy ≥ 10× faster than eager",
            "SKIP",
            "-",
            "≥ 10×",
            "n=16,384 not in this mode",
        )
    eager = {k: v for k, v in hot.items() if k in ("eager O(nd)", "eager Ã")}
    best_eager = min(eager, key=eager.get)
    ratio = eager[best_eager] / hot["lazy cost"]
    return target(
        f"Hot-spot n=16,384: lazy ≥ 10× faster per update than the better eager "
        f"(float64, {TARGET_RATE:g} queries/update)",
        verdict(ratio >= 10),
        f"{ratio:.1f}× (lazy cost {us(hot['lazy cost'])}, {best_eager} {us(eager[best_eager])})",
        "≥ 10×",
    )


def _recompute_target(res: dict) -> dict:
    lr = res.get("lazy_vs_recompute")
    if not (lr and lr["n"] == TARGET_RECOMPUTE_N):
        return target(
            "Lazy ≥ 1,000× faster than recompute, n=4,096",
            "SKIP",
            "-",
            "≥ 1,000×",
            "n=4,096 comparison not in this mode",
        )
    return target(
        "Lazy ≥ 1,000× faster per update than recompute, n=4,096",
        verdict(lr["speedup"] >= 1000),
        f"{lr['speedup']:.0f}× (lazy cost {us(lr['lazy_total_s'])} incl. "
        f"{lr['rate']:g} queries/update; recompute {lr['recompute_s'] * 1e3:.1f} ms, "
        f"{lr['recompute_method']})",
        "≥ 1,000×",
    )


_COLUMNS = ("on-demand", "eager O(nd)", "eager Ã", "lazy k=128", "lazy k=2048", "recompute")


def render(res: dict, summary: bool) -> list[str]:
    """Item 1's table: per cell the best strategy, the cost model and the main strategies."""
    if not res["updates"] or summary:
        return []
    rows = []
    for r in cost_ratios(res["updates"]):
        cell = cell_lookup(res["updates"], r["n"], r["dtype"], r["stream"], r["rate"])
        rows.append(
            [
                f"{r['n']:,}",
                r["dtype"],
                STREAM_LABELS[r["stream"]],
                f"{r['rate']:g}",
                f"{r['best']} {us(r['best_s'])}",
                f"{us(r['cost'])} ({r['ratio']:.2f}×)",
            ]
            + [us(cell.get(c)) for c in _COLUMNS]
        )
    return [
        "### 1. Cost per (update + its share of queries)",
        "q = exact queries per update. Best = best strategy in hindsight; cost "
        "model = the default policy, with its ratio to the best. Recompute is "
        "measured at n ≤ 4,096 and extrapolated as n² beyond.",
        table(["n", "dtype", "stream", "q", "best", "cost model", *_COLUMNS], rows),
        "Per update and per query separately (q-independent strategies: one run; "
        "cost model: its run at q = 0.01) are in the JSON.",
    ]
