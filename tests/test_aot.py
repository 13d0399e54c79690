"""`python -m nonlocal_ext.aot` compiles the Triton kernels for sm_80 and sm_90 with no GPU (docs/gpu.md).

CI compiles the quick set (every affinity, normalization, update, symmetric flag and dtype (fp16, bf16,
fp32) at least once; about 60 compilations): every variant compiles on both targets, spills nothing
(STACK + LOCAL = 0), every fused kernel family uses tensor-core instructions (HMMA / HGMMA), and their
operand type follows the input dtype. The full set is
`python -m nonlocal_ext.aot --arch sm_80,sm_90 --json FILE` (see bench/NOTES_triton.md).

Run alone: .venv/bin/python -m pytest -q tests/test_aot.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = {"kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes", "mma_instructions",
        "mma_operand_types"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("tests/test_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "nonlocal_ext.aot", "--arch", "sm_80,sm_90", "--set", "quick",
                             "--json", str(path)], cwd=root, capture_output=True, text=True,
                            env=dict(os.environ, TRITON_DEFAULT_FP_FUSION="1"))
    assert path.exists(), result.stdout[-5000:] + result.stderr[-5000:]
    rows = json.loads(path.read_text())
    return result, rows


def test_every_variant_compiles_on_both_targets(report):
    result, rows = report
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']} {r['variant']} {r['arch']}: {r['error']}" for r in errors)
    assert result.returncode == 0
    for arch in ("sm_80", "sm_90"):
        assert {(r["kernel"], r["variant"]) for r in rows if r["arch"] == "sm_80"} == \
               {(r["kernel"], r["variant"]) for r in rows if r["arch"] == arch}
    assert all(KEYS <= set(r) for r in rows)
    assert "registers" in result.stdout.splitlines()[0] or "regs" in result.stdout.splitlines()[0]


def test_no_spills(report):
    _, rows = report
    spilled = [f"{r['kernel']} {r['variant']} {r['arch']}: {r['spill_bytes']} bytes" for r in rows if r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_every_block_fits_the_register_file(report):
    """A kernel launches only if registers × threads fit the 64 K registers of a block: with ``maxnreg`` ptxas
    builds 16-warp kernels of up to 255 registers that compile without spills and fail at launch."""
    from nonlocal_ext.aot import launchable
    _, rows = report
    over = [f"{r['kernel']} {r['variant']} {r['arch']}: {r['registers']} registers × {r['num_warps']} warps"
            for r in rows if not launchable(r)]
    assert not over, "\n".join(over)


def test_max_warps_follows_the_register_file():
    from nonlocal_ext.aot import max_warps
    assert [max_warps(r) for r in (32, 64, 65, 128, 129, 168, 240, 255)] == [32, 32, 28, 16, 15, 12, 8, 8]


def test_fused_kernels_use_tensor_cores(report):
    _, rows = report
    for family in ("forward", "column", "row"):
        for arch in ("sm_80", "sm_90"):
            family_rows = [r for r in rows if r["kernel"] == family and r["arch"] == arch]
            assert family_rows
            without = [r["variant"] for r in family_rows if r["mma_instructions"] == 0]
            assert not without, f"{family} on {arch} without HMMA/HGMMA: {without}"


def test_tensor_core_operands_follow_the_input_dtype(report):
    """Half variants multiply q·kᵀ in their own type (F16 / BF16 operands); float32 variants only in tf32 (tf32x3)."""
    _, rows = report
    expected = {"fp16": "F16", "bf16": "BF16", "fp32": "TF32"}
    checked = set()
    for r in rows:
        if r["kernel"] == "preprocess":
            continue
        dtype = next(part for part in r["variant"].split("-") if part in expected)
        types = set(r["mma_operand_types"])
        assert expected[dtype] in types and types <= {expected[dtype], "TF32"}, (r["variant"], r["arch"], types)
        checked.add(dtype)
    assert checked == set(expected)


def _list_of(row):
    """The autotune list a report row was compiled from (the width class is the name's ``-w<width>``, else 64)."""
    from nonlocal_ext.triton_kernels import configs
    parts = row["variant"].split("-")
    width = next((int(p[1:]) for p in parts if p[0] == "w" and p[1:].isdigit()), 64)
    return configs.configs_for(row["kernel"], "fp32" in parts, "symmetric" in parts or row["kernel"] == "preprocess",
                               width)


def _same(config, row):
    return (dict(config.kwargs) == row["blocks"] and config.num_warps == row["num_warps"]
            and config.num_stages == row["num_stages"] and config.maxnreg == row.get("maxnreg"))


def test_autotune_entries_compiled_without_spills_on_their_targets():
    """bench/results/aot_configs.json (`--set heavy --configs all` + `--set targets --configs all`, every
    width class): every entry of every autotune list compiled on each target it is listed for, with no spills."""
    import triton
    from nonlocal_ext.aot import launchable
    from nonlocal_ext.triton_kernels import configs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench", "results", "aot_configs.json")) as f:
        rows = json.load(f)
    assert not [r for r in rows if "error" in r]
    for lst in configs.shipped_lists(("forward", "column", "row", "preprocess")):
        assert set(configs.archs_of(lst[0])) == {configs.SM80, configs.SM90}, "the default must be verified on both"
        for config in lst:
            triton.Config(**config.__dict__)  # the autotuner's disk cache rebuilds configs this way
            for target in configs.archs_of(config):
                compiled = [r for r in rows if r["arch"] == target and _list_of(r) is lst and _same(config, r)]
                default = [r for r in rows if r["arch"] == target and _list_of(r) is lst and _same(lst[0], r)]
                assert compiled and len(compiled) == len(default), \
                    f"{config} was not compiled for every variant on {target}: rerun the --configs all report"
                assert all(r["spill_bytes"] == 0 for r in compiled), \
                    [(r["variant"], r["arch"], r["spill_bytes"]) for r in compiled if r["spill_bytes"]]
                assert all(launchable(r) for r in compiled), \
                    [(r["variant"], r["arch"], r["registers"], r["num_warps"]) for r in compiled if not launchable(r)]


def _copies(config, rows) -> tuple[int, int]:
    """The most warps computing one instruction tile, over the rows compiled from ``config``: (pair tiles, the
    products into the accumulators); the pair tiles are the BLOCK_I × BLOCK_J products (batched with SPLIT_K)."""
    tile = value = 1
    for r in rows:
        for dot in r["dots"]:
            if dot["shape"][-2:] == [config.kwargs["BLOCK_I"], config.kwargs["BLOCK_J"]]:
                tile = max(tile, dot["replication"])
            else:
                value = max(value, dot["replication"])
    return tile, value


def test_replication_of_each_entry_is_its_compiled_layout():
    """The work model's repeated instruction tiles (configs.replication_of: how many warps compute each 16 × 8
    tile of the pair tiles and of the products into the accumulators) are those of the compiled sm_90 kernels
    in bench/results/aot_configs.json, for every entry of every list (the most over the variants compiled
    from it: an entry shared by several lists, e.g. the half and float32 column passes, takes the most). That
    file is compiled with the development pin of Triton, whose layouts configs.PINNED_TRITON names."""
    from nonlocal_ext.triton_kernels import configs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench", "results", "aot_configs.json")) as f:
        rows = [r for r in json.load(f) if r["arch"] == "sm_90" and r["kernel"] != "preprocess"]
    checked = 0
    for family in ("forward", "column", "row"):
        entries = {id(config): config for lst in configs.shipped_lists((family,)) for config in lst}
        for config in entries.values():
            if configs.SM90 not in configs.archs_of(config):
                continue
            compiled = [r for r in rows if r["kernel"] == family and _same(config, r)
                        and any(c is config for c in _list_of(r))]
            assert compiled and all(r["dots"] for r in compiled), config
            model = configs.replication_of(family, config, triton_version=configs.PINNED_TRITON)
            assert model == _copies(config, compiled), (family, config.kwargs)
            checked += 1
    assert checked > 20


def test_replication_is_recorded_per_triton_release():
    """configs.PINNED_TRITON is the release requirements-dev.txt pins (the one aot_configs.json is compiled with),
    and the layouts recorded for another release are read under it and only under it."""
    from nonlocal_ext import triton_compat
    from nonlocal_ext.triton_kernels import configs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "requirements-dev.txt")) as f:
        pin = triton_compat.read_pins(f.read())["triton"]
    assert pin.startswith(configs.PINNED_TRITON + ".")
    entry = configs.FP32_SYMMETRIC_COLUMN_256[0]
    assert configs.replication_of("column", entry, triton_version=pin) == (1, 1)
    assert configs.replication_of("column", entry, triton_version="3.8.0") == (2, 1)
    assert configs.replication_of("column", configs.FP32_COLUMN_256[0], triton_version="3.8.0") == (1, 1)


