"""``python -m benchmarks.train_step [options]``: the train-step benchmark, the same as ``fbp bench``.

The harness lives in the package (``fbp.bench``), so an installed fbp runs it
without this checkout. This entry point differs in one default only: run from
a checkout, it writes its files to ``benchmarks/out/`` beside this file (ignored
by git) instead of ``./fbp-bench/``. ``--results benchmarks/RESULTS.md`` also
rewrites the results file, keeping its hand-written notes.
"""

import sys
from pathlib import Path

from fbp.bench import main

OUT = Path(__file__).resolve().parent / "out"

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.train_step", default_out=str(OUT)))
