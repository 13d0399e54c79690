"""Rewrite the generated tables of README.md, docs/benchmarks.md and docs/examples.md from the results' JSON.

    .venv/bin/python bench/tables.py            # rewrite every marked section (also: make docs)
    .venv/bin/python bench/tables.py --check    # exit 1 naming the sections that differ (tests/test_docs.py)

A generated section sits between two marker lines,

    <!-- tables.py: NAME -->
    ...
    <!-- /tables.py: NAME -->

and NAME is one of :data:`TABLES`. Everything between the markers is replaced; nothing else in the
file is touched. The tables read only the JSON (bench/results/*.json, examples/results/qtips_training.json) (and the first lines of the matching ``.txt``, the
header ``nonlocal-bench`` printed) and, for the ``auto`` columns, ask ``backends.select`` what
``backend="auto"`` picks today for each measured shape, priced for the machine that measured it
(:func:`as_measured`): a change of the cost model shows up here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import re
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))  # calibrate.measured_on: what a run's rows say about its machine
DOCS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "examples.md"]

MARKER = re.compile(r"^<!-- tables\.py: (?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /tables\.py: (?P=name) -->$",
                    re.MULTILINE | re.DOTALL)

#: The sweep's runners in column order; a runner absent from a file gets no column.
SWEEP_RUNNERS = ("reference", "chunked", "cpu", "linear", "sdpa", "dense", "triton", "flex", "keops", "auto")


def load(name: str) -> list[dict]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def header_lines(name: str, count: int = 2) -> list[str]:
    """The first lines ``nonlocal-bench`` printed for this file (versions, threads, load, GEMM rate)."""
    path = RESULTS / f"{name}.txt"
    return path.read_text().splitlines()[:count] if path.exists() else []


def last_line(name: str, startswith: str) -> str | None:
    path = RESULTS / f"{name}.txt"
    lines = [line for line in path.read_text().splitlines() if line.startswith(startswith)] if path.exists() else []
    return lines[-1] if lines else None


def ms(x: float) -> str:
    """Milliseconds as ``nonlocal-bench`` prints them: 3 significant digits, one decimal from 100 on."""
    return f"{x:#.3g}" if x < 100 else f"{x:.1f}"


def mb(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def auto_pick(kernel: str, normalize: str, update: str, batch: int, n: int, m: int, d: int, c: int, dtype: str,
              passes: str) -> str:
    """What ``backend="auto"`` picks today on CPU tensors of this shape (the kernel parameters do not enter)."""
    import torch

    from nonlocal_ext import backends
    from nonlocal_ext.backends import cpu
    from nonlocal_ext.testing import KERNEL_PARAMS
    from nonlocal_ext.spec import validate

    dt = getattr(torch, dtype)
    q, k, v = torch.empty(batch, n, d, dtype=dt), torch.empty(batch, m, d, dtype=dt), torch.empty(batch, m, c, dtype=dt)
    params = {"scale": 1.0, "power": None, "gamma": None, "eps": None, **KERNEL_PARAMS[kernel]}
    spec = validate(q, k, v, kernel, normalize=normalize, update=update, symmetric=False, self_value=None,
                    backend="auto", **params)
    reason = cpu.unsupported_reason(spec, q)
    if reason is not None:
        raise RuntimeError(f"the auto columns describe a build with the fused cpu kernels: {reason}")
    return backends.select("auto", spec, q, k, v, backward=passes != "fwd").NAME


@contextlib.contextmanager
def as_measured(rows: list[dict], probe: float | None = None):
    """``auto``'s picks priced for the machine that measured ``rows``: its half/float32 GEMM rate ratio (the rates
    in the rows), its fused probe (``probe``, by default the committed run's: ``calibrate.measured_on`` of
    cpu.json and blocks.json) and the half class the constants were fitted on (``cost.FITTED_ON``), not this
    machine's, so that the tables do not depend on where they are generated."""
    from calibrate import measured_on

    from nonlocal_ext.backends import cost, reference
    rates = measured_on(rows)["rates"]
    probe = probe or measured_on(load("cpu") + load("blocks"))["probe"]
    saved = cost.half_gemm_ratio, reference.half_class, cost.fused_speed_scale
    cost.half_gemm_ratio = lambda dtype: rates[str(dtype).removeprefix("torch.")] / rates["float32"]
    reference.half_class = lambda spec, query: cost.FITTED_ON if saved[1](spec, query) else None
    cost.fused_speed_scale = lambda: probe / cost.FUSED_PROBE
    try:
        yield
    finally:
        cost.half_gemm_ratio, reference.half_class, cost.fused_speed_scale = saved


