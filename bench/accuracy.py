"""Accuracy of the distance kernels on low-dimensional coordinates away from the origin.

For each geometry (2D grid of 48² points, 3D grid of 16³ points, random clouds of as many
points in the unit square / cube), each offset t·h added to every coordinate (h the grid
spacing), each kernel (``fractional`` with power 1, 3, 4 and ``log``), normalization
(``count``, ``row``) and update (``aggregate``, ``diffusion``), the op runs in float32 with
query = key = the points (so the diagonal pairs are coincident and masked) and value = a
smooth function of the unshifted points. The truth is the op in float64 on the same float32
points, moved (exactly enough) to their mean before the call, so it does not depend on how
the op itself handles the offset (``--truth-backend``: ``cpu`` by default, its float64 path is
checked against the dense reference by the test suite; ``reference`` is 4× slower). Printed:
the relative error of the values, max|out − truth| / max|truth|, and the largest relative error of the gradients of query, key and value (same measure, for a
fixed random upstream gradient).

Run one geometry at a time (each takes 10–40 s on 2 threads):

    .venv/bin/python bench/accuracy.py --geometry grid2d [--json bench/results/accuracy_grid2d.json]

The Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors); its cost is per
tile program, so ``--interpreter-tiles 128`` (row and column tiles of 128 instead of the test suite's
32) makes a geometry 10–30 min on one core instead of hours. The tile size changes only the order of
the sums, as the autotuned tiles on a GPU do:

    TRITON_INTERPRET=1 .venv/bin/python bench/accuracy.py --geometry grid2d --backends triton --interpreter-tiles 128
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import nonlocal_ext
from nonlocal_ext.spec import UPDATES

GEOMETRIES = ("grid2d", "grid3d", "cloud2d", "cloud3d")
OFFSETS = (0.0, 10.0, 1e3, 1e4)
KERNELS = (("fractional", 1.0), ("fractional", 3.0), ("fractional", 4.0), ("log", None))
NORMALIZATIONS = ("count", "row")
BACKENDS = ("reference", "chunked", "cpu")
EPS = 1e-4  # float32's default coincidence threshold, used for the float64 truth as well


def points(geometry: str) -> tuple[torch.Tensor, float]:
    """(N, D) float64 points in the unit square/cube and their spacing h."""
    dim = 2 if geometry.endswith("2d") else 3
    side = 48 if dim == 2 else 16
    h = 1.0 / (side - 1)
    if geometry.startswith("grid"):
        axis = torch.arange(side, dtype=torch.float64) * h
        grid = torch.stack(torch.meshgrid(*([axis] * dim), indexing="ij"), dim=-1)
        return grid.reshape(-1, dim), h
    g = torch.Generator().manual_seed(0)
    return torch.rand(side ** dim, dim, generator=g, dtype=torch.float64), h


def kernel_kwargs(kernel, power):
    if kernel == "log":
        return dict(gamma=-3.0, eps=EPS)  # positive weights on the unit square/cube
    return dict(power=power, eps=EPS)


def call(backend, q, k, v, kernel, power, normalize, update, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = nonlocal_ext.nonlocal_aggregate(*leaves, kernel, normalize=normalize, update=update, backend=backend,
                                          **kernel_kwargs(kernel, power))
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads


def relative_error(ours, truth):
    return ((ours.double() - truth).abs().max() / truth.abs().max()).item()


def measure(geometry, offsets=OFFSETS, backends=BACKENDS, truth_backend="cpu"):
    base, h = points(geometry)
    v = torch.stack([torch.sin(2 * math.pi * base.sum(-1)), torch.cos(2 * math.pi * base[:, 0]) + base[:, -1]], -1)
    grad_out = torch.randn(base.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    for offset in offsets:
        p32 = (base + offset * h).float()
        p64 = p32.double()  # the truth sees the same (rounded) points, centred in float64
        p64 = p64 - p64.mean(0)
        for kernel, power in KERNELS:
            for normalize in NORMALIZATIONS:
                for update in UPDATES:
                    truth, truth_grads = call(truth_backend, p64, p64, v, kernel, power, normalize, update, grad_out)
                    for backend in backends:
                        out, grads = call(backend, p32, p32, v.float(), kernel, power, normalize, update, grad_out)
                        rows.append(dict(geometry=geometry, offset=offset, kernel=kernel, power=power,
                                         normalize=normalize, update=update, backend=backend,
                                         value_error=relative_error(out, truth),
                                         grad_error=max(relative_error(g, t) for g, t in zip(grads, truth_grads))))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=GEOMETRIES, required=True)
    parser.add_argument("--offsets", type=float, nargs="+", default=list(OFFSETS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--truth-backend", default="cpu", choices=("cpu", "reference"))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--interpreter-tiles", type=int, default=None,
                        help="under TRITON_INTERPRET=1: row and column tiles of the Triton kernels")
    args = parser.parse_args(argv)
    if args.interpreter_tiles:
        from nonlocal_ext.triton_kernels import configs
        configs.INTERPRETER_BLOCKS.update(BLOCK_I=args.interpreter_tiles, BLOCK_J=args.interpreter_tiles)
    rows = measure(args.geometry, args.offsets, args.backends, args.truth_backend)
    print(f"{'offset/h':>8} {'kernel':>9} {'norm':>5} {'update':>9} {'backend':>9} {'value':>9} {'grad':>9}")
    for r in rows:
        name = r["kernel"] if r["power"] is None else f"frac{r['power']:g}"
        print(f"{r['offset']:8g} {name:>9} {r['normalize']:>5} {r['update']:>9} {r['backend']:>9} "
              f"{r['value_error']:9.2e} {r['grad_error']:9.2e}")
    worst_v = max(r["value_error"] for r in rows)
    worst_g = max(r["grad_error"] for r in rows)
    print(f"worst: value {worst_v:.2e} (target 2e-4), gradient {worst_g:.2e} (target 2e-3)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
