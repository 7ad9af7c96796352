"""What a benchmark section is: the extension point of the benchmarks.

A section is one module of :mod:`benchmarks.sections` that measures one thing and defines, at
module level, ::

    SECTION = Section("name", measure, targets=targets, render=render)

and is registered by adding its module name to :data:`benchmarks.sections.SECTIONS`. The three
functions (only ``measure`` is required):

``measure(run: Run) -> dict``
    Measures and returns entries for the top level of ``bench.json`` (numbers, strings, lists,
    dicts; numpy scalars and inf/NaN are converted on writing). Its keys must not clash with
    another section's or with ``meta``, ``notes`` and ``targets``. Sizes come from ``run.plan``
    (:class:`~benchmarks.plans.Plan`); a section's own sizes live in its module, keyed by
    ``run.plan.mode``. Progress goes to ``run.log``, remarks for the report to ``run.notes``.
``targets(res: dict, plan: Plan) -> list[dict]``
    The section's targets, each made with :func:`target` (``PASS``, ``MISS``, or ``SKIP`` when
    the plan lacks the target's size), judged from ``res``, the results of the whole run.
``render(res: dict, summary: bool) -> list[str]``
    Markdown parts (a ``### heading``, a table from :func:`benchmarks.text.table`, a paragraph)
    for ``results.md``; with ``summary`` those that also go into the README (usually none).

Sections run in the order of the registry, one after the other, in this process; a measurement
that needs a fresh process (peak memory) uses :func:`benchmarks.child.in_fresh_process`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from .plans import Plan

__all__ = ["Log", "Run", "Section", "not_run", "skipped", "target", "verdict"]

#: Where progress lines go (``print`` with a clock in the CLI).
Log = Callable[[str], None]


@dataclasses.dataclass
class Run:
    """What every section's ``measure`` is given.

    Attributes
    ----------
    plan : Plan
        Sizes and repetitions of this mode.
    log : callable
        ``log(line)`` prints one progress line.
    notes : list of str
        Remarks shown under the report's tables (a skipped measurement, a missing tool).
    """

    plan: Plan
    log: Log = print
    notes: list = dataclasses.field(default_factory=list)


def _no_targets(res: dict, plan: Plan) -> list[dict]:
    return []


def _no_parts(res: dict, summary: bool) -> list[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Section:
    """One registered benchmark section (see the module docstring for the three functions).

    Attributes
    ----------
    name : str
        The section's name (its module's, by convention); unique in the registry.
    measure : callable
        ``measure(run) -> dict`` of new top-level ``bench.json`` entries.
    targets : callable, optional
        ``targets(res, plan) -> list`` of :func:`target` records.
    render : callable, optional
        ``render(res, summary) -> list`` of markdown parts.
    """

    name: str
    measure: Callable[[Run], dict]
    targets: Callable[[dict, Plan], list] = _no_targets
    render: Callable[[dict, bool], list] = _no_parts


def target(name: str, status: str, measured: str, required: str, detail: str = "") -> dict:
    """One target's record in ``bench.json`` and in the report's targets table.

    Parameters
    ----------
    name : str
        What is required, in words ("Peak RSS < 300 MB, n=50,000 …").
    status : {"PASS", "MISS", "SKIP"}
        ``SKIP`` when this mode lacks the target's size (``measured`` is then ``"-"``).
    measured, required : str
        The measured figure and the bound, formatted.
    detail : str
        Context shown after the figure (how many cells missed, why skipped).
    """
    if status not in ("PASS", "MISS", "SKIP"):
        raise ValueError(f"status must be PASS, MISS or SKIP, got {status!r}")
    return {
        "target": name,
        "status": status,
        "measured": measured,
        "required": required,
        "detail": detail,
    }


def verdict(ok: bool) -> str:
    """``"PASS"`` or ``"MISS"``."""
    return "PASS" if ok else "MISS"


def not_run(run: Run, key: str, why: str) -> dict:
    """What ``measure`` returns for a section this mode does not run: ``{key: None}``, with
    the reason noted for the report ("<key>: not run in the <mode> mode (<why>)")."""
    run.notes.append(f"{key.replace('_', ' ')}: not run in the {run.plan.mode} mode ({why})")
    return {key: None}


def skipped(targets: Iterable[tuple[str, str]], why: str) -> list[dict]:
    """``SKIP`` records of ``(name, required)`` pairs, each saying ``why``."""
    return [target(name, "SKIP", "-", required, why) for name, required in targets]
