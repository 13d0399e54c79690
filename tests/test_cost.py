"""``auto``'s CPU cost model (nonlocal_ext/backends/cost.py): its constants are the fit of the measured suite, and
``choose`` prices only the paths that may run a call."""

import json
import os
import sys

import pytest
import torch

from nonlocal_ext.backends import cost

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import calibrate  # noqa: E402


@pytest.fixture
def restore_cost():
    saved = {name: getattr(cost, name) for name in calibrate.BLOCK}
    yield
    for name, value in saved.items():
        setattr(cost, name, value)


def test_constants_are_the_fit_of_the_measured_suite(restore_cost):
    """bench/calibrate.py fitted to bench/results/{cpu,blocks}.json gives exactly cost.py's fitted block (rerun
    ``bench/calibrate.py --write`` after a new ``make bench``)."""
    committed = calibrate.current_block()
    assert calibrate.block() == committed  # the block is what the module holds
    calibrate.fit(calibrate.load(), cost.FITTED_ON)
    assert calibrate.block() == committed


def test_fit_recovers_constants_from_times_they_predict(restore_cost):
    """Rows whose times are the model's own predictions: the fit, started elsewhere, predicts them again."""
    rows = calibrate.load()
    for row in rows:
        work = calibrate.predicted(row)
        row["work"] = work if work is not None else row["work"]
    priced = [r for r in rows if calibrate.predicted(r) is not None]
    cost.CHUNKED_SPEED, cost.FUSED_FORWARD_SPEED, cost.LINEAR_SPEED = (cost.CHUNKED_SPEED * 2, cost.FUSED_FORWARD_SPEED / 2,
                                                                         cost.LINEAR_SPEED * 3)
    errors = calibrate.fit(priced, cost.FITTED_ON)
    assert max(errors.values()) < 0.03, errors


def test_each_path_is_priced_only_where_it_can_run():
    block = dict(batch=2, n=784, m=196, d=256, c=256, kernel="gaussian", normalize="row", symmetric=False,
                 backward=True, half=None)
    assert set(cost.prices(**block, fused=True)) == {"reference", "cpu", "chunked"}
    assert set(cost.prices(**block, fused=False)) == {"reference", "chunked"}
    assert set(cost.prices(**{**block, "kernel": "dot"}, fused=True)) == {"reference", "cpu", "chunked", "linear"}
    large = {**block, "n": 8192, "m": 8192}  # 8 · 2 · 8192² · 4 bytes of temporaries: over the 1 GiB budget
    assert "reference" not in cost.prices(**large, fused=True)
    at_budget = {**block, "n": 4096, "m": 4096}  # 1 GiB of temporaries in float32, 2 GiB in float64
    assert "reference" in cost.prices(**at_budget, fused=True)
    assert "reference" not in cost.prices(**at_budget, fused=True, item_bytes=8)


def test_choose_takes_the_cheapest_price():
    for shape in ((16, 196, 49, 512, 512), (1, 4096, 4096, 64, 128), (2, 3400, 850, 512, 512)):
        for kernel in ("gaussian", "dot", "fractional"):
            for backward in (False, True):
                args = shape + (kernel, "row", False, backward, None, True)
                prices = cost.prices(*args)
                assert cost.choose(*args) == min(prices, key=prices.get)


def test_pricier_with_more_work():
    """Each path's price grows with the pairs, the features and a backward."""
    for half in (None, "amx", "avx512"):
        for path in ("reference", "cpu", "chunked"):
            def price(b=2, n=784, m=196, d=256, backward=False):
                return cost.prices(b, n, m, d, d, "gaussian", "row", False, backward, half, True,
                                   half_ratio=2.0 if half else None)[path]
            assert price() < price(b=4) and price() < price(d=512) and price() < price(backward=True)


def test_the_fused_price_per_pair_divides_by_the_probed_speed_and_moves_picks():
    """``fused_scale`` (this CPU's fused speed against the fitted machine's) divides the fused work per pair, not
    its fixed cost per call, and turns a dense pick into a fused one where the fused kernels run faster."""
    args = (8, 784, 784, 256, 256, "gaussian", "row", False, True, None, True)
    per_pair = [cost.prices(*args, fused_scale=s)["cpu"] - cost.FUSED_CALL[True] for s in (1.0, 2.0)]
    assert per_pair[0] == pytest.approx(2 * per_pair[1], rel=1e-12)
    assert cost.prices(*args)["reference"] == cost.prices(*args, fused_scale=2.0)["reference"]
    assert cost.choose(*args, fused_scale=1.0) == "reference" and cost.choose(*args, fused_scale=2.0) == "cpu"
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="fused_scale"):
            cost.prices(*args, fused_scale=bad)


