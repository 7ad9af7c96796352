"""The dashboard in headless Chromium: renders offline, plays, obeys its sliders, cleans up.

One Panel server (in a thread of this process) serves the app for the whole module, so the
tests can look at the server-side Dashboard of a page as well as at the page itself. Skipped
without Chromium, except under CI (see ``browser.chromium_path``).
"""

import gc
import os
import re
import shutil
import time
import urllib.request
import weakref
from pathlib import Path

import panel as pn
import psutil
import pytest
from browser import chromium, chromium_path, served, wait_for_bokeh, wait_until

from dynattn.dashboard import Dashboard

pytestmark = pytest.mark.browser

# Every element (shadow roots included) whose right edge lies beyond the viewport.
OVERFLOW_JS = """() => {
  const bad = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll("*")) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.height > 0 && r.right > window.innerWidth + 1)
        bad.push(`${el.tagName}.${el.className} right=${Math.round(r.right)}`);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return bad;
}"""

# Lengths of the browser-side data sources, by glyph type and columns.
SOURCES_JS = """() => {
  const out = [];
  for (const m of Bokeh.documents[0].all_models) {
    if (m.data_source !== undefined && m.glyph !== undefined)
      out.push({glyph: m.glyph.type, columns: Object.keys(m.data_source.data),
                length: m.data_source.get_length()});
  }
  return out;
}"""

# Largest value of the difference heatmap as drawn (the image whose own value is "diff",
# i.e. the one without a separate "diff" column).
DIFF_MAX_JS = """() => {
  for (const m of Bokeh.documents[0].all_models) {
    if (m.glyph !== undefined && m.glyph.type === "Image") {
      const data = m.data_source.data;
      if (!("diff" in data)) return Math.max(...data.image[0]);
    }
  }
  return null;
}"""


@pytest.fixture(scope="module")
def app_server():
    """Base URL and weak references to the Dashboard of every session, in creation order.

    A session whose tab closed is discarded about 8 s later (Bokeh's default is 15 to 32 s),
    so the clean-up test does not wait long; the lifetime must exceed a page load, or the
    session made by the page request expires before the page's websocket connects (and the
    app runs a second time for that connection). ``?period=ms`` sets
    the frame period of the session's dashboard.
    """
    chromium_path()  # skip (or fail under CI) before starting a server
    dashboards = []

    def app():
        args = pn.state.session_args
        dash = Dashboard(
            period=int(args.get("period", [b"250"])[0]), playing=args.get("play", [b"0"])[0] == b"1"
        )
        dashboards.append(weakref.ref(dash))  # weak: the test must not keep sessions alive
        return dash.template()

    with served(
        {"app": app},
        check_unused_sessions_milliseconds=500,
        unused_session_lifetime_milliseconds=8000,
    ) as base:
        yield base, dashboards


def open_app(page, base: str, dashboards: list, query: str = "", drawn: bool = True):
    """Load the app in ``page`` and return the server-side Dashboard of that session.

    ``drawn=False`` waits only until the page's document is connected, not drawn.
    """
    known = len(dashboards)
    page.goto(f"{base}/app{query}")
    if drawn:
        wait_for_bokeh(page)
    else:
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0")
    wait_until(lambda: len(dashboards) > known, 10, "the session's dashboard")
    return dashboards[-1]()


def press_slider(page, title: str, key: str, times: int) -> None:
    """Focus the handle of the slider titled ``title`` and press ``key`` ``times`` times."""
    group = page.locator(".bk-input-group", has=page.locator(".bk-slider-title", has_text=title))
    handle = group.locator(".noUi-handle")
    handle.focus()
    for _ in range(times):
        handle.press(key)


def source_lengths(page, glyph: str, column: str) -> list[int]:
    return [
        s["length"]
        for s in page.evaluate(SOURCES_JS)
        if s["glyph"] == glyph and column in s["columns"]
    ]


def test_page_references_no_external_host(app_server):
    base, _ = app_server
    with urllib.request.urlopen(f"{base}/app", timeout=30) as response:
        html = response.read().decode()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert urls, "the page should load scripts and styles"
    external = [u for u in urls if re.match(r"(https?:)?//", u) and not u.startswith(base)]
    assert external == []


