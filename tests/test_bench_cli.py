"""The benchmark CLI (`nonlocal-bench`) on tiny sweeps: outputs, error rows, `--check`, flags checked
before any work, and what the rows record (versions, threads, load, kernel parameters, warnings).

Run alone: .venv/bin/python -m pytest -q tests/test_bench_cli.py
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import sys
import time

import pytest
import torch

from nonlocal_ext.benchmark import cli, runners
from nonlocal_ext.benchmark.report import ROW_KEYS
from nonlocal_ext.spec import UPDATES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--d", "4", "--c", "3", "--repeat", "1", "--warmup", "0", "--gemm-size", "64"]


def bench(tmp_path, *args):
    """Run the CLI in this process; return its JSON rows."""
    path = tmp_path / "rows.json"
    assert cli.main(TINY + list(args) + ["--json", str(path)]) == 0
    return json.loads(path.read_text())


def reference_fn(case):
    return runners.our_runners()["reference"].build(case)


def test_tiny_sweep_writes_json_csv_and_png(tmp_path, capsys):
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "16,32", "--pass", "fwd", "--backends", "reference,sdpa",
                 "--no-memory", "--csv", str(tmp_path / "rows.csv"), "--plot", str(tmp_path / "plot.png"))
    assert [(r["backend"], r["N"]) for r in rows] == [("reference", 16), ("sdpa", 16), ("reference", 32), ("sdpa", 32)]
    for row in rows:
        assert list(row)[: len(ROW_KEYS)] == list(ROW_KEYS)
        assert row["error"] is None, row["error"]
        assert row["median_ms"] > 0 and row["gflops"] > 0
        assert row["peak_mem_mb"] is None  # --no-memory
        assert (row["kernel"], row["normalize"], row["update"], row["M"], row["D"], row["C"], row["batch"],
                row["dtype"], row["device"], row["pass"]) == ("gaussian", "row", "aggregate", row["N"], 4, 3, 1,
                                                             "float32", "cpu", "fwd")
        assert row["flops"] == 2 * row["N"] * row["M"] * (4 + 3)
    with open(tmp_path / "rows.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["backend"] for r in table] == [r["backend"] for r in rows]
    assert list(table[0])[: len(ROW_KEYS)] == list(ROW_KEYS) and table[0]["error"] == ""
    assert float(table[1]["median_ms"]) == pytest.approx(rows[1]["median_ms"])
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    out = capsys.readouterr().out
    assert "backend" in out and "sdpa" in out and "GFLOP/s" in out


def test_cpu_peak_memory_comes_from_a_fresh_process(tmp_path):
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "300", "--pass", "fwd+bwd", "--backends", "reference")
    # the dense reference keeps a few N×M float32 matrices for the backward: well above 300²·4 B = 0.34 MB
    assert rows[0]["error"] is None and rows[0]["peak_mem_mb"] > 0.34


def test_unsupported_case_is_an_error_row_when_named_and_absent_otherwise(tmp_path):
    rows = bench(tmp_path, "--kernel", "fractional", "--n", "8", "--pass", "fwd", "--no-memory",
                 "--backends", "chunked,linear,sdpa")
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["chunked"]["error"] is None
    for name in ("linear", "sdpa"):
        assert by_backend[name]["error"].startswith("unsupported: ")
        assert by_backend[name]["median_ms"] is None and by_backend[name]["gflops"] is None
    rows = bench(tmp_path, "--kernel", "fractional", "--n", "8", "--pass", "fwd", "--no-memory")
    present = {r["backend"] for r in rows}
    assert {"reference", "chunked"} <= present and not {"linear", "sdpa"} & present  # cannot express it: absent
    assert all(r["error"] is None for r in rows)


def test_out_of_memory_and_failures_are_error_rows(tmp_path, monkeypatch):
    def out_of_memory(case):
        def fn(q, k, v, u):
            raise MemoryError("cannot allocate")
        return fn
    monkeypatch.setitem(runners.PEERS, "hungry", runners.Runner("hungry", "peer", lambda case, inputs: None,
                                                                out_of_memory))
    # the dense reference at N = M = 2·10⁶ would need terabytes: refused before it allocates
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--no-memory",
                 "--backends", "hungry")
    assert rows[0]["error"].startswith("out of memory")
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "2000000", "--d", "1", "--c", "1", "--pass", "fwd",
                 "--no-memory", "--backends", "reference")
    assert rows[0]["error"].startswith("not run: its N×M temporaries need")


def test_check_catches_a_wrong_output_and_a_wrong_gradient(tmp_path, monkeypatch):
    def wrong_output(case):
        reference = reference_fn(case)
        return lambda q, k, v, u: 1.001 * reference(q, k, v, u)

    def wrong_gradient(case):
        reference = reference_fn(case)

        def fn(q, k, v, u):
            out = reference(q, k, v, u)
            return out + 0.01 * (out - out.detach())  # the right value, gradients 1% too large
        return fn

    for name, build in (("wrong_out", wrong_output), ("wrong_grad", wrong_gradient)):
        monkeypatch.setitem(runners.PEERS, name, runners.Runner(name, "peer", lambda case, inputs: None, build))
    rows = bench(tmp_path, "--kernel", "rbf", "--n", "24", "--m", "17", "--pass", "fwd,fwd+bwd", "--check",
                 "--no-memory", "--backends", "chunked,wrong_out,wrong_grad")
    result = {(r["backend"], r["pass"]): r for r in rows}
    assert result["chunked", "fwd"]["error"] is None and result["chunked", "fwd+bwd"]["error"] is None
    assert result["chunked", "fwd+bwd"]["check"] == "output and gradients"
    for pass_ in ("fwd", "fwd+bwd"):
        assert result["wrong_out", pass_]["error"].startswith("check: output differs")
        assert result["wrong_out", pass_]["median_ms"] is None
    assert result["wrong_grad", "fwd"]["error"] is None  # its forward is right
    assert result["wrong_grad", "fwd+bwd"]["error"].startswith("check: d ")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
def test_flex_log_space_scores_match_the_reference(tmp_path, monkeypatch):
    """FlexAttention's score functions (eager, on CPU) for every kernel it expresses."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(runners, "FLEX_DEVICES", ("cpu",))
    rows = bench(tmp_path, "--kernel", "gaussian,rbf,fractional,log", "--update", "all", "--n", "16", "--pass", "fwd",
                 "--check", "--no-memory", "--backends", "flex")
    assert {(r["kernel"], r["update"]) for r in rows if r["error"] is None} == {
        (k, u) for k in ("gaussian", "rbf", "fractional") for u in UPDATES}
    assert all(r["error"].startswith("unsupported") for r in rows if r["kernel"] == "log")


