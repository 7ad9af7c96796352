"""Real-model benchmarks: all-MiniLM-L6-v2's forward pass, and a text edit played into one
head's lazy engine. ``python benchmarks/bench_models.py`` prints a markdown table.

Every time is the best of several repeats (the median is printed beside it): the machine is
shared, and a slow spell says nothing about the code. Targets (issue 20): a float32 forward
pass at 512 tokens ≤ 150 ms; an edit at 512 tokens, from the edited text to one head's engine
output re-read, and through the dashboard's Text source to its plots' new data, ≤ 200 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, uninstalled

import numpy as np

from dynattn.models import Edit, EditDiff, MiniLM, TextAttention

TARGETS = {"forward_512": 0.150, "edit_512": 0.200}
# one token a word, so n words make n + 2 tokens
WORDS = [
    "the",
    "keeper",
    "climbed",
    "the",
    "stairs",
    "of",
    "the",
    "old",
    "lighthouse",
    "to",
    "watch",
    "the",
    "sea",
    "at",
    "night",
]


def text_of(tokens: int) -> str:
    """A text of exactly ``tokens`` tokens ([CLS] and [SEP] included)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens - 2))


def timed(fn, repeats: int, setup=None) -> list[float]:
    """Seconds of ``fn()`` over ``repeats`` runs, ``setup()`` untimed before each."""
    out = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(repeats: int = 7) -> dict:
    """Forward passes at 128 and 512 tokens (float32) and an edit at 512 tokens.

    Returns
    -------
    dict
        ``{name: {"tokens", "best_s", "median_s", "target_s"}}`` plus ``"load"``, the load
        averages at start and end.
    """
    load0 = os.getloadavg()[0]
    model = MiniLM.load()
    results = {}
    for n in (128, 512):
        text = text_of(n)
        assert len(model.tokenize(text)) == n
        model.forward(text)  # warm: weights converted, pages touched
        times = timed(lambda t=text: model.forward(t), repeats)
        results[f"forward_{n}"] = _row(n, times, TARGETS.get(f"forward_{n}"))
    text = text_of(512)
    edit = Edit("replace", 250, "harbour")  # one token for one: same length
    for layer in (0, 5):
        results.update(_edit_rows(model, text, edit, layer, repeats))
    results["edit_512_page"] = _page_row(model, text, edit, repeats)
    results["load"] = {"start": load0, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
    return results


def _edit_rows(model: MiniLM, text: str, edit: Edit, layer: int, repeats: int) -> dict:
    """The edit played through head (layer, 0): whole (forward of the edited text, diff, row
    updates, output re-read), then the engine's share alone on fresh copies of the engine."""
    ta = TextAttention(model, text, layer, 0)
    ta.engine.output()  # a first read measures the engine's query costs
    whole = _row(512, timed(lambda: _play(ta, edit), repeats, setup=lambda: ta.set_text(text)))
    whole["target_s"] = TARGETS["edit_512"]
    whole["rows_changed"] = int(ta.footprint.changed[layer])
    updates = EditDiff(model.forward(text), ta.forward).head_updates(layer, 0)
    base, engines = TextAttention(model, text, layer, 0).engine, []
    times = timed(
        lambda: _replay(engines[-1], updates), repeats, setup=lambda: engines.append(base.copy())
    )
    return {f"edit_512_layer{layer}": whole, f"engine_512_layer{layer}": _row(512, times)}


def _page_row(model: MiniLM, text: str, edit: Edit, repeats: int) -> dict:
    """The edit through the dashboard's Text source (layer 5, head 0), as a click on "Apply
    edit" runs it on the server: forward pass (the page's BLAS threads), row updates, the
    heatmaps' and bars' new data sent to their Bokeh models (a document is attached)."""
    import panel as pn  # the page's libraries, only for this row

    from dynattn.dashboard import TextExplorer

    page = TextExplorer(model, text=text, layer=5, head=0)
    pn.panel(page).get_root()  # Bokeh models to update, as in a served session
    page.settings.param.update(kind=edit.kind, index=edit.index, word=edit.word)
    times = timed(page.apply_edit, repeats, setup=lambda: page.set_text(text))
    assert page.state.text != text, page.alert.object
    return _row(512, times, TARGETS["edit_512"])


def _play(ta: TextAttention, edit: Edit) -> None:
    ta.apply_edit(edit)
    ta.engine.output()


def _replay(engine, updates) -> None:
    updates.apply_to(engine)
    engine.output()


def _row(tokens: int, times: list[float], target: float | None = None) -> dict:
    return {
        "tokens": tokens,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "target_s": target,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 0.01 else f"{seconds * 1e3:.0f} ms"


def table(results: dict) -> str:
    """The results as a markdown table, each target PASS or MISS on the best time."""
    lines = [
        "| measurement | tokens | best | median | target | status |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "forward_128": "forward pass, float32",
        "forward_512": "forward pass, float32",
        "edit_512_layer0": "edit → layer 0 head 0 engine → output",
        "edit_512_layer5": "edit → layer 5 head 0 engine → output",
        "engine_512_layer0": "of which the engine (layer 0: updates, output)",
        "engine_512_layer5": "of which the engine (layer 5: updates, output)",
        "edit_512_page": "edit → the Text source page (layer 5 head 0, plots' data sent)",
    }
    for key, name in names.items():
        r = results[key]
        label = f"{name} ({r['rows_changed']} rows changed)" if "rows_changed" in r else name
        target = r["target_s"]
        status = "" if target is None else ("**PASS**" if r["best_s"] <= target else "**MISS**")
        lines.append(
            f"| {label} | {r['tokens']} | {_ms(r['best_s'])} | {_ms(r['median_s'])} | "
            f"{'' if target is None else f'≤ {target * 1e3:.0f} ms'} | {status} |"
        )
    load = results["load"]
    lines.append(
        f"\n{load['cpus']} CPUs, load average {load['start']:.2f} at start, "
        f"{load['end']:.2f} at end; numpy {np.__version__}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure()))
