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

Time is the median of --repeat samples after warm-up (CUDA events on GPU), a sample being one call
or, for calls shorter than --min-sample-ms, the mean of as many calls back to back as last that
long. Peak memory is the
growth over the inputs during one call: the CUDA allocator's peak on GPU, the peak RSS of a
fresh process per case on CPU (--no-memory skips it). GFLOP/s counts the dense GEMM work,
2·N·M·(D+C) per forward, 2× that per backward (dv, dÂ, dq, dk), 3× for fwd+bwd; %GEMM compares it
with torch.mm timed at start. Unsupported cases and out-of-memory are rows with an error.

Every flag is checked before any work starts (a bad value, an unavailable device, a path that
cannot be written, matplotlib missing for --plot: a usage error naming the flag). Rows record
torch/triton versions, threads, CPUs, the load average and the kernel parameters; the header and
the rows warn when the load average exceeds the CPUs or a row's repeats disagree.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from nonlocal_ext.kernels import KERNELS, resolve_params
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES
from nonlocal_ext.testing import KERNEL_PARAMS

from . import measure
from .cases import BLOCK_SHAPES, DTYPES, PARAMETERS, PASSES, block_suite, sweep, uses_parameter
from .report import Progress, Table, write_csv, write_json
from .run import Options, cpu_count, load_average, load_warning, run_sweep
from .runners import all_runners

#: How to get matplotlib for --plot: it is the package's optional extra ``plot``.
PLOT_INSTALL = "pip install 'nonlocal_ext[plot]' (or pip install matplotlib)"

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
    load = load_average()
    return "" if load is None else f" · load average {load:.1f} on {cpu_count()} CPUs"


