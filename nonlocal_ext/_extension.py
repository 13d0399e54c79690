"""Loading of the C++ op library, built ahead of time or compiled on first use.

Loading it registers the ``torch.ops.nonlocal_ext.*`` operators (their schemas and C++ kernels),
which ``backend="cpu"`` calls. It is always compiled against the torch imported now:

1. ``nonlocal_ext._C``, which ``pip install --no-build-isolation .`` builds ahead of time, is
   imported when the torch it was built for (recorded beside it) is the torch imported now;
2. otherwise the package's ``csrc/`` is compiled with ``torch.utils.cpp_extension.load`` (same
   sources and flags, see :mod:`nonlocal_ext._build`; ninja from the ``ninja`` package) into
   ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), once per Python, torch
   install, compiler and source version; one line on stderr says so while it builds (minutes). This is the path
   of ``pip install .`` with pip's default build isolation, whose build environment has no torch.
   ``NONLOCAL_EXT_JIT=0`` turns it off;
3. if neither works, a RuntimeWarning says why and which backends run instead, and
   ``backend="cpu"`` raises with the same reason. The other backends do not need the library.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch  # loads libtorch (and its libgomp) before the library links to them

from . import _build

#: Name of the library compiled on first use (not ``_C``: the cache directory is shared with
#: other projects' extensions).
JIT_NAME = "nonlocal_ext_C"

#: Set to 0 to never compile on first use.
JIT_SWITCH = "NONLOCAL_EXT_JIT"

_BUILD_HINT = (
    "It is compiled on first import against the installed torch (this needs a C++ compiler and "
    "ninja), or built ahead of time from the repository root with "
    "`pip install --no-build-isolation -e .` (or `make test`, which sets up .venv and builds it)."
)

#: How the library was loaded, for ``python -m nonlocal_ext.info``: ``how`` is "ahead-of-time",
#: "jit" or "missing"; ``path`` the loaded file; ``detail`` why the ahead-of-time ``_C`` was not
#: used, or why nothing was loaded; ``compile_seconds`` when this process compiled it.
status: dict = {"how": "missing", "path": None, "detail": "", "compile_seconds": None}

_import_error: Exception | None = None


def extension_available() -> bool:
    """Whether the op library is loaded and ``torch.ops.nonlocal_ext`` is registered."""
    return _import_error is None


def require_extension(feature: str) -> None:
    """Raise RuntimeError, saying what is missing and how to build it, unless the library is loaded.

    `feature` names what needs the extension, e.g. "backend='cpu'".
    """
    if _import_error is None:
        return
    raise RuntimeError(
        f"{feature} needs the compiled extension nonlocal_ext._C, which could not be loaded "
        f"({type(_import_error).__name__}: {_import_error}). {_BUILD_HINT}"
    ) from _import_error


def jit_build_directory() -> Path:
    """Where the library compiled on first use lives: one directory per Python, torch (version and
    install location), compiler and recipe (sources, headers, flags), so nothing compiled for
    another torch or source is ever loaded, and ninja finds the same build each time."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # torch's include and library paths as torch.utils.cpp_extension writes them (not resolved)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    toolchain = [torch_dir, sysconfig.get_paths()["include"], _compiler()]
    digest = _build.recipe_digest(_build.source_dir(), _jit_flags(), " ".join(toolchain))
    return Path(root) / f"{sys.implementation.cache_tag}_torch{torch.__version__}" / f"{JIT_NAME}-{digest}"


def _compiler() -> str:
    return os.environ.get("CXX", "c++")  # as torch.utils.cpp_extension picks it


def _jit_flags() -> list[str]:
    return _build.CXX_FLAGS + _build.openmp_flags(torch)


