"""flex_vit: one vision transformer with three nested axes (heads, FFN width, exits).

The network is a pre-norm ViT with a class token (Dosovitskiy et al., ICLR 2021; timm's
`VisionTransformer` block order: x + attn(LN(x)), x + MLP(LN(x)), a final LN and a linear head
on the class token). Sub-model k is a `SubShape` (heads h_k, FFN hidden units m_k, exit layer
e_k), and every axis is a prefix of one set of weights:

- `heads` (HydraViT, Haberer et al., NeurIPS 2024; ds-kiel/HydraViT `timm/models/hydravit.py`):
  the first h_k heads and the first d_k = h_k * d_head embedding channels everywhere: patch
  embedding, class token, position embedding, q/k/v (the first d_k rows of each of the three
  blocks of the qkv weight), the attention output projection, the FFN input and output, every
  LayerNorm (weight and bias sliced, normalised over the d_k active channels only) and the head.
- `ffn` (MatFormer, Devvrit et al., 2023; RAIVNLab/MatFormer-OLMo): the first m_k hidden units
  of every MLP, m_k = round(ffn_k * mlp_ratio * d_k). With the heads axis the FFN shrinks with
  the embedding as in HydraViT (ffn 1.0 is mlp_ratio x d_k hidden units).
- `exit` (SDN / Zero-Time-Waste-style early exits on the class token): a LayerNorm + linear
  classifier on the class token after layer e_k; with the exit axis alone every exit comes from
  one pass (`caps.single_pass`) and the reported cost of exit k is the anytime cost (the trunk
  up to e_k plus every exit head up to k), as for every early-exit family.

The axes combine: a sub-model list gives one value per used axis per sub-model, each list
strictly increasing (smallest sub-model first). When every used width axis gives the same
fraction per sub-model (h_k / heads == ffn_k) and no exit axis is used, the sub-models lie on one
width line and any width w of `width_range` runs (`forward_width`: round(w * heads) heads, FFN
fraction w), so `sandwich` can draw widths. LayerNorm has no running statistics: no BN
recalibration (`caps.bn_recalibration` is False).

Shapes: the CIFAR default is omihub777/ViT-CIFAR's (`vit.py`, README hyper-parameters: 32 px,
patch 4 -> 8 x 8 patches + class token, 7 layers, hidden 384, 12 heads, MLP hidden 384, i.e.
mlp_ratio 1.0, 6.3M parameters); the `imagenet` profile is DeiT-B's (224 px, patch 16, 12 layers,
hidden 768, 12 heads of 64, mlp_ratio 4), whose 3-, 6- and 12-head sub-models are DeiT-Ti, -S
and -B (HydraViT's sub-networks). Initialisation: timm's ViT default (`init_weights`: linear
weights truncated normal std 0.02, zero biases, position embedding truncated normal std 0.02,
class token normal std 1e-6). Attention runs `F.scaled_dot_product_attention` (fused kernels on
GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel, WidthRange

# the `axes` a cell can choose, in the order sub-model names list them
VIT_AXES = ("heads", "ffn", "exit")


@dataclass(frozen=True)
class SubShape:
    """One sub-model: `heads` active heads (embedding heads x d_head), `hidden` FFN hidden units
    per layer, `depth` layers run before its classifier (its exit layer, 1-based)."""

    heads: int
    hidden: int
    depth: int


class PrefixLinear(nn.Linear):
    """A linear layer running `weight[:n_out, :n_in]` (n_in: the input's last dimension)."""

    _active: tuple[int, int] = (0, 0)

    def forward(self, x: Tensor, n_out: int | None = None) -> Tensor:
        """(..., n_in) -> (..., n_out); n_out defaults to all output features."""
        n_out = self.out_features if n_out is None else n_out
        self._active = (n_out, x.shape[-1])
        return F.linear(x, self.weight[:n_out, : x.shape[-1]], self.bias[:n_out])

    def active_num_params(self) -> int:
        n_out, n_in = self._active
        return n_out * n_in + n_out


class PrefixQKV(nn.Linear):
    """The fused q/k/v projection (D -> 3D): input (B, N, d) -> (B, N, 3d) from the first d rows
    of each of the q, k and v blocks and the first d columns (HydraViT's `QKVLinear`)."""

    def forward(self, x: Tensor) -> Tensor:
        d, full = x.shape[-1], self.in_features
        self._d = d
        weight = self.weight.view(3, full, full)[:, :d, :d].reshape(3 * d, d)
        return F.linear(x, weight, self.bias.view(3, full)[:, :d].reshape(3 * d))

    def active_num_params(self) -> int:
        d = getattr(self, "_d", self.in_features)
        return 3 * d * d + 3 * d


class PrefixLayerNorm(nn.LayerNorm):
    """LayerNorm over the input's d active channels with weight[:d] and bias[:d]."""

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        self._d = d
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)

    def active_num_params(self) -> int:
        return 2 * getattr(self, "_d", self.normalized_shape[0])


