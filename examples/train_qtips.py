r"""Train a Hamiltonian network with and without PIDE nonlocal blocks on Q-tips
(Kannan, “Deep Neural Networks and PIDE discretizations”, §5.2).

Both networks see the same data in the same order and start from the same seed; the script
prints a progress bar per epoch, then saves the training-accuracy curves (PNG) and the numbers
(JSON) to ``examples/results/``.

    .venv/bin/python examples/train_qtips.py                 # the small CPU configuration
    .venv/bin/python examples/train_qtips.py --help          # every option

The thesis' configuration is ``--train 512 --batch 50 --epochs 30 --channels 32 64 112 --blocks 6
--opening-stride 1 --lr 0.01`` with SGD (momentum 0.9); the default here is smaller so both runs fit in a few minutes
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from hamiltonian import HamiltonianNet, count_parameters  # noqa: E402
from qtips import NUM_CLASSES, make_qtips  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class ProgressBar:
    """A one-line text progress bar: ``label [#####.....] 12/20 3.1s loss 1.234 acc 0.456``."""

    def __init__(self, total: int, label: str, width: int = 30, stream=sys.stderr):
        self.total, self.label, self.width, self.stream = total, label, width, stream
        self.start = time.perf_counter()

    def update(self, done: int, **stats) -> None:
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        text = " ".join(f"{k} {v:.3f}" for k, v in stats.items())
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {elapsed:5.1f}s {text}")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def evaluate(model, images, labels, batch):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / len(images)


def train(name, model, data, args):
    images, labels, val_images, val_labels = data
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    order_gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    history = {"train_accuracy": [], "train_loss": [], "val_accuracy": [], "epoch_seconds": []}
    steps = (len(images) + args.batch - 1) // args.batch
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(images), generator=order_gen)
        bar = ProgressBar(steps, f"{name:>9} epoch {epoch:2d}/{args.epochs}")
        start, correct, seen, loss_sum = time.perf_counter(), 0, 0, 0.0
        for step in range(steps):
            idx = order[step * args.batch:(step + 1) * args.batch]
            x, y = images[idx], labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.update(step + 1, loss=loss_sum / seen, acc=correct / seen)
        history["epoch_seconds"].append(time.perf_counter() - start)
        history["train_accuracy"].append(correct / seen)
        history["train_loss"].append(loss_sum / seen)
        history["val_accuracy"].append(evaluate(model, val_images, val_labels, args.batch))
    return history


def plot(results, config, path):
    """Training accuracy per epoch (left) and held-out accuracy (right) of both networks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_val) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name, style in (("plain", "--"), ("nonlocal", "-")):
        r = results[name]
        label = "Hamiltonian" if name == "plain" else f"Hamiltonian + PIDE ({config['operator']})"
        epochs = range(1, len(r["train_accuracy"]) + 1)
        ax.plot(epochs, r["train_accuracy"], style, marker="o", markersize=3,
                label=f"{label}: final {r['train_accuracy'][-1]:.3f}, {r['seconds']:.0f} s")
        ax_val.plot(epochs, r["val_accuracy"], style, marker="o", markersize=3, label=label)
    for a, title in ((ax, "training accuracy (running, per epoch)"), (ax_val, f"held-out accuracy ({config['val']} images)")):
        a.axhline(1 / NUM_CLASSES, color="grey", lw=0.8, ls=":", label="chance (1/15)")
        a.set_xlabel("epoch")
        a.set_ylim(0, 1.02)
        a.set_title(title, fontsize=10)
        a.grid(alpha=0.3)
        a.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Q-tips, {config['train']} training images, channels {tuple(config['channels'])}, "
                 f"{config['blocks']} blocks/Unit", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=512, help="training images (thesis: 512)")
    p.add_argument("--val", type=int, default=256, help="held-out images")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=2e-4)
    p.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--opening-stride", type=int, default=2, help="stride of the opening convolution (thesis: 1)")
    p.add_argument("--blocks", type=int, default=3, help="Hamiltonian blocks per Unit (thesis: 6)")
    p.add_argument("--h", type=float, default=0.2, help="step size of the Hamiltonian blocks")
    p.add_argument("--operator", default="diffusion",
                   choices=["diffusion", "fractional_laplacian", "inverse_fractional_laplacian"])
    p.add_argument("--s", type=float, default=0.5)
    p.add_argument("--nl-h", type=float, default=0.05, help="step size of the nonlocal stages (thesis: 0.04–0.08)")
    p.add_argument("--pool", type=int, nargs="+", default=[2, 2, 1],
                   help="key max-pool window of the nonlocal block in each Unit (1: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is the most robust on a CPU shared with other jobs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "qtips_training"), help="path of the PNG/JSON, without suffix")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.replot:
        record = json.loads(out.with_suffix(".json").read_text())
        plot(record["results"], record["config"], out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)

    images, labels = make_qtips(args.train + args.val, seed=args.seed)
    data = (images[:args.train], labels[:args.train], images[args.train:], labels[args.train:])
    pools = [None if k <= 1 else k for k in args.pool]
    results, total = {}, time.perf_counter()
    for name, operator in (("plain", None), ("nonlocal", args.operator)):
        torch.manual_seed(args.seed)
        kwargs = dict(s=args.s, h=args.nl_h, pool=pools) if operator else {}
        model = HamiltonianNet(NUM_CLASSES, channels=args.channels, blocks=args.blocks, h=args.h,
                               opening_stride=args.opening_stride, nonlocal_operator=operator, nonlocal_kwargs=kwargs)
        start = time.perf_counter()
        history = train(name, model, data, args)
        history["seconds"] = time.perf_counter() - start
        history["parameters"] = count_parameters(model)
        results[name] = history
        print(f"{name}: final training accuracy {history['train_accuracy'][-1]:.3f}, held-out "
              f"{history['val_accuracy'][-1]:.3f}, {history['parameters']} parameters, {history['seconds']:.1f} s")
    wall = time.perf_counter() - total
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python examples/train_qtips.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": vars(args), "wall_seconds": wall, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "results": results}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    plot(results, vars(args), out.with_suffix(".png"))
    print(f"wall time {wall:.1f} s; wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
