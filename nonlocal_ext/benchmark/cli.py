"""nonlocal-bench: time and peak memory of nonlocal_aggregate's backends against their peers.

Sweeps kernel × normalize × update × sizes × dtype × pass over our backends (reference, chunked,
linear, and the fused cpu/triton ones where available) and the peers a user would otherwise
pick (torch SDPA, FlexAttention on CUDA, KeOps when installed). Prints a table as it goes;
writes JSON, CSV and a plot on request.

examples:
  nonlocal-bench                                    # the default CPU sweep (what `make bench` runs)
  nonlocal-bench --quick --check                    # a fast smoke run, outputs checked first
  nonlocal-bench --kernel all --normalize row,sym --n 1024 --pass fwd+bwd
  nonlocal-bench --backends chunked,sdpa --n 4096,16384 --json out.json --plot out.png

Time is the median of --repeat calls after warm-up (CUDA events on GPU). Peak memory is the
growth over the inputs during one call: the CUDA allocator's peak on GPU, the peak RSS of a
fresh process per case on CPU (--no-memory skips it). GFLOP/s counts the dense GEMM work,
2·N·M·(D+C) per forward, 2× that per backward (dv, dÂ, dq, dk), 3× for fwd+bwd; %GEMM compares it
with torch.mm timed at start. Unsupported cases and out-of-memory are rows with an error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from nonlocal_ext.kernels import KERNELS
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES

from . import measure
from .cases import BLOCK_SHAPES, DTYPES, PASSES, block_suite, sweep
from .report import Progress, Table, write_csv, write_json
from .run import Options, run_sweep
from .runners import all_runners

DEFAULTS = {"kernel": "gaussian,fractional", "normalize": "row", "update": "aggregate",
            "n": "256,512,1024,2048,4096", "d": "64", "c": "128", "batch": "1", "dtype": "float32",
            "pass": "fwd,fwd+bwd", "backends": "all", "repeat": 5}
QUICK = {"n": "128,512", "repeat": 3}


def _choices(text: str, allowed, what: str, parser) -> list[str]:
    values = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in values if x not in allowed]
    if unknown or not values:
        parser.error(f"--{what}: unknown {', '.join(unknown) or 'empty list'}; expected a comma list of "
                     f"{', '.join(allowed)}, or all")
    return values


def _ints(text: str, what: str, parser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"--{what}: expected a comma list of positive integers, got {text!r}")
    return values


def _load_note() -> str:
    """The machine's load, so that a reader can tell a quiet run from a shared one."""
    try:
        return f" · load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nonlocal-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    add("--kernel", help=f"comma list of {', '.join(KERNELS)}, or all (default {DEFAULTS['kernel']})")
    add("--normalize", help=f"comma list of {', '.join(NORMALIZATIONS)}, or all (default row)")
    add("--update", help=f"comma list of {', '.join(UPDATES)}, or all (default aggregate)")
    add("--n", help=f"comma list of N, query positions (default {DEFAULTS['n']}; --quick {QUICK['n']})")
    add("--m", help="comma list of M, key positions (default M = N)")
    add("--d", help="comma list of D, query/key features (default 64)")
    add("--c", help="comma list of C, value channels (default 128)")
    add("--batch", help="comma list of batch sizes (default 1)")
    add("--dtype", help=f"comma list of {', '.join(DTYPES)} (default float32)")
    add("--backends", help="comma list of runners, or all: every runner that can express a case "
                           "(named runners that cannot get an error row)")
    add("--pass", dest="passes", help=f"comma list of {', '.join(PASSES)}, or all (default fwd,fwd+bwd)")
    add("--repeat", type=int, help="timed calls per case; the median is reported (default 5; --quick 3)")
    add("--warmup", type=int, default=1, help="untimed calls before timing (default 1; compiled peers use more)")
    add("--check", action="store_true", help="compare each output (and gradients, for passes with a backward) "
                                             "with the float64 reference before timing; a mismatch is an error row")
    add("--no-memory", action="store_true", help="skip peak memory (on CPU it costs a fresh process per case)")
    add("--threads", type=int, help="torch CPU threads (default: torch's own choice; 1 gives steadier times "
                                    "on a loaded machine)")
    add("--quick", action="store_true", help="a fast smoke run: small N, fewer repeats, a smaller GEMM probe")
    add("--gemm-size", type=int, default=None, help="size of the torch.mm rate probe (default 2048; --quick 1024)")
    add("--json", metavar="FILE", help="write the rows as a JSON list")
    add("--csv", metavar="FILE", help="write the rows as CSV")
    add("--table", metavar="FILE", help="also write the printed table to FILE")
    add("--plot", metavar="FILE.png", help="plot time and peak memory against N, one panel per kernel")
    add("--suite", choices=("blocks",), help="blocks: the nonlocal-block shapes (B, N, M, D = C: "
        + "; ".join(f"{name} {b}×{n}×{m}×{dc}" for name, b, n, m, dc in BLOCK_SHAPES)
        + ") for gaussian+row, dot+count, fractional+count/row, rbf+row; --dtype and --pass apply, "
          "--kernel/--normalize/--n/--m/--d/--c/--batch do not")
    add("--list", action="store_true", help="list the runners and exit")
    return parser


