"""Workloads for the attention engine: initial Q, K, V matrices and streams of K/V updates.

Everything here is reproducible from a seed and independent of the engine, so the same workload
can be replayed against several exact strategies and compared fairly.

* :func:`make_qkv` builds ``(Q, K, V)`` from a named preset (:data:`PRESETS`).
* :func:`load_npz` (from :mod:`dynattn.npz`) reads a user's ``.npz`` file safely.
* :class:`UpdateStream` produces, tick by tick, a batch of updates (:class:`TickUpdates`) and a
  batch of query positions, for one of the stream kinds in :data:`STREAMS`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from ._validate import check_int, resolve_dtype
from .npz import MAX_NPZ_BYTES, UPLOADED, WorkloadError, load_npz

__all__ = [
    "MAX_NPZ_BYTES",
    "PRESETS",
    "STREAMS",
    "UPLOADED",
    "TickUpdates",
    "UpdateStream",
    "WorkloadError",
    "load_npz",
    "make_qkv",
]

PRESETS = ("uniform", "gaussian", "local", "clustered")
STREAMS = ("entries", "rows", "hotspot", "bursts")

#: Logit gap, at the default ``scale = 1/sqrt(d)``, between a query and its most similar keys and
#: unrelated keys in the ``local`` and ``clustered`` presets: large enough that the attention map
#: shows the structure clearly, small enough that several neighbours still share the weight.
_STRUCTURE_GAP = 16.0
#: Maximum number of topics in the ``clustered`` preset.
_MAX_CLUSTERS = 8

# Independent random streams per purpose: changing how many queries are drawn never changes
# the updates, and the workload of tick t does not depend on which ticks were drawn before.
_UPDATES_KEY = 1
_QUERIES_KEY = 2


# --------------------------------------------------------------------------------------------
# Argument checks (messages name the argument and its value)


def _check_real(
    name: str, value, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> float:
    """A finite float in the interval from ``low`` to ``high`` (ends open or closed)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number")
    value = float(value)
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if not np.isfinite(value) or below or above:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name}={value!r} must be finite and in {interval}")
    return value


