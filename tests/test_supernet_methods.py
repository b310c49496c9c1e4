"""attentive, bignas and ieb on a universally slimmable network: attentive's choice among the
candidates at the drawn cost (on the real step's losses), ieb's EMA teacher (its update, no
gradient, its state across a kill and resume), a smoke cell of each, and the inputs refused
before any work. Their losses by hand: tests/test_methods.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smoke_cfg
from torch.nn import functional as F

from benchmark.config import resolve
from benchmark.errors import CellPruned, ConfigError, IncompatibleError
from benchmark.grid.spec import load_grid
from benchmark.methods import METHODS
from benchmark.models import ARCHS, build_model
from benchmark.training import checkpoint
from benchmark.training.build import new_optimizer
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, train_cell

NEW = ("attentive", "bignas", "ieb")
WIDTH_ARCHS = {"us_mobilenet_v1", "flex_vit"}


def tiny_us() -> torch.nn.Module:
    torch.manual_seed(0)
    p = ARCHS.get("us_mobilenet_v1").resolve({"width_mult": 0.5, "stage_blocks": [1, 1, 1, 1, 1]})
    return build_model("us_mobilenet_v1", p, 10, 32).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)


# --- attentive: the candidate of lowest / highest loss at the drawn cost ----------------------
@pytest.mark.parametrize("rule", ["bestup", "worstup"])
def test_attentive_trains_the_lowest_or_highest_loss_candidate_at_the_drawn_cost(rule, monkeypatch):
    model = tiny_us()
    method = METHODS.get("attentive")({"rule": rule, "bins": 4, "candidates": 3})
    x, y = _batch()
    scored: list[tuple[list[float], list[float]]] = []
    real = Step._width_losses

    def spy(self, x_, y_, widths, criterion):
        before = [b.clone() for b in model.buffers()]
        out = real(self, x_, y_, widths, criterion)
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # BN kept
        scored.append((list(widths), out.tolist()))
        return out

    monkeypatch.setattr(Step, "_width_losses", spy)
    drawn: list[list[float]] = []
    real_draw = METHODS.get("attentive").draw_submodels
    monkeypatch.setattr(
        METHODS.get("attentive"),
        "draw_submodels",
        lambda self, g, m, b=None: drawn.append(real_draw(self, g, m, b)) or drawn[-1],
    )
    (stage,) = method.stages(model.num_submodels)
    Step(model, method, stage)(x, y, step_generator(0, 3, 1))

    # the losses scored are the real ones: smoothed CE of each candidate, batch statistics
    assert len(scored) == 2 and all(len(c) == 3 for c, _ in scored)
    with torch.no_grad():
        for cands, losses in scored:
            want = [F.cross_entropy(model.forward_width(x, w), y, label_smoothing=0.1).item()
                    for w in cands]  # fmt: skip
            assert losses == pytest.approx(want, rel=1e-5)
            assert len(set(np.round(losses, 6))) == 3  # distinct: the choice is a real one
    pick = np.argmin if rule == "bestup" else np.argmax
    chosen = sorted(c[int(pick(losses))] for c, losses in scored)
    assert drawn[0] == [0.25, *chosen, 1.0]

    # every candidate lies in the cost bin of the target drawn from the prior (replayed)
    w, c = method.cost_curve(model, 32)
    g = step_generator(0, 3, 1)
    for cands, _ in scored:
        u = 0.25 + 0.75 * torch.rand((), generator=g, dtype=torch.float64).item()
        torch.rand(3, generator=g, dtype=torch.float64)
        span = c[-1] - c[0]
        target = min(int((np.interp(u, w, c) - c[0]) / span * 4), 3)
        bins = [min(int((np.interp(v, w, c) - c[0]) / span * 4 + 1e-9), 3) for v in cands]
        assert bins == [target] * 3


def test_attentive_draws_are_reproduced_from_the_step_generator():
    model, x, y = tiny_us(), *_batch()
    method = METHODS.get("attentive")({"bins": 4})
    (stage,) = method.stages(4)
    step = Step(model, method, stage)
    seen = []
    for _ in range(2):
        batch_widths = method.draw_submodels(
            step_generator(1, 0, 2), model, _step_batch(step, x, y)
        )
        seen.append(batch_widths)
    assert seen[0] == seen[1]
    other = method.draw_submodels(step_generator(1, 0, 3), model, _step_batch(step, x, y))
    assert other != seen[0]


def _step_batch(step: Step, x: torch.Tensor, y: torch.Tensor):
    from functools import partial

    from benchmark.methods.base import StepBatch

    return StepBatch(x, y, step.speed.autocast, partial(step._width_losses, x, y))


@pytest.mark.parametrize(
    "sets,match",
    [
        ({"method.candidates": 0}, r"method attentive: candidates must be an integer >= 1, got 0"),
        ({"method.rule": "best"}, r"rule must be one of bestup, worstup, got 'best'"),
    ],
)
def test_attentive_bad_input_is_refused_at_resolve_time(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve("us_mobilenet_v1", "synthetic", "attentive", 0, "smoke", sets)


# --- ieb: the EMA teacher --------------------------------------------------------------------
def test_ieb_ema_is_updated_as_the_reference_and_never_receives_gradients():
    """Before the first step the EMA is the initial network; after each optimizer step
    e = decay e + (1 - decay) theta for every float entry (integer ones copied); its
    parameters never get a gradient and are not the optimizer's."""
    model, (x, y) = tiny_us(), _batch()
    method = METHODS.get("ieb")({"decay": 0.9})
    (stage,) = method.stages(4)
    step = Step(model, method, stage)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ema_before = init
    for i in range(2):
        step(x, y, step_generator(0, 0, i))
        ema = method.ema
        assert all(p.grad is None and not p.requires_grad for p in ema.parameters())
        assert all(torch.equal(v, ema_before[k]) for k, v in ema.state_dict().items())
        opt.step()
        method.after_optimizer_step(model)
        opt.zero_grad(set_to_none=True)
        theta = model.state_dict()
        for k, e in ema.state_dict().items():
            if e.dtype.is_floating_point:
                want = 0.9 * ema_before[k] + 0.1 * theta[k]
                assert torch.allclose(e, want, rtol=0, atol=1e-6), k
            else:
                assert torch.equal(e, theta[k]), k
        ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    assert not torch.equal(ema_before["classifier.weight"], init["classifier.weight"])
    train = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
             "weight_decay": 0.0, "weight_decay_on": "all"}  # fmt: skip
    optimised = {
        id(p) for g in new_optimizer(model, method, train).param_groups for p in g["params"]
    }
    assert optimised == {id(p) for p in model.parameters()}


