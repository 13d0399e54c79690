"""The suite on CUDA tensors: every backend that runs on a GPU against the float64 reference, plus the
checks only a GPU can make. Skipped, with the reason "needs CUDA", where torch sees no CUDA device (the
closing summary counts them, tests/conftest.py); `make gpu-check` runs this file first.

* ``reference``, ``chunked``, ``linear`` on CUDA: the cases of tests/test_backends.py (every combination
  at the odd sizes, float64 and float32), judged by the same rule (tests/common.py).
* ``triton`` natively (compiled kernels, autotuned): the cases of the interpreter suite
  (tests/triton_cases.py): all 120 combinations, the odd sizes, even feature tiles, float16, bfloat16
  and the wide feature dimensions. CUDA refuses float64 for ``triton``, so the float64 cases of the
  interpreter suite run in float32 here: every float32 call goes through tf32x3 tensor-core products,
  and is judged by the float32 row of the tolerance table (the interpreter multiplies exactly, a tensor
  core rounds to tf32). Every output buffer is pre-filled with NaN (``launchers.POISON_OUTPUTS``).
* GPU-only: the autotuner's choices, ``torch.compile(fullgraph=True)`` with inductor, peak memory at
  N = M = 65536, bitwise-equal backward runs, CUDA-graph capture and replay.

Run alone: .venv/bin/python -m pytest -x -q tests/test_cuda.py
"""

from __future__ import annotations

import pytest
import torch

import nonlocal_ext
from nonlocal_ext.testing import make_inputs
from common import COMBOS, NON_DOT_KERNELS, check_against_reference, combo_id, kernel_kwargs, run
from conftest import NEEDS_CUDA
from test_backends import cases, small_blocks  # noqa: F401  (a fixture)
from triton_cases import (BFLOAT16_COMBOS, EVEN_FEATURE_COMBOS, FLOAT16_COMBOS, ODD_CASES, WIDE_CASES, case_id,
                          even_feature_shape, every_combination_shape, half_shape)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)

DEVICE = "cuda"
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Plain PyTorch in float32 is IEEE float32 here (no TF32 matmuls), whatever the session set."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel forgets to write fails."""
    from nonlocal_ext.triton_kernels import launchers
    monkeypatch.setattr(launchers, "POISON_OUTPUTS", True)
    return launchers


def cuda_tensors(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


# ---- reference, chunked, linear on CUDA: the cases of tests/test_backends.py -----------------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("reference")))
def test_reference_on_cuda(combo, shape, noncontiguous, dtype):
    """The dense reference on CUDA within the rule of the same reference on CPU in the same dtype."""
    check_against_reference("reference", combo, shape, dtype, noncontiguous, DEVICE)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("chunked")))
def test_chunked_on_cuda(small_blocks, combo, shape, noncontiguous, dtype):  # noqa: F811
    check_against_reference("chunked", combo, shape, dtype, noncontiguous, DEVICE)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("linear")))
def test_linear_on_cuda(combo, shape, noncontiguous, dtype):
    check_against_reference("linear", combo, shape, dtype, noncontiguous, DEVICE)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend,kernel", [(b, k) for b in ("reference", "chunked") for k in NON_DOT_KERNELS]
                         + [("linear", "dot")])
def test_half_precision_on_cuda(small_blocks, backend, kernel, dtype):  # noqa: F811
    for normalize in ("row", "sym"):
        check_against_reference(backend, (kernel, normalize, "diffusion", False, True), ((2,), 97, 33, 5, 3),
                                dtype, False, DEVICE)


# ---- triton natively: the cases of the interpreter suite --------------------------------------------------

def _native(dtype):
    """CUDA runs ``triton`` in float32 where the interpreter suite uses float64."""
    return F32 if dtype == F64 else dtype


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_triton_every_combination(poisoned_outputs, combo):
    """All 120 combinations, values and every gradient, float32 (tf32x3 products) on the float32 row."""
    check_against_reference("triton", combo, every_combination_shape(combo), F32, False, DEVICE)


@pytest.mark.parametrize("combo,shape,dtype", ODD_CASES, ids=[case_id(*case) for case in ODD_CASES])
def test_triton_odd_sizes(poisoned_outputs, combo, shape, dtype):
    check_against_reference("triton", combo, shape, _native(dtype), shape[1] == 130, DEVICE)


@pytest.mark.parametrize("combo", EVEN_FEATURE_COMBOS, ids=combo_id)
def test_triton_feature_tiles_that_divide_d_and_c(poisoned_outputs, combo):
    check_against_reference("triton", combo, even_feature_shape(combo), F32, False, DEVICE)


