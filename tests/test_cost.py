"""``auto``'s CPU cost model (nonlocal_ext/backends/cost.py): its constants are the fit of the measured suite, and
``choose`` prices only the paths that may run a call."""

import os
import sys

import pytest

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
