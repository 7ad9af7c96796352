"""The client side of a sharded engine: its buffer of updates (:class:`ClientLog`) and its
calls to the shards (:class:`ShardCalls`)."""

from __future__ import annotations

import bisect
from array import array

import numpy as np

from ._cluster import ShardError

__all__ = ["ClientLog", "ShardCalls"]


class ClientLog:
    """What the client has not yet applied everywhere: one flag per update action (row i of K
    as i, of V as n + i), and the rows touched since the flush.

    It stands where the engine keeps its :class:`~dynattn.engine.pending.PendingUpdates`, with
    the members the engine's update verbs and policy consultation use (``log``, ``count``,
    ``done``, ``max_log``, ``moved_k``/``moved_v``, ``touch``, ``checkpoint``, ``rollback``),
    so those run unchanged on the client. Shard s has been sent ``log[:sent[s]]``; a batch
    sent without waiting is *in flight* until the next call to its shard confirms it; entries
    every shard has confirmed leave the log (:meth:`trim`) and are counted in ``count``.
    Memory: O(n) flags and the log (``max_log`` entries, more while a shard is behind).
    """

    def __init__(self, n: int, shards: int, max_log: int):
        self.n, self.max_log = n, max_log
        self.log = array("q")
        self.count = 0  # actions every shard has received, since the flush
        self.done = 0  # actions applied by flushes
        self.sent = [0] * shards
        self.inflight = [None] * shards  # (future, log length) of a batch sent unwaited
        self.moved = np.zeros(2 * n, dtype=bool)  # by flag: changed since the flush
        self.moved_k, self.moved_v = self.moved[:n], self.moved[n:]
        self.hit = np.zeros(n, dtype=bool)  # rows of K or V changed since the flush
        self.touched = 0  # |S|: hit.sum(), kept as it changes
        self.noted = 0  # log[:noted] is folded into moved and hit
        self.base = 0  # entries trimmed so far: log[k] is the base + k-th ever logged

    # --- what the engine's update verbs call (PendingUpdates' names and meanings)
    def touch(self, rows: np.ndarray, moved: np.ndarray, count: int) -> None:
        """Log ``rows`` of K (``moved`` is ``moved_k``) or V: one flag per action (``count``
        of them, as the log counts itself)."""
        flags = rows if moved is self.moved_k else rows + self.n
        self.log.frombytes(np.asarray(flags, dtype=np.int64).tobytes())

    def checkpoint(self) -> int:
        """The log's end, counted from the first entry ever logged (trims do not move it)."""
        return self.base + len(self.log)

    def rollback(self, mark: int, rows: np.ndarray, moved: np.ndarray, flags: np.ndarray):
        """Undo what was logged since :meth:`checkpoint` gave ``mark`` (the caller has put
        the values back): ``moved[rows] = flags`` and pending as it was. Entries no shard has
        been sent leave the log. If a shard already has some (a policy read exact answers
        before failing), ``rows`` are logged again so every shard gets the values back,
        uncounted: pending still returns to what it was."""
        start = mark - self.base
        sent = max(self.sent + [f[1] for f in self.inflight if f])
        if start >= sent:
            del self.log[start:]
            self.noted = min(self.noted, start)
        else:
            again = rows if moved is not self.moved_v else rows + self.n
            self.count -= self.base + len(self.log) - mark + len(again)
            self.note()  # everything logged so far; the rows logged again mark nothing
            self.log.frombytes(np.asarray(again, dtype=np.int64).tobytes())
            self.noted = len(self.log)
        moved[rows] = flags
        if moved is self.moved:  # rows are flags (K's row i as i, V's as n + i)
            rows = np.where(rows >= self.n, rows - self.n, rows)
        rows = np.unique(rows)
        now = self.moved_k[rows] | self.moved_v[rows]
        self.touched -= int(np.count_nonzero(self.hit[rows] & ~now))
        self.hit[rows] = now

    # --- the client's own bookkeeping
    def note(self) -> None:
        """Fold the flags logged since the last call into the touched rows, O(new flags)."""
        log = self.log
        self.noted = min(self.noted, len(log))  # a single update taken back after a note
        if self.noted == len(log):
            return
        flags = np.frombuffer(log[self.noted :], dtype=np.int64)
        self.noted = len(log)
        self.moved[flags] = True
        rows = np.where(flags >= self.n, flags - self.n, flags)
        new = np.unique(rows[~self.hit[rows]])
        self.hit[new] = True
        self.touched += len(new)

    def batch(self, shard: int, K: np.ndarray, V: np.ndarray, memo: dict | None = None):
        """``(batch, upto)``: the rows logged but not yet sent to ``shard``, with their current
        values in K and V (|S|·d numbers each), and the log length they cover. ``memo``, kept
        by a caller sending to several shards between two updates, makes each batch once."""
        upto, start = len(self.log), self.sent[shard]
        if start == upto:
            return None, upto
        if memo is not None and (start, upto) in memo:
            return memo[start, upto], upto
        flags = np.unique(np.frombuffer(self.log[start:upto], dtype=np.int64))
        split = np.searchsorted(flags, self.n)
        k_rows, v_rows = flags[:split], flags[split:] - self.n
        batch = (k_rows, K[k_rows], v_rows, V[v_rows])
        if memo is not None:
            memo[start, upto] = batch
        return batch, upto

    def trim(self) -> bool:
        """Drop the entries every shard has applied (they join ``count``); whether any."""
        k = min(self.sent)
        if k == 0:
            return False
        self.note()
        self.count += k
        del self.log[:k]
        self.base += k
        self.sent = [s - k for s in self.sent]
        self.inflight = [f and (f[0], f[1] - k) for f in self.inflight]
        self.noted -= k
        return True

    def clear(self) -> None:
        """After a flush (the log is empty: every shard had it): nothing is pending."""
        self.done += self.count
        self.count = 0
        self.moved[:] = False
        self.hit[:] = False
        self.touched = 0


