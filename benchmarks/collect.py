"""One benchmark run: describe the machine, run every registered section in turn, judge the
targets; returns the results dict written to ``bench.json``."""

from __future__ import annotations

import datetime
import os
import time

from .machine import describe, machine_info
from .plans import Plan, plan_json
from .section import Run, Section
from .sections import load

__all__ = ["collect", "evaluate_targets"]

# Top-level entries the run itself writes; a section returning one of them is an error.
_RESERVED = ("meta", "notes", "targets")


def collect(plan: Plan, log=print, sections: list[Section] | None = None) -> dict:
    """Run ``sections`` (default: the registry, :data:`benchmarks.sections.SECTIONS`) under
    ``plan``; returns the results dict (see ``benchmarks/README.md``).

    Raises
    ------
    ValueError
        When a section returns an entry that the run or an earlier section already wrote.
    """
    sections = load() if sections is None else sections
    t_start = time.perf_counter()
    machine = machine_info()
    log(describe(machine))
    if machine["loadavg_start"][0] > 0.5:
        log(
            "WARNING: the machine is busy (1-min load average > 0.5); timings will be slow "
            "and noisy"
        )
    res = {
        "meta": {
            "mode": plan.mode,
            "plan": plan_json(plan),
            "machine": machine,
            "started": datetime.datetime.now().astimezone().isoformat(),
            "preset": "gaussian",
            "d": plan.d,
        },
    }
    run = Run(plan, log)
    for section in sections:
        entries = section.measure(run)
        clash = sorted(set(entries) & (set(res) | set(_RESERVED)))
        if clash:
            raise ValueError(f"section {section.name!r} returned entries already taken: {clash}")
        res.update(entries)
    res["notes"] = run.notes
    res["meta"]["machine"]["loadavg_end"] = os.getloadavg()
    res["meta"]["seconds"] = time.perf_counter() - t_start
    res["targets"] = evaluate_targets(res, plan, sections)
    return res


def evaluate_targets(res: dict, plan: Plan, sections: list[Section] | None = None) -> list[dict]:
    """Every section's PASS / MISS / SKIP records, in the sections' order."""
    sections = load() if sections is None else sections
    return [t for section in sections for t in section.targets(res, plan)]
