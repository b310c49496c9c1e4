"""MSDNet for CIFAR and ImageNet (Huang et al., ICLR 2018), following the reference PyTorch
implementation (kalviny/MSDNet-PyTorch, `models/msdnet.py`).

Structure, channel arithmetic, "max" scale pruning, transition layers and the exit heads match
the reference model, so per-exit multiply-adds and parameter counts match its op counter
(`op_counter.py`: its conv and linear terms). `variant: imagenet` is the reference's
`--data ImageNet` network: the first layer is a 7x7 stride-2 conv (with a bias, as there), BN,
ReLU and a 3x3 stride-2 max-pool, then the stride-2 3x3 convs of the coarser scales; each exit
head is two stride-2 3x3 ConvBNReLU as wide as its input (`_build_classifier_imagenet`: nIn ->
nIn -> nIn), AvgPool(2) and a linear layer. The imagenet profile builds the README's network
(5 blocks, 4 scales, grFactor / bnFactor 1-2-4-4, nChannels 32, growthRate 16, base = step = 4,
stepmode even: preset `imagenet_step4`); preset `imagenet_step7` is `run_imagenet.sh`'s (base =
step = 7). Per-exit costs at 224 px: tests/test_imagenet_archs.py (step 4: 337 / 682 / 1004 /
1250 / 1356 MMACs cumulative, 4.24 / 8.77 / 13.07 / 16.75 / 23.96 M parameters).

One deliberate note on initialisation: the reference defines a custom initialiser but applies
it only to the direct children of each block (never to a Conv2d, BatchNorm2d or Linear), so its
networks train from PyTorch's default initialisation; we do the same instead of the initialiser
it never ran.

IMTA (Li et al., "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019; code
kalviny/IMTA) adds two switchable parts: `ge` (gradient equilibrium, see `MSDNet._run`) and `isc`
(inline subnetwork collaboration: exit i's linear classifier also reads exit i-1's logits through
Linear -> BatchNorm1d -> ReLU of width head_channels, 128 in the reference CIFAR setting; exit i
then needs every earlier head, so its cost includes them and the ISC transforms).

`cascade` (Zero-Time-Waste, Wojcik et al., NeurIPS 2021): exit i also reads exit i-1's detached
logits (`benchmark.models.base.CascadeLinks`); ISC already feeds the previous prediction into
each exit, so the two options exclude each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, EarlyExitModel, ExitOutput, SubModel
from benchmark.models.imagenet_resnet import check_variant, imagenet_stem


def _conv_bn_relu(n_in: int, n_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
    )


def _dense_conv(
    n_in: int, n_out: int, down: bool, bottleneck: bool, bn_width: int
) -> nn.Sequential:
    """Optional 1x1 bottleneck (width min(n_in, bn_width*n_out)) then a 3x3 conv."""
    layers: list[nn.Module] = []
    inner = n_in
    if bottleneck:
        inner = min(n_in, bn_width * n_out)
        layers += list(_conv_bn_relu(n_in, inner, 1, 1))
    layers += list(_conv_bn_relu(inner, n_out, 3, 2 if down else 1))
    return nn.Sequential(*layers)


class _DownNormal(nn.Module):
    """New features at one scale from the finer scale (strided) and the same scale."""

    def __init__(self, n_in_fine: int, n_in: int, n_out: int, bottleneck: bool, bw1: int, bw2: int):
        super().__init__()
        self.down = _dense_conv(n_in_fine, n_out // 2, True, bottleneck, bw1)
        self.normal = _dense_conv(n_in, n_out // 2, False, bottleneck, bw2)

    def forward(self, fine: Tensor, same: Tensor) -> Tensor:
        return torch.cat([same, self.down(fine), self.normal(same)], dim=1)


class _Normal(nn.Module):
    def __init__(self, n_in: int, n_out: int, bottleneck: bool, bw: int):
        super().__init__()
        self.normal = _dense_conv(n_in, n_out, False, bottleneck, bw)

    def forward(self, same: Tensor) -> Tensor:
        return torch.cat([same, self.normal(same)], dim=1)


class _Stem(nn.Module):
    """First layer: CIFAR a stride-1 3x3 conv, ImageNet a 7x7/2 conv + 3x3/2 max-pool; then one
    stride-2 3x3 conv per coarser scale."""

    def __init__(self, n_channels: int, gr_factor: list[int], imagenet: bool = False):
        super().__init__()
        c = n_channels * gr_factor[0]
        first = (
            imagenet_stem(c, nn.BatchNorm2d(c), bias=True)
            if imagenet
            else _conv_bn_relu(3, c, 3, 1)
        )
        layers, n_in = [first], c
        for g in gr_factor[1:]:
            layers.append(_conv_bn_relu(n_in, n_channels * g, 3, 2))
            n_in = n_channels * g
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class _Layer(nn.Module):
    """One MSDNet layer over the active scales; drops the finest scales when out < in."""

    def __init__(self, n_in, growth, in_scales, out_scales, gr, bn, bottleneck):
        super().__init__()
        n_scales = len(gr)
        self.discard = in_scales - out_scales
        self.out_scales = out_scales
        offset = n_scales - out_scales
        ops: list[nn.Module] = []
        if self.discard > 0:
            ops.append(
                _DownNormal(
                    n_in * gr[offset - 1],
                    n_in * gr[offset],
                    growth * gr[offset],
                    bottleneck,
                    bn[offset - 1],
                    bn[offset],
                )
            )
        else:
            ops.append(_Normal(n_in * gr[offset], growth * gr[offset], bottleneck, bn[offset]))
        for i in range(offset + 1, n_scales):
            ops.append(
                _DownNormal(
                    n_in * gr[i - 1], n_in * gr[i], growth * gr[i], bottleneck, bn[i - 1], bn[i]
                )
            )
        self.ops = nn.ModuleList(ops)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if self.discard > 0:
            return [op(xs[i], xs[i + 1]) for i, op in enumerate(self.ops)]
        return [self.ops[0](xs[0])] + [
            op(xs[i - 1], xs[i]) for i, op in enumerate(self.ops) if i > 0
        ]


class _Transition(nn.Module):
    """1x1 conv per active scale that compresses channels by the reduction factor."""

    def __init__(self, n_in: int, n_out: int, out_scales: int, offset: int, gr: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            _conv_bn_relu(n_in * gr[offset + i], n_out * gr[offset + i], 1, 1)
            for i in range(out_scales)
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class _Head(nn.Module):
    """Exit: two stride-2 3x3 ConvBNReLU (head_channels wide: 128 in the CIFAR reference, the
    input width in the ImageNet one), AvgPool(2), Linear.

    With ISC (`side_width` > 0) the linear layer also reads a side input of that width (the
    projected prediction of the previous exit), concatenated after the pooled features."""

    def __init__(self, n_in: int, head_channels: int, num_classes: int, side_width: int = 0):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(n_in, head_channels, 3, 2),
            _conv_bn_relu(head_channels, head_channels, 3, 2),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(head_channels + side_width, num_classes)

    def forward(self, coarse: Tensor, side: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) coarsest-scale map -> logits (B, classes) and the pooled exit feature
        (B, head_channels, 1, 1) that the linear layer reads."""
        feat = self.features(coarse)
        flat = feat.flatten(1)
        if side is not None:
            flat = torch.cat([flat, side], dim=1)
        return self.linear(flat), feat


