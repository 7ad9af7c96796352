"""The client side of a sharded engine: its buffer of updates and its calls to the shards."""

from __future__ import annotations

import bisect

import numpy as np

from ..engine import FlushEvent
from ._cluster import ShardError

__all__ = ["ShardBuffer"]


class ShardBuffer:
    """Update buffer and shard calls, for :class:`~dynattn.distributed.ShardedAttention`.

    The buffer is a log of one flag per update action (row i of K as i, of V as n + i);
    shard s has been sent ``log[:_sent[s]]``. A batch sent without waiting is *in flight*
    until the next call to its shard confirms it; entries every shard has confirmed leave the
    log and count as pending. The subclass provides ``_log``, ``_n``, ``_K``, ``_V``,
    ``_hosts``, ``_starts``, ``_places``, ``_label``, ``_pending``, ``_arm`` and
    ``_consult`` (the engine's).
    """

    def _init_buffer(self, shards: int) -> None:
        """An empty buffer for ``shards`` shards; no row touched."""
        self._sent = [0] * shards
        self._inflight = [None] * shards  # (future, log length) of a batch sent unwaited
        self._batch_cache = None
        self._noted = 0  # the log's flags up to here are folded into the touched rows
        self._moved = np.zeros(2 * self._n, dtype=bool)
        self._moved_k, self._moved_v = self._moved[: self._n], self._moved[self._n :]
        self._row_hit = np.zeros(self._n, dtype=bool)
        self._touched = 0

    @property
    def touched_rows(self) -> int:
        """Distinct rows of K or V touched since the last flush, |S|."""
        self._note()
        return self._touched

    @property
    def touched_k(self) -> frozenset[int]:
        """Rows of K changed since the last flush."""
        self._note()
        return frozenset(np.flatnonzero(self._moved_k).tolist())

    @property
    def touched_v(self) -> frozenset[int]:
        """Rows of V changed since the last flush."""
        self._note()
        return frozenset(np.flatnonzero(self._moved_v).tolist())

    def _touch(self, rows: np.ndarray, moved: np.ndarray) -> None:
        """Log ``rows`` of K (``moved`` is ``_moved_k``) or V: one flag per action."""
        flags = rows if moved is self._moved_k else rows + self._n
        self._log.frombytes(flags.astype(np.int64).tobytes())

    def _counted(self, count: int) -> FlushEvent | None:
        """After a batch of ``count`` logged actions: ask the policy if its answer ran out."""
        if len(self._log) >= self._ask_at:
            return self._consult()
        return None

    def _settle(self) -> None:
        """Send the buffer to every shard without waiting for them to apply it (the engine's
        _consult calls this when the log is full): the client buffers on meanwhile; the next
        call to a shard waits for its batch first, and reports a failure then."""
        failures = []
        for s in range(self.shards):
            shard, fut, upto = self._issue(s, None)
            if isinstance(fut, BaseException):
                failures.append((self._describe(s), fut))
            else:
                self._inflight[s] = (fut, upto)
        self._trim()
        if failures:
            raise ShardError("sending updates", failures)

    def _note(self) -> None:
        """Fold the log's flags not yet counted into the touched rows, O(new flags)."""
        if self._noted == len(self._log):
            return
        flags = np.frombuffer(self._log[self._noted :], dtype=np.int64)
        self._noted = len(self._log)
        self._moved[flags] = True
        rows = np.where(flags >= self._n, flags - self._n, flags)
        new = np.unique(rows[~self._row_hit[rows]])
        self._row_hit[new] = True
        self._touched += len(new)

    def _batch(self, shard: int):
        """``(batch, upto)``: the buffer's rows not yet sent to ``shard`` with their current
        values (|S|·d numbers for K and for V), and the log length they cover."""
        upto = len(self._log)
        start = self._sent[shard]
        if start == upto:
            return None, upto
        # shards at the same point get the same batch: made once (an update lengthens the
        # log, so (start, upto) names one content until the log is trimmed)
        if self._batch_cache is not None and self._batch_cache[0] == (start, upto):
            return self._batch_cache[1], upto
        flags = np.unique(np.frombuffer(self._log[start:upto], dtype=np.int64))
        split = np.searchsorted(flags, self._n)
        k_rows, v_rows = flags[:split], flags[split:] - self._n
        batch = (k_rows, self._K[k_rows], v_rows, self._V[v_rows])
        self._batch_cache = ((start, upto), batch)
        return batch, upto

    # ------------------------------------------------------------------ calls to shards
    def _issue(self, shard: int, name: str | None, *args, ship: bool = True):
        """Start ``name(*args)`` on ``shard``, its share of the buffer first (unless not
        ``ship``); returns ``(shard, future or exception, log length covered)``. A batch
        still in flight to that shard is waited for first: calls to one actor are not
        ordered otherwise."""
        if self._inflight[shard] is not None:
            fut, upto = self._inflight[shard]
            self._inflight[shard] = None
            try:
                fut.result()
            except Exception as exc:
                return shard, exc, self._sent[shard]
            self._sent[shard] = max(self._sent[shard], upto)
        batch, upto = self._batch(shard) if ship else (None, self._sent[shard])
        try:
            return shard, self._hosts[shard].run(batch, name, *args), upto
        except Exception as exc:  # a lost actor refuses at once
            return shard, exc, self._sent[shard]

    def _gather(self, operation: str, calls, wait=lambda f: f.result()) -> dict:
        """Wait for ``calls`` (from :meth:`_issue`), record what each shard received, and
        return ``{shard: result}``; ShardError naming every shard that failed."""
        results, failures = {}, []
        for shard, fut, upto in calls:
            try:
                if isinstance(fut, BaseException):
                    raise fut
                results[shard] = wait(fut)
            except Exception as exc:
                failures.append((self._describe(shard), exc))
                continue
            self._sent[shard] = max(self._sent[shard], upto)
        self._trim()
        if failures:
            raise ShardError(operation, failures)
        return results

    def _describe(self, shard: int) -> str:
        a, b = self._starts[shard], self._starts[shard + 1]
        where = self._label.format(s=shard, count=len(self._sent), a=a, b=b)
        return (
            f"{where}worker {self._places[shard]}; {len(self._log) - self._sent[shard]} "
            "buffered updates not yet applied there)"
        )

    def _trim(self) -> None:
        """Drop the log's entries every shard has applied: they become pending counts."""
        k = min(self._sent)
        if k == 0:
            return
        self._note()
        self._pending += k
        del self._log[:k]
        self._sent = [s - k for s in self._sent]
        self._inflight = [f and (f[0], f[1] - k) for f in self._inflight]
        self._noted -= k
        self._batch_cache = None
        self._arm()

    def _run_all(self, name: str | None, *args, ship: bool = True) -> list:
        calls = [self._issue(s, name, *args, ship=ship) for s in range(self.shards)]
        results = self._gather(name or "sending updates", calls)
        return [results[s] for s in range(self.shards)]

    def _by_shard(self, rows: np.ndarray):
        """``(shard, mask of rows it owns)`` for each shard owning one of ``rows``."""
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(owner).tolist():
            yield s, owner == s

    def _owner(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1
