"""The layout of the C++ CPU kernels in csrc/: files by role, each saying what it holds; properties
of the affinity kernels asked through their predicates; one place that makes transposed copies."""

import pathlib
import re

import pytest

from nonlocal_ext.kernels import KERNELS

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

#: The files and their roles (the header comment of each says more).
ROLES = {
    "nonlocal_ext.cpp": "op schemas and the Python module",
    "aggregate_cpu.cpp": "the CPU operators: arguments, dtypes, registration",
    "autograd.cpp": "the fused op's autograd formula, for every device",
    "forward_cpu.cpp": "the forward schedule",
    "backward_cpu.cpp": "the backward schedules",
    "tiles.h": "what the schedules share",
    "points.cpp": "the distance kernels' translated points and squared norms",
    "tile_math.h": "elementwise maths of the affinity kernels",
    "blas.h": "the GEMM shim",
    "blas.cpp": "the half-precision tile GEMMs",
    "cpu_features.h": "ISA clones and the CPU's half instructions",
    "cpu_features.cpp": "whether half GEMMs run on this CPU",
    "pooling.cpp": "the layers' key max-pooling",
}


def _code(text: str) -> str:
    """The text without // comments (the files use no /* */ comments)."""
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def test_files_by_role():
    assert sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")) == sorted(ROLES)


@pytest.mark.parametrize("name", sorted(ROLES))
def test_each_file_opens_with_what_it_holds(name):
    first = (CSRC / name).read_text().splitlines()[0]
    assert first.startswith("// ") and len(first) > 40, f"{name} lacks a header comment"


def test_local_includes_exist():
    for path in CSRC.iterdir():
        for header in re.findall(r'#include "([^"]+)"', path.read_text()):
            assert (CSRC / header).is_file(), f"{path.name} includes a missing {header}"


def _predicate(name: str) -> set[str]:
    """The kernels (registry names) for which the constexpr predicate `name` of tile_math.h holds."""
    tile_math = _code((CSRC / "tile_math.h").read_text())
    body = re.search(rf"constexpr bool {name}\(Kernel k\) \{{\s*return ([^;]+);", tile_math)
    assert body, f"no predicate {name} in tile_math.h"
    return {kernel.lower() for kernel in re.findall(r"k == Kernel::(\w+)", body.group(1))}


def test_predicates_mirror_the_registry():
    assert _predicate("is_log_domain") == {n for n, k in KERNELS.items() if k.log_domain}
    assert _predicate("is_distance") == {n for n, k in KERNELS.items() if k.family == "distance"}
    assert _predicate("masks_coincident") == {n for n, k in KERNELS.items() if k.masks_coincident}


def test_log_domain_is_asked_through_its_predicate():
    # gaussian's log domain is tested through is_log_domain only (the enum, the parsing of the
    # name and the dispatch list name the kernel, but compare nothing with it).
    tests = {p.name: len(re.findall(r"[=!]= Kernel::Gaussian", _code(p.read_text()))) for p in CSRC.iterdir()}
    assert {name: n for name, n in tests.items() if n} == {"tile_math.h": 1}  # in is_log_domain
    callers = sum(_code(p.read_text()).count("is_log_domain(") for p in CSRC.iterdir())
    assert callers == 10  # its definition and the nine places that ask it


def test_one_function_makes_the_transposed_copies():
    # Of the float32 inputs and of their half copies alike: transposed_copy (blas.cpp), through transposes (tiles.h).
    makers = {p.name: _code(p.read_text()).count(".transpose(1, 2).contiguous()") for p in CSRC.iterdir()}
    assert {name: n for name, n in makers.items() if n} == {"blas.cpp": 1}  # its fallback for other dtypes
    callers = {p.name: _code(p.read_text()).count("transposed_copy(") for p in CSRC.iterdir()}
    assert {name: n for name, n in callers.items() if n} == {"blas.h": 1, "blas.cpp": 1, "tiles.h": 3}
