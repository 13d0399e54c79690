"""The Triton kernels under TRITON_INTERPRET=1 (CPU tensors) against the float64 reference.

Collected through tests/test_triton.py, which runs this suite in a process of its own with
TRITON_INTERPRET=1 (the variable has to be set before the kernels are created, and it must not
make the other test files' CPU tensors eligible for ``backend="triton"``). Run alone:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_triton.py

Every output buffer is pre-filled with NaN (``launchers.POISON_OUTPUTS``), so an element that a
kernel does not write fails every comparison below.

bfloat16: Triton 3.9's interpreter multiplies the uint16 bit patterns in a bfloat16 ``tl.dot``
(triton-lang/triton#11584; its loads, casts and stores are right), so ``backend="triton"`` refuses
bfloat16 on CPU tensors there. The bfloat16 tests install :func:`exact_bfloat16_dot`, which converts
bfloat16 operands of the interpreter's dot to float32 first: what a tensor core computes (bfloat16
products are exact in float32, accumulated in float32). The kernels run unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton.language as tl
from triton.runtime import interpreter

import nonlocal_ext
import common
from common import (COMBOS, COORDINATE_SET_IDS, COORDINATE_SETS, NON_DOT_KERNELS, UPDATE_CASES, LargestTensor,
                    combo_id, coordinate_misses, kernel_kwargs, run, square_only)
from triton_cases import (BFLOAT16_COMBOS, EVEN_FEATURE_COMBOS, FLOAT16_COMBOS, ODD_CASES, WIDE_CASES, case_id,
                          even_feature_shape, every_combination_shape, half_shape)
from nonlocal_ext.spec import NORMALIZATIONS
from nonlocal_ext.testing import make_inputs
from nonlocal_ext.triton_kernels import configs, launchers

assert launchers.INTERPRETED, "tests/triton_suite.py needs TRITON_INTERPRET=1 set before nonlocal_ext.triton_kernels is imported"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launchers, "POISON_OUTPUTS", True)


@pytest.fixture
def exact_bfloat16_dot(monkeypatch):
    """The interpreter's ``tl.dot`` with bfloat16 operands converted to float32 (see the module docstring)."""
    unpatched = interpreter.InterpreterBuilder.create_dot

    def as_float32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle(interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
                                        .view(np.float32), tl.float32)

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        return unpatched(self, as_float32(a), as_float32(b), acc, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(launchers, "_BFLOAT16_DOT_EXACT", None)  # probe again, patched
    yield
    launchers._BFLOAT16_DOT_EXACT = None  # and again once unpatched


def check_against_reference(combo, shape, dtype, noncontiguous=False):
    common.check_against_reference("triton", combo, shape, dtype, noncontiguous)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_every_combination_matches_reference(combo):
    """All 120 combinations (dot included), values and every gradient, float64, 33 rows = 2 tiles of 32
    (33 × 33 for the square-only ones, else 33 queries against 17 keys)."""
    check_against_reference(combo, every_combination_shape(combo), torch.float64)


@pytest.mark.parametrize("combo,shape,dtype", ODD_CASES, ids=[case_id(*case) for case in ODD_CASES])
def test_odd_sizes_match_reference(combo, shape, dtype):
    check_against_reference(combo, shape, dtype, noncontiguous=shape[1] == 130)


@pytest.mark.parametrize("combo", EVEN_FEATURE_COMBOS, ids=combo_id)
def test_feature_tiles_that_divide_d_and_c(combo):
    """D = 64, C = 128: the EVEN_D / EVEN_C path (loads without a feature mask)."""
    check_against_reference(combo, even_feature_shape(combo), torch.float32)


@pytest.mark.parametrize("combo", FLOAT16_COMBOS, ids=combo_id)
def test_float16_inputs(combo):
    """float16 inputs accumulate in float32: within 2× plain PyTorch's float16 error plus the table's atol."""
    check_against_reference(combo, half_shape(combo, torch.float16), torch.float16)


@pytest.mark.parametrize("combo", BFLOAT16_COMBOS, ids=combo_id)
def test_bfloat16_inputs(combo, exact_bfloat16_dot):
    """bfloat16 inputs through the kernels' half path (bfloat16 loads, casts to bfloat16 dot operands,
    float32 accumulation; gaussian + row/sym casts Â to bfloat16): within 2× plain PyTorch's bfloat16
    error plus the table's atol, values and all gradients. D = 200, C = 130 mask the feature tails."""
    check_against_reference(combo, half_shape(combo, torch.bfloat16), torch.bfloat16, noncontiguous=True)


GRADCHECK_COMBOS = [
    ("gaussian", "row", "aggregate", False, False),
    ("gaussian", "sym", "diffusion", True, False),
    ("rbf", "count", "diffusion", False, True),
    ("rbf", "sym", "aggregate", True, False),
    ("fractional", "row", "diffusion", True, False),
    ("fractional", "none", "aggregate", False, False),
    ("log", "sym", "diffusion", False, True),
    ("log", "row", "aggregate", True, False),
]


@pytest.mark.parametrize("combo", GRADCHECK_COMBOS, ids=combo_id)
def test_gradcheck_float64(combo):
    kernel, normalize, update, symmetric, with_self_value = combo
    n, m = (4, 4) if square_only(combo) else (3, 5)
    # no coincident pairs: the weights are discontinuous there, finite differences are not
    inputs = make_inputs(kernel, normalize, (), n, m, 2, 2, with_self_value=with_self_value, coincident=False)
    inputs = [t.requires_grad_() for t in inputs if t is not None]

    def f(q, k, v, u=None):
        return nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update=update,
                                               symmetric=symmetric, self_value=u, backend="triton",
                                               **kernel_kwargs(kernel))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_two_backward_runs_are_bitwise_equal():
    combo = ("fractional", "sym", "diffusion", True, True)
    q, k, v, u = make_inputs("fractional", "sym", (), 37, 37, 5, 3, with_self_value=True, dtype=torch.float32)
    grad_out = torch.randn(37, 3, generator=torch.Generator().manual_seed(2))
    first = run("triton", q, k, v, u, *combo[:4], grad_out, **kernel_kwargs("fractional"))
    second = run("triton", q, k, v, u, *combo[:4], grad_out, **kernel_kwargs("fractional"))
    for a, b in zip([first[0]] + first[1], [second[0]] + second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["gaussian", "fractional"])