def _pick(args, name):
    """A flag's value: as given, else its --quick value under --quick, else its default."""
    given = getattr(args, name)
    if given is not None:
        return given
    return QUICK.get(name, DEFAULTS[name]) if args.quick else DEFAULTS[name]


def _cases(args, parser, device):
    def pick(name):
        return _pick(args, name)
    if args.suite == "blocks":
        return block_suite(_choices(pick("dtype"), list(DTYPES), "dtype", parser), device,
                           _choices(args.passes or DEFAULTS["pass"], PASSES, "pass", parser))
    return sweep(kernels=_choices(pick("kernel"), list(KERNELS), "kernel", parser),
                 normalizes=_choices(pick("normalize"), NORMALIZATIONS, "normalize", parser),
                 updates=_choices(pick("update"), UPDATES, "update", parser),
                 ns=_ints(pick("n"), "n", parser), ms=_ints(args.m, "m", parser) if args.m else [],
                 ds=_ints(pick("d"), "d", parser), cs=_ints(pick("c"), "c", parser),
                 batches=_ints(pick("batch"), "batch", parser),
                 dtypes=_choices(pick("dtype"), list(DTYPES), "dtype", parser), device=device,
                 passes=_choices(args.passes or DEFAULTS["pass"], PASSES, "pass", parser))


def _notes(args, device, repeat, gemm, gemm_size) -> list[str]:
    """The lines above the table: machine, GEMM rate, what the columns mean."""
    where = (f"{torch.get_num_threads()} threads" if not device.startswith("cuda")
             else torch.cuda.get_device_name(device))
    rates = ", ".join(f"{dtype} {rate:.4g} GFLOP/s" for (_, dtype), rate in gemm.items())
    timing = f"time: median of {repeat} after warm-up"
    if args.check:
        timing += "; outputs checked against float64 first"
    if not args.no_memory:
        timing += ("; peak MB: growth over the inputs during one call, "
                   + ("CUDA allocator" if device.startswith("cuda") else "fresh process per case"))
    return [f"nonlocal-bench · torch {torch.__version__} · {device} · {where}{_load_note()}",
            f"GEMM rate (torch.mm {gemm_size}²): {rates}", timing]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = all_runners()
    if args.list:
        for name, runner in runners.items():
            print(f"{name:<10} {runner.kind}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    backends = _pick(args, "backends")
    names = _choices(backends, list(runners), "backends", parser)
    selected = {name: runner for name, runner in runners.items() if name in names}
    cases = _cases(args, parser, device)
    repeat = _pick(args, "repeat")
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    options = Options(repeat=repeat, warmup=max(args.warmup, 0), check=args.check, memory=not args.no_memory)

    gemm_size = args.gemm_size or (1024 if args.quick else 2048)
    gemm = {(device, dtype): measure.gemm_gflops(device, DTYPES[dtype], gemm_size)
            for dtype in sorted({case.dtype for case in cases})}
    notes = _notes(args, device, repeat, gemm, gemm_size)

    started = time.perf_counter()
    progress = Progress(len(cases) * len(selected))
    table_file = open(args.table, "w") if args.table else None
    try:
        table = Table(cases, progress=progress, copy_to=table_file)
        table.header(notes)
        absent = {}
        rows = run_sweep(cases, selected, backends != "all", options, gemm, table=table, progress=progress,
                         absent=absent)
        for name, reason in absent.items():
            if not any(row["backend"] == name for row in rows):
                table.line(f"not in the table: {name} ({reason})")
        table.line(f"{len(rows)} rows in {time.perf_counter() - started:.0f} s" + _load_note().replace(" ·", ";", 1))
    finally:
        if table_file is not None:
            table_file.close()

    if args.json:
        write_json(rows, args.json)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        from .plot import plot_rows  # matplotlib only when asked for
        plot_rows(rows, args.plot, title=notes[0] + "\n" + table.fixed_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
