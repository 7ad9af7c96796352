"""The interfaces the parts of dynattn agree on, as :class:`typing.Protocol` s.

* :class:`ExactAttention`: what every exact strategy offers (the lazy engine, the baselines
  in :mod:`dynattn.strategies`, the distributed engines), so one update/query stream and one
  contract test (``tests/test_contract.py``) drive them all.
* :class:`FlushPolicy`: what the lazy engine asks when to flush (:mod:`dynattn.policies`).

They are structural: a class conforms by having the members, not by inheriting.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["ExactAttention", "FlushPolicy"]


@runtime_checkable
class ExactAttention(Protocol):
    """Exact attention ``O = softmax(scale · Q Kᵀ) V`` under updates to K and V.

    Every method checks all its arguments before it changes anything, and a batch is applied
    whole or not at all. Indices are Python or NumPy integers; ``n`` rows of K and V, ``d``
    columns.
    """

    n: int
    d: int
    dtype: np.dtype
    scale: float

    @property
    def K(self) -> np.ndarray: ...  # current keys (n, d), read-only

    @property
    def V(self) -> np.ndarray: ...  # current values (n, d), read-only

    def update_k(self, i, j, delta): ...  # K[i, j] += delta

    def update_v(self, i, j, delta): ...  # V[i, j] += delta

    def set_k_row(self, i, row): ...  # K[i] = row

    def set_v_row(self, i, row): ...  # V[i] = row

    def update_k_many(self, rows, cols, deltas): ...  # K[rows, cols] += deltas (repeats add)

    def update_v_many(self, rows, cols, deltas): ...

    def set_k_rows(self, rows, values): ...  # K[rows] = values (distinct rows)

    def set_v_rows(self, rows, values): ...

    def query(self, i, j) -> float: ...  # O[i, j], exact

    def query_row(self, i) -> np.ndarray: ...  # O[i], exact

    def query_many(self, rows, cols) -> np.ndarray: ...  # O[rows[k], cols[k]], exact

    def output(self) -> np.ndarray: ...  # O, exact

    def copy(self) -> ExactAttention: ...  # an independent twin in the same state


@runtime_checkable
class FlushPolicy(Protocol):
    """When a lazy engine flushes: as soon as its pending update count reaches
    ``threshold(engine)`` (``math.inf``: not now; anything but a real number is refused).

    Three optional hooks, looked up once when the policy is set:

    * ``valid_until(engine) -> float``: the update count (``engine.n_updates``) up to which the
      threshold stays what it just said, barring a flush; the engine asks again only then or
      at the threshold (asking costs as much as an update);
    * ``before_flush(updates)``: called before every flush (the policy's, the caller's or a
      rebuild) with the number of updates it will apply; raising refuses the flush, which
      then changes nothing (nor does the update that triggered it);
    * ``on_flush(event)``: called after every flush with its
      :class:`~dynattn.engine.FlushEvent`;

    and one optional attribute, ``reads_answers = False``: the policy reads only counters and
    logs, never an exact answer (which queues the engine's log), so the engine need not
    checkpoint its queue before asking it.
    """

    def threshold(self, engine) -> float: ...