class ShardCalls:
    """Calls from the client to the shards of :class:`~dynattn.distributed.ShardedAttention`,
    each preceded by that shard's share of the buffer, with failures named. The subclass
    provides ``_queue`` (a :class:`ClientLog`), ``_K``, ``_V``, ``_hosts``, ``_starts``,
    ``_places``, ``_label`` and ``_plan_next_ask``."""

    def _drain_log(self) -> None:
        """Where the engine queues its log: here, once the log is full (``max_log``), send it
        to every shard without waiting for them to apply it. The client buffers on meanwhile;
        the next call to a shard waits for its batch first, and reports a failure then."""
        if len(self._queue.log) < self._queue.max_log:
            return
        failures, memo = [], {}
        for s in range(len(self._hosts)):
            _shard, fut, upto = self._issue(s, None, memo=memo)
            if isinstance(fut, BaseException):
                failures.append((self._describe(s), fut))
            else:
                self._queue.inflight[s] = (fut, upto)
        self._trim()
        if failures:
            raise ShardError("sending updates", failures)

    def _issue(self, shard: int, name: str | None, *args, ship: bool = True, memo=None):
        """Start ``name(*args)`` on ``shard``, its share of the buffer first (unless not
        ``ship``); returns ``(shard, future or exception, log length covered)``. A batch
        still in flight to that shard is waited for first: calls to one actor are not
        ordered otherwise."""
        queue = self._queue
        if queue.inflight[shard] is not None:
            fut, upto = queue.inflight[shard]
            queue.inflight[shard] = None
            try:
                fut.result()
            except Exception as exc:
                return shard, exc, queue.sent[shard]
            queue.sent[shard] = max(queue.sent[shard], upto)
        if ship:
            batch, upto = queue.batch(shard, self._K, self._V, memo)
        else:
            batch, upto = None, queue.sent[shard]
        try:
            return shard, self._hosts[shard].run(batch, name, *args), upto
        except Exception as exc:  # a lost actor refuses at once
            return shard, exc, queue.sent[shard]

    def _gather(self, operation: str, calls, wait=lambda f: f.result()) -> dict:
        """Wait for ``calls`` (from :meth:`_issue`), record what each shard received, and
        return ``{shard: result}``; ShardError naming every shard that failed."""
        results, failures = {}, []
        sent = self._queue.sent
        for shard, fut, upto in calls:
            try:
                if isinstance(fut, BaseException):
                    raise fut
                results[shard] = wait(fut)
            except Exception as exc:
                failures.append((self._describe(shard), exc))
                continue
            sent[shard] = max(sent[shard], upto)
        self._trim()
        if failures:
            raise ShardError(operation, failures)
        return results

    def _describe(self, shard: int) -> str:
        a, b = self._starts[shard], self._starts[shard + 1]
        queue = self._queue
        where = self._label.format(s=shard, count=len(queue.sent), a=a, b=b)
        return (
            f"{where}worker {self._places[shard]}; {len(queue.log) - queue.sent[shard]} "
            "buffered updates not yet applied there)"
        )

    def _trim(self) -> None:
        if self._queue.trim():
            self._plan_next_ask()  # the policy's next consultation, as a log length, moved

    def _run_all(self, name: str | None, *args, ship: bool = True) -> list:
        memo = {}
        calls = [self._issue(s, name, *args, ship=ship, memo=memo) for s in range(len(self._hosts))]
        results = self._gather(name or "sending updates", calls)
        return [results[s] for s in range(len(self._hosts))]

    def _by_shard(self, rows: np.ndarray):
        """``(shard, mask of rows it owns)`` for each shard owning one of ``rows``."""
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(owner).tolist():
            yield s, owner == s

    def _owner(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1
