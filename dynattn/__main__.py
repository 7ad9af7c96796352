"""Command line: ``python -m dynattn demo | simulate``.

Benchmarks are not part of the package: ``python benchmarks/run.py`` in a checkout (``make
bench``; see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import sys

from .cli import add_simulate_parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="replay the original prototype's demo workload, exactly")
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .compat import run_demo

        run_demo()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
