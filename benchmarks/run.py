"""Run the benchmarks from a checkout: ``python benchmarks/run.py [--quick | --tiny] [...]``
(``make bench``, ``make bench-quick``); options in ``benchmarks/README.md`` and ``--help``."""

import sys
from pathlib import Path

# The checkout's root replaces this script's folder on sys.path: ``benchmarks`` and ``dynattn``
# import from there without installing, and no module in benchmarks/ shadows a top-level one.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
