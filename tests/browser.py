"""Helpers for browser tests: serve a Panel app in-process and drive headless Chromium.

Facts these rest on (see the project notes): Playwright uses the system Chromium at
``/usr/bin/chromium`` (never a downloaded browser); ``pn.serve(..., threaded=True)`` runs the
Bokeh server in a thread of the test process, so tests can inspect the server-side session
objects directly; ``/liveness`` answers without creating a session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import urllib.request

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """Path of the system Chromium; skips the test without one, but fails under CI.

    A CI run that silently skipped every browser test would prove nothing, hence the
    failure there.
    """
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    if path is None:
        reason = (
            "no Chromium at /usr/bin/chromium or on PATH (apt-get install chromium); "
            "browser tests need it"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(apps: dict, timeout: float = 30.0, **serve_kwargs):
    """Serve ``apps`` (name -> factory) with Panel in a thread; yields the base URL.

    ``serve_kwargs`` go to ``pn.serve`` (e.g. Bokeh's ``check_unused_sessions_milliseconds``
    and ``unused_session_lifetime_milliseconds``). The server is stopped, joined and Panel's global
    state reset on exit, so tests do not leak sessions or callbacks into each other.
    """
    import panel as pn

    port = free_port()
    server = pn.serve(
        apps,
        port=port,
        address="127.0.0.1",
        threaded=True,
        show=False,
        websocket_origin=[f"127.0.0.1:{port}"],
        liveness=True,
        **serve_kwargs,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/liveness"), timeout, "the Panel server to start")
        yield base
    finally:
        server.stop()
        server.join(timeout=10)
        pn.state.reset()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def chromium(width: int = 1366, height: int = 768):
    """A headless Chromium page of the given viewport that records console errors.

    Yields ``(page, errors)``: ``errors`` collects console messages of type "error" and
    uncaught page exceptions as strings.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def wait_for_bokeh(page, timeout_ms: int = 30_000) -> None:
    """Wait until BokehJS has a document and at least one canvas is drawn."""
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=timeout_ms)
    page.locator(".bk-Canvas").first.wait_for(timeout=timeout_ms)
