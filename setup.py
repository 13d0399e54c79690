"""Build nonlocal_ext: the Python package, its Triton kernels and the C++ op library.

The C++ library is always compiled against the torch the package runs with (its C++ ABI):

    pip install --no-build-isolation .   # torch installed first: builds nonlocal_ext._C now
    pip install .                        # pip's isolated build environment has no torch: a
                                         # pure-Python wheel that carries csrc/, compiled on
                                         # first import (see nonlocal_ext/_extension.py)

Project metadata is in pyproject.toml; the compile recipe (sources, flags) in
nonlocal_ext/_build.py, shared with the compile on first use. Nothing here looks at the GPU of
the build machine: what gets built depends only on the sources and on the installed torch.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _recipe():
    """nonlocal_ext/_build.py, read by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_nonlocal_ext_build", ROOT / "nonlocal_ext" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = _recipe()

try:
    import torch
except ImportError:  # pip's build isolation: no torch to compile against here
    torch = None


def _packages():
    # triton_kernels/ lives at the top level but installs as nonlocal_ext.triton_kernels, so
    # that it cannot clash with the unrelated `triton_kernels` distribution on PyPI; csrc/
    # installs as nonlocal_ext/csrc, the sources of the compile on first use.
    kernels = ["nonlocal_ext.triton_kernels"] + [
        "nonlocal_ext.triton_kernels." + name for name in find_packages(where="triton_kernels")
    ]
    return find_packages(include=["nonlocal_ext", "nonlocal_ext.*"]) + kernels + ["nonlocal_ext.csrc"]


def _extensions_and_commands():
    """The ahead-of-time `_C` and its build command, or nothing when torch is not importable."""
    if torch is None:
        print("nonlocal_ext: torch is not importable in this build environment (pip's build "
              "isolation), so nonlocal_ext._C is not built now; its C++ kernels are compiled on "
              "first import against the installed torch. `pip install --no-build-isolation .` "
              "builds them now.", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension that writes, beside each library, the torch it was compiled against."""

        def build_extension(self, ext):
            super().build_extension(ext)
            stamp = Path(self.get_ext_fullpath(ext.name)).with_name(RECIPE.TORCH_STAMP)
            stamp.write_text(RECIPE.torch_build_id(torch) + "\n")

        def copy_extensions_to_source(self):  # editable installs: the stamp goes in place too
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace, regular = self._get_inplace_equivalent(build_py, ext)
                self.copy_file(Path(regular).with_name(RECIPE.TORCH_STAMP),
                               Path(inplace).with_name(RECIPE.TORCH_STAMP))

    ninja = RECIPE.ninja_bin_dir()  # BuildExtension finds ninja on PATH only
    if ninja is not None:
        os.environ["PATH"] = ninja + os.pathsep + os.environ.get("PATH", "")
    csrc = RECIPE.source_dir()
    openmp = RECIPE.openmp_flags(torch)
    extension = CppExtension(
        name="nonlocal_ext._C",
        sources=[os.path.relpath(path, ROOT) for path in RECIPE.sources(csrc)],
        depends=[os.path.relpath(path, ROOT) for path in RECIPE.headers(csrc)],
        extra_compile_args={"cxx": RECIPE.CXX_FLAGS + openmp},
        extra_link_args=openmp,
    )
    return [extension], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions_and_commands()

setup(
    packages=_packages(),
    package_dir={"nonlocal_ext.triton_kernels": "triton_kernels", "nonlocal_ext.csrc": "csrc"},
    package_data={"nonlocal_ext.csrc": ["*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
