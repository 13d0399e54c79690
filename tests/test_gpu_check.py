"""`make gpu-check`'s verdict logic on CPU, with synthetic benchmark rows (nonlocal_ext/gpu_check.py), and its
refusal without CUDA.

Run alone: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from nonlocal_ext import gpu_check
from nonlocal_ext.benchmark import cli, runners
from nonlocal_ext.benchmark.cases import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(backend, case, ms=1.0, mb=10.0, error=None):
    return {"backend": backend, **case, "device": "cuda", "median_ms": None if error else ms,
            "peak_mem_mb": None if error else mb, "gflops": None, "error": error}


def passing_rows():
    """Rows on which every target passes: triton 1.1× flash, 0.9× sdpa efficient, 6× faster than reference."""
    rows = []
    for target in gpu_check.targets():
        case = target.case
        if any(r["backend"] == "triton" and all(r[k] == v for k, v in case.items()) for r in rows):
            continue
        inputs_mb = gpu_check.input_bytes(case) / 2**20
        rows.append(row("triton", case, ms=1.0, mb=2.0 * inputs_mb))
        if case["kernel"] == "gaussian" and case["D"] == 64:
            rows.append(row("sdpa_flash", case, ms=1.0 / 1.1))
        elif case["kernel"] == "gaussian":
            rows += [row("sdpa_efficient", case, ms=1.1, mb=3.0 * inputs_mb),
                     row("sdpa_math", case, ms=4.0, mb=500.0), row("dense", case, ms=0.5, mb=400.0)]
        else:
            rows.append(row("reference", case, ms=6.0, mb=1000.0))
    return rows


def _matches(case, kernel=None, dtype=None, d=None, pass_=None):
    wanted = {"kernel": kernel, "dtype": dtype, "D": d, "pass": pass_}
    return all(v is None or case[k] == v for k, v in wanted.items())


def by_name(results, kind, **case):
    """The verdict of the one target of ``kind`` whose case matches (verdicts come in targets() order)."""
    found = [v for t, v in zip(gpu_check.targets(), results) if t.kind == kind and _matches(t.case, **case)]
    assert len(found) == 1, [v.target for v in found]
    return found[0]


def replace(rows, backend, changes, **case):
    """Rows with ``changes`` in the rows of ``backend`` whose case matches."""
    return [{**r, **changes} if r["backend"] == backend and _matches(r, **case) else r for r in rows]


def test_every_target_passes_on_good_rows():
    results = gpu_check.verdicts(passing_rows())
    assert len(results) == len(gpu_check.targets()) == 4 + 6 + 8
    assert {v.status for v in results} == {"PASS", "info"}
    assert [v.status for v in results].count("info") == 2  # time vs dense at D = C = 512
    assert gpu_check.exit_code(results) == 0
    text = gpu_check.table(results)
    assert text.splitlines()[-1] == "16 of 16 targets passed"
    flash = by_name(results, "within", dtype="float16", d=64, pass_="fwd")
    assert flash.passed and flash.measured.startswith("1.10× sdpa_flash")


def test_a_slow_target_fails_and_sets_the_exit_code():
    rows = replace(passing_rows(), "triton", {"median_ms": 1.4}, dtype="bfloat16", d=64, pass_="fwd+bwd")
    results = gpu_check.verdicts(rows)
    slow = by_name(results, "within", dtype="bfloat16", d=64, pass_="fwd+bwd")
    assert slow.passed is False and slow.measured.startswith("1.54× sdpa_flash")
    assert [v for v in results if v.passed is False] == [slow]
    assert gpu_check.exit_code(results) == 1
    text = gpu_check.table(results)
    assert "FAIL" in [line.split()[-1] for line in text.splitlines()]
    assert text.splitlines()[-1] == "15 of 16 targets passed, 1 FAILED"


def test_the_limits_are_inclusive_and_exact():
    rows = replace(passing_rows(), "sdpa_flash", {"median_ms": 0.8}, dtype="float16", pass_="fwd")  # 1.25× exactly
    assert by_name(gpu_check.verdicts(rows), "within", dtype="float16", d=64, pass_="fwd").passed
    rows = replace(passing_rows(), "sdpa_flash", {"median_ms": 0.79}, dtype="float16", pass_="fwd")
    assert not by_name(gpu_check.verdicts(rows), "within", dtype="float16", d=64, pass_="fwd").passed


def test_fractional_speedup_and_memory_order():
    rows = replace(passing_rows(), "reference", {"median_ms": 4.9}, dtype="float32", pass_="fwd")
    results = gpu_check.verdicts(rows)
    speed = by_name(results, "speedup", dtype="float32", pass_="fwd")
    assert speed.passed is False and speed.measured.startswith("4.90×")
    case = gpu_check._case("fractional", "float16", 16384, 64, "fwd+bwd")
    inputs_mb = gpu_check.input_bytes(case) / 2**20
    assert inputs_mb == pytest.approx(3 * 16384 * 64 * 2 / 2**20)
    for factor, passed in ((8.0, True), (8.5, False)):
        rows = replace(passing_rows(), "triton", {"peak_mem_mb": factor * inputs_mb}, kernel="fractional", dtype="float16",
                       pass_="fwd+bwd")
        memory = by_name(gpu_check.verdicts(rows), "memory_order", dtype="float16", pass_="fwd+bwd")
        assert memory.passed is passed and f"{factor:.2f}× inputs" in memory.measured


def test_wide_heads_memory_below_every_peer_and_fastest_peer():
    rows = replace(passing_rows(), "triton", {"peak_mem_mb": 500.0}, d=512, pass_="fwd")  # sdpa_efficient has 3× inputs
    memory = by_name(gpu_check.verdicts(rows), "memory_below", pass_="fwd")
    assert memory.passed is False and "sdpa_efficient" in memory.measured
    # the time target takes the faster of efficient and math
    rows = replace(passing_rows(), "sdpa_efficient", {"median_ms": 10.0}, d=512, pass_="fwd+bwd")
    rows = replace(rows, "sdpa_math", {"median_ms": 0.5}, d=512, pass_="fwd+bwd")
    timed = by_name(gpu_check.verdicts(rows), "within", d=512, pass_="fwd+bwd")
    assert timed.passed is False and timed.measured.startswith("2.00× sdpa_math (1 ms vs 0.5 ms)")


def test_a_missing_or_failed_row_fails_its_target():
    rows = [r for r in passing_rows() if not (r["backend"] == "triton" and r["kernel"] == "fractional"
                                              and r["dtype"] == "float32" and r["pass"] == "fwd")]
    results = gpu_check.verdicts(rows)
    missing = [v for t, v in zip(gpu_check.targets(), results)
               if _matches(t.case, kernel="fractional", dtype="float32", pass_="fwd")]
    assert len(missing) == 2 and all(v.passed is False and v.measured == "triton: no row" for v in missing)
    rows = replace(passing_rows(), "triton", {"error": "out of memory: boom", "median_ms": None}, dtype="float16", d=64,
                   pass_="fwd")
    broken = by_name(gpu_check.verdicts(rows), "within", dtype="float16", d=64, pass_="fwd")
    assert broken.passed is False and "out of memory" in broken.measured


def test_peers_that_failed():
    rows = replace(passing_rows(), "sdpa_flash", {"error": "RuntimeError: No available kernel"}, dtype="float16",
                   pass_="fwd")
    flash = by_name(gpu_check.verdicts(rows), "within", dtype="float16", d=64, pass_="fwd")
    assert flash.passed is False and flash.measured.startswith("no peer measured") and "No available" in flash.measured
    rows = replace(passing_rows(), "sdpa_math", {"error": "out of memory: x"}, d=512, pass_="fwd")
    one_left = by_name(gpu_check.verdicts(rows), "within", d=512, pass_="fwd")
    assert one_left.passed and "sdpa_math: error: out of memory" in one_left.measured


def test_info_rows_are_not_judged():
    rows = replace(passing_rows(), "dense", {"median_ms": 0.01}, d=512)
    results = gpu_check.verdicts(rows)
    assert all(v.passed is None for v in results if "vs dense" in v.target)
    assert gpu_check.exit_code(results) == 0
    assert gpu_check.exit_code([gpu_check.Verdict("x", "y", None)]) == 1  # nothing judged is no pass
    assert gpu_check.exit_code([]) == 1


def test_aot_verdict():
    good = [{"kernel": "forward", "variant": "v", "arch": "sm_86", "spill_bytes": 0}] * 3
    assert gpu_check.judge_aot(good, "sm_86").passed
    assert gpu_check.judge_aot(good, "sm_90").passed is False  # nothing compiled for this arch
    assert gpu_check.judge_aot([], "sm_86").measured == "no compilation reported"
    spilled = good + [{"kernel": "row", "variant": "w", "arch": "sm_86", "spill_bytes": 24}]
    verdict = gpu_check.judge_aot(spilled, "sm_86")
    assert verdict.passed is False and "1 with spills (max 24 bytes)" in verdict.measured
    failed = good + [{"kernel": "row", "variant": "w", "arch": "sm_86", "error": "CompilationError"}]
    assert gpu_check.judge_aot(failed, "sm_86").passed is False
    results = gpu_check.verdicts(passing_rows(), spilled, "sm_86")
    assert results[-1].passed is False and gpu_check.exit_code(results) == 1


@pytest.mark.parametrize("returncode,output,passed,measured", [
    (0, "....\n2826 passed in 301.2s (0:05:01)\n", True, "2826 passed"),
    (1, "F.\n1 failed, 3 passed in 2.0s\n", False, "3 passed, 1 failed"),
    (0, "ss\n5 passed, 2 skipped in 1.0s\n", False, "5 passed, 2 skipped"),
    (5, "no tests ran in 0.01s\n", False, "no test ran"),
    (2, "1 error in 0.5s\n", False, "1 error"),
])
def test_tests_verdict(returncode, output, passed, measured):
    verdict = gpu_check.judge_tests(returncode, output)
    assert verdict.passed is passed and verdict.measured == measured


def test_tests_verdict_leads_the_table():
    results = gpu_check.verdicts(passing_rows(), tests=(1, "1 failed, 9 passed in 3s"))
    assert results[0].target.startswith("pytest tests/test_cuda.py") and results[0].passed is False
    assert gpu_check.exit_code(results) == 1


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="rows: expected a list"):
        gpu_check.verdicts({"backend": "triton"})
    with pytest.raises(TypeError, match="rows: every benchmark row must be a dict"):
        gpu_check.verdicts([("triton", 1.0)])
    with pytest.raises(ValueError, match="target.kind: unknown 'faster'"):
        gpu_check.judge(dataclasses.replace(gpu_check.targets()[0], kind="faster"), passing_rows())
    with pytest.raises(ValueError, match="name: '---' has no letters"):
        gpu_check.gpu_slug("---")
    with pytest.raises(TypeError, match="name: expected the GPU name"):
        gpu_check.gpu_slug(None)
    assert gpu_check.gpu_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_the_benchmark_runs_produce_every_targets_rows():
    """Each target's case is in one of BENCH_RUNS, with its own backend and its peers named there."""
    parser = cli.build_parser()
    produced = set()
    for _, flags in gpu_check.BENCH_RUNS:
        args = parser.parse_args(flags)
        names = args.backends.split(",")
        for case in cli._cases(args, parser, "cuda"):
            fields = case.describe()
            for name in names:
                produced.add((name, *(fields[k] for k in ("kernel", "normalize", "update", "N", "M", "D", "C",
                                                            "batch", "dtype", "pass"))))
    for target in gpu_check.targets():
        key = tuple(target.case[k] for k in ("kernel", "normalize", "update", "N", "M", "D", "C", "batch",
                                             "dtype", "pass"))
        for backend in (target.ours, *target.peers):
            assert (backend, *key) in produced, (target.name, backend)