def _check_choice(name: str, value, choices: tuple) -> str:
    """``value`` itself, if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


# --------------------------------------------------------------------------------------------
# Presets


def make_qkv(preset: str, n: int, d: int, *, seed: int = 0, dtype=np.float64):
    """Build the initial ``(Q, K, V)`` of a named preset.

    Parameters
    ----------
    preset : {"uniform", "gaussian", "local", "clustered"}
        * ``uniform``: every entry uniform on [0, 1), as in the original prototype; attention is
          nearly flat.
        * ``gaussian``: every entry standard normal.
        * ``local``: banded positional attention. Q and K carry sinusoidal position features
          (``d // 2`` frequency pairs with a Gaussian taper, plus a little noise) so that
          ``q_i . k_j`` is a smooth bump in ``i - j``: row ``i`` attends mostly to rows near
          ``i``, a clear diagonal in the attention map. V is standard normal. Needs ``d >= 2``
          (rank-one logits cannot form a band); the width of the band shrinks as ``d`` grows,
          roughly ``n / d`` rows.
        * ``clustered``: topics. Row ``i`` belongs to one of ``c = min(8, max(1, n // 8))``
          contiguous blocks; Q and K rows are their topic's centroid (orthonormal directions
          when ``d >= c``) plus noise, so the attention map is block diagonal. V is standard
          normal.

        The logit gaps of ``local`` and ``clustered`` are tuned for the default scale
        ``1/sqrt(d)``.
    n, d : int
        Number of rows (tokens) and columns (head dimension), both >= 1.
    seed : int
        Seed of ``np.random.default_rng``; the same arguments always give the same matrices.
    dtype : float32 or float64

    Returns
    -------
    Q, K, V : ndarray, each (n, d), C-contiguous, in ``dtype``

    Notes
    -----
    Cost O(n d) time and memory.

    Examples
    --------
    >>> Q, K, V = make_qkv("gaussian", 4, 3, seed=1, dtype=np.float32)
    >>> Q.shape, V.dtype
    ((4, 3), dtype('float32'))
    >>> bool(np.array_equal(Q, make_qkv("gaussian", 4, 3, seed=1, dtype=np.float32)[0]))
    True
    """
    _check_choice("preset", preset, PRESETS)
    n = check_int("n", n)
    d = check_int("d", d)
    seed = check_int("seed", seed, 0)
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    if preset == "uniform":
        qkv = rng.random((3, n, d))
    elif preset == "gaussian":
        qkv = rng.standard_normal((3, n, d))
    elif preset == "local":
        qkv = _local(rng, n, d)
    else:
        qkv = _clustered(rng, n, d)
    return tuple(np.ascontiguousarray(m, dtype=dt) for m in qkv)


def _local(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(3, n, d) banded positional Q, K, V; see :func:`make_qkv`."""
    if d < 2:
        raise ValueError(f"preset 'local' needs d >= 2 (sin/cos position pairs); got d={d}")
    pairs = d // 2
    m = np.arange(1, pairs + 1)
    # q_i . k_j = amp^2 * sum_m w_m cos(omega_m (i - j)): a bump at i = j. Frequencies stay
    # below pi / n so that no far position aliases onto the diagonal, and the Gaussian taper of
    # the weights keeps the side lobes small.
    weights = np.exp(-2.0 * (m / pairs) ** 2)
    weights /= weights.sum()
    omega = np.pi * m / max(n, 2 * pairs)
    phase = rng.uniform(0.0, 2.0 * np.pi, pairs)  # cancels in q . k; varies the matrices by seed
    amp = np.sqrt(_STRUCTURE_GAP * np.sqrt(d))  # logit gap ~ scale * amp^2 = _STRUCTURE_GAP
    angle = np.arange(n)[:, None] * omega + phase
    features = np.zeros((n, d))
    features[:, 0 : 2 * pairs : 2] = amp * np.sqrt(weights) * np.cos(angle)
    features[:, 1 : 2 * pairs : 2] = amp * np.sqrt(weights) * np.sin(angle)
    noise = 0.1 * rng.standard_normal((2, n, d))
    return np.stack([features + noise[0], features + noise[1], rng.standard_normal((n, d))])


def _clustered(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(3, n, d) topic-block Q, K, V; see :func:`make_qkv`."""
    c = min(_MAX_CLUSTERS, max(1, n // 8))
    labels = (np.arange(n) * c) // n  # contiguous, near-equal blocks: visible in a heat map
    directions = rng.standard_normal((max(c, d), d))
    if d >= c:
        directions = np.linalg.qr(directions.T)[0].T  # orthonormal topics: no two overlap
    directions = directions[:c] / np.linalg.norm(directions[:c], axis=1, keepdims=True)
    radius = np.sqrt(_STRUCTURE_GAP * np.sqrt(d))  # same-topic logit ~ scale * radius^2
    centroids = radius * directions[labels]
    noise = (0.25 * radius / np.sqrt(d)) * rng.standard_normal((2, n, d))
    return np.stack([centroids + noise[0], centroids + noise[1], rng.standard_normal((n, d))])


# --------------------------------------------------------------------------------------------
# Update streams


def _no_rows() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _no_values() -> np.ndarray:
    return np.zeros(0)


def _no_row_values() -> np.ndarray:
    return np.zeros((0, 0))


@dataclass(frozen=True)
class TickUpdates:
    """The updates of one tick.

    Entry updates add ``*_deltas[t]`` to ``M[*_rows[t], *_cols[t]]`` (``M`` = K or V); row
    rewrites replace whole rows ``M[*_set_rows[t]] = *_set_values[t]``. Index arrays are int64
    and deltas float64, all of one length per matrix; ``*_set_values`` is float64 ``(m, d)``
    with ``m = len(*_set_rows)`` (the default, for no rewrites, is an empty ``(0, 0)`` array).
    Rows within one rewrite batch are distinct.
    """

    k_rows: np.ndarray = field(default_factory=_no_rows)
    k_cols: np.ndarray = field(default_factory=_no_rows)
    k_deltas: np.ndarray = field(default_factory=_no_values)
    v_rows: np.ndarray = field(default_factory=_no_rows)
    v_cols: np.ndarray = field(default_factory=_no_rows)
    v_deltas: np.ndarray = field(default_factory=_no_values)
    k_set_rows: np.ndarray = field(default_factory=_no_rows)
    k_set_values: np.ndarray = field(default_factory=_no_row_values)
    v_set_rows: np.ndarray = field(default_factory=_no_rows)
    v_set_values: np.ndarray = field(default_factory=_no_row_values)

    @property
    def n_updates(self) -> int:
        """Number of update actions: one per entry update and one per rewritten row."""
        return self.k_rows.size + self.v_rows.size + self.k_set_rows.size + self.v_set_rows.size

    def apply(self, engine) -> list:
        """Apply the updates through the engine's batch methods, skipping empty parts.

        Order: K entries, V entries, K rows, V rows, one call each (``update_k_many``,
        ``update_v_many``, ``set_k_rows``, ``set_v_rows``); works for any object with those
        methods.

        Returns
        -------
        list
            The non-``None`` results of those calls (the engine's ``FlushEvent`` objects),
            in order.
        """
        parts = (
            (engine.update_k_many, self.k_rows, self.k_cols, self.k_deltas),
            (engine.update_v_many, self.v_rows, self.v_cols, self.v_deltas),
            (engine.set_k_rows, self.k_set_rows, self.k_set_values),
            (engine.set_v_rows, self.v_set_rows, self.v_set_values),
        )
        results = (method(rows, *rest) for method, rows, *rest in parts if rows.size)
        return [event for event in results if event is not None]

    def apply_each(self, engine) -> list:
        """Apply every update action by its own call, in the order of :meth:`apply`.

        Uses ``update_k``, ``update_v``, ``set_k_row`` and ``set_v_row``. With the policy
        ``Fixed(1)`` this is eager maintenance: the caches absorb each action before the next
        one arrives, instead of a batch at a time. Adds O(1) Python overhead per action.

        Returns
        -------
        list
            The non-``None`` results (``FlushEvent`` objects), in order.
        """
        parts = (
            (engine.update_k, (self.k_rows.tolist(), self.k_cols.tolist(), self.k_deltas.tolist())),
            (engine.update_v, (self.v_rows.tolist(), self.v_cols.tolist(), self.v_deltas.tolist())),
            (engine.set_k_row, (self.k_set_rows.tolist(), self.k_set_values)),
            (engine.set_v_row, (self.v_set_rows.tolist(), self.v_set_values)),
        )
        results = (
            method(*args) for method, columns in parts for args in zip(*columns, strict=True)
        )
        return [event for event in results if event is not None]


class UpdateStream:
    """A reproducible stream of K/V updates and query positions.

    The updates of tick ``t`` depend only on the constructor arguments and ``t`` (each tick has
    its own random generator seeded by ``(seed, t)``), so ticks can be drawn in any order and
    two streams with the same arguments agree exactly. Queries use a separate generator, so the
    number of queries drawn never changes the updates.

    Parameters
    ----------
    kind : {"entries", "rows", "hotspot", "bursts"}
        * ``entries``: ``updates_per_tick`` single-entry updates at uniform random
          ``(row, col)``, ``delta ~ N(0, delta_scale^2)``; each goes to K with probability
          ``k_share`` (otherwise V).
        * ``rows``: ``updates_per_tick`` whole-row rewrites split between K and V the same way.
          The stream does not see the current matrices, so a new row is fresh
          ``N(0, row_scale^2)`` values rather than a perturbation of the old row. A tick rewrites
          at most ``n`` distinct rows of each matrix.
        * ``hotspot``: entry updates whose rows fall, with probability ``band_share``, in a band
          of ``max(1, round(band_fraction * n))`` consecutive rows (wrapping around) whose start
          moves by ``drift`` rows per tick; the rest are uniform over all rows.
        * ``bursts``: entry updates whose number per tick is Poisson with a rate that is high
          during the first ``burst_duty`` of every ``burst_period`` ticks and low otherwise
          (ratio ``burst_contrast``), with mean rate ``updates_per_tick`` over a period.
    n, d : int
        Shape of K and V (>= 1).
    updates_per_tick : int
        Update actions per tick (the mean for ``bursts``), >= 0.
    k_share : float in [0, 1]
        Probability that an update goes to K rather than V.
    delta_scale : float > 0
        Standard deviation of entry deltas.
    seed : int >= 0
    row_scale : float > 0
        Standard deviation of rewritten row values (``rows``).
    band_fraction : float in (0, 1], band_share : float in [0, 1], drift : float
        Band width as a fraction of ``n``, share of updates inside it, and its speed in rows per
        tick (``hotspot``).
    burst_period : int >= 1, burst_duty : float in (0, 1), burst_contrast : float >= 1
        Period in ticks, fraction of the period spent in a burst, and burst-to-quiet rate ratio
        (``bursts``).

    Notes
    -----
    Cost per tick O(updates_per_tick) (``rows``: O(updates_per_tick * d + n) for drawing
    distinct rows), plus about 10 us to seed the tick's generator.

    Examples
    --------
    >>> stream = UpdateStream("entries", 100, 8, updates_per_tick=5, seed=3)
    >>> tick = stream.next_tick(0)
    >>> tick.n_updates
    5
    >>> rows, cols = stream.queries(0, 2)
    >>> rows.shape, cols.dtype
    ((2,), dtype('int64'))
    """

    def __init__(
        self,
        kind: str,
        n: int,
        d: int,
        *,
        updates_per_tick: int = 16,
        k_share: float = 0.5,
        delta_scale: float = 0.1,
        seed: int = 0,
        row_scale: float = 1.0,
        band_fraction: float = 0.01,
        band_share: float = 0.99,
        drift: float = 0.25,
        burst_period: int = 64,
        burst_duty: float = 0.125,
        burst_contrast: float = 16.0,
    ):
        self.kind = _check_choice("kind", kind, STREAMS)
        self.n = check_int("n", n)
        self.d = check_int("d", d)
        self.updates_per_tick = check_int("updates_per_tick", updates_per_tick, 0)
        self.k_share = _check_real("k_share", k_share, 0.0, 1.0)
        self.delta_scale = _check_real("delta_scale", delta_scale, 0.0, np.inf, open_low=True)
        self.seed = check_int("seed", seed, 0)
        self.row_scale = _check_real("row_scale", row_scale, 0.0, np.inf, open_low=True)
        self.band_fraction = _check_real("band_fraction", band_fraction, 0.0, 1.0, open_low=True)
        self.band_share = _check_real("band_share", band_share, 0.0, 1.0)
        self.drift = _check_real("drift", drift, -np.inf, np.inf)
        self.burst_period = check_int("burst_period", burst_period)
        self.burst_duty = _check_real(
            "burst_duty", burst_duty, 0.0, 1.0, open_low=True, open_high=True
        )
        self.burst_contrast = _check_real("burst_contrast", burst_contrast, 1.0, np.inf)
        self.band_width = max(1, round(self.band_fraction * self.n))

    def __repr__(self) -> str:
        return (
            f"UpdateStream({self.kind!r}, n={self.n}, d={self.d}, "
            f"updates_per_tick={self.updates_per_tick}, k_share={self.k_share}, "
            f"seed={self.seed})"
        )

    def _rng(self, key: int, tick) -> np.random.Generator:
        tick = check_int("tick", tick, 0)
        return np.random.default_rng([self.seed, key, tick])

    def band_start(self, tick: int) -> int:
        """First row of the ``hotspot`` band at ``tick``; the band is
        ``(band_start + arange(band_width)) % n``."""
        return int(np.floor(self.drift * tick)) % self.n

    def rate(self, tick: int) -> float:
        """Expected number of updates at ``tick`` (varies only for ``bursts``)."""
        m = self.updates_per_tick
        if self.kind != "bursts":
            return float(m)
        # quiet * (duty * contrast + 1 - duty) = m keeps the mean rate over a period at m.
        quiet = m / (self.burst_duty * self.burst_contrast + 1.0 - self.burst_duty)
        in_burst = (tick % self.burst_period) < self.burst_duty * self.burst_period
        return quiet * self.burst_contrast if in_burst else quiet

    def next_tick(self, tick: int) -> TickUpdates:
        """The updates of ``tick`` (an int >= 0); see the class description."""
        rng = self._rng(_UPDATES_KEY, tick)
        if self.kind == "bursts":
            count = int(rng.poisson(self.rate(tick)))
        else:
            count = self.updates_per_tick
        n_k = int(rng.binomial(count, self.k_share))
        if self.kind == "rows":
            k_rows, v_rows = (self._distinct_rows(rng, m) for m in (n_k, count - n_k))
            return TickUpdates(
                k_set_rows=k_rows,
                k_set_values=self.row_scale * rng.standard_normal((k_rows.size, self.d)),
                v_set_rows=v_rows,
                v_set_values=self.row_scale * rng.standard_normal((v_rows.size, self.d)),
            )
        if self.kind == "hotspot":
            rows = self._hotspot_rows(rng, tick, count)
        else:
            rows = rng.integers(0, self.n, count, dtype=np.int64)
        cols = rng.integers(0, self.d, count, dtype=np.int64)
        deltas = self.delta_scale * rng.standard_normal(count)
        return TickUpdates(
            k_rows=rows[:n_k],
            k_cols=cols[:n_k],
            k_deltas=deltas[:n_k],
            v_rows=rows[n_k:],
            v_cols=cols[n_k:],
            v_deltas=deltas[n_k:],
        )

    def _distinct_rows(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return np.sort(rng.choice(self.n, size=min(m, self.n), replace=False)).astype(np.int64)

    def _hotspot_rows(self, rng: np.random.Generator, tick: int, count: int) -> np.ndarray:
        inside = rng.random(count) < self.band_share
        rows = rng.integers(0, self.n, count, dtype=np.int64)
        offsets = rng.integers(0, self.band_width, count, dtype=np.int64)
        band_rows = (self.band_start(tick) + offsets) % self.n
        return np.where(inside, band_rows, rows)

    def queries(self, tick: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` query positions for ``tick``, uniform over the ``(n, d)`` output.

        Returns
        -------
        rows, cols : ndarray of int64, each (count,)
        """
        count = check_int("count", count, 0)
        rng = self._rng(_QUERIES_KEY, tick)
        return (
            rng.integers(0, self.n, count, dtype=np.int64),
            rng.integers(0, self.d, count, dtype=np.int64),
        )
