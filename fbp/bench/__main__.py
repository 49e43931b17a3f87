"""``python -m fbp.bench [options]``: the same as ``fbp bench``."""

import sys

from fbp.bench.command import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m fbp.bench"))