def test_fused_speed_scale_is_the_probe_over_the_fitted_one_measured_once(monkeypatch):
    """The probe times float32 ``torch.mm`` and the fused ``cpu`` call of cost.PROBE_SHAPE (median of 5) outside
    autocast and autograd, in two interleaved rounds whose better readings it takes, once per process."""
    calls = []
    medians, rates = iter([0.030, 0.025]), iter([80.0, 100.0])  # the second round reads better on both

    def time_step(step, device, repeat, warmup):
        calls.append(("fused", device, repeat, warmup, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        out = step()
        assert out.shape == (1, cost.PROBE_SHAPE[0], cost.PROBE_SHAPE[2])
        median = next(medians)
        return [median + 0.01, median - 0.01, median, median + 0.03, median - 0.02]

    def gemm_gflops(device, dtype, size):
        calls.append(("gemm", device, dtype, size))
        return next(rates)

    monkeypatch.setattr("nonlocal_ext.benchmark.measure.time_step", time_step)
    monkeypatch.setattr("nonlocal_ext.benchmark.measure.gemm_gflops", gemm_gflops)
    cost.MEASURED.clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.enable_grad():
            expected = cost.probe_of(0.025, 100.0) / cost.FUSED_PROBE
            assert cost.fused_speed_scale() == pytest.approx(expected, rel=1e-12)
            assert cost.fused_speed_scale() == pytest.approx(expected, rel=1e-12)
    finally:
        cost.MEASURED.clear()
    assert calls == [("gemm", "cpu", torch.float32, cost.PROBE_GEMM_SIZE), ("fused", "cpu", 5, 2, False, False)] * 2
    n, d, c = cost.PROBE_SHAPE
    assert cost.probe_of(0.030, 100.0) == pytest.approx(2 * n * n * (d + c) / 0.030 / 1e9 / 100.0)


def test_auto_prices_the_fused_path_with_the_probe_only_where_it_can_run(monkeypatch):
    from nonlocal_ext import backends
    from nonlocal_ext.spec import validate

    seen = []
    monkeypatch.setattr(cost, "choose", lambda *args, **kwargs: seen.append((args[10], kwargs["fused_scale"])) or "chunked")
    monkeypatch.setattr(cost, "fused_speed_scale", lambda: 1.7)
    q = torch.empty(2, 40, 8)
    spec = validate(q, q, q, "gaussian", normalize="row", update="aggregate", symmetric=False, self_value=None,
                    backend="auto", scale=1.0, power=None, gamma=None, eps=None)
    assert backends.select("auto", spec, q, q, q) is backends.chunked
    monkeypatch.setattr(backends.cpu, "unsupported_reason", lambda spec, query: "not built")
    monkeypatch.setattr(cost, "fused_speed_scale", lambda: pytest.fail("probed without the fused kernels"))
    assert backends.select("auto", spec, q, q, q) is backends.chunked
    assert seen == [(True, 1.7), (False, 1.0)]


def test_the_fitted_run_carries_its_probe_and_prices_at_scale_one():
    """calibrate reads the probe case from the sweep (cpu.json) against the run's best float32 GEMM rate (of
    cpu.json and blocks.json) and gives it to every row of the run; the fit takes it as FUSED_PROBE, so the fitted
    run is priced at fused_scale 1."""
    runs = []
    for path in calibrate.RESULTS:
        with open(path) as f:
            runs.append(json.load(f))
    sweep, block_suite, run = (calibrate.measured_on(rows) for rows in (runs[0], runs[1], runs[0] + runs[1]))
    assert block_suite["probe"] is None and sweep["probe"] is not None
    assert run["rates"]["float32"] == max(sweep["rates"]["float32"], block_suite["rates"]["float32"])
    assert run["probe"] == pytest.approx(sweep["probe"] * sweep["rates"]["float32"] / run["rates"]["float32"])
    assert run["probe"] == pytest.approx(cost.FUSED_PROBE, rel=1e-3)
    rows = calibrate.load()
    assert {row["probe"] for row in rows} == {run["probe"]}
    assert calibrate.scale_of(rows[0]) == pytest.approx(1.0, rel=1e-3)
    assert calibrate.scale_of({**rows[0], "probe": None}) == 1.0


def test_nothing_is_timed_while_torch_compile_traces(monkeypatch):
    """A first ``auto`` call inside ``torch.compile`` prices as on the fitted machine (1.0) and measures nothing
    (timing cannot be traced; tests/test_cpu.py compiles such a call with fullgraph=True); eager calls measure."""
    monkeypatch.setattr("nonlocal_ext.benchmark.measure.gemm_gflops", lambda device, dtype, size: 100.0)
    monkeypatch.setattr("nonlocal_ext.benchmark.measure.time_step", lambda step, device, repeat, warmup: [0.01] * 5)
    saved = dict(cost.MEASURED)
    cost.MEASURED.clear()
    try:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert cost.fused_speed_scale() == 1.0 and cost.half_gemm_ratio(torch.bfloat16) == 1.0
        assert cost.MEASURED == {}
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        assert cost.fused_speed_scale() == pytest.approx(cost.probe_of(0.01, 100.0) / cost.FUSED_PROBE)
        assert set(cost.MEASURED) == {"fused"}
    finally:
        cost.MEASURED.clear()
        cost.MEASURED.update(saved)