def _case(r: dict) -> tuple:
    return (r["kernel"], r["normalize"], r["update"], r["batch"], r["N"], r["M"], r["D"], r["C"], r["dtype"],
            r["pass"])


def _grouped(rows: list[dict]):
    """{case: {backend: row}} for the timed rows, in the file's order of cases."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["error"] is None:
            cases.setdefault(_case(r), {})[r["backend"]] = r
    return cases


def _runners(rows: list[dict]) -> list[str]:
    present = {r["backend"] for r in rows if r["error"] is None}
    return [b for b in SWEEP_RUNNERS if b in present]


#: The paths ``auto`` chooses among on CPU (nonlocal_ext/backends/cost.py), and how close to the fastest measured
#: of them its pick must be to count as right (issue: within 5%).
AUTO_PATHS = ("reference", "cpu", "chunked", "linear")
AUTO_SLACK = 1.05


def _auto_summary(cases, what: str) -> list[str]:
    """How often today's ``auto`` pick is within 5% of the fastest measured of the paths it chooses among."""
    agree, misses = 0, []
    for case, by in cases.items():
        measured = {b: by[b]["median_ms"] for b in AUTO_PATHS if b in by}
        pick = auto_pick(*case)
        if pick not in measured:
            continue
        fastest = min(measured, key=measured.get)
        if measured[pick] <= AUTO_SLACK * measured[fastest]:
            agree += 1
        else:
            misses.append((case, pick, fastest, measured))
    total = agree + len(misses)
    lines = [f"Of the {total} {what}, `auto`'s pick today was within 5% of the fastest measured of "
             f"{', '.join(f'`{b}`' for b in AUTO_PATHS)} in {agree} (constants fitted by `bench/calibrate.py`)."]
    if misses:
        parts = []
        for case, pick, fastest, measured in misses:
            kernel, normalize, _, batch, n, m, d, c, dtype, passes = case
            shape = f"B={batch} N={n} M={m} D={d} C={c}" if (batch, n, d, c) != (1, m, 64, 128) else f"N={n}"
            parts.append(f"{kernel}+{normalize} {dtype} {shape} {passes}: `{pick}` {ms(measured[pick])} ms against "
                         f"`{fastest}` {ms(measured[fastest])} ms ({measured[pick] / measured[fastest]:.2f}×)")
        lines.append("The others: " + "; ".join(parts) + ".")
    return lines


# ---------------------------------------------------------------------------------------- the tables


def readme_cpu() -> list[str]:
    """The default sweep of ``make bench``, one line per case: time (peak memory) per runner, auto's pick."""
    rows = load("cpu")
    with as_measured(rows):
        return _readme_cpu(rows)


def _readme_cpu(rows: list[dict]) -> list[str]:
    cases = _grouped(rows)
    runners = [b for b in _runners(rows) if b != "auto"]
    head = ["kernel", "N", "pass"] + [f"`{b}` ms (MB)" for b in runners] + ["`auto` picks"]
    body = []
    for case, by in cases.items():
        kernel, _, _, _, n, _, _, _, _, passes = case
        cells = [f"{ms(by[b]['median_ms'])} ({mb(by[b]['peak_mem_mb'])})" if b in by else "" for b in runners]
        body.append([kernel, str(n), passes] + cells + [f"`{auto_pick(*case)}`"])
    return table(head, body) + [""] + _auto_summary(cases, "cases")


