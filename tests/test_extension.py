"""The compiled extension: it builds, loads, and registers the op schemas the backends rely on.

Run alone: .venv/bin/python -m pytest -q tests/test_extension.py
"""

import pytest
import torch

from nonlocal_ext import _extension

# The schemas exactly as csrc/nonlocal_ext.cpp defines them; the backends call these ops by name.
EXPECTED_SCHEMAS = {
    "aggregate_forward": (
        "nonlocal_ext::aggregate_forward(Tensor query, Tensor key, Tensor value, "
        "Tensor? self_value, str kernel, float scale, float power, float gamma, float eps, "
        "str normalize, str update, bool symmetric, bool keep_products=False) "
        "-> (Tensor out, Tensor row_stats, Tensor col_stats, Tensor products)"
    ),
    "aggregate_backward": (
        "nonlocal_ext::aggregate_backward(Tensor grad_out, Tensor query, Tensor key, "
        "Tensor value, Tensor? self_value, Tensor out, Tensor row_stats, Tensor col_stats, "
        "str kernel, float scale, float power, float gamma, float eps, str normalize, "
        "str update, bool symmetric, Tensor? products=None) "
        "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor? grad_self_value)"
    ),
}

# Argument names spelled out as well, so that a renamed argument shows up in the diff by name.
ARGUMENT_NAMES = {
    "aggregate_forward": [
        "query", "key", "value", "self_value", "kernel", "scale", "power", "gamma", "eps",
        "normalize", "update", "symmetric", "keep_products",
    ],
    "aggregate_backward": [
        "grad_out", "query", "key", "value", "self_value", "out", "row_stats", "col_stats",
        "kernel", "scale", "power", "gamma", "eps", "normalize", "update", "symmetric", "products",
    ],
}


def test_extension_is_built_in_dev_environment():
    # `make test` builds _C before running the tests, so a failure here is a build problem.
    assert _extension.extension_available(), _extension._import_error
    _extension.require_extension("the test suite")  # must not raise


@pytest.mark.parametrize("op_name", sorted(EXPECTED_SCHEMAS))
def test_op_schema(op_name):
    schema = getattr(torch.ops.nonlocal_ext, op_name).default._schema
    expected = torch._C.parse_schema(EXPECTED_SCHEMAS[op_name])

    assert [arg.name for arg in schema.arguments] == ARGUMENT_NAMES[op_name]
    assert [(arg.name, str(arg.type)) for arg in schema.arguments] == [
        (arg.name, str(arg.type)) for arg in expected.arguments
    ]
    assert [(ret.name, str(ret.type)) for ret in schema.returns] == [
        (ret.name, str(ret.type)) for ret in expected.returns
    ]
    assert schema == expected  # also: no alias annotations, nothing mutated in place


def test_require_extension_reports_missing_build(monkeypatch):
    missing = ImportError("No module named 'nonlocal_ext._C'")
    monkeypatch.setattr(_extension, "_import_error", missing)

    assert not _extension.extension_available()
    with pytest.raises(RuntimeError) as info:
        _extension.require_extension("backend='cpu'")
    message = str(info.value)
    assert "backend='cpu'" in message
    assert "No module named 'nonlocal_ext._C'" in message
    assert "pip install --no-build-isolation -e ." in message
    assert "make test" in message
    assert info.value.__cause__ is missing


@pytest.mark.parametrize("op_name", sorted(EXPECTED_SCHEMAS))
def test_one_op_per_pass_serves_both_fused_backends(op_name):
    """One op per pass, with backends/_common.py's schema: its CPU kernel is the C++ one, its CUDA kernel
    the Triton launcher (one fake kernel, one autograd formula); no second pair of ops."""
    from nonlocal_ext.backends import _common, triton  # noqa: F401 - triton registers its CUDA kernels on import

    shared = {"aggregate_forward": _common.FORWARD_SCHEMA, "aggregate_backward": _common.BACKWARD_SCHEMA}[op_name]
    schema = getattr(torch.ops.nonlocal_ext, op_name).default._schema
    assert schema == torch._C.parse_schema(f"nonlocal_ext::{op_name}{shared}")
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nonlocal_ext::{op_name}", key), key
    assert _common.cpu_kernels_owner() == "cpu"
    assert not [name for name in dir(torch.ops.nonlocal_ext) if name.startswith("triton_")]
