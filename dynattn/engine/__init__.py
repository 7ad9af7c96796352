"""Exact lazy maintenance of softmax attention under updates to K and V.

Attention is ``O = softmax(scale · Q Kᵀ) V``: with ``A = exp(scale · Q Kᵀ)`` and
``D = diag(A · 1)``, the weights are ``P = D⁻¹ A`` and the output ``O = P V``.

:class:`LazyAttention` never forms an n×n array. Per query row ``i`` it caches a stabiliser
``m_i``, the numerator ``N_i = Σ_j ã_ij v_j`` and the denominator ``s_i = Σ_j ã_ij`` with
``ã_ij = exp(scale · q_i·k_j − m_i)``. Updates change K and V at once but only *queue* the
touched rows S. A query corrects the stale cache row exactly, in ``O(|S|·d)``, by adding the
touched rows' new contributions and removing their old ones (taken from a snapshot of K and V
as of the last flush); a flush applies the same correction to every row as two matrix products
(BLAS-3), ``O(n·|S|·d)``. Precision is guarded, not hoped for (see :mod:`.kernels`).

The package, one concern a module (``docs/design.md`` maps them):

========================  ===============================================================
:mod:`.attention`         :class:`LazyAttention`: state, composition, flush and rebuild
:mod:`.updates`           the update verbs of K and V (all or nothing)
:mod:`.tokens`            query rows replaced; token rows inserted and deleted
:mod:`.queries`           the query verbs and error reports
:mod:`.pending`           update log, touched rows, snapshot of K and V
:mod:`.pack`              touched rows packed for one correction product
:mod:`.kernels`           exact rows, corrections, precision guards (shared with baselines)
:mod:`.planner`           single query: correct the cached row or compute it afresh
:mod:`.schedule`          when to ask the flush policy; what it may answer
:mod:`.reports`           FlushEvent, ErrorReport, QueryRecord
========================  ===============================================================
"""

from .attention import LazyAttention
from .reports import ErrorReport, FlushEvent, QueryRecord
from .schedule import PolicyError

__all__ = ["ErrorReport", "FlushEvent", "LazyAttention", "PolicyError", "QueryRecord"]
