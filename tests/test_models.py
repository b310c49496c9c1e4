"""Architectures: per-sub-model costs against the reference counts, one pass for all MSDNet
exits, and slimmable widths with shared sliced weights and private BatchNorm."""

from __future__ import annotations

import pytest
import torch

from benchmark.costs.flops import count_costs
from benchmark.models import ARCHS, build_model
from benchmark.models.slimmable_mobilenet_v1 import SlimConv2d
from benchmark.models.switchable import SwitchableBatchNorm2d

# The MSDNet reference implementation's op counter (conv + linear multiply-adds, linear bias
# adds included) and its cumulative parameter counts of the CIFAR models.
MSDNET_REFERENCE = {
    ("anytime", 10): (
        [14955786, 25235988, 36746014, 45926440, 56876338, 66460220, 75407174],
        [422266, 853572, 1240122, 1649108, 2120302, 2533592, 2986690],
    ),
    ("anytime", 100): (
        [14967396, 25259208, 36780844, 45972880, 56934388, 66529880, 75488444],
        [433876, 876792, 1274952, 1695548, 2178352, 2603252, 3067960],
    ),
    ("budgeted", 10): (
        [6781194, 14186004, 27244318, 41327656, 58030386],
        [288094, 626520, 983478, 1445984, 2020874],
    ),
}


def msdnet(num_classes: int = 10, **over) -> torch.nn.Module:
    return build_model("msdnet", ARCHS.get("msdnet").resolve(over), num_classes, 32)


@pytest.mark.parametrize("preset,num_classes", list(MSDNET_REFERENCE))
def test_msdnet_costs_match_reference(preset, num_classes):
    macs, params = MSDNET_REFERENCE[(preset, num_classes)]
    costs = count_costs(msdnet(num_classes, preset=preset), 32)
    assert [c.name for c in costs] == [f"exit{i + 1}" for i in range(len(macs))]
    for c, ref_macs, ref_params in zip(costs, macs, params):
        # our MACs omit the linear bias adds (num_classes per head): within 0.1%
        assert c.mmacs * 1e6 == pytest.approx(ref_macs, rel=1e-3), c.name
        assert c.mflops == pytest.approx(2 * c.mmacs, rel=1e-9)
        assert round(c.params_m * 1e6) == ref_params, c.name


def test_slimmable_mobilenet_v1_imagenet_costs_match_published():
    spec = ARCHS.get("slimmable_mobilenet_v1")
    model = build_model("slimmable_mobilenet_v1", spec.resolve({"stem_stride": 2}), 1000, 224)
    costs = count_costs(model, 224)
    assert [c.name for c in costs] == ["w0.25", "w0.5", "w0.75", "w1.0"]
    for c, published in zip(costs, [41, 150, 325, 569]):
        assert c.mmacs == pytest.approx(published, rel=0.01), c.name
    # the full width has MobileNet-V1's 4.2 M parameters
    assert costs[-1].params_m == pytest.approx(4.23, rel=0.01)


def test_us_mobilenet_v1_imagenet_costs_match_published_spectrum():
    """US-Nets README spectrum (MobileNet-V1, 224x224): 1.0 -> 568 MFLOPs (they are MACs),
    0.5 -> 149, 0.25 -> 41; any width between runs, costing in between; no per-width BN."""
    from benchmark.costs.flops import width_costs

    spec = ARCHS.get("us_mobilenet_v1")
    model = build_model("us_mobilenet_v1", spec.resolve({"stem_stride": 2}), 1000, 224)
    costs = count_costs(model, 224)
    assert [c.name for c in costs] == ["w0.25", "w0.5", "w0.75", "w1.0"]
    for c, published in zip([costs[0], costs[1], costs[3]], [41, 149, 568]):
        assert c.mmacs == pytest.approx(published, rel=0.015), c.name
    assert costs[-1].params_m == pytest.approx(4.23, rel=0.01)
    (mid,) = width_costs(model, [0.6], ["w0.6"], 224)
    assert costs[1].mmacs < mid.mmacs < costs[2].mmacs
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 13  # one per conv position, shared by every width
    assert sum(p.numel() for m in bns for p in m.parameters()) == 2 * sum(
        m.num_features for m in bns
    )


TINY_MSD = {"n_blocks": 3, "base": 1, "step": 1, "n_channels": 4, "growth_rate": 2}


