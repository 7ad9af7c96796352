"""A BERT encoder's forward pass in NumPy (the architecture of all-MiniLM-L6-v2).

Post-LayerNorm blocks, absolute position embeddings, GELU with ``erf``, bidirectional
attention without mask (one unpadded sequence at a time). Each layer keeps its Q, K, V and the
attention output (``softmax(scale·QKᵀ)V`` per head, before the output projection), which is
what the lazy engine maintains and what edits are compared on.

Cost per layer at n tokens, width H, FFN width F: ``2·n·H·(4H + 2F) + 4·n²·H`` flops
(all-MiniLM-L6-v2 at n = 512: 2.2 GFLOP a layer, 13 GFLOP for six), memory
O(heads·n²) for one layer's attention weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import erf

__all__ = ["BertConfig", "BertWeights", "Forward", "check_head", "forward"]


@dataclass(frozen=True)
class BertConfig:
    """The shapes a forward pass needs, read from ``config.json``."""

    layers: int
    heads: int
    hidden: int
    intermediate: int
    max_positions: int
    eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        cfg = json.loads(Path(path).read_text())
        return cls(
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            max_positions=cfg["max_position_embeddings"],
            eps=cfg["layer_norm_eps"],
        )


@dataclass(frozen=True)
class _Layer:
    Wqkv: np.ndarray  # (H, 3H): [Wqᵀ | Wkᵀ | Wvᵀ], one product for all three
    bqkv: np.ndarray
    Wo: np.ndarray
    bo: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray]
    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray]


class BertWeights:
    """Every weight in one dtype, transposed once so each product is ``x @ W`` (C order)."""

    def __init__(self, tensors: dict[str, np.ndarray], config: BertConfig, dtype) -> None:
        dt = np.dtype(dtype)

        def get(name: str, transpose: bool = False) -> np.ndarray:
            arr = tensors[name].T if transpose else tensors[name]
            return np.ascontiguousarray(arr, dtype=dt)

        def ln(prefix: str) -> tuple[np.ndarray, np.ndarray]:
            return get(f"{prefix}.weight"), get(f"{prefix}.bias")

        self.config, self.dtype = config, dt
        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")
        self.token_type0 = get("embeddings.token_type_embeddings.weight")[0]
        self.ln_embed = ln("embeddings.LayerNorm")
        self.layers = []
        for i in range(config.layers):
            p = f"encoder.layer.{i}."
            parts = [f"{p}attention.self.{x}" for x in ("query", "key", "value")]
            self.layers.append(
                _Layer(
                    Wqkv=np.concatenate([get(f"{q}.weight", True) for q in parts], axis=1),
                    bqkv=np.concatenate([get(f"{q}.bias") for q in parts]),
                    Wo=get(f"{p}attention.output.dense.weight", True),
                    bo=get(f"{p}attention.output.dense.bias"),
                    ln1=ln(f"{p}attention.output.LayerNorm"),
                    W1=get(f"{p}intermediate.dense.weight", True),
                    b1=get(f"{p}intermediate.dense.bias"),
                    W2=get(f"{p}output.dense.weight", True),
                    b2=get(f"{p}output.dense.bias"),
                    ln2=ln(f"{p}output.LayerNorm"),
                )
            )


@dataclass(frozen=True)
class Forward:
    """One forward pass over ``n`` tokens, kept per layer.

    Attributes
    ----------
    ids : ndarray of int, shape (n,)
    q, k, v : ndarray, shape (layers, n, H)
        Each layer's queries, keys and values (unscaled); head h is columns
        ``h·head_dim : (h+1)·head_dim``.
    context : ndarray, shape (layers, n, H)
        Each layer's attention output ``softmax(scale·Q_h K_hᵀ) V_h`` per head, side by side.
    hidden : ndarray, shape (n, H) or None
        The last layer's output (None when the pass stopped early).
    scale : float
        ``1/sqrt(head_dim)``.
    heads : int
        Heads per layer.
    """

    ids: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    context: np.ndarray
    hidden: np.ndarray | None
    scale: float
    heads: int

    @property
    def head_dim(self) -> int:
        return self.q.shape[2] // self.heads


def check_head(layer, head, layers: int, heads: int) -> tuple[int, int]:
    """``(layer, head)`` as ints, or a ValueError naming the argument out of range."""
    for name, value, count in (("layer", layer, layers), ("head", head, heads)):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < count:
            raise ValueError(f"{name}={value!r} is out of range; expected 0..{count - 1}")
    return int(layer), int(head)


def _layer_norm(x: np.ndarray, wb: tuple[np.ndarray, np.ndarray], eps: float) -> np.ndarray:
    """Row-wise LayerNorm, in place on ``x``, O(n·H)."""
    x -= x.mean(axis=1, keepdims=True)
    var = np.einsum("ij,ij->i", x, x)[:, None] / x.shape[1]
    x /= np.sqrt(var + eps)
    x *= wb[0]
    x += wb[1]
    return x


def _gelu(x: np.ndarray) -> np.ndarray:
    """``x·Φ(x)`` with the exact normal CDF (BERT's "gelu"), in place, O(size)."""
    t = erf(x * x.dtype.type(1 / math.sqrt(2)))
    t += 1
    t *= 0.5
    x *= t
    return x


def _attend(qkv: np.ndarray, heads: int, scale: float) -> np.ndarray:
    """Per head ``softmax(scale·QKᵀ)V`` from the fused (n, 3H) projections: (n, H), O(n²·H)
    time and O(heads·n²) memory for the weights."""
    n, H3 = qkv.shape
    H, dh = H3 // 3, H3 // 3 // heads
    q, k, v = (
        qkv[:, i * H : (i + 1) * H].reshape(n, heads, dh).transpose(1, 0, 2) for i in (0, 1, 2)
    )
    logits = np.matmul(q * q.dtype.type(scale), k.transpose(0, 2, 1))
    logits -= logits.max(axis=2, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=2, keepdims=True)
    return np.matmul(logits, v).transpose(1, 0, 2).reshape(n, H)


def forward(weights: BertWeights, ids: np.ndarray, upto: int | None = None) -> Forward:
    """Run the encoder on one sequence of token ids.

    Parameters
    ----------
    weights : BertWeights
        Its dtype is the computation's.
    ids : array_like of int, shape (n,)
        1 ≤ n ≤ ``max_positions``.
    upto : int, optional
        Stop after computing layer ``upto``'s attention (``hidden`` is then None); default:
        all layers.

    Returns
    -------
    Forward
    """
    cfg, dt = weights.config, weights.dtype
    ids = np.asarray(ids, dtype=np.intp)
    n = len(ids)
    last = cfg.layers - 1 if upto is None else upto
    scale = 1.0 / math.sqrt(cfg.head_dim)
    x = weights.word[ids] + weights.position[:n] + weights.token_type0
    x = _layer_norm(x, weights.ln_embed, cfg.eps)
    qkv_all = np.empty((last + 1, 3, n, cfg.hidden), dtype=dt)
    context = np.empty((last + 1, n, cfg.hidden), dtype=dt)
    for i, layer in enumerate(weights.layers[: last + 1]):
        qkv = x @ layer.Wqkv
        qkv += layer.bqkv
        qkv_all[i] = qkv.reshape(n, 3, cfg.hidden).transpose(1, 0, 2)
        context[i] = _attend(qkv, cfg.heads, scale)
        if i == last and upto is not None:
            break
        a = context[i] @ layer.Wo
        a += layer.bo
        a += x
        x = _layer_norm(a, layer.ln1, cfg.eps)
        f = _gelu(np.add(x @ layer.W1, layer.b1)) @ layer.W2
        f += layer.b2
        f += x
        x = _layer_norm(f, layer.ln2, cfg.eps)
    q, k, v = (qkv_all[:, j] for j in range(3))
    return Forward(ids, q, k, v, context, None if upto is not None else x, scale, cfg.heads)
