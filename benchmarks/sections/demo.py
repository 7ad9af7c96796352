"""Item 4: the original prototype's demo workload (:func:`dynattn.compat.run_demo`: n = 1,000,
d = 50, 2,000 updates, two queries, construction included) under the original threshold rule
and under the default policy, against the stated 25 s of the original prototype."""

from __future__ import annotations

import statistics

from dynattn.compat import run_demo

from ..plans import Plan
from ..section import Run, Section, target, verdict
from ..text import table

__all__ = ["ORIGINAL_DEMO_SECONDS", "SECTION", "measure"]

#: The original prototype's demo wall time on a 2-core machine (the stated reference).
ORIGINAL_DEMO_SECONDS = 25.0


def measure(run: Run) -> dict:
    """Median of ``plan.demo_reps`` demo runs under each policy, and the speed-ups."""
    reports = [run_demo(out=_silent) for _ in range(run.plan.demo_reps)]
    original = [r["seconds"] for r in reports]
    default = [r["default_policy_seconds"] for r in reports]
    out = {
        "reference_seconds": ORIGINAL_DEMO_SECONDS,
        "original_rule_s": statistics.median(original),
        "default_policy_s": statistics.median(default),
        "original_rule_runs": original,
        "default_policy_runs": default,
    }
    out["original_rule_speedup"] = ORIGINAL_DEMO_SECONDS / out["original_rule_s"]
    out["default_policy_speedup"] = ORIGINAL_DEMO_SECONDS / out["default_policy_s"]
    run.log(
        f"  demo: original rule {out['original_rule_s'] * 1e3:.1f} ms "
        f"({out['original_rule_speedup']:.0f}×), default policy "
        f"{out['default_policy_s'] * 1e3:.1f} ms ({out['default_policy_speedup']:.0f}×)"
    )
    return {"demo": out}


def _silent(*args, **kwargs) -> None:
    """Swallows run_demo's report: only its timing is wanted here."""


def targets(res: dict, plan: Plan) -> list[dict]:
    """≥ 500× faster than the prototype under its own rule, ≥ 1,000× under the default policy."""
    demo = res["demo"]
    return [
        target(
            "Original demo ≥ 500× faster than the prototype (25 s), original rule",
            verdict(demo["original_rule_speedup"] >= 500),
            f"{demo['original_rule_speedup']:.0f}× ({demo['original_rule_s'] * 1e3:.1f} ms)",
            "≥ 500×",
        ),
        target(
            "Original demo ≥ 1,000× faster, default policy",
            verdict(demo["default_policy_speedup"] >= 1000),
            f"{demo['default_policy_speedup']:.0f}× ({demo['default_policy_s'] * 1e3:.1f} ms)",
            "≥ 1,000×",
        ),
    ]


def render(res: dict, summary: bool) -> list[str]:
    """Item 4's table (also in the README's summary)."""
    d = res["demo"]
    rows = [
        [
            "original threshold rule",
            f"{d['original_rule_s'] * 1e3:.1f} ms",
            f"{d['original_rule_speedup']:,.0f}×",
        ],
        [
            "default (cost model)",
            f"{d['default_policy_s'] * 1e3:.1f} ms",
            f"{d['default_policy_speedup']:,.0f}×",
        ],
    ]
    return [
        "### 4. Original demo workload (reference: 25 s for the original prototype)",
        table(["policy", "median", "speed-up"], rows),
    ]


SECTION = Section("demo", measure, targets=targets, render=render)
