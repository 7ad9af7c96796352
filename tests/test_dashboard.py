"""Dashboard behaviour without a browser: widgets in, simulation state and plot data out."""

import io
import re

import numpy as np
import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import (
    ColorBar,
    CustomJSTickFormatter,
    GlyphRenderer,
    HoverTool,
    Image,
    LogAxis,
    Plot,
)

from dynattn.dashboard import (
    MAX_SIDE,
    SERIES,
    Dashboard,
    Window,
    block_max,
    block_mean,
    plan_window,
)
from dynattn.simulation import TIMELINE_COLUMNS, Simulation


def make_dashboard(**sim_params) -> Dashboard:
    params = {"n": 64, "d": 8, "seed": 1, **sim_params}
    return Dashboard(Simulation(**params))


def images(dash: Dashboard) -> dict:
    """The image each heatmap draws now (row 0: the window's first query)."""
    return dash.heatmaps.images()


def release(slider, value) -> None:
    """What the browser sends when a slider is dragged to ``value`` and let go."""
    slider._process_events({"value": value, "value_throttled": value})


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------ pure helpers


def test_block_reductions_match_reshape_definition():
    a = np.random.default_rng(0).normal(size=(12, 20))
    blocks = a.reshape(4, 3, 5, 4)
    np.testing.assert_allclose(block_mean(a, 3, 4), blocks.mean(axis=(1, 3)))
    np.testing.assert_array_equal(block_max(a, 3, 4), blocks.max(axis=(1, 3)))
    np.testing.assert_array_equal(block_max(a, 1, 1), a)


@pytest.mark.parametrize("n", [2, 7, 511, 512, 513, 1000, 1023, 8192])
@pytest.mark.parametrize("side", [16, 128, 1024, 8192])
def test_plan_window_fits_and_never_exceeds_max_side(n, side):
    win = plan_window(n, n, side, side, r0=n, c0=-5)
    h, w = win.shape
    assert 1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE
    assert win.rows % win.fr == 0 and win.cols % win.fc == 0
    assert win.r0 >= 0 and win.r0 + win.rows <= n
    assert win.c0 == 0 and win.cols <= n
    # at most one block of rows is dropped to make the side a multiple of the block
    assert min(side, n) - win.rows < win.fr


def test_window_bounds_centre_entries_on_their_indices():
    win = Window(r0=10, rows=4, fr=1, c0=3, cols=2, fc=1)
    assert win.bounds == (2.5, 9.5, 4.5, 13.5)
    assert "every value" in win.describe("queries", "keys")
    assert "blocks of 2×2" in plan_window(1024, 1024, 1024, 1024).describe("q", "k")


# ------------------------------------------------------------------------ the dashboard


def test_panel_layout_renders_outside_a_server():
    dash = make_dashboard()
    root = pn.panel(dash).get_root(Document())  # what a notebook does with the Viewer
    assert root is not None
    assert dash.template() is not None
    # no server session: nothing registered in Panel's global session hooks
    assert dash._on_session_destroyed not in pn.state._on_session_destroyed


def test_heatmap_shapes_follow_n_window_and_view():
    dash = make_dashboard()
    figs = dash.heatmaps.figures
    assert figs["lazy"].xaxis[0].axis_label == "key j"
    assert figs["lazy"].yaxis[0].axis_label == "query i"
    for img in images(dash).values():
        assert img.shape == (64, 64)
    # the axes span exactly the window, query 0 at the top
    assert (figs["diff"].x_range.start, figs["diff"].x_range.end) == (-0.5, 63.5)
    assert (figs["diff"].y_range.start, figs["diff"].y_range.end) == (63.5, -0.5)

    dash.form.n = 300
    assert dash.sim.engine.n == 300
    assert images(dash)["exact"].shape == (128, 128)
    dash.window = 512
    assert images(dash)["exact"].shape == (300, 300)

    dash.view = "output"
    assert dash.heatmaps.figures["lazy"].xaxis[0].axis_label == "feature c"
    assert images(dash)["lazy"].shape == (300, 8)