def test_msdnet_all_exits_come_from_one_forward():
    torch.manual_seed(0)
    model = msdnet(**TINY_MSD, head_channels=8).eval()
    calls = {"blocks": [0] * 3, "heads": [0] * 3}

    def counter(part: str, i: int):
        def hook(*_):
            calls[part][i] += 1

        return hook

    for i in range(3):
        model.blocks[i].register_forward_hook(counter("blocks", i))
        model.heads[i].register_forward_hook(counter("heads", i))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model.forward_all(x)
    assert calls == {"blocks": [1, 1, 1], "heads": [1, 1, 1]}
    assert model.caps.single_pass and len(outs) == 3
    with torch.no_grad():
        for k in range(3):  # the same logits as running each exit alone
            torch.testing.assert_close(outs[k], model.forward_sub(x, k))
        # a subset in any order, still one pass up to the deepest requested exit
        calls["blocks"] = [0] * 3
        sub = model.forward_all(x, [2, 0])
    assert calls["blocks"] == [1, 1, 1]
    torch.testing.assert_close(sub[0], outs[2])
    torch.testing.assert_close(sub[1], outs[0])


def tiny_slim(**over) -> torch.nn.Module:
    params = {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1], **over}
    spec = ARCHS.get("slimmable_mobilenet_v1")
    torch.manual_seed(0)
    return build_model("slimmable_mobilenet_v1", spec.resolve(params), 10, 32)


def test_slimmable_widths_have_private_batchnorm():
    model = tiny_slim().train()
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert bns and all(len(m.bn) == 4 for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(2):  # train width 1 only: forward in train mode + an optimiser step
        torch.nn.functional.cross_entropy(model.forward_sub(x, 1), y).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    prefixes = [n for n, mod in model.named_modules() if isinstance(mod, SwitchableBatchNorm2d)]
    for prefix in prefixes:
        for w in range(4):  # affine params and running stats: only width 1's moved
            keys = [k for k in after if k.startswith(f"{prefix}.bn.{w}.")]
            assert {k.rsplit(".", 1)[1] for k in keys} >= {"weight", "running_mean"}
            changed = [k for k in keys if not torch.equal(before[k], after[k])]
            assert bool(changed) == (w == 1), (prefix, w, changed)
            if w == 1:
                assert len(changed) == len(keys)


def test_slimmable_widths_share_sliced_conv_weights():
    model = tiny_slim().eval()
    convs = [m for m in model.modules() if isinstance(m, SlimConv2d)]
    # one weight tensor per layer, of the largest width
    assert all(tuple(c.weight.shape[:1]) == (max(c.out_list),) for c in convs)
    assert all(c.out_list == sorted(c.out_list) for c in convs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        small, full = model.forward_sub(x, 0), model.forward_sub(x, 3)
        for c in convs:  # change only weights outside width 0's slice
            c.weight[c.out_list[0] :] += 1.0
            if not c.depthwise:
                c.weight[:, c.in_list[0] :] += 1.0
        model.classifier.weight[:, model.classifier.in_list[0] :] += 1.0
        torch.testing.assert_close(model.forward_sub(x, 0), small, rtol=0, atol=0)
        assert not torch.allclose(model.forward_sub(x, 3), full)
        for c in convs:  # and a change inside width 0's slice changes width 0
            c.weight[: c.out_list[0]] *= 1.5
        assert not torch.allclose(model.forward_sub(x, 0), small)


def test_slimmable_width_zero_gradient_only_on_its_slice():
    model = tiny_slim().train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model.forward_sub(x, 0), y).backward()
    for c in (m for m in model.modules() if isinstance(m, SlimConv2d)):
        assert not c.weight.grad[c.out_list[0] :].any()
        assert c.weight.grad[: c.out_list[0]].any()


def test_submodels_are_ordered_smallest_first_by_cost():
    for model in (msdnet(**TINY_MSD, head_channels=8), tiny_slim()):
        costs = count_costs(model, 32)
        assert [c.name for c in costs] == [s.name for s in model.submodels]
        assert all(a.mmacs < b.mmacs for a, b in zip(costs, costs[1:]))
        assert all(a.params_m < b.params_m for a, b in zip(costs, costs[1:]))


@pytest.mark.parametrize(
    ("listed", "error"),
    [
        ((1.0, 0.5), "strictly increasing"),
        ((0.1, 1.0), r"outside the network's range \[0.25, 1.0\]"),
        ((), "non-empty list of numbers"),
        ((0.5, "x"), "non-empty list of numbers"),
    ],
)
def test_a_width_range_refuses_listed_widths_no_model_could_run(listed, error):
    """Any architecture declaring `caps.widths` gets its listed widths checked by the
    contract (smallest first, inside the range), whatever its builder validates."""
    from benchmark.errors import ConfigError
    from benchmark.models import WidthRange

    with pytest.raises(ConfigError, match=error):
        WidthRange(0.25, 1.0, listed)


def test_old_module_paths_import_with_a_warning_at_the_importing_line():
    import subprocess
    import sys

    code = "import benchmark.flops\nfrom benchmark import schema\nprint(schema.PREFIX)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "flexbench."
    assert "<string>:1: DeprecationWarning: benchmark.flops moved to benchmark.costs.flops" in (
        out.stderr
    )
