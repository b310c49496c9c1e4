"""Saliency-pruned channel sub-models (saliency_vgg) and hierarchical self-distillation (hsd):
pruned forwards against a masked dense network, per-level BatchNorm against nn.BatchNorm2d,
nested re-ranking, Taylor saliency against true loss changes, the loss, the cost table, and a
real hsd cell that re-ranks, logs and resumes with its channels."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
from conftest import smoke_cfg
from torch import nn
from torch.nn import functional as F

from benchmark.config import cell_key, resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError
from benchmark.methods import METHODS, EpochContext, Stage, kd_loss
from benchmark.methods.hsd import kd_saliency
from benchmark.models import ARCHS, build_model
from benchmark.models.saliency_vgg import LevelBatchNorm2d
from benchmark.training import checkpoint
from benchmark.training.train import CellOptions, train_cell

TINY = {"depth": 11, "width_mult": 0.125}  # conv widths 8, 16, 32, 32, 64, 64, 64, 64


def _model(seed: int = 0, **arch):
    torch.manual_seed(seed)
    return build_model("saliency_vgg", ARCHS.get("saliency_vgg").resolve({**TINY, **arch}), 10, 32)


def _randomise_bn(model) -> None:
    with torch.no_grad():
        for layer in model.layers:
            bn = layer.bn
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)


def _scramble(model, seed: int = 1) -> None:
    """Re-rank every level with random scores, largest first (non-prefix channel sets)."""
    g = torch.Generator().manual_seed(seed)
    for k in range(model.num_submodels - 2, -1, -1):
        model.rerank(k, [torch.rand(len(c), generator=g) for c in model.candidates(k)])


def _kept(model, k: int) -> list[list[int]]:
    return [
        list(range(layer.counts[-1])) if layer.kept(k) is None else layer.kept(k).tolist()
        for layer in model.layers
    ]


def _assert_nested(model) -> None:
    for k in range(model.num_submodels - 1):
        assert all(set(a) <= set(b) for a, b in zip(_kept(model, k), _kept(model, k + 1))), k


def _masked_dense(model, x, k):
    """Level k as the full network whose dropped channels' outputs are zeroed (eval mode)."""
    feats = []
    for m in model.features:
        if isinstance(m, nn.MaxPool2d):
            feats.append(x)
            x = F.max_pool2d(x, 2)
            continue
        bn = m.bn
        y = F.conv2d(x, m.conv.weight, padding=1)
        y = F.batch_norm(
            y, bn.running_mean[k], bn.running_var[k], bn.weight[k], bn.bias[k], False, 0.0, 1e-5
        )
        mask = torch.zeros(y.shape[1])
        mask[_kept(model, k)[model.layers.index(m)]] = 1
        x = F.relu(y) * mask[:, None, None]
    return F.linear(x.mean((2, 3)), model.classifier.weight, model.classifier.bias), feats


