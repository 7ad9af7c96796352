"""Measurements in a fresh interpreter, so that peak memory is the workload's alone.

:func:`in_fresh_process` runs a module-level function ``f(*args) -> dict`` (JSON arguments)
in a new ``python`` whose last stdout line is the function's dict plus the process's peak
resident memory; :func:`child_main` is that process's entry. Any section may use it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["child_main", "in_fresh_process", "peak_rss_mb", "ru_maxrss_mb"]

# The checkout's root: the child imports ``benchmarks`` (and ``dynattn``) from there.
_ROOT = Path(__file__).resolve().parent.parent
_CODE = "import sys; from benchmarks.child import child_main; sys.exit(child_main(sys.argv[1:]))"


def in_fresh_process(func, *args, timeout: float = 900.0) -> dict:
    """``func(*args)`` run by :func:`child_main` in a fresh interpreter; its dict with
    ``baseline_rss_mb``, ``peak_rss_mb`` and ``ru_maxrss_mb`` added, or ``{"error": …}`` with
    the child's last line of stderr when it fails.

    ``func`` must be a module-level function of an importable module and ``args`` JSON values.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    where = f"{func.__module__}:{func.__qualname__}"
    proc = subprocess.run(
        [sys.executable, "-c", _CODE, where, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit code {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> int:
    """Subprocess entry: ``argv = ["module:function", "[JSON args]"]``; prints the function's
    dict, with this process's resident memory before the call and at its peak, as JSON."""
    module, _, name = argv[0].partition(":")
    func = getattr(importlib.import_module(module), name)
    base = peak_rss_mb()  # after the imports, as the workload's starting point
    result = func(*json.loads(argv[1]))
    result.update(baseline_rss_mb=base, peak_rss_mb=peak_rss_mb(), ru_maxrss_mb=ru_maxrss_mb())
    print(json.dumps(result))
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: ``VmHWM`` from /proc/self/status. ``ru_maxrss`` is not used there because it
    survives fork and exec: a child started by the benchmark would report the benchmark's own
    peak (hundreds of MB) instead of its workload's.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru_maxrss_mb()


def ru_maxrss_mb() -> float:
    """``getrusage``'s peak resident memory in MiB (NaN where the OS has no ``resource``)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
