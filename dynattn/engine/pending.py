"""What changed since the last flush (:class:`PendingUpdates`): the update log, the touched
rows S and the snapshot of K and V as of the last flush.

Invariants and costs:

* K and V are always current; the snapshot ``K_flushed``, ``V_flushed`` holds what the caches
  describe (2·n·d numbers, brought in step at each flush for the flushed rows only, O(|S|·d)).
  So no update copies what it overwrites: its old values are in the snapshot.
* A single entry update or row write appends its row's *flag* to ``log`` (K's row i as i, V's
  as n + i): the write plus 8 bytes, the hot path of every stream. The log is queued at the
  next read (:meth:`settle`), vectorised; a short log one by one, where NumPy's ~1 µs a call
  would dominate. It is queued at the latest at ``max_log`` entries (128 KB).
* A queued row has a *slot* (its position in ``rows``, ``slot[row]``, -1 when not queued) and
  flags ``moved_k`` / ``moved_v`` (its key / its value differ from the snapshot). ``count`` is
  the number of queued update actions; ``count + len(log)`` is what the engine calls pending.
* Rows updated again after being packed are marked dirty in the correction pack, so the next
  correction repacks just those.
"""

from __future__ import annotations

from array import array

import numpy as np

from .. import _validate


class PendingUpdates:
    """The update log, the queue of touched rows and the snapshot; see the module notes.

    Parameters
    ----------
    K, V : ndarray, shape (n, d)
        The engine's current keys and values (owned by the engine, written by its updates).
    """

    # logged updates up to this many are queued one by one, more in vectorised passes
    short_log = 16
    # the log is queued when it reaches this many entries: its memory stays bounded whatever
    # the policy, and queueing it (cold, among updates: ~100 µs for 4,096 entries) is rare
    max_log = 16384

    def __init__(self, K: np.ndarray, V: np.ndarray):
        n = len(K)
        self.n = n
        self.K, self.V = K, V
        self.K_flushed, self.V_flushed = (
            K,
            V,
        )  # replaced by copies once the caches are built (snapshot())
        self.slot = np.full(n, -1, dtype=np.intp)
        self.rows: list[int] = []  # the touched rows, in slot order
        self.moved = np.zeros(2 * n, dtype=bool)  # flags: K's row i at i, V's at n + i
        self.moved_k, self.moved_v = self.moved[:n], self.moved[n:]
        # int64 flags: as cheap to append to as a list, and NumPy reads it at once (a list of
        # 4,096 took 58 µs to convert, 14 ns an update)
        self.log = array("q")
        self.count = 0  # queued update actions
        self.done = 0  # update actions applied by flushes
        self.pack = None  # the correction pack, told of rows updated again (set by the engine)

    def snapshot(self) -> None:
        """Take the snapshot: copies of K and V as they are now (2·n·d numbers)."""
        self.K_flushed, self.V_flushed = (
            _validate.aligned_copy(self.K),
            _validate.aligned_copy(self.V),
        )

    def copy_state(self, other: PendingUpdates) -> None:
        """Take ``other``'s snapshot, queue and counters (its log must be settled), O(n·d)."""
        self.K_flushed, self.V_flushed = (
            _validate.aligned_copy(other.K_flushed),
            _validate.aligned_copy(other.V_flushed),
        )
        self.slot[...] = other.slot
        self.rows = list(other.rows)
        self.moved[...] = other.moved
        self.count, self.done = other.count, other.done

    @property
    def pending(self) -> int:
        """Update actions since the last flush."""
        return self.count + len(self.log)

    def touched(self, moved: np.ndarray) -> np.ndarray:
        """The queued rows flagged in ``moved`` (``moved_k`` or ``moved_v``), O(|S|). The
        caller queues the log first (the engine's ``_drain_log``, which also moves its next
        policy check: queued here, that check would come late)."""
        rows = np.array(self.rows, dtype=np.intp)
        return rows[moved[rows]]

    def touch(self, rows: np.ndarray, moved: np.ndarray, count: int) -> None:
        """Queue ``rows`` of K (``moved`` is ``moved_k``) or V, flag them, and count ``count``
        update actions; O(len(rows))."""
        self.queue(rows)
        moved[rows] = True
        self.count += count

    def queue(self, rows: np.ndarray) -> None:
        """Give the rows new to the queue a slot, vectorised, and mark the packed ones dirty.
        The caller flags the rows."""
        slot = self.slot
        had = slot[rows]
        new = rows[had < 0]
        # one of each new row without sorting: of repeated writes to a row, exactly one lands
        ticket = np.arange(len(new))
        slot[new] = ticket
        fresh = new[slot[new] == ticket]
        if len(fresh):
            start = len(self.rows)
            slot[fresh] = np.arange(start, start + len(fresh))
            self.rows.extend(fresh.tolist())
        packed = self.pack.slots
        if packed:
            self.pack.dirty.update(had[(had >= 0) & (had < packed)].tolist())

    def settle(self) -> bool:
        """Queue the rows of the logged updates; whether there were any. A short log (a query
        after each update) goes one by one in scalars, a longer one vectorised."""
        log = self.log
        if not log:
            return False
        self.count += len(log)
        n, moved = self.n, self.moved
        if len(log) <= self.short_log:
            slot, pack = self.slot, self.pack
            for flag in log:
                i = flag - n if flag >= n else flag
                k = slot.item(i)
                if k < 0:
                    slot[i] = len(self.rows)
                    self.rows.append(i)
                elif k < pack.slots:
                    pack.dirty.add(k)
                moved[flag] = True
        else:
            flags = np.array(log, dtype=np.intp)  # a copy, from the log's buffer
            moved[flags] = True
            self.queue(flags - n * (flags >= n))
        del log[:]
        return True

    def checkpoint(self) -> tuple:
        """What :meth:`rollback` needs to undo the queueing of a batch that follows; O(|S|)
        for the flags of the queued rows (a batch's own rows are added by the caller)."""
        return (len(self.rows), self.count, len(self.log))

    def rollback(self, mark: tuple, rows: np.ndarray, moved: np.ndarray, flags: np.ndarray):
        """Undo what was logged or queued since :meth:`checkpoint` returned ``mark`` (with
        the log empty then): ``moved[rows] = flags`` (the flags as they were), rows queued
        anew leave the queue, the log and the count return. Rows marked dirty stay so (a
        repack of unchanged rows is harmless)."""
        size, count, logged = mark
        moved[rows] = flags
        for r in self.rows[size:]:
            self.slot[r] = -1
        del self.rows[size:]
        del self.log[logged:]
        self.count = count

    def clear(self, rows: np.ndarray) -> None:
        """Empty the queue after a flush of ``rows`` (its rows as an index array): the
        snapshot takes their current values; O(|S|·d), not O(n)."""
        self.done += self.count + len(self.log)
        self.count = 0
        self.slot[rows] = -1
        for moved, now, then in (
            (self.moved_k, self.K, self.K_flushed),
            (self.moved_v, self.V, self.V_flushed),
        ):
            changed = rows[moved[rows]]
            then[changed] = now[changed]
            moved[rows] = False
        self.rows = []
        del self.log[:]