def cpu_header() -> list[str]:
    done = last_line("cpu", str(len(load("cpu"))) + " rows")
    lines = header_lines("cpu") + ([done] if done else [])
    return ["```"] + lines + ["```"]


def cpu_full() -> list[str]:
    """Every row of bench/results/cpu.json, as ``nonlocal-bench`` reports it."""
    rows = load("cpu")
    head = ["kernel", "N", "pass", "backend", "ms", "peak MB", "GFLOP/s", "% GEMM", "vs ref", "check"]
    body = []
    for r in rows:
        if r["error"] is not None:
            continue
        body.append([r["kernel"], str(r["N"]), r["pass"], f"`{r['backend']}`", ms(r["median_ms"]), mb(r["peak_mem_mb"]),
                     f"{r['gflops']:.1f}", f"{r['pct_gemm']:.0f}%", f"{r['vs_reference']:.2f}×", r["check"] or ""])
    absent = sorted({r["backend"] for r in load("cpu")} - {r["backend"] for r in rows if r["error"] is None})
    tail = [f"Runners with no timed row: {', '.join(f'`{b}`' for b in absent)}."] if absent else []
    return table(head, body) + ([""] + tail if tail else [])


SHAPES = None


def _shape_name(batch, n, m, d) -> str:
    global SHAPES
    if SHAPES is None:
        from nonlocal_ext.benchmark.cases import BLOCK_SHAPES
        SHAPES = {(b, nn, mm, dc): name for name, b, nn, mm, dc in BLOCK_SHAPES}
    return SHAPES.get((batch, n, m, d), "")


def blocks() -> list[str]:
    """The block suite: time per runner per case, the ``auto`` row measured then, and auto's pick today."""
    rows = load("blocks")
    with as_measured(rows):
        return _blocks(rows)


def _blocks(rows: list[dict]) -> list[str]:
    cases = _grouped(rows)
    runners = _runners(rows)
    head = ["shape (B, N, M, D = C)", "kernel", "dtype", "pass"] + [f"`{b}` ms" for b in runners] + ["`auto` picks today"]
    body = []
    for case, by in cases.items():
        kernel, normalize, _, batch, n, m, d, _, dtype, passes = case
        shape = f"{_shape_name(batch, n, m, d)} ({batch}, {n}, {m}, {d})"
        cells = [ms(by[b]["median_ms"]) + ("†" if by[b].get("warning") else "") if b in by else "" for b in runners]
        body.append([shape, f"{kernel}+{normalize}", dtype, passes] + cells + [f"`{auto_pick(*case)}`"])
    warned = sum(1 for r in rows if r["error"] is None and r.get("warning"))
    timed = sum(1 for r in rows if r["error"] is None)
    dtypes = sorted({r["dtype"] for r in rows})
    notes = [f"† the row carries a warning (load above the CPUs or repeats disagreeing by more than 25%): "
             f"{warned} of {timed} timed rows. Runners in the file: {', '.join(f'`{b}`' for b in runners)}; "
             f"dtypes: {', '.join(dtypes)}. The `auto` column is what `auto` did when measured."]
    return ["```"] + header_lines("blocks") + ["```", ""] + table(head, body) + [""] + notes + [""] + \
        _auto_summary(cases, "block-suite cases")


def accuracy() -> list[str]:
    """bench/accuracy.py: the largest relative error over kernels, normalizations and updates (the CPU
    backends from ``accuracy_<geometry>.json``, Triton under the interpreter from ``accuracy_triton_<geometry>.json``)."""
    head = ["geometry", "offset (grid spacings)"]
    worst: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    backends = []
    for geometry in ("grid2d", "grid3d", "cloud2d", "cloud3d"):
        paths = [RESULTS / f"accuracy_{geometry}.json", RESULTS / f"accuracy_triton_{geometry}.json"]
        rows = [r for path in paths if path.exists() for r in json.loads(path.read_text())]
        for r in rows:
            key = (r["geometry"], r["offset"])
            value, grad = worst[key].get(r["backend"], (0.0, 0.0))
            worst[key][r["backend"]] = (max(value, r["value_error"]), max(grad, r["grad_error"]))
            if r["backend"] not in backends:
                backends.append(r["backend"])
    head += [f"`{b}` values / gradients" for b in backends]
    body = [[g, f"{o:g}"] + [f"{worst[g, o][b][0]:.1e} / {worst[g, o][b][1]:.1e}" if b in worst[g, o] else ""
                             for b in backends]
            for (g, o) in worst]
    return table(head, body)


