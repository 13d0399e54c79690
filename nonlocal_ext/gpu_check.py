"""`make gpu-check`: on a CUDA machine, run the CUDA tests, benchmark the GPU targets and judge them.

    python -m nonlocal_ext.gpu_check [--results DIR] [--repeat N]

Steps (each a child process, its output shown as it runs):

1. ``pytest tests/test_cuda.py``: the suite on CUDA tensors (every test must pass; a skipped one fails the
   check: it checked nothing), in parallel pytest-xdist workers (:func:`test_command`);
2. ``nonlocal-bench --device cuda`` for the cases of the targets (:data:`BENCH_RUNS`);
3. ``python -m nonlocal_ext.aot --arch sm_XY --set targets --configs all`` for this GPU's own arch;

then the verdict table (target, measured, PASS/FAIL) and ``DIR/cuda-<gpu name>.{txt,json,png}``. The exit
code is 0 only when every target passed; without CUDA it stops at once with a message and exit code 2.

The targets (:func:`targets`), judged from the benchmark's JSON rows by pure functions (:func:`verdicts`,
tested on CPU with synthetic rows in tests/test_gpu_check.py):

* ``gaussian`` + ``row``, float16 and bfloat16, N = M = 4096, D = C = 64, forward and forward+backward:
  ``triton`` within 1.25× of SDPA with the flash kernel pinned (``sdpa_flash``);
* ``gaussian`` + ``row``, float16, N = M = 4096, D = C = 512 (beyond FlashAttention's head-dim limit of 256):
  time within 1.25× of the faster of SDPA's efficient and math kernels, peak memory below theirs and
  below the dense formula's; the time against the dense formula is reported (``info``, not judged: the
  work model predicts dense faster for training at this width);
* ``fractional`` + ``row``, float32 and float16, N = M = 16384, D = C = 64: ``triton`` at least 5× faster
  than ``reference``, and peak memory growth at most :data:`MEMORY_ORDER` × the inputs (an N×M matrix
  would be N / 3 ≈ 5000× them);
* the AOT report for the device's arch: every configuration the GPU autotunes over compiles, zero spills;
* the CUDA tests: all passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

#: Forward (and forward + backward) time of ``triton`` over the peer's, at most.
WITHIN = 1.25
#: ``reference`` time over ``triton``'s, at least (fractional + row, N = M = 16384).
SPEEDUP = 5.0
#: Peak memory growth of ``triton`` over its inputs' size, at most: "of the order of the inputs".
MEMORY_ORDER = 8.0

_ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

#: (name, nonlocal-bench flags) of the benchmark runs behind the targets (``--device cuda`` is added).
BENCH_RUNS = [
    ("flash", ["--kernel", "gaussian", "--normalize", "row", "--n", "4096", "--d", "64", "--c", "64",
               "--dtype", "float16,bfloat16", "--pass", "fwd,fwd+bwd", "--backends", "triton,sdpa_flash"]),
    ("wide", ["--kernel", "gaussian", "--normalize", "row", "--n", "4096", "--d", "512", "--c", "512",
              "--dtype", "float16", "--pass", "fwd,fwd+bwd", "--backends", "triton,sdpa_efficient,sdpa_math,dense"]),
    ("fractional", ["--kernel", "fractional", "--normalize", "row", "--n", "16384", "--d", "64", "--c", "64",
                    "--dtype", "float32,float16", "--pass", "fwd,fwd+bwd", "--backends", "triton,reference"]),
]


@dataclass(frozen=True)
class Target:
    """One judged quantity of one benchmark case.

    ``kind``: ``within`` (ours ≤ limit × the fastest peer), ``speedup`` (the fastest peer ≥ limit × ours),
    ``memory_below`` (our peak below every peer's), ``memory_order`` (our peak ≤ limit × the inputs) or
    ``info`` (the time ratio, reported and not judged). ``case``: the row fields that identify the case.
    """

    name: str
    kind: str
    case: dict = field(default_factory=dict)
    ours: str = "triton"
    peers: tuple = ()
    limit: float = 0.0


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: information, not judged

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "info"}[self.passed]


def _case(kernel, dtype, n, d, pass_):
    return {"kernel": kernel, "normalize": "row", "update": "aggregate", "N": n, "M": n, "D": d, "C": d,
            "batch": 1, "dtype": dtype, "pass": pass_}


def _label(case) -> str:
    return (f"{case['kernel']}+{case['normalize']} {case['dtype']} N=M={case['N']} D=C={case['D']} "
            f"{case['pass']}")


def targets() -> list[Target]:
    """The GPU targets of the module docstring, in table order."""
    out = []
    for dtype in ("float16", "bfloat16"):
        for pass_ in ("fwd", "fwd+bwd"):
            case = _case("gaussian", dtype, 4096, 64, pass_)
            out.append(Target(f"{_label(case)}: time ≤ {WITHIN}× sdpa_flash", "within", case,
                              peers=("sdpa_flash",), limit=WITHIN))
    for pass_ in ("fwd", "fwd+bwd"):
        case = _case("gaussian", "float16", 4096, 512, pass_)
        label = _label(case)
        out.append(Target(f"{label}: time ≤ {WITHIN}× sdpa efficient/math", "within", case,
                          peers=("sdpa_efficient", "sdpa_math"), limit=WITHIN))
        out.append(Target(f"{label}: peak memory below sdpa efficient/math and dense", "memory_below", case,
                          peers=("sdpa_efficient", "sdpa_math", "dense")))
        out.append(Target(f"{label}: time vs dense", "info", case, peers=("dense",)))
    for dtype in ("float32", "float16"):
        for pass_ in ("fwd", "fwd+bwd"):
            case = _case("fractional", dtype, 16384, 64, pass_)
            label = _label(case)
            out.append(Target(f"{label}: ≥ {SPEEDUP:g}× faster than reference", "speedup", case,
                              peers=("reference",), limit=SPEEDUP))
            out.append(Target(f"{label}: peak memory ≤ {MEMORY_ORDER:g}× inputs", "memory_order", case,
                              limit=MEMORY_ORDER))
    return out


def find_row(rows, backend: str, case: dict) -> dict | None:
    """The first row of ``backend`` whose fields match ``case``."""
    for row in rows:
        if row.get("backend") == backend and all(row.get(k) == v for k, v in case.items()):
            return row
    return None


def input_bytes(case: dict) -> float:
    """Bytes of query, key and value of a case (the ``memory_order`` unit)."""
    n, m, d, c = case["N"], case.get("M", case["N"]), case["D"], case["C"]
    return float((n * d + m * d + m * c) * case.get("batch", 1) * _ELEMENT_BYTES[case["dtype"]])


def _usable(row, key) -> str | None:
    """Why ``row`` cannot be judged on ``key`` (None: it can)."""
    if row is None:
        return "no row"
    if row.get("error"):
        return f"error: {row['error']}"[:160]
    value = row.get(key)
    if not isinstance(value, (int, float)) or value != value or value < 0:
        return f"no {key}"
    return None


def judge(target: Target, rows) -> Verdict:
    """The verdict of one target on the benchmark rows."""
    ours = find_row(rows, target.ours, target.case)
    key = "peak_mem_mb" if target.kind.startswith("memory") else "median_ms"
    problem = _usable(ours, key)
    if problem is not None:
        return Verdict(target.name, f"{target.ours}: {problem}", None if target.kind == "info" else False)
    mine = ours[key]
    if target.kind == "memory_order":
        ratio = mine * 2**20 / input_bytes(target.case)
        return Verdict(target.name, f"peak {mine:.1f} MB = {ratio:.2f}× inputs", ratio <= target.limit)
    peers = {name: find_row(rows, name, target.case) for name in target.peers}
    measured = {name: row[key] for name, row in peers.items() if _usable(row, key) is None}
    missing = "; ".join(f"{name}: {_usable(row, key)}" for name, row in peers.items() if name not in measured)
    if not measured:
        return Verdict(target.name, f"no peer measured ({missing})", None if target.kind == "info" else False)
    best = min(measured, key=measured.get)
    note = f" ({missing})" if missing else ""
    if target.kind == "memory_below":  # best: the peer with the smallest peak
        return Verdict(target.name, f"peak {mine:.1f} MB vs {best} {measured[best]:.1f} MB{note}",
                       mine < measured[best])
    peer = measured[best]
    if target.kind == "speedup":
        speedup = peer / mine if mine > 0 else float("inf")
        return Verdict(target.name, f"{speedup:.2f}× ({mine:.3g} ms vs {best} {peer:.3g} ms){note}",
                       speedup >= target.limit)
    ratio = mine / peer if peer > 0 else float("inf")
    text = f"{ratio:.2f}× {best} ({mine:.3g} ms vs {peer:.3g} ms){note}"
    if target.kind == "info":
        return Verdict(target.name, text, None)
    if target.kind != "within":
        raise ValueError(f"target.kind: unknown {target.kind!r}")
    return Verdict(target.name, text, ratio <= target.limit)


def judge_aot(aot_rows, arch: str) -> Verdict:
    """Every compilation of the AOT report for ``arch`` succeeded with zero spill bytes."""
    name = f"python -m nonlocal_ext.aot --arch {arch} --set targets --configs all: zero spills"
    rows = [r for r in aot_rows or [] if r.get("arch") == arch]
    if not rows:
        return Verdict(name, "no compilation reported", False)
    errors = [r for r in rows if "error" in r]
    spilled = [r for r in rows if "error" not in r and r.get("spill_bytes", 0)]
    measured = (f"{len(rows)} compilations, {len(errors)} errors, {len(spilled)} with spills"
                + (f" (max {max(r['spill_bytes'] for r in spilled)} bytes)" if spilled else ""))
    return Verdict(name, measured, not errors and not spilled)


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


#: At most this many pytest-xdist workers share the GPU for the CUDA tests.
MAX_TEST_WORKERS = 8


def test_command(cpus: int | None = None) -> list[str]:
    """The CUDA tests' command line. With pytest-xdist (requirements-dev.txt), one worker per CPU core up to
    :data:`MAX_TEST_WORKERS`: the first run's time is mostly Triton compiling kernels on the CPU, one at a
    time per process, so workers divide it (they share Triton's on-disk cache)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if importlib.util.find_spec("xdist") is not None and cpus > 1:
        command += ["-n", str(min(cpus, MAX_TEST_WORKERS))]
    return command + ["tests/test_cuda.py"]


def pytest_counts(output: str) -> dict:
    """``{"passed": n, "failed": n, "skipped": n, "error": n, ...}`` from pytest's closing line."""
    lines = [line for line in output.splitlines() if _COUNT.search(line) and " in " in line]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    if lines:
        for number, what in _COUNT.findall(lines[-1]):
            counts["error" if what.startswith("error") else what] = int(number)
    return counts


def judge_tests(returncode: int, output: str) -> Verdict:
    """The CUDA tests passed: exit code 0, at least one test passed, none failed or skipped."""
    counts = pytest_counts(output)
    measured = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "no test ran"
    passed = returncode == 0 and counts["passed"] > 0 and not (counts["failed"] or counts["error"]
                                                               or counts["skipped"])
    return Verdict("pytest tests/test_cuda.py: every test passes on this GPU", measured, passed)


def verdicts(rows, aot_rows=None, arch=None, tests=None) -> list[Verdict]:
    """Every verdict: the CUDA tests (``tests`` = (returncode, output), when run), the benchmark targets, the
    AOT report (when ``arch`` is given)."""
    if not isinstance(rows, list):
        raise TypeError(f"rows: expected a list of benchmark rows (dicts), got {type(rows).__name__}")
    if not all(isinstance(row, dict) for row in rows):
        raise TypeError("rows: every benchmark row must be a dict")
    out = [] if tests is None else [judge_tests(*tests)]
    out += [judge(target, rows) for target in targets()]
    if arch is not None:
        out.append(judge_aot(aot_rows, arch))
    return out


def table(results) -> str:
    """The verdict table: target, measured, PASS/FAIL/info, and a closing count."""
    width = max([len("target")] + [len(v.target) for v in results])
    measured = max([len("measured")] + [len(v.measured) for v in results])
    lines = [f"{'target':<{width}}  {'measured':<{measured}}  verdict", "-" * (width + measured + 11)]
    lines += [f"{v.target:<{width}}  {v.measured:<{measured}}  {v.status}" for v in results]
    judged = [v for v in results if v.passed is not None]
    failed = sum(1 for v in judged if not v.passed)
    lines.append(f"{len(judged) - failed} of {len(judged)} targets passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def exit_code(results) -> int:
    """0 when at least one target was judged and every judged target passed, else 1."""
    judged = [v for v in results if v.passed is not None]
    return 0 if judged and all(v.passed for v in judged) else 1


def gpu_slug(name: str) -> str:
    """A file-name form of a GPU name: ``NVIDIA A100-SXM4-80GB`` → ``nvidia-a100-sxm4-80gb``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected the GPU name as a string, got {type(name).__name__}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"name: {name!r} has no letters or digits to name the result files with")
    return slug


def plot(results, path: str, title: str) -> None:
    """One bar per judged ratio target: measured / limit (≤ 1 passes), green or red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(11, 0.35 * len(results) + 1.5))
    names = [v.target for v in results]
    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    axis.barh(range(len(results)), [1] * len(results), color=[colors[v.passed] for v in results])
    for i, v in enumerate(results):
        axis.text(0.02, i, f"{v.status}  {v.measured}"[:110], va="center", fontsize=7, color="white")
    axis.set_yticks(range(len(results)), names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xticks([])
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------- running it

NO_CUDA = ("make gpu-check needs a CUDA GPU, and torch sees none here (torch {torch}, built for CUDA {cuda}). "
           "Nothing was checked. Without a GPU: `make test` runs the kernels under the Triton interpreter and "
           "compiles them for sm_80/sm_90 (docs/gpu.md).")


def _run(command, log, cwd):
    """Run ``command``, echoing and collecting its output; returns (returncode, output)."""
    print("$ " + " ".join(command), flush=True)
    log.append("$ " + " ".join(command))
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        lines.append(line)
    process.wait()
    output = "".join(lines)
    log.append(output)
    return process.returncode, output


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(prog="python -m nonlocal_ext.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(root, "bench", "results"),
                        help="directory of cuda-<gpu name>.{txt,json,png} (default bench/results)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per benchmark case (default 5)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat: expected at least 1, got {args.repeat}")
    if not os.path.isdir(args.results):
        parser.error(f"--results {args.results}: not a directory")

    import torch
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    base = os.path.join(args.results, f"cuda-{gpu_slug(name)}")
    started = time.perf_counter()
    log = [f"gpu-check on {name} ({arch}), torch {torch.__version__}, CUDA {torch.version.cuda}"]
    steps = {}

    t0 = time.perf_counter()
    tests = _run(test_command(), log, root)
    steps["tests_s"] = time.perf_counter() - t0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for run_name, flags in BENCH_RUNS:
            path = os.path.join(tmp, f"{run_name}.json")
            _run([sys.executable, "-m", "nonlocal_ext.benchmark", "--device", "cuda", "--repeat", str(args.repeat),
                  *flags, "--json", path], log, root)
            if os.path.exists(path):
                with open(path) as f:
                    rows += json.load(f)
        steps["bench_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        aot_path = os.path.join(tmp, "aot.json")
        _run([sys.executable, "-m", "nonlocal_ext.aot", "--arch", arch, "--set", "targets", "--configs", "all",
              "--json", aot_path], log, root)
        aot_rows = json.load(open(aot_path)) if os.path.exists(aot_path) else []
        steps["aot_s"] = time.perf_counter() - t0

    results = verdicts(rows, aot_rows, arch, tests)
    steps["total_s"] = time.perf_counter() - started
    text = table(results)
    print("\n" + text)
    header = f"{log[0]}; {steps['total_s']:.0f} s (tests {steps['tests_s']:.0f}, bench {steps['bench_s']:.0f}, " \
             f"aot {steps['aot_s']:.0f})"
    with open(base + ".txt", "w") as f:
        f.write(header + "\n\n" + text + "\n\n" + "\n".join(log[1:]))
    with open(base + ".json", "w") as f:
        json.dump({"gpu": name, "arch": arch, "torch": torch.__version__, "cuda": torch.version.cuda,
                   "seconds": steps, "verdicts": [dict(asdict(v), status=v.status) for v in results],
                   "rows": rows, "aot": aot_rows}, f, indent=1)
    try:
        plot(results, base + ".png", header)
    except ImportError as error:  # matplotlib is the optional extra `plot`
        print(f"no plot ({error})", file=sys.stderr)
    print(f"wrote {base}.txt, .json, .png")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
