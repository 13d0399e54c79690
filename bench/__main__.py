"""``python -m bench`` (from the repository root): the same as ``nonlocal-bench``."""

import sys

from nonlocal_ext.benchmark.cli import main

sys.exit(main())