# --- the pruned network -----------------------------------------------------------------------
def test_pruned_levels_equal_the_masked_dense_network():
    model = _model()
    _randomise_bn(model)
    _scramble(model)
    assert _kept(model, 1)[2] != list(range(16))  # really not the prefix
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for k in range(model.num_submodels):
            z, feats = model.forward_sub_features(x, k)
            want_z, want_feats = _masked_dense(model, x, k)
            torch.testing.assert_close(model.forward_sub(x, k), want_z, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(z, want_z, atol=1e-5, rtol=1e-4)
            assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
            for f, want, li in zip(feats, want_feats, [0, 1, 3, 5, 7]):  # last conv of each group
                torch.testing.assert_close(f, want[:, _kept(model, k)[li]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("idx", [[0, 3, 4], None])
def test_level_batchnorm_trains_like_nn_batchnorm_on_its_channels(idx):
    torch.manual_seed(0)
    bn = LevelBatchNorm2d(6, levels=3)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    before = {n: t.detach().clone() for n, t in [*bn.named_parameters(), *bn.named_buffers()]}
    bn.active, bn.idx = 1, None if idx is None else torch.tensor(idx)
    ch = list(range(6)) if idx is None else idx
    ref = nn.BatchNorm2d(len(ch))
    with torch.no_grad():
        ref.weight.copy_(bn.weight[1, ch])
        ref.bias.copy_(bn.bias[1, ch])
        ref.running_mean.copy_(bn.running_mean[1, ch])
        ref.running_var.copy_(bn.running_var[1, ch])
    x = torch.randn(5, len(ch), 4, 4) * 3 + 1
    bn.train(), ref.train()
    out, want = bn(x), ref(x)
    torch.testing.assert_close(out, want)
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    (want * torch.arange(want.numel()).view_as(want)).sum().backward()
    torch.testing.assert_close(bn.weight.grad[1, ch], ref.weight.grad)
    assert bn.weight.grad.abs().sum() == pytest.approx(ref.weight.grad.abs().sum().item())
    for name in ("running_mean", "running_var"):
        now = getattr(bn, name)
        torch.testing.assert_close(now[1, ch], getattr(ref, name))
        untouched = torch.ones_like(now, dtype=torch.bool)
        untouched[1, ch] = False
        assert torch.equal(now[untouched], before[name][untouched])  # other channels and levels
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))


def test_all_levels_forward_then_one_backward():
    """Summing every level's loss and back-propagating once (as a plain training loop does)
    works: one level's BatchNorm update never invalidates another level's saved tensors."""
    model = _model().train()
    x = torch.randn(4, 3, 32, 32)
    total = sum(F.cross_entropy(model.forward_sub(x, k), torch.arange(4)) for k in (3, 2, 1, 0))
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rerank_keeps_the_top_candidates_nested_and_survives_state_dict():
    model = _model()
    _randomise_bn(model)
    assert model.rerank(1, [torch.zeros(len(c)) for c in model.candidates(1)]) == 0.0  # ties
    g = torch.Generator().manual_seed(3)
    for k in (2, 1, 0):  # largest non-full level first
        cands = model.candidates(k)
        assert [c.tolist() for c in cands] == _kept(model, k + 1)
        scores = [torch.randn(len(c), generator=g) for c in cands]
        old = _kept(model, k)
        old_stats = [layer.bn.running_mean.clone() for layer in model.layers]
        frac = model.rerank(k, scores)
        new = _kept(model, k)
        added = 0
        for layer, c, s, o, n, stats in zip(model.layers, cands, scores, old, new, old_stats):
            top = s.argsort(descending=True)[: layer.counts[k]]
            assert n == sorted(c[top].tolist())
            fresh = sorted(set(n) - set(o))
            added += len(fresh)
            # a channel joining level k takes level k+1's running statistics for it
            assert torch.equal(layer.bn.running_mean[k, fresh], stats[k + 1, fresh])
        assert frac == pytest.approx(added / sum(len(n) for n in new))
        assert frac > 0
    _assert_nested(model)
    assert all(layer.kept(3) is None for layer in model.layers)  # the full level keeps all
    x = torch.randn(2, 3, 32, 32)
    other = _model(seed=5)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    for k in range(4):
        assert _kept(other, k) == _kept(model, k)
        assert torch.equal(other.forward_sub(x, k), model.forward_sub(x, k))


# --- saliency ---------------------------------------------------------------------------------
def test_taylor_saliency_estimates_the_true_kd_loss_change_and_touches_nothing():
    model = _model().double()
    torch.manual_seed(0)
    nn.init.normal_(model.classifier.weight, 0, 0.5)  # logits far from uniform: KD matters
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    k, n = 1, x.shape[0]
    model.train()
    params = {name: p.detach().clone() for name, p in model.state_dict().items()}
    sal = kd_saliency(model, k, [(x, None)], 1.0, contextlib.nullcontext)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(params[name], t) for name, t in model.state_dict().items())
    assert model.training
    with torch.no_grad():
        gates = model.gates(k)
        # the default gates give exactly level k's training-mode output
        torch.testing.assert_close(model.forward_gated(x, k), model.forward_sub(x, k))
        teacher = model.forward_gated(x, k + 1, own=True)

        def loss(g) -> float:
            return kd_loss(model.forward_gated(x, k, g), teacher, 1.0).item() * n

        base = loss(gates)
        est, true = [], []
        for layer in range(len(gates)):
            for c in (0, len(gates[layer]) - 1):  # one kept and one dropped candidate
                change = 0.0
                for i in range(n):  # flip channel c of sample i only
                    g = [v.double().expand(n, -1).clone() for v in gates]
                    g[layer][i, c] = 1 - g[layer][i, c]
                    change += abs(loss(g) - base)
                est.append(sal[layer][c].item())
                true.append(change / n)
    assert all(v[0] == 1 and v[-1] == 0 for v in gates)  # kept and dropped candidates tested
    est_t, true_t = torch.tensor(est), torch.tensor(true)
    assert torch.corrcoef(torch.stack([est_t, true_t]))[0, 1] > 0.9
    assert 0.5 < est_t.sum() / true_t.sum() < 2  # the same scale: per-sample, averaged


def test_epoch_end_reranks_on_schedule_without_gradients_or_mode_change():
    model = _model().train()
    method = METHODS.get("hsd")({"rerank_every": 2, "rerank_until": 0.5, "saliency_batches": 1})
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.zeros(8, dtype=torch.long))]
    reranked = []
    for epoch in range(8):
        ctx = EpochContext(
            model, Stage((0, 1, 2, 3)), epoch, 8, lambda e: iter(data), contextlib.nullcontext
        )
        metrics = method.epoch_end(ctx)
        _assert_nested(model)
        if metrics:
            reranked.append(epoch + 1)
            assert sorted(metrics) == [f"method/channels_changed/c{p}" for p in (0.25, 0.5, 0.75)]
    assert reranked == [2, 4]
    assert model.training and all(p.grad is None for p in model.parameters())
    assert _kept(model, 0) != _kept(_model(), 0)


# --- loss, costs, configuration ---------------------------------------------------------------
LOGITS = [[[1.0, -0.5, 0.3], [0.2, 0.1, -1.0]], [[1.5, -1.0, 0.0], [0.0, 0.4, -1.5]],
          [[2.0, -1.2, -0.4], [-0.3, 0.6, -2.0]]]  # fmt: skip
LABELS = [0, 1]


def _ref(k: int, T: float, a: float) -> float:
    """ipkd_ta's loss of sub-model k of 3 from the definitions, element by element."""

    def p(row, t):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    z = LOGITS
    ce = sum(-math.log(p(r, 1)[y]) for r, y in zip(z[k], LABELS)) / 2
    if k == 2:
        return ce
    kd = sum(
        sum(t * math.log(t / s) for s, t in zip(p(rs, T), p(rt, T)))
        for rs, rt in zip(z[k], z[k + 1])
    )
    return (1 - a) * ce + a * T * T * kd / 2


@pytest.mark.parametrize("T,a", [(1.0, 1.0), (4.0, 0.5), (2.0, 0.0)])
def test_hsd_loss_is_the_ipkd_ta_chain(T, a):
    hsd, ta = METHODS.get("hsd")({"T": T, "a": a}), METHODS.get("ipkd_ta")({"T": T, "a": a})
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    y = torch.tensor(LABELS)
    for k in (2, 1, 0):
        teachers = {j: z[j] for j in range(k + 1, 3)}
        got = hsd.loss(k, z[k], teachers, y, 3)[0].item()
        assert got == pytest.approx(_ref(k, T, a), rel=1e-10)
        assert got == ta.loss(k, z[k], teachers, y, 3)[0].item()
    assert METHODS.get("hsd").PARAMS["T"].default == 1.0
    assert METHODS.get("hsd").PARAMS["a"].default == 1.0


def test_cost_table_is_the_pruned_networks_macs_and_params():
    model = _model()
    _scramble(model)  # which channels does not change the cost
    widths = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
    costs = count_costs(model, 32)
    assert [c.name for c in costs] == ["c0.25", "c0.5", "c0.75", "c1.0"]
    for c, keep in zip(costs, [0.25, 0.5, 0.75, 1.0]):
        macs = params = 0
        c_in, hw = 3, 32
        for v in widths:
            if v == "M":
                hw //= 2
                continue
            c_out = max(1, math.floor(keep * v + 0.5))
            macs += c_in * c_out * 9 * hw * hw
            params += c_in * c_out * 9 + 2 * c_out
            c_in = c_out
        macs += c_in * 10
        params += (c_in + 1) * 10
        assert c.mmacs * 1e6 == pytest.approx(macs, rel=1e-9), c.name
        assert round(c.params_m * 1e6) == params, c.name
    paper = count_costs(_model(depth=16, width_mult=1.0), 32)
    assert paper[-1].mmacs == pytest.approx(313.2, abs=0.1)  # the usual CIFAR VGG16 figure
    for c, keep in zip(paper, [0.25, 0.5, 0.75, 1.0]):  # quadratic in the keep ratio
        assert c.mmacs / paper[-1].mmacs == pytest.approx(keep * keep, rel=0.03)