@pytest.mark.parametrize("view", ["weights", "output"])
def test_heatmap_hover_names_only_existing_columns(view):
    dash = make_dashboard()
    dash.view = view
    root = pn.panel(dash).get_root(Document())
    plots = [
        p
        for p in root.select({"type": Plot})
        if any(isinstance(r.glyph, Image) for r in p.renderers)
    ]
    assert len(plots) == 3
    for plot in plots:
        image = next(r for r in plot.renderers if isinstance(r, GlyphRenderer))
        columns = set(image.data_source.data)
        (hover,) = [t for t in plot.tools if isinstance(t, HoverTool)]
        labels = [label for label, _ in hover.tooltips]
        assert labels[2:] == ["lazy", "exact", "|lazy − exact|"]
        for _, spec in hover.tooltips:
            for field in re.findall(r"@\{?(\w+)", spec):
                assert field in columns, (field, columns)
            for field in re.findall(r"@\{?\w+\}?", spec):
                assert hover.formatters.get(field) == "printf"


def test_log_axes_and_colour_bars_get_short_labels_of_their_own():
    """Every log axis and colour bar formats its ticks with the short labels, each with a
    formatter model of its own (a Bokeh model belongs to one session's document)."""
    formatters = []
    for _ in range(2):  # two sessions
        dash = make_dashboard()
        dash.step(3)
        root = pn.panel(dash).get_root(Document())
        log_axes = [a for a in root.select({"type": LogAxis})]
        assert len(log_axes) == 2  # error and cost (log scale by default)
        bars = list(root.select({"type": ColorBar}))
        assert len(bars) == 3
        for owner in (*log_axes, *bars):
            assert isinstance(owner.formatter, CustomJSTickFormatter)
            formatters.append(owner.formatter)
    assert len({id(f) for f in formatters}) == len(formatters)


def test_large_window_is_block_reduced_to_max_side():
    dash = make_dashboard(n=1100, d=4)
    dash.window = 2048
    assert images(dash)["diff"].shape == (366, 366)  # blocks of 3
    assert "blocks of 3×3" in dash.last_frame.heat["window"]
    # the image spans the matrix coordinates of the rows it covers
    assert dash.heatmaps.bounds == (-0.5, -0.5, 1097.5, 1097.5)


def test_lazy_and_exact_share_one_colour_range_and_lazy_matches_the_engine():
    dash = make_dashboard(policy="fixed", threshold=2048)
    dash.step(5)
    figs = dash.heatmaps.figures
    mappers = [fig.renderers[0].glyph.color_mapper for fig in figs.values()]
    assert mappers[0] is mappers[1] is not mappers[2]  # lazy and exact: one colour range
    clim = dash.last_frame.heat["clim"]
    assert (mappers[0].low, mappers[0].high) == clim
    eng = dash.sim.engine
    expected = eng.weights(slice(0, 64), slice(0, 64), stale=True)
    np.testing.assert_allclose(images(dash)["lazy"], expected, rtol=1e-6)


def test_difference_is_zero_right_after_a_flush_and_regrows():
    dash = make_dashboard(policy="fixed", threshold=2048, k_share=1.0)
    dash.step(6)
    assert dash.sim.engine.pending > 0
    assert dash.last_frame.heat["dmax"] > 0
    dash.flush_button.clicks += 1
    assert dash.sim.engine.pending == 0
    assert np.all(images(dash)["diff"] == 0)
    assert dash.last_frame.heat["dmax"] == 0
    dash.step_button.clicks += 1
    assert dash.last_frame.heat["dmax"] > 0


def test_series_buffer_is_bounded_and_holds_tick_records():
    dash = Dashboard(Simulation(n=32, d=4, policy="fixed", threshold=20), points=25)
    dash.ticks_per_frame = 10
    for _ in range(4):
        dash.step()
    data = dash.series.data
    assert list(data.columns) == list(SERIES)
    assert len(data) == 25
    assert data["tick"].tolist() == list(range(15, 40))
    assert data["flushed"].sum() > 0  # threshold 20 at 16 updates/tick: flush marks exist
    # the plots built from the buffer carry the same ticks, including the flush marks
    overlay = dash.error_pane.object[()]
    assert len(overlay.VLines.I) == int(data["flushed"].sum())


def test_reset_clears_series_and_restarts_ticks():
    dash = make_dashboard()
    dash.step(3)
    dash.reset_button.clicks += 1
    assert dash.sim.tick == 0
    assert len(dash.series.data) == 0
    assert not dash.alert.visible


def test_policy_selects_which_control_is_shown():
    dash = make_dashboard()
    shown = {}
    for policy in ("fixed", "error", "adaptive", "cost"):
        dash.form.policy = policy
        shown[policy] = (dash.controls["threshold"].visible, dash.controls["tolerance"].visible)
        assert dash.sim.config.policy == policy
    # the threshold slider is always there (it follows the live threshold under the others)
    assert shown == {
        "fixed": (True, False),
        "error": (True, True),
        "adaptive": (True, False),
        "cost": (True, False),
    }
    dash.form.policy = "error"
    dash.controls["tolerance"].value = 1e-6
    assert dash.sim.config.tolerance == 1e-6