def test_quick_set_layouts_repeat_no_more_than_the_model_says(report):
    """The quick set compiled here (both targets): no product's instruction tiles are computed by more warps
    than configs.replication_of says for its configuration under the Triton release imported (sm_80 lays some
    out with fewer copies; under `make triton-compat` this checks the layouts recorded for the other release)."""
    from nonlocal_ext.triton_kernels import configs
    _, rows = report
    for r in rows:
        if r["kernel"] == "preprocess":
            continue
        config = _list_of(r)[r.get("config", 0)]
        tile, value = _copies(config, [r])
        model = configs.replication_of(r["kernel"], config)
        assert tile <= model[0] and value <= model[1], (r["variant"], r["arch"], (tile, value), model)


def test_each_gpu_autotunes_over_its_targets_list():
    from nonlocal_ext.triton_kernels import configs
    assert [configs.target_of(c) for c in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]] == \
        ["sm_80", "sm_80", "sm_80", "sm_90", "sm_90", "sm_90"]
    for target in ("sm_80", "sm_90"):
        for lst in (configs.FORWARD_CONFIGS, configs.FORWARD_CONFIGS_FP32, configs.ROW_CONFIGS):
            kept = configs.for_target(lst, target)
            assert kept is configs.for_target(lst, target)  # one object: the autotuner cache is keyed by it
            assert kept[0] is lst[0] and all(target in configs.archs_of(c) for c in kept)
            assert len(kept) == sum(target in configs.archs_of(c) for c in lst)
    assert len(configs.for_target(configs.FORWARD_CONFIGS, "sm_80")) < len(configs.FORWARD_CONFIGS)
    assert len(configs.for_target(configs.FORWARD_CONFIGS_FP32, "sm_80")) < len(configs.FORWARD_CONFIGS_FP32)


@pytest.mark.parametrize("capability,target", [((8, 0), "sm_80"), ((9, 0), "sm_90")])
def test_a_cuda_launch_autotunes_over_its_targets_list(monkeypatch, capability, target):
    """The CUDA branch of the launcher (no GPU here: the device query and the autotuner are stubbed)."""
    import torch
    from nonlocal_ext.triton_kernels import configs, launchers
    tuned = []

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: tuned.append((grid, kwargs))

    monkeypatch.setattr(launchers, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(launchers, "_tuned", lambda kernel, lst, with_even=True: tuned.append(lst) or Launch())
    x = torch.zeros(2, 3)
    launchers._launch(launchers.aggregate.forward_kernel, configs.FORWARD_CONFIGS, lambda blk: (1, 1, 1), (x, x, 5),
                      {"KERNEL": 1}, (100, 30, 3, 300))
    assert tuned[0] is configs.for_target(configs.FORWARD_CONFIGS, target)
    assert tuned[1][1] == {"n_bucket": 128, "m_bucket": 32, "d_bucket": 16, "c_bucket": 512, "KERNEL": 1}
