"""dynattn: exact lazy dynamic attention maintenance.

``O = softmax(scale · Q Kᵀ) V`` kept exact while K and V change: updates are queued, queries are
answered from stale caches plus cheap corrections, and queued updates are applied in batched
low-rank (BLAS-3) flushes when a policy says so. Importing this package does not import panel,
holoviews or bokeh; ``dynattn.dashboard`` does.
"""

from .compat import EnhancedDynamicAttention, adaptive_threshold
from .engine import ErrorReport, FlushEvent, LazyAttention, PolicyError, QueryRecord
from .policies import CostModel, ErrorBudget, Fixed, OriginalAdaptive, as_policy
from .reference import dense_attention, dense_weights
from .simulation import Simulation, SimulationConfig, Timeline
from .strategies import OnDemand
from .workloads import PRESETS, STREAMS, UpdateStream, WorkloadError, load_npz, make_qkv

__version__ = "0.1.0"

# The real model and the Dask engines are imported when first named (dynattn.MiniLM,
# dynattn.ShardedAttention, ...): tokenizers and dask.distributed cost a second to import,
# which nobody who only wants LazyAttention should pay.
_LAZY = {
    "MiniLM": "models",
    "TextAttention": "models",
    "Edit": "models",
    "MultiHeadAttention": "distributed",
    "ShardedAttention": "distributed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dynattn' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "STREAMS",
    "CostModel",
    "Edit",
    "EnhancedDynamicAttention",
    "ErrorBudget",
    "ErrorReport",
    "Fixed",
    "FlushEvent",
    "LazyAttention",
    "MiniLM",
    "MultiHeadAttention",
    "OnDemand",
    "OriginalAdaptive",
    "PolicyError",
    "QueryRecord",
    "ShardedAttention",
    "Simulation",
    "SimulationConfig",
    "TextAttention",
    "Timeline",
    "UpdateStream",
    "WorkloadError",
    "adaptive_threshold",
    "as_policy",
    "dense_attention",
    "dense_weights",
    "load_npz",
    "make_qkv",
]