def test_dashboard_plays_and_obeys_its_controls(app_server, tmp_path):
    base, dashboards = app_server
    with chromium(1366, 768) as (page, errors):
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        dash = open_app(page, base, dashboards)

        # offline: every request went to this server; the page fits 1366 px
        assert [
            u
            for u in requests
            if not u.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))
        ] == []
        assert page.evaluate(OVERFLOW_JS) == []

        # a fixed policy through the page's own controls; updates arrive in two batches of
        # about 8 per tick (K, then V), so a threshold of 30 flushes every second tick
        page.get_by_role("button", name="fixed", exact=True).click()
        wait_until(lambda: dash.sim.config.policy == "fixed", 10, "policy 'fixed'")
        press_slider(page, "threshold", "ArrowRight", 20)
        wait_until(lambda: dash.sim.config.threshold == 30, 10, "threshold 10 + 20 = 30")

        page.get_by_role("button", name="▶ Play").click()
        wait_until(lambda: dash.sim.tick >= 6, 30, "six ticks while playing")
        wait_until(
            lambda: max(source_lengths(page, "Line", "error"), default=0) >= 3,
            15,
            "points in the error plot",
        )
        wait_until(
            lambda: max(source_lengths(page, "VSpan", "tick"), default=0) >= 1,
            15,
            "a flush mark in the error plot",
        )
        assert dash.series.data["flushed"].sum() >= 1

        # n changes on release (here: each key press), while playing
        press_slider(page, "n (sequence length)", "ArrowRight", 1)
        wait_until(lambda: dash.sim.engine.n == 257, 20, "the rebuild for n = 257")
        page.get_by_text("(n = 257", exact=False).first.wait_for(timeout=10_000)
        assert dash.playing

        page.get_by_role("button", name="Pause").click()
        wait_until(lambda: not dash._callback.running, 10, "the periodic callback to stop")
        page.get_by_role("button", name="Flush now").click()
        wait_until(lambda: dash.sim.engine.pending == 0, 10, "the flush")
        wait_until(
            lambda: page.evaluate(DIFF_MAX_JS) == 0,
            10,
            "the difference map to go blank after the flush",
        )
        for _ in range(10):  # until a K update lands in the window (V updates leave P alone)
            tick = dash.sim.tick
            page.get_by_role("button", name="Step one tick").click()
            wait_until(lambda: dash.sim.tick == tick + 1, 10, "one tick")  # noqa: B023
            if dash.last_frame.heat["dmax"] > 0:
                break
        wait_until(
            lambda: (page.evaluate(DIFF_MAX_JS) or 0) > 0, 10, "the difference map to fill in again"
        )

        # the explanation tab is there for students
        page.get_by_text("What am I looking at?", exact=True).click()
        page.get_by_text("Lazy updates in one paragraph").wait_for(timeout=10_000)
        page.get_by_text("Live", exact=True).click()
        page.get_by_role("button", name="▶ Play").click()
        wait_until(lambda: dash.sim.tick >= 6, 30, "a few ticks for the screenshot")
        time.sleep(1.0)

        shot = tmp_path / "screenshot.png"
        page.screenshot(path=shot)
        page.get_by_role("button", name="Pause").click()
        wait_until(lambda: not dash._callback.running, 10, "the periodic callback to stop")
        assert errors == []
    target = os.environ.get("DYNATTN_SCREENSHOT_DIR")
    if target:  # e.g. DYNATTN_SCREENSHOT_DIR=docs refreshes the committed screenshot
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "screenshot.png")
    assert shot.stat().st_size < 300_000


def test_closed_sessions_stop_and_free_their_memory(app_server):
    base, dashboards = app_server
    process = psutil.Process()

    def open_play_close(browser) -> None:
        """One session: load a page that starts playing at once, then close the tab.

        One page at a time: closing several tabs that load in parallel sometimes left a
        Bokeh session holding its document lock forever (never discarded), in Bokeh's
        server rather than in this dashboard. A 2 s frame period leaves the CPU to the
        page loads.
        """
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        dash = open_app(page, base, dashboards, "?play=1&period=2000", drawn=False)
        assert dash._callback.running
        page.close()

    with chromium() as (page, errors):
        browser = page.context.browser
        open_play_close(browser)  # warm up caches, imports and Bokeh's static resources
        first = len(dashboards)
        gc.collect()
        rss_before = process.memory_info().rss
        for _ in range(20):
            open_play_close(browser)
        assert errors == []
    opened = dashboards[first:]
    assert len(opened) == 20

    def stopped() -> bool:
        return all(ref() is None or not ref()._callback.running for ref in opened)

    # Bokeh discards a closed session within about lifetime + check interval (8.5 s here);
    # the margin is for a loaded machine, where session clean-up queues behind page work
    wait_until(stopped, 90, "the periodic callbacks of the closed sessions to stop")

    def collected() -> bool:
        gc.collect()
        return all(ref() is None for ref in opened)

    wait_until(collected, 60, "closed sessions' dashboards to be garbage collected", interval=0.5)
    growth = process.memory_info().rss - rss_before
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB over 20 sessions"
