"""Items 1–3, which share built engines: the strategy comparison (:mod:`.updates`), query
latency (:mod:`.queries`) and flush efficiency (:mod:`.flush`).

For each (n, dtype) that one of them needs, smallest first, a context is built once: ``Q``,
``K``, ``V``, the lazy engine (``engine``, an O(n²·d) build, about 45 s at n = 65,536), the
n×n eager Ã store (``dense``, where a quarter of memory holds it) and the recompute figure at n
(``recompute``). Every measurement starts from an O(n·d) copy of the engine
(:func:`benchmarks.timing.fresh`); the context is dropped before the next is built. The GEMM
peak and recompute are measured first, per dtype.
"""

from __future__ import annotations

import time

from dynattn import LazyAttention, make_qkv
from dynattn.strategies import EagerDense, eager_dense_nbytes

from ..machine import physical_memory
from ..plans import Plan
from ..section import Run, Section
from ..timing import Never
from . import flush, queries, updates

__all__ = ["SECTION", "measure"]


def measure(run: Run) -> dict:
    """Items 1–3 over every context of ``run.plan``; the bench.json entries they fill."""
    plan, log = run.plan, run.log
    res = {
        "updates": [],
        "builds": [],
        "queries": [],
        "query_baselines": [],
        "flush": [],
        "gemm_peak": {},
        "recompute": {},
        "lazy_vs_recompute": None,
    }
    for dtype in plan.dtypes:
        res["gemm_peak"][dtype] = flush.gemm_peak(dtype, plan.gemm_size)
        log(f"GEMM peak {dtype} ({plan.gemm_size}³): {res['gemm_peak'][dtype]:.1f} GFLOP/s")
        res["recompute"][dtype] = updates.measure_recompute(plan, dtype, log)
    for n, dtype in _contexts(plan):
        log(f"n={n} {dtype}")
        ctx = _build_context(run, n, dtype, res)
        if n in plan.update_ns:
            for stream in plan.streams:
                log(f"  stream {stream}")
                res["updates"] += updates.strategy_runs(plan, n, dtype, ctx, stream, log)
        if n == plan.lazy_vs_recompute_n and dtype == "float64":
            res["lazy_vs_recompute"] = updates.lazy_vs_recompute(plan, n, dtype, ctx)
            log(f"  lazy vs recompute: {res['lazy_vs_recompute']['speedup']:.0f}×")
        if n == plan.query_n:
            log("  query latency")
            res["queries"] += queries.query_latency(plan, n, dtype, ctx, log)
            res["query_baselines"].append(
                {"n": n, "dtype": dtype, **queries.baseline_queries(n, plan.d, dtype, ctx)}
            )
        if n in plan.flush_ns:
            log("  flush efficiency")
            res["flush"] += flush.flush_efficiency(plan, n, dtype, ctx, log)
        del ctx  # the engine and Ã go before the next context is built
    return res


def _contexts(plan: Plan):
    """Each (n, dtype) that any of items 1–3 needs, smallest first."""
    ns = sorted(set(plan.update_ns) | set(plan.flush_ns) | {plan.query_n, plan.lazy_vs_recompute_n})
    for n in ns:
        for dtype in plan.dtypes:
            yield n, dtype


def _build_context(run: Run, n: int, dtype: str, res: dict) -> dict:
    """The engine (and eager Ã where items 1–2 need it and a quarter of memory holds it) at
    (n, dtype); their build times go to ``res["builds"]``, a skipped Ã to ``run.notes``."""
    plan, log = run.plan, run.log
    Q, K, V = make_qkv("gaussian", n, plan.d, seed=0, dtype=dtype)
    t0 = time.perf_counter()
    engine = LazyAttention(Q, K, V, policy=Never())
    res["builds"].append(_build(n, dtype, "lazy", t0))
    log(f"  engine build {res['builds'][-1]['seconds']:.2f} s")
    ctx = {
        "Q": Q,
        "K": K,
        "V": V,
        "engine": engine,
        "recompute": updates.recompute_at(res["recompute"][dtype], n),
    }
    if n not in plan.update_ns and n != plan.query_n:
        return ctx
    need = eager_dense_nbytes(n, plan.d, dtype)
    if need <= 0.25 * (physical_memory() or need * 4):
        t0 = time.perf_counter()
        ctx["dense"] = EagerDense(Q, K, V)
        res["builds"].append(_build(n, dtype, "eager Ã", t0))
        log(f"  eager Ã build {res['builds'][-1]['seconds']:.2f} s")
    else:
        run.notes.append(
            f"eager Ã skipped at n={n} {dtype}: the n×n matrix needs {need / 2**30:.1f} GiB "
            "(does not fit in a quarter of memory)"
        )
    return ctx


def _build(n: int, dtype: str, strategy: str, t0: float) -> dict:
    """A ``builds`` row: seconds since ``t0``."""
    return {"n": n, "dtype": dtype, "strategy": strategy, "seconds": time.perf_counter() - t0}


def targets(res: dict, plan: Plan) -> list[dict]:
    """Flush efficiency, then item 1's targets, then query latency."""
    return flush.targets(res, plan) + updates.targets(res, plan) + queries.targets(res, plan)


def render(res: dict, summary: bool) -> list[str]:
    """Items 1, 2, 3 in turn (none of them in the README's summary)."""
    return updates.render(res, summary) + queries.render(res, summary) + flush.render(res, summary)


SECTION = Section("engine", measure, targets=targets, render=render)