def _ahead_of_time() -> tuple[str | None, str]:
    """(path of ``_C``, "") when it was built for the torch imported now, else (None, why not)."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or spec.origin is None:
        return None, ("nonlocal_ext._C was not built ahead of time (pip's default build isolation "
                      "builds without torch)")
    stamp = Path(spec.origin).with_name(_build.TORCH_STAMP)
    built_for = stamp.read_text().strip() if stamp.is_file() else "an unrecorded torch"
    running = _build.torch_build_id(torch)
    if built_for != running:
        return None, f"nonlocal_ext._C was built for torch {built_for}, but torch {running} is imported"
    return spec.origin, ""


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with a ``ninja`` on it while torch builds (see :func:`nonlocal_ext._build.ninja_bin_dir`)."""
    extra = _build.ninja_bin_dir()
    if extra is None:
        if shutil.which("ninja") is None:
            raise RuntimeError("no ninja: neither `ninja` on PATH nor the `ninja` package "
                               "(pip install ninja)")
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = extra + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _staged_sources(directory: Path, build_dir: Path) -> list[Path]:
    """The sources copied into the build directory (once): ninja then sees the same paths from
    every copy of the package, so a second install does not rebuild (the directory's name is
    the digest of their content)."""
    staged = build_dir / "csrc"
    if not staged.is_dir():
        scratch = Path(tempfile.mkdtemp(prefix="csrc-", dir=build_dir))
        for path in _build.sources(directory) + _build.headers(directory):
            shutil.copy2(path, scratch / path.name)
        try:
            scratch.rename(staged)
        except OSError:  # another process staged them first
            shutil.rmtree(scratch)
    return _build.sources(staged)


def _compile_and_load() -> Path:
    """Compile csrc/ for the imported torch unless compiled already, load it, return its path."""
    from torch.utils.cpp_extension import load

    directory = _build.source_dir()
    if not _build.sources(directory):
        raise RuntimeError(f"the C++ sources are missing: no *.cpp in {directory}")
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: `{compiler}` is not on PATH (install g++ or clang++, "
                           f"or set CXX to one)")
    build_dir = jit_build_directory()
    library = build_dir / f"{JIT_NAME}.so"
    start = time.perf_counter()
    compiles = not library.is_file()  # else ninja only checks that it is up to date
    if compiles:
        print(f"nonlocal_ext: compiling the C++ kernels for torch {torch.__version__} on first use "
              f"(a few minutes, once) into {build_dir}", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = _staged_sources(directory, build_dir)
    with _ninja_on_path():
        load(name=JIT_NAME, sources=[str(path) for path in sources], extra_cflags=_jit_flags(),
             extra_ldflags=_build.openmp_flags(torch), build_directory=str(build_dir),
             is_python_module=False, verbose=False)
    if compiles:
        status["compile_seconds"] = round(time.perf_counter() - start, 1)
    return library


def _summary(error: Exception) -> str:
    """The error message, cut to its error lines when it carries a compiler log."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 3:
        return " ".join(lines)
    errors = [line for line in lines if "error" in line.lower()][:3]
    return " | ".join([lines[0]] + (errors or lines[-3:]))


def _fail(reason: str) -> None:
    global _import_error
    _import_error = RuntimeError(reason)
    status.update(how="missing", path=None, detail=reason)
    warnings.warn(
        f"nonlocal_ext: the C++ kernels are unavailable: {reason}. backend='auto' runs CPU tensors "
        f"on the pure PyTorch backends instead ('reference' for small problems, 'chunked' for large "
        f"ones, 'linear' for kernel='dot'); backend='cpu' raises. {_BUILD_HINT}",
        RuntimeWarning, stacklevel=2)


def _load() -> None:
    path, why_not = _ahead_of_time()
    if path is not None:
        try:
            from . import _C  # noqa: F401  # imported for its TORCH_LIBRARY registrations
        except ImportError as error:
            why_not = f"nonlocal_ext._C did not import ({type(error).__name__}: {error})"
        else:
            status.update(how="ahead-of-time", path=path, detail="")
            return
    if os.environ.get(JIT_SWITCH, "1") == "0":
        _fail(f"{why_not}, and {JIT_SWITCH}=0 turns off compiling it on first use")
        return
    try:
        library = _compile_and_load()
    except Exception as error:  # no compiler, no ninja, a compile or load error: say which
        _fail(f"{why_not}, and compiling it on first use failed: {_summary(error)}")
        return
    status.update(how="jit", path=str(library), detail=why_not)


_load()
