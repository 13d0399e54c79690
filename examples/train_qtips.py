r"""The Q-tips experiment of Kannan, “Deep Neural Networks and PIDE discretizations” (§5.2, Fig. 5.2):
do Hamiltonian networks with PIDE nonlocal blocks train faster than the plain Hamiltonian network
and than a ResNet of about the same size?

Six networks, each trained from the same data with the same seeds (a seed fixes the initial
weights and the order of the batches; the data set is the same for every run, ``--data-seed``):

| key | network |
|---|---|
| ``plain`` | Hamiltonian network (``hamiltonian.py``) |
| ``diffusion`` | + ``PIDENonLocal(operator="diffusion")`` after the 2nd block of each Unit |
| ``fractional`` | + ``PIDENonLocal(operator="fractional_laplacian", s=0.5)``: (−Δ)^½ |
| ``inverse_fractional`` | + ``PIDENonLocal(operator="inverse_fractional_laplacian", s=0.5)``: (−Δ)^−½ |
| ``log`` | + ``PIDENonLocal(operator="inverse_fractional_laplacian", s=1)``: (−Δ)^−1, the log kernel (s = n/2, n = 2) |
| ``resnet`` | CIFAR ResNet (``resnet.py``) |

    .venv/bin/python examples/train_qtips.py                 # the default figure: 6 networks × 3 seeds
    .venv/bin/python examples/train_qtips.py --thesis        # the thesis' configuration (a day or more on a CPU)
    .venv/bin/python examples/train_qtips.py --replot        # redraw the PNG and the verdict from the JSON

Outputs (``--out``, default ``examples/results/qtips_training``): ``.json`` with every run (per
epoch: training loss and accuracy, held-out accuracy, seconds), the time spent in the nonlocal
blocks, the configuration, the summary and the verdict; it is rewritten after every run, and a
restart with the same configuration skips the runs already in it (``--fresh`` starts over).
``.png``: training accuracy per epoch (the thesis' figure) and held-out accuracy per epoch, the
mean over seeds with a min–max band over seeds.

Training accuracy is the running accuracy of an epoch (in training mode, over the batches as they
are fitted); held-out accuracy is measured in evaluation mode after each epoch on ``--val``
further images of the same generator.

Configuration. The thesis trains on 512 images of 64×64 (noise σ = 0.3) for 30 epochs, batch 50,
SGD with learning rate 0.01, Units of 6 blocks with 32, 64 and 112 channels, against ResNet-44
(``--thesis``: 0.49M parameters plain, 0.55M with nonlocal blocks, 0.66M ResNet-44; about
1.3 GFLOP per image for the forward pass, some 64 times the default's, so an estimated hour or
more per run and more than a day for the figure on 2 CPU cores). The default keeps the data
(512 + 256 held-out images of 64×64, σ = 0.3), the optimizer (batch 50, lr 0.01), the 30 epochs,
the 6 blocks per Unit and the ResNet's depth 44, and shrinks the networks so that 6 networks ×
3 seeds fit in well under an hour on 2 CPU cores:

* the opening convolution has stride 2 (the Units see 32×32, 16×16, 8×8 instead of 64×64, 32×32,
  16×16): a quarter of the cost of every convolution and a sixteenth of the nonlocal blocks';
* a quarter of the widths: 8, 16, 28 channels (thesis 32, 64, 112), and ResNet-44 with widths
  4, 8, 16 (thesis 16, 32, 64); the parameter counts keep the thesis' ratios (31.6k plain,
  35.2k with nonlocal blocks, 42.1k ResNet-44; thesis 0.50M, 0.56M, 0.66M).

Measured (one epoch of each network at the default, 1 thread, another job on the other core):
19 s for the six networks together, so about 29 minutes for the figure at ``--threads 1``.
With 2 threads on an otherwise idle machine an epoch is about 1.6× faster; with 2 threads while
another job runs, it was 10× slower or worse (threads waiting for a busy core): use
``--threads 1`` on a shared machine.

Not in the thesis' list, taken from this example's earlier version: momentum 0.9, weight decay
2·10⁻⁴, step h = 0.2 of the Hamiltonian blocks, nonlocal blocks of 2 stages with step 0.05, kernel
scale 0.1, keys max-pooled by 2 in the first two Units (``--pool 2 2 1``), and BatchNorms in the
Hamiltonian network (see ``hamiltonian.py``). All backends are ``"auto"``.

Time in the nonlocal blocks: wall clock of every ``PIDENonLocal`` forward (hooks around the
module) and of its backward (from the moment the gradient of the block's output is ready to the
moment the gradient of its input is complete; the network is a chain, so only the block's own
autograd nodes run in between), summed over the training steps; the forward time of evaluation
is counted separately.

Verdict (``verdict()``). For each network and seed, the first epoch at which training accuracy
reaches 90% (never reached: ∞). A nonlocal variant reaches it *earlier* than a baseline (plain,
ResNet) if its latest seed is earlier than the baseline's earliest seed, *later* if its earliest
seed is later than the baseline's latest, else the two *overlap* (two ∞ overlap). Against one
baseline the run supports the thesis if all four variants are earlier, contradicts it if all four
are later, else cannot tell. The verdict is "supports" if it supports against both baselines,
"contradicts" if it contradicts against at least one (then the nonlocal variants are not faster
than both), else "cannot tell". The same rule at 50% is reported alongside.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from hamiltonian import HamiltonianNet, count_parameters  # noqa: E402
from qtips import NUM_CLASSES, make_qtips  # noqa: E402
from resnet import CifarResNet  # noqa: E402

from nonlocal_ext.nn import PIDENonLocal  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

#: network key -> (PIDENonLocal operator, s); None: no nonlocal block
NONLOCAL = {"plain": None, "diffusion": ("diffusion", 0.5), "fractional": ("fractional_laplacian", 0.5),
            "inverse_fractional": ("inverse_fractional_laplacian", 0.5), "log": ("inverse_fractional_laplacian", 1.0)}
NETWORKS = tuple(NONLOCAL) + ("resnet",)
VARIANTS = ("diffusion", "fractional", "inverse_fractional", "log")
BASELINES = ("plain", "resnet")
LABELS = {"plain": "Hamiltonian", "diffusion": "Hamiltonian + diffusion", "fractional": "Hamiltonian + (−Δ)^½",
          "inverse_fractional": "Hamiltonian + (−Δ)^−½", "log": "Hamiltonian + (−Δ)^−1 (log kernel)",
          "resnet": "ResNet"}
THRESHOLDS = (0.5, 0.9)

DEFAULT = dict(train=512, val=256, size=64, noise=0.3, epochs=30, batch=50, lr=0.01, momentum=0.9, weight_decay=2e-4,
               channels=[8, 16, 28], blocks=6, opening_stride=2, h=0.2, nl_h=0.05, scale=0.1, pool=[2, 2, 1],
               resnet_depth=44, resnet_width=4, data_seed=0)
THESIS = dict(DEFAULT, channels=[32, 64, 112], opening_stride=1, resnet_width=16)


# ---------------------------------------------------------------------------------------- networks


def build(network: str, config: dict) -> torch.nn.Module:
    """One of :data:`NETWORKS` at ``config`` (the keys of :data:`DEFAULT`)."""
    if network == "resnet":
        return CifarResNet(NUM_CLASSES, depth=config["resnet_depth"], width=config["resnet_width"],
                           opening_stride=config["opening_stride"])
    operator, s = NONLOCAL[network] or (None, None)
    kwargs = {}
    if operator:
        kwargs = dict(s=s, n=2, scale=config["scale"], h=config["nl_h"], backend="auto",
                      pool=[None if k <= 1 else k for k in config["pool"]])
    return HamiltonianNet(NUM_CLASSES, channels=config["channels"], blocks=config["blocks"], h=config["h"],
                          opening_stride=config["opening_stride"], nonlocal_operator=operator, nonlocal_kwargs=kwargs)


class NonlocalClock:
    """Wall-clock seconds spent inside the model's ``PIDENonLocal`` blocks, forward and backward."""

    def __init__(self, model: torch.nn.Module):
        self.forward = self.backward = 0.0
        for m in model.modules():
            if isinstance(m, PIDENonLocal):
                m.register_forward_pre_hook(self._enter)
                m.register_forward_hook(self._leave)

    def _enter(self, module, inputs):
        if inputs[0].requires_grad:       # the backward through the block ends when its input's gradient is complete
            inputs[0].register_hook(self._backward_done)
        self._start = time.perf_counter()

    def _leave(self, module, inputs, output):
        self.forward += time.perf_counter() - self._start
        if output.requires_grad:          # ... and starts when its output's gradient is ready
            output.register_hook(self._backward_starts)

    def _backward_starts(self, grad):
        self._backward_start = time.perf_counter()

    def _backward_done(self, grad):
        self.backward += time.perf_counter() - self._backward_start


