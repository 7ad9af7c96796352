"""The ``simulate`` command: run a :class:`~dynattn.simulation.Simulation` and summarise it.

Wired into ``python -m dynattn`` by :mod:`dynattn.__main__`::

    python -m dynattn simulate --n 512 --d 32 --policy cost --ticks 500 --csv out.csv

Every simulation setting is an option whose default, range and help come from
:class:`~dynattn.simulation.SimulationConfig`, so the command line and the dashboard accept the
same values; a value out of range is an argparse error (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import stat
import sys
import tempfile

import param

from ._validate import check_int
from .simulation import SCALES, TIMELINE_COLUMNS, Simulation, SimulationConfig

__all__ = ["add_simulate_parser", "run_simulate"]

PROG = "python -m dynattn simulate"

#: Most memory the timeline may take (it keeps every column of every tick of ``--history``,
#: all ticks by default, in preallocated arrays): 256 MiB is 1.6 million ticks, about 500 MB
#: of CSV, and refusing more before allocating beats failing at the end of a long run.
MAX_HISTORY_BYTES = 256 * 2**20
_BYTES_PER_TICK = 8 * len(TIMELINE_COLUMNS)  # one int64 or float64 per column
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130

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
    try:
        return check_int("value", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1") from None


def _output_path(text: str) -> str:
    """A CSV destination that can be written, checked before the simulation runs: the folder
    exists and takes a new file (tried, not guessed from permission bits: root ignores them),
    and the path is not a folder or a device."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty; give a file name, e.g. out.csv")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: folder {folder!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a folder")
    if os.path.exists(text) and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is not a regular file")
    if os.path.isfile(text) and not os.access(text, os.W_OK):  # renaming over it would work
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the file is read-only")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dynattn-probe-"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: folder {folder!r} does not take new files "
            f"({exc.strerror or exc})"
        ) from None
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
        help="ticks kept in the timeline (default: all ticks; at most "
        f"{MAX_HISTORY_BYTES // _BYTES_PER_TICK:,}, {_BYTES_PER_TICK} bytes each)",
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
    bad ``--file`` or a timeline too large for memory is reported on stderr with exit status
    2, like an argparse error, before anything is allocated. Ctrl-C stops the run without a
    traceback once the current tick is done (a second Ctrl-C at once): the summary and the
    CSV of the ticks done so far are still written, and the exit status is 130. The CSV is
    written to a temporary file beside it and renamed, so an existing file is replaced whole
    or left as it was.
    """
    history = args.history or args.ticks
    problem = _history_problem(args, history)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    settings = {name: getattr(args, name) for name in _OPTIONS}
    settings["scale"] = SCALES[1] if args.unscaled else SCALES[0]
    settings["history"] = history
    try:
        sim = Simulation(SimulationConfig(**settings))
        if args.file:
            sim.load_npz(args.file)
    except ValueError as exc:  # a bad file (WorkloadError) or an impossible combination
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before the first tick; nothing written", file=sys.stderr)
        return INTERRUPTED
    status = 0
    if not _run_until_interrupted(sim, args.ticks):
        status = INTERRUPTED
        print(f"{PROG}: interrupted after {sim.tick} of {args.ticks} ticks", file=sys.stderr)
    csv_path = args.csv
    if csv_path:
        try:
            _replace_file(csv_path, sim.timeline.to_csv)
        except (OSError, KeyboardInterrupt) as exc:
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else exc
            print(f"{PROG}: error: {csv_path} not written ({reason})", file=sys.stderr)
            status = status or (INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1)
            csv_path = None
    print(summary(sim, csv_path=csv_path))
    return status


def _run_until_interrupted(sim: Simulation, ticks: int) -> bool:
    """Run ``ticks`` ticks (a progress bar on stderr when it is a terminal); False if Ctrl-C
    stopped the run. The first Ctrl-C lets the current tick finish, so that the summary and
    the CSV hold whole ticks only; a second one interrupts at once."""
    stop = _StopAfterTick()
    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: Ctrl-C interrupts at once
        previous = None
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=ticks, desc="simulate", unit="tick")
    try:
        for _ in range(ticks):
            sim.step()
            if bar is not None:
                bar.update()
            if stop.requested:
                break
    except KeyboardInterrupt:
        stop.requested = True
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return not stop.requested


class _StopAfterTick:
    """A SIGINT handler: the first signal is noted, a second raises KeyboardInterrupt."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _history_problem(args: argparse.Namespace, history: int) -> str | None:
    """Why a timeline of ``history`` ticks cannot be allocated, naming the option, or None."""
    limit = MAX_HISTORY_BYTES // _BYTES_PER_TICK
    if history <= limit:
        return None
    option = "--history" if args.history else "--ticks"
    need = history * _BYTES_PER_TICK
    hint = (
        f"pass --history N (N <= {limit:,}) to keep only the last N ticks"
        if option == "--ticks"
        else f"use --history {limit:,} or less"
    )
    return (
        f"{option} {history:,} would keep {history:,} ticks in the timeline ({need / 2**30:,.1f} "
        f"GiB, {_BYTES_PER_TICK} bytes a tick; the limit is {MAX_HISTORY_BYTES // 2**20} MiB, "
        f"{limit:,} ticks): {hint}"
    )


def _replace_file(path: str, write) -> None:
    """Call ``write(text_file)`` on a temporary file in ``path``'s folder, then rename it to
    ``path`` (atomic): a failure or Ctrl-C leaves any previous file whole, and no temporary."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_file_mode(path: str) -> int:
    """The permission bits of the file being replaced, or those a new file gets (umask)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def summary(sim: Simulation, csv_path: str | None = None) -> str:
    """A plain-text report of a simulation: totals, final error and the cost comparison."""
    cfg, engine = sim.config, sim.engine
    last = sim.timeline.tail(1)
    if not len(last["tick"]):
        return "no ticks simulated" + (f"\ntimeline: {csv_path} (0 ticks)" if csv_path else "")
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
