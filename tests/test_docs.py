"""The documentation: generated tables in sync with the results, links that resolve, no outside documents.

Run alone: .venv/bin/python -m pytest -q tests/test_docs.py
(after changing bench/results/*.json, examples/results/qtips_training.json or the auto cost model:
.venv/bin/python bench/tables.py, or make docs)
"""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    return _tables()


def test_generated_sections_match_the_results(tables):
    assert tables.stale_sections() == [], "run .venv/bin/python bench/tables.py (make docs)"


def test_auto_columns_are_priced_for_the_measuring_machine(tables):
    """Inside ``as_measured(rows)`` auto's half pricing uses the rows' GEMM rates and the fitted half class, and the
    fused price the committed run's probe (or the one given), not this machine's; all restored after."""
    import torch

    from nonlocal_ext.backends import cost, reference
    rows = [{"dtype": "float32", "gemm_gflops": 200.0}, {"dtype": "bfloat16", "gemm_gflops": 50.0}]
    saved = cost.half_gemm_ratio, reference.half_class, cost.fused_speed_scale
    q = torch.empty(2, 40, 8, dtype=torch.bfloat16)
    from nonlocal_ext.spec import validate
    spec = validate(q, q, q, "gaussian", normalize="row", update="aggregate", symmetric=False, self_value=None,
                    backend="auto", scale=1.0, power=None, gamma=None, eps=None)
    with tables.as_measured(rows):
        assert cost.half_gemm_ratio(torch.bfloat16) == 0.25
        assert reference.half_class(spec, q) == (cost.FITTED_ON if saved[1](spec, q) else None)
        assert reference.half_class(spec, q.float()) is None
        assert cost.fused_speed_scale() == pytest.approx(1.0, rel=1e-3)  # the committed sweep: the fitted run
    with tables.as_measured(rows, probe=2 * cost.FUSED_PROBE):
        assert cost.fused_speed_scale() == pytest.approx(2.0, rel=1e-12)
    assert (cost.half_gemm_ratio, reference.half_class, cost.fused_speed_scale) == saved


def test_every_table_is_in_a_document_and_every_section_is_known(tables):
    names = [m["name"] for path in tables.DOCS for m in tables.MARKER.finditer(path.read_text())]
    assert set(names) == set(tables.TABLES), f"unused: {set(tables.TABLES) - set(names)}; unknown: " \
                                             f"{set(names) - set(tables.TABLES)}"
    with pytest.raises(KeyError, match="unknown generated section 'nope'"):
        tables.render("<!-- tables.py: nope -->\nx\n<!-- /tables.py: nope -->")


def test_a_changed_result_makes_its_sections_stale(tables, monkeypatch):
    """Slower ``cpu`` rows of the sweep restale the sweep's tables; the block suite's only through the fused probe
    case (cost.PROBE_SHAPE), which prices its ``auto`` column."""
    from nonlocal_ext.backends import cost
    original = tables.load
    n, d, c = cost.PROBE_SHAPE

    def slower_cpu(probe_too):
        def load(name):
            rows = copy.deepcopy(original(name))
            if name == "cpu":
                for r in rows:
                    is_probe = (r["N"], r["D"], r["C"], r["kernel"], r["pass"]) == (n, d, c, "gaussian", "fwd")
                    if r["backend"] == "cpu" and r["median_ms"] is not None and (probe_too or not is_probe):
                        r["median_ms"] *= 3
            return rows
        return load

    monkeypatch.setattr(tables, "load", slower_cpu(probe_too=False))
    stale = tables.stale_sections()
    assert "README.md: readme-cpu" in stale
    assert "docs/benchmarks.md: cpu-full" in stale
    assert not any(s.endswith(": blocks") or s.endswith(": qtips") for s in stale)
    monkeypatch.setattr(tables, "load", slower_cpu(probe_too=True))
    assert any(s.endswith(": blocks") for s in tables.stale_sections())


def test_rendering_touches_only_the_marked_sections(tables):
    text = "before\n<!-- tables.py: qtips -->\nold\n<!-- /tables.py: qtips -->\nafter\n"
    out = tables.render(text, {"qtips": ["new"]})
    assert out == "before\n<!-- tables.py: qtips -->\nnew\n<!-- /tables.py: qtips -->\nafter\n"


def _documents():
    files = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in files.stdout.split() if not f.startswith("bench/NOTES")]


#: Pages another change is adding now; a link to them may point ahead until they land.
ARRIVING = {"docs/gpu.md"}


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    missing = []
    for path in _documents():
        for target in link.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists() and str(resolved.relative_to(ROOT)) not in ARRIVING:
                missing.append(f"{path.relative_to(ROOT)} → {target}")
    assert not missing, missing


#: Files whose owners are replacing their references right now (they are not this test's to fix).
def test_no_reference_to_documents_outside_the_repository():
    patterns = re.compile("|".join(["DESIGN" + r"(\.md| §)", r"\.\./" + "shared", "seed " + r"0\d\d"]))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".cpp", ".h", ".txt", ".toml", ".in", ""}:
            continue
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if patterns.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
