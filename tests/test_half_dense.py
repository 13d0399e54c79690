"""The dense path in half precision: ``reference`` runs the products of the dot-family kernels in the
inputs' half dtype where the CPU multiplies half natively, and ``auto`` prices that path."""

import pytest
import torch

import nonlocal_ext
from nonlocal_ext.backends import cpu, reference

HALF = (torch.bfloat16, torch.float16)


def spec_of(q, k, v, kernel, normalize="row", backend="reference"):
    return nonlocal_ext.spec.validate(q, k, v, kernel, scale=0.125, power=1.0 if kernel == "fractional" else None,
                                      gamma=None, eps=None, normalize=normalize, update="aggregate",
                                      symmetric=False, self_value=None, backend=backend)


@pytest.mark.parametrize("dtype", HALF)
def test_half_products_only_for_dot_kernels_on_cpus_that_multiply_half(dtype):
    q = torch.randn(1, 3, 2, dtype=dtype)
    native = {torch.bfloat16: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
              torch.float16: torch.cpu._is_amx_fp16_supported()}[dtype]
    for kernel in nonlocal_ext.kernels.KERNELS.values():
        expected = native and kernel.family == "dot"
        assert reference.half_products(spec_of(q, q, q, kernel.name), q) is expected, kernel.name
    assert not reference.half_products(spec_of(q.float(), q.float(), q.float(), "gaussian"), q.float())


@pytest.mark.parametrize("dtype", HALF)
def test_reference_in_half_is_plain_dense_in_half_or_in_float32(dtype):
    """Where the products run in half, ``gaussian`` + ``row`` is exactly ``softmax(s · q kᵀ) v`` in that
    dtype, values and gradients; elsewhere exactly the same formula in float32, rounded to half once
    (the float64 comparisons of the suite hold both to the tolerance rule)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, n, 24, dtype=dtype, requires_grad=True) for n in (37, 19, 19))
    grad = torch.randn(2, 37, 24, dtype=dtype)
    ours = nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", scale=0.125, normalize="row", backend="reference")
    if reference.half_products(spec_of(q, k, v, "gaussian"), q):
        plain = torch.softmax(0.125 * (q @ k.transpose(1, 2)), dim=-1) @ v
    else:
        q32, k32, v32 = q.float(), k.float(), v.float()
        plain = (torch.softmax(0.125 * (q32 @ k32.transpose(1, 2)), dim=-1) @ v32).to(dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, plain)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    plain_grads = torch.autograd.grad(plain, (q, k, v), grad)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def auto_pick(dtype, batch, n, m, d, c, backward):
    q, k, v = (torch.empty(1, rows, cols, dtype=dtype).expand(batch, rows, cols) for rows, cols in ((n, d), (m, d), (m, c)))
    spec = spec_of(q, k, v, "gaussian", backend="auto")
    return nonlocal_ext.backends.select("auto", spec, q, k, v, backward=backward), spec, q


@pytest.mark.parametrize("batch,n,m,d,c,backward", [
    (2, 3400, 850, 512, 512, False),  # detection res4: dense half products ≈ 4× the float32 ones
    (2, 3400, 850, 512, 512, True),
    (8, 784, 196, 256, 256, True),    # res3
])
def test_auto_takes_the_dense_half_products_at_block_shapes(batch, n, m, d, c, backward):
    pick, spec, q = auto_pick(torch.bfloat16, batch, n, m, d, c, backward)
    if reference.half_products(spec, q):
        assert pick is reference
    else:  # priced as float32 work: the same choice as for float32 inputs
        assert pick is auto_pick(torch.float32, batch, n, m, d, c, backward)[0]


def test_auto_keeps_the_fused_kernels_at_attention_shapes_in_half():
    """N = M = 4096, D = 64, C = 128: the fused forward (no N×M matrix) stays ahead in bfloat16."""
    pick, _, _ = auto_pick(torch.bfloat16, 1, 4096, 4096, 64, 128, False)
    assert pick is cpu
