"""A cell's plan, learning-rate schedule and optimizer groups, by value."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smoke_cfg

from benchmark.training.build import lr_at, make_method, make_model, new_optimizer, set_lr
from benchmark.training.plan import plan_cell

T = {"lr": 0.1, "epochs": 10, "warmup_epochs": 0, "schedule": "multistep",
     "milestones": [0.5, 0.75], "gamma": 0.1}  # fmt: skip


def test_multistep_lr_drops_at_each_milestone_fraction():
    assert [lr_at(T, e, 0, 100) for e in (0, 4, 5, 7, 8, 9)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert lr_at(T, 4, 99, 100) == pytest.approx(0.1)  # constant within an epoch


def test_warmup_then_cosine_to_zero():
    t = {**T, "schedule": "cosine", "warmup_epochs": 2}
    assert lr_at(t, 0, 0, 10) == pytest.approx(0.1 * 0.1 / 2)  # first step: lr/(warm x steps)
    assert lr_at(t, 1, 9, 10) == pytest.approx(0.1)  # last warm-up step reaches lr
    assert lr_at(t, 2, 0, 10) == pytest.approx(0.1)  # cosine starts at lr
    assert lr_at(t, 6, 0, 10) == pytest.approx(0.05)  # half way through the remaining 8 epochs
    mid = 0.5 * 0.1 * (1 + math.cos(math.pi * (7.5 - 2) / 8))
    assert lr_at(t, 7, 5, 10) == pytest.approx(mid)


def test_method_parameters_get_their_own_lr_scale_and_no_weight_decay(tmp_path):
    cfg = smoke_cfg("switchable_precision_resnet", "multi_teacher", tmp_path)
    model = make_model(cfg, 10, 32)
    method = make_method(cfg, model.num_submodels)
    opt = new_optimizer(model, method, {**cfg["train"], "weight_decay": 5e-4})
    weights, own = opt.param_groups
    assert weights["params"] == list(model.parameters()) and weights["weight_decay"] == 5e-4
    assert own["params"] == list(method.parameters()) and len(own["params"]) == 3
    assert own["weight_decay"] == 0.0 and own["lr_scale"] == method.param_lr_scale == 0.1
    set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.04])
    plain = new_optimizer(model, make_method(smoke_cfg("msdnet", "joint", tmp_path), 3), T | {
        "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "optimizer": "sgd",
        "weight_decay_on": "all"})  # fmt: skip
    assert len(plain.param_groups) == 1  # a method without parameters adds no group
    assert isinstance(plain, torch.optim.SGD)


def test_plan_of_a_staged_method_is_one_flat_schedule(tmp_path):
    """TAKD on 3 sub-models, 2 epochs per stage: 6 positions, the global index is the MLflow
    step, a resumed cell starts at any of them."""
    plan = plan_cell(smoke_cfg("msdnet", "takd", tmp_path, train__epochs=2))
    assert plan.names == ["exit1", "exit2", "exit3"] and plan.total_epochs == 6
    pos = plan.positions()
    assert [(p.index, p.stage, p.epoch) for p in pos] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1)
    ]  # fmt: skip
    assert [p.last_of_stage for p in pos] == [False, True] * 3
    assert [p.last for p in pos] == [False] * 5 + [True]
    assert [p.index for p in plan.positions(3)] == [3, 4, 5]
    assert [c.name for c in plan.costs] == plan.names and plan.costs[0].mflops < plan.costs[
        2
    ].mflops
