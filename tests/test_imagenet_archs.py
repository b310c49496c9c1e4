"""ImageNet-size networks (issue 22): cost tables at 224 px against the published numbers, the
`imagenet` profile selecting every architecture's ImageNet network, and the new schedules.

Costs are counted with `benchmark.costs.flops.count_costs`, the path `flexbench info` takes, on
models built on the meta device (same numbers from shapes alone: checked below), so the file
runs in seconds without an ImageNet copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from benchmark import cli
from benchmark.config import resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError
from benchmark.models import ARCHS, build_model, build_on_meta
from benchmark.training.build import lr_at

# torchvision's model docs (docs/source/models, the weights' `_metrics`: "GFLOPS", which are
# multiply-accumulates, and "num_params") at 224 px, 1000 classes.
TORCHVISION = {  # name: (GMACs, M params)
    "resnet18": (1.81, 11.69),
    "resnet34": (3.66, 21.80),
    "resnet50": (4.09, 25.56),
    "vgg16_bn": (15.47, 138.37),
}
RESNET50_DEPTHS = [[2, 2, 2, 2], [3, 3, 3, 3], [3, 4, 6, 3]]

# kalviny/MSDNet-PyTorch, `models/msdnet.py` with `--data ImageNet` and the README's arguments
# (nBlocks 5, stepmode even, nChannels 32, growthRate 16, grFactor/bnFactor 1-2-4-4, base = step
# = 4; run_imagenet.sh: base = step = 7), counted at 224 px by its `op_counter.py`
# (measure_model) with only its Conv2d and Linear terms (conv MACs, linear MACs + bias adds), the
# convention of the CIFAR reference numbers in tests/test_models.py; cumulative per exit.
# Its full counter adds ReLU and pooling element counts: 339.9 / 685.5 / 1008.2 / 1254.5 /
# 1360.5 M (step 4), 615.7 / 1436.4 / 2283.2 / 2967.4 / 3253.8 M (step 7).
MSDNET_IMAGENET = {
    "imagenet_step4": (
        [337215464, 681656272, 1003662008, 1249630240, 1355611016],
        [4238504, 8772240, 13073272, 16748416, 23958440],
    ),
    "imagenet_step7": (
        [612031976, 1430812112, 2276391096, 2959946016, 3246185864],
        [8759240, 20154896, 31730040, 41860288, 62314472],
    ),
}


def meta_costs(arch: str, image_size: int = 224, num_classes: int = 1000, **over):
    model = build_on_meta(arch, ARCHS.get(arch).resolve(over), num_classes, image_size)
    return count_costs(model, image_size)


def torchvision_count(name: str) -> tuple[float, int]:
    """(MACs, parameters) of torchvision's own model, counted like count_costs."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224, device="meta"))
    return counter.get_total_flops() / 2, sum(p.numel() for p in model.parameters())


def assert_torchvision(cost, name: str, conv_biases: int = 0) -> None:
    """MACs and parameters of `cost` equal torchvision's model `name` (its documented numbers
    to their two decimals, and exactly its counted ones) less `conv_biases` parameters."""
    gmacs, m_params = TORCHVISION[name]
    assert cost.mmacs / 1e3 == pytest.approx(gmacs, abs=0.005), name
    assert cost.params_m + conv_biases / 1e6 == pytest.approx(m_params, abs=0.005), name
    macs, params = torchvision_count(name)
    assert cost.mmacs * 1e6 == macs, name
    assert round(cost.params_m * 1e6) == params - conv_biases, name


def test_meta_counting_equals_counting_the_real_model():
    spec = ARCHS.get("byot_resnet")
    params = spec.resolve({"variant": "imagenet"})
    real = count_costs(build_model("byot_resnet", params, 1000, 224), 224)
    assert count_costs(build_on_meta("byot_resnet", params, 1000, 224), 224) == real


def test_ddnn_resnet34_holds_resnet18_at_torchvision_costs():
    costs = meta_costs("ddnn_resnet", **ARCHS.get("ddnn_resnet").profiles["imagenet"])
    assert [c.name for c in costs] == ["d18", "d26", "d34"]
    assert_torchvision(costs[0], "resnet18")
    assert_torchvision(costs[-1], "resnet34")
    assert costs[0].mmacs < costs[1].mmacs < costs[2].mmacs