def test_ieb_teaches_the_students_from_the_ema_not_from_the_model():
    """The students' KD targets are the EMA's logits at the drawn widths (batch statistics):
    after the model moves away from its EMA, the step's targets are the EMA's."""
    model, (x, y) = tiny_us(), _batch()
    method = METHODS.get("ieb")({})
    (stage,) = method.stages(4)
    step = Step(model, method, stage)
    step(x, y, step_generator(0, 0, 0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    widths = METHODS.get("sandwich").draw_submodels(method, step_generator(0, 0, 1), model)
    step(x, y, step_generator(0, 0, 1))
    ema = method.ema.train()
    with torch.no_grad():
        for i in (1, 2, 3):
            want = ema.forward_width(x, widths[i])
            assert torch.allclose(method.guides[i], want, atol=1e-5)
            assert not torch.allclose(
                method.guides[i], model.forward_width(x, widths[i]), atol=1e-3
            )


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_ieb_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ConfigError, match=rf"method ieb: decay must be in \(0, 1\), got {decay}"):
        resolve("us_mobilenet_v1", "synthetic", "ieb", 0, "smoke", {"method.decay": decay})


def test_ieb_ema_survives_a_kill_and_resume_exactly(tracking_uri, tmp_path):
    def stop_after_first(epoch, _metrics):
        if epoch == 0:
            raise CellPruned("killed")

    full = smoke_cfg("us_mobilenet_v1", "ieb", tmp_path / "full", train__epochs=3)
    train_cell(full, CellOptions(tracking_uri, experiment="full", progress=False))
    cut = smoke_cfg("us_mobilenet_v1", "ieb", tmp_path / "cut", train__epochs=3)
    with pytest.raises(CellPruned):
        train_cell(cut, CellOptions(tracking_uri, epoch_callback=stop_after_first, progress=False))
    train_cell(cut, CellOptions(tracking_uri, resume=True, progress=False))
    a, b = (
        checkpoint.load(next(p.rglob("checkpoint.pt")))
        for p in (tmp_path / "full", tmp_path / "cut")
    )
    ema_a, ema_b = a["method"]["_extra_state"]["ema"], b["method"]["_extra_state"]["ema"]
    assert ema_a.keys() == a["model"].keys()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(ema_a[k], a["model"][k]) for k in ema_a)


# --- every new method: a smoke cell, refused on fixed-width models ---------------------------
@pytest.mark.parametrize("name", NEW)
def test_a_smoke_cell_trains_on_the_us_network(name, tracking_uri, tmp_path):
    result = train_cell(
        smoke_cfg("us_mobilenet_v1", name, tmp_path), CellOptions(tracking_uri, progress=False)
    )
    fixed = [r for r in result.rows if str(r["spectrum"]).lower() != "true"]
    assert [r["name"] for r in fixed] == ["w0.25", "w0.5", "w0.75", "w1.0"]
    assert all(0 <= r["top1"] <= 100 for r in fixed)


@pytest.mark.parametrize("arch", sorted(set(ARCHS.names()) - WIDTH_ARCHS))
@pytest.mark.parametrize("name", NEW)
def test_fixed_width_architectures_are_refused_with_the_reason(arch, name):
    with pytest.raises(IncompatibleError, match=rf"method {name} needs a network that runs any "
                       r"width of a range \(forward_width\); architecture"):  # fmt: skip
        resolve(arch, "synthetic", name, 0, "smoke")


def test_grids_with_all_methods_leave_the_fixed_width_pairs_out():
    from pathlib import Path

    spec = load_grid(Path(__file__).parents[1] / "benchmark" / "configs" / "smoke.yaml")
    pairs = {(c.axis("arch"), c.axis("method")) for c in spec.cells}
    for name in NEW:
        assert {a for a, m in pairs if m == name} == {a for a, _ in pairs} & WIDTH_ARCHS
    left = {(a, m) for a, m, _ in spec.incompatible}
    assert {(a, m) for a in {a for a, _ in pairs} - WIDTH_ARCHS for m in NEW} <= left