def test_hsd_needs_rerankable_channels_and_other_methods_run_on_saliency_vgg(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve("msdnet", "synthetic", "hsd", 0, "smoke")
    msg = (
        "method hsd needs saliency-ranked channels; architecture msdnet has none with these "
        "settings; use saliency_vgg"
    )
    assert msg in str(err.value)
    over = {f"arch.{k}": v for k, v in TINY.items()}
    # imta needs an MSDNet, byot exit features (tests/test_exits.py), sandwich, attentive,
    # bignas, ieb and mutualnet a width range, sdn, pl_distill, ztw, boosted and l2w exits of
    # one trunk (tests/test_sdn.py, tests/test_methods_exits.py), ofa_ps an elastic network
    # (tests/test_ofa.py)
    other_families = {"imta", "byot", "sandwich", "sdn", "pl_distill", "ztw", "boosted", "l2w",
                      "attentive", "bignas", "ieb", "mutualnet", "ofa_ps"}  # fmt: skip
    for name in sorted(set(METHODS.names()) - other_families):
        assert (
            resolve("saliency_vgg", "synthetic", name, 0, "smoke", over)["method"]["name"] == name
        )


@pytest.mark.parametrize(
    "bad,rule",
    [
        ({"keeps": [0.5, 0.25, 1.0]}, "strictly increasing"),
        ({"keeps": [0.25, 0.5]}, "end with 1.0"),
        ({"keeps": [0.0, 1.0]}, "in (0, 1]"),
        ({"depth": 12}, "depth must be one of 11, 13, 16, 19"),
        ({"width_mult": 0}, "width_mult must be a positive number"),
    ],
)
def test_bad_arch_values_are_rejected_with_the_rule(bad, rule):
    over = {f"arch.{k}": v for k, v in bad.items()}
    with pytest.raises(ConfigError, match=re.escape(rule)):
        resolve("saliency_vgg", "synthetic", "joint", 0, "smoke", over)


# --- a real cell --------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def test_hsd_cell_reranks_logs_and_resumes_with_its_channels(tracking_uri, client, tmp_path):
    over = {f"arch__{k}": v for k, v in TINY.items()}
    cfg = smoke_cfg("saliency_vgg", "hsd", tmp_path, method__saliency_batches=2, **over)
    assert cfg["train"]["epochs"] == 2 and cfg["method"]["rerank_until"] == 0.5

    def stop(epoch, _metrics):
        raise _Stop

    with pytest.raises(_Stop):  # dies after the first epoch (the only re-rank epoch)
        train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False, epoch_callback=stop))
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    saved = checkpoint.load(ckpt)
    assert saved["epoch"] == 1
    masks = {n: t for n, t in saved["model"].items() if ".kept" in n}
    prefix = _model().state_dict()
    assert any(not torch.equal(t, prefix[n]) for n, t in masks.items())  # channels changed

    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False, resume=True))
    assert result.key == cell_key(cfg)
    final = checkpoint.load(ckpt)["model"]
    assert all(torch.equal(final[n], t) for n, t in masks.items())  # resumed with its channels

    run = client.get_run(result.run_id)
    assert run.data.tags["flexbench.status"] == "finished"

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(result.run_id, key)]

    changed = {n: history(f"method/channels_changed/{n}") for n in ("c0.25", "c0.5", "c0.75")}
    assert all([step for step, _ in h] == [0] for h in changed.values())  # epoch 1 of 2 only
    assert all(0 <= v <= 1 for h in changed.values() for _, v in h)
    assert max(v for h in changed.values() for _, v in h) > 0
    for name in ["c0.25", "c0.5", "c0.75", "c1.0"]:
        for key in (f"test/top1/{name}", f"mmacs/{name}", f"latency_ms/{name}"):
            assert key in run.data.metrics
        assert [step for step, _ in history(f"val/top1/{name}")] == [0, 1]