def test_python_dash_m_bench_lists_every_backend(monkeypatch, capsys):
    """``python -m bench`` (bench/__main__.py) runs the same CLI; run in this process to stay fast."""
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench", "--list"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bench", run_name="__main__")
    assert exit_info.value.code == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    from nonlocal_ext.backends import BACKENDS
    assert names[: len(BACKENDS)] == list(BACKENDS) and {"sdpa", "flex", "keops"} <= set(names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sweep_measures_allocator_peak(tmp_path):  # pragma: no cover - no GPU on CI
    rows = bench(tmp_path, "--device", "cuda", "--kernel", "gaussian", "--n", "64", "--pass", "fwd+bwd")
    assert all(r["error"] is None and r["peak_mem_mb"] is not None for r in rows)


def test_check_of_a_large_case_uses_its_first_rows(tmp_path, monkeypatch):
    """Above CHECK_MAX_ELEMENTS affinities: row-local normalizations are checked on the first rows
    (forward only, diffusion with u = v sliced too); others are skipped, and said so."""
    from nonlocal_ext.benchmark import measure
    monkeypatch.setattr(measure, "CHECK_MAX_ELEMENTS", 600)  # N·M = 1600
    monkeypatch.setitem(runners.PEERS, "wrong_out", runners.Runner(
        "wrong_out", "peer", lambda case, inputs: None,
        lambda case: (lambda q, k, v, u: 1.001 * reference_fn(case)(q, k, v, u))))
    rows = bench(tmp_path, "--kernel", "rbf", "--normalize", "row,sym", "--update", "all", "--n", "40", "--pass",
                 "fwd+bwd", "--check", "--no-memory", "--backends", "chunked,wrong_out")
    result = {(r["backend"], r["normalize"], r["update"]): r for r in rows}
    for update in UPDATES:
        assert result["chunked", "row", update]["check"] == "output (first 15 rows)"
        assert result["chunked", "row", update]["error"] is None
        assert result["wrong_out", "row", update]["error"].startswith("check: output differs")
        assert result["wrong_out", "sym", update]["check"].startswith("skipped")


# --- flags checked before any work -------------------------------------------------------------

def _no_work(monkeypatch):
    """Make any work (the GEMM probe, the sweep, a table file) fail the test."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr(cli.measure, "gemm_gflops", work)
    monkeypatch.setattr(cli, "run_sweep", work)


NO_CUDA = not torch.cuda.is_available()
BAD_FLAGS = [
    (["--device", "gpu"], "--device gpu: not a device; expected cpu or cuda[:index]"),
    (["--device", "mps"], "--device mps: nonlocal-bench runs on cpu or cuda[:index], not mps"),
    (["--device", "cuda" if NO_CUDA else "cuda:99"],
     "--device cuda: this torch sees no CUDA device" if NO_CUDA else "--device cuda:99: only"),
    (["--threads", "0"], "--threads: expected a positive number of threads, got 0"),
    (["--threads", "-3"], "--threads: expected a positive number of threads, got -3"),
    (["--repeat", "0"], "--repeat: expected at least 1, got 0"),
    (["--warmup", "-1"], "--warmup: expected 0 or more, got -1"),
    (["--min-sample-ms", "-1"], "--min-sample-ms: expected 0 or more milliseconds, got -1.0"),
    (["--min-sample-ms", "nan"], "--min-sample-ms: expected 0 or more milliseconds, got nan"),
    (["--gemm-size", "0"], "--gemm-size: expected a positive size"),
    (["--spread-limit", "0"], "--spread-limit: expected a positive fraction"),
    (["--spread-limit", "nan"], "--spread-limit: expected a positive fraction"),
    (["--json", "/nonexistent/dir/rows.json"], "--json /nonexistent/dir/rows.json: the directory /nonexistent/dir "
                                                "does not exist"),
    (["--csv", "/nonexistent/rows.csv"], "--csv /nonexistent/rows.csv: the directory /nonexistent does not exist"),
    (["--table", "/nonexistent/t.txt"], "--table /nonexistent/t.txt: the directory"),
    (["--plot", "/nonexistent/dir/x.png"], "--plot /nonexistent/dir/x.png: the directory /nonexistent/dir"),
    (["--json", "{tmp}"], "--json {tmp}: is a directory"),
    (["--plot", "{tmp}/figure.xyz"], "--plot {tmp}/figure.xyz: unknown image format 'xyz'"),
    (["--kernel", "rbf", "--scale", "-1"], "--scale with --kernel rbf: scale must be > 0 for kernel='rbf'"),
    (["--kernel", "gaussian,log", "--scale", "-1"], "--scale with --kernel log: scale must be > 0"),
    (["--scale", "nan"], "--scale with --kernel gaussian: scale must be finite"),
    (["--kernel", "rbf,dot", "--gamma", "1"], "--gamma is only used by --kernel log; the sweep has rbf, dot"),
    (["--kernel", "gaussian", "--power", "2"], "--power is only used by --kernel fractional"),
    (["--kernel", "gaussian", "--eps", "0.1"], "--eps is only used by --kernel fractional, log"),
    (["--kernel", "log", "--eps", "-1"], "--eps with --kernel log: eps must be finite and >= 0"),
    (["--kernel", "cosine"], "--kernel: unknown cosine"),
    (["--n", "0"], "--n: expected a comma list of positive integers"),
    (["--backends", "nope"], "--backends: unknown nope"),
    (["--pass", "both"], "--pass: unknown both"),
]


@pytest.mark.parametrize("argv,phrase", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_are_usage_errors_naming_the_flag_before_any_work(argv, phrase, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY[2:] + argv)  # TINY without its --device cpu, so that --device is the one given
    assert exit_info.value.code == 2
    assert phrase.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no output file was started


def test_plot_without_matplotlib_names_the_optional_extra(tmp_path, monkeypatch, capsys):
    """Before, --plot ran the whole sweep and then died with ModuleNotFoundError."""
    _no_work(monkeypatch)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + ["--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'nonlocal_ext[plot]'" in err


def test_threads_flag_sets_torch_threads_and_rows_record_them(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--backends", "reference",
                     "--no-memory", "--threads", "1")
    finally:
        torch.set_num_threads(before)
    assert rows[0]["threads"] == 1


# --- what the JSON rows record ----------------------------------------------------------------

def test_rows_carry_versions_load_and_kernel_parameters(tmp_path, monkeypatch):
    import nonlocal_ext
    seen = []
    real = nonlocal_ext.nonlocal_aggregate

    def spy(*args, **kwargs):
        seen.append((args[3], {k: kwargs.get(k) for k in ("scale", "power", "gamma", "eps")}))
        return real(*args, **kwargs)
    monkeypatch.setattr(nonlocal_ext, "nonlocal_aggregate", spy)
    rows = bench(tmp_path, "--kernel", "rbf,fractional,log", "--n", "8", "--pass", "fwd", "--backends", "chunked",
                 "--no-memory", "--scale", "0.25", "--gamma", "-2", "--power", "1.25")
    params = {r["kernel"]: {k: r[k] for k in ("scale", "power", "gamma", "eps")} for r in rows}
    assert params == {"rbf": dict(scale=0.25, power=None, gamma=None, eps=None),
                      "fractional": dict(scale=0.25, power=1.25, gamma=None, eps=1e-4),
                      "log": dict(scale=0.25, power=None, gamma=-2.0, eps=1e-4)}
    # the op was called with them (the flags reach the timed calls)
    called = {kernel: kw for kernel, kw in seen}
    assert called["rbf"] == dict(scale=0.25, power=None, gamma=None, eps=None)
    assert called["fractional"] == dict(scale=0.25, power=1.25, gamma=None, eps=None)
    assert called["log"] == dict(scale=0.25, power=None, gamma=-2.0, eps=None)
    for row in rows:
        assert row["torch_version"] == torch.__version__
        assert "triton_version" in row and row["threads"] == torch.get_num_threads() and row["cpus"] >= 1
        assert row["load_avg"] is None or row["load_avg"] >= 0
        assert "warning" in row
    # defaults: the benchmark's well-conditioned parameters, resolved as the op resolves them
    rows = bench(tmp_path, "--kernel", "log", "--n", "8", "--pass", "fwd", "--backends", "chunked", "--no-memory",
                 "--dtype", "float64")
    assert {k: rows[0][k] for k in ("scale", "power", "gamma", "eps")} == dict(scale=1.0, power=None, gamma=-3.0,
                                                                               eps=1e-12)


def test_kernel_parameters_reach_the_fresh_memory_process(tmp_path):
    rows = bench(tmp_path, "--kernel", "rbf", "--n", "64", "--pass", "fwd", "--backends", "reference",
                 "--scale", "0.125")
    assert rows[0]["error"] is None and rows[0]["peak_mem_mb"] is not None and rows[0]["scale"] == 0.125


def test_load_above_the_cpus_warns_in_the_header_and_the_rows(tmp_path, monkeypatch, capsys):
    from nonlocal_ext.benchmark import run
    for module in (run, cli):
        monkeypatch.setattr(module, "load_average", lambda: 99.0)
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--backends", "reference",
                 "--no-memory")
    out = capsys.readouterr().out
    header = out.split("backend")[0]
    assert "WARNING: load average 99.0 > " in header and "times will be inflated" in header
    assert rows[0]["load_avg"] == 99.0 and rows[0]["warning"].startswith("load average 99.0 > ")
    assert "WARNING: 1 of 1 rows carry a warning" in out


def test_disagreeing_repeats_warn_in_the_row(tmp_path, monkeypatch, capsys):
    """What a loaded machine did: some repeats took whole extra scheduler slices (≈ 16 ms)."""
    from nonlocal_ext.benchmark import measure, run
    for module in (run, cli):
        monkeypatch.setattr(module, "load_average", lambda: 0.0)
    monkeypatch.setattr(measure, "time_step", lambda step, device, repeat, warmup=1, min_seconds=0: [0.001, 0.017, 0.001])
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--backends", "reference",
                 "--no-memory", "--repeat", "3")
    assert rows[0]["warning"] == "repeats disagree: 1–17 ms, (max−min)/median 1600% > 25%"
    assert "warning: repeats disagree" in capsys.readouterr().out
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--backends", "reference",
                 "--no-memory", "--repeat", "3", "--spread-limit", "20")
    assert rows[0]["warning"] is None
    monkeypatch.setattr(measure, "time_step", lambda step, device, repeat, warmup=1, min_seconds=0: [0.0010, 0.0011, 0.0010])
    rows = bench(tmp_path, "--kernel", "gaussian", "--n", "8", "--pass", "fwd", "--backends", "reference",
                 "--no-memory", "--repeat", "3")
    assert rows[0]["warning"] is None


def test_a_sample_of_a_short_call_is_the_mean_of_calls_that_last_min_seconds():
    """time_step: one untimed call to size the samples, then each sample the mean of k calls back to back."""
    from nonlocal_ext.benchmark import measure
    calls = []

    def step():
        calls.append(None)
        time.sleep(0.001)
    samples = measure.time_step(step, "cpu", 3, warmup=1, min_seconds=0.05)
    per_sample = (len(calls) - 2) / 3  # after the warm-up call and the sizing call
    assert per_sample == int(per_sample) and per_sample >= 2
    assert len(samples) == 3 and all(0.001 <= s < 0.05 for s in samples)
    calls.clear()
    assert len(measure.time_step(step, "cpu", 4, warmup=0)) == 4 and len(calls) == 4  # one call per sample
