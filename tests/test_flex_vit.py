"""flex_vit: nested weights are prefixes, exits come from one pass, the MACs formula (CIFAR and
DeiT sizes), the methods that apply train it and the others are refused, bad input fails early."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import smoke_cfg

from benchmark.config import resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.models import ARCHS, build_model, build_on_meta
from benchmark.models.flex_vit import FlexViT
from benchmark.training.build import make_method, make_model
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, train_cell

SPEC = ARCHS.get("flex_vit")
TINY = {"dim": 24, "depth": 3, "num_heads": 4, "heads": [1, 2, 4], "ffn": [0.25, 0.5, 1.0],
        "exits": [1, 2, 3], "mlp_ratio": 2.0}  # fmt: skip


def vit(num_classes: int = 10, image_size: int = 32, **knobs) -> FlexViT:
    torch.manual_seed(0)
    return build_model("flex_vit", SPEC.resolve({**TINY, **knobs}), num_classes, image_size)


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- nested weights are prefixes -------------------------------------------------------------
def test_an_ffn_sub_model_is_the_full_model_with_the_other_hidden_units_zeroed():
    """Along the FFN axis the identity holds exactly: GELU(0) = 0, so hidden units whose fc1 row
    and bias are zero contribute nothing, and sub-model k equals the full model with every unit
    beyond its m_k zeroed."""
    model = vit(preset="ffn", ffn=[0.25, 0.5, 1.0]).eval()
    x = _x()
    for k, shape in enumerate(model.shapes):
        full = vit(preset="ffn", ffn=[0.25, 0.5, 1.0]).eval()
        with torch.no_grad():
            for block in full.features.blocks:
                block.fc1.weight[shape.hidden :] = 0
                block.fc1.bias[shape.hidden :] = 0
            sub, zeroed = model.forward_sub(x, k), full.forward_sub(x, len(model.shapes) - 1)
        assert torch.allclose(sub, zeroed, atol=1e-6), k
    assert [s.hidden for s in model.shapes] == [12, 24, 48]  # 0.25 / 0.5 / 1 x 2 x 24


def _dense_copy(model: FlexViT, k: int) -> FlexViT:
    """A dense ViT of sub-model k's size (its heads, embedding and FFN units, one sub-model)
    whose every weight is the prefix slice of `model`'s (q, k and v blocks sliced apart)."""
    s, full = model.shapes[k], model.arch.dim
    d = s.heads * model.arch.d_head
    ratio = s.hidden / d
    # every head, the whole FFN: one sub-model on the FFN axis (a heads axis of one sub-model
    # of all its heads has no width range that starts at one head below it)
    dense = vit(dim=d, num_heads=s.heads, mlp_ratio=ratio, preset="ffn", ffn=[1.0])
    big = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in dense.named_parameters():
            w = big[name]
            if name.endswith("qkv.weight"):
                w = w.view(3, full, full)[:, :d, :d].reshape(3 * d, d)
            elif name.endswith("qkv.bias"):
                w = w.view(3, full)[:, :d].reshape(3 * d)
            p.copy_(w[tuple(slice(0, n) for n in p.shape)])
    return dense.eval()


@pytest.mark.parametrize("preset", ["heads", "heads_ffn"])
def test_a_heads_sub_model_is_the_dense_vit_of_its_prefix_weights(preset):
    """Along the heads axis LayerNorm normalises over the d_k active channels, so zeroing the
    other channels is not an identity; the exact equivalent: sub-model k equals a dense ViT of
    d_k channels, h_k heads and m_k FFN units built from the prefix slices of every weight."""
    model = vit(preset=preset).eval()
    x = _x()
    for k in range(len(model.shapes)):
        with torch.no_grad():
            assert torch.allclose(model.forward_sub(x, k), _dense_copy(model, k)(x)[-1], atol=1e-5)