def evaluate(model, images, labels, batch):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / len(images)


def train_run(network: str, seed: int, data, config: dict, log=print) -> dict:
    """Train one network from one seed; the record of the run (curves per epoch, seconds)."""
    images, labels, val_images, val_labels = data
    torch.manual_seed(seed)
    model = build(network, config)
    clock = NonlocalClock(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                weight_decay=config["weight_decay"])
    order_gen = torch.Generator().manual_seed(seed)       # the same batches for every network
    run = {"network": network, "seed": seed, "parameters": count_parameters(model), "train_loss": [],
           "train_accuracy": [], "val_accuracy": [], "epoch_seconds": []}
    train_seconds = eval_seconds = eval_forward = 0.0
    batch = config["batch"]
    for epoch in range(1, config["epochs"] + 1):
        start, correct, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(images), generator=order_gen)
        for i in range(0, len(images), batch):
            idx = order[i:i + batch]
            logits = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            loss_sum += loss.item() * len(idx)
        middle, before = time.perf_counter(), clock.forward
        val = evaluate(model, val_images, val_labels, batch) if len(val_images) else float("nan")
        end = time.perf_counter()
        eval_forward += clock.forward - before
        train_seconds, eval_seconds = train_seconds + middle - start, eval_seconds + end - middle
        run["train_loss"].append(loss_sum / len(images))
        run["train_accuracy"].append(correct / len(images))
        run["val_accuracy"].append(val)
        run["epoch_seconds"].append(end - start)
        log(f"  {network} seed {seed} epoch {epoch:2d}/{config['epochs']}: loss {run['train_loss'][-1]:.3f} "
            f"train {run['train_accuracy'][-1]:.3f} held-out {val:.3f} ({end - start:.1f} s)")
    run["seconds"] = train_seconds + eval_seconds
    run["train_seconds"], run["eval_seconds"] = train_seconds, eval_seconds
    run["nonlocal_seconds"] = {"train_forward": clock.forward - eval_forward, "train_backward": clock.backward,
                               "eval_forward": eval_forward}
    run["nonlocal_share"] = (clock.forward + clock.backward) / run["seconds"]
    return run


