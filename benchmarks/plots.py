"""Plots of a run's results: cost per update against the flush threshold k, query latency
against pending rows, and all strategies side by side; HTML (holoviews + bokeh, resources
inline, work offline) and PNG screenshots of them taken by a headless Chromium when one is
installed. holoviews and bokeh are imported by :func:`write_plots` only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .plans import STREAM_LABELS, STREAMS

__all__ = ["write_plots"]


def write_plots(res: dict, out: Path, suffix: str, png: bool = True, log=print) -> list[str]:
    """HTML plots (holoviews + bokeh, resources inline, work offline) and, with ``png``, PNG
    screenshots of them when a headless Chromium is found. Returns the files written."""
    import holoviews as hv
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    hv.extension("bokeh", logo=False)
    figures = {
        "cost_vs_k": _plot_cost_vs_k,
        "query_latency": _plot_queries,
        "strategies": _plot_strategies,
    }
    browser = _chromium() if png else None
    if png and browser is None:
        res["notes"].append(
            "PNG plots not written: no headless Chromium found (the HTML "
            "plots hold the same figures)"
        )
    written = []
    for name, build in figures.items():
        for static in (False, True) if browser else (False,):
            fig = build(res, hv, static)
            if fig is None:
                break
            html = file_html(hv.render(fig, backend="bokeh"), INLINE, name)
            if not static:
                path = out / f"{name}{suffix}.html"
                path.write_text(html, encoding="utf-8")
                written.append(str(path))
            elif browser is not None:
                path = out / f"{name}{suffix}.png"
                error = _screenshot(browser, html, path)
                if error:
                    res["notes"].append(f"{path.name} not written: {error}")
                else:
                    written.append(str(path))
    log("plots: " + ", ".join(written))
    return written


def _chromium() -> str | None:
    """Path of a Chromium or Chrome on this machine, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def _screenshot(browser: str, html: str, png: Path) -> str | None:
    """Render ``html`` in headless Chromium and save a PNG trimmed to the figure; returns an
    error text or None. (Bokeh's own PNG export needs selenium, which is not a dependency;
    Pillow comes with bokeh.)"""
    from PIL import Image, ImageChops

    with tempfile.TemporaryDirectory() as tmp:
        page, shot = Path(tmp) / "plot.html", Path(tmp) / "shot.png"
        page.write_text(html, encoding="utf-8")
        # a window larger than any figure here; the white margin is trimmed below
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--no-first-run",
            "--window-size=1800,2400",
            "--virtual-time-budget=10000",
            f"--screenshot={shot}",
            page.as_uri(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if not shot.exists():
            return f"Chromium exited with {proc.returncode}"
        with Image.open(shot) as img:
            rgb = img.convert("RGB")
            box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, "white")).getbbox()
            (rgb.crop(box) if box else rgb).save(png, optimize=True)
    return None


_RATE_COLORS = {1.0: "#d62728", 0.01: "#1f77b4", 0.0001: "#2ca02c"}


def _plot_cost_vs_k(res, hv, static):
    """One panel per (n, dtype, stream): cost against k per query rate, the cost model dashed."""
    rows = res["updates"]
    if not rows:
        return None
    panels = []
    for n in sorted({r["n"] for r in rows}):
        for dtype in res["meta"]["plan"]["dtypes"]:
            for stream in STREAMS:
                cell = [
                    r for r in rows if r["n"] == n and r["dtype"] == dtype and r["stream"] == stream
                ]
                if not cell:
                    continue
                layers = []
                for rate in sorted({r["rate"] for r in cell}, reverse=True):
                    layers += _cost_vs_k_layers(hv, [r for r in cell if r["rate"] == rate], rate)
                panels.append(
                    _log_log(
                        hv,
                        layers,
                        static,
                        title=f"n={n:,} {dtype} {STREAM_LABELS[stream]}",
                        width=330,
                        height=250,
                        show_legend=stream == STREAMS[0],
                        legend_position="bottom_left",
                        fontsize={"title": 9},
                    )
                )
    return (
        hv.Layout(panels)
        .cols(3)
        .opts(title="Cost per update vs flush threshold k (k=1: eager); dashed: cost-model policy")
    )


def _log_log(hv, layers, static: bool, **opts):
    """``layers`` overlaid on log-log axes, with a toolbar unless ``static`` (for a PNG)."""
    return hv.Overlay(layers).opts(
        logx=True, logy=True, toolbar=None if static else "right", **opts
    )


