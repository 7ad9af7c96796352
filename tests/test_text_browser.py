"""The Text source in headless Chromium: token labels drawn, an edit played, its footprint
shown, a flush, a refused edit, a 500-word text; no console errors.

The page is the one ``app.py`` serves (:func:`~dynattn.dashboard.page.app_page`), served in a
thread of this process so the tests can compare the page with the session's explorer. Skipped
without Chromium, except under CI (``browser.chromium_path``); needs the MiniLM weights (the
``model`` fixture of test_models). With ``DYNATTN_SCREENSHOT_DIR`` set, screenshots of the
source before and after an edit go to ``<dir>/text/``.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path

import pytest
from browser import chromium, chromium_path, served, wait_for_bokeh, wait_until
from test_dashboard_browser import OVERFLOW_JS
from test_models import model  # noqa: F401  (skips without the weights, fails under CI)

from dynattn.dashboard.page import app_page

pytestmark = pytest.mark.browser

# Factors of every categorical axis; a column of the data sources of one glyph type (the
# heatmaps are Rect glyphs, the bars VBar: the synthetic dashboard's images are not wanted).
FACTORS_JS = """() => Array.from(Bokeh.documents[0].all_models)
  .filter(m => m.type === "FactorRange").map(m => m.factors)"""
COLUMN_JS = """([name, glyph]) => Array.from(Bokeh.documents[0].all_models)
  .filter(m => m.data_source !== undefined && m.glyph !== undefined
               && m.glyph.type === glyph && name in m.data_source.data)
  .map(m => Array.from(m.data_source.data[name]))"""

# Text of the visible hover tooltips (their content lives in shadow roots).
TOOLTIP_JS = """() => {
  const out = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll("*")) {
      if (el.classList.contains("bk-Tooltip") && el.getBoundingClientRect().width > 0)
        out.push((el.shadowRoot || el).textContent);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return out.join(" ");
}"""


@pytest.fixture(scope="module")
def text_server(model):  # noqa: F811
    """Base URL and weak references to every session's page, in creation order."""
    chromium_path()  # skip (or fail under CI) before starting a server
    pages = []

    def app():
        page = app_page()  # exactly what app.py serves
        pages.append(weakref.ref(page))
        return page

    with served({"app": app}) as base:
        yield base, pages


def open_text_source(page, base: str, pages: list):
    """Load the app, choose the Text source and wait until its heatmaps are drawn; returns
    the session's explorer."""
    known = len(pages)
    page.goto(f"{base}/app")
    wait_for_bokeh(page)
    wait_until(lambda: len(pages) > known, 10, "the session's page")
    source = pages[-1]().text
    page.get_by_role("button", name="Text", exact=True).click()
    explorer = wait_until(lambda: source.explorer, 60, "the Text explorer (model load)")
    wait_until(lambda: labels_drawn(page, explorer), 30, "token labels on the heatmap axes")
    return explorer


def labels_drawn(page, explorer) -> bool:
    labels = list(explorer.frame["key"].unique())
    return any(list(f) == labels for f in page.evaluate(FACTORS_JS))


def column(page, name: str, glyph: str = "Rect") -> list[list]:
    return page.evaluate(COLUMN_JS, [name, glyph])


def largest_difference(page) -> float:
    """Largest |stale − exact| the heatmaps hold in the browser (HoloViews sends the values
    of a heatmap's other dimensions as formatted strings, hence the float)."""
    return max(float(v) for values in column(page, "diff") for v in values)


def shoot(page, name: str) -> None:
    target = os.environ.get("DYNATTN_SCREENSHOT_DIR")
    if target:
        shot = Path(target) / "text" / name
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1500)  # let the last render settle
        page.screenshot(path=shot)


