"""Sharded lazy attention on a 2-worker LocalCluster against the single-process engine.

``python benchmarks/bench_distributed.py [--quick]`` prints a markdown table. At n = 65,536,
d = 64 (float64; ``--quick``: n = 8,192):

* a flush of 512 touched rows on 2 workers (shipping the buffer included) against the
  single-process flush (target ≤ 1.5×);
* the client-side cost of a buffered update, the call alone and with the shipping of the
  buffer amortised (target ≤ 2 µs);
* a rebuild on 2 workers against the single-process rebuild (target ≤ 1.3×);
* the peak RSS of each worker against what its engine holds.

Each worker runs one BLAS thread; the single-process engine is timed with one BLAS thread and
with as many as there are cores, and the better counts (on a loaded machine two spinning BLAS
threads can lose to one by several times). Timings are the best of a few repeats, the
configurations taking turns within each repeat (the machine is shared and its load drifts).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from dynattn import Fixed, LazyAttention
from dynattn.distributed import ShardedAttention, limit_blas
from dynattn.distributed._cluster import machine_cores

NEVER = 2**62  # a Fixed policy that never flushes: the benchmark flushes itself


def _peak_rss() -> int:
    """A worker's own peak resident bytes (VmHWM): ru_maxrss survives fork and exec, so a
    worker started by a large benchmark process would report that process's peak."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _touch(eng, rows: np.ndarray, k: int) -> None:
    """One entry update on each of ``rows`` of K: |S| = len(rows) key rows."""
    eng.update_k_many(rows, np.full(len(rows), k % eng.d), np.full(len(rows), 1e-3))


def _flush_once(eng, rng, touched: int, k: int) -> float:
    """Seconds of one flush of ``touched`` fresh key rows (shipping the buffer included)."""
    _touch(eng, rng.choice(eng.n, touched, replace=False), k)
    t0 = time.perf_counter()
    eng.flush()
    return time.perf_counter() - t0


def _interleaved(runs: dict, repeats: int) -> dict:
    """Best seconds of each ``runs[name](k)``, the runs taking turns within each repeat, so
    that a shared machine's load, which drifts over minutes, weighs on all of them alike."""
    best = dict.fromkeys(runs, np.inf)
    for k in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run(k))
    return best


def _single(eng, threads: int, func):
    """``func`` timed on the single-process engine with ``threads`` BLAS threads."""

    def run(k):
        with threadpool_limits(limits=threads):
            return func(eng, k)

    return run


def _timed_rebuild(eng, k) -> float:
    t0 = time.perf_counter()
    eng.rebuild()
    return time.perf_counter() - t0


