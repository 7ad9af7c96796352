"""The machine a run measures: cores, CPU model, BLAS libraries and their threads, versions,
memory and load average, recorded in ``meta.machine`` of every ``bench*.json``."""

from __future__ import annotations

import os
import platform

import numpy as np

__all__ = ["describe", "machine_info", "physical_memory"]

# threadpoolctl's fields kept per thread pool
_POOL_FIELDS = (
    "user_api",
    "internal_api",
    "version",
    "num_threads",
    "threading_layer",
    "architecture",
    "filepath",
)


def machine_info() -> dict:
    """Cores, CPU model, BLAS libraries and threads (threadpoolctl), versions, load average."""
    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    pools = [{k: p.get(k) for k in _POOL_FIELDS} for p in threadpool_info()]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": pools,
        "blas_threads": sum(p["num_threads"] or 0 for p in pools if p["user_api"] == "blas"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "memory_bytes": physical_memory(),
        "loadavg_start": os.getloadavg(),
    }


def physical_memory() -> int:
    """Bytes of physical memory, 0 where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def describe(machine: dict) -> str:
    """One log line: CPUs, CPU model, each BLAS with its threads, core type, load average."""
    return (
        f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}; BLAS "
        + "; ".join(
            f"{p['internal_api']} {p['version']} ({p['num_threads']} threads, {p['architecture']})"
            for p in machine["blas"]
        )
        + f"; OPENBLAS_CORETYPE={machine['OPENBLAS_CORETYPE']}; load average "
        + ", ".join(f"{x:.2f}" for x in machine["loadavg_start"])
    )
