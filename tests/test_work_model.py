"""The static work model of the Triton kernels and ``auto``'s decision on CUDA, on CPU (no GPU, no interpreter).

The model's FLOP counts are checked against the interpreter's exact count of ``tl.dot`` work in
tests/triton_suite.py (``test_work_model_counts_the_interpreters_dot_work``); here: the
executed/needed bounds of the tiling at every variant, the old tiling's counts as the issue measured
them, and the decision function at representative shapes.

Run alone: .venv/bin/python -m pytest -q tests/test_work_model.py
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from common import NON_DOT_KERNELS, UPDATE_CASES, run
from nonlocal_ext import backends
from nonlocal_ext.backends import cuda_choice
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES, validate
from nonlocal_ext.testing import make_inputs
from nonlocal_ext.triton_kernels import work_model
from nonlocal_ext.triton_kernels.work_model import Call, fused_work

VARIANTS = list(itertools.product(NON_DOT_KERNELS, NORMALIZATIONS, UPDATES, (False, True),
                                  ("fp16", "bf16", "fp32")))


@pytest.mark.parametrize("width", [64, 128, 256, 512, 1024])
def test_forward_computes_each_tile_once_up_to_512(width):
    """executed / needed tensor-core work of the forward at D = C = width, every variant (every dtype), the
    launcher's default tiles: ≤ 1.3 up to 512 (one program covers C), ≤ 2 at 1024."""
    for call in _calls(width):
        assert 1.0 <= fused_work(call, "forward")["ratio"] <= (1.3 if width <= 512 else 2.0), call


def _pass_splits_at_512(family: str, fp32: bool, symmetric: bool) -> bool:
    """The passes whose 512-wide layouts did not fit the register file at 8 warps without spills take the
    class-256 tiles there (configs.py): the float32 column pass, and with ``symmetric`` the half column pass
    and the float32 row pass."""
    return (fp32 or symmetric) if family == "column" else (fp32 and symmetric)


def _split_at_512(call) -> bool:
    """Whether either backward pass of ``call`` runs 256-wide programs at 512."""
    return any(_pass_splits_at_512(family, call.fp32, call.symmetric) for family in ("column", "row"))


@pytest.mark.parametrize("width", [64, 128, 256, 512, 1024])
def test_backward_computes_each_tile_once_up_to_512(width):
    """The backward at D = C = width: ≤ 1.5 (one column and one row program per block cover all of D and C:
    each tile computed once per pass) up to 256 in every variant and at 512 in the half variants without
    ``symmetric``; those ≤ 2.5 at 1024 (two feature programs)."""
    checked = 0
    for call in _calls(width):
        if width >= 512 and _split_at_512(call):
            continue
        assert 1.0 <= fused_work(call, "backward")["ratio"] <= (1.5 if width <= 512 else 2.5), call
        checked += 1
    assert checked >= len(VARIANTS) // 3


@pytest.mark.parametrize("width,bound", [(512, 2.125), (1024, 3.7)])
def test_backward_from_512_where_the_class_did_not_fit(width, bound):
    """The known misses: float32, and half with ``symmetric``, run two 256-wide feature programs in one pass
    at 512 (float32: the column pass; half ``symmetric``: the column pass; float32 ``symmetric``: both)."""
    ratios = [fused_work(call, "backward")["ratio"] for call in _calls(width) if _split_at_512(call)]
    assert ratios and all(1.5 < r <= bound for r in ratios) and max(ratios) == pytest.approx(bound)


