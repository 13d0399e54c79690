"""`python -m nonlocal_ext.aot` compiles the Triton kernels for sm_80 and sm_90 with no GPU (DESIGN §3).

CI compiles the quick set (every affinity, normalization, update, symmetric flag and dtype (fp16, bf16,
fp32) at least once; about 60 compilations): every variant compiles on both targets, spills nothing
(STACK + LOCAL = 0), every fused kernel family uses tensor-core instructions (HMMA / HGMMA), and their
operand type follows the input dtype. The full set is
`python -m nonlocal_ext.aot --arch sm_80,sm_90 --json FILE` (see bench/NOTES_triton.md).

Run alone: .venv/bin/python -m pytest -q tests/test_aot.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = {"kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes", "mma_instructions",
        "mma_operand_types"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("tests/test_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "nonlocal_ext.aot", "--arch", "sm_80,sm_90", "--set", "quick",
                             "--json", str(path)], cwd=root, capture_output=True, text=True,
                            env=dict(os.environ, TRITON_DEFAULT_FP_FUSION="1"))
    assert path.exists(), result.stdout[-5000:] + result.stderr[-5000:]
    rows = json.loads(path.read_text())
    return result, rows


def test_every_variant_compiles_on_both_targets(report):
    result, rows = report
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']} {r['variant']} {r['arch']}: {r['error']}" for r in errors)
    assert result.returncode == 0
    for arch in ("sm_80", "sm_90"):
        assert {(r["kernel"], r["variant"]) for r in rows if r["arch"] == "sm_80"} == \
               {(r["kernel"], r["variant"]) for r in rows if r["arch"] == arch}
    assert all(KEYS <= set(r) for r in rows)
    assert "registers" in result.stdout.splitlines()[0] or "regs" in result.stdout.splitlines()[0]


def test_no_spills(report):
    _, rows = report
    spilled = [f"{r['kernel']} {r['variant']} {r['arch']}: {r['spill_bytes']} bytes" for r in rows if r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_fused_kernels_use_tensor_cores(report):
    _, rows = report
    for family in ("forward", "column", "row"):
        for arch in ("sm_80", "sm_90"):
            family_rows = [r for r in rows if r["kernel"] == family and r["arch"] == arch]
            assert family_rows
            without = [r["variant"] for r in family_rows if r["mma_instructions"] == 0]
            assert not without, f"{family} on {arch} without HMMA/HGMMA: {without}"


def test_tensor_core_operands_follow_the_input_dtype(report):
    """Half variants multiply q·kᵀ in their own type (F16 / BF16 operands); float32 variants only in tf32 (tf32x3)."""
    _, rows = report
    expected = {"fp16": "F16", "bf16": "BF16", "fp32": "TF32"}
    checked = set()
    for r in rows:
        if r["kernel"] == "preprocess":
            continue
        dtype = next(part for part in r["variant"].split("-") if part in expected)
        assert expected[dtype] in r["mma_operand_types"], (r["variant"], r["arch"], r["mma_operand_types"])
        if dtype == "fp32":
            assert r["mma_operand_types"] == ["TF32"], (r["variant"], r["arch"], r["mma_operand_types"])
        checked.add(dtype)
    assert checked == set(expected)