def _device(text, parser) -> str:
    """``--device`` as a device string this torch can use now, else a usage error."""
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device {text}: not a device; expected cpu or cuda[:index]")
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        parser.error(f"--device {text}: nonlocal-bench runs on cpu or cuda[:index], not {device.type}")
    if not torch.cuda.is_available():
        parser.error(f"--device {text}: this torch sees no CUDA device (torch {torch.__version__}, "
                     f"built for CUDA {torch.version.cuda}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return str(device)


def _check_counts(args, parser):
    """The integer and fraction flags."""
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive number of threads, got {args.threads}")
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat: expected at least 1, got {args.repeat}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected 0 or more, got {args.warmup}")
    if not (math.isfinite(args.min_sample_ms) and args.min_sample_ms >= 0):
        parser.error(f"--min-sample-ms: expected 0 or more milliseconds, got {args.min_sample_ms}")
    if args.gemm_size is not None and args.gemm_size < 1:
        parser.error(f"--gemm-size: expected a positive size, got {args.gemm_size}")
    if not (math.isfinite(args.spread_limit) and args.spread_limit > 0):
        parser.error(f"--spread-limit: expected a positive fraction, got {args.spread_limit}")


def _kernel_params(args, kernels, parser) -> dict:
    """The kernel-parameter flags given, each checked by the op's own rules for every kernel that takes it."""
    given = {name: getattr(args, name) for name in PARAMETERS if getattr(args, name) is not None}
    for name in given:
        if not any(uses_parameter(kernel, name) for kernel in kernels):
            takers = [kernel for kernel in KERNELS if uses_parameter(kernel, name)]
            parser.error(f"--{name} is only used by --kernel {', '.join(takers)}; the sweep has {', '.join(kernels)}")
    for kernel in kernels:
        kw = {**KERNEL_PARAMS[kernel], **{k: v for k, v in given.items() if uses_parameter(kernel, k)}}
        try:
            resolve_params(KERNELS[kernel], torch.float32, scale=kw.get("scale", 1.0), power=kw.get("power"),
                           gamma=kw.get("gamma"), eps=kw.get("eps"))
        except (TypeError, ValueError) as error:
            flag = next((f"--{k}" for k in given if str(error).startswith(k)), "kernel parameters")
            parser.error(f"{flag} with --kernel {kernel}: {error}")
    return given


def _check_writable(flag, path, parser):
    """A usage error unless ``path`` can be created or overwritten (checked before the sweep, written after)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a directory; expected a file name")
    if not os.path.isdir(directory):
        parser.error(f"{flag} {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"{flag} {path}: not writable")


def _check_plot(path, parser):
    """--plot needs matplotlib (the optional extra ``plot``) and a format it can write."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        parser.error(f"--plot needs matplotlib, which cannot be imported ({error}); install it with {PLOT_INSTALL}")
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        parser.error(f"--plot {path}: unknown image format {suffix!r}; expected a file name ending in one of "
                     f"{', '.join('.' + f for f in sorted(formats))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nonlocal-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    add("--scale", type=float, help="the kernels' scale (default: the op's, 0.5 for rbf); > 0 for rbf and log")
    add("--power", type=float, help="fractional's power (default 1.5)")
    add("--gamma", type=float, help="log's gamma (default -3: positive weights on the benchmark's inputs)")
    add("--eps", type=float, help="coincident-pair threshold of fractional and log (default: the op's, per dtype)")
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
    add("--min-sample-ms", type=float, default=20.0, metavar="MS",
        help="a timed sample of a call shorter than this is the mean of enough calls back to back to last it "
             "(default 20; 0: one call per sample)")
    add("--check", action="store_true", help="compare each output (and gradients, for passes with a backward) "
                                             "with the float64 reference before timing; a mismatch is an error row")
    add("--no-memory", action="store_true", help="skip peak memory (on CPU it costs a fresh process per case)")
    add("--threads", type=int, help="torch CPU threads, at least 1 (default: torch's own choice; 1 gives "
                                    "steadier times on a loaded machine)")
    add("--spread-limit", type=float, default=measure.SPREAD_LIMIT, metavar="FRACTION",
        help="warn on rows whose repeats disagree by more than this fraction of the median, (max−min)/median "
             f"(default {measure.SPREAD_LIMIT})")
    add("--quick", action="store_true", help="a fast smoke run: small N, fewer repeats, a smaller GEMM probe")
    add("--gemm-size", type=int, default=None, help="size of the torch.mm rate probe (default 2048; --quick 1024)")
    add("--json", metavar="FILE", help="write the rows as a JSON list")
    add("--csv", metavar="FILE", help="write the rows as CSV")
    add("--table", metavar="FILE", help="also write the printed table to FILE")
    add("--plot", metavar="FILE.png", help="plot time and peak memory against N, one panel per kernel "
                                           f"(needs matplotlib: {PLOT_INSTALL})")
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
    kernels = _choices(pick("kernel"), list(KERNELS), "kernel", parser)
    return sweep(kernels=kernels,
                 normalizes=_choices(pick("normalize"), NORMALIZATIONS, "normalize", parser),
                 updates=_choices(pick("update"), UPDATES, "update", parser),
                 ns=_ints(pick("n"), "n", parser), ms=_ints(args.m, "m", parser) if args.m else [],
                 ds=_ints(pick("d"), "d", parser), cs=_ints(pick("c"), "c", parser),
                 batches=_ints(pick("batch"), "batch", parser),
                 dtypes=_choices(pick("dtype"), list(DTYPES), "dtype", parser), device=device,
                 passes=_choices(args.passes or DEFAULTS["pass"], PASSES, "pass", parser),
                 params=_kernel_params(args, kernels, parser))


def _notes(args, device, repeat, gemm, gemm_size) -> list[str]:
    """The lines above the table: machine, GEMM rate, what the columns mean."""
    where = (f"{torch.get_num_threads()} threads" if not device.startswith("cuda")
             else torch.cuda.get_device_name(device))
    rates = ", ".join(f"{dtype} {rate:.4g} GFLOP/s" for (_, dtype), rate in gemm.items())
    timing = f"time: median of {repeat} after warm-up"
    if args.min_sample_ms > 0:
        timing += f" (a sample: the mean of as many calls as last ≥ {args.min_sample_ms:g} ms)"
    if args.check:
        timing += "; outputs checked against float64 first"
    if not args.no_memory:
        timing += ("; peak MB: growth over the inputs during one call, "
                   + ("CUDA allocator" if device.startswith("cuda") else "fresh process per case"))
    lines = [f"nonlocal-bench · torch {torch.__version__} · {device} · {where}{_load_note()}",
             f"GEMM rate (torch.mm {gemm_size}²): {rates}", timing]
    warning = load_warning(load_average(), cpu_count())
    if warning is not None:
        lines.insert(1, f"WARNING: {warning}: other processes compete for the CPUs, times will be inflated "
                        "and uneven")
    return lines


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = all_runners()
    if args.list:
        for name, runner in runners.items():
            print(f"{name:<10} {runner.kind}")
        return 0
    # every flag is checked here, before any work: a mistake costs a second, not a sweep
    _check_counts(args, parser)
    device = _device(args.device, parser)
    backends = _pick(args, "backends")
    names = _choices(backends, list(runners), "backends", parser)
    selected = {name: runner for name, runner in runners.items() if name in names}
    cases = _cases(args, parser, device)
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--table", args.table), ("--plot", args.plot)):
        if path is not None:
            _check_writable(flag, path, parser)
    if args.plot is not None:
        _check_plot(args.plot, parser)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeat = _pick(args, "repeat")
    options = Options(repeat=repeat, warmup=args.warmup, check=args.check, memory=not args.no_memory,
                      spread_limit=args.spread_limit, min_sample_seconds=args.min_sample_ms / 1e3)

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
        warned = sum(1 for row in rows if row.get("warning"))
        if warned:
            table.line(f"WARNING: {warned} of {len(rows)} rows carry a warning (load or disagreeing repeats; "
                       "see their note): their times are not to be trusted")
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