def test_text_source_labels_edits_footprint_and_flush(text_server):
    base, pages = text_server
    with chromium(1366, 768) as (page, errors):
        x = open_text_source(page, base, pages)
        assert "3 lighthouse" in x.frame["key"].tolist()
        assert page.evaluate(OVERFLOW_JS) == []
        # the hover reads the token pair: point at the middle of the exact heatmap
        canvas = page.locator(".bk-Canvas:visible").nth(1).bounding_box()
        page.mouse.move(canvas["x"] + canvas["width"] * 0.4, canvas["y"] + canvas["height"] / 2)
        tip = wait_until(lambda: page.evaluate(TOOLTIP_JS), 10, "the hover tooltip")
        assert re.search(r"query:\s*\d+ \S+.*key:\s*\d+ \S+.*stale:.*exact:", tip), tip
        page.mouse.move(0, 0)
        shoot(page, "text_before.png")

        # replace word 3 ("keeper") by "fog": played through the engine, bars drawn
        page.get_by_role("button", name="Apply edit").click()
        fp = wait_until(lambda: x.state.footprint, 30, "the edit")
        expected = sorted([*fp.changed.tolist(), *fp.significant.tolist()])
        wait_until(
            lambda: any(sorted(rows) == expected for rows in column(page, "rows", "VBar")),
            30,
            "the footprint bars in the browser",
        )
        assert fp.changed[0] == 1 and fp.changed[1:].min() > 1
        page.get_by_text("pending updates: 2", exact=False).wait_for(timeout=10_000)
        assert x.state.engine.pending > 0
        wait_until(lambda: labels_drawn(page, x) and "4 fog" in x.frame["key"].tolist(), 10, "")
        wait_until(lambda: largest_difference(page) > 1e-3, 10, "a difference")
        # for the screenshot, the hover over the difference map at key 4 ("fog"), query 13
        # (the plot frame spans about 18-81 % of the canvas's width and 6-80 % of its height)
        diff = page.locator(".bk-Canvas:visible").nth(2).bounding_box()
        x_rel, y_rel = 0.182 + 0.63 * 4.5 / 32, 0.059 + 0.739 * 13.5 / 32
        page.mouse.move(diff["x"] + diff["width"] * x_rel, diff["y"] + diff["height"] * y_rel)
        wait_until(lambda: page.evaluate(TOOLTIP_JS), 10, "the hover tooltip")
        shoot(page, "text_after.png")
        page.mouse.move(0, 0)

        # a flush empties the queue; the difference map goes white
        page.get_by_role("button", name="Flush", exact=True).click()
        wait_until(lambda: x.state.engine.pending == 0, 10, "the flush")
        wait_until(lambda: largest_difference(page) < 1e-5, 10, "no difference")

        # two words for one: refused, said, nothing changed
        text = x.state.text
        word = page.locator(".bk-input-group", has=page.get_by_text("new word", exact=True))
        word.locator("input").fill("two words")
        word.locator("input").press("Enter")
        wait_until(lambda: x.settings.word == "two words", 10, "the typed word")
        page.get_by_role("button", name="Apply edit").click()
        page.get_by_text("needs one word", exact=False).wait_for(timeout=10_000)
        assert x.state.text == text
        assert errors == []


def test_a_500_word_text_draws_a_window_and_takes_an_edit(text_server):
    base, pages = text_server
    with chromium(1366, 768) as (page, errors):
        x = open_text_source(page, base, pages)
        box = page.locator("textarea").first
        box.fill(" ".join(["the lighthouse keeper climbed the stairs"] * 83))  # 500 words
        page.get_by_text("Edit one word", exact=True).click()  # focus leaves the box
        wait_until(lambda: x.state.engine.n == 500, 60, "the long text read")
        wait_until(lambda: labels_drawn(page, x), 30, "the window's labels")
        assert len(x.frame) <= 32 * 32
        page.get_by_role("button", name="Apply edit").click()
        wait_until(lambda: x.state.footprint is not None, 60, "the edit at 500 tokens")
        assert x.state.footprint.n_after == 500
        assert errors == []
