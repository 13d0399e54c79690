"""``python -m nonlocal_ext.benchmark``: the same as ``nonlocal-bench``."""

import sys

from .cli import main

sys.exit(main())
