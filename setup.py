"""Build nonlocal_ext: the Python package, its Triton kernels and the C++ op library `_C`.

Build against the torch that is already installed (the extension must match its ABI):

    pip install --no-build-isolation -e .      # from the repository root; or: make test

Nothing here looks at the GPU of the build machine: what gets built depends only on the
sources and on how the installed torch was built.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:  # pragma: no cover - only hit by a misconfigured build
    raise RuntimeError(
        "nonlocal_ext builds its C++ extension against the installed torch: install torch>=2.4 "
        "first, then run `pip install --no-build-isolation -e .` (without "
        "--no-build-isolation pip builds in an empty environment that has no torch)."
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_pip_ninja():
    """Put the `ninja` of the pip package on PATH when no other ninja is there.

    BuildExtension looks for ninja on PATH only, so `.venv/bin/pip install ...` without an
    activated venv would otherwise fall back silently to the slow serial distutils build.
    """
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _openmp_flags():
    """-fopenmp when torch's at::parallel_for is the OpenMP one, else nothing.

    at::parallel_for is inlined from ATen/ParallelOpenMP.h, which runs serially unless the
    extension itself is compiled with _OPENMP defined. At load time the extension binds to the
    libgomp.so.1 that torch has already loaded, so there is one OpenMP runtime.
    """
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []  # e.g. macOS clang without libomp: kernels still work, single-threaded


def _extensions():
    sources = sorted(
        os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
    )
    openmp = _openmp_flags()
    return [
        CppExtension(
            name="nonlocal_ext._C",
            sources=sources,
            # -fno-trapping-math lets the compiler if-convert the branch-free exp/log of
            # csrc/tile_math.h and vectorize their loops (torch itself builds with it); it
            # changes no result, only whether FP exception flags may be raised speculatively.
            extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"] + openmp},
            extra_link_args=openmp,
        )
    ]


def _packages():
    # triton_kernels/ lives at the top level but installs as nonlocal_ext.triton_kernels, so
    # that it cannot clash with the unrelated `triton_kernels` distribution on PyPI.
    kernels = ["nonlocal_ext.triton_kernels"] + [
        "nonlocal_ext.triton_kernels." + name for name in find_packages(where="triton_kernels")
    ]
    return find_packages(include=["nonlocal_ext", "nonlocal_ext.*"]) + kernels


_use_pip_ninja()

setup(
    name="nonlocal_ext",
    version="0.1.0",
    description="Fused, memory-efficient nonlocal (pairwise affinity) operators for PyTorch",
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    # `nonlocal-bench --plot` only: pip install 'nonlocal_ext[plot]'
    extras_require={"plot": ["matplotlib>=3.5"]},
    packages=_packages(),
    package_dir={"nonlocal_ext.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    entry_points={"console_scripts": ["nonlocal-bench = nonlocal_ext.benchmark.cli:main"]},
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
