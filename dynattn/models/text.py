"""One text, one head, its lazy engine and the last edit: the state behind a "Text" view.

Plain state and methods, no plotting import: a dashboard reads ``tokens``, ``qkv``, ``weights()``,
``engine`` and ``footprint`` and calls ``set_text``, ``select`` and ``apply_edit``.
"""

from __future__ import annotations

import numpy as np

from ..engine import LazyAttention
from ..reference import dense_weights
from .edits import Edit, EditDiff, Footprint
from .minilm import MiniLM

__all__ = ["DEFAULT_TEXT", "TextAttention"]

DEFAULT_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening. From the top he could see the "
    "harbour, the fishing boats and the storm gathering over the sea."
)


class TextAttention:
    """A text run through MiniLM, and one head's attention kept by a :class:`LazyAttention`.

    Parameters
    ----------
    model : MiniLM
        Shared read-only between instances (its weights are never written).
    text : str
        At most 512 tokens.
    layer, head : int
        The head whose Q, K, V the engine holds (0..5, 0..11).
    dtype : float32 or float64
    policy : optional
        The engine's flush policy (see :class:`LazyAttention`); default its cost model.
    rtol : float
        Relative change above which a row is *significant* in an edit's footprint.

    Notes
    -----
    A text or edit costs one full forward pass (13 GFLOP at 512 tokens) and an O(layers·n·H)
    comparison; choosing a head rebuilds its engine in O(n²·d); an edit's row updates cost the
    engine's O(d) a queued row (O(n·d) an inserted query).
    """

    def __init__(
        self,
        model: MiniLM,
        text: str = DEFAULT_TEXT,
        layer: int = 0,
        head: int = 0,
        *,
        dtype=np.float32,
        policy=None,
        rtol: float = 1e-2,
    ) -> None:
        self.model = model
        self.layer, self.head = model.check_head(layer, head)
        self.dtype = np.dtype(dtype)
        self.policy = policy
        self.rtol = rtol
        self.footprint: Footprint | None = None
        self.last_edit: Edit | None = None
        self.set_text(text)

    def set_text(self, text: str) -> None:
        """Start over with ``text``: forward pass, fresh engine, no footprint. All or nothing
        (a text that is too long raises and changes nothing)."""
        fw = self.model.forward(text, self.dtype)
        self.text, self.forward = text, fw
        self.tokens = self.model.tokenize(text)
        self.footprint, self.last_edit = None, None
        self._build_engine()

    def select(self, layer: int, head: int) -> None:
        """Show head ``(layer, head)``: its engine is rebuilt from the current pass."""
        self.layer, self.head = self.model.check_head(layer, head)
        self._build_engine()

    def _build_engine(self) -> None:
        Q, K, V = self.qkv
        self.engine = LazyAttention(Q, K, V, scale=self.forward.scale, policy=self.policy)

    @property
    def qkv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The selected head's Q, K, V (n × 32 each) for the current text (views)."""
        cols = self.model.head_slice(self.head)
        fw = self.forward
        return tuple(a[self.layer][:, cols] for a in (fw.q, fw.k, fw.v))

    def apply_edit(self, edit: Edit) -> Footprint:
        """Edit the text and play the change into the engine as row updates.

        The engine then answers exact queries for the edited text (its stale view lags until
        it flushes); :attr:`footprint` says how many rows changed per layer. All or nothing:
        a bad index or a text grown past 512 tokens raises before anything changes.
        """
        new_text = edit.apply(self.text)
        after = self.model.forward(new_text, self.dtype)
        diff = EditDiff(self.forward, after, self.rtol)
        updates = diff.head_updates(self.layer, self.head)
        updates.apply_to(self.engine)
        self.text, self.forward = new_text, after
        self.tokens = self.model.tokenize(new_text)
        self.footprint, self.last_edit = diff.footprint(), edit
        return self.footprint

    def model_output(self) -> np.ndarray:
        """The model's attention output for the selected head, ``softmax(scale·QKᵀ)V``
        (n × 32), as the forward pass computed it."""
        return self.forward.context[self.layer][:, self.model.head_slice(self.head)]

    def weights(self) -> np.ndarray:
        """The selected head's attention weights (n × n, rows sum to 1), O(n²·d): for a
        heatmap, not for the engine (which never forms them)."""
        Q, K, _ = self.qkv
        return dense_weights(Q, K, self.forward.scale, dtype=self.dtype)