# ---------------------------------------------------------------------------------------- summary


def first_epoch(curve, threshold: float):
    """The first epoch (1-based) at which ``curve`` reaches ``threshold``; None if it never does."""
    return next((e + 1 for e, v in enumerate(curve) if v >= threshold), None)


def _spread(values):
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summarize(runs) -> dict:
    """Per network: parameters, epochs to each of :data:`THRESHOLDS` (per seed and the mean over the
    seeds that reach it), final training and held-out accuracy (mean, min, max over seeds)."""
    summary = {}
    for network in dict.fromkeys(r["network"] for r in runs):
        mine = [r for r in runs if r["network"] == network]
        entry = {"parameters": mine[0]["parameters"], "seeds": [r["seed"] for r in mine]}
        for t in THRESHOLDS:
            epochs = [first_epoch(r["train_accuracy"], t) for r in mine]
            reached = [e for e in epochs if e is not None]
            entry[f"epoch_to_{round(100 * t)}"] = {"per_seed": epochs, "reached": len(reached),
                                                  "mean": sum(reached) / len(reached) if reached else None}
        entry["final_train_accuracy"] = _spread([r["train_accuracy"][-1] for r in mine])
        entry["final_val_accuracy"] = _spread([r["val_accuracy"][-1] for r in mine])
        entry["seconds"] = _spread([r["seconds"] for r in mine])
        entry["nonlocal_share"] = _spread([r["nonlocal_share"] for r in mine])
        summary[network] = entry
    return summary