def test_ddnn_bottleneck_resnet50_at_torchvision_cost():
    costs = meta_costs(
        "ddnn_resnet", variant="imagenet", block="bottleneck", depths=RESNET50_DEPTHS
    )
    assert [c.name for c in costs] == ["d26", "d38", "d50"]
    assert_torchvision(costs[-1], "resnet50")
    # ResNet-26 style [2, 2, 2, 2] bottlenecks: 2.34 GMACs, 16.00 M parameters (ours, counted)
    assert costs[0].mmacs == pytest.approx(2342.26, abs=0.01)


@pytest.mark.parametrize("depth,name", [(18, "resnet18"), (50, "resnet50")])
def test_byot_final_exit_is_torchvision_resnet(depth, name):
    spec = ARCHS.get("byot_resnet")
    model = build_on_meta("byot_resnet", spec.resolve({"variant": "imagenet", "depth": depth}),
                          1000, 224)  # fmt: skip
    x = torch.zeros(1, 3, 224, 224, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval().forward_sub(x, 3)  # the last exit alone: backbone + fc
    assert counter.get_total_flops() / 2 == torchvision_count(name)[0]
    assert counter.get_total_flops() / 2e9 == pytest.approx(TORCHVISION[name][0], abs=0.005)
    costs = count_costs(model, 224)  # anytime table: cumulative, earlier heads included
    assert [c.name for c in costs] == ["exit1", "exit2", "exit3", "exit4"]
    assert costs[-1].mmacs > counter.get_total_flops() / 2e6


def test_saliency_vgg16_bn_at_torchvision_cost():
    costs = meta_costs("saliency_vgg", variant="imagenet")
    assert [c.name for c in costs] == ["c0.25", "c0.5", "c0.75", "c1.0"]
    # torchvision's 13 conv biases before BatchNorm (4224 parameters) are not in ours
    assert_torchvision(costs[-1], "vgg16_bn", conv_biases=4224)
    # a sub-model prunes the conv channels and the first linear layer's input (7x7 per channel)
    assert costs[0].mmacs < costs[1].mmacs < costs[2].mmacs < costs[3].mmacs
    assert costs[0].mmacs == pytest.approx(1021.98, abs=0.01)


def test_switchable_precision_resnet18_runs_resnet18_macs_per_bit_width():
    costs = meta_costs("switchable_precision_resnet", variant="imagenet", depth=18)
    assert [c.name for c in costs] == ["b2", "b4", "b8", "b32"]
    for c in costs:
        assert_torchvision(c, "resnet18")
    # bit-ops: 3x3 convs at k x k bits, stem conv, 1x1 shortcuts and fc at 32 x 32
    assert [round(c.gbitops, 2) for c in costs] == [147.81, 167.92, 248.38, 1857.61]
    assert costs[-1].gbitops == pytest.approx(costs[-1].mmacs * 1024 / 1e3, rel=1e-9)


@pytest.mark.parametrize("preset", sorted(MSDNET_IMAGENET))
def test_msdnet_imagenet_costs_match_the_reference_op_counter(preset):
    macs, params = MSDNET_IMAGENET[preset]
    costs = meta_costs("msdnet", preset=preset)
    assert [c.name for c in costs] == [f"exit{i + 1}" for i in range(5)]
    for i, (c, ref_macs, ref_params) in enumerate(zip(costs, macs, params)):
        # ours count no linear bias adds: 1000 per head run, i + 1 heads up to exit i + 1
        assert round(c.mmacs * 1e6) + 1000 * (i + 1) == ref_macs, c.name
        assert round(c.params_m * 1e6) == ref_params, c.name


def fake_imagenet(root: Path, size: int = 224) -> Path:
    """An ImageNet-like image folder: train/ and test/, two wnid classes, one JPEG each."""
    for split in ("train", "test"):
        for wnid in ("n01440764", "n01443537"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            pixels = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
            (folder / "0.JPEG").write_bytes(torchvision.io.encode_jpeg(pixels).numpy().tobytes())
    return root


# what the imagenet profile selects in each architecture
IMAGENET_SELECTION = {
    "byot_resnet": {"variant": "imagenet", "depth": 18},
    "ddnn_resnet": {"variant": "imagenet", "block": "basic"},
    "flex_vit": {"patch": 16, "dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "msdnet": {"preset": "imagenet_step4", "variant": "imagenet", "n_blocks": 5, "step": 4},
    "ofa_mobilenet_v3": {"stem_stride": 2, "strides": [2, 2, 2, 1, 2]},
    "saliency_vgg": {"variant": "imagenet", "depth": 16},
    "sdn": {"backbone": "vgg16_bn"},
    "slimmable_mobilenet_v1": {"stem_stride": 2},
    "switchable_precision_resnet": {"variant": "imagenet", "depth": 18},
    "us_mobilenet_v1": {"stem_stride": 2},
}


def test_every_architecture_has_an_imagenet_network():
    assert set(IMAGENET_SELECTION) == set(ARCHS.names())
    for name in ARCHS.names():
        assert "imagenet" in ARCHS.get(name).profiles, name


@pytest.mark.parametrize("arch", sorted(IMAGENET_SELECTION))
def test_imagenet_profile_resolves_every_architecture_at_224px(arch, tmp_path):
    data = f"imagefolder:{fake_imagenet(tmp_path / 'in')}"
    cfg = resolve(arch, data, "joint", 0, "imagenet")
    for key, value in IMAGENET_SELECTION[arch].items():
        assert cfg["arch"][key] == value, key
    assert cfg["data"]["val_size"] == 50000
    if arch in ("msdnet", "ddnn_resnet", "byot_resnet", "saliency_vgg"):  # the profile's recipe
        t = cfg["train"]
        assert (t["epochs"], t["batch_size"], t["lr"], t["weight_decay"]) == (90, 256, 0.1, 1e-4)
        assert [m * 90 for m in t["milestones"]] == pytest.approx([30, 60])


def test_mobilenets_keep_their_imagenet_costs_and_paper_schedules(tmp_path):
    data = f"imagefolder:{fake_imagenet(tmp_path / 'in')}"
    for arch in ("slimmable_mobilenet_v1", "us_mobilenet_v1"):
        cfg = resolve(arch, data, "joint", 0, "imagenet")
        params = {k: v for k, v in cfg["arch"].items() if k != "name"}
        costs = meta_costs(arch, **params)
        # slimmable_networks README: 41 / 149 (150 in the S-Nets table) / 325 / 569 MFLOPs (MACs)
        for c, published in zip(costs, [41, 149, 325, 569]):
            assert c.mmacs == pytest.approx(published, rel=0.01), (arch, c.name)
    s = resolve("slimmable_mobilenet_v1", data, "joint", 0, "imagenet")["train"]
    assert (s["epochs"], s["batch_size"], s["lr"], s["schedule"], s["gamma"]) == (
        480, 160, 0.045, "exp", 0.98)  # fmt: skip
    u = resolve("us_mobilenet_v1", data, "sandwich", 0, "imagenet")["train"]
    assert (u["epochs"], u["batch_size"], u["lr"], u["schedule"]) == (250, 1024, 0.5, "linear")
    assert s["nesterov"] and u["nesterov"] and u["bn_calib_batches"] == 5


def test_imagenet_networks_refuse_cifar_sized_images():
    for arch in ("ddnn_resnet", "byot_resnet", "saliency_vgg", "switchable_precision_resnet"):
        with pytest.raises(ConfigError, match=f"{arch} variant imagenet needs images of at least "
                           "64 px .*got 32 px; use variant cifar"):  # fmt: skip
            resolve(arch, "synthetic", "joint", 0, "imagenet")
    with pytest.raises(ConfigError, match="must be 5..12 px .* got 32 px -> 1 px"):
        resolve("msdnet", "synthetic", "joint", 0, "imagenet")
    with pytest.raises(ConfigError, match="variant must be one of cifar, imagenet, got 'imgnet'"):
        resolve("byot_resnet", "synthetic", "joint", 0, "smoke", {"arch.variant": "imgnet"})


@pytest.mark.parametrize(
    "sets,message",
    [
        ({"arch.depths": [3, 5]}, "one list of 4 blocks-per-stage"),
        ({"arch.depths": [[3, 4, 6, 3], [2, 2, 2, 2]]}, "no stage shrinking"),
        ({"arch.depths": [[2, 2, 2, 2], [1, 3, 3, 3]]}, r"got \[\[2, 2, 2, 2\], \[1, 3, 3, 3\]\]"),
        ({"arch.block": "wide"}, "block must be one of basic, bottleneck, got 'wide'"),
    ],
)
def test_bad_ddnn_imagenet_settings_are_one_clear_error(sets, message, tmp_path):
    data = f"imagefolder:{fake_imagenet(tmp_path / 'in')}"
    with pytest.raises(ConfigError, match=message):
        resolve("ddnn_resnet", data, "joint", 0, "imagenet", sets)


def test_cifar_variants_refuse_imagenet_only_settings():
    with pytest.raises(ConfigError, match="block bottleneck needs variant imagenet"):
        resolve("ddnn_resnet", "synthetic", "joint", 0, "smoke", {"arch.block": "bottleneck"})
    with pytest.raises(ConfigError, match="msdnet isc needs an integer head_channels"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke",
                {"arch.isc": True, "arch.head_channels": None})  # fmt: skip


def test_exp_and_linear_schedules():
    """exp: x gamma per epoch (S-MobileNet's exp_decaying); linear: lr / total steps less before
    every step, 0 at the last (US-Nets' linear_decaying)."""
    t = {"lr": 0.5, "epochs": 4, "warmup_epochs": 0, "gamma": 0.98, "milestones": []}
    assert lr_at({**t, "schedule": "exp"}, 3, 7, 10) == pytest.approx(0.5 * 0.98**3)
    lin = {**t, "schedule": "linear"}
    assert lr_at(lin, 0, 0, 10) == pytest.approx(0.5 * (1 - 1 / 40))
    assert lr_at(lin, 2, 4, 10) == pytest.approx(0.5 * (1 - 25 / 40))
    assert lr_at(lin, 3, 9, 10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="valid: multistep, cosine, exp, linear"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"train.schedule": "step"})


def test_info_prints_the_imagenet_cost_table(tmp_path, capsys):
    """The profile's ResNet-18 (at a quarter width, to keep the real forwards short)."""
    data = f"imagefolder:{fake_imagenet(tmp_path / 'in')}"
    args = ["--profile", "imagenet", "--repeats", "1", "--set", "arch.width=0.25"]
    rc = cli.main(["info", "--arch", "switchable_precision_resnet", "--dataset", data, *args])
    out = capsys.readouterr().out
    assert rc == 0 and "(2 classes, 224px), profile imagenet" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("b")]
    assert [r[0] for r in rows] == ["b2", "b4", "b8", "b32"]
    expected = meta_costs("switchable_precision_resnet", num_classes=2, variant="imagenet",
                          depth=18, width=0.25)  # fmt: skip
    for row, c in zip(rows, expected):
        assert float(row[1]) == pytest.approx(c.mmacs, abs=1e-3)
        assert float(row[3]) == pytest.approx(c.gbitops, abs=1e-3)


@pytest.mark.parametrize(
    "arch,over,size",
    [
        ("ddnn_resnet", {"block": "bottleneck", "depths": [[1, 1, 1, 1], [1, 2, 1, 1]]}, 64),
        ("byot_resnet", {"depth": 50}, 64),
        ("saliency_vgg", {"depth": 11}, 64),
        ("switchable_precision_resnet", {"depth": 18}, 64),
        (
            "msdnet",
            {"preset": "imagenet_step4", "n_channels": 4, "growth_rate": 2, "base": 1, "step": 1},
            160,
        ),  # fmt: skip
    ],
)
def test_imagenet_networks_train_and_give_stage_features(arch, over, size):
    """A tiny ImageNet-variant network: every sub-model's logits, features and a backward."""
    width = {"saliency_vgg": {"width_mult": 0.0625}, "msdnet": {}}.get(arch, {"width": 0.0625})
    params = ARCHS.get(arch).resolve({"variant": "imagenet", **over, **width})
    model = build_model(arch, params, 7, size).train()
    x = torch.randn(2, 3, size, size)
    for sub in model.submodels:
        logits, feats = model.forward_sub_features(x, sub.index)
        assert logits.shape == (2, 7) and feats, sub.name
    loss = sum(z.logsumexp(1).mean() for z in model.forward_all(x))
    loss.backward()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].weight.grad is not None  # the first layer learns
    assert convs[0].kernel_size == ((3, 3) if arch == "saliency_vgg" else (7, 7))  # ImageNet stem


def test_vgg_first_linear_reads_the_kept_channels_7x7_positions():
    """PrunedLinear with `spatial`: the pruned input (kept channels only, flattened channel-major)
    gives the full layer's output on a map whose other channels are zero."""
    from benchmark.models.saliency_vgg import PrunedLinear

    layer = PrunedLinear(3, 5, spatial=4)
    kept = torch.tensor([0, 2])
    x = torch.randn(2, 2, 4)
    full = torch.zeros(2, 3, 4)
    full[:, kept] = x
    expected = layer(full.flatten(1))
    layer.idx_in = kept
    assert torch.allclose(layer(x.flatten(1)), expected, atol=1e-6)
    assert layer.active_num_params() == (2 * 4 + 1) * 5