@pytest.mark.parametrize("combo", FLOAT16_COMBOS, ids=combo_id)
def test_triton_float16(poisoned_outputs, combo):
    check_against_reference("triton", combo, half_shape(combo, F16), F16, False, DEVICE)


@pytest.mark.parametrize("combo", BFLOAT16_COMBOS, ids=combo_id)
def test_triton_bfloat16(poisoned_outputs, combo):
    """Natively: real bfloat16 tensor-core products (no interpreter patch)."""
    check_against_reference("triton", combo, half_shape(combo, BF16), BF16, True, DEVICE)


@pytest.mark.parametrize("combo,shape,dtype", WIDE_CASES, ids=[case_id(*case) for case in WIDE_CASES])
def test_triton_wide_features(poisoned_outputs, combo, shape, dtype):
    check_against_reference("triton", combo, shape, _native(dtype), False, DEVICE)


# ---- checks only a GPU can make ----------------------------------------------------------------------------

TF32_COMBOS = [(kernel, "row", "aggregate", False, False) for kernel in NON_DOT_KERNELS] \
    + [("gaussian", "sym", "diffusion", True, False), ("fractional", "sym", "diffusion", False, True)]


@pytest.mark.parametrize("combo", TF32_COMBOS, ids=combo_id)
def test_float32_through_tf32x3_within_the_float32_row(poisoned_outputs, combo):
    """Real tensor-core rounding over long reductions (M = 1000 keys, D = 64, C = 128): tf32x3 products of
    float32 inputs stay within the float32 row of the tolerance table, values and all gradients."""
    from nonlocal_ext.triton_kernels.launchers import variant_constexprs
    from nonlocal_ext.backends.triton import _spec
    spec = _spec(combo[0], 1.0, 1.5, -3.0, 1e-4, combo[1], combo[2], combo[3])
    assert variant_constexprs(spec, F32)["QK_PRECISION"] == "tf32x3"
    check_against_reference("triton", combo, ((), 1000, 1000, 64, 128), F32, False, DEVICE)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kernel", ["gaussian", "fractional"])
def test_half_precision_target_shapes(poisoned_outputs, kernel, dtype):
    """The targets' variants (row, aggregate) at D = C = 64 over 1000 keys, values and all gradients."""
    check_against_reference("triton", (kernel, "row", "aggregate", False, False), ((2,), 1000, 1000, 64, 64),
                            dtype, False, DEVICE)


def test_poisoned_buffers_are_nan(poisoned_outputs):
    """The NaN pre-fill of the tests above is real on CUDA (else "fully written" would be checked on zeros)."""
    buffer = poisoned_outputs._new((3, 5), F32, torch.device(DEVICE))
    assert buffer.is_cuda and buffer.isnan().all()


def _signature(config):
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def test_autotuner_picks_only_entries_of_the_devices_target_list():
    """Launches on this GPU autotune over the list verified (spill-free) for its compute capability's target,
    and every configuration the autotuner chose is an entry of that list."""
    from nonlocal_ext.triton_kernels import configs, launchers
    capability = torch.cuda.get_device_capability()
    target = configs.target_of(capability)
    launchers._TUNED.clear()
    for dtype in (F16, F32):
        for combo in [("gaussian", "row", "aggregate", False, False), ("fractional", "sym", "diffusion", True, False)]:
            q, k, v, u = cuda_tensors(*make_inputs(combo[0], combo[1], (), 512, 512, 64, 64, with_self_value=False,
                                                   dtype=dtype))
            grad_out = torch.randn(512, 64, device=DEVICE, dtype=dtype)
            run("triton", q, k, v, u, *combo[:4], grad_out, **kernel_kwargs(combo[0]))
    assert launchers._TUNED, "no autotuned launch was recorded"
    chosen_any = 0
    for (_kernel, _list_id), tuner in launchers._TUNED.items():
        listed = {_signature(c) for c in tuner.configs}
        assert all(target in configs.archs_of(c) for c in tuner.configs), \
            f"{target} ({capability}) autotunes over entries not verified for it: {tuner.configs}"
        chosen = list(tuner.cache.values()) + [c for c in [getattr(tuner, "best_config", None)] if c is not None]
        assert all(_signature(c) in listed for c in chosen), (chosen, tuner.configs)
        chosen_any += len(chosen)
    assert chosen_any
    half_forward = configs.for_target(configs.configs_for("forward", False, width=64), target)
    assert any(list_id == id(half_forward) for _, list_id in launchers._TUNED)
    if target == configs.SM80:  # the sm_90-only forward entry is not a candidate on sm_8x
        assert len(half_forward) < len(configs.configs_for("forward", False, width=64))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_torch_compile_fullgraph_with_inductor(dtype):
    """torch.compile(fullgraph=True) with the default inductor backend (generated Triton code around the custom
    op), forward and backward, against eager."""
    torch._dynamo.reset()
    q, k, v, _ = cuda_tensors(*make_inputs("gaussian", "row", (2,), 300, 300, 64, 48, with_self_value=False,
                                           dtype=dtype))

    def f(q, k, v):
        out = nonlocal_ext.nonlocal_aggregate(q * 2.0, k, v, "gaussian", normalize="row", update="diffusion",
                                              backend="triton")
        return torch.nn.functional.gelu(out) + v

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, expected = compiled(*leaves), f(*eager_leaves)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out, expected, **tolerance)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, **tolerance)


