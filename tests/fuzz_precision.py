"""Fuzz: many random sequences against the long-double oracle (tests/precision.py).

``python tests/fuzz_precision.py [count] [seed]`` prints, per dtype and kind, the sequences
run, the worst ratio of the engine's error to what the promise allows (≤ 1 holds) and the
failures; exits 1 on any failure. ``tests/test_precision.py`` runs a short version in CI.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
from precision import KINDS, random_ops, replay


def fuzz(count: int, seed: int = 0) -> dict:
    """``count`` random sequences; returns {(dtype, kind): [runs, worst ratio, failures]}."""
    rng = np.random.default_rng(seed)
    stats: dict = defaultdict(lambda: [0, 0.0, []])
    for _ in range(count):
        dtype = (np.float64, np.float32)[rng.integers(2)]
        kind = KINDS[rng.integers(len(KINDS))]
        n, d = int(rng.integers(2, 33)), int(rng.integers(1, 9))
        case_seed, k = int(rng.integers(2**32)), int(rng.choice([1, 2, 5, 1000]))
        ops = random_ops(np.random.default_rng(case_seed + 1), int(rng.integers(1, 41)))
        ratio = replay(dtype, kind, n, d, case_seed, ops, k)
        entry = stats[(np.dtype(dtype).name, kind)]
        entry[0] += 1
        entry[1] = max(entry[1], ratio)
        if not ratio <= 1.0:
            entry[2].append((n, d, case_seed, k, len(ops), ratio))
    return dict(stats)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    stats = fuzz(count, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    for (dtype, kind), (runs, worst, failures) in sorted(stats.items()):
        print(f"{dtype:8} {kind:9} runs {runs:5}  worst {worst:8.3g}  failures {len(failures)}")
        for failure in failures[:3]:
            print("   ", failure)
    sys.exit(1 if any(f for _, _, f in stats.values()) else 0)
