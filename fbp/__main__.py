"""``python -m fbp``: the same as the ``fbp`` command."""

import sys

from fbp.cli import main

sys.exit(main())
