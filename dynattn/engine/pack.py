"""The touched rows packed for one correction product (:class:`CorrectionPack`).

A query or a flush corrects cache rows with ``exp(Q[I] Kpᵀ − m) B``: the packed keys ``Kp``
(P, d), pre-multiplied by the scale, and the matching contributions ``B`` (P, 2d+2) to the
cache columns ``[N | s | guards]`` (:class:`~dynattn.engine.kernels.Contributions`). A row
whose key changed has two entries, its new key with a *new* contribution and its old key with
an *old* one; a row whose value alone changed has one (its logit did not move), a *changed*
contribution. So one product adds new contributions, removes old ones and moves the guards.

Invariants: entries are appended as rows are touched, in any order, so P ≤ 3|S|. When a
value-only row's key changes too, its entry is zeroed (a dead entry: its old key keeps the
exponential finite, times 0) and the row is appended again with a new and an old entry.
``newpos`` lists the new-key entries (the only logits that can exceed a row's stabiliser) and
``new`` selects them: a slice while they are contiguous (a view, no copy of the logits), else
``newpos``, or None. Kept up to date incrementally: rows touched since the last use are
appended, rows updated again are patched in place, so a query after a few new updates costs
O(new rows·d) here rather than O(|S|·d).
"""

from __future__ import annotations

import numpy as np

from .. import _validate
from .kernels import Contributions, augmented_keys, max_norm


