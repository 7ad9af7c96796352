"""The measuring sections, registered in :data:`SECTIONS` in the order they run.

Each is a module here defining ``SECTION`` (a :class:`benchmarks.section.Section`; what its
functions receive and return is documented there). Adding a section is one module plus its
name in :data:`SECTIONS`; its targets and tables then appear in the report after those of the
sections before it.
"""

from __future__ import annotations

import importlib

from ..section import Section

__all__ = ["SECTIONS", "load"]

#: Module names under ``benchmarks.sections``, in the order the sections run and report.
SECTIONS = ("engine", "demo", "memory", "models", "distributed", "dashboard_play")


def load(names=SECTIONS) -> list[Section]:
    """The registered sections' :class:`Section` objects, in order.

    Raises
    ------
    TypeError
        When a module's ``SECTION`` is missing or not a :class:`Section`.
    ValueError
        When two sections share a name.
    """
    sections = []
    for name in names:
        section = getattr(importlib.import_module(f"{__name__}.{name}"), "SECTION", None)
        if not isinstance(section, Section):
            raise TypeError(f"benchmarks.sections.{name} must define SECTION = Section(...)")
        sections.append(section)
    seen = [s.name for s in sections]
    if len(set(seen)) != len(seen):
        raise ValueError(f"section names must be unique, got {seen}")
    return sections