class PrefixPatchConv(nn.Conv2d):
    """Patch embedding: a patch x patch convolution of stride patch with the first d output
    channels: (B, 3, H, W) -> (B, d, H/patch, W/patch)."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__(3, dim, patch, patch)
        self._d = dim

    def forward(self, x: Tensor, d: int) -> Tensor:
        self._d = d
        return F.conv2d(x, self.weight[:d], self.bias[:d], self.stride)

    def active_num_params(self) -> int:
        return self._d * (self.weight[0].numel() + 1)


class ClassAndPosition(nn.Module):
    """Prepends the class token and adds the position embedding, both sliced to the tokens' d
    channels: patch tokens (B, N, d) -> (B, 1 + N, d)."""

    def __init__(self, dim: int, num_patches: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self._d = dim

    def forward(self, tokens: Tensor) -> Tensor:
        d = self._d = tokens.shape[-1]
        cls = self.cls_token[:, :, :d].expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed[:, :, :d]

    def active_num_params(self) -> int:
        return self._d * (1 + self.pos_embed.shape[1])

    def no_weight_decay(self) -> set[str]:
        """Kept out of weight decay under `train.weight_decay_on: matrices` (DeiT / timm)."""
        return {"cls_token", "pos_embed"}


class Block(nn.Module):
    """Pre-norm transformer layer at d active channels, `heads` heads and `hidden` FFN units:
    (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = PrefixLayerNorm(dim), PrefixLayerNorm(dim)
        self.qkv = PrefixQKV(dim, 3 * dim)
        self.proj = PrefixLinear(dim, dim)
        self.fc1, self.fc2 = PrefixLinear(dim, hidden), PrefixLinear(hidden, dim)

    def forward(self, x: Tensor, heads: int, hidden: int) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, d_head)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d), d)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x), hidden)), d)


class ExitHead(nn.Module):
    """LayerNorm + linear classifier on the class token: (B, N, d) -> logits (B, C) and the
    normalised class token (B, d)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = PrefixLayerNorm(dim)
        self.fc = PrefixLinear(dim, num_classes)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        cls = self.norm(tokens[:, 0])
        return self.fc(cls), cls


class Trunk(nn.Module):
    """Token embedding and the transformer layers; one call runs a sub-model's trunk once."""

    def __init__(self, dim: int, depth: int, hidden: int, patch: int, num_patches: int) -> None:
        super().__init__()
        self.patch_embed = PrefixPatchConv(dim, patch)
        self.tokens = ClassAndPosition(dim, num_patches)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(depth))

    def forward(self, x: Tensor, shape: SubShape, d_head: int, taps: set[int]) -> dict[int, Tensor]:
        """Tokens (B, N, d) after each layer in `taps` (1-based), running shape.depth layers."""
        out: dict[int, Tensor] = {}
        t = self.tokens(self.patch_embed(x, shape.heads * d_head).flatten(2).transpose(1, 2))
        for i, block in enumerate(self.blocks[: shape.depth], start=1):
            t = block(t, shape.heads, shape.hidden)
            if i in taps:
                out[i] = t
        return out