def compare(variant_epochs, baseline_epochs) -> str:
    """"earlier", "later" or "overlap": the per-seed epochs of a variant against a baseline's (None = never)."""
    v = [math.inf if e is None else e for e in variant_epochs]
    b = [math.inf if e is None else e for e in baseline_epochs]
    if max(v) < min(b):
        return "earlier"
    if min(v) > max(b):
        return "later"
    return "overlap"


def verdict(summary: dict, threshold: float = 0.9) -> dict:
    """The rule of the module docstring: ``{"verdict": str, "text": str, "pairs": {...}}``."""
    key = f"epoch_to_{round(100 * threshold)}"
    missing = [n for n in VARIANTS + BASELINES if n not in summary]
    if missing:
        return {"verdict": "cannot tell", "text": f"cannot tell: no runs of {', '.join(missing)}", "pairs": {}}
    pairs, per_baseline = {}, {}
    for b in BASELINES:
        outcomes = {v: compare(summary[v][key]["per_seed"], summary[b][key]["per_seed"]) for v in VARIANTS}
        pairs[b] = outcomes
        values = set(outcomes.values())
        per_baseline[b] = "supports" if values == {"earlier"} else "contradicts" if values == {"later"} else "cannot tell"
    if all(v == "supports" for v in per_baseline.values()):
        overall = "supports"
    elif "contradicts" in per_baseline.values():
        overall = "contradicts"
    else:
        overall = "cannot tell"
    detail = "; ".join(f"vs {b}: {per_baseline[b]} (" + ", ".join(f"{v} {o}" for v, o in pairs[b].items()) + ")"
                       for b in BASELINES)
    return {"verdict": overall, "threshold": threshold, "per_baseline": per_baseline, "pairs": pairs,
            "text": f"{overall}: epochs to {round(100 * threshold)}% training accuracy over the seeds; {detail}"}


def _epochs(entry) -> str:
    if entry["mean"] is None:
        return "never"
    seeds = len(entry["per_seed"])
    return f"{entry['mean']:.1f}" + ("" if entry["reached"] == seeds else f" ({entry['reached']}/{seeds})")


def _acc(s) -> str:
    return f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def table(summary: dict) -> list[list[str]]:
    """The verdict table: header row, then one row per network."""
    rows = [["network", "params", "epoch to 50%", "epoch to 90%", "final train acc [min, max]",
             "final held-out acc [min, max]", "nonlocal share"]]
    for network, e in summary.items():
        share = "" if network in ("plain", "resnet") else f"{e['nonlocal_share']['mean']:.0%}"
        rows.append([network, f"{e['parameters']:,}", _epochs(e["epoch_to_50"]), _epochs(e["epoch_to_90"]),
                     _acc(e["final_train_accuracy"]), _acc(e["final_val_accuracy"]), share])
    return rows


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------- figure


