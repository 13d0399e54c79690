r"""The Q-tips data set: classifying it needs information from both ends of a long stick, i.e.
long-range communication (Kannan, “Deep Neural Networks and PIDE discretizations”, §5.2; after
Haber, Lensink, Treister and Ruthotto, “IMEXnet: A Forward Stable Deep Neural Network”, ICML 2019).

Each sample is a 64×64 RGB image on a white background with a dark stick of length
l ~ U{32, …, 60} and width w ~ U{4, …, 8} pixels, rotated by r ~ U{−180, …, 180} degrees
about its centre (placed at a random position where the whole stick fits). Each end carries a
w×w square marker in one of 5 colours (red, green, blue, yellow, pink); the class is the
unordered pair of marker colours: C(5, 2) + 5 = 15 classes (the two ends may share a colour).
Pixel values are in [0, 1]; Gaussian noise of standard deviation σ = 0.3 is then added.

Generation is vectorized and deterministic: the same ``seed`` gives the same tensors.

    from qtips import make_qtips
    images, labels = make_qtips(512, seed=0)      # (512, 3, 64, 64) float32, (512,) int64
"""

from __future__ import annotations

import itertools
import math

import torch

SIZE = 64
COLOURS = {  # RGB in [0, 1]
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "pink": (1.0, 0.4, 0.7),
}
#: The 15 classes: unordered pairs of marker colours, i <= j.
CLASSES = list(itertools.combinations_with_replacement(range(len(COLOURS)), 2))
NUM_CLASSES = len(CLASSES)
STICK = 0.1    # the dark midsection
BACKGROUND = 1.0


def class_index(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Index in CLASSES of the unordered colour pair (first, second)."""
    lo, hi = torch.minimum(first, second), torch.maximum(first, second)
    table = torch.full((len(COLOURS), len(COLOURS)), -1, dtype=torch.long)
    for k, (i, j) in enumerate(CLASSES):
        table[i, j] = k
    return table[lo, hi]


def make_qtips(count: int, *, seed: int = 0, noise: float = 0.3, size: int = SIZE):
    """``count`` Q-tips images ``(count, 3, size, size)`` (float32) and labels ``(count,)`` in [0, 15)."""
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(32, 61, (count,), generator=g).float()
    width = torch.randint(4, 9, (count,), generator=g).float()
    angle = torch.randint(-180, 181, (count,), generator=g).float() * (math.pi / 180)
    first = torch.randint(0, len(COLOURS), (count,), generator=g)
    second = torch.randint(0, len(COLOURS), (count,), generator=g)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)       # (count, 2): (x, y)
    normal = torch.stack([-direction[:, 1], direction[:, 0]], dim=-1)
    # the centre may move as far as the stick's bounding box allows (half-diagonal of its corners)
    reach = (length[:, None] / 2 * direction.abs() + width[:, None] / 2 * normal.abs())  # (count, 2)
    room = (size / 2 - 1 - reach).clamp(min=0)
    centre = size / 2 + (torch.rand(count, 2, generator=g) * 2 - 1) * room

    coords = torch.arange(size, dtype=torch.float32) + 0.5
    px = coords.view(1, 1, size).expand(count, size, size)                     # x: column
    py = coords.view(1, size, 1).expand(count, size, size)                     # y: row
    dx, dy = px - centre[:, 0, None, None], py - centre[:, 1, None, None]
    along = dx * direction[:, 0, None, None] + dy * direction[:, 1, None, None]
    across = dx * normal[:, 0, None, None] + dy * normal[:, 1, None, None]
    half_l, half_w = length[:, None, None] / 2, width[:, None, None] / 2
    stick = (along.abs() <= half_l) & (across.abs() <= half_w)
    end_a = stick & (along >= half_l - width[:, None, None])
    end_b = stick & (along <= -half_l + width[:, None, None])

    palette = torch.tensor(list(COLOURS.values()))                             # (5, 3)
    images = torch.full((count, 3, size, size), BACKGROUND)
    images = torch.where(stick[:, None], torch.tensor(STICK), images)
    images = torch.where(end_a[:, None], palette[first][:, :, None, None], images)
    images = torch.where(end_b[:, None], palette[second][:, :, None, None], images)
    images = images + noise * torch.randn(images.shape, generator=g)
    return images, class_index(first, second)


if __name__ == "__main__":  # save a sheet of examples: python examples/qtips.py
    import pathlib

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = make_qtips(15, seed=3)
    names = list(COLOURS)
    fig, axes = plt.subplots(3, 5, figsize=(10, 6.5))
    for ax, img, lab in zip(axes.flat, images, labels):
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
        i, j = CLASSES[lab]
        ax.set_title(f"{lab.item()}: {names[i]}/{names[j]}", fontsize=8)
        ax.axis("off")
    out = pathlib.Path(__file__).parent / "results" / "qtips_samples.png"
    out.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(out)
