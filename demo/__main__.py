"""``python -m demo [--out DIR] [--steps N] …``: see :mod:`demo.run`."""

import sys

from demo.run import main

sys.exit(main())
