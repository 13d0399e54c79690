"""`make triton-compat` (nonlocal_ext/triton_compat.py): its set-up commands and argument checks. The run itself
(a venv with Triton 3.8.0, the interpreter suite and the AOT quick set there, about 13 minutes on 2 cores) is
`make triton-compat`; docs/gpu.md records its result.

Run alone: .venv/bin/python -m pytest -q tests/test_triton_compat.py
"""

from __future__ import annotations

import os

import pytest

from nonlocal_ext import triton_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins():
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        return triton_compat.read_pins(f.read())


def test_read_pins():
    text = "# comment\ntorch==2.13.0\nTriton == 3.9.0  # pinned\nnumpy>=2\nmatplotlib==3.10.7; sys_platform == 'linux'\n"
    assert triton_compat.read_pins(text) == {"torch": "2.13.0", "triton": "3.9.0", "matplotlib": "3.10.7"}
    with pytest.raises(TypeError, match="text: expected"):
        triton_compat.read_pins(None)


def test_install_commands_pin_torch_and_take_the_triton_asked_for(tmp_path):
    commands = triton_compat.install_commands(str(tmp_path / "v"), "3.8.0", pins())
    assert commands[0][1:] == ["-m", "venv", str(tmp_path / "v")]
    packages = commands[1][commands[1].index("--quiet") + 1:]
    assert "torch==2.13.0" in packages and "triton==3.8.0" in packages
    assert all("==" in p for p in packages)  # nothing unpinned (an unpinned torch is a CUDA build of GBs)
    assert commands[2][-3:] == ["--no-deps", "-e", ROOT] and "--no-build-isolation" not in commands[2]


def test_bad_arguments_name_themselves(tmp_path, capsys):
    for bad in ("3.8", "latest", "3.8.0rc1", None):
        if bad == "3.8":
            assert triton_compat.check_version(bad) == "3.8"
            continue
        with pytest.raises(ValueError, match="triton: expected a release number"):
            triton_compat.check_version(bad)
    with pytest.raises(ValueError, match="pins: requirements-dev.txt pins none of torch"):
        triton_compat.install_commands(str(tmp_path), "3.8.0", {k: v for k, v in pins().items() if k != "torch"})
    with pytest.raises(SystemExit):
        triton_compat.main(["--triton", "three"])
    assert "--triton: triton: expected a release number like 3.8.0, got 'three'" in capsys.readouterr().err


def test_the_supported_range_is_in_the_metadata():
    """pyproject.toml states the Triton range; the pinned development triton and 3.8 (torch 2.14.1's) are in it."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    from packaging.requirements import Requirement
    triton = [Requirement(r) for r in project["dependencies"] if r.startswith("triton")]
    assert len(triton) == 1
    for version in ("3.8.0", "3.9.0", pins()["triton"]):
        assert triton[0].specifier.contains(version), version
    assert not triton[0].specifier.contains("3.10.0") and not triton[0].specifier.contains("3.7.1")
