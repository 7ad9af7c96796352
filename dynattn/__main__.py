"""Command line: ``python -m dynattn demo | simulate | bench``."""

from __future__ import annotations

import argparse
import sys

from .bench import add_bench_parser, run_bench
from .cli import add_simulate_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="replay the original prototype's demo workload, exactly")
    add_simulate_parser(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .compat import run_demo

        run_demo()
        return 0
    if args.command == "bench":
        return run_bench(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
