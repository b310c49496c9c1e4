"""The ViT-on-CIFAR recipe pieces any architecture can switch on: `train.optimizer` adam/adamw,
`train.weight_decay_on`, and `train.augment_policy: autoaugment_cifar10` (batched on the device,
seeded by (seed, epoch)). Reference: omihub777/ViT-CIFAR (`main.py`, `autoaugment.py`, `ops.py`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import smoke_cfg
from PIL import Image, ImageEnhance, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from benchmark.config import DEFAULTS, KEY_NEUTRAL, cell_key, resolve
from benchmark.data import autoaugment as aa
from benchmark.data.pipeline import (
    Normalizer,
    TrainBatches,
    apply_crop_flip,
    crop_flip_params,
    epoch_order,
)
from benchmark.errors import ConfigError
from benchmark.training.build import make_method, make_model, new_optimizer, weight_groups
from benchmark.training.train import CellOptions, train_cell

CPU = torch.device("cpu")
NORM = Normalizer((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), CPU)
AA = "autoaugment_cifar10"


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (blurred noise: the ops see edges and flat parts)."""
    x = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return F.gaussian_blur(x.to(torch.uint8), [5, 5])


# -- every op, image by image, against torchvision's single-image op --------------------------

FILL = [128.0] * 3


def single_image_op(name: str, img: torch.Tensor, m: float) -> torch.Tensor:
    """The reference op (ViT-CIFAR `ops.py`) as one torchvision call on one (3, H, W) image."""
    if name in ("shear_x", "shear_y"):
        deg = math.degrees(math.atan(m))
        shear = [deg, 0.0] if name == "shear_x" else [0.0, deg]
        bilinear = InterpolationMode.BILINEAR
        return F.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                        interpolation=bilinear, fill=FILL, center=[0.0, 0.0])  # fmt: skip
    if name in ("translate_x", "translate_y"):
        t = [m, 0.0] if name == "translate_x" else [0.0, m]
        return F.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], fill=FILL)
    calls = {
        "rotate": lambda: F.rotate(img, m, fill=FILL),
        "color": lambda: F.adjust_saturation(img, 1 + m),
        "contrast": lambda: F.adjust_contrast(img, 1 + m),
        "sharpness": lambda: F.adjust_sharpness(img, 1 + m),
        "brightness": lambda: F.adjust_brightness(img, 1 + m),
        "posterize": lambda: F.posterize(img, int(m)),
        "solarize": lambda: F.solarize(img, m),
        "autocontrast": lambda: F.autocontrast(img),
        "equalize": lambda: F.equalize(img),
        "invert": lambda: F.invert(img),
    }
    return calls[name]()


def replay(img: torch.Tensor, sub: int, apply: list[bool], sign: list[int]) -> torch.Tensor:
    """One image through its sub-policy, step by step, as the reference's `SubPolicy.__call__`."""
    row = aa.CIFAR10_POLICY[sub]
    for step in (0, 1):
        name, level = row[1 + 3 * step], row[2 + 3 * step]
        if apply[step]:
            size = img.shape[-2] if name == "translate_y" else img.shape[-1]
            m = aa.magnitude(name, level, size) * (sign[step] if name in aa.SIGNED else 1)
            img = single_image_op(name, img, m)
    return img


def test_every_op_of_the_policy_equals_the_single_image_op_on_each_image():
    """Every sub-policy, both steps taken, both signs: 100 images (4 per sub-policy), each
    image's output equal to its own single-image replay (a mis-grouped or mis-signed image, or
    the wrong magnitude bin, differs)."""
    n = len(aa.CIFAR10_POLICY) * 4
    x = images(n, seed=1)
    sub = torch.arange(n) // 4
    apply = torch.tensor([[True, True], [True, False], [False, True], [True, True]]).repeat(
        len(aa.CIFAR10_POLICY), 1
    )
    sign = torch.tensor([[1, 1], [-1, -1], [1, -1], [-1, 1]]).repeat(len(aa.CIFAR10_POLICY), 1)
    draw = aa.PolicyDraw(sub, apply, sign)
    out = aa.apply_policy(x, draw)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for i in range(n):
        ref = replay(x[i], int(sub[i]), apply[i].tolist(), sign[i].tolist())
        assert torch.equal(out[i], ref), (i, aa.CIFAR10_POLICY[int(sub[i])])
    changed = (out != x).flatten(1).any(1)
    assert changed[apply.any(1)].float().mean() > 0.9  # taken steps do change the images