def plot(record: dict, path: pathlib.Path) -> None:
    """Training accuracy (left) and held-out accuracy (right) per epoch: mean over seeds, min–max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"plain": ("black", "--"), "resnet": ("grey", ":"), "diffusion": ("tab:blue", "-"),
              "fractional": ("tab:orange", "-"), "inverse_fractional": ("tab:green", "-"), "log": ("tab:red", "-")}
    config = record["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    for network in NETWORKS:
        runs = [r for r in record["runs"] if r["network"] == network]
        if not runs:
            continue
        colour, style = styles[network]
        name = LABELS[network] + (f"-{config['resnet_depth']}" if network == "resnet" else "")
        label = f"{name}: {runs[0]['parameters']:,} params, {len(runs)} seed{'s' * (len(runs) > 1)}"
        for ax, key in zip(axes, ("train_accuracy", "val_accuracy")):
            curves = torch.tensor([r[key] for r in runs])
            epochs = range(1, curves.shape[1] + 1)
            ax.plot(epochs, curves.mean(0), style, color=colour, label=label)
            ax.fill_between(epochs, curves.min(0).values, curves.max(0).values, color=colour, alpha=0.15, lw=0)
    titles = ("training accuracy (running, per epoch)", f"held-out accuracy ({config['val']} images)")
    for ax, title in zip(axes, titles):
        ax.axhline(1 / NUM_CLASSES, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="epoch", ylim=(0, 1.02), title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    short = record.get("verdict_detail", {}).get("90%", {}).get("verdict", "?")
    fig.suptitle(f"Q-tips: {config['train']} images, channels {tuple(config['channels'])}, {config['blocks']} blocks/Unit, "
                 f"opening stride {config['opening_stride']}; mean over seeds, band: min–max over seeds; "
                 f"verdict at 90%: {short}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


def finish(record: dict, out: pathlib.Path) -> None:
    """Summary and verdicts from the runs, then write the JSON."""
    record["summary"] = summarize(record["runs"]) if record["runs"] else {}
    if record["summary"]:
        record["verdict_detail"] = {f"{round(100 * t)}%": verdict(record["summary"], t) for t in THRESHOLDS}
        record["verdict"] = record["verdict_detail"]["90%"]["text"]
    record["wall_seconds"] = sum(r["seconds"] for r in record["runs"])
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thesis", action="store_true", help="the thesis' configuration (any option below overrides it)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ..., seeds − 1 per network")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", help="path of the PNG/JSON without suffix (default examples/results/qtips_training, "
                                 "with --thesis qtips_training_thesis)")
    p.add_argument("--fresh", action="store_true", help="ignore the runs already in the JSON")
    p.add_argument("--replot", action="store_true", help="only recompute the summary and redraw from the JSON")
    for key, value in DEFAULT.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        p.add_argument("--" + key.replace("_", "-"), type=kind, nargs="+" if isinstance(value, list) else None,
                       help=f"default {value}; with --thesis {THESIS[key]}")
    args = p.parse_args(argv)
    config = dict(THESIS if args.thesis else DEFAULT)
    config.update({k: getattr(args, k) for k in DEFAULT if getattr(args, k) is not None})
    out = pathlib.Path(args.out or RESULTS / ("qtips_training_thesis" if args.thesis else "qtips_training"))
    return args, config, out


def main(argv=None):
    args, config, out = parse(argv)
    if args.replot:
        record = json.loads(out.with_suffix(".json").read_text())
        finish(record, out)
        plot(record, out.with_suffix(".png"))
        print_table(table(record["summary"]))
        print(record.get("verdict"))
        return record
    torch.set_num_threads(args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python examples/train_qtips.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "machine": platform.platform(),
              "config": config, "seeds": args.seeds, "runs": []}
    previous = out.with_suffix(".json")
    if not args.fresh and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("config") == config and "runs" in old:
            record["runs"] = old["runs"]
            print(f"resuming: {len(old['runs'])} runs already in {previous}")

    images, labels = make_qtips(config["train"] + config["val"], seed=config["data_seed"], noise=config["noise"],
                                size=config["size"])
    data = (images[:config["train"]], labels[:config["train"]], images[config["train"]:], labels[config["train"]:])
    todo = [(n, s) for s in range(args.seeds) for n in args.networks]      # seed-major: a partial figure is fair
    done = {(r["network"], r["seed"]) for r in record["runs"]}
    start = time.perf_counter()
    for k, (network, seed) in enumerate(todo, 1):
        if (network, seed) in done:
            continue
        print(f"[{k}/{len(todo)}] {network}, seed {seed} ({time.perf_counter() - start:.0f} s so far)", flush=True)
        run = train_run(network, seed, data, config, log=lambda line: print(line, flush=True))
        record["runs"].append(run)
        finish(record, out)
        print(f"[{k}/{len(todo)}] {network}, seed {seed}: {run['parameters']:,} parameters, final train "
              f"{run['train_accuracy'][-1]:.3f}, held-out {run['val_accuracy'][-1]:.3f}, {run['seconds']:.0f} s, "
              f"{run['nonlocal_share']:.0%} in nonlocal blocks", flush=True)
    finish(record, out)
    plot(record, out.with_suffix(".png"))
    print()
    print_table(table(record["summary"]))
    print(f"\nverdict: {record.get('verdict')}")
    print(f"training time {record['wall_seconds']:.0f} s in {len(record['runs'])} runs; wrote "
          f"{out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return record


if __name__ == "__main__":
    main()
