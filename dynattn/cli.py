"""The ``simulate`` command: run a :class:`~dynattn.simulation.Simulation` and summarise it.

Wired into ``python -m dynattn`` by :mod:`dynattn.__main__`::

    python -m dynattn simulate --n 512 --d 32 --policy cost --ticks 500 --csv out.csv

Every simulation setting is an option whose default, range and help come from
:class:`~dynattn.simulation.SimulationConfig`, so the command line and the dashboard accept the
same values; a value out of range is an argparse error (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import param

from .simulation import SCALES, Simulation, SimulationConfig

__all__ = ["add_simulate_parser", "run_simulate"]

PROG = "python -m dynattn simulate"

# SimulationConfig parameters offered as --options (scale is the --unscaled flag; preset
# 'file' is chosen by --file).
_OPTIONS = (
    "n",
    "d",
    "preset",
    "stream",
    "policy",
    "threshold",
    "tolerance",
    "updates_per_tick",
    "queries_per_tick",
    "k_share",
    "delta_scale",
    "dtype",
    "seed",
)


def _bounded(name: str):
    """An argparse type: a number within the bounds of ``SimulationConfig.<name>``."""
    p = SimulationConfig.param[name]
    integer = isinstance(p, param.Integer)
    low, high = p.bounds
    low_open, high_open = (not inc for inc in p.inclusive_bounds)

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            interval = (
                f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{')' if high_open else ']'}"
            )
            raise argparse.ArgumentTypeError(f"{name}={text} must be in {interval}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _output_path(text: str) -> str:
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {folder!r} does not exist")
    return text


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` sub-command to an argparse ``subparsers`` object and return it.

    The parser's ``func`` default is :func:`run_simulate`.
    """
    parser = subparsers.add_parser(
        "simulate",
        help="compare lazy, eager, on-demand and recompute on one workload",
        description="Simulate ticks of K/V updates and exact queries, print the cumulative "
        "cost of each exact strategy and optionally write the timeline as CSV.",
    )
    parser.add_argument(
        "--ticks", type=_positive_int, default=500, help="ticks to simulate (default: %(default)s)"
    )
    for name in _OPTIONS:
        p = SimulationConfig.param[name]
        flag = "--" + name.replace("_", "-")
        help_text = f"{p.doc} (default: %(default)s)"
        if isinstance(p, param.Selector):
            choices = [c for c in p.objects if c != "file"]
            parser.add_argument(flag, choices=choices, default=p.default, help=help_text)
        else:
            parser.add_argument(flag, type=_bounded(name), default=p.default, help=help_text)
    parser.add_argument(
        "--unscaled",
        action="store_true",
        help="use scale 1 (the original prototype's logits) instead of 1/sqrt(d)",
    )
    parser.add_argument(
        "--file",
        metavar="NPZ",
        help="start from the arrays Q, K, V of this .npz file (its shape sets n "
        "and d; --n, --d and --preset are then ignored)",
    )
    parser.add_argument(
        "--history",
        type=_positive_int,
        default=None,
        help="ticks kept in the timeline (default: all ticks)",
    )
    parser.add_argument(
        "--csv",
        type=_output_path,
        metavar="PATH",
        help="write the timeline (one line per tick) to this CSV file",
    )
    parser.set_defaults(func=run_simulate)
    return parser


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation described by parsed ``simulate`` arguments; returns the exit status.

    Prints a summary to stdout; a progress bar goes to stderr only when it is a terminal. A
    bad ``--file`` is reported on stderr with exit status 2, like an argparse error.
    """
    settings = {name: getattr(args, name) for name in _OPTIONS}
    settings["scale"] = SCALES[1] if args.unscaled else SCALES[0]
    settings["history"] = args.history or args.ticks
    try:
        sim = Simulation(SimulationConfig(**settings))
        if args.file:
            sim.load_npz(args.file)
    except ValueError as exc:  # a bad file (WorkloadError) or an impossible combination
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    sim.run(args.ticks, progress=sys.stderr.isatty())
    if args.csv:
        sim.timeline.to_csv(args.csv)
    print(summary(sim, csv_path=args.csv))
    return 0


def summary(sim: Simulation, csv_path: str | None = None) -> str:
    """A plain-text report of a simulation: totals, final error and the cost comparison."""
    cfg, engine = sim.config, sim.engine
    last = sim.timeline.tail(1)
    if not len(last["tick"]):
        return "no ticks simulated"
    final = {c: values[0] for c, values in last.items()}
    lines = [
        f"simulated {sim.tick} ticks: n={cfg.n}, d={cfg.d}, preset={cfg.preset}, "
        f"stream={cfg.stream}, policy={engine.policy!r}, dtype={cfg.dtype}",
        f"updates {engine.n_updates}, queries {engine.n_queries}, "
        f"lazy flushes {engine.n_flushes} (eager: {sim.eager.n_flushes})",
        f"final relative error of the lazy caches {final['rel_error']:.3g} "
        f"(max abs {final['max_abs_error']:.3g}), pending {final['pending']}",
        "",
        f"{'cumulative cost':<18}{'seconds':>12}{'flops':>12}{'s / lazy':>10}{'flops / lazy':>14}",
    ]
    for label, key in (
        ("lazy", "lazy"),
        ("eager", "eager"),
        ("on-demand", "ondemand"),
        ("recompute (est.)", "recompute"),
    ):
        seconds, flops = final[f"{key}_seconds"], final[f"{key}_flops"]
        lines.append(
            f"{label:<18}{seconds:>12.4g}{flops:>12.3g}"
            f"{_ratio(seconds, final['lazy_seconds']):>10}"
            f"{_ratio(flops, final['lazy_flops']):>14}"
        )
    if csv_path:
        lines += ["", f"timeline: {csv_path} ({len(sim.timeline)} ticks)"]
    return "\n".join(lines)


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.3g}x" if reference > 0 else "n/a"
