"""Lazy attention beyond one process, on Dask (``dask.distributed``).

:class:`ShardedAttention` splits one engine's query rows over workers (K and V replicated);
:class:`MultiHeadAttention` places many independent heads on workers. Both run on a
``LocalCluster`` they start themselves, or on any Dask cluster through a ``Client``. Importing
this module imports ``dask.distributed``; ``import dynattn`` does not.
"""

from ._cluster import ShardError, limit_blas
from .multihead import MultiHeadAttention
from .sharded import ShardedAttention

__all__ = ["MultiHeadAttention", "ShardError", "ShardedAttention", "limit_blas"]