class FlexViT(FlexibleModel):
    """Sub-model k runs `shapes[k]` (see the module docstring); `exit_layers` are the layers
    with a classifier (the last one at the deepest sub-model's depth)."""

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        arch: ViTShape,
        axes: tuple[str, ...],
        shapes: list[SubShape],
        widths: WidthRange | None,
    ) -> None:
        super().__init__()
        self.arch, self.axes, self.shapes = arch, axes, list(shapes)
        self.exit_layers = sorted({s.depth for s in shapes})
        self.submodels = [SubModel(k, _name(s, axes, arch)) for k, s in enumerate(shapes)]
        alone = axes == ("exit",)
        # no exit_features (so no byot): an exit's only feature is the shared class token, and
        # BYOT's L2 hint between exits needs features of the exits' own (the paper's bottleneck
        # per shallow classifier); on the residual stream it pulls every layer's class token to
        # the deepest's and collapses it (smoke: byot 17-20 % top-1 at every exit, 60-68 % with
        # the hint weight g = 0, as joint)
        self.caps = Capabilities(axes, single_pass=alone, early_exit=alone, widths=widths)
        grid = image_size // arch.patch
        self.features = Trunk(arch.dim, arch.depth, arch.hidden, arch.patch, grid * grid)
        self.classifiers = nn.ModuleList(ExitHead(arch.dim, num_classes) for _ in self.exit_layers)
        _init_weights(self)

    def _run(self, x: Tensor, shape: SubShape, exits: list[int]) -> dict[int, tuple]:
        """{exit layer: (logits (B, C), [class token (B, d, 1, 1), patch tokens (B, d, g, g)])}
        for the exit layers `exits`, from one pass of the trunk at `shape`."""
        tokens = self.features(x, shape, self.arch.d_head, set(exits))
        out = {}
        for layer in exits:
            t = tokens[layer]
            logits, cls = self.classifiers[self.exit_layers.index(layer)](t)
            g = math.isqrt(t.shape[1] - 1)
            patches = t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g)
            out[layer] = (logits, [cls[:, :, None, None], patches])
        return out

    def _one(self, x: Tensor, shape: SubShape) -> tuple[Tensor, list[Tensor]]:
        return self._run(x, shape, [shape.depth])[shape.depth]

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._one(x, self.shapes[k])[0]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits of sub-model k and [its class token (B, d, 1, 1), its patch-token map
        (B, d, H/patch, W/patch)] at its exit."""
        return self._one(x, self.shapes[k])

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        which = list(range(len(self.submodels))) if which is None else which
        if not self.caps.single_pass:
            return [self._one(x, self.shapes[k]) for k in which]
        deepest = max((self.shapes[k] for k in which), key=lambda s: s.depth)
        out = self._run(x, deepest, [self.shapes[k].depth for k in which])
        return [out[self.shapes[k].depth] for k in which]

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        return [logits for logits, _ in self.forward_all_features(x, which)]

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        """Exits alone: the trunk up to exit k and every exit head up to k (anytime cost)."""
        if not self.caps.single_pass:
            return self.forward_sub(x, k)
        exits = [s.depth for s in self.shapes[: k + 1]]
        return self._run(x, self.shapes[k], exits)[self.shapes[k].depth][0]

    def shape_of_width(self, w: float) -> SubShape:
        """The sub-model at width w of `caps.widths`: round(w x heads) heads (heads axis) and
        FFN fraction w (ffn axis), all layers. Raises ValueError outside the range."""
        rng = self.caps.widths
        if rng is None or not rng.contains(w):
            raise ValueError(f"width {w} is outside the network's range {rng}")
        a = self.arch
        heads = max(1, round(w * a.heads)) if "heads" in self.axes else a.heads
        return SubShape(heads, a.hidden_units(w if "ffn" in self.axes else 1.0, heads), a.depth)

    def forward_width(self, x: Tensor, w: float) -> Tensor:
        """Logits (N, num_classes) of width w (any value in `caps.widths`)."""
        return self._one(x, self.shape_of_width(w))[0]


@dataclass(frozen=True)
class ViTShape:
    """The full network: patch size (px), embedding `dim`, `depth` layers, `heads` heads,
    FFN hidden = round(mlp_ratio x dim)."""

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float

    @property
    def d_head(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        return self.hidden_units(1.0, self.heads)

    def hidden_units(self, ffn: float, heads: int) -> int:
        """FFN hidden units at FFN fraction `ffn` of a sub-model with `heads` heads:
        max(1, round(ffn x mlp_ratio x heads x d_head))."""
        return max(1, round(ffn * self.mlp_ratio * heads * self.d_head))


def _name(s: SubShape, axes: tuple[str, ...], arch: ViTShape) -> str:
    """`h3-f0.25`: 3 heads, FFN fraction 0.25; `exit4`: the exit after layer 4."""
    parts = {
        "heads": f"h{s.heads}",
        "ffn": f"f{s.hidden / arch.hidden_units(1.0, s.heads):.4g}",
        "exit": f"exit{s.depth}",
    }
    return "-".join(parts[a] for a in VIT_AXES if a in axes)


def _init_weights(model: nn.Module) -> None:
    """timm `VisionTransformer.init_weights` (default mode): trunc-normal(0.02) linear weights
    and position embedding, zero biases, class token N(0, 1e-6), LayerNorm (1, 0); the patch
    embedding keeps a conv's default initialisation, as timm's does."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ClassAndPosition):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.normal_(m.cls_token, std=1e-6)