def test_no_n_by_m_tensor_reaches_a_launcher(monkeypatch, kernel):
    """Every tensor passed to a kernel launch, forward and backward, is O((N + M)(D + C))."""
    log = []
    monkeypatch.setattr(launchers, "LAUNCH_LOG", log)
    n = 70
    q, k, v, u = make_inputs(kernel, "sym", (), n, n, 5, 3, with_self_value=True)
    grad_out = torch.randn(n, 3, dtype=torch.float64)
    run("triton", q, k, v, u, kernel, "sym", "diffusion", True, grad_out, **kernel_kwargs(kernel))
    launched = {name for name, _ in log}
    assert launched == {"forward_kernel", "backward_preprocess_kernel", "backward_column_kernel", "backward_row_kernel"}
    largest = max(max((sizes[0] if len(sizes) else 1) * (sizes[1] if len(sizes) > 1 else 1)
                      * (sizes[2] if len(sizes) > 2 else 1) for sizes in shapes) for _, shapes in log)
    assert largest <= n * 5 < n * n / 4


def test_no_n_by_m_allocation():
    """No torch op produces an N×M tensor during a forward and backward (TorchDispatchMode probe)."""
    n = 70
    q, k, v, u = make_inputs("log", "sym", (), n, n, 5, 3, with_self_value=False)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with LargestTensor() as probe:
        out = nonlocal_ext.nonlocal_aggregate(*leaves, "log", normalize="sym", update="diffusion", symmetric=True,
                                              backend="triton", gamma=-3.0)
        out.sum().backward()
    assert probe.largest < n * n / 4