def test_the_torchvision_ops_match_the_references_pil_ops():
    """The reference applies PIL ops (`ops.py`); torchvision's tensor kernels equal them bit for
    bit for the exact group, differ by at most 1 (rounding) for the close group, and rotation
    differs at a few edge pixels (< 1 %), at the policy's magnitudes."""
    img = images(1, seed=2)[0]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    grey = (128, 128, 128)
    rot = pil.convert("RGBA").rotate(20.0)  # the reference's rotate-with-grey-fill
    exact, close, edges = (0, 0.0), (1, 1.0), (255, 0.01)  # (max difference, max fraction)
    cases = {
        "invert": (0.0, ImageOps.invert(pil), exact),
        "solarize": (aa.magnitude("solarize", 2, 32), ImageOps.solarize(pil, 256 * 7 / 9), exact),
        "posterize": (aa.magnitude("posterize", 7, 32), ImageOps.posterize(pil, 5), exact),
        "equalize": (0.0, ImageOps.equalize(pil), exact),
        "brightness": (-0.7, ImageEnhance.Brightness(pil).enhance(0.3), exact),
        "sharpness": (0.9, ImageEnhance.Sharpness(pil).enhance(1.9), exact),
        # PIL's affine (1, 0, c, 0, 1, 0) samples x + c: the image moves by -c
        "translate_x": (
            -5.0,
            pil.transform((32, 32), Image.AFFINE, (1, 0, 5, 0, 1, 0), fillcolor=grey),
            exact,
        ),  # fmt: skip
        "autocontrast": (0.0, ImageOps.autocontrast(pil), close),
        "contrast": (0.6, ImageEnhance.Contrast(pil).enhance(1.6), close),
        "color": (0.6, ImageEnhance.Color(pil).enhance(1.6), close),
        "rotate": (20.0, Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot), edges),
    }
    for name, (m, want, (most, fraction)) in cases.items():
        ref = torch.from_numpy(np.array(want.convert("RGB"))).permute(2, 0, 1).int()
        diff = (aa.op(name)(img[None], m)[0].int() - ref).abs()
        assert diff.max() <= most and (diff > 0).float().mean() <= fraction, name


def test_magnitude_bins_are_the_references():
    """ViT-CIFAR `SubPolicy.ranges`: np.linspace over 10 bins."""
    assert aa.magnitude("shear_x", 9, 32) == pytest.approx(0.3)
    assert aa.magnitude("translate_y", 9, 32) == pytest.approx(150 / 331 * 32)
    assert aa.magnitude("rotate", 2, 32) == pytest.approx(np.linspace(0, 30, 10)[2])
    assert aa.magnitude("color", 3, 32) == pytest.approx(np.linspace(0, 0.9, 10)[3])
    posterize = np.round(np.linspace(8, 4, 10), 0).astype(int)
    assert [aa.magnitude("posterize", i, 32) for i in range(10)] == posterize.tolist()
    solarize = np.linspace(256, 0, 10)
    assert [aa.magnitude("solarize", i, 32) for i in range(10)] == pytest.approx(solarize)


# -- draws: seeded by (seed, epoch), one per image, the default path untouched ----------------


