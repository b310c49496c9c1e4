"""Bit-width-switchable ResNet (CIFAR or ImageNet): one set of weights, one sub-model per bit-width.

Network: the CIFAR ResNet of He et al. 2016 (§4.2): a 3x3 stem conv, three stages of n BasicBlocks
(16/32/64 channels x `width`, depth = 6n + 2, the first block of stages 2 and 3 has stride 2),
global average pooling and a linear classifier; shortcuts are option A (parameter-free: subsample
by the stride, zero-pad the new channels, half before and half after; with a `width` that makes
the padding odd, the extra channel goes after).

Sub-model `b<k>` runs every quantized conv with k-bit weights and k-bit activations (the same bits
for both, as in Any-Precision DNN). The quantizer is DoReFa-Net's (Zhou et al. 2016), with the
k-bit rules of the paper and of the DoReFa code family (tensorpack, pytorch_DoReFaNet,
Any-Precision DNN):
    q_k(x) = round(x * (2^k - 1)) / (2^k - 1), straight-through estimator for round;
    weights     w_q = 2 q_k(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1  (max over the whole tensor);
    activations a_q = q_k(clamp(a, 0, 1))  (gradient 1 inside [0, 1], 0 outside, by the clamp);
at 32 bits weights and activations are used as they are (identity). The gradient also flows
through max|tanh(w)| (as in tensorpack and Any-Precision; pytorch_DoReFaNet detaches it and
rescales w_q by it, a scale the BatchNorm after every conv removes). The k-bit formulas are used at
1 bit too (weights +-1, activations {0, 1}); DoReFa's separate 1-bit weight rule (sign(w) times
mean|w|) differs only in scale and at w = 0.
Which layers are quantized: every conv except the stem (first) conv, and the classifier stays
full precision ("first and last layers at full precision", as in CMT-KD and most low-bit work).
The activation quantized is the input of each quantized conv; the shortcut path and the residual
sum stay full precision (our choice; the clamp to [0, 1] acts as the conv input's activation
function at low bits, as in DoReFa-Net, where it replaces ReLU).
Every BatchNorm, the stem's included, is private per bit-width (SwitchableBatchNorm2d): the
statistics of a 2-bit network differ from a 32-bit one, and the stem BN's affine sets the range
that reaches the first clamp.

`variant: imagenet` (the imagenet profile; CMT-KD's ImageNet setting, research/papers.md §7, is a
low-bit ResNet-18): torchvision's ResNet-18 (`imagenet_resnet.py`; depth 18 or 34 = basic blocks
[2, 2, 2, 2] / [3, 4, 6, 3]) with the same rules: the 7x7 stem conv and the classifier at full
precision, every 3x3 conv quantized, private BN per bit-width; the projection shortcuts (1x1 conv +
BN where the shape changes) stay full precision like the CIFAR shortcut path. Every sub-model runs
ResNet-18's 1.81 GMACs; the bit-widths differ in `gbitops`.

Differences from Any-Precision DNN's code (SHI-Labs, the reference for switchable bit-widths):
it uses a pre-activation ResNet-20 with 5x channels and 1x1-conv shortcuts, scales quantized
weights by mean|w|, and normalises weights by max|tanh(w)| also at 32 bits; we keep He et al.'s
post-activation ResNet with option-A shortcuts so that depth/width knobs match the paper, and
use 32 bits as plain full precision. Initialisation (our choice): He-normal (fan_out) convs,
PyTorch's default linear layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel
from benchmark.models.cifar_resnet import STAGE_CHANNELS, option_a_shortcut
from benchmark.models.imagenet_resnet import (
    LAYOUTS,
    MIN_IMAGENET_SIZE,
    STAGE_PLANES,
    check_variant,
    imagenet_stem,
)
from benchmark.models.switchable import Switch, SwitchableBatchNorm2d, set_active

FULL_PRECISION = 32


def quantize_unit(x: Tensor, bits: int) -> Tensor:
    """q_k on [0, 1]: the nearest of 2^k evenly spaced levels; gradient passes unchanged (STE)."""
    n = 2**bits - 1
    scaled = x * n
    return (scaled + (scaled.round() - scaled).detach()) / n


def quantize_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa weights in [-1, 1] on the k-bit grid; identity at 32 bits."""
    if bits == FULL_PRECISION:
        return w
    t = w.tanh()
    return 2 * quantize_unit(t / (2 * t.abs().max()) + 0.5, bits) - 1


def quantize_activation(a: Tensor, bits: int) -> Tensor:
    """DoReFa activations: clamp to [0, 1], then k-bit levels; identity at 32 bits. Computed in
    at least float32 so that bf16 autocast does not blur the 8-bit grid."""
    if bits == FULL_PRECISION:
        return a
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return quantize_unit(a.clamp(0, 1), bits)


