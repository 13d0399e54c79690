"""Output: the table printed row by row, the progress bar, JSON and CSV.

A row is a dict whose first keys are :data:`ROW_KEYS` (the JSON/CSV contract); more keys follow
(FLOPs, bytes, percent of the GEMM rate, ratio to the reference, what ``--check`` compared).
"""

from __future__ import annotations

import csv
import json
import sys
import time

#: The keys every row starts with, in this order; ``error`` is None when the case was timed.
ROW_KEYS = ("backend", "kernel", "normalize", "update", "N", "M", "D", "C", "batch", "dtype", "device", "pass",
            "median_ms", "peak_mem_mb", "gflops", "error")

#: Case fields that get a table column when they vary across the sweep (else go in the header).
_DIMENSIONS = ("kernel", "normalize", "update", "dtype", "device", "D", "C", "batch", "N", "M", "pass")


def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 10000 else f"{ms:.0f}"


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


class Table:
    """Fixed-width table for the rows of a known set of cases, printed as the rows arrive.

    Dimensions that take one value in the whole sweep are printed once in the header instead
    of in every row.
    """

    def __init__(self, cases, stream=None, progress=None, copy_to=None):
        self.stream = stream or sys.stdout
        self.copy_to = copy_to  # a second text stream that gets the same lines (``--table FILE``)
        self.progress = progress
        described = [c.describe() for c in cases]
        self.same_m = all(d["M"] == d["N"] for d in described)
        shown = [k for k in _DIMENSIONS if not (k == "M" and self.same_m)]
        varying = [k for k in shown if len({d[k] for d in described}) > 1]
        self.fixed = {k: described[0][k] for k in shown if k not in varying} if described else {}
        self.columns = [(k, max(len(k), max(len(str(d[k])) for d in described))) for k in varying]

    def fixed_text(self) -> str:
        """The dimensions that are the same in every row, e.g. ``normalize=row, ..., M=N``."""
        return ", ".join(f"{k}={v}" for k, v in self.fixed.items()) + (", M=N" if self.same_m else "")

    def header(self, notes=()):
        lines = list(notes) + [self.fixed_text()]
        names = [f"{k:>{w}}" if k in ("D", "C", "batch", "N", "M") else f"{k:<{w}}" for k, w in self.columns]
        head = " ".join(names + [f"{'backend':<9}", f"{'ms':>9}", f"{'peak MB':>9}", f"{'GFLOP/s':>8}",
                                 f"{'%GEMM':>6}", f"{'vs ref':>7}", "note"])
        lines += [head, "-" * (len(head) + 10)]
        self._write("\n".join(lines))

    def row(self, row):
        cells = [f"{row[k]:>{w}}" if k in ("D", "C", "batch", "N", "M") else f"{row[k]:<{w}}" for k, w in self.columns]
        note = ("error: " + _shorten(row["error"], 90) if row["error"] is not None
                else "warning: " + _shorten(row["warning"], 90) if row.get("warning") else "")
        cells += [f"{row['backend']:<9}", f"{_fmt_ms(row['median_ms']):>9}", f"{_fmt(row['peak_mem_mb'], '.1f'):>9}",
                  f"{_fmt(row['gflops'], '.1f'):>8}", f"{_fmt(row['pct_gemm'], '.0f', '%'):>6}",
                  f"{_fmt(row['vs_reference'], '.2f', 'x'):>7}", note]
        self._write(" ".join(cells).rstrip())

    def line(self, text):
        """A free-form line (a note under the table)."""
        self._write(text)

    def _write(self, text):
        if self.progress is not None:
            self.progress.clear()
        print(text, file=self.stream, flush=True)
        if self.copy_to is not None:
            print(text, file=self.copy_to, flush=True)
        if self.progress is not None:
            self.progress.redraw()


def _shorten(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


class Progress:
    """A one-line progress bar on stderr (drawn only when stderr is a terminal)."""

    def __init__(self, total, stream=None, enabled=None, width=24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.width = max(total, 1), width
        self.done, self.label, self.start = 0, "", time.perf_counter()
        self._drawn = False

    def update(self, done, label=""):
        self.done, self.label = done, label
        self.redraw()

    def redraw(self):
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        eta = f" ~{_clock(left)} left" if left is not None else ""
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{_clock(elapsed)}{eta}  {self.label}")
        self.stream.write("\r\033[K" + line[:150])
        self.stream.flush()
        self._drawn = True

    def clear(self):
        if self.enabled and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False

    def finish(self):
        self.clear()


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def write_json(rows, path):
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def write_csv(rows, path):
    keys = list(ROW_KEYS) + [k for k in (rows[0] if rows else {}) if k not in ROW_KEYS]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})