def test_policy_draws_follow_the_probabilities_and_each_image_draws_its_own():
    g = torch.Generator().manual_seed(0)
    draw = aa.draw_policy(20_000, g)
    counts = torch.bincount(draw.sub, minlength=25).float() / 20_000
    assert counts.min() > 0.03 and counts.max() < 0.05  # uniform over 25 sub-policies
    probs = torch.tensor([[p[0], p[3]] for p in aa.CIFAR10_POLICY])[draw.sub]
    assert (draw.apply.float().mean(0) - probs.mean(0)).abs().max() < 0.01
    assert not draw.apply[probs == 0].any() and draw.apply[probs == 1].all()
    assert set(draw.sign.flatten().tolist()) == {-1, 1}


def test_policy_batches_are_seeded_by_seed_and_epoch():
    x, y = images(96, seed=3), torch.arange(96)
    batches = TrainBatches(x, y, 32, NORM, seed=5, device=CPU, policy=AA)
    a, b = list(batches.epoch(0)), list(batches.epoch(0))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    again = TrainBatches(x, y, 32, NORM, seed=5, device=CPU, policy=AA)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, again.epoch(0)))
    other_epoch = list(batches.epoch(1))
    assert not any(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, other_epoch))
    other_seed = TrainBatches(x, y, 32, NORM, seed=6, device=CPU, policy=AA)
    assert not torch.equal(a[0][0], next(iter(other_seed.epoch(0)))[0])
    plain = TrainBatches(x, y, 32, NORM, seed=5, device=CPU)  # same order, same crops
    for (xa, ya), (xp, yp) in zip(a, plain.epoch(0)):
        assert torch.equal(ya, yp) and not torch.equal(xa, xp)
        assert xa.dtype == torch.float32 and xa.is_contiguous(memory_format=torch.channels_last)


def test_no_policy_draws_nothing_after_the_crop_and_flip():
    """policy none: every batch is the crop/flip of the epoch's draws, in sequence, as before
    policies existed (an extra draw per batch would shift the second batch's crops)."""
    x, y = images(64, size=8, seed=4), torch.arange(64)
    got_ = list(TrainBatches(x, y, 16, NORM, seed=2, device=CPU).epoch(3))
    perm, g = epoch_order(2, 3, 64, CPU)
    for i, (xb, yb) in enumerate(got_):
        idx = perm[i * 16 : (i + 1) * 16]
        assert torch.equal(yb, y[idx])
        assert torch.equal(xb, NORM(apply_crop_flip(x[idx], crop_flip_params(16, g))))


def test_shards_take_their_part_of_the_global_policy_draws():
    x, y = images(64, seed=5), torch.arange(64)
    whole = list(TrainBatches(x, y, 32, NORM, 1, CPU, policy=AA).epoch(0))
    parts = [list(TrainBatches(x, y, 32, NORM, 1, CPU, (r, 2), AA).epoch(0)) for r in (0, 1)]
    for i, (xb, _) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), xb)


# -- optimizers ------------------------------------------------------------------------------


