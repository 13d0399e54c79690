"""Loading of the compiled extension `nonlocal_ext._C`.

Importing `_C` registers the `torch.ops.nonlocal_ext.*` operators (their schemas and C++
kernels). The extension is optional for the package as a whole: the reference, chunked and
Triton backends work without it, so a failed load is remembered here and reported only when a
feature that needs it is used.
"""

import torch  # noqa: F401  # loads libtorch (and its libgomp) before the extension links to it

_BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` "
    "(against the installed torch), or run `make test`, which sets up .venv and builds it."
)

try:
    from . import _C  # noqa: F401  # imported for its TORCH_LIBRARY registrations
except ImportError as error:  # not built, or built against another torch
    _import_error = error
else:
    _import_error = None


def extension_available() -> bool:
    """Whether `nonlocal_ext._C` is loaded and `torch.ops.nonlocal_ext` is registered."""
    return _import_error is None


def require_extension(feature: str) -> None:
    """Raise RuntimeError, saying what is missing and how to build it, unless `_C` is loaded.

    `feature` names what needs the extension, e.g. "backend='cpu'".
    """
    if _import_error is None:
        return
    raise RuntimeError(
        f"{feature} needs the compiled extension nonlocal_ext._C, which could not be imported "
        f"({type(_import_error).__name__}: {_import_error}). {_BUILD_HINT}"
    ) from _import_error
