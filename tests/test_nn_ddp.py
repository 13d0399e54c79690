"""One DDP training step (gloo, 2 CPU processes) of a small model with ``NonLocal2d``.

Each rank gets half of the batch; DDP averages the ranks' gradients. The single-process
reference computes the gradient of each half with the same initial weights and averages them
(BatchNorm uses per-process batch statistics in DDP, so this, and not the full-batch gradient,
is what DDP must reproduce). Gradients and the parameters after one SGD step must agree; float64,
so that the comparison is not about the order of float32 sums (all-reduce vs. the local mean).

Run alone: .venv/bin/python -m pytest -q tests/test_nn_ddp.py
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nonlocal_ext import nn as nl

WORLD = 2


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),
        nl.NonLocal2d(8),
        nl.NonLocal2d(8, mode="dot_product", sub_sample=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():  # leave the identity at init, so θ, φ and g receive gradients
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
    return model.double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 7, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)


def step(model, x, y):
    """Gradients of one step, then the parameters after one SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = data()
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        grads, params = step(model, x[shard], y[shard])
        results[rank] = (grads, params)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_matches_single_process():
    x, y = data()
    shard_grads = []
    for rank in range(WORLD):
        shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        shard_grads.append(step(make_model(), x[shard], y[shard])[0])
    expected_grads = [sum(gs) / WORLD for gs in zip(*shard_grads)]
    reference = make_model()
    with torch.no_grad():
        for p, g in zip(reference.parameters(), expected_grads):
            p -= 0.1 * g
    expected_params = [p.detach() for p in reference.parameters()]
    assert any(g.abs().sum() > 0 for g in expected_grads[1:-2])

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)
        results = dict(results)
    for rank in range(WORLD):
        grads, params = results[rank]
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for got, want in zip(params, expected_params):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