class QuantConv2d(nn.Conv2d, Switch):
    """3x3 conv (no bias) whose sub-model k quantizes its weights and its input to bits[k]."""

    def __init__(self, bits: list[int], c_in: int, c_out: int, stride: int):
        super().__init__(c_in, c_out, 3, stride, 1, bias=False)
        self.bits = list(bits)

    def active_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the active sub-model, for the bit-ops count."""
        b = self.bits[self.active]
        return b, b

    def forward(self, x: Tensor) -> Tensor:
        b = self.bits[self.active]
        w = quantize_weight(self.weight, b)
        return F.conv2d(quantize_activation(x, b), w, None, self.stride, self.padding)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + option-A shortcut, then ReLU (He et al. 2016)."""

    def __init__(self, bits: list[int], c_in: int, c_out: int, stride: int):
        super().__init__()
        k = len(bits)
        self.conv1 = QuantConv2d(bits, c_in, c_out, stride)
        self.bn1 = SwitchableBatchNorm2d([c_out] * k)
        self.conv2 = QuantConv2d(bits, c_out, c_out, 1)
        self.bn2 = SwitchableBatchNorm2d([c_out] * k)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))

    def skip(self, x: Tensor) -> Tensor:
        return option_a_shortcut(x, self.stride, self.pad)


class ImageNetBasicBlock(BasicBlock):
    """torchvision's BasicBlock with quantized 3x3 convs, private BN per bit-width and a
    full-precision projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, bits: list[int], c_in: int, c_out: int, stride: int):
        super().__init__(bits, c_in, c_out, stride)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            proj = nn.Conv2d(c_in, c_out, 1, stride, bias=False)  # full precision
            self.shortcut = nn.Sequential(proj, SwitchableBatchNorm2d([c_out] * len(bits)))

    def skip(self, x: Tensor) -> Tensor:
        return self.shortcut(x)


class SwitchablePrecisionResNet(FlexibleModel):
    caps = Capabilities(("bits",))

    def __init__(
        self, num_classes: int, bits: list[int], depth: int, width: float, variant: str = "cifar"
    ):
        super().__init__()
        self.bits, self.imagenet = list(bits), variant == "imagenet"
        k = len(bits)
        if self.imagenet:
            chans = [max(1, round(c * width)) for c in STAGE_PLANES]
            self.stem = imagenet_stem(chans[0], SwitchableBatchNorm2d([chans[0]] * k))
            block, counts = ImageNetBasicBlock, LAYOUTS[depth][1]
        else:
            chans = [max(1, round(c * width)) for c in STAGE_CHANNELS]
            self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)  # full precision
            self.bn1 = SwitchableBatchNorm2d([chans[0]] * k)
            block, counts = BasicBlock, [(depth - 2) // 6] * len(chans)
        stages, c_in = [], chans[0]
        for i, (c, n) in enumerate(zip(chans, counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(bits, c_in, c, 2 if i > 0 and j == 0 else 1))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c_in, num_classes)  # full precision
        self.switches = [m for m in self.modules() if isinstance(m, Switch)]
        self.submodels = [SubModel(i, f"b{b}") for i, b in enumerate(self.bits)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _run(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        set_active(self.switches, k)
        x = self.stem(x) if self.imagenet else F.relu(self.bn1(self.conv1(x)))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.fc(x.mean((2, 3))), feats

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k)[0]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits and the stage outputs (CIFAR: 32, 16, 8 px at 32 px input; ImageNet: 56, 28,
        14, 7 px at 224 px)."""
        return self._run(x, k)


def _validate_bits(bits) -> list[int]:
    ok = (
        isinstance(bits, (list, tuple))
        and bits
        and all(isinstance(b, int) and not isinstance(b, bool) for b in bits)
    )
    if not ok or any(not 1 <= b <= FULL_PRECISION for b in bits):
        raise ConfigError(
            f"bits must be a non-empty list of integers in 1..{FULL_PRECISION} "
            f"({FULL_PRECISION} = full precision), {got(bits)}"
        )
    if any(b <= a for a, b in zip(bits, bits[1:])):
        raise ConfigError(
            f"bits must be strictly increasing (smallest sub-model first), {got(bits)}"
        )
    return list(bits)


@register_arch(
    "switchable_precision_resnet",
    defaults={"bits": [2, 4, 8, 32], "depth": 20, "width": 1.0, "variant": "cifar"},
    profiles={
        "smoke": {"depth": 8, "width": 0.25},
        "mini": {"depth": 8, "width": 0.5},
        "imagenet": {"variant": "imagenet", "depth": 18},
    },
    # ImageNet schedule: CMT-KD's is not in research/papers.md (no code released), so the
    # imagenet profile's torchvision reference recipe applies.
    description="ResNet (He et al. CIFAR, or torchvision ImageNet-18/34) at switchable "
    "bit-widths: shared weights, DoReFa quantizer, private BN per bit-width, first conv and "
    "classifier full precision",
)
def build_switchable_precision_resnet(
    num_classes: int, image_size: int, **p
) -> SwitchablePrecisionResNet:
    bits = _validate_bits(p["bits"])
    depth, width = p["depth"], p["width"]
    variant = check_variant(
        "switchable_precision_resnet", p["variant"], image_size, MIN_IMAGENET_SIZE
    )
    if variant == "imagenet":
        basic = sorted(d for d, (kind, _) in LAYOUTS.items() if kind == "basic")
        if depth not in basic or isinstance(depth, bool):
            raise ConfigError(
                f"switchable_precision_resnet variant imagenet: depth must be one of "
                f"{', '.join(map(str, basic))} (torchvision's basic-block ResNets), {got(depth)}"
            )
    elif isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), {got(depth)}"
        )
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"width must be a positive number (channel multiplier), {got(width)}")
    return SwitchablePrecisionResNet(num_classes, bits, depth, float(width), variant)