def test_controls_at_their_ends_keep_working():
    dash = make_dashboard()
    dash.form.param.update(policy="fixed")
    dash.controls["threshold"].value = 1
    dash.controls["updates_per_tick"].value = 1024
    dash.controls["queries_per_tick"].value = 1024
    release(dash.controls["n"], 2)
    release(dash.controls["d"], 1)
    dash.step(2)
    assert (dash.sim.engine.n, dash.sim.engine.d) == (2, 1)
    assert dash.sim.engine.pending == 0  # threshold 1: every update flushes
    assert images(dash)["lazy"].shape == (2, 2)
    assert dash.row_slider.disabled and dash.col_slider.disabled
    dash.view = "output"
    assert images(dash)["lazy"].shape == (2, 1)
    assert not dash.alert.visible


def test_n_slider_applies_only_when_released():
    dash = make_dashboard()
    dash.controls["n"]._process_events({"value": 100})  # dragging
    assert dash.sim.engine.n == 64
    release(dash.controls["n"], 100)
    assert dash.sim.engine.n == 100


def test_changing_n_while_playing_explains_and_keeps_playing():
    dash = make_dashboard()
    dash.play_toggle.value = True
    assert dash.playing and dash._callback.running
    dash.step(2)
    release(dash.controls["n"], 40)
    assert dash.playing and dash._callback.running
    assert dash.sim.engine.n == 40 and dash.sim.tick == 0
    assert dash.alert.visible and dash.alert.alert_type == "info"
    assert "n = 40" in dash.alert.object
    assert images(dash)["lazy"].shape == (40, 40)
    dash.play_toggle.value = False
    assert not dash._callback.running


def test_buttons_in_any_order():
    dash = make_dashboard()
    for button in ("flush", "reset", "flush", "step", "step", "reset", "step", "flush"):
        getattr(dash, f"{button}_button").clicks += 1
        assert not dash.alert.visible, dash.alert.object
    dash.play_toggle.value = True
    dash.reset_button.clicks += 1
    dash.flush_button.clicks += 1
    dash.play_toggle.value = False
    dash.play_toggle.value = False
    assert dash.sim.tick == 0
    assert not dash.alert.visible


def test_bad_npz_shows_a_message_and_keeps_the_previous_state():
    dash = make_dashboard()
    dash.step(2)
    before = (dash.sim.engine.n, dash.sim.tick)
    dash.file_input.filename = "notes.npz"
    dash.file_input.value = b"this is not a zip archive"
    assert dash.alert.visible and dash.alert.alert_type == "danger"
    assert "notes.npz" in dash.alert.object
    assert (dash.sim.engine.n, dash.sim.tick) == before
    dash.file_input.value = npz_bytes(Q=np.ones((5, 2)), K=np.ones((5, 3)), V=np.ones((5, 2)))
    assert "same shape" in dash.alert.object
    dash.step(1)  # still usable
    assert dash.sim.tick == before[1] + 1


def test_good_npz_rebuilds_and_updates_the_controls():
    rng = np.random.default_rng(3)
    Q, K, V = rng.normal(size=(3, 10, 4))
    dash = make_dashboard()
    dash.file_input.filename = "mine.npz"
    dash.file_input.value = npz_bytes(Q=Q, K=K, V=V)
    assert dash.alert.alert_type == "success"
    assert (dash.sim.engine.n, dash.sim.engine.d) == (10, 4)
    assert (dash.form.n, dash.form.d, dash.form.preset) == (10, 4, "file")
    np.testing.assert_array_equal(dash.sim.engine.K, K)
    assert images(dash)["exact"].shape == (10, 10)
    # n is fixed by the file: changing it is refused with a message, the file stays in use
    release(dash.controls["n"], 20)
    assert dash.alert.alert_type == "danger"
    assert dash.sim.engine.n == 10 and dash.form.n == 10


def test_rejected_setting_restores_the_control():
    dash = make_dashboard()
    dash.controls["preset"].value = "file"  # no file loaded yet
    assert dash.alert.visible and "upload a .npz file" in dash.alert.object
    assert dash.form.preset == dash.sim.config.preset == "gaussian"
    assert dash.controls["preset"].value == "gaussian"