def test_a_sub_model_gives_gradient_only_to_its_prefix_slices():
    model = vit().train()
    model.forward_sub(_x(), 0).sum().backward()
    d = model.shapes[0].heads * model.arch.d_head
    m, full = model.shapes[0].hidden, model.arch.dim
    block = model.features.blocks[0]
    qkv = block.qkv.weight.grad.view(3, full, full)
    assert qkv[:, :d, :d].any() and not qkv[:, d:].any() and not qkv[:, :, d:].any()
    assert block.fc1.weight.grad[:m, :d].any() and not block.fc1.weight.grad[m:].any()
    assert not block.fc2.weight.grad[:, m:].any() and not block.norm1.weight.grad[d:].any()
    assert not model.features.tokens.pos_embed.grad[..., d:].any()
    assert not model.features.patch_embed.weight.grad[d:].any()


def test_a_listed_width_runs_as_its_sub_model_and_any_width_of_the_range_runs():
    model = vit().eval()
    x = _x()
    with torch.no_grad():
        for k, w in enumerate(model.caps.widths.listed):
            assert torch.equal(model.forward_width(x, w), model.forward_sub(x, k))
        assert model.shape_of_width(0.6).heads == 2  # round(0.6 x 4)
        assert model.forward_width(x, 0.6).shape == (3, 10)
    with pytest.raises(ValueError, match="outside the network's range"):
        model.forward_width(x, 0.1)


# --- exits -------------------------------------------------------------------------------------
def test_exits_come_from_one_pass_and_equal_each_exit_alone():
    model = vit(preset="exits").eval()
    assert model.caps.single_pass and model.caps.early_exit and model.caps.widths is None
    runs = []
    for block in model.features.blocks:
        block.register_forward_hook(lambda *_: runs.append(1))
    x = _x()
    with torch.no_grad():
        together = model.forward_all_features(x)
        assert len(runs) == 3  # each layer once for the three exits
        for k, (logits, feats) in enumerate(together):
            alone, _ = model.forward_sub_features(x, k)
            assert torch.allclose(logits, alone, atol=1e-6)
            assert feats[0].shape == (3, 24, 1, 1) and feats[1].shape == (3, 24, 8, 8)
    assert [s.name for s in model.submodels] == ["exit1", "exit2", "exit3"]


# --- costs -------------------------------------------------------------------------------------
def macs(n: int, d: int, m: int, layers: int, patch: int, classes: int, exits: int = 1) -> int:
    """MACs of a ViT sub-model with a class token: patch embedding (n patches of 3 p^2 pixels
    -> d), per layer q/k/v and the output projection (4 (n+1) d^2), QK^T and AV (2 (n+1)^2 d),
    the FFN (2 (n+1) d m), and `exits` class-token heads (d x classes each)."""
    t = n + 1
    layer = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m
    return n * 3 * patch * patch * d + layers * layer + exits * d * classes


def test_cifar_costs_match_the_formula_on_every_axis():
    full = SPEC.resolve({})  # ViT-CIFAR: 64 patches of 4 px, 7 x 384, 12 heads, MLP 384
    model = build_on_meta("flex_vit", full, 10, 32)
    got_macs = [c.mmacs * 1e6 for c in count_costs(model, 32)]
    shapes = [(96, 24), (192, 96), (288, 216), (384, 384)]  # (d, m): heads/12 x ffn x 384
    assert got_macs == pytest.approx([macs(64, d, m, 7, 4, 10) for d, m in shapes], rel=1e-9)
    exits = build_on_meta("flex_vit", SPEC.resolve({"preset": "exits"}), 10, 32)
    cumulative = [macs(64, 384, 384, e, 4, 10, k + 1) for k, e in enumerate([1, 3, 5, 7])]
    assert [c.mmacs * 1e6 for c in count_costs(exits, 32)] == pytest.approx(cumulative, rel=1e-9)
    assert count_costs(model, 32)[-1].params_m == pytest.approx(6.27, abs=0.01)  # ViT-CIFAR 6.3M


