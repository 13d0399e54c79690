"""chunked, linear and cpu against the float64 reference: values and every gradient, at odd sizes.

Run alone: .venv/bin/python -m pytest -q tests/test_backends.py
"""

from __future__ import annotations

import pytest
import torch

import common
from common import COMBOS, NON_DOT_KERNELS, assert_close_to_truth, combo_id, kernel_kwargs, max_abs, square_only
from nonlocal_ext import nonlocal_aggregate
from nonlocal_ext.backends import chunked

# (batch, N, M, D, C): odd sizes, none a multiple of any tile. "square" shapes serve the
# combinations that need N == M (symmetric, diffusion without self_value).
SQUARE_SHAPES = [((), 1, 1, 1, 1), ((2,), 97, 97, 5, 3), ((), 1000, 1000, 64, 130), ((2, 3), 33, 33, 1, 130)]
RECT_SHAPES = [((2,), 97, 33, 5, 3), ((), 1, 1000, 64, 1), ((3,), 1000, 1, 1, 130)]


def shapes_for(combo):
    return SQUARE_SHAPES if square_only(combo) else SQUARE_SHAPES + RECT_SHAPES


def cases(backend):
    for combo in COMBOS:
        if backend == "linear" and combo[0] != "dot":
            continue
        for i, shape in enumerate(shapes_for(combo)):
            yield pytest.param(combo, shape, i % 2 == 1, id=f"{combo_id(combo)}-{'x'.join(map(str, shape[1:]))}"
                               + ("-b" + "x".join(map(str, shape[0])) if shape[0] else ""))


@pytest.fixture
def small_blocks(monkeypatch):
    """Make the chunked backend split even small problems into several row blocks."""
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 40 * 1000)


def check_against_reference(backend, combo, shape, noncontiguous, dtype, device="cpu"):
    common.check_against_reference(backend, combo, shape, dtype, noncontiguous, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("chunked")))
def test_chunked_matches_reference(small_blocks, combo, shape, noncontiguous, dtype):
    check_against_reference("chunked", combo, shape, noncontiguous, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("linear")))
def test_linear_matches_reference(combo, shape, noncontiguous, dtype):
    check_against_reference("linear", combo, shape, noncontiguous, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("combo,shape,noncontiguous", list(cases("cpu")))
def test_cpu_matches_reference(combo, shape, noncontiguous, dtype):
    check_against_reference("cpu", combo, shape, noncontiguous, dtype)


# Nonlocal-block widths (D + C ≥ 384): the cpu kernels switch to 256-row tiles there; the tail row
# block (300 = 256 + 44) and the 77-column tile are partial.
WIDE_SQUARE, WIDE_RECT = ((2,), 300, 300, 200, 190), ((2,), 300, 77, 200, 190)


@pytest.mark.parametrize("combo", [pytest.param(c, id=combo_id(c)) for c in COMBOS])
def test_cpu_wide_features_match_reference(combo):
    """float32: the precision whose tile products go through brgemm."""
    check_against_reference("cpu", combo, WIDE_SQUARE if square_only(combo) else WIDE_RECT, False, torch.float32)


HALF_GEMMS = "NONLOCAL_EXT_CPU_HALF_GEMMS"  # the cpu kernels' half tile GEMMs: "1" on, "0" off (else by CPU)


@pytest.mark.parametrize("half_gemms", ["1", "0"], ids=["half-gemms", "float-gemms"])
@pytest.mark.parametrize("combo", [pytest.param(c, id=combo_id(c)) for c in COMBOS
                                   if c[3] == (c[0] in ("gaussian", "log")) and c[2] == ("diffusion" if c[1] in ("row", "none") else "aggregate")])
def test_cpu_half_tiles_at_block_widths(monkeypatch, combo, half_gemms):
    """bfloat16 at nonlocal-block widths, with the tile GEMMs in bfloat16 (oneDNN) and in float32."""
    monkeypatch.setenv(HALF_GEMMS, half_gemms)
    check_against_reference("cpu", combo, WIDE_SQUARE if square_only(combo) else WIDE_RECT, False, torch.bfloat16)


def test_cpu_half_tiles_are_a_separate_path(monkeypatch):
    """The switch takes effect: bfloat16 products (rounded once) differ from float32 ones of the same inputs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, w, generator=g).bfloat16() for n, w in ((300, 200), (77, 200), (77, 190)))
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv(HALF_GEMMS, flag)
        outs.append(nonlocal_aggregate(q, k, v, "gaussian", scale=200 ** -0.5, backend="cpu"))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert not torch.equal(outs[0], outs[1])
    assert (outs[0].float() - outs[1].float()).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend,kernel", [(b, k) for b in ("chunked", "cpu") for k in NON_DOT_KERNELS] + [("linear", "dot")])
def test_half_precision_inputs(small_blocks, backend, kernel, dtype):
    """Half inputs accumulate in float32: at least as accurate as plain PyTorch in that dtype."""
    for normalize in ("row", "sym"):
        check_against_reference(backend, (kernel, normalize, "diffusion", False, True), ((2,), 97, 33, 5, 3),
                                False, dtype)


@pytest.mark.parametrize("backend,kernel", [(b, k) for b in ("chunked", "cpu") for k in NON_DOT_KERNELS] + [("linear", "dot")])
def test_expanded_and_shared_inputs(small_blocks, backend, kernel):
    """Stride-0 (expanded) batch dims, and one tensor passed as query, key and value."""
    x = torch.randn(1, 40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) / 6 ** 0.5
    if kernel == "dot":
        x = x.abs() + 0.1
    grad_out = torch.randn(3, 40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for normalize in ("row", "sym"):
        leaf = x.clone().requires_grad_()
        outs = {}
        for name in ("reference", backend):
            shared = leaf.expand(3, 40, 6)
            out = nonlocal_aggregate(shared, shared, shared, kernel, normalize=normalize, update="diffusion",
                                     symmetric=True, backend=name, **kernel_kwargs(kernel))
            outs[name] = (out, torch.autograd.grad(out, leaf, grad_out)[0])
        for ours, truth in zip(outs[backend], outs["reference"]):
            assert_close_to_truth(ours, truth, truth, torch.float64, f"{backend} {normalize}",
                                  floor=max(1.0, max_abs(outs["reference"][0])))
