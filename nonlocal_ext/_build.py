"""How the C++ op library is compiled: one recipe for both ways of building it.

* ahead of time: ``setup.py`` (``pip install --no-build-isolation .``) builds ``nonlocal_ext._C``;
* on first use: :mod:`nonlocal_ext._extension` compiles the same sources with the same flags
  through ``torch.utils.cpp_extension.load`` against the torch imported at run time.

``setup.py`` reads this file by path, without importing the package (the build environment may
have no torch), so it imports nothing but the standard library at the top level.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

#: Compiler flags of every translation unit. -fno-trapping-math lets the compiler if-convert the
#: branch-free exp/log of csrc/tile_math.h and vectorize their loops (torch itself builds with it);
#: it changes no result, only whether FP exception flags may be raised speculatively.
CXX_FLAGS = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"]

#: File written beside the ahead-of-time ``_C`` naming the torch it was compiled against; ``_C`` is
#: imported only by that same torch (another one may not share its C++ ABI).
TORCH_STAMP = "_C.torch_version"


def source_dir() -> Path:
    """``csrc/``: inside the installed package (wheels carry it as ``nonlocal_ext/csrc``), or
    beside the package in a source checkout or an editable install."""
    installed = PACKAGE_DIR / "csrc"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "csrc"


def sources(directory: Path) -> list[Path]:
    """The translation units, in a fixed order."""
    return sorted(directory.glob("*.cpp"))


def headers(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.h"))


def openmp_flags(torch) -> list[str]:
    """-fopenmp when torch's at::parallel_for is the OpenMP one, else nothing.

    at::parallel_for is inlined from ATen/ParallelOpenMP.h, which runs serially unless the
    extension itself is compiled with _OPENMP defined. At load time the extension binds to the
    libgomp.so.1 that torch has already loaded, so there is one OpenMP runtime.
    """
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []  # e.g. macOS clang without libomp: kernels still work, single-threaded


def torch_build_id(torch) -> str:
    """What identifies a torch build for ABI purposes: its version (with the +cpu/+cuXYZ local
    tag) and the commit it was built from."""
    return f"{torch.__version__} {torch.version.git_version}"


def recipe_digest(directory: Path, flags: list[str], toolchain: str = "") -> str:
    """A digest of the sources, headers, flags and `toolchain` (e.g. where torch is installed,
    whose headers and libraries the build uses): the directory of a compile on first use is
    named by it, so a library compiled from anything else is never loaded or silently rebuilt."""
    digest = hashlib.sha256()
    for path in sources(directory) + headers(directory):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join(flags + [toolchain]).encode())
    return digest.hexdigest()[:16]


def ninja_bin_dir() -> str | None:
    """The directory to put on PATH for ``ninja``: torch looks for it on PATH only, and the
    ``ninja`` package's binary is off PATH in a venv used without activating it. None when a
    ``ninja`` is on PATH already, or when there is none to add."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR
