"""The early-exit methods that combine exits: ztw (cascade + geometric ensembles fitted on val),
boosted (BoostNet) and l2w (meta-learned sample weights): hand-computed losses and ensembles,
the cascade hook of the model contract, L2W's meta step, ZTW's fitting stage reading only the
validation split, smoke cells, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smoke_cfg
from test_methods import LABELS, LOGITS, ref_ce, run_losses, softmax_row

from benchmark.config import cell_key
from benchmark.costs import speed
from benchmark.data import load_splits
from benchmark.data.base import Splits
from benchmark.data.pipeline import Normalizer
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.methods import METHODS, Stage
from benchmark.methods.l2w import exit_assignment, sample_losses, target_probs
from benchmark.methods.ztw import geometric_ensembles
from benchmark.models import ARCHS, build_model
from benchmark.training import checkpoint
from benchmark.training.build import make_method, make_model
from benchmark.training.evaluate import EvalSpec, evaluate
from benchmark.training.plan import CellPlan
from benchmark.training.train import CellOptions, train_cell

K = len(LOGITS)
TINY_MSDNET = {"n_blocks": 3, "base": 1, "step": 1, "n_channels": 4, "growth_rate": 2,
               "head_channels": 8}  # fmt: skip


def _z(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad) for v in LOGITS]


# --- boosted ---------------------------------------------------------------------------------
def ref_boosted(r: float) -> tuple[list[float], list[list[list[float]]]]:
    """Per-exit loss CE(z_s + F_{s-1}) and the predictions z_s + F_{s-1}, F_s = r (z_s +
    F_{s-1}), F_{-1} = 0, element by element."""
    running = [[0.0] * len(LOGITS[0][0]) for _ in LOGITS[0]]
    losses, preds = [], []
    for z in LOGITS:
        pred = [[a + b for a, b in zip(zr, fr)] for zr, fr in zip(z, running)]
        preds.append(pred)
        losses.append(ref_ce(pred, LABELS))
        running = [[r * (a + b) for a, b in zip(zr, fr)] for zr, fr in zip(z, running)]
    return losses, preds


@pytest.mark.parametrize("r", [0.5, 1.0, 0.0, 2.0])
def test_boosted_loss_and_predictions_match_hand_computed(r):
    want, preds = ref_boosted(r)
    got = run_losses("boosted", {"r": r}, LOGITS, LABELS)
    assert [got[k] for k in range(K)] == pytest.approx(want, rel=1e-10)
    outs = METHODS.get("boosted")({"r": r}).exit_outputs(_z())
    for out, pred in zip(outs, preds):
        assert torch.allclose(out, torch.tensor(pred, dtype=torch.float64), rtol=1e-12)


def test_boosted_exit_gives_no_gradient_to_earlier_exits():
    z = _z(requires_grad=True)
    teachers = dict(enumerate(z))  # deliberately NOT detached by the caller
    loss, _ = METHODS.get("boosted")({}).loss(2, z[2], teachers, torch.tensor(LABELS), K)
    loss.backward()
    assert z[0].grad is None and z[1].grad is None and z[2].grad.abs().sum() > 0


# --- ztw -----------------------------------------------------------------------------------
def test_ztw_trains_with_joint_loss_then_fits_one_epoch():
    got = run_losses("ztw", {}, LOGITS, LABELS)
    assert [got[k] for k in range(K)] == pytest.approx([ref_ce(z, LABELS) for z in LOGITS])
    assert METHODS.get("ztw")({}).stages(3) == [
        Stage((0, 1, 2)), Stage((), epochs=1, fit=True)
    ]  # fmt: skip
    assert METHODS.get("ztw")({"ensemble": "off"}).stages(3) == [Stage((0, 1, 2))]


def test_geometric_ensemble_matches_hand_computed():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(K, K, generator=g, dtype=torch.float64)
    b = torch.randn(K, 5, generator=g, dtype=torch.float64)
    got = geometric_ensembles(torch.tensor(LOGITS, dtype=torch.float64), w, b)
    w, b = w.tolist(), b.tolist()
    for k in range(K):
        for n in range(len(LABELS)):
            logp = [[math.log(p) for p in softmax_row(LOGITS[j][n])] for j in range(k + 1)]
            want = [
                sum(math.exp(w[k][j]) * logp[j][c] for j in range(k + 1)) / (k + 1) + b[k][c]
                for c in range(5)
            ]
            assert got[k, n].tolist() == pytest.approx(want, rel=1e-12), (k, n)


def test_ztw_fit_lowers_the_ensembles_ce_and_lives_in_the_method_state():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (256,), generator=g)
    logits = torch.randn(3, 256, 10, generator=g) + 0.5 * torch.nn.functional.one_hot(labels, 10)
    method = METHODS.get("ztw")({"fit_epochs": 50, "fit_lr": 0.05, "fit_batch": 64})
    before = [torch.nn.functional.cross_entropy(z, labels).item() for z in logits]
    metrics = method.fit(logits, labels, seed=0)
    after = [metrics[f"ensemble_ce/{k}"] for k in range(3)]
    assert all(a < b for a, b in zip(after, before)) and metrics["loss"] == pytest.approx(
        sum(after)
    )
    assert after[2] < after[0]  # three exits together beat the first alone
    outs = method.exit_outputs(list(logits))
    assert torch.allclose(outs[1], geometric_ensembles(logits, *method.fitted)[1])
    fresh = METHODS.get("ztw")({"fit_epochs": 50, "fit_lr": 0.05, "fit_batch": 64})
    assert torch.equal(fresh.exit_outputs(list(logits))[0], logits[0])  # unfitted: raw logits
    fresh.load_state_dict(method.state_dict())  # the checkpoint's route
    assert all(torch.equal(a, b) for a, b in zip(fresh.exit_outputs(list(logits)), outs))


def test_cascade_feeds_the_previous_exits_detached_logits():
    arch = ARCHS.get("msdnet")
    torch.manual_seed(0)
    plain = build_model("msdnet", arch.resolve(TINY_MSDNET), 10, 32)
    torch.manual_seed(0)
    model = build_model("msdnet", arch.resolve({**TINY_MSDNET, "cascade": True}), 10, 32)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == (K - 1) * (10 * 10 + 2 * 10)  # LayerNorm(C) + Linear(C, C) per later exit
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    raw = model._run(x, K - 1, set(range(K)))
    z = model.forward_all(x)
    for k in range(1, K):
        link = model.cascade.links[k - 1]
        assert torch.allclose(z[k], raw[k] + link(z[k - 1]), atol=1e-6)
        assert torch.allclose(model.forward_sub(x, k), z[k], atol=1e-6)
    model.train()
    model.forward_all(x)[1].sum().backward()  # exit 2 alone: exit 1's head only feeds it
    assert all(p.grad is None for p in model.heads[0].parameters())  # through a detach


def test_ztw_fits_on_the_validation_split_only_and_test_reads_the_ensembles(
    tracking_uri, client, tmp_path, monkeypatch
):
    cfg = smoke_cfg("msdnet", "ztw", tmp_path / "runs", **{"method.fit_epochs": 20})
    ztw, reads, fitted = METHODS.get("ztw"), [], []
    real_test, real_fit = Splits.test, ztw.fit

    def spy_test(self):
        reads.append(len(fitted))
        return real_test(self)

    def spy_fit(self, logits, labels, seed):
        fitted.append((logits.shape, labels.clone(), len(reads)))
        return real_fit(self, logits, labels, seed)

    monkeypatch.setattr(Splits, "test", spy_test)
    monkeypatch.setattr(ztw, "fit", spy_fit)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    splits = load_splits("synthetic", cfg["data"])
    ((shape, labels, test_reads_then),) = fitted  # one fitting epoch
    assert test_reads_then == 0 and reads == [1]  # test read once, after the fit
    assert shape == (K, len(splits.val), 10) and torch.equal(labels, splits.val.labels)
    # the checkpointed ensemble is what the test numbers measure
    state = checkpoint.load(checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt")
    model = make_model(cfg, 10, 32)
    model.load_state_dict(state["model"])
    method = make_method(cfg, K)
    method.load_state_dict(state["method"])
    assert method.fitted is not None
    norm = Normalizer(splits.mean, splits.std, torch.device("cpu"))
    spec = EvalSpec(128, norm, speed.choose(cfg, torch.device("cpu")), outputs=method.exit_outputs)
    acc = evaluate(model, splits.test(), spec)
    run = client.get_run(result.run_id)
    assert [run.data.metrics[f"test/top1/exit{k + 1}"] for k in range(K)] == acc.top1


def test_a_fitting_stage_has_its_own_length_in_the_plan():
    plan = CellPlan(["a", "b"], [Stage((0, 1)), Stage((), epochs=1, fit=True)], 3, [], True, 32)
    assert plan.total_epochs == 4
    assert [(p.stage, p.epoch, p.last_of_stage, p.last) for p in plan.positions()] == [
        (0, 0, False, False), (0, 1, False, False), (0, 2, True, False), (1, 0, True, True),
    ]  # fmt: skip
    assert plan.index_of(1, 0) == 3 and plan.stage_epoch(3) == (1, 0)
    assert plan.stage_epoch(4) == (2, 0)  # past the end: where a finished checkpoint points


# --- l2w -----------------------------------------------------------------------------------
def test_l2w_loss_matches_hand_computed():
    eps = 0.8
    got = run_losses("l2w", {"eps": eps, "hidden": 16}, LOGITS, LABELS)
    torch.manual_seed(0)  # run_losses' seed: the same meta-network
    method = METHODS.get("l2w")({"eps": eps, "hidden": 16})
    method.bind(K)
    ce = [[-math.log(softmax_row(row)[t]) for row, t in zip(LOGITS[k], LABELS)] for k in range(K)]
    with torch.no_grad():
        m = method.net(torch.tensor(ce, dtype=torch.float32).T).tolist()  # (N, K)
    for k in range(K):
        w = [1 + eps * (row[k] - sum(row) / K) for row in m]
        want = sum(wn * c for wn, c in zip(w, ce[k])) / len(LABELS)
        assert got[k] == pytest.approx(want, rel=1e-5), k


def test_l2w_target_distribution_and_assignment_follow_the_reference():
    total = 0.75 + 0.5625 + 0.421875  # 0.75^k, k = 1..3
    assert target_probs(3, 0.75) == pytest.approx([0.75 / total, 0.5625 / total, 0.421875 / total])
    conf = [torch.tensor([[3.0, 0], [0, 0], [1, 0], [2, 0]]), torch.tensor([[0.0, 0]] * 4),
            torch.tensor([[5.0, 0], [0, 0], [0, 0], [0, 0]])]  # fmt: skip
    picks = exit_assignment(conf, [0.5, 0.25, 0.25])
    assert picks[0].tolist() == [0, 3]  # the 2 most confident
    assert len(picks[1]) == 1 and set(picks[1].tolist()) <= {1, 2}  # one of those left
    assert sorted(picks[0].tolist() + picks[1].tolist() + picks[2].tolist()) == [0, 1, 2, 3]


def _l2w_setup(meta_lr: float):
    torch.manual_seed(0)
    model = build_model("msdnet", ARCHS.get("msdnet").resolve(TINY_MSDNET), 10, 32).train()
    method = METHODS.get("l2w")({"hidden": 32, "meta_lr": meta_lr})
    method.bind(K)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, method, *x.chunk(2), *y.chunk(2)


def test_l2w_meta_step_moves_the_sample_weights_against_the_held_out_loss():
    """The weights after one meta step differ from the weights before in the direction that
    lowers the look-ahead network's loss on the held-out half: dw . dL_meta/dw < 0, and the
    held-out loss of the look-ahead drops."""
    model, method, x1, x2, y1, y2 = _l2w_setup(meta_lr=1e-3)
    lr = 0.5
    losses = sample_losses(model.forward_all(x1), y1).detach()
    w0 = method.weights(losses).detach().requires_grad_()
    held_out = method.meta_loss(model, x1, y1, x2, y2, lr, weights=w0)
    (toward,) = torch.autograd.grad(held_out, w0)
    bn = [b.clone() for b in model.buffers()]
    method.meta_step(model, x1, y1, x2, y2, lr)
    w1 = method.weights(losses).detach()
    assert ((w1 - w0.detach()) * toward).sum() < 0
    assert method.meta_loss(model, x1, y1, x2, y2, lr).item() < held_out.item()
    assert all(torch.equal(a, b) for a, b in zip(bn, model.buffers()))  # BN stats untouched
    assert all(p.grad is None for p in model.parameters())  # the network is not updated


def test_l2w_step_trains_half_the_batch_and_checkpoints_the_meta_optimizer():
    model, method, x1, x2, y1, y2 = _l2w_setup(meta_lr=1e-4)
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
    total, terms, logits = method.train_step(model, x, y, 0.1)
    assert all(len(z) == len(y1) for z in logits.values()) and torch.isfinite(total)
    assert all(p.grad is None for p in method.parameters())  # kept from the trainer's SGD
    assert all(p.grad is not None for p in model.heads[0].parameters())
    state = method.state_dict()
    assert state["_extra_state"]["meta_opt"]["state"]  # Adam moments after one meta step
    fresh = METHODS.get("l2w")({"hidden": 32})
    fresh.bind(K)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), method.parameters()))
    assert str(fresh.meta_opt.state_dict()) == str(method.meta_opt.state_dict())


# --- smoke cells and bad input ---------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,name",
    [("msdnet", "boosted"), ("byot_resnet", "boosted"), ("msdnet", "l2w"),
     ("byot_resnet", "l2w"), ("byot_resnet", "ztw")],
)  # fmt: skip
def test_smoke_cell(arch, name, tracking_uri, tmp_path):
    cfg = smoke_cfg(arch, name, tmp_path / "runs", **{"train.epochs": 1})
    if name == "ztw":
        cfg = smoke_cfg(
            arch, name, tmp_path / "runs", **{"train.epochs": 1, "method.fit_epochs": 5}
        )
        assert cfg["arch"]["cascade"] is True
    if (arch, name) == ("msdnet", "boosted"):
        assert cfg["arch"]["ge"] is True  # the reference's msdnet_ge
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    top1 = [v for k, v in result.metrics.items() if k.startswith("test/top1/exit")]
    assert len(top1) == (4 if arch == "byot_resnet" else K)
    assert all(0 <= v <= 100 for v in top1)


@pytest.mark.parametrize(
    "name,sets,match",
    [
        ("ztw", {}, "method ztw needs cascade connections"),
        ("boosted", {}, "method boosted needs early exits"),
        ("l2w", {}, "method l2w needs early exits"),
    ],
)
def test_methods_refuse_models_without_exits(name, sets, match, tmp_path):
    with pytest.raises(IncompatibleError, match=match):
        smoke_cfg("slimmable_mobilenet_v1", name, tmp_path, **sets)


@pytest.mark.parametrize(
    "arch,name,sets,match",
    [
        ("slimmable_mobilenet_v1", "joint", {"arch.cascade": True}, "unknown parameter.*cascade"),
        ("msdnet", "ztw", {"arch.isc": True}, "isc and cascade both feed.*got isc=true"),
        ("byot_resnet", "joint", {"arch.cascade": 1}, "cascade must be true or false, got 1"),
        ("msdnet", "ztw", {"method.fit_epochs": 0}, "fit_epochs must be an integer >= 1"),
        ("msdnet", "ztw", {"method.ensemble": "off", "method.fit_lr": 0.1},
         "fit_lr has an effect only with ensemble=on"),
        ("msdnet", "ztw", {"method.ensemble": "yes"}, "ensemble must be one of on, off, got 'yes'"),
        ("msdnet", "boosted", {"method.r": -1}, r"r \(the ensemble reweight\) must be >= 0"),
        ("msdnet", "l2w", {"method.eps": -0.5}, "eps must be >= 0, got -0.5"),
        ("msdnet", "l2w", {"method.hidden": 1.5}, "hidden must be an integer >= 1"),
        ("msdnet", "l2w", {"runtime.compile": True}, "runtime.compile must be false, got True"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(arch, name, sets, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        smoke_cfg(arch, name, tmp_path, **sets)


def test_l2w_on_several_devices_is_refused_before_any_process(tmp_path):
    """L2W's look-ahead step cannot run under DDP: `--nproc-per-node 2` (or a grid's
    devices_per_cell) is one ConfigError before torchrun starts."""
    from benchmark.training.distributed import check_world

    cfg = smoke_cfg("msdnet", "l2w", tmp_path)
    with pytest.raises(
        ConfigError, match=r"method l2w runs its own training step.*got world size 2"
    ):
        check_world(cfg, 2)
    assert check_world(cfg, 1) == 1