class CorrectionPack:
    """Packed keys ``Kp`` and contributions ``B`` of the touched rows; see the module notes.

    Parameters
    ----------
    queue : PendingUpdates
        The touched rows (in slot order), their flags, K, V and the snapshot K_flushed, V_flushed.
    scale : float
        Logit scale (keys are packed pre-multiplied by it).
    contributions : Contributions
    """

    def __init__(self, queue, scale: float, contributions: Contributions):
        self.queue = queue
        self.scale = scale
        self.contrib = contributions
        d, dt = contributions.d, contributions.dtype
        self.Kp = np.empty((0, d), dtype=dt)
        self.B = np.empty((0, 2 * d + 2), dtype=dt)
        self.clear()

    def clear(self) -> None:
        """Empty, keeping the capacity: regrowing after every flush cost 15 % of packing."""
        self.size = 0  # entries in use
        self.slots = 0  # touched rows (slots 0..slots-1) packed
        self.entry: list[int] = []  # per slot: its new-key or value-only entry
        self.keyed: list[bool] = []  # per slot: packed as a row whose key changed
        self.newpos = np.empty(0, dtype=np.int64)
        self.new: slice | np.ndarray | None = None
        self.knorm = 0.0  # bound on the norms of the new-key entries
        self._aug: np.ndarray | None = None  # log₂e·[Kp | 1], see augmented()
        self.dirty: set[int] = set()  # packed slots (< slots) updated since
        self.requeue: list[int] = []  # packed slots to append again (role change)
        self.views = (self.Kp[:0], self.B[:0], None)  # (Kp, B, new) in use

    @property
    def behind(self) -> bool:
        """Whether rows were touched or updated again since the last catch-up."""
        return bool(self.dirty) or self.slots < len(self.queue.rows) or bool(self.requeue)

    @property
    def rows_behind(self) -> int:
        """Rows a catch-up would (re)pack now (the log, if not queued, not counted)."""
        return len(self.dirty) + len(self.queue.rows) - self.slots + len(self.requeue)

    def catch_up(self) -> None:
        """Patch the rows updated again and append the new ones: O(rows behind · d)."""
        self._aug = None
        if self.dirty:
            self._patch()
        if self.slots < len(self.queue.rows) or self.requeue:
            slots = list(range(self.slots, len(self.queue.rows))) + self.requeue
            self.requeue = []
            self._append(slots)
        self.views = (self.Kp[: self.size], self.B[: self.size], self.new)

    def augmented(self) -> np.ndarray:
        """``log₂e·[Kp | 1]`` (P, d+1), for products that subtract m and exponentiate in base 2;
        built once per catch-up."""
        if self._aug is None:
            self._aug = augmented_keys(self.views[0])
        return self._aug

    def _reserve(self, size: int) -> None:
        """Capacity for ``size`` entries (appends are amortised O(d))."""
        self.Kp = _grown(self.Kp, self.size, size)
        self.B = _grown(self.B, self.size, size)

    def _append(self, slots: list[int]) -> None:
        """Pack entries for ``slots`` (new to the pack, or re-queued after a role change).

        Plain lists and skipped empty groups: a query after one update packs one row, where
        NumPy's per-call overhead, not the O(d) work, is the cost.
        """
        q = self.queue
        rows = q.rows
        keyed = q.moved_k[[rows[k] for k in slots]].tolist()
        ks = [k for k, key in zip(slots, keyed, strict=True) if key]
        vs = [k for k, key in zip(slots, keyed, strict=True) if not key]
        nk, nv = len(ks), len(vs)
        p, r = self.size, self.size + 2 * nk
        self._reserve(r + nv)
        Kp, B, contrib = self.Kp, self.B, self.contrib
        if nk:
            kr = np.array([rows[k] for k in ks], dtype=np.intp)  # converted once, used 4 times
            np.multiply(q.K[kr], self.scale, out=Kp[p : p + nk])
            np.multiply(q.K_flushed[kr], self.scale, out=Kp[p + nk : r])
            contrib.new(B[p : p + nk], q.V[kr], Kp[p : p + nk])
            contrib.old(B[p + nk : r], q.V_flushed[kr], Kp[p + nk : r])
            self.knorm = max(self.knorm, max_norm(Kp[p : p + nk]))
            pos = self.newpos = np.concatenate([self.newpos, np.arange(p, p + nk)])
            contiguous = pos[-1] - pos[0] + 1 == len(pos)
            self.new = slice(int(pos[0]), int(pos[-1]) + 1) if contiguous else pos
        if nv:
            vr = np.array([rows[k] for k in vs], dtype=np.intp)
            np.multiply(q.K[vr], self.scale, out=Kp[r : r + nv])
            contrib.changed(B[r : r + nv], q.V[vr], q.V_flushed[vr], Kp[r : r + nv])
        grow = max(max(slots) + 1 - len(self.entry), 0)
        self.entry.extend([-1] * grow)
        self.keyed.extend([False] * grow)
        for e, k in enumerate(ks, p):
            self.entry[k], self.keyed[k] = e, True
        for e, k in enumerate(vs, r):
            self.entry[k], self.keyed[k] = e, False
        self.size = r + nv
        self.slots = max(self.slots, len(rows))

    def _patch(self) -> None:
        """Refresh the entries of packed rows updated since (a row whose key now changed too
        gets its value-only entry zeroed and is re-queued with a new and an old entry)."""
        q = self.queue
        new_e, new_r, chg_e, chg_r = [], [], [], []
        for k in self.dirty:
            e, r = self.entry[k], q.rows[k]
            if self.keyed[k]:
                new_e.append(e)
                new_r.append(r)
            elif q.moved_k[r]:
                self.B[e] = 0  # its key still is the old one: exp stays finite, times 0
                self.requeue.append(k)
            else:
                chg_e.append(e)
                chg_r.append(r)
        self.dirty = set()
        width, dt = self.B.shape[1], self.B.dtype
        if new_e:
            keys = q.K[new_r] * dt.type(self.scale)
            self.Kp[new_e] = keys
            self.knorm = max(self.knorm, max_norm(keys))
            B_new = np.empty((len(new_e), width), dtype=dt)
            self.contrib.new(B_new, q.V[new_r], keys)
            self.B[new_e] = B_new
        if chg_e:
            B_chg = np.empty((len(chg_e), width), dtype=dt)
            self.contrib.changed(B_chg, q.V[chg_r], q.V_flushed[chg_r], self.Kp[chg_e])
            self.B[chg_e] = B_chg


def _grown(arr: np.ndarray, used: int, size: int) -> np.ndarray:
    """``arr`` with room for ``size`` rows and its first ``used`` rows kept: the capacity
    doubles, so appending is amortised O(1) a row. The new rows are left unwritten
    (``np.resize`` would fill them, touching every fresh page at once)."""
    if size <= len(arr):
        return arr
    new = _validate.aligned_empty((max(2 * len(arr), size, 16), arr.shape[1]), arr.dtype)
    new[:used] = arr[:used]
    return new
