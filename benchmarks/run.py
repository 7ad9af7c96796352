"""Run the benchmarks from a checkout: ``python benchmarks/run.py [--quick | --tiny] [...]``.

The same as ``python -m dynattn bench`` (see ``benchmarks/README.md``), except that results go
to ``benchmarks/results`` next to this file unless ``--out`` says otherwise.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # a checkout works without installing the package

from dynattn.bench import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(HERE / "results")]
    sys.exit(main(argv))
