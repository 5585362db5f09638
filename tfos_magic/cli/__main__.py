"""`python -m tfos_magic.cli`: the `tfos` command without its console script."""

import sys

from .main import main

sys.exit(main())
