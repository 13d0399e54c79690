"""``nonlocal-bench``: time and peak memory of every backend of ``nonlocal_aggregate`` against its peers.

Modules (each small, each with its own docstring saying what it measures and how):

* :mod:`.cases`    — one benchmark case (kernel, normalize, update, sizes, dtype, device, pass),
  its inputs, and its FLOP and byte counts;
* :mod:`.runners`  — what gets timed: our backends (enumerated from ``nonlocal_ext.backends``)
  and the peers a user would otherwise pick (SDPA, FlexAttention, KeOps);
* :mod:`.measure`  — the timed step of each pass, the median timer, the GEMM rate probe, peak
  memory (CUDA allocator) and the ``--check`` comparison;
* :mod:`.fresh_process` — peak RSS on CPU, one fresh process per case;
* :mod:`.run`      — the sweep: every case × every runner → one row;
* :mod:`.report`   — the streamed table, the progress bar, JSON and CSV;
* :mod:`.plot`     — time and peak memory against N (matplotlib, Agg);
* :mod:`.cli`      — the command line (``nonlocal-bench``, ``python -m bench``).
"""

from .cli import main

__all__ = ["main"]
