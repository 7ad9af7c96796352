"""Every exact strategy keeps the same contract (tests/contract.py): the lazy engine under
several flush policies, and the baselines it is measured against."""

from __future__ import annotations

import math

import pytest
from contract import CHECKS

from dynattn import CostModel, ErrorBudget, Fixed, LazyAttention, OnDemand
from dynattn.strategies import EagerDense, Recompute


class _Never:
    """Never flush, asked after every update (no valid_until)."""

    def threshold(self, engine) -> float:
        return math.inf


FACTORIES = {
    "lazy, flush every update": lambda Q, K, V: LazyAttention(Q, K, V, policy=Fixed(1)),
    "lazy, flush every 16": lambda Q, K, V: LazyAttention(Q, K, V, policy=Fixed(16)),
    "lazy, never flush": lambda Q, K, V: LazyAttention(Q, K, V, policy=_Never()),
    "lazy, cost model": lambda Q, K, V: LazyAttention(Q, K, V, policy=CostModel(initial=4)),
    "lazy, error budget": lambda Q, K, V: LazyAttention(Q, K, V, policy=ErrorBudget(1e-2)),
    "on demand": OnDemand,
    "eager, n×n stored": EagerDense,
    "recompute": Recompute,
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES.keys())
def test_contract(factory, check):
    check(factory)
