"""Sizes, repetition counts and target sizes of the benchmark modes (``full``, ``quick``,
``tiny``), and the labels shared by the sections, the report and the plots.

A :class:`Plan` is plain data: nothing here measures. A section added later keeps its own sizes
in its module, keyed by :attr:`Plan.mode` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ERROR_TOLERANCE",
    "PLANS",
    "RATES",
    "STREAMS",
    "STREAM_LABELS",
    "TARGET_DASHBOARD_N",
    "TARGET_HOTSPOT_N",
    "TARGET_QUERY_N",
    "TARGET_QUERY_PENDING",
    "TARGET_RATE",
    "TARGET_RECOMPUTE_N",
    "TARGET_RSS_N",
    "Plan",
    "plan_json",
]

STREAMS = ("entries", "hotspot", "rows")
STREAM_LABELS = {"entries": "uniform", "hotspot": "hot-spot", "rows": "row rewrites"}
RATES = (1.0, 0.01, 0.0001)
ERROR_TOLERANCE = 1e-3  # the error-budget policy's tolerance (the dashboard's default)

# Target sizes (the wording); a target whose size this plan lacks is reported SKIP.
TARGET_HOTSPOT_N = 16384
TARGET_RECOMPUTE_N = 4096
TARGET_QUERY_N, TARGET_QUERY_PENDING = 16384, 64
TARGET_RSS_N = 50_000
TARGET_DASHBOARD_N = 1024
TARGET_RATE = 0.01  # query rate at which "per update" targets are judged (queries included)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and repetition counts of one benchmark mode.

    Attributes
    ----------
    mode : str
        ``"full"``, ``"quick"`` or ``"tiny"``.
    d : int
        Head dimension everywhere.
    dtypes : tuple of str
    update_ns : tuple of int
        Sizes of item 1 (strategy comparison).
    rates : tuple of float
        Exact queries per update.
    streams : tuple of str
        :class:`~dynattn.workloads.UpdateStream` kinds.
    ks : tuple of int
        Thresholds of the fixed policies.
    u_min : dict
        n -> minimum timed updates per strategy; fixed-k runs cover whole flush cycles.
    u_adaptive : dict
        n -> timed updates of the adaptive policies.
    warmup_cost, warmup_adaptive : int
        Untimed updates before timing the cost model (longer than its 2,048-update rate
        window) and the original adaptive rule.
    query_samples : int
        Exact queries timed at random points of each composed run.
    cost_repeats : int
        Runs of the cost model beside on-demand per cell; each strategy keeps its best.
    recompute_ns : tuple of int
        Sizes at which full recompute is timed (extrapolated as n² beyond the largest).
    recompute_updates : int
    lazy_vs_recompute_n : int
        Size of the lazy-versus-recompute comparison.
    query_n : int
        Size of item 2.
    query_pending : tuple of int
        Touched rows pending in item 2.
    query_reps : int
    flush_ns, flush_rows : tuple of int
        Sizes and touched-row counts of item 3.
    flush_reps : dict
        Repeats of each flush size in item 3, per n (and of the products it is compared with):
        more where a flush lasts milliseconds, whose best of 5 moved by ±5 % between runs on
        this shared machine.
    demo_reps : int
    rss_n, rss_updates : int
        Item 5's engine size and update count.
    dashboard_ns : tuple of int
        Dashboard sizes (tick time and peak memory).
    dashboard_ticks : int
    gemm_size : int
        Side of the square GEMM whose speed is reported as the machine's peak.
    """

    mode: str
    d: int
    dtypes: tuple
    update_ns: tuple
    rates: tuple
    streams: tuple
    ks: tuple
    u_min: dict
    u_adaptive: dict
    warmup_cost: int
    warmup_adaptive: int
    query_samples: int
    cost_repeats: int
    recompute_ns: tuple
    recompute_updates: int
    lazy_vs_recompute_n: int
    query_n: int
    query_pending: tuple
    query_reps: int
    flush_ns: tuple
    flush_rows: tuple
    flush_reps: dict
    demo_reps: int
    rss_n: int
    rss_updates: int
    dashboard_ns: tuple
    dashboard_ticks: int
    gemm_size: int = 2048


_KS = (8, 32, 128, 512, 2048)
_PENDING = tuple(2**p for p in range(12))  # 1 … 2,048

PLANS = {
    "full": Plan(
        mode="full",
        d=64,
        dtypes=("float64", "float32"),
        update_ns=(1024, 16384, 65536),
        rates=RATES,
        streams=STREAMS,
        ks=_KS,
        u_min={1024: 2048, 16384: 256, 65536: 64},
        u_adaptive={1024: 4096, 16384: 2048, 65536: 2048},
        warmup_cost=2112,
        warmup_adaptive=1024,
        query_samples=32,
        cost_repeats=4,
        recompute_ns=(1024, 4096),
        recompute_updates=3,
        lazy_vs_recompute_n=4096,
        query_n=16384,
        query_pending=_PENDING,
        query_reps=201,
        flush_ns=(4096, 16384, 65536),
        flush_rows=_KS,
        flush_reps={4096: 15, 16384: 9, 65536: 5},
        demo_reps=5,
        rss_n=50_000,
        rss_updates=1000,
        dashboard_ns=(1024, 8192),
        dashboard_ticks=30,
    ),
    "quick": Plan(
        mode="quick",
        d=64,
        dtypes=("float64", "float32"),
        update_ns=(1024, 4096),
        rates=RATES,
        streams=STREAMS,
        ks=_KS,
        u_min={1024: 256, 4096: 64},
        u_adaptive={1024: 1024, 4096: 512},
        warmup_cost=2112,
        warmup_adaptive=512,
        query_samples=16,
        cost_repeats=1,
        recompute_ns=(1024,),
        recompute_updates=3,
        lazy_vs_recompute_n=4096,
        query_n=4096,
        query_pending=_PENDING,
        query_reps=101,
        flush_ns=(4096,),
        flush_rows=_KS,
        flush_reps={4096: 3},
        demo_reps=3,
        rss_n=8192,
        rss_updates=500,
        dashboard_ns=(1024,),
        dashboard_ticks=10,
    ),
    "tiny": Plan(
        mode="tiny",
        d=16,
        dtypes=("float64", "float32"),
        update_ns=(128,),
        rates=RATES,
        streams=STREAMS,
        ks=(8, 32),
        u_min={128: 64},
        u_adaptive={128: 128},
        warmup_cost=2112,
        warmup_adaptive=64,
        query_samples=8,
        cost_repeats=1,
        recompute_ns=(128,),
        recompute_updates=2,
        lazy_vs_recompute_n=128,
        query_n=128,
        query_pending=(1, 8, 64),
        query_reps=11,
        flush_ns=(128,),
        flush_rows=(8, 32),
        flush_reps={128: 1},
        demo_reps=1,
        rss_n=256,
        rss_updates=50,
        dashboard_ns=(64,),
        dashboard_ticks=2,
        gemm_size=256,
    ),
}


def plan_json(plan: Plan) -> dict:
    """``plan`` as JSON-ready data (dict keys as strings), as stored in ``meta.plan``."""
    return {
        k: ({str(n): v for n, v in val.items()} if isinstance(val, dict) else val)
        for k, val in dataclasses.asdict(plan).items()
    }