def test_pinned_sdpa_peers():
    """CUDA only in sweeps; the function pins the kernel and computes what the sdpa peer computes."""
    case = Case("gaussian", "row", "diffusion", 16, 16, 8, 8, 2, "float32", "cpu", "fwd")
    assert "CUDA only" in runners.PEERS["sdpa_flash"].reason(case, None)
    assert runners.PEERS["sdpa_math"].reason(dataclasses.replace(case, device="cuda"), None) is None
    assert "gaussian + row" in runners.PEERS["sdpa_math"].reason(
        dataclasses.replace(case, device="cuda", kernel="rbf"), None)
    q, k, v = (torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    expected = runners.PEERS["sdpa"].build(case)(q, k, v, None)
    torch.testing.assert_close(runners.PEERS["sdpa_math"].build(case)(q, k, v, None), expected)


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "cuda-test.png"
    gpu_check.plot(gpu_check.verdicts(passing_rows()), str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_cuda_it_refuses_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_run", lambda *a, **k: pytest.fail("ran a step without CUDA"))
    assert gpu_check.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Nothing was checked" in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--repeat", "0", "--results", str(tmp_path)])
    assert "--repeat: expected at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--results", str(tmp_path / "absent")])
    assert "--results" in capsys.readouterr().err


def test_make_gpu_check_refuses_without_cuda():
    """The Makefile target, with no CUDA device visible: a non-zero exit and the message, in seconds."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # -o: the venv counts as set up (the test must not reinstall it); the recipe itself runs
    result = subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-check"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode != 0
    assert "make gpu-check needs a CUDA GPU" in result.stderr
    assert "passed" not in result.stdout


def test_python_dash_m_entry_point_refuses_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "nonlocal_ext.gpu_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def test_the_summary_counts_the_needs_cuda_skips():
    from conftest import NEEDS_CUDA, needs_cuda_count
    report = type("Report", (), {})
    reports = []
    for reason in (f"Skipped: {NEEDS_CUDA}", f"Skipped: {NEEDS_CUDA}", "Skipped: needs pykeops"):
        r = report()
        r.longrepr = ("tests/test_cuda.py", 1, reason)
        reports.append(r)
    assert needs_cuda_count(reports) == 2
    assert needs_cuda_count([]) == 0


def test_the_cuda_tests_run_in_parallel_workers_up_to_the_limit():
    command = gpu_check.test_command(cpus=32)
    assert command[-1] == "tests/test_cuda.py"
    assert command[command.index("-n") + 1] == str(gpu_check.MAX_TEST_WORKERS)
    assert gpu_check.test_command(cpus=3)[gpu_check.test_command(cpus=3).index("-n") + 1] == "3"
    assert "-n" not in gpu_check.test_command(cpus=1)