class _GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `factor` (IMTA's gradient
    equilibrium, kalviny/IMTA `models/msdnet_ge.py`)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _isc_projection(num_classes: int, width: int) -> nn.Sequential:
    """ISC transform of the previous exit's logits: Linear -> BatchNorm1d -> ReLU (IMTA code,
    `models/msdnet_imta.py`; width 128 = the CIFAR exit width there)."""
    return nn.Sequential(
        nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)
    )


def block_steps(n_blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: `even` -> [base, step, step, ...]; `lin_grow` -> [base, step*i+1]."""
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, n_blocks)]


@dataclass(frozen=True)
class MSDNetConfig:
    """The knobs of an MSDNet, named as in the reference code's arguments (kalviny/
    MSDNet-PyTorch `args`: nBlocks, base, step, stepmode, nChannels, growthRate, grFactor,
    bnFactor, reduction, bottleneck, data: cifar or ImageNet as `variant`) plus the exit heads'
    width (None: as wide as the head's input, the reference ImageNet heads) and IMTA's two
    options and Zero-Time-Waste's cascade."""

    n_blocks: int
    base: int
    step: int
    step_mode: str
    n_channels: int
    growth_rate: int
    gr_factor: list[int]
    bn_factor: list[int]
    reduction: float
    bottleneck: bool
    head_channels: int | None
    ge: bool = False
    isc: bool = False
    variant: str = "cifar"
    cascade: bool = False


class MSDNet(EarlyExitModel):
    """MSDNet (CIFAR or ImageNet first layer); `ge` and `isc` switch on IMTA's gradient
    equilibrium and inline subnetwork collaboration (Li et al., ICCV 2019), each on its own (see
    `_walk`); `cascade` switches on Zero-Time-Waste's cascade connections. Exits can be
    stopped at (`forward_exits`, real early exiting)."""

    caps: Capabilities = replace(EarlyExitModel.caps, stops_at_exit=True, cascade=True)

    def __init__(self, num_classes: int, c: MSDNetConfig):
        super().__init__()
        n_blocks, growth_rate, reduction = c.n_blocks, c.growth_rate, c.reduction
        bottleneck, head_channels, n_channels = c.bottleneck, c.head_channels, c.n_channels
        isc = c.isc
        self.ge, self.isc = c.ge, c.isc
        gr, bn = list(c.gr_factor), list(c.bn_factor)
        n_scales = len(gr)
        steps = block_steps(n_blocks, c.base, c.step, c.step_mode)
        n_layers_all = sum(steps)
        interval = math.ceil(n_layers_all / n_scales)
        self.steps = steps
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        n_in, layer_idx = n_channels, 0
        for b in range(n_blocks):
            stem = _Stem(n_channels, gr, c.variant == "imagenet")
            mods: list[nn.Module] = [stem] if b == 0 else []
            for _ in range(steps[b]):
                layer_idx += 1
                in_scales = n_scales - math.floor(max(0, layer_idx - 2) / interval)
                out_scales = n_scales - math.floor((layer_idx - 1) / interval)
                mods.append(_Layer(n_in, growth_rate, in_scales, out_scales, gr, bn, bottleneck))
                n_in += growth_rate
                if in_scales > out_scales and reduction > 0:
                    n_out = math.floor(reduction * n_in)
                    mods.append(_Transition(n_in, n_out, out_scales, n_scales - out_scales, gr))
                    n_in = n_out
            self.blocks.append(nn.Sequential(*mods))
            side = head_channels if isc and b > 0 else 0
            width = head_channels or n_in * gr[-1]
            self.heads.append(_Head(n_in * gr[-1], width, num_classes, side))
        # ISC module i projects exit i's logits into exit i+1's classifier.
        self.isc_modules = nn.ModuleList(
            _isc_projection(num_classes, head_channels) for _ in range(n_blocks - 1) if isc
        )
        self.submodels = [SubModel(i, f"exit{i + 1}") for i in range(n_blocks)]
        self.init_cascade(c.cascade, num_classes)

    def _walk(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> Iterator[tuple[int, ExitOutput]]:
        """Trunk blocks 0..upto and the exit heads in `heads` (with ISC, every head up to the
        deepest requested one: exit i reads exit i-1's prediction), each head's output yielded
        right after its block.

        GE (kalviny/IMTA `msdnet_ge.py`): the coarsest-scale output of block i, the map exit i
        reads and the only path from block i's coarsest scale to deeper blocks, gets two
        identity rescales, 1/(K-i) before the exit and K-i-1 after it, so its gradient is
        (g_exit_i + (K-i-1) g_deeper) / (K-i). Telescoped over the blocks, the gradient at that
        map equals the plain gradient of the sum of the K-i losses that depend on it divided by
        K-i: their average. Finer scales are not rescaled (as in the reference).

        Features of exit i: [pooled exit feature (B, head_channels, 1, 1), coarsest map]."""
        if self.isc:
            heads = set(range(max(heads) + 1))
        h, prev, n = x, None, len(self.blocks)
        for i in range(upto + 1):
            h = list(self.blocks[i](h))
            if self.ge:
                h[-1] = _GradientRescale.apply(h[-1], 1.0 / (n - i))
            if i in heads:
                side = self.isc_modules[i - 1](prev) if self.isc and i > 0 else None
                z, feat = self.heads[i](h[-1], side)
                prev = z
                yield i, ((z, [feat, h[-1]]) if features else z)
            if self.ge and i < upto:
                h[-1] = _GradientRescale.apply(h[-1], float(n - i - 1))


ANYTIME = {"n_blocks": 7, "step_mode": "even", "step": 2, "base": 4}
BUDGETED = {"n_blocks": 5, "step_mode": "lin_grow", "step": 1, "base": 1}
# The reference README's ImageNet network (step 4) and run_imagenet.sh's (step 7).
_IMAGENET = {
    "variant": "imagenet",
    "n_blocks": 5,
    "step_mode": "even",
    "n_channels": 32,
    "growth_rate": 16,
    "gr_factor": [1, 2, 4, 4],
    "bn_factor": [1, 2, 4, 4],
    "head_channels": None,
}
IMAGENET_STEP4 = {**_IMAGENET, "base": 4, "step": 4}
IMAGENET_STEP7 = {**_IMAGENET, "base": 7, "step": 7}


@register_arch(
    "msdnet",
    defaults={
        "preset": "anytime",
        **ANYTIME,
        "n_channels": 16,
        "growth_rate": 6,
        "gr_factor": [1, 2, 4],
        "bn_factor": [1, 2, 4],
        "reduction": 0.5,
        "bottleneck": True,
        "head_channels": 128,
        "ge": False,
        "isc": False,
        "variant": "cifar",
        "cascade": False,
    },
    profiles={
        "smoke": {
            "n_blocks": 3,
            "base": 2,
            "step": 1,
            "n_channels": 4,
            "growth_rate": 2,
            "head_channels": 8,
        },
        "mini": {
            "n_blocks": 4,
            "base": 2,
            "step": 2,
            "n_channels": 8,
            "growth_rate": 4,
            "head_channels": 32,
        },
        "imagenet": {"preset": "imagenet_step4"},
    },
    presets={
        "anytime": ANYTIME,
        "budgeted": BUDGETED,
        "imagenet_step4": IMAGENET_STEP4,
        "imagenet_step7": IMAGENET_STEP7,
    },
    # ImageNet schedule: the reference README / run_imagenet.sh (90 epochs, batch 256, SGD 0.1,
    # wd 1e-4, lr x0.1 at epochs 30 and 60 in its main.py), the imagenet profile's own.
    description="MSDNet (CIFAR, or the reference ImageNet network): one exit per block, all "
    "exits from one forward pass",
)
def build_msdnet(num_classes: int, image_size: int, **p) -> MSDNet:
    # the image size is checked exactly by _check_head_size below
    variant = check_variant("msdnet", p["variant"], image_size, min_size=1)
    if p["step_mode"] not in ("even", "lin_grow"):
        raise ConfigError(f"msdnet step_mode {p['step_mode']!r}; valid: even, lin_grow")
    for key in ("n_blocks", "base", "step", "n_channels", "growth_rate"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ConfigError(f"msdnet {key} must be an integer >= 1, {got(p[key])}")
    hc = p["head_channels"]
    if hc is not None and (isinstance(hc, bool) or not isinstance(hc, int) or hc < 1):
        raise ConfigError(
            f"msdnet head_channels must be an integer >= 1 or null (as wide as the head's "
            f"input, the reference ImageNet heads), {got(hc)}"
        )
    if len(p["gr_factor"]) != len(p["bn_factor"]) or not p["gr_factor"]:
        raise ConfigError("msdnet gr_factor and bn_factor must be non-empty and of equal length")
    for key in ("ge", "isc", "cascade"):
        if not isinstance(p[key], bool):
            raise ConfigError(f"msdnet {key} must be true or false, got {p[key]!r}")
    if p["isc"] and hc is None:
        raise ConfigError(
            "msdnet isc needs an integer head_channels (the width of the projected "
            "prediction; 128 in IMTA's CIFAR setting), got null"
        )
    if p["isc"] and p["cascade"]:
        raise ConfigError(
            "msdnet isc and cascade both feed the previous exit's prediction into the next exit; "
            "set one of them, got isc=true and cascade=true"
        )
    if not 0 <= p["reduction"] < 1:
        raise ConfigError(f"msdnet reduction must be in [0, 1), {got(p['reduction'])}")
    _check_head_size(variant, len(p["gr_factor"]), image_size)
    return MSDNet(num_classes, MSDNetConfig(**p))


IMAGENET_HINT = "; at ImageNet size use --profile imagenet (or --set arch.preset=imagenet_step4)"


def _check_head_size(variant: str, n_scales: int, image_size: int) -> None:
    """The exit heads (two stride-2 3x3 convs, AvgPool(2)) must pool the coarsest scale to 1x1:
    that scale must be 5..12 px (CIFAR 32 px -> 8, ImageNet 224 px -> 7)."""
    halvings = n_scales - 1 + (2 if variant == "imagenet" else 0)  # ImageNet stem: conv + pool
    size = image_size
    for _ in range(halvings):
        size = -(-size // 2)  # a stride-2 conv or pool with padding: ceil(H / 2)
    if not 5 <= size <= 12:
        raise ConfigError(
            f"msdnet variant {variant} with {n_scales} scales takes its exits at image_size / "
            f"{2**halvings}, which must be 5..12 px for the exit heads to pool to 1x1 "
            f"(CIFAR: 32 px, ImageNet: 224 px); got {image_size} px -> {size} px"
            + (IMAGENET_HINT if variant == "cifar" and image_size >= 160 else "")
        )
