"""Installing as users do: the sdist's contents, the metadata, ``python -m nonlocal_ext.info``, the
loading of the C++ kernels (ahead of time, compiled on first use, or a clear warning), and
``pip install .`` with pip's default build isolation in a fresh venv.

Run alone: .venv/bin/python -m pytest -q tests/test_install.py

The fresh-venv test (torch linked in from .venv) takes under a minute, plus a few minutes to
compile the C++ kernels when csrc/ changed since its last run (the library is cached in
.venv/torch_extensions; a fresh clone, as in CI, always compiles).

``make dist`` runs this file as a script: ``python tests/test_install.py DIST_DIR`` installs the
sdist (``--no-build-isolation``) and the wheel of DIST_DIR into fresh venvs and smoke-tests each.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import nonlocal_ext
from nonlocal_ext import _build, _extension, info

ROOT = Path(__file__).resolve().parent.parent

#: Exact versions of what a fresh venv gets: torch from the machine's local wheel, as in
#: requirements-dev.txt; the build backend that pip's isolated build fetches is pinned through
#: PIP_CONSTRAINT.
PINS = {line.split("==")[0]: line.strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")}

#: What may never be in a distribution: build outputs, caches, results.
BUILD_OUTPUT = re.compile(r"(\.so|\.o|\.pyc|\.torch_version)$|(^|/)(build|results|\.venv|__pycache__)/")

# --------------------------------------------------------------------------------------------- helpers


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output (pip's is the diagnosis)."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def fresh_venv(path: Path, constraints: Path, share_torch: bool = False) -> tuple[Path, dict]:
    """A new venv at `path` with torch (pinned) and ninja; returns its python and the environment
    to run it in (the pins apply to every pip, build isolation included).

    torch comes from the machine's local wheel (a minute to install), or with `share_torch` from
    this environment's site-packages, linked in without its nonlocal_ext (seconds)."""
    run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    constraints.write_text("\n".join(PINS[name] for name in ("torch", "ninja", "setuptools", "wheel")) + "\n")
    env = dict(os.environ, PIP_CONSTRAINT=str(constraints), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    if share_torch:
        shared = path / "shared-site-packages"
        shared.mkdir()
        for entry in Path(torch.__file__).resolve().parent.parent.iterdir():
            if "nonlocal_ext" not in entry.name and entry.suffix != ".pth" and entry.name != "__pycache__":
                (shared / entry.name).symlink_to(entry)
        site_packages, = (path / "lib").glob("python*/site-packages")
        (site_packages / "shared.pth").write_text(f"{shared}\n")
    else:
        run([python, "-m", "pip", "install", "-q", PINS["torch"], PINS["ninja"], PINS["setuptools"]], env=env)
    return python, env


def source_copy(destination: Path) -> Path:
    """The source tree without build outputs, as a fresh clone has it (an in-tree build/ of an
    earlier build would otherwise leak into the wheel)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    "*.torch_version", ".pytest_cache", "results")
    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination


#: Run in an installed environment: the C++ kernels load and agree with the dense reference, forward
#: and backward, by the tolerance rule of the test suite; prints how they were loaded, the version
#: and the distribution's license and csrc files.
SMOKE = textwrap.dedent("""
    import importlib.metadata, json, torch
    import nonlocal_ext
    from nonlocal_ext import _extension
    from nonlocal_ext.testing import error_and_bound  # the project's one tolerance rule
    g = torch.Generator().manual_seed(0)
    for kernel, extra in (("gaussian", {}), ("fractional", {"power": 3.0})):
        q, k, v = (torch.randn(2, n, d, generator=g, dtype=torch.float64, requires_grad=True)
                   for n, d in ((37, 5), (29, 5), (29, 3)))
        outs = []
        for backend in ("cpu", "reference"):
            out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, backend=backend, **extra)
            outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
        for ours, truth in zip(*outs):  # float64: the reference is the truth (floor 1: unit-scale data)
            err, bound, _, _ = error_and_bound(ours, truth, truth, torch.float64, floor=1.0)
            assert err <= bound, (kernel, err, bound)
    files = importlib.metadata.files("nonlocal_ext") or []
    print(json.dumps({"how": _extension.status["how"], "path": _extension.status["path"],
                      "compile_seconds": _extension.status["compile_seconds"],
                      "version": nonlocal_ext.__version__,
                      "metadata_version": importlib.metadata.version("nonlocal_ext"),
                      "licenses": sorted(str(f) for f in files if f.name.startswith("LICENSE")),
                      "csrc": sorted(f.name for f in files if f.parent.name == "csrc")}))