@pytest.mark.parametrize("dtype", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize("kernel", ["gaussian", "fractional"])
def test_memory_growth_without_an_n_by_m_buffer(kernel, dtype):
    """N = M = 65536, D = C = 64, forward + backward: the allocator's peak growth stays within 2× of inputs +
    outputs (out and the gradients) + statistics; one N×M buffer alone would be thousands of times that."""
    n = m = 65536
    d = c = 64
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = (torch.randn(n, d, device=DEVICE, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    k = (torch.randn(m, d, device=DEVICE, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    v = torch.randn(m, c, device=DEVICE, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(n, c, device=DEVICE, generator=g).to(dtype)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize="row", backend="triton",
                                          **kernel_kwargs(kernel))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    size = dtype.itemsize
    inputs = (n * d + m * d + m * c) * size
    outputs = n * c * size + inputs
    statistics = (n + m) * 4
    bound = 2 * (inputs + outputs + statistics)
    assert growth <= bound, (f"peak growth {growth / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB (2 × inputs + "
                             f"outputs + statistics); an N×M buffer is {n * m * size / 2**20:.0f} MiB")
    assert all(t.isfinite().all() for t in (out, *grads))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("combo", [("fractional", "sym", "diffusion", True, True), ("gaussian", "row", "aggregate",
                                                                                    False, False)], ids=combo_id)
def test_two_backward_runs_are_bitwise_equal(combo, dtype):
    """No atomics: every gradient element is reduced in a fixed order, so two runs agree bit for bit."""
    q, k, v, u = cuda_tensors(*make_inputs(combo[0], combo[1], (2,), 700, 700, 64, 64, with_self_value=combo[4],
                                           dtype=dtype))
    grad_out = torch.randn(2, 700, 64, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2)).to(dtype)
    first = run("triton", q, k, v, u, *combo[:4], grad_out, **kernel_kwargs(combo[0]))
    second = run("triton", q, k, v, u, *combo[:4], grad_out, **kernel_kwargs(combo[0]))
    for name, a, b in zip(["out", "dq", "dk", "dv", "du"], [first[0]] + first[1], [second[0]] + second[1]):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("combo", [("gaussian", "row", "aggregate", False, False),
                                   ("fractional", "sym", "diffusion", True, False)], ids=combo_id)
def test_cuda_graph_capture_replays_forward_and_backward(combo):
    """Capture forward + backward in a CUDA graph (as a training loop does), replay it on new input data: the
    results equal eager runs on the same data, bit for bit."""
    kernel, normalize, update, symmetric, _ = combo
    shape = dict(with_self_value=False, dtype=F32)
    first = cuda_tensors(*make_inputs(kernel, normalize, (2,), 300, 300, 32, 40, seed=0, **shape))[:3]
    second = cuda_tensors(*make_inputs(kernel, normalize, (2,), 300, 300, 32, 40, seed=5, **shape))[:3]
    static = [t.clone().requires_grad_() for t in first]
    grad_out = torch.randn(2, 300, 40, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(3))

    def step():
        out = nonlocal_ext.nonlocal_aggregate(*static, kernel, normalize=normalize, update=update,
                                              symmetric=symmetric, backend="triton", **kernel_kwargs(kernel))
        return [out, *torch.autograd.grad(out, static, grad_out)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile and autotune outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for data in (second, first):
        with torch.no_grad():
            for s, x in zip(static, data):
                s.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        eager = run("triton", *data, None, *combo[:4], grad_out, **kernel_kwargs(kernel))
        for name, a, b in zip(["out", "dq", "dk", "dv"], captured, [eager[0]] + eager[1]):
            assert torch.equal(a, b), f"{name}: the replay differs from an eager run"