def test_empty_inputs():
    q, k, v = torch.randn(2, 0, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    assert nonlocal_ext.nonlocal_aggregate(q, k, v, "rbf", backend="triton").shape == (2, 0, 4)
    q, k, v = (t.requires_grad_() for t in (torch.randn(2, 4, 3), torch.randn(2, 0, 3), torch.randn(2, 0, 4)))
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, "rbf", normalize="none", backend="triton")
    assert torch.equal(out, torch.zeros(2, 4, 4))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_auto_on_cpu_does_not_take_triton():
    from nonlocal_ext import backends
    from nonlocal_ext.spec import validate
    q = torch.randn(1, 8, 3)
    spec = validate(q, q, q, "rbf", scale=1.0, power=None, gamma=None, eps=None, normalize="row",
                    update="aggregate", symmetric=False, self_value=None, backend="auto")
    assert "triton" in backends.available(spec, q)
    assert backends.select("auto", spec, q, q).NAME != "triton"


def test_bfloat16_is_refused_by_an_interpreter_whose_dot_is_wrong():
    """The pinned triton (3.9.0) has triton-lang/triton#11584: the probe sees it, the backend says why."""
    launchers._BFLOAT16_DOT_EXACT = None
    assert launchers.interpreter_takes_bfloat16() is False
    q = torch.randn(1, 8, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 tl.dot multiplies bit patterns"):
        nonlocal_ext.nonlocal_aggregate(q, q, q, "rbf", backend="triton")


def test_bfloat16_probe_accepts_an_exact_dot(exact_bfloat16_dot):
    assert launchers.interpreter_takes_bfloat16() is True


def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration, dynamic shapes, of the op
    whose CPU kernels the Triton launchers are in this (interpreter) process after a first Triton call."""
    from nonlocal_ext.backends import _common
    q, k, v, u = make_inputs("rbf", "sym", (2,), 6, 5, 3, 2, with_self_value=True, dtype=torch.float32)
    nonlocal_ext.nonlocal_aggregate(q, k, v, "rbf", scale=0.5, normalize="sym", update="diffusion", self_value=u,
                                    backend="triton")
    assert _common.cpu_kernels_owner() == "triton"
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), u.requires_grad_(),
            "rbf", 0.5, 0.0, 0.5, 1e-4, "sym", "diffusion", False)  # power 0: the kernel has none
    torch.library.opcheck(torch.ops.nonlocal_ext.aggregate_forward, args)


def test_cpu_backend_is_refused_where_the_interpreter_holds_the_cpu_kernels():
    """After a Triton call on CPU tensors the ops' CPU kernels are the Triton launchers in this process, so
    ``backend="cpu"`` is a ValueError saying why, and ``auto`` does not pick it."""
    q, k, v, _ = make_inputs("gaussian", "row", (2,), 9, 7, 3, 2, with_self_value=False, dtype=torch.float32)
    nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", backend="triton")
    with pytest.raises(ValueError, match="backend='cpu' is unavailable in this process: the Triton interpreter"):
        nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", backend="cpu")
    assert "cpu" not in nonlocal_ext.backends.available(nonlocal_ext.spec.validate(
        q, k, v, "gaussian", scale=1.0, power=None, gamma=None, eps=None, normalize="row", update="aggregate",
        symmetric=False, self_value=None, backend="auto"), q)


def test_torch_compile_fullgraph_traces_the_op():
    """torch.compile(fullgraph=True) traces the custom op (aot_eager: the interpreter runs the kernels)."""
    q, k, v, _ = make_inputs("gaussian", "row", (2,), 37, 37, 5, 3, with_self_value=False, dtype=torch.float32)

    def f(q, k, v):
        return nonlocal_ext.nonlocal_aggregate(q, k, v, "gaussian", normalize="row", update="diffusion",
                                               backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    expected = f(*eager_leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# ---- tensor-core work: the work model against the interpreter's exact count of tl.dot work -------------

@pytest.fixture
def dot_flops(monkeypatch):
    """A list whose sum is 2·m·n·k over every ``tl.dot`` the interpreter runs from now on."""
    counted = []
    unpatched = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        assert b.data.shape[-2] == k
        batch = math.prod(a.data.shape[:-2])  # the split pair tiles: one product per chunk (tiles.tile_dot)
        counted.append(2 * batch * m * n * k)
        return unpatched(self, a, b, acc, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return counted


# (combo, (B, N, M, D, C), dtype): tails in every dimension, every normalization's pass structure,
# symmetric, both tile families (float32 / float16), and the wide classes up to D = C = 1024.
WORK_CASES = [
    (("gaussian", "row", "aggregate", False, False), (2, 67, 33, 5, 3), torch.float32),
    (("fractional", "count", "aggregate", False, False), (1, 64, 64, 64, 64), torch.float16),
    (("rbf", "sym", "diffusion", True, False), (1, 40, 40, 130, 70), torch.float32),
    (("log", "none", "diffusion", False, True), (1, 33, 70, 300, 200), torch.float16),
    (("gaussian", "sym", "aggregate", False, False), (1, 33, 17, 512, 512), torch.float32),
    (("fractional", "row", "aggregate", False, False), (1, 17, 33, 1024, 1024), torch.float16),
    (("rbf", "row", "aggregate", True, False), (1, 19, 19, 512, 512), torch.float32),  # sliced accumulators
    (("fractional", "count", "diffusion", False, True), (2, 40, 37, 2, 5), torch.float32),  # ρ direct: no pair dot
    (("rbf", "row", "aggregate", True, False), (1, 33, 33, 3, 4), torch.float16),
]


@pytest.mark.parametrize("combo,shape,dtype", WORK_CASES,
                         ids=[f"{combo_id(c)}-{'x'.join(map(str, s))}-{str(dt)[6:]}" for c, s, dt in WORK_CASES])
def test_work_model_counts_the_interpreters_dot_work(combo, shape, dtype, dot_flops):
    """Forward and backward: the model's executed FLOPs equal Σ 2·m·n·k over the interpreter's tl.dot calls."""
    from nonlocal_ext.triton_kernels.work_model import Call, fused_work
    kernel, normalize, update, symmetric, with_self_value = combo
    b, n, m, d, c = shape
    q, k, v, u = make_inputs(kernel, normalize, (b,), n, m, d, c, with_self_value=with_self_value, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, u) if t is not None]
    out = nonlocal_ext.nonlocal_aggregate(q, k, v, kernel, normalize=normalize, update=update, symmetric=symmetric,
                                          self_value=u, backend="triton", **kernel_kwargs(kernel))
    forward = sum(dot_flops)
    out.backward(torch.ones_like(out))
    backward = sum(dot_flops) - forward
    call = Call(b, n, m, d, c, kernel, normalize, update, symmetric, "fp16" if dtype == torch.float16 else "fp32")
    assert forward == fused_work(call, "forward", interpreted=True)["dot_flops"]
    assert backward == fused_work(call, "backward", interpreted=True)["dot_flops"]
    assert all(x.grad is not None for x in leaves)


# ---- wide feature dimensions: D, C ∈ {256, 512, 1024} against the reference -----------------------------

#: (D, C) of the wide classes in turn: 256 (one 256-wide output tile), 300 × 200 (the 512 class, masked tails in
#: the split pair-tile chunks and the accumulator slices), 1000 × 1024 (two feature programs of 512).
WIDE_FEATURES = [(256, 256), (300, 200), (1000, 1024)]


@pytest.mark.parametrize("index,combo", list(enumerate(COMBOS)), ids=[combo_id(c) for c in COMBOS])
def test_every_combination_at_a_wide_class(index, combo):
    """Every combination once at a wide class (the split pair tiles, the sliced accumulators, several feature
    programs), the classes in turn, float64 against the float64 reference: 19 queries against 17 keys (19 × 19
    for the square-only combinations), as the class-64 test above does at D = 5, C = 3."""
    d, c = WIDE_FEATURES[index % len(WIDE_FEATURES)]
    n, m = (19, 19) if square_only(combo) else (19, 17)
    check_against_reference(combo, ((), n, m, d, c), torch.float64)


@pytest.mark.parametrize("combo,shape,dtype", WIDE_CASES, ids=[case_id(*case) for case in WIDE_CASES])
def test_wide_features_match_reference(combo, shape, dtype):
    check_against_reference(combo, shape, dtype)


# ---- coordinates far from the origin: the accuracy targets of tests/test_numerics.py -----------------

@pytest.mark.parametrize("kind,dim,side", COORDINATE_SETS, ids=COORDINATE_SET_IDS)
def test_coordinates_far_from_the_origin(kind, dim, side, monkeypatch):
    """As for the CPU backends (tests/test_numerics.py): a grid or cloud at offset 0 and moved by 1e4 grid
    spacings, ``fractional`` power 4 (whose relative error is twice that of ρ) and ``log``, ``count``/``row``,
    ``aggregate``/``diffusion``: float32 within 2e-4 (values) and 2e-3 (gradients) of float64. ρ comes from
    direct differences at these D ≤ 3 (``DIRECT_D``). Row and column tiles of 128 (only the order of the
    sums changes, as between GPU tile configurations) keep the interpreter's time down; every offset and
    power at the full sizes: ``bench/accuracy.py --backends triton`` (bench/NOTES_numerics.md)."""
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_I", 128)
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_J", 128)
    misses = coordinate_misses("triton", kind, dim, side, offsets=(0.0, 1e4),
                               kernels=(("fractional", 4.0), ("log", None)))
    assert not misses, f"{len(misses)} calls miss the targets:\n" + "\n".join(misses)


# ---- NaN and Inf propagation: non-finite exactly where the float64 reference is -----------------------

import test_numerics as numerics  # noqa: E402  (its checks take the backend as an argument)

#: Half of COMBOS, so that the interpreter's time stays near two minutes: for each kernel × normalization,
#: each update case (aggregate, diffusion, diffusion with self_value) once, ``symmetric`` alternating, so
#: each kernel meets each update case symmetric under two normalizations and not under the other two.
PROPAGATION_COMBOS = [combo for combo in COMBOS if combo[3] == bool(
    (NORMALIZATIONS.index(combo[1]) + UPDATE_CASES.index((combo[2], combo[4]))) % 2)]

@pytest.mark.parametrize("combo", [pytest.param(combo, id=combo_id(combo)) for combo in PROPAGATION_COMBOS])
def test_nonfinite_inputs_propagate_as_in_the_dense_formula(combo):
    """tests/test_numerics.py's check, float32, on the combinations of :data:`PROPAGATION_COMBOS` (every
    kernel × normalization): NaN, Inf and -Inf in one entry of a query, key, value or self_value row of
    batch element 1 of 2 make non-finite exactly the outputs and gradients that are non-finite in the
    float64 dense reference (none of batch element 0's), and the finite ones agree with it by the
    suite's rule."""
    kernel, normalize = combo[:2]
    mismatches = numerics.propagation_mismatches(kernel, "triton", normalize, dtypes=(torch.float32,),
                                                 combos=[combo])
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(": ".join(m) for m in mismatches[:20])


# ---- special inputs: the checks of tests/test_numerics.py, for backend="triton" ---------------------

@pytest.mark.parametrize("kernel", NON_DOT_KERNELS)
def test_special_inputs(kernel):
    """Empty N, empty batch, M = 0 (``none``: zeros; the others: the ValueError), ``torch.no_grad`` and
    ``torch.inference_mode``, gradients for only some of the inputs: as on the CPU backends."""
    numerics.test_empty_queries(kernel, "triton")
    for batch in [(0,), (3, 0)]:
        numerics.check_empty(kernel, "triton", batch, 4, 4)
    for normalize in nonlocal_ext.spec.NORMALIZATIONS:
        numerics.test_no_keys(kernel, "triton", normalize)
    numerics.test_no_grad_and_inference_mode_give_the_grad_mode_result(kernel, "triton")
    numerics.test_gradients_for_only_some_inputs(kernel, "triton")


@pytest.mark.parametrize("kernel", ["gaussian", "fractional"])
def test_four_threads_at_once_equal_serial_calls(kernel):
    numerics.test_four_threads_at_once_equal_serial_calls(kernel, "triton")


def test_repeated_calls_do_not_grow_memory():
    numerics.test_repeated_calls_do_not_grow_memory("triton")


# ---- the randomized differential test of tests/test_differential.py, for backend="triton" --------------

import test_differential as differential  # noqa: E402  (its seeded cases and their check, for any backend)

#: Case indices 0 … 299 of tests/test_differential.py (all of its CASES), each with row and column tiles of
#: DIFFERENTIAL_TILE; those that it leaves in one tile and the default tiles split in two
#: (32 < max(N, M) ≤ 64) also with the default tiles.
DIFFERENTIAL_CASES, DIFFERENTIAL_TILE, DEFAULT_TILE = 300, 128, configs.INTERPRETER_BLOCKS["BLOCK_I"]


def differential_tiles(index):
    n, m = differential.draw(index)["n"], differential.draw(index)["m"]
    return [DIFFERENTIAL_TILE] + ([DEFAULT_TILE] if DEFAULT_TILE < max(n, m) <= 2 * DEFAULT_TILE else [])


@pytest.mark.parametrize("index,tile", [pytest.param(index, tile, id=f"{index}-tiles{tile}")
                                        for index in range(DIFFERENTIAL_CASES) for tile in differential_tiles(index)])
def test_differential_random_case(index, tile, monkeypatch):
    """tests/test_differential.py's seeded random case ``index`` (kernel, normalization, update, ``symmetric``,
    ``self_value``, batch dims, N, M ∈ [1, 300], D, C ∈ [1, 130], the layout of each input, float32 or
    float64) with ``backend="triton"``: the output and the gradient of every input against the float64
    dense reference by that file's rule (``differential.check_case``); a failure prints the case and the
    command that reruns it alone.

    Every one of the first 300 cases runs: the draws are float32 and float64 CPU tensors, which the backend
    takes under the interpreter (``triton.unsupported_reason`` refuses only bfloat16 there), so none is
    excluded, and a refusal would fail the test, not skip it. Row and column tiles of 128 (only the order
    of the sums changes, as between GPU tile configurations) keep the 347 runs near 2½ minutes on one core
    (the large cases take several times as long in tiles of 32): N or M > 128 spans 2 or 3 tiles in 73
    cases, and the 47 cases with 32 < max(N, M) ≤ 64 run a second time in the default tiles of 32, 2 of
    them."""
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_I", tile)
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_J", tile)
    repro = (f'TRITON_INTERPRET=1 .venv/bin/python -m pytest -q '
             f'"tests/test_triton.py::test_differential_random_case[{index}-tiles{tile}]"')
    differential.check_case(index, "triton", repro)


# ---- the row and column tiles the GPU lists ship ----------------------------------------------------------

def _shipped_pair_tiles() -> list[tuple[int, int]]:
    """Every (BLOCK_I, BLOCK_J) that the default entry of a shipped list runs (forward and backward, every width
    class, both dtypes); the interpreter otherwise runs 32 × 32."""
    return sorted({(lst[0].kwargs["BLOCK_I"], lst[0].kwargs["BLOCK_J"]) for lst in configs.shipped_lists()})


SHIPPED_TILE_COMBOS = [("fractional", "row", "diffusion", True, False), ("gaussian", "sym", "aggregate", False, False),
                       ("rbf", "count", "diffusion", False, True)]


@pytest.mark.parametrize("tile", _shipped_pair_tiles(), ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("combo", SHIPPED_TILE_COMBOS, ids=combo_id)
def test_the_shipped_row_and_column_tiles(combo, tile, monkeypatch):
    """The pair tiles of the GPU lists' defaults (16 × 16 in the wide backward, 16 × 32 in the half `symmetric` row
    pass at class 64, …) run under the interpreter, float64 against the reference: masks and sums across
    several such tiles (19 × 19, 33 × 17), values and every gradient."""
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_I", tile[0])
    monkeypatch.setitem(configs.INTERPRETER_BLOCKS, "BLOCK_J", tile[1])
    n, m = (19, 19) if square_only(combo) else (33, 17)
    check_against_reference(combo, ((), n, m, 5, 3), torch.float64)
