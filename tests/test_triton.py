"""backend="triton" under the Triton interpreter: the suite is tests/triton_suite.py.

TRITON_INTERPRET=1 must be set before the kernels are created, and set in this process it would also
make ``backend="triton"`` available for the CPU tensors of every other test file. So in a session
without it, this file runs the suite in a child process with TRITON_INTERPRET=1; with it, this file
*is* the suite:

    .venv/bin/python -m pytest -q tests/test_triton.py                    # one test: the child run
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_triton.py # the suite, test by test
"""

from __future__ import annotations

import os
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_suite import *  # noqa: F401,F403  # the tests themselves
else:
    def test_triton_suite_under_the_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1")
        here = os.path.dirname(os.path.abspath(__file__))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                                cwd=os.path.dirname(here), env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
