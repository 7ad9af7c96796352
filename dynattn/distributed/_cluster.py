"""Dask plumbing shared by the distributed engines: the cluster they may own, actor start-up,
calls gathered with their failures named, BLAS threads per worker."""

from __future__ import annotations

import contextlib
import os

from dask.distributed import Client, LocalCluster

from ._host import EngineHost

__all__ = ["ShardError", "limit_blas", "machine_cores"]


class ShardError(RuntimeError):
    """One or more shards (engines on Dask workers) failed a call.

    Nothing buffered on the client is lost: its K, V and the updates not yet applied by the
    failed shards stay there (``pending`` is unchanged); ``recover()`` rebuilds a lost
    shard from them.

    Attributes
    ----------
    failures : list of (str, BaseException)
        Each failed shard, described (shard, rows, worker), with its exception.
    """

    def __init__(self, operation: str, failures: list[tuple[str, BaseException]]):
        self.operation = operation
        self.failures = failures
        lines = [f"{what}: {type(exc).__name__}: {exc}" for what, exc in failures]
        super().__init__(
            f"{operation} failed on {len(failures)} shard(s); the client keeps K, V and every "
            "buffered update (recover() restarts a lost shard from them):\n  " + "\n  ".join(lines)
        )


def machine_cores() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _set_blas_threads(threads: int) -> int:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)  # process-wide: BLAS pools of NumPy (and SciPy)
    return threads


def limit_blas(client: Client, threads: int) -> None:
    """Cap the BLAS threads of every worker of ``client`` at ``threads`` (threadpoolctl), so
    that workers × threads does not exceed the cores: oversubscribed BLAS pools spin against
    each other (2-10× slower on this machine class). Workers started later are not capped."""
    client.run(_set_blas_threads, int(threads))


class Cluster:
    """A Dask client, and the LocalCluster behind it when this object started it.

    ``client=None`` starts ``LocalCluster(n_workers=workers or cores, threads_per_worker=1,
    processes=True)`` on 127.0.0.1 without a dashboard, with BLAS threads per worker capped
    so that workers × threads ≤ cores; :meth:`close` then stops it. A given client is used
    as it is and never closed here.
    """

    def __init__(self, client: Client | None = None, workers: int | None = None):
        self._cluster = None
        if client is None:
            cores = machine_cores()
            n = max(1, min(workers or cores, cores))
            self._cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                host="127.0.0.1",
            )
            client = Client(self._cluster)
            limit_blas(client, max(1, cores // n))
        elif not isinstance(client, Client):
            raise TypeError(f"client={client!r} must be a dask.distributed.Client or None")
        self.client = client

    owned = property(lambda self: self._cluster is not None, doc="Whether close() stops it.")

    def workers(self, timeout: float = 10.0) -> list[str]:
        """Addresses of the workers, sorted (a stable placement for the same cluster).

        With none, waits up to ``timeout`` seconds for one: on a busy machine a worker that
        missed its heartbeats is dropped by the scheduler and joins again moments later
        (seen once in CI, where an engine built in that moment failed).
        """
        with contextlib.suppress(TimeoutError):  # at once when a worker is there
            self.client.wait_for_workers(1, timeout=timeout)
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            raise RuntimeError(f"the Dask cluster of {self.client!r} has no worker")
        return workers

    def submit_hosts(self, placements: list[tuple[str, tuple]]) -> list:
        """Start an :class:`EngineHost` per ``(worker, args)``, pinned to its worker (args:
        ``(Q, K, V, engine_kwargs)``, arrays or futures of them, or ``(None, None, None, None,
        engine)`` to adopt an engine made there); returns their futures at once, so the
        engines build in parallel."""
        return [
            self.client.submit(
                EngineHost, *args, actor=True, workers=[w], allow_other_workers=False, pure=False
            )
            for w, args in placements
        ]

    def close(self) -> None:
        """Stop the LocalCluster and its client if this object started them; idempotent."""
        if self._cluster is not None:
            self.client.close()
            self._cluster.close()
            self._cluster = None
