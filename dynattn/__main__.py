"""Command line: ``python -m dynattn demo | simulate | bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="replay the original prototype's demo workload, exactly")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .compat import run_demo

        run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
