"""examples/train_qtips.py: the six networks train a step on a tiny configuration; the summary and the
verdict on synthetic curves; the parameter counts of the thesis' configuration; a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import pathlib
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import resnet  # noqa: E402
import train_qtips as tq  # noqa: E402
from qtips import make_qtips  # noqa: E402

from nonlocal_ext.nn import PIDENonLocal  # noqa: E402

TINY = dict(tq.DEFAULT, train=8, val=4, size=16, epochs=1, batch=4, channels=[4, 8], blocks=2, pool=[2, 1],
            resnet_depth=8, resnet_width=2)


@pytest.fixture(scope="module")
def tiny_data():
    images, labels = make_qtips(TINY["train"] + TINY["val"], seed=0, size=TINY["size"])
    return images[:8], labels[:8], images[8:], labels[8:]


@pytest.mark.parametrize("network", tq.NETWORKS)
def test_every_network_builds_and_trains_one_epoch(network, tiny_data):
    torch.set_num_threads(1)
    model = tq.build(network, TINY)
    blocks = [m for m in model.modules() if isinstance(m, PIDENonLocal)]
    if tq.NONLOCAL.get(network):
        operator, s = tq.NONLOCAL[network]
        assert len(blocks) == 2 and all(b.operator == operator and b.s == s and b.backend == "auto" for b in blocks)
        assert blocks[0].op_kwargs["kernel"] == {"diffusion": "dot", "log": "log"}.get(network, "fractional")
    else:
        assert not blocks
    run = tq.train_run(network, 0, tiny_data, TINY, log=lambda line: None)
    assert run["network"] == network and run["parameters"] == tq.count_parameters(model)
    for key in ("train_loss", "train_accuracy", "val_accuracy", "epoch_seconds"):
        assert len(run[key]) == 1 and math.isfinite(run[key][0])
    assert 0 <= run["train_accuracy"][0] <= 1 and 0 <= run["val_accuracy"][0] <= 1
    nonlocal_time = run["nonlocal_seconds"]
    if blocks:
        assert nonlocal_time["train_forward"] > 0 and nonlocal_time["train_backward"] > 0
        assert nonlocal_time["eval_forward"] > 0 and 0 < run["nonlocal_share"] < 1
    else:
        assert run["nonlocal_share"] == 0


def test_the_same_seed_gives_the_same_run(tiny_data):
    a, b = (tq.train_run("log", 3, tiny_data, TINY, log=lambda line: None) for _ in range(2))
    assert a["train_loss"] == b["train_loss"] and a["val_accuracy"] == b["val_accuracy"]


def test_parameter_counts_of_the_thesis_configuration():
    counts = {n: tq.count_parameters(tq.build(n, tq.THESIS)) for n in ("plain", "diffusion", "log", "resnet")}
    assert round(counts["plain"], -4) == 490_000 and round(counts["diffusion"], -4) == 550_000
    assert counts["log"] == counts["diffusion"] and round(counts["resnet"], -4) == 660_000
    # He et al., Table 6: ResNet-20/32/44 have 0.27M/0.46M/0.66M parameters (10 classes)
    assert [round(tq.count_parameters(resnet.CifarResNet(10, d)), -4) for d in (20, 32, 44)] == [270_000, 460_000,
                                                                                              660_000]
    # the default keeps the thesis' ratios: ResNet ≈ 1.33 × plain, nonlocal ≈ 1.1 × plain
    default = {n: tq.count_parameters(tq.build(n, tq.DEFAULT)) for n in ("plain", "diffusion", "resnet")}
    assert 1.25 < default["resnet"] / default["plain"] < 1.4 and 1.05 < default["diffusion"] / default["plain"] < 1.2


def test_first_epoch_to_a_threshold():
    assert tq.first_epoch([0.1, 0.5, 0.95], 0.5) == 2
    assert tq.first_epoch([0.1, 0.5, 0.95], 0.9) == 3
    assert tq.first_epoch([0.1, 0.4], 0.5) is None
    assert tq.first_epoch([], 0.5) is None


def _runs(curves: dict) -> list[dict]:
    """Synthetic runs: network -> one training curve per seed (held-out = training)."""
    return [{"network": n, "seed": s, "parameters": 10, "train_accuracy": c, "val_accuracy": c, "seconds": 1.0,
             "nonlocal_share": 0.0} for n, per_seed in curves.items() for s, c in enumerate(per_seed)]


def _ramp(epoch_to_90: int | None, epochs: int = 10) -> list[float]:
    """A curve that first reaches 0.5 at epoch_to_90 − 1 and 0.9 at epoch_to_90 (never: it stays at 0.3)."""
    if epoch_to_90 is None:
        return [0.3] * epochs
    return [0.2] * (epoch_to_90 - 2) + [0.5] + [0.95] * (epochs - epoch_to_90 + 1)


def _curves(variant_epochs, plain_epochs, resnet_epochs):
    curves = {v: [_ramp(e) for e in variant_epochs] for v in tq.VARIANTS}
    curves["plain"] = [_ramp(e) for e in plain_epochs]
    curves["resnet"] = [_ramp(e) for e in resnet_epochs]
    return curves


def test_summary_of_synthetic_curves_with_a_never_reached_seed():
    summary = tq.summarize(_runs(_curves([3, 4, 5], [6, 7, None], [None, None, None])))
    assert summary["diffusion"]["epoch_to_90"] == {"per_seed": [3, 4, 5], "reached": 3, "mean": 4.0}
    assert summary["diffusion"]["epoch_to_50"]["mean"] == 3.0
    assert summary["plain"]["epoch_to_90"] == {"per_seed": [6, 7, None], "reached": 2, "mean": 6.5}
    assert summary["resnet"]["epoch_to_90"] == {"per_seed": [None] * 3, "reached": 0, "mean": None}
    assert summary["resnet"]["final_train_accuracy"] == {"mean": 0.3, "min": 0.3, "max": 0.3}
    rows = tq.table(summary)
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["plain"][3] == "6.5 (2/3)" and by_name["resnet"][3] == "never" and by_name["log"][3] == "4.0"


@pytest.mark.parametrize("variant,plain,res,expected", [
    ([3, 4, 5], [6, 7, 8], [None, None, None], "supports"),           # the thesis' picture: ResNet stagnates
    ([3, 4, 5], [6, 7, None], [9, 9, 9], "supports"),                  # a baseline seed that never gets there
    ([8, 9, 10], [3, 4, 5], [4, 5, 6], "contradicts"),                 # every variant later than both
    ([8, 9, 10], [3, 4, 5], [None] * 3, "contradicts"),                # later than plain, earlier than ResNet
    ([None] * 3, [3, 4, 5], [None] * 3, "contradicts"),                # the variants never reach it, plain does
    ([3, 5, 7], [4, 6, 8], [None] * 3, "cannot tell"),                 # overlapping spreads against plain
    ([None] * 3, [None] * 3, [None] * 3, "cannot tell"),               # nobody reaches 90%
])
def test_verdict_on_synthetic_curves(variant, plain, res, expected):
    result = tq.verdict(tq.summarize(_runs(_curves(variant, plain, res))))
    assert result["verdict"] == expected and result["text"].startswith(expected)


def test_verdict_is_mixed_when_one_variant_differs():
    curves = _curves([3, 4, 5], [6, 7, 8], [None] * 3)
    curves["log"] = [_ramp(e) for e in (6, 7, 9)]              # overlaps plain
    result = tq.verdict(tq.summarize(_runs(curves)))
    assert result["verdict"] == "cannot tell" and result["pairs"]["plain"]["log"] == "overlap"
    assert result["per_baseline"] == {"plain": "cannot tell", "resnet": "supports"}
    assert tq.verdict(tq.summarize(_runs({"plain": [_ramp(3)]})))["verdict"] == "cannot tell"   # runs missing


def test_main_writes_every_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["--out", str(out), "--seeds", "2", "--networks", "plain", "log", "--threads", "1", "--train", "8",
            "--val", "4", "--size", "16", "--epochs", "2", "--batch", "4", "--channels", "4", "8", "--blocks", "2",
            "--pool", "2", "1"]
    record = tq.main(argv)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["network"], r["seed"]) for r in saved["runs"]] == [("plain", 0), ("log", 0), ("plain", 1), ("log", 1)]
    assert saved["config"]["channels"] == [4, 8] and saved["config"]["lr"] == 0.01 and saved["seeds"] == 2
    assert set(saved["summary"]) == {"plain", "log"} and saved["verdict"].startswith("cannot tell")
    assert len(saved["runs"][0]["train_accuracy"]) == 2
    again = tq.main(argv)                                       # the same configuration: nothing to train
    assert "resuming: 4 runs" in capsys.readouterr().out and again["runs"] == record["runs"]


def test_thesis_flag_is_the_thesis_configuration():
    _, config, out = tq.parse(["--thesis"])
    assert config["channels"] == [32, 64, 112] and config["blocks"] == 6 and config["opening_stride"] == 1
    assert (config["train"], config["batch"], config["lr"], config["epochs"], config["noise"]) == (512, 50, 0.01, 30, 0.3)
    assert (config["resnet_depth"], config["resnet_width"]) == (44, 16) and out.name == "qtips_training_thesis"
    _, config, _ = tq.parse(["--thesis", "--epochs", "3"])
    assert config["epochs"] == 3 and config["channels"] == [32, 64, 112]
