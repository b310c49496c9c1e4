"""Budgeted-batch evaluation of early-exit models: the reference protocol, val-only thresholds."""

from __future__ import annotations

import math

import torch

from benchmark.training.budgeted import (
    apply_thresholds,
    budgeted_curve,
    exit_proportions,
    fit_thresholds,
)


def reference_thresholds(conf: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The reference code's loop, written out per sample (MSDNet adaptive_inference)."""
    m, n = conf.shape
    _, sorted_idx = conf.sort(dim=1, descending=True, stable=True)
    filtered = torch.zeros(n)
    t = torch.full((m,), 1e8, dtype=conf.dtype)
    for k in range(m - 1):
        count, out_n = 0, math.floor(n * float(p[k]))
        for i in range(n):
            idx = sorted_idx[k][i]
            if filtered[idx] == 0:
                count += 1
                if count == out_n:
                    t[k] = conf[k][idx]
                    break
        filtered += (conf[k] >= t[k]).float()
    t[m - 1] = -1e8
    return t


def test_thresholds_match_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 200, generator=g, dtype=torch.float64)
    for p in (1, 7, 20, 39):
        props = exit_proportions(p / 20, 4)
        assert torch.equal(fit_thresholds(conf, props), reference_thresholds(conf, props))


def test_exit_proportions_are_geometric_and_normalised():
    props = exit_proportions(0.5, 3)
    assert torch.allclose(props, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))


def test_apply_exits_at_first_confident_exit_and_averages_cost():
    conf = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.0, 0.0, 0.0]])
    correct = torch.tensor([[True, False, False], [False, True, False], [True, True, True]])
    thresholds = torch.tensor([0.6, 0.7, -1e8])
    acc, cost = apply_thresholds(conf, correct, thresholds, [1.0, 2.0, 4.0])
    # sample 0 exits at 1 (correct), sample 1 at 2 (correct), sample 2 at 3 (correct)
    assert acc == 100.0
    assert math.isclose(cost, (1 + 2 + 4) / 3)


def test_thresholds_come_from_validation_only():
    g = torch.Generator().manual_seed(1)
    val = torch.rand(3, 100, generator=g)
    test_a = torch.rand(3, 80, generator=g)
    test_b = torch.rand(3, 80, generator=g)
    correct = torch.ones(3, 80, dtype=torch.bool)
    costs = [1.0, 2.0, 3.0]
    # The fit sees only val: the thresholds behind every point are those fitted on val, so the
    # curve on any test set equals applying those thresholds by hand.
    curve_a = budgeted_curve(val, test_a, correct, costs)
    curve_b = budgeted_curve(val, test_b, correct, costs)
    for curve, test in ((curve_a, test_a), (curve_b, test_b)):
        for point in curve:
            t = fit_thresholds(val, exit_proportions(point["q"], 3))
            assert point["mflops"] == apply_thresholds(test, correct, t, costs)[1]
    assert len(curve_a) == 39 and [p["q"] for p in curve_a][:2] == [0.05, 0.1]
    # more mass on later exits (larger q) never lowers the expected cost on the val set itself
    val_correct = torch.ones(3, 100, dtype=torch.bool)
    costs_val = [p["mflops"] for p in budgeted_curve(val, val, val_correct, costs)]
    assert costs_val == sorted(costs_val)
