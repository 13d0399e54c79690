"""Fit the constants of ``backend="auto"``'s CPU cost model (nonlocal_ext/backends/cost.py) to the measured suite.

    .venv/bin/python bench/calibrate.py [--write] [--check]

Reads the times ``make bench`` wrote (bench/results/cpu.json: N = M sweep; blocks.json: the nonlocal-block
suite) and fits each path's constants to that path's own rows: ``reference`` rows to the dense model,
``cpu`` rows to the fused one, ``chunked`` and ``linear`` rows to theirs. A row's measured work is its
median time × the run's float32 GEMM rate (the units of cost.py); a half row is priced with the run's
half/float32 GEMM rate ratio (``half_ratio`` of cost.py, from the rates in the run's rows), and every ``cpu``
price with the run's fused probe over the fitted one (``fused_scale``; the fit sets ``FUSED_PROBE`` to the run's
probe, so that scale is 1 on the run it fits). The fit minimizes the squared log error
of the predicted against the measured work by coordinate descent on each constant's logarithm (steps ×2,
×1.25, ×1.05, ×1.01, each while it helps), from cost.py's current values; deterministic.

Prints the constants, the error per path, and, for every measured case, the path ``auto`` picks with the
old and the new constants against the fastest measured path: how often the pick is within 5% of it.
``--write`` rewrites the block between cost.py's ``calibrate.py`` markers; ``--check`` exits 1 when the
block differs from the fit (tests/test_cost.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nonlocal_ext.backends import cost  # noqa: E402

RESULTS = [os.path.join(ROOT, "bench", "results", name) for name in ("cpu.json", "blocks.json")]
COST_FILE = os.path.join(ROOT, "nonlocal_ext", "backends", "cost.py")

#: The fitted constants, per path: (name, index or key path within it). Tuples are (forward, forward+backward).
FITTED = {
    "reference": [("DENSE_PASSES", (k, b)) for k in ("dot", "gaussian", "rbf", "fractional") for b in (0, 1)]
    + [("CACHED_PASSES", ()), ("UNCACHED_PASSES", ()), ("DENSE_CALL", (0,)), ("DENSE_CALL", (1,)),
       ("DENSE_NARROW_PENALTY", ()),
       ("HALF_DENSE_GEMM_EFFICIENCY", ()), ("HALF_DENSE_PASSES", ())],
    "cpu": [("FUSED_PASSES", (0,)), ("FUSED_PASSES", (1,)), ("FUSED_CALL", (0,)), ("FUSED_CALL", (1,)),
            ("FUSED_FORWARD_SPEED", ()), ("FUSED_BACKWARD_SPEED", ()), ("NARROW_PENALTY", ()),
            ("HALF_FUSED_GEMM_EFFICIENCY", ())],
    "chunked": [("CHUNKED_SPEED", ()), ("CHUNKED_PASSES", ()), ("CHUNKED_BLOCK", (0,)), ("CHUNKED_BLOCK", (1,))],
    "linear": [("LINEAR_SPEED", ())],
}
#: Names written between the markers, in this order (``log`` is priced as ``fractional``: not in the suite).
BLOCK = ["DENSE_PASSES", "CACHED_PASSES", "UNCACHED_PASSES", "DENSE_CALL", "FUSED_PASSES", "FUSED_CALL",
         "FUSED_FORWARD_SPEED", "FUSED_BACKWARD_SPEED", "NARROW_PENALTY", "DENSE_NARROW_PENALTY", "CHUNKED_SPEED", "CHUNKED_PASSES",
         "CHUNKED_BLOCK", "LINEAR_SPEED", "HALF_DENSE_GEMM_EFFICIENCY", "HALF_DENSE_PASSES", "HALF_FUSED_GEMM_EFFICIENCY",
         "FUSED_PROBE", "FITTED_ON"]
STEPS = (2.0, 1.25, 1.05, 1.01)


def measured_on(data: list[dict]) -> dict:
    """What a run's rows say about the machine that measured them: ``rates``, the GEMM rate of each dtype (the
    headers' ``torch.mm``; the best reading where the rows come from several files: a lower one is the machine's
    load), and ``probe``, :func:`cost.probe_of` of its fused probe case (cost.PROBE_SHAPE; None when the rows do
    not have it)."""
    rates = {}
    for r in data:
        if r.get("gemm_gflops"):
            rates[r["dtype"]] = max(rates.get(r["dtype"], 0.0), r["gemm_gflops"])
    n, d, c = cost.PROBE_SHAPE
    probe = [r["median_ms"] for r in data if r.get("median_ms") and r["backend"] == "cpu" and r["pass"] == "fwd"
             and (r["kernel"], r["normalize"], r["update"], r["dtype"], r["batch"]) == ("gaussian", "row", "aggregate",
                                                                                      "float32", 1)
             and (r["N"], r["M"], r["D"], r["C"]) == (n, n, d, c)]
    return dict(rates=rates, probe=cost.probe_of(probe[0] * 1e-3, rates["float32"]) if probe else None)


def load(paths=RESULTS) -> list[dict]:
    """The measured rows of ``paths`` (one ``make bench`` run) with a time, as cases: shape, dtype, path, pass,
    measured work (time × the run's float32 GEMM rate), the run's half/float32 GEMM rate ratio and its fused
    probe; the rates are the best readings of the files' headers (:func:`measured_on`: the sweep's first reading
    ran up to 1.2× low on a machine whose later readings agreed)."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    run = measured_on([r for data in runs for r in data])  # one machine: its best readings
    rates, probe = run["rates"], run["probe"]
    rate = rates["float32"]
    rows = []
    for data in runs:
        for r in data:
            if r.get("error") or r.get("median_ms") is None or r["device"] != "cpu" or r["update"] != "aggregate":
                continue
            rows.append(dict(backend=r["backend"], kernel=r["kernel"], normalize=r["normalize"], batch=r["batch"],
                             n=r["N"], m=r["M"], d=r["D"], c=r["C"], dtype=r["dtype"], backward=r["pass"] != "fwd",
                             ms=r["median_ms"], work=r["median_ms"] * 1e-3 * rate * 1e9,
                             half_ratio=rates.get(r["dtype"], rate) / rate, probe=probe))
    return rows


