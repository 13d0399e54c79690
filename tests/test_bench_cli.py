"""The benchmark CLI (`nonlocal-bench`) on tiny sweeps: outputs, error rows, and `--check`."""

from __future__ import annotations

import csv
import json
import os
import runpy
import sys

import pytest
import torch

from nonlocal_ext.benchmark import cli, runners
from nonlocal_ext.benchmark.report import ROW_KEYS

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
        (k, u) for k in ("gaussian", "rbf", "fractional") for u in ("aggregate", "diffusion")}
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


def test_bad_flags_are_usage_errors(capsys):
    for argv in (["--kernel", "cosine"], ["--n", "0"], ["--backends", "nope"], ["--pass", "both"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "--kernel: unknown cosine" in capsys.readouterr().err


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
    for update in ("aggregate", "diffusion"):
        assert result["chunked", "row", update]["check"] == "output (first 15 rows)"
        assert result["chunked", "row", update]["error"] is None
        assert result["wrong_out", "row", update]["error"].startswith("check: output differs")
        assert result["wrong_out", "sym", update]["check"].startswith("skipped")