def test_backward_recomputes_once_per_pass():
    """Non-symmetric, not ``sym``: column pass S + dâ + dv + dk = 2D + 2C per pair, row pass S + dâ + dq =
    2D + C, against the needed 3D + 2C; at 1024 each pass runs two feature programs (class width 512)."""
    for width, chunks in ((256, 1), (512, 1), (1024, 2)):
        call = Call(1, 4096, 1024, width, width, "fractional", "count", dtype="fp16")
        # column: chunks·(D + C) + C + D, row: chunks·(D + C) + D; needed 3D + 2C
        assert fused_work(call, "backward")["ratio"] == pytest.approx((4 * chunks + 3) / 5)
        # float32: the column pass runs 256-wide programs, twice as many as the row pass from 512 on
        fp32 = Call(1, 4096, 1024, width, width, "fractional", "count", dtype="fp32")
        column = max(1, width // 256)
        assert fused_work(fp32, "backward")["ratio"] == pytest.approx((2 * column + 2 + 2 * chunks + 1) / 5)


def _calls(width):
    for kernel, normalize, update, symmetric, dtype in VARIANTS:
        n, m = (2048, 2048) if symmetric else (2048, 512)
        yield Call(2, n, m, width, width, kernel, normalize, update, symmetric, dtype)


def test_every_entry_of_a_width_class_covers_it():
    """Whatever the autotuner picks, the forward's value tile and the backward's output tiles give the
    recomputation count the work model counts: the forward's default BLOCK_C is the class width and no
    entry's is smaller; the backward's OUT_D = OUT_C are the class width in every entry (at 512 where the
    class did not fit, :func:`_pass_splits_at_512`: 256), and the slices of their accumulators (``SLICE``) divide it."""
    from nonlocal_ext.triton_kernels import configs
    for width in configs.WIDTH_CLASSES:
        for fp32, symmetric in itertools.product((False, True), (False, True)):
            forward = configs.configs_for("forward", fp32, symmetric, width)
            assert forward[0].kwargs["BLOCK_C"] == width
            assert all(c.kwargs["BLOCK_C"] >= forward[0].kwargs["BLOCK_C"] for c in forward)
            for family in ("column", "row"):
                lst = configs.configs_for(family, fp32, symmetric, width)
                out = 256 if width == 512 and _pass_splits_at_512(family, fp32, symmetric) else width
                assert {(c.kwargs["OUT_D"], c.kwargs["OUT_C"]) for c in lst} == {(out, out)}
                assert all(c.kwargs["SLICE"] >= 16 and out % c.kwargs["SLICE"] == 0 for c in lst)


def test_old_tiling_reproduces_the_issues_interpreter_counts():
    """The issue counted the previous kernels under the interpreter (32×32 tiles, 64-wide feature tiles):
    forward 1.0 / 2.5 / 4.5 and backward 1.4 / 3.8 / 7.0 at D = C = 64 / 256 / 512."""
    old = dict(BLOCK_I=32, BLOCK_J=32, BLOCK_D=64, BLOCK_C=64, OUT_D=64, OUT_C=64)
    blocks = {"forward": old, "column_sums": old, "column": old, "row": old}
    for width, forward, backward in ((64, 1.0, 1.4), (256, 2.5, 3.8), (512, 4.5, 7.0)):
        for kernel, normalize in (("gaussian", "row"), ("fractional", "count")):
            call = Call(1, 256, 128, width, width, kernel, normalize)
            assert fused_work(call, "forward", blocks=blocks)["ratio"] == pytest.approx(forward)
            assert fused_work(call, "backward", blocks=blocks)["ratio"] == pytest.approx(backward)


def test_float32_counts_three_tensor_core_products_per_dot():
    call = Call(1, 1024, 1024, 64, 64, "rbf", "row", dtype="fp32")
    work = fused_work(call)
    assert work["tensor_flops"] == 3 * work["issued_flops"]
    half = fused_work(Call(1, 1024, 1024, 64, 64, "rbf", "row"))
    assert half["tensor_flops"] == half["issued_flops"]


def test_issued_work_counts_the_repeated_instruction_tiles():
    """Half backward at D = C = 64, not symmetric: the column pass (16 × 16 pair tiles, 4 warps) has each
    instruction tile of S and dâ computed by 2 warps, the products into the accumulators and the row pass's
    32 × 32 tiles by one: column 2(D + C) + (C + D), row (D + C) + D, against the needed 3D + 2C: 9/5. From
    class 128 on the split pair tiles repeat nothing (issued = executed, 7/5 at 512). The forward's 64 × 32
    half tiles are not repeated; issued work is never below the dot work."""
    assert fused_work(Call(2, 2048, 512, 64, 64), "backward")["issued_ratio"] == pytest.approx(9 / 5)
    wide = fused_work(Call(2, 2048, 512, 512, 512), "backward")
    assert wide["issued_ratio"] == wide["ratio"] == pytest.approx(7 / 5)
    assert fused_work(Call(2, 2048, 512, 64, 64), "forward")["issued_ratio"] == pytest.approx(1.0)
    for width in (64, 512, 1024):
        for call in _calls(width):
            for p in ("forward", "backward"):
                work = fused_work(call, p)
                assert work["issued_flops"] >= work["dot_flops"], (call, p)


def test_predictions_scale_with_the_work():
    small, large = Call(1, 4096, 4096, 64, 64), Call(1, 16384, 16384, 64, 64)  # 16× the pairs
    for path in ("fused", "dense", "sdpa"):
        assert work_model.predictions(large)[path] > 8 * work_model.predictions(small)[path]
    assert work_model.predictions(Call(1, 1024, 1024, 64, 64, "rbf"))["sdpa"] is None


# ---- the decision --------------------------------------------------------------------------------------

GB = 1e9


I3D = Call(4, 784, 196, 512, 512, "gaussian", "row", dtype="fp16")
DETECTION = Call(2, 3400, 850, 512, 512, "gaussian", "row", dtype="fp16")


@pytest.mark.parametrize("call,training,budget,expected", [
    # attention-like, flash applies and is predicted fastest
    (Call(1, 4096, 4096, 64, 64, "gaussian", "row", dtype="fp16"), True, 20 * GB, "sdpa"),
    # attention-like, C ≠ D: flash does not apply; the fused path beats the float32 dense GEMMs
    (Call(1, 4096, 4096, 64, 128, "gaussian", "row", dtype="fp16"), True, 20 * GB, "triton"),
    # the fractional GPU target (docs/gpu.md): dense needs 10+ GB of N×M buffers, over a 5 GB budget
    (Call(1, 16384, 16384, 64, 128, "fractional", "row", dtype="fp32"), True, 5 * GB, "triton"),
    # res3, D = C = 256: fused ahead in training too
    (Call(8, 784, 196, 256, 256, "fractional", "count", dtype="fp16"), True, 20 * GB, "triton"),
    # I3D at D = C = 512: fused for inference and training (each tile once per pass)
    (I3D, False, 20 * GB, "triton"),
    (I3D, True, 20 * GB, "triton"),
    # detection res4 at D = C = 512, training: the 16-row backward tiles run below the dense GEMMs' rate and
    # dense is predicted faster, unless its buffers exceed the budget
    (DETECTION, True, 20 * GB, "reference"),
    (DETECTION, True, 0.01 * GB, "triton"),
])
def test_choice_at_representative_shapes(call, training, budget, expected):
    assert cuda_choice.choose(call, training, budget) == expected


def test_dense_wins_where_predicted_faster_and_only_within_budget(monkeypatch):
    """Make the fused path predicted slower: dense is taken if its buffers fit the budget, never beyond."""
    call = Call(2, 196, 49, 64, 64, "rbf", "row", dtype="fp32")
    monkeypatch.setitem(work_model.EFFICIENCY, "fused", 1e-4)
    times = work_model.predictions(call)
    assert times["dense"] < times["fused"]
    need = work_model.dense_bytes(call)
    assert cuda_choice.choose(call, True, budget_bytes=need) == "reference"
    assert cuda_choice.choose(call, True, budget_bytes=need - 1) == "triton"


def test_without_fused_kernels_dense_within_budget_else_chunked():
    call = Call(1, 512, 512, 64, 64, "log", "sym", dtype="fp16")
    assert cuda_choice.choose(call, True, 1 * GB, fused_available=False) == "reference"
    assert cuda_choice.choose(call, True, 0, fused_available=False) == "chunked"


def test_sdpa_is_only_predicted_where_it_expresses_the_call():
    for kernel, normalize, update, symmetric, dtype in VARIANTS:
        call = Call(1, 256, 256, 64, 64, kernel, normalize, update, symmetric, dtype)
        spec = validate(*(torch.zeros(1, 4, 2),) * 3, kernel, **_params(kernel), normalize=normalize, update=update,
                        symmetric=symmetric, self_value=None)
        if work_model.sdpa_applies(call):
            assert cuda_choice.expresses(spec)


def _params(kernel):
    return dict(scale=0.5, power=1.5 if kernel == "fractional" else None, gamma=0.5 if kernel == "log" else None, eps=None, backend="auto")


def _fake_cuda(monkeypatch, free_bytes, fused):
    monkeypatch.setattr(cuda_choice, "budget", lambda device: cuda_choice.DENSE_BUDGET_FRACTION * free_bytes)
    monkeypatch.setattr(backends.triton, "unsupported_reason", lambda spec, query: None if fused else "no triton")


@pytest.mark.parametrize("free,fused,expected", [(80 * GB, True, "triton"), (80 * GB, False, "reference"),
                                                  (1e6, False, "chunked")])
def test_decide_on_cuda_inputs(monkeypatch, free, fused, expected):
    """``decide`` with the device query and triton's availability stubbed (CPU tensors stand in)."""
    _fake_cuda(monkeypatch, free, fused)
    q, k, v, _ = make_inputs("fractional", "row", (2,), 300, 300, 64, 64, with_self_value=False, dtype=torch.float16)
    spec = validate(q, k, v, "fractional", **_params("fractional"), normalize="row", update="aggregate",
                    symmetric=False, self_value=None)
    assert cuda_choice.decide(spec, q, k, v) == expected


def test_select_auto_hands_cuda_calls_to_the_decision():
    q = torch.zeros(1, 4, 2)
    spec = validate(q, q, q, "rbf", **_params("rbf"), normalize="row", update="aggregate", symmetric=False,
                    self_value=None)
    cuda_query = types.SimpleNamespace(device=torch.device("cuda"), shape=q.shape)
    assert backends.select("auto", spec, cuda_query, q) is cuda_choice.AUTO
    assert backends.select("auto", spec, q, q) is not cuda_choice.AUTO


@pytest.mark.parametrize("update,with_self_value", UPDATE_CASES)
def test_sdpa_path_matches_the_reference(update, with_self_value):
    """The SDPA path (run on CPU here), values and gradients, float64."""
    q, k, v, u = make_inputs("gaussian", "row", (2,), 37, 37, 8, 8, with_self_value=with_self_value)
    spec = validate(q, k, v, "gaussian", **_params("gaussian"), normalize="row", update=update, symmetric=False,
                    self_value=u)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, u) if t is not None]
    out = cuda_choice.SDPA.aggregate(*leaves[:3], leaves[3] if u is not None else None, spec)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    truth, truth_grads = run("reference", q, k, v, u, "gaussian", "row", update, False, grad_out, scale=0.5)
    torch.testing.assert_close(out, truth, rtol=1e-10, atol=1e-10)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10)