def half(row) -> str | None:
    """The half class of the row's products (``reference.half_class``): the suite's half rows are bfloat16
    dot-family kernels, measured on a CPU with half products (:data:`~nonlocal_ext.backends.cost.FITTED_ON`)."""
    return cost.FITTED_ON if row["dtype"] in ("bfloat16", "float16") and row["kernel"] in ("dot", "gaussian") else None


def args_of(row) -> tuple:
    return (row["batch"], row["n"], row["m"], row["d"], row["c"], row["kernel"], row["normalize"], False,
            row["backward"], half(row), True)


def ratio_of(row) -> float | None:
    """The run's half/float32 GEMM rate ratio for a half row (its header's rates), else None."""
    return row["half_ratio"] if half(row) else None


def scale_of(row) -> float:
    """The fused kernels' speed on the row's machine against the fitted one's (cost.fused_speed_scale): its run's
    probe over cost.FUSED_PROBE; 1 for a run without the probe case."""
    return row["probe"] / cost.FUSED_PROBE if row["probe"] else 1.0


def predicted(row) -> float | None:
    """cost.py's work for the row's path, or None where that path is not priced (over the memory budget)."""
    return cost.prices(*args_of(row), half_ratio=ratio_of(row), fused_scale=scale_of(row)).get(row["backend"])


def _error(rows) -> float:
    total = 0.0
    for row in rows:
        p = predicted(row)
        if p is not None:
            total += math.log(p / row["work"]) ** 2
    return total


def _get(name, where):
    value = getattr(cost, name)
    for key in where:
        value = value[key]
    return value


def _set(name, where, value):
    def put(container, path):
        if not path:
            return value
        if isinstance(container, dict):
            return {**container, path[0]: put(container[path[0]], path[1:])}
        items = list(container)
        items[path[0]] = put(items[path[0]], path[1:])
        return tuple(items)
    setattr(cost, name, put(getattr(cost, name), where))


def machine_class() -> str:
    """The half class of this CPU ("amx" or "avx512"; :func:`nonlocal_ext.backends.reference.half_class`)."""
    import torch
    return "amx" if torch.cpu._is_amx_tile_supported() else "avx512"


