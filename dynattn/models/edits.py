"""Word edits of a text as row updates of each head's Q, K and V.

An edit (replace, insert or delete a word) changes the token sequence; two forward passes, before
and after, give every layer's Q, K, V. Tokens are aligned by their common prefix and suffix of
ids: the rows in between are replaced pairwise, and the surplus is inserted or deleted. Every
aligned row whose values differ at all is a row update, so a head's engine that receives them
holds exactly the edited text's Q, K, V. How many rows that is per layer is the lesson: at
layer 0 a same-length replacement changes one row (a row depends only on its token and
position), an insertion shifts every later position, and from layer 1 on attention mixes the
change into every row, most of them by little (hence the second count, above a tolerance).

"Differ" means by more than rounding: a matrix product over n rows and one over n + 1 round
the same row differently (BLAS blocks them differently), by a few units in the last place,
so a row counts as changed when ``‖Δrow‖ > 256·eps·‖row‖`` (3e-5 relative in float32,
6e-14 in float64); a real change is many orders larger. The engine receives exactly the rows
counted, and its output matches the edited pass to that precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bert import Forward, check_head

__all__ = ["Alignment", "Edit", "EditDiff", "Footprint", "RowUpdates"]

KINDS = ("replace", "insert", "delete")


@dataclass(frozen=True)
class Edit:
    """Replace, insert or delete one whitespace-separated word.

    Parameters
    ----------
    kind : {"replace", "insert", "delete"}
    index : int
        Word position: the word replaced or deleted, or the position the new word takes
        (``len(words)`` appends).
    word : str
        The new word (replace, insert); a single word without whitespace.
    """

    kind: str
    index: int
    word: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.index, (int, np.integer)) or isinstance(self.index, bool):
            raise TypeError(f"index={self.index!r} must be an int (a word position)")
        if self.kind != "delete" and (
            not isinstance(self.word, str) or not self.word or len(self.word.split()) != 1
        ):
            raise ValueError(f"word={self.word!r}: {self.kind} needs one word, no whitespace")

    def apply(self, text: str) -> str:
        """The edited text, words joined by single spaces.

        Raises
        ------
        ValueError
            ``index`` out of range for ``text`` (the message gives the range).
        """
        words = text.split()
        top = len(words) + (self.kind == "insert")
        if not 0 <= self.index < top:
            raise ValueError(
                f"index={self.index} is out of range for a {self.kind} in a text of "
                f"{len(words)} words; expected 0..{top - 1}"
            )
        if self.kind == "replace":
            words[self.index] = self.word
        elif self.kind == "insert":
            words.insert(self.index, self.word)
        else:
            del words[self.index]
        return " ".join(words)


@dataclass(frozen=True)
class Alignment:
    """How the tokens of two texts correspond: a common prefix of ``prefix`` tokens, then
    ``paired`` replaced tokens, then ``inserted`` new or ``deleted`` old ones, then the common
    suffix (which moves by ``n_after − n_before`` positions)."""

    n_before: int
    n_after: int
    prefix: int
    paired: int
    inserted: int
    deleted: int

    @classmethod
    def of(cls, before: np.ndarray, after: np.ndarray) -> Alignment:
        """Align two id sequences by their common prefix and suffix, O(n)."""
        n0, n1 = len(before), len(after)
        short = min(n0, n1)
        p = int(np.argmin(np.append(before[:short] == after[:short], False)))
        tail = short - p
        rev = np.append(before[::-1][:tail] == after[::-1][:tail], False)
        s = int(np.argmin(rev))
        mid0, mid1 = n0 - p - s, n1 - p - s
        c = min(mid0, mid1)
        return cls(n0, n1, p, c, mid1 - c, mid0 - c)

    @property
    def insert_at(self) -> int:
        """Where new rows go (and old ones are removed from), in both indexings."""
        return self.prefix + self.paired

    def old_of_new(self) -> np.ndarray:
        """For each row of the edited text, its row before the edit, or −1 if inserted."""
        new = np.arange(self.n_after)
        old = np.where(new >= self.insert_at, new - (self.n_after - self.n_before), new)
        old[self.insert_at : self.insert_at + self.inserted] = -1
        return old

    def deleted_rows(self) -> np.ndarray:
        """Rows of the old text with no counterpart."""
        return np.arange(self.insert_at, self.insert_at + self.deleted)


@dataclass(frozen=True)
class RowUpdates:
    """What one edit does to one head's Q, K, V, as engine operations applied in this order:
    delete ``deleted`` (old rows), insert ``inserted_q/k/v`` at ``insert_at``, then set the
    changed rows (indices in the edited text)."""

    deleted: np.ndarray
    insert_at: int
    inserted_q: np.ndarray
    inserted_k: np.ndarray
    inserted_v: np.ndarray
    set_rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Row operations in all: deleted + inserted + rows set in Q, K and V."""
        return (
            len(self.deleted)
            + len(self.inserted_q)
            + sum(len(r) for r, _ in self.set_rows.values())
        )

    def apply_to(self, engine) -> None:
        """Play the operations on a :class:`~dynattn.LazyAttention` holding this head's Q, K, V
        before the edit; afterwards it holds them after. Cost: the engine's, O(d) a row
        queued; an inserted query row O(n·d). Every method needed is looked up before the
        first is called, so an engine lacking one is left untouched."""
        ops = []
        if len(self.deleted):
            ops.append((engine.delete_rows, (self.deleted,)))
        if len(self.inserted_q):
            args = (self.insert_at, self.inserted_q, self.inserted_k, self.inserted_v)
            ops.append((engine.insert_rows, args))
        for name, (rows, values) in self.set_rows.items():
            if len(rows):
                ops.append((getattr(engine, f"set_{name}_rows"), (rows, values)))
        for method, args in ops:
            method(*args)