AOT_FILES = {
    "aot_full": "`python -m nonlocal_ext.aot --arch sm_80,sm_90 --set full --jobs 2 --json bench/results/aot_full.json`"
                " (every shipped variant of every width class at its default configuration)",
    "aot_quick_wide": "`python -m nonlocal_ext.aot --arch sm_80,sm_90 --set quick` (the set `tests/test_aot.py` "
                      "compiles, every width class once)",
    "aot_configs": "`python -m nonlocal_ext.aot --arch sm_80,sm_90 --set heavy --configs all` and `--set targets "
                   "--configs all` (every autotune entry listed for its target)",
}


def aot() -> list[str]:
    """Resources of the compiled Triton kernels per file, target and kernel family."""
    from nonlocal_ext.aot import launchable

    head = ["file", "target", "family", "builds", "max registers", "max spill bytes", "blocks within the register file",
            "min MMA instructions", "MMA operand types"]
    body = []
    for name in AOT_FILES:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in load(name):
            groups[r["arch"], r["kernel"]].append(r)
        for (arch, family), rs in sorted(groups.items()):
            types = sorted({t for r in rs for t in (r.get("mma_operand_types") or [])})
            body.append([f"`{name}.json`", arch, family, str(len(rs)), str(max(r["registers"] for r in rs)),
                         str(max(r["spill_bytes"] for r in rs)), f"{sum(launchable(r) for r in rs)} of {len(rs)}",
                         str(min(r["mma_instructions"] for r in rs)),
                         ", ".join(types) or "-"])
    commands = [f"- `{name}.json`: {command}" for name, command in AOT_FILES.items()]
    return commands + [""] + table(head, body)