def _cost_vs_k_layers(hv, rows, rate) -> list:
    """Curve and points of eager (k = 1) and the fixed-k policies at one rate, and the cost
    model's level, from one cell's ``rows`` at that rate."""
    pts = sorted(
        (
            1 if r["strategy"] == "eager O(nd)" else int(r["strategy"].split("=")[1]),
            r["per_total"] * 1e6,
        )
        for r in rows
        if r["strategy"] == "eager O(nd)" or r["strategy"].startswith("lazy k=")
    )
    color = _RATE_COLORS.get(rate, "black")
    label = f"q={rate:g}"
    cost = next(r["per_total"] * 1e6 for r in rows if r["strategy"] == "lazy cost")
    return [
        hv.Curve(pts, "k", "µs per update+share", label=label).opts(color=color),
        hv.Scatter(pts, "k", "µs per update+share", label=label).opts(color=color, size=5),
        hv.HLine(cost).opts(color=color, line_dash="dashed"),
    ]


def _plot_queries(res, hv, static):
    """Query latency against pending rows per dtype; on-demand's single query dotted."""
    rows = res["queries"]
    if not rows:
        return None
    panels = []
    for dtype in sorted({r["dtype"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["dtype"] == dtype]
        layers = []
        for key, label in (
            ("single_s", "single entry"),
            ("row_s", "whole row"),
            ("batch1000_s", "batch of 1,000"),
        ):
            pts = [(r["pending"], r[key] * 1e6) for r in sel]
            layers.append(hv.Curve(pts, "pending rows k", "µs", label=label))
            layers.append(hv.Scatter(pts, "pending rows k", "µs", label=label).opts(size=5))
        base = [b for b in res["query_baselines"] if b["dtype"] == dtype]
        if base and "on-demand" in base[0]:
            layers.append(
                hv.HLine(base[0]["on-demand"]["single_s"] * 1e6).opts(
                    color="gray", line_dash="dotted"
                )
            )
        panels.append(
            _log_log(
                hv,
                layers,
                static,
                title=f"Exact query latency, n={sel[0]['n']:,} {dtype} (dotted: on-demand single)",
                width=520,
                height=340,
                legend_position="top_left",
            )
        )
    return hv.Layout(panels).cols(2)


def _strategy_axis(plot, element) -> None:
    """Slanted strategy names under each group of bars; the q of each bar is in its colour."""
    axis = plot.state.xaxis[0]
    axis.group_label_orientation = 0.9
    axis.major_label_text_font_size = "0pt"
    axis.separator_line_alpha = 0
    for legend in plot.state.legend:  # one row, above the bars (the y axis reaches 10^8)
        legend.title = "queries per update"
        legend.orientation = "horizontal"


def _plot_strategies(res, hv, static):
    """Bars of every strategy per (n, stream) at the first dtype, one colour per rate."""
    rows = [r for r in res["updates"] if r["dtype"] == res["meta"]["plan"]["dtypes"][0]]
    if not rows:
        return None
    order = list(dict.fromkeys(r["strategy"] for r in rows))
    panels = []
    for n in sorted({r["n"] for r in rows}):
        for stream in STREAMS:
            data = [
                (r["strategy"], f"{r['rate']:g}", r["per_total"] * 1e6)
                for r in rows
                if r["n"] == n and r["stream"] == stream
            ]
            if not data:
                continue
            data.sort(key=lambda t: (order.index(t[0]), -float(t[1])))
            panels.append(
                hv.Bars(data, ["strategy", "q"], "µs per update+share").opts(
                    title=f"n={n:,} {rows[0]['dtype']} {STREAM_LABELS[stream]}",
                    logy=True,
                    width=560,
                    height=300,
                    xrotation=60,
                    xlabel="strategy",
                    color="q",
                    cmap={f"{k:g}": v for k, v in _RATE_COLORS.items()},
                    show_legend=not panels,
                    legend_position="top_left",
                    hooks=[_strategy_axis],
                    toolbar=None if static else "right",
                    fontsize={"title": 9, "xticks": 7},
                )
            )
    return (
        hv.Layout(panels)
        .cols(3)
        .opts(title="Strategies compared: cost per (update + share of q queries per update)")
    )