def measure(quick: bool, n: int | None = None) -> dict:
    """Run every measurement; returns the figures (seconds, bytes) and the set-up. ``n``
    overrides the size (65,536, or 8,192 when ``quick``)."""
    from dask.distributed import Client, LocalCluster

    n, d, touched = n or (8192 if quick else 65536), 64, 512
    rng = np.random.default_rng(0)
    Q, K, V = rng.standard_normal((3, n, d))
    out = {"n": n, "d": d, "touched": touched, "cores": machine_cores()}
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    )
    client = Client(cluster)
    try:
        limit_blas(client, max(1, out["cores"] // 2))
        out["base_rss"] = min(client.run(_base_rss).values())
        single = LazyAttention(Q, K, V, policy=Fixed(NEVER))
        out["single_nbytes"] = single.nbytes
        t0 = time.perf_counter()
        eng = ShardedAttention(Q, K, V, client=client, shards=2, policy=Fixed(NEVER))
        out["sharded_build"] = time.perf_counter() - t0
        # the single process at its best of 1 and all BLAS threads: on a loaded machine
        # threads that wait for each other spin, and one can beat two by several times
        threads = sorted({1, out["cores"]})
        for what, func, repeats in (
            ("flush", lambda e, k: _flush_once(e, rng, touched, k), 3),
            ("rebuild", _timed_rebuild, 3 if quick else 1),
        ):
            runs = {t: _single(single, t, func) for t in threads}
            runs["sharded"] = lambda k, f=func: f(eng, k)
            best = _interleaved(runs, repeats)
            out[f"sharded_{what}"] = best.pop("sharded")
            t = min(best, key=best.get)
            out[f"single_{what}"], out[f"single_{what}_threads"] = best[t], t
        del single
        _touch(eng, rng.choice(n, touched, replace=False), 0)
        batch = eng._queue.batch(0, eng.K, eng.V)[0]
        out["shipped"] = sum(a.nbytes for a in batch)  # what a flush sends each shard
        eng.flush()
        memory = eng.memory()  # before the update stream grows the shards' packs
        peaks = client.run(_peak_rss)
        out["workers"] = [
            {
                "worker": m["worker"],
                "nbytes": m["nbytes"],
                "rss": m["rss"],
                "peak": peaks[m["worker"]],
            }
            for m in memory
        ]
        out.update(_update_costs(eng, rng))
        eng.close()
    finally:
        client.close()
        cluster.close()
    return out


def _base_rss() -> int:
    """RSS of a worker process before any engine (its interpreter, NumPy, Dask)."""
    import psutil

    return psutil.Process().memory_info().rss


def _update_costs(eng, rng, count: int = 200_000) -> dict:
    """Client-side seconds per update: the call alone (a buffer too large to ship), and with
    the default buffer's shipping amortised (sent to both shards every 16,384 actions)."""
    rows = rng.integers(eng.n, size=count).tolist()
    cols = rng.integers(eng.d, size=count).tolist()
    out = {}
    for name, buffer in (("update_call", 10 * count), ("update_amortised", 16384)):
        eng.flush()
        eng._queue.max_log = buffer
        eng._ask_policy_next()
        t0 = time.perf_counter()
        for i, j in zip(rows, cols, strict=True):
            eng.update_k(i, j, 1e-6)
        out[name] = (time.perf_counter() - t0) / count
    eng._queue.max_log = 16384
    eng.flush()
    return out


def table(r: dict) -> str:
    """The results as a markdown table, each target with PASS or MISS."""
    mib = 2**20

    def status(ok):
        return "**PASS**" if ok else "**MISS**"

    flush_ratio = r["sharded_flush"] / r["single_flush"]
    rebuild_ratio = r["sharded_rebuild"] / r["single_rebuild"]
    lines = [
        f"n = {r['n']:,}, d = {r['d']}, float64, 2 workers × {max(1, r['cores'] // 2)} BLAS "
        f"thread(s) against one process at its best of 1 and {r['cores']} BLAS threads (flush: "
        f"{r['single_flush_threads']}, rebuild: {r['single_rebuild_threads']}); sharded engine "
        f"built in {r['sharded_build']:.1f} s.",
        "",
        "| measure | 2 workers | single process | ratio | target | status |",
        "|---|---|---|---|---|---|",
        f"| flush, {r['touched']} touched rows | {r['sharded_flush'] * 1e3:.1f} ms | "
        f"{r['single_flush'] * 1e3:.1f} ms | {flush_ratio:.2f}× | ≤ 1.5× | "
        f"{status(flush_ratio <= 1.5)} |",
        f"| rebuild | {r['sharded_rebuild']:.2f} s | {r['single_rebuild']:.2f} s | "
        f"{rebuild_ratio:.2f}× | ≤ 1.3× | {status(rebuild_ratio <= 1.3)} |",
        f"| buffered update, the call (client) | {r['update_call'] * 1e6:.2f} µs | | | ≤ 2 µs | "
        f"{status(r['update_call'] <= 2e-6)} |",
        f"| buffered update, shipping amortised (workers applying it share the cores) | "
        f"{r['update_amortised'] * 1e6:.2f} µs | | | | reported |",
    ]
    per_shard = r["touched"] * r["d"] * 8 / 1024
    lines.append(
        f"| bytes sent to each shard by a flush of {r['touched']} key rows | "
        f"{r['shipped'] / 1024:.0f} KiB | | | \\|S\\|·d·8 = {per_shard:.0f} KiB | reported |"
    )
    replica = (4 * r["n"] + 3 * r["n"] // 2) * r["d"] * 8  # K, V, snapshot + half of Q, caches
    for k, w in enumerate(r["workers"]):
        lines.append(
            f"| worker {k}: peak RSS − idle worker (engine arrays) | "
            f"{(w['peak'] - r['base_rss']) / mib:.0f} MiB ({w['nbytes'] / mib:.0f} MiB) | "
            f"{r['single_nbytes'] / mib:.0f} MiB engine | | ≈ (4n + 3n/2)·d·8 = "
            f"{replica / mib:.0f} MiB | reported |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 8,192 instead of 65,536")
    parser.add_argument("--n", type=int, help="another size (the targets are set at 65,536)")
    args = parser.parse_args(argv)
    print(table(measure(args.quick, args.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