def _integer(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer in [{low}, {high}], {got(value)}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{what} must be a positive number, {got(value)}")
    return float(value)


def _vit_shape(p: dict, image_size: int) -> ViTShape:
    """The full network's shape; ConfigError for a patch that does not tile the image or a head
    count that does not divide the embedding."""
    patch = _integer(p["patch"], "patch", 1, image_size)
    if image_size % patch:
        raise ConfigError(
            f"patch must divide the image size {image_size} px "
            f"(valid: {[q for q in range(1, image_size + 1) if image_size % q == 0]}), "
            f"{got(patch)}"
        )
    dim = _integer(p["dim"], "dim", 1, 1 << 16)
    heads = _integer(p["num_heads"], "num_heads", 1, dim)
    if dim % heads:
        divisors = [h for h in range(1, dim + 1) if dim % h == 0]
        raise ConfigError(
            f"num_heads must divide the embedding dim={dim} (valid: {divisors}), {got(heads)}"
        )
    depth = _integer(p["depth"], "depth", 1, 1024)
    return ViTShape(patch, dim, depth, heads, _number(p["mlp_ratio"], "mlp_ratio"))


def _axes(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or any(a not in VIT_AXES for a in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(
            f"axes must be a non-empty list of distinct axes from {list(VIT_AXES)}, {got(value)}"
        )
    return tuple(a for a in VIT_AXES if a in value)


def _axis_list(p: dict, key: str, check) -> list:
    """The sub-model list of one axis: non-empty, each value valid (`check`), strictly
    increasing (nested: every larger sub-model has more of this axis)."""
    values = p[key]
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{key} must be a non-empty list, one value per sub-model, {got(values)}")
    values = [check(v) for v in values]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(
            f"{key} must be strictly increasing, smallest sub-model first (sub-models are "
            f"nested: a larger one never has less), got {values}"
        )
    return values


def _shapes(p: dict, a: ViTShape, axes: tuple[str, ...]) -> tuple[list[SubShape], dict]:
    """Every sub-model's SubShape and the used axes' lists ({axis: list}); ConfigError for
    lists of different lengths, heads or exits outside the network."""

    def ffn(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ConfigError(f"ffn values must be numbers in (0, 1], {got(v)}")
        return float(v)

    checks = {
        "heads": lambda v: _integer(v, f"heads (of num_heads={a.heads})", 1, a.heads),
        "ffn": ffn,
        "exit": lambda v: _integer(v, f"exits (layers 1..depth={a.depth})", 1, a.depth),
    }
    lists = {ax: _axis_list(p, "exits" if ax == "exit" else ax, checks[ax]) for ax in axes}
    lengths = {ax: len(v) for ax, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            f"the lists of the used axes must have one value per sub-model (the same length), "
            f"got lengths {lengths}"
        )
    k_all = next(iter(lengths.values()))
    heads = lists.get("heads", [a.heads] * k_all)
    ffns = lists.get("ffn", [1.0] * k_all)
    depths = lists.get("exit", [a.depth] * k_all)
    shapes = [SubShape(h, a.hidden_units(f, h), e) for h, f, e in zip(heads, ffns, depths)]
    return shapes, lists


def _width_range(p: dict, a: ViTShape, lists: dict) -> WidthRange | None:
    """The continuous width axis, when the sub-models lie on one width line: no exit axis and
    every used width axis gives the same fraction per sub-model (h_k / num_heads == ffn_k)."""
    if "exit" in lists:
        return None
    fractions = [[h / a.heads for h in lists["heads"]]] if "heads" in lists else []
    fractions += [lists["ffn"]] if "ffn" in lists else []
    if any(abs(u - v) > 1e-9 for f in fractions[1:] for u, v in zip(fractions[0], f)):
        return None
    rng = p["width_range"]
    if (
        not isinstance(rng, (list, tuple))
        or len(rng) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in rng)
        or not 0 < rng[0] < rng[1] <= 1
    ):
        raise ConfigError(f"width_range must be [low, high] with 0 < low < high <= 1, {got(rng)}")
    if "heads" in lists and rng[0] < 1 / a.heads - 1e-9:  # below one head: off the width line
        raise ConfigError(
            f"width_range must start at 1 / num_heads = {1 / a.heads:g} or above (a width "
            f"below one head would run as one head, off the width line), {got(rng)}"
        )
    step = p["spectrum_step"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step <= 1:
        raise ConfigError(f"spectrum_step must be a number in [0, 1] (0: no spectrum), {got(step)}")
    return WidthRange(float(rng[0]), float(rng[1]), tuple(fractions[0]), float(step))


# omihub777/ViT-CIFAR (README hyper-parameters; `vit.py`): 32 px, 8 x 8 patches of 4 px,
# 7 layers, hidden 384, 12 heads, MLP hidden 384
CIFAR_SHAPE = {"patch": 4, "dim": 384, "depth": 7, "num_heads": 12, "mlp_ratio": 1.0}
# DeiT-B (Touvron et al., ICML 2021, Table 1): 224 px, patch 16, 12 layers, 768, 12 heads, 4x MLP
DEIT_B_SHAPE = {"patch": 16, "dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}


@register_arch(
    "flex_vit",
    defaults={
        "preset": "heads_ffn",
        **CIFAR_SHAPE,
        "axes": ["heads", "ffn"],
        "heads": [3, 6, 9, 12],
        "ffn": [0.25, 0.5, 0.75, 1.0],
        "exits": [1, 3, 5, 7],
        "width_range": [0.25, 1.0],
        "spectrum_step": 0.0,
    },
    presets={
        "heads_ffn": {"axes": ["heads", "ffn"]},
        "heads": {"axes": ["heads"]},  # HydraViT
        "ffn": {"axes": ["ffn"], "ffn": [0.125, 0.25, 0.5, 1.0], "width_range": [0.125, 1.0]},
        "exits": {"axes": ["exit"]},
    },
    profiles={
        "smoke": {
            "dim": 32,
            "depth": 4,
            "num_heads": 4,
            "heads": [1, 2, 3, 4],
            "exits": [1, 2, 3, 4],
        },
        # mini: 8 px patches (4 x 4 + class token), 4 layers of 128 with 4 heads of 32. Patch 4
        # at dim 64 (65 tokens, head dim 8) cost 22 min a cell here, CPU attention half of it,
        # and the KD methods' smallest sub-model stayed under 30 % in 8 epochs; 17 tokens cost
        # ~1/3 per step, which pays for 18 epochs (train recipe below)
        "mini": {
            "patch": 8,
            "dim": 128,
            "depth": 4,
            "num_heads": 4,
            "mlp_ratio": 2.0,
            "heads": [1, 2, 3, 4],
            "exits": [1, 2, 3, 4],
        },
        "imagenet": {**DEIT_B_SHAPE, "exits": [3, 6, 9, 12]},
    },  # fmt: skip
    # ViT-CIFAR's recipe (omihub777/ViT-CIFAR README and main.py): Adam lr 1e-3 with L2 weight
    # decay 5e-5 on every parameter, 200 epochs, batch 128, 5 warm-up epochs + cosine, label
    # smoothing 0.1, AutoAugment's CIFAR-10 policy. smoke / mini keep its optimizer but not the
    # policy (8 to 18 epochs are too few for it to pay); mini trains 18 epochs (at the profile's
    # 8, and at 12, the KD methods' smallest sub-model stayed near 30 %). DeiT's ImageNet recipe
    # (facebookresearch/deit main.py): AdamW lr 5e-4 x batch / 512, weight decay 0.05 on
    # matrices only, 300 epochs, batch 1024, 5 warm-up epochs + cosine, label smoothing 0.1 (its
    # RandAugment, mixup / cutmix, repeated augmentation and stochastic depth are not in
    # flexbench).
    train={
        "smoke": {
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 5e-5,
            "warmup_epochs": 1,
            "label_smoothing": 0.1,
        },
        "mini": {
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 5e-5,
            "epochs": 18,
            "warmup_epochs": 1,
            "label_smoothing": 0.1,
        },
        "paper": {
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 5e-5,
            "epochs": 200,
            "batch_size": 128,
            "schedule": "cosine",
            "warmup_epochs": 5,
            "label_smoothing": 0.1,
            "augment_policy": "autoaugment_cifar10",
        },
        "imagenet": {
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.05,
            "weight_decay_on": "matrices",
            "epochs": 300,
            "batch_size": 1024,
            "schedule": "cosine",
            "warmup_epochs": 5,
            "label_smoothing": 0.1,
        },
    },  # fmt: skip
    memory_format="contiguous",
    description="ViT with nested heads + embedding (HydraViT), nested FFN (MatFormer) and "
    "class-token exits; LayerNorm, no BN recalibration",
)
def build_flex_vit(num_classes: int, image_size: int, **p) -> FlexViT:
    """The flexible ViT of the resolved knobs (module docstring); ConfigError on bad input."""
    shape = _vit_shape(p, image_size)
    axes = _axes(p["axes"])
    shapes, lists = _shapes(p, shape, axes)
    widths = _width_range(p, shape, lists)
    return FlexViT(num_classes, image_size, shape, axes, shapes, widths)