def test_imagenet_heads_sub_models_cost_deit_ti_s_b():
    """DeiT's GFLOPs (Touvron et al. 2021, Table 1: 1.3 / 4.6 / 17.6 for Ti / S / B) are
    multiply-accumulates as fvcore counts them (one MAC = one flop, attention matmuls
    included), so they compare with our GMACs. S and B are within 2 %; Ti's 1.25 GMACs is 3.6 %
    below the published 1.3, which is that value rounded to one decimal (timm lists 1.26)."""
    params = SPEC.resolve({**SPEC.profiles["imagenet"], "preset": "heads", "heads": [3, 6, 12]})
    costs = count_costs(build_on_meta("flex_vit", params, 1000, 224), 224)
    gmacs = [c.mmacs / 1e3 for c in costs]
    shapes = [(192, 768), (384, 1536), (768, 3072)]
    assert [g * 1e9 for g in gmacs] == pytest.approx(
        [macs(196, d, m, 12, 16, 1000) for d, m in shapes], rel=1e-9
    )
    assert gmacs[1:] == pytest.approx([4.6, 17.6], rel=0.02)
    assert round(gmacs[0], 1) == 1.3
    # and their parameters are DeiT-Ti / S / B's (timm: 5.72M, 22.05M, 86.57M)
    assert [c.params_m for c in costs] == pytest.approx([5.72, 22.05, 86.57], abs=0.01)


# --- methods -----------------------------------------------------------------------------------
def _refusal(method: str, **sets) -> str | None:
    try:
        resolve("flex_vit", "synthetic", method, 0, "smoke", sets)
    except IncompatibleError as exc:
        return str(exc)
    return None


def test_methods_that_cannot_apply_are_refused_with_their_reason():
    assert "needs saliency-ranked channels" in _refusal("hsd")
    assert "is not one; use msdnet" in _refusal("imta")
    # byot's L2 hint needs exit features of the exits' own; flex_vit's exits share the class
    # token (the hint collapsed it), so byot is refused on every preset, naming the CNNs
    for preset in SPEC.presets:
        assert "use byot_resnet or msdnet" in _refusal("byot", **{"arch.preset": preset})
    # sdn's refusal on the width axes names the preset that has one-pass exits
    assert "flex_vit has it with arch.preset=exits" in _refusal("sdn")
    on_exits = _refusal("sandwich", **{"arch.preset": "exits"})
    assert "needs a network that runs any width" in on_exits
    assert "use us_mobilenet_v1; flex_vit has it with arch.preset=heads_ffn" in on_exits
    # heads fractions 1/4 .. 4/4 and FFN fractions off that line: fixed sub-models only
    off_line = _refusal("sandwich", **{"arch.ffn": [0.5, 0.6, 0.8, 1.0]})
    assert "needs a network that runs any width" in off_line


@pytest.mark.parametrize("name", ["joint", "sdn"])
def test_early_exit_methods_train_the_exits_from_one_pass(name, tmp_path):
    cfg = smoke_cfg("flex_vit", name, tmp_path, arch__preset="exits")
    model = make_model(cfg, 10, 32).train()
    method = make_method(cfg, model.num_submodels)
    (stage,) = method.stages(model.num_submodels)
    calls = []
    model.features.register_forward_hook(lambda *_: calls.append(1))
    out = Step(model, method, stage)(_x(4), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out.loss) and len(calls) == 1 and sorted(out.logits) == [0, 1, 2, 3]


def test_sandwich_with_the_alpha_divergence_trains_a_smoke_cell(tracking_uri, tmp_path):
    cfg = smoke_cfg("flex_vit", "sandwich", tmp_path, method__divergence="alpha")
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    names = [r["name"] for r in result.rows]
    assert names == ["h1-f0.25", "h2-f0.5", "h3-f0.75", "h4-f1"]
    mflops = [r["mflops"] for r in result.rows]
    assert mflops == sorted(mflops) and all(0 <= r["top1"] <= 100 for r in result.rows)


def test_drawn_widths_run_through_forward_width(tmp_path):
    cfg = smoke_cfg("flex_vit", "sandwich", tmp_path)
    model = make_model(cfg, 10, 32).train()
    method = make_method(cfg, model.num_submodels)
    widths = method.draw_submodels(step_generator(0, 0, 0), model)
    assert widths[0] == 0.25 and widths[-1] == 1.0 and len(widths) == 4


