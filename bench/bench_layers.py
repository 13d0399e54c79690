"""Layer-level benchmark: a training step of ``nonlocal_ext.nn.convert(block)`` against the block itself.

    .venv/bin/python bench/bench_layers.py                   # the five shapes of the papers (long: quiet machine)
    .venv/bin/python bench/bench_layers.py --tiny            # the same cases scaled down: a smoke run in seconds
    .venv/bin/python bench/bench_layers.py --blocks mmcv --shapes res4,seg --repeat 5 --json out.json

One step = forward + backward (``out.backward(grad)``, parameter gradients reset to None before each
step), float32, CPU, train mode, the machine's torch threads. Time: the fastest of ``--repeat``
steps after a warm-up (nonlocal-bench's timer), the original's and the converted layer's steps taking
turns. Memory: peak RSS growth of one step in a fresh
process (``/proc/self/clear_refs``; nonlocal-bench's measurement, with glibc returning freed blocks at
once, ``fresh_process.exact_rss``), after one warm-up step, with the block and its input already
allocated. ``speed-up`` is (original time) / (converted time): ≥ 1.0 means the converted
layer is at least as fast.

Blocks (the installed packages' own classes, pinned in requirements-dev.txt):
* ``mmcv``: ``mmcv.cnn.NonLocal2d/3d`` (embedded Gaussian, ``use_scale``, BN, ``sub_sample`` as the shape says);
* ``pytorchvideo``: ``create_nonlocal`` (softmax, BN; x pooled 1×2×2 before φ and g when sub-sampled;
  a 2-D shape runs as T = 1);
* ``timm``: ``NonLocalAttn`` (2-D only, inter = C/8, never sub-sampled: that is its design).

Shapes (Wang et al. 2018 and its detection/segmentation uses): ResNet-50 res4 (B=16, C=1024, 14×14),
res3 (B=8, C=512, 28×28), detection res4 (B=2, C=1024, 50×68), I3D res4 (B=4, C=1024, 4×14×14), all
sub-sampled; segmentation (B=2, C=256, 64×64), not sub-sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

import nonlocal_ext
from nonlocal_ext.benchmark.fresh_process import exact_rss, rss_kib
from nonlocal_ext.benchmark.measure import time_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torchvision_ops import declare_missing_ops  # noqa: E402

declare_missing_ops()  # timm imports torchvision, whose CUDA-built operators cannot load on a CPU torch

# name -> (batch, channels, spatial, sub_sample)
SHAPES = {
    "res4": (16, 1024, (14, 14), True),
    "res3": (8, 512, (28, 28), True),
    "det-res4": (2, 1024, (50, 68), True),
    "i3d-res4": (4, 1024, (4, 14, 14), True),
    "seg": (2, 256, (64, 64), False),
}
TINY = {  # the same cases at a size that runs in milliseconds
    "res4": (2, 64, (7, 7), True),
    "res3": (2, 32, (10, 10), True),
    "det-res4": (1, 64, (9, 13), True),
    "i3d-res4": (1, 64, (2, 7, 7), True),
    "seg": (1, 16, (12, 12), False),
}
BLOCKS = ("mmcv", "pytorchvideo", "timm")


def build_block(block: str, channels: int, spatial, sub_sample: bool) -> tuple[nn.Module, tuple] | None:
    """(original block, the spatial shape it takes) or None where the block has no such variant."""
    if block == "mmcv":
        from mmcv.cnn import NonLocal2d, NonLocal3d
        cls = NonLocal2d if len(spatial) == 2 else NonLocal3d
        bn = dict(type="BN") if len(spatial) == 2 else dict(type="BN3d")
        return cls(channels, sub_sample=sub_sample, use_scale=True, norm_cfg=bn), spatial
    if block == "pytorchvideo":
        from pytorchvideo.layers.nonlocal_net import create_nonlocal
        video = spatial if len(spatial) == 3 else (1, *spatial)
        pool = (1, 2, 2) if sub_sample else (1, 1, 1)
        return create_nonlocal(dim_in=channels, dim_inner=channels // 2, pool_size=pool, instantiation="softmax"), video
    if block == "timm":
        if len(spatial) != 2:
            return None
        from timm.layers import NonLocalAttn
        return NonLocalAttn(channels), spatial
    raise ValueError(f"unknown block {block!r}; expected one of {', '.join(BLOCKS)}")


def training_step(module: nn.Module, x: torch.Tensor):
    grad = torch.ones_like(x)

    def step():
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)
    return step


def setup(block: str, shape, which: str):
    batch, channels, spatial, sub_sample = shape
    built = build_block(block, channels, spatial, sub_sample)
    if built is None:
        return None
    module, spatial = built
    torch.manual_seed(0)
    module = module.float().train()
    if which == "converted":
        module = nonlocal_ext.nn.convert(module)
    x = torch.randn(batch, channels, *spatial, requires_grad=True)
    return training_step(module, x)


def peak_mb_here(block: str, shape, which: str) -> float:
    """Peak RSS growth (MB) of one training step after a warm-up step, in this process (call it in a
    fresh one: the first step also pays one-time costs such as lazily loaded code)."""
    exact_rss()
    step = setup(block, shape, which)
    step()
    baseline = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    return (rss_kib("VmHWM") - baseline) / 1024


def peak_mb(block: str, shape, which: str) -> float:
    """:func:`peak_mb_here` in a fresh Python process."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([block, shape, which])],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def interleaved_best(steps: dict, repeat: int) -> dict:
    """The fastest of ``repeat`` timed calls of each step, the steps taking turns (one warm-up call each
    first), so that a drift of the machine's speed during the case reaches both alike."""
    for step in steps.values():
        step()
    times = {which: [] for which in steps}
    for _ in range(repeat):
        for which, step in steps.items():
            times[which] += time_step(step, "cpu", 1, warmup=0)
    return {which: min(t) for which, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated: mmcv,pytorchvideo,timm")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="the cases scaled down (a smoke run)")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per case (the fastest is reported)")
    parser.add_argument("--skip-memory", action="store_true", help="no fresh-process peak-memory runs")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        block, shape, which = json.loads(args.child)
        shape[2] = tuple(shape[2])
        print(peak_mb_here(block, tuple(shape), which))
        return 0
    table = TINY if args.tiny else SHAPES
    blocks, shapes = args.blocks.split(","), args.shapes.split(",")
    for name in blocks:
        if name not in BLOCKS:
            parser.error(f"--blocks: unknown block {name!r}; expected some of {', '.join(BLOCKS)}")
    for name in shapes:
        if name not in table:
            parser.error(f"--shapes: unknown shape {name!r}; expected some of {', '.join(table)}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")

    rows = []
    header = (f"{'block':<13}{'shape':<10}{'B×C×spatial':<22}{'original ms':>12}{'converted ms':>13}{'speed-up':>9}"
              f"{'orig MB':>9}{'conv MB':>9}")
    print(f"training step (fwd+bwd), float32, CPU, {torch.get_num_threads()} threads, best of {args.repeat}")
    print(header)
    for block in blocks:
        for shape_name in shapes:
            shape = table[shape_name]
            steps = {which: setup(block, shape, which) for which in ("original", "converted")}
            pooled = shape[3] and block != "timm"  # timm's block has no sub-sampling
            desc = f"{shape[0]}×{shape[1]}×{'×'.join(map(str, shape[2]))}{' sub' if pooled else ''}"
            if steps["original"] is None:
                print(f"{block:<13}{shape_name:<10}{desc:<22}{'(no such variant)':>34}")
                continue
            seconds = interleaved_best(steps, args.repeat)
            del steps
            memory = ({which: None for which in seconds} if args.skip_memory
                      else {which: peak_mb(block, shape, which) for which in seconds})
            row = {"block": block, "shape": shape_name, "batch": shape[0], "channels": shape[1],
                   "spatial": list(shape[2]), "sub_sample": pooled,
                   "original_s": seconds["original"], "converted_s": seconds["converted"],
                   "speedup": seconds["original"] / seconds["converted"],
                   "original_peak_mb": memory["original"], "converted_peak_mb": memory["converted"]}
            rows.append(row)
            mb = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            print(f"{block:<13}{shape_name:<10}{desc:<22}{1e3 * row['original_s']:>12.1f}{1e3 * row['converted_s']:>13.1f}"
                  f"{row['speedup']:>8.2f}×{mb(row['original_peak_mb']):>9}{mb(row['converted_peak_mb']):>9}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "tiny": args.tiny,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
