"""The command line: ``python benchmarks/run.py [--quick | --tiny] [--out DIR] [--no-plots]
[--no-png] [--strict] [--readme FILE]``; runs :func:`benchmarks.collect.collect` and writes
``bench{suffix}.json``, ``results{suffix}.md`` and the plots, and after a full run the README's
summary."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import __doc__ as _package_doc
from .collect import collect
from .plans import PLANS
from .report import finite, render_markdown, update_readme

__all__ = ["build_parser", "main", "run_bench"]

_HERE = Path(__file__).resolve().parent
RESULTS = _HERE / "results"
README = _HERE.parent / "README.md"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=_package_doc.split("\n\n")[0]
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="reduced sizes (n ≤ 4,096; under a minute)"
    )
    size.add_argument(
        "--tiny", action="store_true", help="smoke test at toy sizes (seconds; figures meaningless)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="directory for JSON, markdown and plots (default: %(default)s)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the HTML/PNG plots")
    p.add_argument(
        "--no-png",
        action="store_true",
        help="write the HTML plots only (PNG needs a headless Chromium)",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target is missed"
    )
    p.add_argument(
        "--readme",
        default=str(README),
        help="a full run rewrites the results between the '<!-- bench:start -->' "
        "and '<!-- bench:end -->' lines of this file ('' for none; default: %(default)s)",
    )
    return p


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark selected by ``args`` (see :func:`build_parser`); returns the exit
    status (0, or 1 with ``--strict`` when a target is missed)."""
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    suffix = "" if mode == "full" else f"-{mode}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    res = collect(PLANS[mode], log)
    if not args.no_plots:
        from .plots import write_plots  # holoviews and bokeh: only when plots are wanted

        write_plots(res, out, suffix, png=not args.no_png, log=log)
    md = render_markdown(res)
    (out / f"results{suffix}.md").write_text(md, encoding="utf-8")
    (out / f"bench{suffix}.json").write_text(json.dumps(finite(res), indent=1), encoding="utf-8")
    if mode == "full" and args.readme:
        log(update_readme(Path(args.readme), res))
    print()
    print(md)
    misses = [t for t in res["targets"] if t["status"] == "MISS"]
    print(
        f"targets: {sum(t['status'] == 'PASS' for t in res['targets'])} PASS, "
        f"{len(misses)} MISS, {sum(t['status'] == 'SKIP' for t in res['targets'])} SKIP; "
        f"wrote {out / f'bench{suffix}.json'}"
    )
    return 1 if (args.strict and misses) else 0


def main(argv=None) -> int:
    """Parse ``argv`` (default: the command line) and run; returns the exit status."""
    return run_bench(build_parser().parse_args(argv))
