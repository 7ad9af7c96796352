"""A tick-by-tick simulation comparing exact attention strategies on one workload.

Every tick, an :class:`~dynattn.workloads.UpdateStream` produces a batch of K/V updates and a
batch of query positions, and four exact strategies process the same work:

* **lazy**: the :class:`~dynattn.engine.LazyAttention` engine under the configured flush policy;
* **eager**: a second engine with ``Fixed(1)``, fed one update action per call, so its caches
  absorb every action before the next arrives;
* **on-demand**: :class:`~dynattn.strategies.OnDemand`, no caches, every queried row computed
  from scratch;
* **recompute**: the whole output recomputed after every update action. Not run: its cost is
  ``4·n²·d`` flops per action and the measured seconds of one dense recompute
  (:func:`~dynattn.strategies.dense_recompute_seconds`, timed once per rebuild).

Seconds are wall time (``time.perf_counter``) around each strategy's real code path; flops are
estimated from the shapes. Both are cumulative and land, with the lazy engine's state and the
true error of its stale caches, in a fixed-size :class:`Timeline`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import param

from .engine import LazyAttention
from .policies import CostModel, ErrorBudget, Fixed, OriginalAdaptive
from .strategies import OnDemand, dense_recompute_seconds
from .timeline import COST_COLUMNS, MAX_CAPACITY, TIME_COLUMNS, TIMELINE_COLUMNS, Timeline
from .workloads import (
    PRESETS,
    STREAMS,
    TickUpdates,
    UpdateStream,
    WorkloadError,
    load_npz,
    make_qkv,
)

__all__ = [
    "ERROR_ROWS",
    "POLICIES",
    "REBUILD_PARAMS",
    "SCALES",
    "TIMELINE_COLUMNS",
    "TIME_COLUMNS",
    "Simulation",
    "SimulationConfig",
    "Timeline",
]

POLICIES = ("cost", "fixed", "adaptive", "error")
SCALES = ("1/sqrt(d)", "1 (unscaled)")

#: Rows over which a tick measures the stale output's error once more rows are touched.
ERROR_ROWS = 256

#: Parameters whose change rebuilds every strategy (and restarts the timeline).
REBUILD_PARAMS = ("n", "d", "preset", "seed", "scale", "dtype")
_STREAM_PARAMS = ("stream", "updates_per_tick", "k_share", "delta_scale")
_POLICY_PARAMS = ("policy", "threshold", "tolerance")


class SimulationConfig(param.Parameterized):
    """Settings of a :class:`Simulation`.

    ``n``, ``d``, ``preset``, ``seed``, ``scale`` and ``dtype`` rebuild the simulation when
    changed; the rates, the stream kind and the policy settings apply from the next tick.
    """

    n = param.Integer(256, bounds=(2, 8192), doc="Rows of Q, K and V (sequence length).")
    d = param.Integer(32, bounds=(1, 256), doc="Columns of Q, K and V (head dimension).")
    preset = param.Selector(
        default="gaussian",
        objects=[*PRESETS, "file"],
        doc="Initial Q, K, V (see workloads.make_qkv); 'file' uses the "
        "arrays of the last Simulation.load_npz.",
    )
    stream = param.Selector(
        default="entries",
        objects=list(STREAMS),
        doc="Kind of update stream (see workloads.UpdateStream).",
    )
    policy = param.Selector(
        default="cost",
        objects=list(POLICIES),
        doc="Flush policy of the lazy engine: CostModel, Fixed(threshold), "
        "OriginalAdaptive or ErrorBudget(tolerance).",
    )
    threshold = param.Integer(
        10, bounds=(1, 2048), doc="Pending update actions that trigger a flush ('fixed')."
    )
    tolerance = param.Number(
        1e-3, bounds=(1e-8, 1.0), doc="Relative error allowed in the stale caches ('error')."
    )
    updates_per_tick = param.Integer(
        16, bounds=(1, 1024), doc="Update actions per tick (the mean for 'bursts')."
    )
    k_share = param.Number(
        0.5, bounds=(0.0, 1.0), doc="Probability that an update goes to K rather than V."
    )
    queries_per_tick = param.Integer(
        4, bounds=(0, 1024), doc="Exact output entries queried per tick."
    )
    delta_scale = param.Number(
        0.1,
        bounds=(0.0, 1e6),
        inclusive_bounds=(False, True),
        softbounds=(1e-3, 10.0),
        doc="Standard deviation of entry updates.",
    )
    scale = param.Selector(
        default=SCALES[0],
        objects=list(SCALES),
        doc="Logit scale: 1/sqrt(d), or 1 as in the original prototype.",
    )
    dtype = param.Selector(
        default="float64",
        objects=["float64", "float32"],
        doc="Working precision of every strategy.",
    )
    seed = param.Integer(0, bounds=(0, 2**32 - 1), doc="Seed of the preset and the update stream.")
    history = param.Integer(
        10_000,
        bounds=(1, MAX_CAPACITY),
        doc="Ticks kept in the timeline (older ones are dropped).",
    )


_NO_ANSWERS = np.zeros(0)


class Simulation:
    """Drive the lazy engine and the baseline strategies with one reproducible workload.

    Parameters
    ----------
    config : SimulationConfig, optional
        Shared settings (watched: a dashboard may change them while the simulation runs).
    **params
        Overrides applied to ``config`` (or to a fresh one), e.g. ``n=512, policy="fixed"``.

    Attributes
    ----------
    config : SimulationConfig
    engine : LazyAttention
        The lazy strategy under the configured policy.
    eager : LazyAttention
        The eager twin (``Fixed(1)``, one call per update action).
    ondemand : OnDemand
    tick : int
        Ticks simulated since the last rebuild.
    timeline : Timeline
    last_answers : dict or None
        The last tick's query positions (``rows``, ``cols``) and each strategy's exact answers
        (``lazy``, ``eager``, ``ondemand``), all (queries_per_tick,) arrays.

    Notes
    -----
    Changing ``n``, ``d``, ``preset``, ``seed``, ``scale`` or ``dtype`` rebuilds everything:
    fresh strategies, stream and timeline, with the cost of a dense recompute timed again.
    A rebuild costs two O(n²·d) engine constructions. If it fails, the exception propagates
    and the simulation, including the changed parameters, stays as it was.

    With the same configuration and seed, two simulations produce the same timeline except the
    time columns (:data:`TIME_COLUMNS`) -- as long as the policy is not ``cost``, whose flush
    decisions follow measured times.

    Examples
    --------
    >>> sim = Simulation(n=64, d=8, policy="fixed", threshold=8, queries_per_tick=2)
    >>> record = sim.step()
    >>> record["tick"], record["updates"], len(sim.timeline)
    (0, 16, 1)
    >>> sim.run(3)["tick"]
    3
    """

    def __init__(self, config: SimulationConfig | None = None, **params):
        self.config = SimulationConfig() if config is None else config
        self.config.param.update(**params)
        self._file_qkv = None
        self._muted = False
        self._build(None)
        watch = self.config.param.watch
        watch(self._on_rebuild_param, list(REBUILD_PARAMS))
        watch(self._on_stream_param, list(_STREAM_PARAMS))
        watch(self._on_policy_param, list(_POLICY_PARAMS))
        watch(self._on_history_param, ["history"])

    # ------------------------------------------------------------------ building
    def _build(self, file_qkv) -> None:
        """Create every strategy from the config, then swap them in (all or nothing)."""
        cfg = self.config
        if cfg.preset == "file":
            if file_qkv is None:
                raise ValueError(
                    "preset='file' needs arrays: load a .npz file first (Simulation.load_npz)"
                )
            if file_qkv[0].shape != (cfg.n, cfg.d):
                raise ValueError(
                    f"preset 'file' fixes n and d to the file's shape "
                    f"{file_qkv[0].shape}; got n={cfg.n}, d={cfg.d} (choose a "
                    "generated preset to change them)"
                )
            qkv = file_qkv
        else:
            qkv = make_qkv(cfg.preset, cfg.n, cfg.d, seed=cfg.seed, dtype=cfg.dtype)
        scale = 1.0 if cfg.scale == SCALES[1] else None
        engine = LazyAttention(*qkv, scale=scale, dtype=cfg.dtype, policy=self._make_policy())
        eager = engine.copy(policy=Fixed(1))  # same caches, no second O(n²·d) build
        ondemand = OnDemand(*qkv, scale=scale, dtype=cfg.dtype)
        recompute = dense_recompute_seconds(
            engine.Q, engine.K, engine.V, scale=engine.scale, dtype=engine.dtype
        )
        stream = self._make_stream()
        timeline = Timeline(cfg.history)
        # nothing above touched self: commit
        self.engine, self.eager, self.ondemand, self._stream = engine, eager, ondemand, stream
        self.timeline = timeline
        self._recompute_seconds = recompute
        self._totals = dict.fromkeys(COST_COLUMNS, 0.0)
        self._unrecorded = []
        self.tick = 0
        self.last_answers = None
        self._build_id = getattr(self, "_build_id", 0) + 1
        rng = np.random.default_rng(cfg.seed)
        self._error_rows = np.sort(rng.choice(cfg.n, min(ERROR_ROWS, cfg.n), replace=False))

    def _make_policy(self):
        cfg = self.config
        if cfg.policy == "fixed":
            return Fixed(cfg.threshold)
        if cfg.policy == "adaptive":
            return OriginalAdaptive()
        if cfg.policy == "error":
            return ErrorBudget(cfg.tolerance, seed=cfg.seed)
        return CostModel()

    def _make_stream(self) -> UpdateStream:
        cfg = self.config
        return UpdateStream(
            cfg.stream,
            cfg.n,
            cfg.d,
            updates_per_tick=cfg.updates_per_tick,
            k_share=cfg.k_share,
            delta_scale=cfg.delta_scale,
            seed=cfg.seed,
        )

    def _set_quietly(self, values: dict) -> None:
        """Set config values without triggering this simulation's own watchers (other
        watchers, e.g. a dashboard's widgets, still see the change)."""
        self._muted = True
        try:
            self.config.param.update(**values)
        finally:
            self._muted = False

    def _rebuild_or_revert(self, old: dict, file_qkv) -> None:
        try:
            self._build(file_qkv)
        except BaseException:
            self._set_quietly(old)
            raise

    def _on_rebuild_param(self, *events) -> None:
        if not self._muted:
            self._rebuild_or_revert({e.name: e.old for e in events}, self._file_qkv)

    def _on_stream_param(self, *events) -> None:
        if not self._muted:
            self._stream = self._make_stream()

    def _on_policy_param(self, *events) -> None:
        changed = {e.name for e in events}
        active = self.config.policy
        if self._muted or not (
            "policy" in changed
            or (active == "fixed" and "threshold" in changed)
            or (active == "error" and "tolerance" in changed)
        ):
            return
        self.engine.policy = self._make_policy()

    def _on_history_param(self, *events) -> None:
        if not self._muted:
            self.timeline.resize(self.config.history)

    def reset(self) -> None:
        """Start again from tick 0 with fresh strategies and an empty timeline."""
        self._build(self._file_qkv)

    def load_npz(self, path_or_bytes) -> None:
        """Rebuild on a user's ``.npz`` file with arrays Q, K, V (see ``workloads.load_npz``).

        Sets ``preset='file'`` and ``n``, ``d`` to the file's shape. On any failure it raises
        (:class:`~dynattn.workloads.WorkloadError` for a bad file) and keeps the previous
        state and settings.
        """
        qkv = load_npz(path_or_bytes, dtype=self.config.dtype)
        shape = dict(zip(("n", "d"), qkv[0].shape, strict=True))
        for name, value in shape.items():
            low, high = self.config.param[name].bounds
            if not low <= value <= high:
                raise WorkloadError(
                    f"the file's Q, K, V have {name}={value}; the simulation "
                    f"needs {low} <= {name} <= {high}"
                )
        old = {k: getattr(self.config, k) for k in ("preset", "n", "d")}
        self._set_quietly({"preset": "file", **shape})
        self._rebuild_or_revert(old, qkv)
        self._file_qkv = qkv

    # ------------------------------------------------------------------ running
    @property
    def qkv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Current ``(Q, K, V)`` of the lazy engine (read-only views, each (n, d))."""
        return self.engine.Q, self.engine.K, self.engine.V

    def flush_now(self):
        """Flush the lazy engine now; its cost counts as lazy work and the flush appears in the
        next tick's record. Returns the ``FlushEvent`` (None if nothing was pending)."""
        event = self.engine.flush()
        if event is not None:
            self._totals["lazy_seconds"] += event.seconds
            self._unrecorded.append(event)
        return event

    def step(self) -> dict:
        """Simulate one tick and return its record (also appended to the timeline).

        Cost: the strategies' work (lazy: the updates, its flushes and O(q·|S|·d) queries;
        eager: one O(n·d) flush per update action; on-demand: O(q·n·d) queries), plus the
        lazy engine's error (:data:`ERROR_ROWS`), and a dense-recompute estimate in O(1).
        """
        parts = self.tick_parts()
        while True:
            try:
                next(parts)
            except StopIteration as done:
                return done.value

    def tick_parts(self, eager_chunk=None):
        """One tick as a generator of bounded parts, for callers that must not block long.

        Yields ``(part, actions)`` after each part: ``("lazy", 0)`` (the lazy engine's updates
        and queries), ``("eager", m)`` after each chunk of ``m`` update actions of the eager
        baseline, ``("ondemand", 0)``; the generator then records the tick and returns its
        record (``StopIteration.value``). Between parts the caller may pause as long as it
        likes. If the simulation is rebuilt or reset meanwhile, the tick is abandoned (the
        generator returns ``None`` and records nothing).

        Parameters
        ----------
        eager_chunk : callable () -> int, optional
            Called before each eager chunk for its number of actions (>= 1); default: all
            actions of the tick in one part.
        """
        build = self._build_id
        busy = 0.0  # seconds of work, excluding the caller's pauses between parts
        t0 = time.perf_counter()
        cfg, engine, eager = self.config, self.engine, self.eager
        updates = self._stream.next_tick(self.tick)
        rows, cols = self._stream.queries(self.tick, cfg.queries_per_tick)
        distinct = int(np.unique(rows).size)

        # Each strategy is timed around its own calls only; the flop estimates between them
        # read the state after the updates and before the queries.
        events, apply_seconds = _timed(updates.apply, engine)
        lazy_query_flops = engine.query_flops(distinct)
        lazy, query_seconds = _timed(_answer, engine, rows, cols)
        lazy_seconds = apply_seconds + query_seconds
        busy += time.perf_counter() - t0
        yield "lazy", 0

        eager_events, eager_seconds, done = [], 0.0, 0
        while done < updates.n_updates:
            if self._build_id != build:
                return None
            t0 = time.perf_counter()
            stop = updates.n_updates if eager_chunk is None else done + max(1, eager_chunk())
            part = _action_range(updates, done, min(stop, updates.n_updates))
            chunk_events, apply_seconds = _timed(part.apply_each, eager)
            eager_events += chunk_events
            eager_seconds += apply_seconds
            busy += time.perf_counter() - t0
            yield "eager", part.n_updates
            done += part.n_updates
        if self._build_id != build:
            return None
        t0 = time.perf_counter()
        eager_query_flops = eager.query_flops(distinct)
        eager_answers, query_seconds = _timed(_answer, eager, rows, cols)
        eager_seconds += query_seconds
        _, apply_seconds = _timed(updates.apply, self.ondemand)
        ondemand, query_seconds = _timed(_answer, self.ondemand, rows, cols)
        ondemand_seconds = apply_seconds + query_seconds
        busy += time.perf_counter() - t0
        yield "ondemand", 0
        if self._build_id != build:
            return None

        t0 = time.perf_counter()
        seconds = {"lazy": lazy_seconds, "eager": eager_seconds, "ondemand": ondemand_seconds}
        flops = {"lazy": lazy_query_flops, "eager": eager_query_flops}
        record = self._record_tick(updates, distinct, events, eager_events, seconds, flops)
        record["tick_seconds"] = busy + time.perf_counter() - t0
        self.timeline.append(record)
        self.last_answers = {
            "rows": rows,
            "cols": cols,
            "lazy": lazy,
            "eager": eager_answers,
            "ondemand": ondemand,
        }
        self.tick += 1
        return record

    def _record_tick(self, updates, distinct, events, eager_events, seconds, flops) -> dict:
        """Add a tick's costs to the running totals and return its timeline record (without
        ``tick_seconds``): ``seconds`` and ``flops`` of the strategies' own calls, keyed
        "lazy", "eager" (and "ondemand" for seconds); ``events`` the lazy engine's flushes."""
        engine = self.engine
        n, d = engine.n, engine.d
        events = self._unrecorded + events
        self._unrecorded = []
        totals = self._totals
        totals["lazy_seconds"] += seconds["lazy"]
        totals["eager_seconds"] += seconds["eager"]
        totals["ondemand_seconds"] += seconds["ondemand"]
        totals["recompute_seconds"] += updates.n_updates * self._recompute_seconds
        totals["lazy_flops"] += sum(e.flops for e in events) + flops["lazy"]
        totals["eager_flops"] += sum(e.flops for e in eager_events) + flops["eager"]
        totals["ondemand_flops"] += 4.0 * n * d * distinct
        totals["recompute_flops"] += 4.0 * n * n * d * updates.n_updates
        relative, max_abs = self._stale_error()
        return {
            "tick": self.tick,
            "updates": updates.n_updates,
            "pending": engine.pending,
            "touched_rows": engine.touched_rows,
            "flushed": int(bool(events)),
            "flush_rows": sum(e.rows for e in events),
            "flush_seconds": sum(e.seconds for e in events),
            "flush_flops": sum(e.flops for e in events),
            "threshold": engine.threshold,
            "rel_error": relative,
            "max_abs_error": max_abs,
            **totals,
        }

    def _stale_error(self) -> tuple[float, float]:
        """``(relative, max_abs)`` error of the lazy engine's stale output.

        Exact over all rows (O(n·|S|·d)) while at most :data:`ERROR_ROWS` rows are touched;
        beyond, over a fixed sample of :data:`ERROR_ROWS` query rows (O(ERROR_ROWS·(n+|S|)·d)),
        so a tick's cost stops growing with |S| when nothing flushes (then ``max_abs`` is the
        sample's, a lower bound).
        """
        engine = self.engine
        if engine.touched_rows <= ERROR_ROWS or engine.n <= ERROR_ROWS:
            error = engine.approximation_error()
            return error.relative, error.max_abs
        rows = self._error_rows
        exact = engine.weights(rows) @ np.asarray(engine.V)
        diff = engine.output(stale=True)[rows] - exact
        top = max(float(np.abs(exact).max()), float(np.abs(diff).max()))
        if top == 0.0:
            return 0.0, 0.0
        norm_exact = float(np.linalg.norm(exact / top))
        relative = float(np.linalg.norm(diff / top)) / norm_exact if norm_exact else math.inf
        return relative, float(np.abs(diff).max())

    def run(self, ticks: int, progress: bool = False) -> dict | None:
        """Simulate ``ticks`` ticks; returns the last record (None for 0 ticks).

        ``progress=True`` shows a tqdm progress bar on stderr.
        """
        if isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 0:
            raise ValueError(f"ticks={ticks!r} must be an integer >= 0")
        steps = range(ticks)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="simulate", unit="tick")
        record = None
        for _ in steps:
            record = self.step()
        return record

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"Simulation(n={cfg.n}, d={cfg.d}, preset={cfg.preset!r}, "
            f"stream={cfg.stream!r}, policy={cfg.policy!r}, tick={self.tick})"
        )


def _timed(func, *args):
    """``(func(*args), wall seconds it took)``."""
    t0 = time.perf_counter()
    result = func(*args)
    return result, time.perf_counter() - t0


def _action_range(updates: TickUpdates, start: int, stop: int) -> TickUpdates:
    """The update actions ``start .. stop - 1`` of ``updates``, in the order of
    ``TickUpdates.apply_each`` (K entries, V entries, K rows, V rows)."""
    parts = {}
    offset = 0
    for prefix, fields in (
        ("k_", ("rows", "cols", "deltas")),
        ("v_", ("rows", "cols", "deltas")),
        ("k_set_", ("rows", "values")),
        ("v_set_", ("rows", "values")),
    ):
        size = getattr(updates, prefix + "rows").size
        lo, hi = min(max(start - offset, 0), size), min(max(stop - offset, 0), size)
        for name in fields:
            parts[prefix + name] = getattr(updates, prefix + name)[lo:hi]
        offset += size
    return TickUpdates(**parts)


def _answer(strategy, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact answers of ``strategy`` at the query positions (none asked: an empty array)."""
    return strategy.query_many(rows, cols) if rows.size else _NO_ANSWERS