@dataclass(frozen=True)
class Footprint:
    """Rows of the edited text whose Q, K or V (any head) changed, per layer.

    ``changed[l]`` counts rows whose largest relative change over Q, K and V,
    ``‖Δrow‖ / ‖row‖``, exceeds rounding (``noise``) at layer l, inserted rows included;
    ``significant[l]`` those above ``rtol``.
    """

    n_before: int
    n_after: int
    inserted: int
    deleted: int
    changed: np.ndarray
    significant: np.ndarray
    rtol: float
    noise: float

    def table(self) -> list[dict]:
        """One dict per layer: layer, rows, changed, significant (for a DataFrame or a plot)."""
        return [
            {"layer": i, "rows": self.n_after, "changed": int(c), "significant": int(s)}
            for i, (c, s) in enumerate(zip(self.changed, self.significant, strict=True))
        ]


def _relative_change(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row ``‖after − before‖ / ‖before‖`` (a zero row: the absolute change), O(size)."""
    norm = np.linalg.norm(before, axis=1)
    return np.linalg.norm(after - before, axis=1) / np.where(norm > 0, norm, 1)


class EditDiff:
    """The difference between two forward passes, per layer and head.

    Parameters
    ----------
    before, after : Forward
        Full passes (same dtype) over the text before and after an edit.
    rtol : float
        Relative change above which a row counts as *significant* in the footprint.

    Attributes
    ----------
    noise : float
        Relative change above which a row counts as changed: 256 units of the dtype's
        rounding.

    Notes
    -----
    Building it costs O(layers·n·H) (one comparison of every aligned row).
    """

    def __init__(self, before: Forward, after: Forward, rtol: float = 1e-2) -> None:
        if before.q.shape[0] != after.q.shape[0] or before.q.dtype != after.q.dtype:
            # a pass stopped early (upto) or in another dtype cannot be compared row for row
            raise ValueError("before and after must be passes over the same layers, same dtype")
        if not rtol >= 0:
            raise ValueError(f"rtol={rtol!r} must be ≥ 0")
        self.before, self.after, self.rtol = before, after, float(rtol)
        self.noise = 256 * float(np.finfo(before.q.dtype).eps)
        self.alignment = Alignment.of(before.ids, after.ids)
        old = self.alignment.old_of_new()
        self._new = np.flatnonzero(old >= 0)  # edited-text rows with a counterpart
        self._old = old[self._new]

    def _pairs(self, name: str, layer: int, cols=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(after, before) rows of matrix ``name`` at ``layer`` for every aligned pair."""
        a = getattr(self.after, name)[layer][self._new, cols]
        b = getattr(self.before, name)[layer][self._old, cols]
        return a, b

    def footprint(self) -> Footprint:
        """Per-layer counts of changed rows; O(layers·n·H)."""
        al = self.alignment
        layers = self.after.q.shape[0]
        changed = np.zeros(layers, dtype=int)
        significant = np.zeros(layers, dtype=int)
        for layer in range(layers):
            rel = np.max([_relative_change(*self._pairs(x, layer)) for x in "qkv"], axis=0)
            changed[layer] = (rel > self.noise).sum() + al.inserted
            significant[layer] = (rel > self.rtol).sum() + al.inserted
        return Footprint(
            al.n_before,
            al.n_after,
            al.inserted,
            al.deleted,
            changed,
            significant,
            self.rtol,
            self.noise,
        )

    def head_updates(self, layer: int, head: int) -> RowUpdates:
        """The row operations that turn head ``(layer, head)``'s Q, K, V before the edit into
        those after it: every aligned row that changed by more than ``noise`` is set,
        O(n·head_dim).

        Raises
        ------
        ValueError
            ``layer`` or ``head`` out of range (the message names it).
        """
        fw = self.after
        layer, head = check_head(layer, head, fw.q.shape[0], fw.heads)
        al, dh = self.alignment, fw.head_dim
        cols = slice(head * dh, (head + 1) * dh)
        lo, hi = al.insert_at, al.insert_at + al.inserted
        inserted = [np.array(getattr(self.after, x)[layer][lo:hi, cols]) for x in "qkv"]
        set_rows = {}
        for name in "qkv":
            a, b = self._pairs(name, layer, cols)
            hit = _relative_change(a, b) > self.noise
            set_rows[name] = (self._new[hit], np.ascontiguousarray(a[hit]))
        return RowUpdates(al.deleted_rows(), al.insert_at, *inserted, set_rows)
