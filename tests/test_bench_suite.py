"""The benchmark's nonlocal-block suite and the runners it compares: the plain ``dense`` peer (what a
user writes without us) and ``auto``.

Run alone: .venv/bin/python -m pytest -q tests/test_bench_suite.py
"""

from __future__ import annotations

import itertools

import pytest
import torch

from common import max_abs
from nonlocal_ext.benchmark import cli, runners
from nonlocal_ext.benchmark.cases import BLOCK_KERNELS, BLOCK_SHAPES, Case, block_suite
from nonlocal_ext.kernels import KERNELS
from nonlocal_ext.spec import NORMALIZATIONS, UPDATES


@pytest.mark.parametrize("kernel,normalize,update", list(itertools.product(KERNELS, NORMALIZATIONS, UPDATES)))
@pytest.mark.parametrize("runner", ["dense", "auto"])
def test_runner_computes_the_op(runner, kernel, normalize, update):
    """The dense formula (and auto) agree with the float64 reference, values and gradients, with
    coincident pairs present for the distance kernels."""
    case = Case(kernel, normalize, update, 13, 13, 5, 3, 2, "float64", "cpu", "fwd+bwd")
    q, k, v, u = case.inputs()
    k[:, 4] = q[:, 7]  # a coincident pair
    grad = torch.randn(2, 13, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for name in (runner, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = runners.all_runners()[name].build(case)(*leaves, u)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
    for ours, truth in zip(*results):
        assert torch.allclose(ours, truth, rtol=1e-9, atol=1e-9 * max(1.0, max_abs(truth)))


def test_block_suite_covers_every_shape_kernel_and_pass():
    cases = block_suite(["float32", "bfloat16"], "cpu", ["fwd", "fwd+bwd"])
    float32 = {(c.kernel, c.normalize, c.batch, c.N, c.M, c.D, c.C, c.pass_) for c in cases if c.dtype == "float32"}
    assert float32 == {(kernel, normalize, b, n, m, dc, dc, pass_) for (kernel, normalize), (_, b, n, m, dc), pass_
                       in itertools.product(BLOCK_KERNELS, BLOCK_SHAPES, ["fwd", "fwd+bwd"])}
    assert {(c.kernel, c.normalize) for c in cases if c.dtype == "bfloat16"} == {("gaussian", "row")}
    assert len(cases) == len(float32) + 2 * len(BLOCK_SHAPES)


def test_suite_flag_replaces_the_sweep(monkeypatch, tmp_path):
    """--suite blocks runs the suite's cases (here with a runner that only records them)."""
    seen = []

    def build(case):
        seen.append(case)
        return lambda q, k, v, u: v[..., :1, :].expand(q.shape[:-1] + v.shape[-1:])
    monkeypatch.setitem(runners.PEERS, "recorder", runners.Runner("recorder", "peer", lambda case, inputs: None, build))
    monkeypatch.setattr(cli, "block_suite", lambda dtypes, device, passes: [
        Case("gaussian", "row", "aggregate", 8, 4, 3, 3, 2, dtypes[0], device, passes[0])])
    assert cli.main(["--suite", "blocks", "--device", "cpu", "--backends", "recorder", "--pass", "fwd",
                     "--repeat", "1", "--warmup", "0", "--no-memory", "--gemm-size", "64",
                     "--json", str(tmp_path / "rows.json")]) == 0
    assert [(c.N, c.M, c.batch) for c in seen] == [(8, 4, 2)]
