"""Item 7: a real transformer (all-MiniLM-L6-v2, :mod:`dynattn.models`): the float32 forward
pass at 128 and 512 tokens, and a text edit at 512 tokens played into one head's lazy engine
and its output re-read, and through the dashboard's Text source (the measuring code is
``benchmarks/bench_models.py``)."""

from __future__ import annotations

from .. import bench_models
from ..plans import Plan
from ..section import Run, Section, target, verdict

__all__ = ["SECTION"]

REPEATS = {"full": 7, "quick": 3, "tiny": 1}


def measure(run: Run) -> dict:
    res = bench_models.measure(repeats=REPEATS[run.plan.mode])
    run.log(
        f"  model: forward 512 tokens {res['forward_512']['best_s'] * 1e3:.0f} ms, edit "
        f"{max(res[k]['best_s'] for k in _edits(res)) * 1e3:.0f} ms"
    )
    return {"models": res}


def _edits(res: dict) -> list[str]:
    return [k for k in res if k.startswith("edit_512")]


def targets(res: dict, plan: Plan) -> list[dict]:
    r = res["models"]
    forward = r["forward_512"]["best_s"]
    edit = max(r[k]["best_s"] for k in _edits(r))
    return [
        target(
            "Real model: forward pass at 512 tokens ≤ 150 ms (float32, all-MiniLM-L6-v2)",
            verdict(forward <= 0.150),
            f"{forward * 1e3:.0f} ms",
            "≤ 150 ms",
        ),
        target(
            "Real model: an edit at 512 tokens into one head's engine and re-drawn ≤ 200 ms",
            verdict(edit <= 0.200),
            f"{edit * 1e3:.0f} ms (worst of layers 0 and 5 and the Text source page)",
            "≤ 200 ms",
        ),
    ]


def render(res: dict, summary: bool) -> list[str]:
    return ["### 7. Real model (all-MiniLM-L6-v2)", bench_models.table(res["models"])]


SECTION = Section("models", measure, targets=targets, render=render)
