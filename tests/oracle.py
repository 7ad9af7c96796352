"""A dense float64 oracle that mirrors an engine's K, V and last-flush state."""

from __future__ import annotations

import numpy as np

from dynattn.reference import dense_attention, dense_weights


class Oracle:
    """Plain copies of Q, K, V (current and as of the engine's last flush).

    K and V are stored in the engine's dtype, so updates round the same way; every output is
    computed in float64.
    """

    def __init__(self, engine):
        self.engine = engine
        self.Q = np.array(engine.Q)
        self.K = np.array(engine.K)
        self.V = np.array(engine.V)
        self.scale = engine.scale
        self.flushes = engine.n_flushes
        self.K_flushed, self.V_flushed = self.K.copy(), self.V.copy()

    def sync_flush(self) -> None:
        """Call after every engine operation: snapshot K, V if the engine flushed."""
        if self.engine.n_flushes != self.flushes:
            self.flushes = self.engine.n_flushes
            self.K_flushed, self.V_flushed = self.K.copy(), self.V.copy()

    def output(self, stale=False):
        K, V = (self.K_flushed, self.V_flushed) if stale else (self.K, self.V)
        return dense_attention(self.Q, K, V, self.scale)

    def weights(self, stale=False):
        return dense_weights(self.Q, self.K_flushed if stale else self.K, self.scale)

    def natural_scale(self, stale=False):
        """``(P·|V|)``: the size an output entry's error should be measured against."""
        V = self.V_flushed if stale else self.V
        return self.weights(stale) @ np.abs(V)


def assert_close_natural(got, want, scale, tol, what=""):
    """``|got − want| <= tol · scale`` entrywise (scale = natural scale of each entry)."""
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - want)
    bound = tol * np.maximum(scale, np.finfo(np.float64).tiny)
    assert np.isfinite(got).all(), f"{what}: non-finite result {got}"
    worst = float(np.max(err / bound)) if err.size else 0.0
    assert worst <= 1.0, f"{what}: error {float(err.max()):.3e} is {worst:.2f}× the bound"