# --- bad input ---------------------------------------------------------------------------------
def _bad(sets: dict) -> str:
    with pytest.raises(ConfigError) as info:
        resolve("flex_vit", "synthetic", "joint", 0, "smoke", sets)
    return str(info.value)


BAD_INPUT = [
    ({"arch.heads": [2, 1, 3, 4]}, "heads must be strictly increasing, smallest sub-model first"),
    ({"arch.num_heads": 3},
     "num_heads must divide the embedding dim=32 (valid: [1, 2, 4, 8, 16, 32]), got 3 (int)"),
    ({"arch.preset": "exits", "arch.exits": [1, 2, 5]},
     "exits (layers 1..depth=4) must be an integer in [1, 4], got 5 (int)"),
    ({"arch.width_range": [0.5, 1.0]},
     "widths [0.25] are outside the network's range [0.5, 1.0]"),
    ({"arch.width_range": [0.25, 1.5]},
     "width_range must be [low, high] with 0 < low < high <= 1, got [0.25, 1.5] (list)"),
    ({"arch.width_range": [0.1, 1.0]},
     "width_range must start at 1 / num_heads = 0.25 or above (a width below one head would "
     "run as one head, off the width line), got [0.1, 1.0] (list)"),
    ({"arch.axes": ["heads", "depth"]},
     "axes must be a non-empty list of distinct axes from ['heads', 'ffn', 'exit'], "
     "got ['heads', 'depth'] (list)"),
    ({"arch.ffn": [0.5, 1.0]}, "the lists of the used axes must have one value per sub-model"),
    ({"arch.heads": [1, 2, 3, 5]},
     "heads (of num_heads=4) must be an integer in [1, 4], got 5 (int)"),
    ({"arch.ffn": [0.25, 0.5, 0.75, 1.5]},
     "ffn values must be numbers in (0, 1], got 1.5 (float)"),
    ({"arch.patch": 5},
     "patch must divide the image size 32 px (valid: [1, 2, 4, 8, 16, 32]), got 5 (int)"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "shown"), BAD_INPUT)
def test_bad_input_is_one_config_error_naming_the_valid_values(sets, shown):
    message = _bad(sets)
    assert shown in message and "\n" not in message


def test_smoke_and_mini_sizes_resolve_with_every_preset():
    for profile in ("smoke", "mini"):
        for preset in SPEC.presets:
            cfg = resolve("flex_vit", "synthetic", "joint", 0, profile, {"arch.preset": preset})
            params = {k: v for k, v in cfg["arch"].items() if k != "name"}
            model = build_on_meta("flex_vit", params, 10, 32)
            assert len(model.submodels) == 4, (profile, preset)
    names = [s.name for s in vit(preset="heads_ffn", axes=["heads", "ffn", "exit"]).submodels]
    assert names == ["h1-f0.25-exit1", "h2-f0.5-exit2", "h4-f1-exit3"]
    assert re.fullmatch(r"[\w.-]+", "".join(names))


def test_the_recipe_keeps_class_token_and_position_embedding_out_of_weight_decay():
    """DeiT's AdamW (the imagenet profile) decays matrices only: not the class token, the
    position embedding, norms or biases (timm's param_groups_weight_decay)."""
    from benchmark.config import resolve
    from benchmark.models import build_model
    from benchmark.training.build import weight_groups

    cfg = resolve(
        "flex_vit", "synthetic", "joint", 0, "smoke", {"train.weight_decay_on": "matrices"}
    )
    params = {k: v for k, v in cfg["arch"].items() if k != "name"}
    model = build_model("flex_vit", params, 10, 32)
    decay, plain = weight_groups(model, cfg["train"])
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert {n for n in plain_names if n.endswith(("cls_token", "pos_embed"))}, plain_names
    assert plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any(names[id(p)].endswith(("cls_token", "pos_embed")) for p in decay["params"])
    imagenet = resolve("flex_vit", "imagenet", "joint", 0, "imagenet")
    assert (imagenet["train"]["optimizer"], imagenet["train"]["weight_decay_on"]) == (
        "adamw",
        "matrices",
    )