def fit(rows, machine: str) -> dict:
    """Fit cost's constants in place (module attributes) to ``rows`` measured on a CPU of half class ``machine``
    (whose per-class half constants they give); returns the rms log error per path."""
    cost.FITTED_ON = machine
    cost.FUSED_PROBE = float(f"{next((r['probe'] for r in rows if r['probe']), cost.FUSED_PROBE):.4g}")
    errors = {}
    for path, params in FITTED.items():
        params = [(name, (machine,) if isinstance(getattr(cost, name), dict) and name.startswith("HALF_") else where)
                  for name, where in params]
        own = [r for r in rows if r["backend"] == path]
        if not own:
            continue
        best = _error(own)
        for step in STEPS:
            improved = True
            while improved:
                improved = False
                for name, where in params:
                    for factor in (step, 1.0 / step):
                        old = _get(name, where)
                        _set(name, where, float(f"{old * factor:.4g}"))
                        err = _error(own)
                        if err < best - 1e-12:
                            best, improved = err, True
                        else:
                            _set(name, where, old)
        errors[path] = (best / len(own)) ** 0.5
    cost.DENSE_PASSES = {**cost.DENSE_PASSES, "log": cost.DENSE_PASSES["fractional"]}
    return errors


def picks(rows) -> list[tuple]:
    """Per measured case: (case, auto's pick today, its time, the fastest path, its time)."""
    cases, ratios = {}, {}
    for row in rows:
        if row["backend"] in cost.PATHS:
            key = args_of(row)[:10] + (row["dtype"],)
            cases.setdefault(key, {})[row["backend"]] = row["ms"]
            ratios[key] = ratio_of(row), scale_of(row)
    out = []
    for key, times in sorted(cases.items(), key=lambda item: str(item[0])):
        pick = cost.choose(*key[:10], True, half_ratio=ratios[key][0], fused_scale=ratios[key][1])
        fastest = min(times, key=times.get)
        out.append((key, pick, times.get(pick), fastest, times[fastest]))
    return out


def summary(rows, label) -> list[str]:
    result = picks(rows)
    within = [p for p in result if p[2] is not None and p[2] <= 1.05 * p[4]]
    lines = [f"{label}: auto's pick within 5% of the fastest of {'/'.join(cost.PATHS)} in {len(within)} of "
             f"{len(result)} measured cases"]
    for key, pick, t_pick, fastest, t_fast in result:
        if (key, pick, t_pick, fastest, t_fast) not in within:
            b, n, m, d, c, kernel, normalize = key[:7]
            passes = "fwd+bwd" if key[8] else "fwd"
            ratio = "not measured" if t_pick is None else f"{t_pick / t_fast:.2f}×"
            lines.append(f"  {kernel}+{normalize} {key[10]} {b}×{n}×{m} D={d} C={c} {passes}: {pick} ({ratio}) "
                         f"against {fastest} {t_fast:.3g} ms")
    return lines


def _literal(value) -> str:
    if isinstance(value, dict):
        return "{\n" + "".join(f'    "{k}": {_literal(v)},\n' for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    return f'"{value}"' if isinstance(value, str) else repr(float(value))


def block() -> str:
    """The text between cost.py's markers for the current constants."""
    return "".join(f"{name} = {_literal(getattr(cost, name))}\n" for name in BLOCK)


def current_block() -> str:
    with open(COST_FILE) as f:
        text = f.read()
    return re.search(r"# calibrate\.py: begin\n(.*?)# calibrate\.py: end\n", text, re.S).group(1)


def write_block(new: str) -> None:
    with open(COST_FILE) as f:
        text = f.read()
    head, rest = text.split("# calibrate.py: begin\n")
    _, tail = rest.split("# calibrate.py: end\n")
    with open(COST_FILE, "w") as f:
        f.write(head + "# calibrate.py: begin\n" + new + "# calibrate.py: end\n" + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite cost.py's fitted block")
    parser.add_argument("--check", action="store_true", help="exit 1 when cost.py's block is not the fit")
    parser.add_argument("--machine", choices=["amx", "avx512"], default=None,
                        help="half class of the CPU that measured the suite (default: this CPU's; with --check: "
                             "cost.FITTED_ON)")
    args = parser.parse_args(argv)
    machine = args.machine or (cost.FITTED_ON if args.check else machine_class())
    rows = load()
    before = summary(rows, "cost.py as committed")
    errors = fit(rows, machine)
    new = block()
    print(new)
    print("rms log error per path: " + ", ".join(f"{p} {e:.3f}" for p, e in errors.items()))
    print("\n".join(before))
    print("\n".join(summary(rows, "fitted")))
    if args.write:
        write_block(new)
    if args.check and new != current_block():
        print("cost.py's constants are not the fit of the measured suite: rerun with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
