"""The dense path in half precision: ``reference`` runs the products of the dot-family kernels in the
inputs' half dtype where the CPU multiplies half natively, and ``auto`` prices that path."""

import pytest
import torch

import nonlocal_ext
from nonlocal_ext.backends import cost, reference

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


@pytest.mark.parametrize("dtype", HALF)
def test_half_class_names_the_instructions_of_the_half_products(dtype):
    q = torch.randn(1, 3, 2, dtype=dtype)
    expected = "amx" if torch.cpu._is_amx_tile_supported() else "avx512"
    for kernel in ("gaussian", "rbf"):
        spec = spec_of(q, q, q, kernel)
        assert reference.half_class(spec, q) == (expected if reference.half_products(spec, q) else None)


def test_auto_prices_half_inputs_by_the_class_and_gemm_rates_of_this_cpu(monkeypatch):
    seen = []
    monkeypatch.setattr(cost, "choose", lambda *args, **kwargs: seen.append((args[9], kwargs)) or "reference")
    q = torch.empty(2, 40, 8, dtype=torch.bfloat16)
    spec = spec_of(q, q, q, "gaussian", backend="auto")
    assert nonlocal_ext.backends.select("auto", spec, q, q, q) is reference
    half = reference.half_class(spec, q)
    assert seen == [(half, {"half_ratio": cost.half_gemm_ratio(torch.bfloat16) if half else None,
                            "fused_scale": cost.fused_speed_scale()})]


def test_half_gemm_ratio_is_measured_once_per_process_and_dtype(monkeypatch):
    calls = []
    rates = {torch.bfloat16: 400.0, torch.float16: 90.0, torch.float32: 200.0}
    monkeypatch.setattr("nonlocal_ext.benchmark.measure.gemm_gflops",
                        lambda device, dtype, size: calls.append((device, dtype, size)) or rates[dtype])
    cost.MEASURED.clear()
    try:
        assert cost.half_gemm_ratio(torch.bfloat16) == 2.0 and cost.half_gemm_ratio(torch.float16) == 0.45
        assert cost.half_gemm_ratio(torch.bfloat16) == 2.0
        assert len(calls) == 8 and {c[0] for c in calls} == {"cpu"} and {c[2] for c in calls} == {cost.RATIO_GEMM_SIZE}
    finally:
        cost.MEASURED.clear()
    with pytest.raises(ValueError, match="dtype"):
        cost.half_gemm_ratio(torch.float32)
    with pytest.raises(ValueError, match="half_ratio"):  # half inputs are priced only with a ratio
        cost.prices(2, 784, 196, 256, 256, "gaussian", "row", False, True, "avx512", True)


def test_half_gemm_ratio_times_the_dtypes_asked_for_under_autocast(monkeypatch):
    """A first ``auto`` call inside CPU autocast must not time float32 products that ran in bfloat16."""
    seen = []
    monkeypatch.setattr("nonlocal_ext.benchmark.measure.gemm_gflops",
                        lambda device, dtype, size: seen.append(torch.is_autocast_enabled("cpu")) or 1.0)
    cost.MEASURED.clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cost.half_gemm_ratio(torch.bfloat16)
    finally:
        cost.MEASURED.clear()
    assert seen and not any(seen)


#: bfloat16 / float32 torch.mm rates measured on three CPUs (bench/NOTES.md): a Sapphire Rapids with AMX (≈ 600 /
#: 185 GFLOP/s), the AVX512-BF16 machine of the fitted suite (147 / 267) and another one (397 / 194).
AMX_RATIO, SLOW_HALF_RATIO, FAST_HALF_RATIO = 600 / 185, 147 / 267, 397 / 194


@pytest.mark.parametrize("batch,n,m,d,c,backward", [
    (2, 3400, 850, 512, 512, False),  # detection res4: dense half products ≈ 4× the float32 ones on AMX
    (2, 3400, 850, 512, 512, True),
    (8, 784, 196, 256, 256, True),    # res3
])
def test_auto_takes_the_dense_half_products_on_amx_at_block_shapes(batch, n, m, d, c, backward):
    assert cost.choose(batch, n, m, d, c, "gaussian", "row", False, backward, "amx", True,
                       half_ratio=AMX_RATIO) == "reference"


@pytest.mark.parametrize("backward", [False, True])
def test_auto_takes_float32_blocks_where_half_products_are_slower(backward):
    """Where bf16 products are slower than float32 ones (the measured suite's machine: bf16 GEMM 147 against
    float32 267 GFLOP/s) ``chunked``, which computes in float32, was the fastest in bf16 at the large shapes
    (detection res4, N = M = 4096)."""
    for batch, n, m, d in ((2, 3400, 850, 512), (2, 4096, 4096, 128)):
        assert cost.choose(batch, n, m, d, d, "gaussian", "row", False, backward, "avx512", True,
                           half_ratio=SLOW_HALF_RATIO) == "chunked"


@pytest.mark.parametrize("backward", [False, True])
def test_auto_takes_the_dense_half_products_where_they_are_faster_without_amx(backward):
    """The same CPU class with bf16 products 2× float32 (397 against 194 GFLOP/s): there the dense bf16 products
    were 2.4–3.2× faster than ``chunked`` at detection res4, which the class alone had priced the other way."""
    assert cost.choose(2, 3400, 850, 512, 512, "gaussian", "row", False, backward, "avx512", True,
                       half_ratio=FAST_HALF_RATIO) == "reference"


def test_auto_keeps_the_fused_kernels_at_attention_shapes_in_half_on_amx():
    """N = M = 4096, D = 64, C = 128: the fused forward (no N×M matrix) stays ahead in bfloat16."""
    assert cost.choose(1, 4096, 4096, 64, 128, "gaussian", "row", False, False, "amx", True,
                       half_ratio=AMX_RATIO) == "cpu"