class _Tokens(nn.Module):
    """A module holding ViT-style parameters: a token and a position table (3-D, not decayed by
    name), a linear layer (matrix decayed, bias not) and a LayerNorm (not decayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


def test_weight_decay_on_matrices_skips_norms_biases_and_listed_tokens():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Tokens())  # the names are found under a prefix
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay, plain = weight_groups(model, {"weight_decay_on": "matrices"})
    assert [by_id[id(p)] for p in decay["params"]] == ["0.weight", "1.proj.weight"]
    assert sorted(by_id[id(p)] for p in plain["params"]) == [
        "0.bias", "1.cls_token", "1.norm.bias", "1.norm.weight", "1.pos_embed", "1.proj.bias"
    ]  # fmt: skip
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decay
    (every,) = weight_groups(model, {"weight_decay_on": "all"})
    assert every["params"] == list(model.parameters())


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_build_with_betas_and_the_method_group(tmp_path, name, cls):
    cfg = smoke_cfg("switchable_precision_resnet", "multi_teacher", tmp_path,
                    train__optimizer=name, train__betas=[0.8, 0.99], train__weight_decay=5e-5,
                    train__weight_decay_on="matrices")  # fmt: skip
    model = make_model(cfg, 10, 32)
    method = make_method(cfg, model.num_submodels)
    opt = new_optimizer(model, method, cfg["train"])
    assert type(opt) is cls and len(opt.param_groups) == 3
    decay, plain, own = opt.param_groups
    assert all(g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    assert decay["weight_decay"] == 5e-5 and plain["weight_decay"] == own["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in plain["params"])
    n = len(decay["params"]) + len(plain["params"])
    assert n == len(list(model.parameters())) and own["params"] == list(method.parameters())


def test_adamw_decay_is_decoupled_and_adam_decay_is_in_the_gradient():
    """With a zero gradient, AdamW shrinks a weight by lr x wd; Adam's L2 term enters the
    moment estimates, so its first step moves the weight by lr (the normalised step)."""
    for name, expected in (("adamw", 1.0 - 0.1 * 0.5), ("adam", 1.0 - 0.1)):
        w = nn.Parameter(torch.ones(2, 2))
        model = nn.Module()
        model.w = w
        t = {"optimizer": name, "lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.5,
             "weight_decay_on": "all"}  # fmt: skip
        joint = make_method({"method": {"name": "joint"}, "train": {"label_smoothing": 0.0}}, 1)
        opt = new_optimizer(model, joint, t)
        w.grad = torch.zeros_like(w)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.full((2, 2), expected))


# -- settings: defaults keep every cell key, bad values name the valid ones -------------------


def test_the_recipe_settings_at_their_defaults_leave_the_cell_key_unchanged(tmp_path):
    cfg = smoke_cfg("msdnet", "joint", tmp_path)
    new = ("optimizer", "betas", "weight_decay_on", "augment_policy")
    assert all(KEY_NEUTRAL["train", k] == DEFAULTS["train"][k] for k in new)
    before = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in new}}
    assert cell_key(cfg) == cell_key(before)
    for k, v in (("optimizer", "adamw"), ("betas", [0.9, 0.99]), ("weight_decay_on", "matrices"),
                 ("augment_policy", AA)):  # fmt: skip
        assert cell_key(smoke_cfg("msdnet", "joint", tmp_path, **{f"train__{k}": v})) != (
            cell_key(cfg)
        ), k


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.optimizer", "rmsprop", "train.optimizer must be one of sgd, adam, adamw, got "
         "'rmsprop' (str)"),
        ("train.augment_policy", "randaugment", "train.augment_policy must be one of none, "
         "autoaugment_cifar10, got 'randaugment' (str)"),
        ("train.betas", [0.9], "train.betas must be two numbers in [0, 1)"),
        ("train.betas", [0.9, 1.0], "got [0.9, 1.0] (list)"),
        ("train.weight_decay_on", "bias", "must be one of all, matrices, got 'bias' (str)"),
    ],
)  # fmt: skip
def test_bad_recipe_values_name_the_valid_ones(key, value, message):
    with pytest.raises(ConfigError) as exc:
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {key: value})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_nesterov_with_adam_is_refused():
    with pytest.raises(ConfigError, match="train.nesterov applies to train.optimizer sgd only"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke",
                {"train.optimizer": "adam", "train.nesterov": True})  # fmt: skip


def test_a_cell_trains_with_the_vit_cifar_recipe(tmp_path, tracking_uri, client):
    """Adam + AutoAugment + label smoothing + warm-up/cosine through the trainer, end to end."""
    cfg = smoke_cfg("slimmable_mobilenet_v1", "joint", tmp_path, train__optimizer="adam",
                    train__lr=1e-3, train__weight_decay=5e-5, train__augment_policy=AA,
                    train__label_smoothing=0.1, train__schedule="cosine",
                    train__warmup_epochs=1)  # fmt: skip
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert len(result.rows) > 1 and all(math.isfinite(v) for v in result.metrics.values())
    params = client.get_run(result.run_id).data.params
    assert params["train.optimizer"] == "adam" and params["train.augment_policy"] == AA
