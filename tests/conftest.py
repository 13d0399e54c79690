"""Session hooks: poisoned C++ output buffers, and a closing summary of how many tests were skipped for want
of a CUDA device."""

from __future__ import annotations

import os

# The C++ kernels fill their output buffers with NaN first (read once per process, inherited by the
# suite's child processes): an element that no pass writes then fails every comparison.
os.environ.setdefault("NONLOCAL_EXT_POISON_OUTPUTS", "1")

#: The skip reason of every test that needs a GPU (tests/test_cuda.py and a few others).
NEEDS_CUDA = "needs CUDA"


def needs_cuda_count(skipped_reports) -> int:
    """How many of pytest's ``skipped`` reports were skipped with the reason :data:`NEEDS_CUDA`."""
    count = 0
    for report in skipped_reports:
        longrepr = getattr(report, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        if reason.removeprefix("Skipped: ") == NEEDS_CUDA:
            count += 1
    return count


def pytest_terminal_summary(terminalreporter):
    count = needs_cuda_count(terminalreporter.stats.get("skipped", []))
    if count:
        terminalreporter.write_line(f"{count} tests skipped: {NEEDS_CUDA} (no CUDA device visible to torch; "
                                    "on a GPU machine `make gpu-check` runs them)")
