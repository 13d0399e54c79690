"""`make triton-compat`: the Triton kernels under another Triton release of the supported range.

    python -m nonlocal_ext.triton_compat --triton 3.8.0 [--venv .venv-triton3.8.0]

The supported range is in pyproject.toml (``triton>=3.8,<3.10``: the releases that the supported torch
releases pin; torch 2.14.1's CUDA build brings 3.8.0, the development pins 3.9.0). This creates (or reuses)
a venv with the development pins of requirements-dev.txt for torch, numpy and pytest, and the Triton release
asked for, installs this checkout into it in editable mode without compiling (pip's isolated build has no
torch: the C++ library already built beside the sources, for the same pinned torch, is the one loaded), and
runs there:

* tests/test_triton.py: the interpreter suite (tests/triton_suite.py under TRITON_INTERPRET=1);
* tests/test_aot.py: the AOT quick set compiled for sm_80 and sm_90 (no spills, tensor cores), and the
  autotune lists against bench/results/aot_configs.json.

Exit code: pytest's (0: every test passed under that Triton). About 13 minutes on 2 cores once the venv exists.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The packages whose development pins the compat venv takes from requirements-dev.txt (torch pinned: an
#: unpinned torch would pull a multi-GB CUDA build from the registry).
PINNED = ("torch", "numpy", "pytest", "setuptools", "wheel", "ninja", "pybind11")

TESTS = ("tests/test_triton.py", "tests/test_aot.py")


def read_pins(text: str) -> dict:
    """``{name: version}`` of the ``name==version`` lines of a requirements file."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected the requirements file's text, got {type(text).__name__}")
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def check_version(triton: str) -> str:
    """A Triton release number like ``3.8.0``, else a ValueError naming ``triton``."""
    if not isinstance(triton, str) or not re.fullmatch(r"\d+\.\d+(\.\d+)?", triton):
        raise ValueError(f"triton: expected a release number like 3.8.0, got {triton!r}")
    return triton


def install_commands(venv: str, triton: str, pins: dict) -> list[list[str]]:
    """The commands that set up ``venv``: create it, install the pinned packages and ``triton==<triton>``, then
    this checkout in editable mode without dependencies (isolated build: nothing is compiled)."""
    check_version(triton)
    missing = [name for name in PINNED if name not in pins]
    if missing:
        raise ValueError(f"pins: requirements-dev.txt pins none of {', '.join(missing)}")
    python = os.path.join(venv, "bin", "python")
    requirements = [f"{name}=={pins[name]}" for name in PINNED] + [f"triton=={triton}"]
    return [[sys.executable, "-m", "venv", venv],
            [python, "-m", "pip", "install", "--quiet", *requirements],
            [python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", ROOT]]


def installed_versions(python: str) -> dict:
    """``{"torch": ..., "triton": ...}`` as the venv's interpreter imports them."""
    out = subprocess.run([python, "-c", "import torch, triton; print(torch.__version__); print(triton.__version__)"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {"torch": out[0], "triton": out[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nonlocal_ext.triton_compat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", required=True, help="the Triton release to check, e.g. 3.8.0")
    parser.add_argument("--venv", default=None, help="the venv to create or reuse (default .venv-triton<release>)")
    args = parser.parse_args(argv)
    try:
        triton = check_version(args.triton)
    except ValueError as error:
        parser.error(f"--triton: {error}")
    venv = os.path.abspath(args.venv or os.path.join(ROOT, f".venv-triton{triton}"))
    with open(os.path.join(ROOT, "requirements-dev.txt")) as f:
        pins = read_pins(f.read())
    python = os.path.join(venv, "bin", "python")
    commands = install_commands(venv, triton, pins)
    if os.path.exists(python):
        commands = commands[1:]  # reuse the venv; pip leaves what is already at the pinned versions
    for command in commands:
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    versions = installed_versions(python)
    expected = {"torch": pins["torch"], "triton": triton}
    if versions["triton"] != triton or versions["torch"].split("+")[0] != pins["torch"]:
        print(f"the venv has {versions}, expected {expected}", file=sys.stderr)
        return 1
    print(f"triton-compat: torch {versions['torch']}, triton {versions['triton']}", flush=True)
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT)
    print(f"triton-compat: triton {triton}: {'passed' if result.returncode == 0 else 'FAILED'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
