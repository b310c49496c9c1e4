"""Depth-dynamic ResNet (ddnn_resnet) and embedded KD (ekd): which blocks a sub-net runs, its
private BatchNorm, the cost table against hand-counted ResNet-20..56, and a real ekd cell."""

from __future__ import annotations

import pytest
import torch
from conftest import smoke_cfg

from benchmark.costs.flops import count_costs
from benchmark.models import ARCHS, build_model
from benchmark.training.train import CellOptions, train_cell


def _model(**arch):
    torch.manual_seed(0)
    return build_model("ddnn_resnet", ARCHS.get("ddnn_resnet").resolve(arch), 10, 32)


def _resnet_macs_params(n: int, classes: int = 10) -> tuple[int, int]:
    """MACs and parameters of He et al.'s CIFAR ResNet-(6n+2), option-A shortcuts, by hand."""
    conv = lambda hw, c_in, c_out: (hw * hw * c_in * c_out * 9, c_in * c_out * 9)  # noqa: E731
    layers = [conv(32, 3, 16)]
    for s, (hw, c) in enumerate([(32, 16), (16, 32), (8, 64)]):
        for i in range(n):
            c_in = c // 2 if s > 0 and i == 0 else c
            layers += [conv(hw, c_in, c), conv(hw, c, c)]
    macs = sum(m for m, _ in layers) + 64 * classes
    bn = 2 * (16 + n * 2 * (16 + 32 + 64))
    params = sum(p for _, p in layers) + bn + 64 * classes + classes
    return macs, params


def test_cost_table_matches_hand_counted_cifar_resnets():
    costs = count_costs(_model(), 32)
    assert [c.name for c in costs] == ["d20", "d32", "d44", "d56"]
    for c, n in zip(costs, [3, 5, 7, 9]):
        macs, params = _resnet_macs_params(n)
        assert c.mmacs * 1e6 == pytest.approx(macs, rel=1e-9), c.name
        assert round(c.params_m * 1e6) == params, c.name
    assert costs[0].params_m == pytest.approx(0.27, abs=0.005)  # the ResNet-20 of the paper
    assert costs[-1].mmacs == pytest.approx(125.5, abs=0.1)  # and ResNet-56


def _blocks_run(model, k: int) -> dict[int, list[int]]:
    ran: dict[int, list[int]] = {}
    handles = [
        block.register_forward_hook(lambda *_, s=s, i=i: ran.setdefault(s, []).append(i))
        for s, stage in enumerate(model.stages)
        for i, block in enumerate(stage)
    ]
    model.forward_sub(torch.randn(2, 3, 32, 32), k)
    for h in handles:
        h.remove()
    return ran


def test_subnet_k_runs_the_first_depth_k_blocks_of_every_stage():
    model = _model(depths=[1, 2, 4]).eval()
    for k, d in enumerate([1, 2, 4]):
        assert _blocks_run(model, k) == {s: list(range(d)) for s in range(3)}


def test_subnets_share_convs_and_keep_private_batchnorm():
    model = _model(depths=[1, 2]).train()
    model.forward_sub(torch.randn(4, 3, 32, 32), 0).sum().backward()
    deep_only = model.stages[0][1]  # block 1 of stage 1 belongs to the deeper sub-net only
    assert all(p.grad is None for p in deep_only.parameters())
    shared_conv = model.stages[0][0].conv1.weight
    assert shared_conv.grad is not None and shared_conv.grad.any()
    bn = model.stages[0][0].bn1.bn  # private statistics: only sub-net 0's BN saw the batch
    assert bn[0].num_batches_tracked.item() == 1 and bn[1].num_batches_tracked.item() == 0

    shared = _model(depths=[1, 2], private_bn=False)
    assert len(shared.stages[0][0].bn1.bn) == 1
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in model.parameters())


def test_stage_features_have_the_same_resolutions_for_every_subnet():
    model = _model(depths=[1, 3]).eval()
    x = torch.randn(2, 3, 32, 32)
    for k in range(2):
        logits, feats = model.forward_sub_features(x, k)
        assert torch.equal(logits, model.forward_sub(x, k))
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize("bad", [[2, 1], [], [0, 1], "3", [1.5, 2]])
def test_bad_depths_are_rejected_with_the_rule(bad, tmp_path):
    from benchmark.errors import ConfigError

    with pytest.raises(ConfigError, match="depths must be strictly increasing integers"):
        smoke_cfg("ddnn_resnet", "ekd", tmp_path, arch__depths=bad)


def test_ekd_cell_logs_kd_and_attention_terms_for_every_subnet(tracking_uri, client, tmp_path):
    cfg = smoke_cfg("ddnn_resnet", "ekd", tmp_path)
    result = train_cell(
        cfg, CellOptions(tracking_uri=tracking_uri, experiment="ekd", progress=False)
    )
    history = client.get_run(result.run_id).data.metrics
    for sub in ("d8",):  # the student; the full net d14 has only its CE
        assert history[f"train/loss_terms/at/{sub}"] > 0
        assert history[f"train/loss_terms/kd/{sub}"] > 0
    assert "train/loss_terms/at/d14" not in history
    assert [r["name"] for r in result.rows] == ["d8", "d14"]
    assert all(r["mflops"] > 0 and r["gbitops"] > 0 for r in result.rows)