def qtips() -> list[str]:
    """examples/train_qtips.py: per network over its seeds, the epochs to 50% / 90% training accuracy, the
    final accuracies and the share of time in the nonlocal blocks; the command, wall time and verdict."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from train_qtips import LABELS, table as qtips_table

    run = json.loads((ROOT / "examples" / "results" / "qtips_training.json").read_text())
    head, *rows = qtips_table(run["summary"])
    body = [[LABELS.get(r[0], r[0]), *r[1:]] for r in rows]
    config = ", ".join(f"{k}={v}" for k, v in run["config"].items())
    return [f"`{run['command'].strip()}` (torch {run['torch']}, {run['threads']} thread, {run['seeds']} seeds; "
            f"wall time {run['wall_seconds'] / 60:.0f} min for all {len(run['runs'])} runs); configuration: "
            f"{config}.", "", *table(head, body), "", f"Verdict (rule in `examples/train_qtips.py`): {run['verdict']}."]


def layers() -> list[str]:
    """bench/bench_layers.py: a training step of the converted layer against the original block, per shape."""
    run = json.loads((RESULTS / "layers.json").read_text())
    head = ["block", "shape", "B×C×spatial", "original ms", "converted ms", "speed-up", "original MB", "converted MB"]
    body = []
    for r in run["rows"]:
        if r.get("original_s") is None:
            continue
        size = f"{r['batch']}×{r['channels']}×" + "×".join(map(str, r["spatial"])) + (" pooled" if r["sub_sample"] else "")
        body.append([r["block"], r["shape"], size, f"{1e3 * r['original_s']:.1f}", f"{1e3 * r['converted_s']:.1f}",
                     f"{r['speedup']:.2f}×", f"{r['original_peak_mb']:.1f}", f"{r['converted_peak_mb']:.1f}"])
    return [f"`.venv/bin/python bench/bench_layers.py --json bench/results/layers.json` (torch {run['torch']}, "
            f"{run['threads']} threads; fastest of 5 steps, the two layers taking turns; peak RSS growth of the step "
            f"after a warm-up step in a fresh process, glibc returning freed blocks at once):", ""] + table(head, body)


def gpu_suite() -> list[str]:
    """The work model's predictions for the nonlocal-block suite on an H100 (bench/perf_model.py): fused,
    dense and SDPA forward + backward times and what ``auto`` takes on CUDA (predictions, not measurements)."""
    from nonlocal_ext.backends import cuda_choice
    from nonlocal_ext.triton_kernels import work_model

    budget = cuda_choice.DENSE_BUDGET_FRACTION * 80e9
    head = ["shape (B, N, M, D = C)", "executed / needed fwd, bwd (as issued by the warps)",
            "`gaussian` + `row`, fp16: fused / dense / SDPA → auto", "`fractional` + `count`, fp16: fused / dense → auto"]
    body = []
    gaussian = work_model.suite_calls("gaussian", "row", "fp16")
    fractional = work_model.suite_calls("fractional", "count", "fp16")
    for name, call in gaussian.items():
        works = [work_model.fused_work(call, p) for p in ("forward", "backward")]
        ratios = ", ".join(f"{w['ratio']:.2f}" for w in works) + " (" + ", ".join(f"{w['issued_ratio']:.2f}" for w in works) + ")"
        cells = []
        for c, with_sdpa in ((call, True), (fractional[name], False)):
            t = work_model.predictions(c, training=True)
            times = [t["fused"], t["dense"]] + ([t["sdpa"]] if with_sdpa else [])
            shown = " / ".join("n/a" if x is None else f"{x * 1e6:.0f}" for x in times)
            cells.append(f"{shown} → {cuda_choice.choose(c, True, budget)}")
        body.append([f"{name} ({call.batch}, {call.n}, {call.m}, {call.d})", ratios, *cells])
    return [f"`.venv/bin/python bench/perf_model.py` (predicted H100 µs, forward + backward; dense budget "
            f"{budget / 1e9:.0f} GB, a quarter of 80 GB):", ""] + table(head, body)


TABLES = {
    "readme-cpu": readme_cpu,
    "cpu-header": cpu_header,
    "cpu-full": cpu_full,
    "blocks": blocks,
    "accuracy": accuracy,
    "aot": aot,
    "qtips": qtips,
    "layers": layers,
    "gpu-suite": gpu_suite,
}


# ---------------------------------------------------------------------------------------- rewriting


def render(text: str, tables=None) -> str:
    """``text`` with every marked section regenerated (``tables``: name -> lines, computed on demand)."""
    cache = {} if tables is None else dict(tables)

    def body(match):
        name = match["name"]
        if name not in TABLES and name not in cache:
            raise KeyError(f"unknown generated section {name!r}; known: {', '.join(TABLES)}")
        if name not in cache:
            cache[name] = TABLES[name]()
        return f"<!-- tables.py: {name} -->\n" + "\n".join(cache[name]) + f"\n<!-- /tables.py: {name} -->"

    return MARKER.sub(body, text)


def stale_sections(paths=DOCS) -> list[str]:
    """``file: section`` for every generated section that differs from what the JSON gives."""
    stale = []
    for path in paths:
        text = path.read_text()
        fresh = render(text)
        old = {m["name"]: m["body"] for m in MARKER.finditer(text)}
        new = {m["name"]: m["body"] for m in MARKER.finditer(fresh)}
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in old if old[name] != new[name]]
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale sections instead of rewriting them")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_sections()
        for s in stale:
            print(f"stale: {s} (run .venv/bin/python bench/tables.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in DOCS:
        text = path.read_text()
        fresh = render(text)
        if fresh != text:
            path.write_text(fresh)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