""")


def smoke(python: Path, env: dict) -> tuple[dict, str]:
    """Run SMOKE and `python -m nonlocal_ext.info` with `python`; (SMOKE's report, its stderr)."""
    done = run([python, "-c", SMOKE], env=env, cwd="/")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["version"] == report["metadata_version"] == nonlocal_ext.__version__
    assert any(path.endswith("LICENSE") for path in report["licenses"]), report
    shown = run([python, "-m", "nonlocal_ext.info"], env=env, cwd="/")
    assert "C++ kernels" in shown.stdout
    return report, done.stderr


# ------------------------------------------------------------------------------ sdist against setup.py


def setup_declares() -> dict:
    """What setup.py compiles and installs: extension sources and dependencies, packages with
    their directories, package data patterns (read from setup.py itself, not restated here)."""
    code = textwrap.dedent("""
        import json, runpy, setuptools
        declared = {}
        setuptools.setup = lambda **arguments: declared.update(arguments)
        runpy.run_path("setup.py", run_name="__main__")
        print(json.dumps({
            "sources": [s for e in declared["ext_modules"] for s in e.sources],
            "depends": [s for e in declared["ext_modules"] for s in e.depends],
            "packages": declared["packages"],
            "package_dir": declared.get("package_dir", {}),
            "package_data": declared.get("package_data", {}),
        }))
    """)
    done = run([sys.executable, "-c", code], cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def local_includes(path: Path) -> set[Path]:
    """Every file reached through `#include "..."` from `path`, transitively (the <...> includes
    are the compiler's and torch's)."""
    found, todo = set(), [path]
    while todo:
        current = todo.pop()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', current.read_text(), flags=re.M):
            header = (current.parent / name).resolve()
            assert header.is_file(), f"{current} includes {name!r}, which is not beside it"
            if header not in found:
                found.add(header)
                todo.append(header)
    return found


def package_directory(package: str, package_dir: dict) -> Path:
    if package in package_dir:
        return ROOT / package_dir[package]
    parent, _, leaf = package.rpartition(".")
    return package_directory(parent, package_dir) / leaf if parent else ROOT / package


def test_sdist_holds_everything_setup_py_builds(tmp_path):
    declared = setup_declares()
    assert declared["sources"], "setup.py compiles no C++ source with torch importable"

    needed = {"setup.py", "pyproject.toml", "README.md", "LICENSE"}
    for source in declared["sources"]:
        needed.add(source)
        needed |= {str(h.relative_to(ROOT)) for h in local_includes(ROOT / source)}
    needed |= set(declared["depends"])
    for package in declared["packages"]:
        directory = package_directory(package, declared["package_dir"])
        patterns = ["*.py"] + declared["package_data"].get(package, [])
        needed |= {str(f.relative_to(ROOT)) for p in patterns for f in directory.glob(p)}
    # What the compile on first use reads from the installed package: the same recipe.
    needed |= {str(f.relative_to(ROOT)) for f in _build.sources(ROOT / "csrc") + _build.headers(ROOT / "csrc")}

    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", build, tmp_path], cwd=ROOT).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as archive:
        top = name[: -len(".tar.gz")]
        members = {m.name.removeprefix(top + "/") for m in archive.getmembers() if m.isfile()}

    assert "csrc/tile_math.h" in needed  # the header that was once left out
    assert not needed - members, f"the sdist lacks {sorted(needed - members)}"
    assert not [m for m in members if BUILD_OUTPUT.search(m)], "build outputs in the sdist"
    assert not [m for m in members if m.startswith(("tests/", "bench/", "examples/"))]


def test_build_output_pattern():
    # The pattern above must catch what it is for, or the sdist check proves nothing.
    assert BUILD_OUTPUT.search("nonlocal_ext/_C.cpython-311-x86_64-linux-gnu.so")
    assert BUILD_OUTPUT.search("bench/results/cpu.json")
    assert BUILD_OUTPUT.search("nonlocal_ext/__pycache__/ops.cpython-311.pyc")
    assert BUILD_OUTPUT.search("nonlocal_ext/_C.torch_version")
    assert not BUILD_OUTPUT.search("csrc/aggregate_cpu.cpp")
    assert not BUILD_OUTPUT.search("nonlocal_ext/nn/nonlocal_block.py")


# ------------------------------------------------------------------------------------------- metadata


def test_one_version_and_pep621_metadata():
    meta = importlib.metadata.metadata("nonlocal_ext")
    assert meta["Version"] == nonlocal_ext.__version__
    import tomllib  # Python 3.11+, as in the dev environment

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # One version: __init__'s, read by setuptools, stated nowhere else.
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nonlocal_ext.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text()

    requires = meta.get_all("Requires-Dist")
    assert "torch>=2.4" in requires
    assert any(r.startswith("triton") and "<3.10,>=3.8" in r and 'sys_platform == "linux"' in r
               for r in requires), requires
    assert {"plot", "test", "peers"} <= set(meta.get_all("Provides-Extra"))
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"]
    assert "BSD 3-Clause License" in (ROOT / "LICENSE").read_text()


# ----------------------------------------------------------------------------------------------- info


def test_info_text_and_json_exit_zero():
    shown = run([sys.executable, "-m", "nonlocal_ext.info"], cwd=ROOT)
    as_json = run([sys.executable, "-m", "nonlocal_ext.info", "--json"], cwd=ROOT)
    data = json.loads(as_json.stdout)

    assert data["nonlocal_ext"]["version"] == nonlocal_ext.__version__
    assert data["torch"]["version"] == torch.__version__
    assert data["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert data["cpp_kernels"]["how"] == _extension.status["how"] == "ahead-of-time"  # `make test` builds _C
    assert "cpu" in data["backends"]["cpu"] and "reference" in data["backends"]["cpu"]
    picks = {row["call"].split(":")[1].split(",")[0].strip(): row["auto"] for row in data["auto"]["cpu"]}
    # dot at a block shape (D = C = 256, M = N/4): the priced dense/fused paths beat its linear one
    assert picks["dot"] in ("cpu", "reference") and picks["fractional"] == "cpu"
    if not torch.cuda.is_available():
        assert data["gpus"] == [] and data["backends"]["cuda"] == [] and data["auto"]["cuda"] == []
        assert "GPU           none" in shown.stdout
    assert f"torch         {torch.__version__}" in shown.stdout
    assert "C++ kernels   built ahead of time (nonlocal_ext._C)" in shown.stdout
    assert re.search(r"code path (AVX-512|AVX2\+FMA|baseline)", shown.stdout)


def test_info_reports_missing_kernels(monkeypatch):
    monkeypatch.setattr(_extension, "status", {"how": "missing", "path": None, "detail": "no C++ compiler",
                                               "compile_seconds": None})
    data = info.collect()
    text = info.format_text(data)
    assert "C++ kernels   MISSING" in text and "why: no C++ compiler" in text
    assert data["cpu"]["code_path"].startswith("none")


@pytest.mark.parametrize("flags, expected", [
    (info._X86_64_V4, "AVX-512 (x86-64-v4)"),
    (info._X86_64_V3, "AVX2+FMA (x86-64-v3)"),
    (info._X86_64_V3 - {"fma"}, "baseline x86-64"),
    (set(), "baseline x86-64"),
])
def test_cpu_code_path(tmp_path, flags, expected):
    cloned, plain = tmp_path / "cloned.so", tmp_path / "plain.so"
    cloned.write_bytes(b"\0row_pass_entry.arch_x86_64_v4.0\0")
    plain.write_bytes(b"\0row_pass_entry\0")
    assert info.cpu_code_path(str(cloned), flags, "x86_64") == expected
    assert info.cpu_code_path(str(plain), flags, "x86_64").startswith("baseline (this build has no")
    assert info.cpu_code_path(str(cloned), flags, "aarch64").startswith("baseline (this build has no")


def test_loaded_library_has_the_isa_clones():
    # The marker info.cpu_code_path looks for is in the real build (GCC on x86-64).
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.fail("the dev environment is Linux x86-64; extend this test for another platform")
    assert info._CLONE_MARK in Path(_extension.status["path"]).read_bytes()


# --------------------------------------------------------------------------- loading the C++ kernels


@pytest.fixture
def isolated_loader(monkeypatch):
    """_extension's module state, restored after the test."""
    monkeypatch.setattr(_extension, "_import_error", None)
    monkeypatch.setattr(_extension, "status", {"how": "missing", "path": None, "detail": "", "compile_seconds": None})
    return monkeypatch


def test_ahead_of_time_build_is_stamped_with_its_torch():
    path, why_not = _extension._ahead_of_time()
    assert why_not == "" and path == _extension.status["path"]
    stamp = Path(path).with_name(_build.TORCH_STAMP).read_text().strip()
    assert stamp == _build.torch_build_id(torch) and torch.__version__ in stamp


def test_ahead_of_time_build_for_another_torch_is_not_imported(monkeypatch):
    monkeypatch.setattr(_build, "torch_build_id", lambda torch: "9.9.9+other 0123abcd")
    path, why_not = _extension._ahead_of_time()
    assert path is None
    assert "was built for torch " + torch.__version__ in why_not and "9.9.9+other" in why_not


def test_missing_compiler_is_named(isolated_loader):
    isolated_loader.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler: `no-such-c\+\+-compiler` is not on PATH"):
        _extension._compile_and_load()


def test_missing_ninja_is_named(isolated_loader):
    isolated_loader.setattr(_build, "ninja_bin_dir", lambda: None)
    isolated_loader.setattr(_extension.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"no ninja: .*pip install ninja"):
        with _extension._ninja_on_path():
            pass


def test_no_silent_fallback_when_the_kernels_cannot_be_built(isolated_loader):
    log = "Error building extension 'nonlocal_ext_C':\n[1/3] c++ -c aggregate_cpu.cpp\n" \
          "aggregate_cpu.cpp:39:10: fatal error: tile_math.h: No such file or directory\nninja: build stopped"
    isolated_loader.setattr(_extension, "_ahead_of_time", lambda: (None, "nonlocal_ext._C was not built"))
    isolated_loader.setattr(_extension, "_compile_and_load", lambda: (_ for _ in ()).throw(RuntimeError(log)))
    with pytest.warns(RuntimeWarning) as caught:
        _extension._load()
    message = str(caught[0].message)
    assert "nonlocal_ext._C was not built" in message and "tile_math.h: No such file" in message
    assert "'reference'" in message and "'chunked'" in message and "backend='cpu' raises" in message
    assert not _extension.extension_available() and _extension.status["how"] == "missing"
    with pytest.raises(RuntimeError, match="tile_math.h: No such file"):
        _extension.require_extension("backend='cpu'")


def test_compiling_on_first_use_can_be_turned_off(isolated_loader):
    isolated_loader.setattr(_extension, "_ahead_of_time", lambda: (None, "nonlocal_ext._C was not built"))
    isolated_loader.setattr(_extension, "_compile_and_load", lambda: pytest.fail("compiled although turned off"))
    isolated_loader.setenv(_extension.JIT_SWITCH, "0")
    with pytest.warns(RuntimeWarning, match="NONLOCAL_EXT_JIT=0 turns off compiling"):
        _extension._load()
    assert _extension.status["how"] == "missing"


def test_jit_cache_directory_is_per_torch_compiler_and_source(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = _extension.jit_build_directory()
    assert directory.parent == tmp_path / f"{sys.implementation.cache_tag}_torch{torch.__version__}"
    assert directory.name.startswith(_extension.JIT_NAME + "-")
    monkeypatch.setenv("CXX", "clang++")
    assert _extension.jit_build_directory() != directory

    sources = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", sources)
    before = _build.recipe_digest(sources, _build.CXX_FLAGS, "torch at /a")
    assert _build.recipe_digest(sources, _build.CXX_FLAGS, "torch at /b") != before
    assert _build.recipe_digest(sources, _build.CXX_FLAGS + ["-O0"], "torch at /a") != before
    (sources / "tile_math.h").write_text((sources / "tile_math.h").read_text() + "\n// changed\n")
    assert _build.recipe_digest(sources, _build.CXX_FLAGS, "torch at /a") != before


def test_sources_are_staged_once_into_the_build_directory(tmp_path):
    staged = _extension._staged_sources(ROOT / "csrc", tmp_path)
    assert [p.name for p in staged] == [p.name for p in _build.sources(ROOT / "csrc")]
    assert all(p.parent == tmp_path / "csrc" for p in staged)
    assert (tmp_path / "csrc" / "tile_math.h").read_bytes() == (ROOT / "csrc" / "tile_math.h").read_bytes()
    mtime = staged[0].stat().st_mtime_ns
    assert _extension._staged_sources(ROOT / "csrc", tmp_path) == staged
    assert staged[0].stat().st_mtime_ns == mtime  # not copied again: ninja would rebuild
    assert [p.name for p in tmp_path.iterdir()] == ["csrc"]


# ------------------------------------------------------------------- pip install . in a fresh venv


def test_pip_install_with_build_isolation_compiles_on_first_use(tmp_path):
    """`pip install .` with pip's default build isolation: a pure-Python wheel; the kernels are
    compiled on first import against the venv's torch, with one line on stderr, then cached."""
    # Always at the same place: the library is cached per Python, torch install (its path),
    # compiler and sources, so a rerun with unchanged csrc/ compiles nothing (CI's fresh clone
    # always compiles).
    venv = ROOT / ".venv" / "install-test-venv"
    shutil.rmtree(venv, ignore_errors=True)
    times = [time.perf_counter()]
    python, env = fresh_venv(venv, tmp_path / "constraints.txt", share_torch=True)
    source = source_copy(tmp_path / "source")
    times.append(time.perf_counter())
    # --no-deps: torch and ninja are in already (pinned); triton is not needed on CPU.
    run([python, "-m", "pip", "install", "-q", "--no-deps", source], env=env)
    times.append(time.perf_counter())
    installed = Path(run([python, "-c", "import importlib.util as u; print(u.find_spec('nonlocal_ext').origin)"],
                         env=env, cwd="/").stdout.strip()).parent
    assert not list(installed.glob("_C*")), "the isolated build must not build _C (it has no torch)"
    assert (installed / "csrc" / "tile_math.h").is_file()

    env["TORCH_EXTENSIONS_DIR"] = str(ROOT / ".venv" / "torch_extensions")
    before_first_import = time.time()
    first, first_err = smoke(python, env)
    times.append(time.perf_counter())
    built = Path(first["path"]).stat().st_mtime
    second, second_err = smoke(python, env)
    times.append(time.perf_counter())
    steps = ("venv sharing torch", "pip install .", "first import and smoke", "second import and smoke")
    print("; ".join(f"{step} {b - a:.0f} s" for step, a, b in zip(steps, times, times[1:])))

    assert first["how"] == second["how"] == "jit"
    assert any(name == "tile_math.h" for name in first["csrc"])
    building = [line for line in first_err.splitlines() if "compiling the C++ kernels" in line]
    assert len(building) == (1 if first["compile_seconds"] is not None else 0), first_err
    assert second["compile_seconds"] is None and "compiling" not in second_err
    assert second["path"] == first["path"] and Path(second["path"]).stat().st_mtime == built
    if first["compile_seconds"] is None:  # no line, so nothing may have been compiled silently
        assert built < before_first_import, "the library was rebuilt without saying so"


# ------------------------------------------------------------------------ make dist: fresh-venv smoke


def check_distributions(dist: Path, work: Path) -> None:
    """Install the sdist (built with --no-build-isolation against the venv's torch) and the wheel
    into fresh venvs and smoke-test each; print the commands' times."""
    sdist, = dist.glob("nonlocal_ext-*.tar.gz")
    wheel, = dist.glob("nonlocal_ext-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert any(n.endswith("licenses/LICENSE") for n in names), "no LICENSE in the wheel"
    assert any(re.search(r"nonlocal_ext/_C\..*\.so$", n) for n in names), "the wheel has no _C"
    with tarfile.open(sdist) as archive:
        assert any(m.endswith("/LICENSE") for m in archive.getnames()), "no LICENSE in the sdist"

    for label, artifact, flags in (("sdist", sdist, ["--no-build-isolation"]), ("wheel", wheel, [])):
        start = time.perf_counter()
        python, env = fresh_venv(work / f"venv-{label}", work / f"constraints-{label}.txt")
        venv_seconds = time.perf_counter() - start
        start = time.perf_counter()
        run([python, "-m", "pip", "install", "-q", *flags, artifact, PINS["triton"]], env=env)
        install_seconds = time.perf_counter() - start
        report, _ = smoke(python, env)
        assert report["how"] == "ahead-of-time", report
        command = " ".join(["pip install", *flags, artifact.name, PINS["triton"]])
        print(f"{label}: fresh venv with {PINS['torch']} in {venv_seconds:.0f} s; {command} in "
              f"{install_seconds:.0f} s; smoke test passed, C++ kernels {report['how']}", flush=True)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        check_distributions(Path(sys.argv[1]), Path(work))