def test_a_failing_tick_pauses_and_explains(monkeypatch):
    dash = make_dashboard()
    dash.playing = True

    def broken():
        raise FloatingPointError("overflow in exp")

    monkeypatch.setattr(dash.sim, "tick_parts", lambda *args: broken())
    dash._on_frame()
    assert not dash.playing and not dash._callback.running
    assert "overflow in exp" in dash.alert.object


def test_a_heavy_tick_is_spread_over_frames_within_their_budget():
    dash = make_dashboard(n=512, d=16, updates_per_tick=256, queries_per_tick=8)
    dash.frame_budget = 0.01  # far less than one tick: its eager baseline is split in chunks
    dash.ticks_per_frame = 4
    frames = [dash.play_frame() for _ in range(400) if dash.sim.tick < 2]
    assert dash.sim.tick == 2
    assert len(frames) > 2 and sum(f.ticks for f in frames) == 2
    assert any(f.ticks == 0 for f in frames)  # frames that carried only parts of a tick
    # the spread tick is the same tick as one run at once (same updates, same engine state)
    whole = Simulation(n=512, d=16, seed=1, updates_per_tick=256, queries_per_tick=8)
    whole.run(2)
    np.testing.assert_allclose(whole.engine.output(), dash.sim.engine.output(), rtol=1e-12)
    np.testing.assert_allclose(whole.eager.output(), dash.sim.eager.output(), rtol=1e-12)


def test_reset_while_a_tick_is_in_flight_abandons_it():
    dash = make_dashboard(n=512, d=16, updates_per_tick=256)
    dash.frame_budget = 0.01
    dash.play_frame()
    assert dash._player.tick is not None and dash.sim.tick == 0
    dash.reset_button.clicks += 1
    assert dash._player.tick is None
    dash.step(1)
    assert dash.sim.tick == 1 and len(dash.sim.timeline) == 1


def test_window_sliders_follow_n():
    dash = make_dashboard(n=300)
    assert dash.param.row0.bounds == (0, 300 - 128)
    assert (dash.row_slider.start, dash.row_slider.end) == (0, 172)
    dash.row_slider.value = 172
    assert dash.heatmaps.bounds[1] == pytest.approx(171.5)
    dash.form.n = 200  # the window start moves back so that the window still fits
    assert dash.row0 == 72 and dash.row_slider.end == 72
    dash.form.n = 100
    assert dash.row0 == 0 and dash.row_slider.disabled


def test_speedups_and_counters_are_shown():
    dash = make_dashboard()
    assert all(number.format == "–" for number in dash.speedups.values())  # no tick yet
    dash.step(3)
    stats = dash.last_frame.stats
    assert stats["ticks"] == 3 and stats["updates"] == 48
    for key, number in dash.speedups.items():
        assert number.value == pytest.approx(stats["speedup"][key])
        assert number.format.endswith("×") and number.format != "0.0×"
    html = dash.counters.object
    for label in (
        "ticks",
        "pending",
        "touched rows",
        "flushes",
        "threshold",
        "last flush",
        "tick: model",
        "frame render",
    ):
        assert label in html


def test_csv_download_is_the_timeline():
    dash = make_dashboard()
    dash.step(4)
    text = dash.download.callback().read()
    lines = text.strip().splitlines()
    assert lines[0].split(",") == list(TIMELINE_COLUMNS)
    assert len(lines) == 5


def test_log_and_unit_toggles_rebuild_only_their_plot():
    dash = make_dashboard(policy="fixed", threshold=16)  # a flush every tick: error 0
    dash.step(3)
    heat = dash.heat_pane.object
    dash.log_error = False
    dash.cost_unit = "flops"
    assert dash.heat_pane.object is heat
    cost = dash.cost_pane.object[()]
    assert cost.values()[0].vdims[0].label == "flops"
    errors = dash.error_pane.object[()]
    assert errors.values()[0].range("error")[0] == 0  # linear axis: exact ticks show as 0


def test_advance_reports_its_tick_time():
    """The page shows what a tick costs (the 50 ms budget itself is a benchmark target:
    ``make bench``, item 6; a timed test would fail on a busy machine)."""
    dash = Dashboard(Simulation(n=1024, d=64, updates_per_tick=16))
    frames = [dash.advance(1) for _ in range(3)]
    assert all(f.seconds > 0 for f in frames)
    tick_seconds = dash.sim.timeline.tail(1)["tick_seconds"][0]
    assert dash.last_frame.stats["tick_ms"] == pytest.approx(tick_seconds * 1e3)
    assert tick_seconds <= frames[-1].seconds
