"""Depth-level dynamic ResNet (DDNN, Lyu/Zhao et al. 2021) for CIFAR and ImageNet.

One CIFAR ResNet (He et al. 2016: 3 stages of basic blocks with 16/32/64 channels, option-A
parameter-free shortcuts) whose sub-nets of different depth share one set of weights. Sub-net k
runs the first `depths[k]` blocks of every stage (depth 6n+2 for n blocks per stage, so the
default depths [3, 5, 7, 9] are ResNet-20/32/44/56 inside one ResNet-56; names `d20`..`d56`).

From the paper (abstract): different-depth sub-nets of similar architecture share one set of
weights and all are trained in every iteration. Our choices (the paper's are not published):
which blocks a sub-net keeps (the first n of each stage, so the stride-2 first block of a stage is
always kept), and private BatchNorm per sub-net (`private_bn`, default true: a block's input
statistics depend on how many blocks ran before it; `false` shares BN across depths).

`variant: imagenet` (research/papers.md §5): the paper's abstract names "different-depth sub-nets
of similar architectures (e.g. ResNet-18/34/50) using one set of shared weights"; which blocks a
sub-net keeps is not published. We keep the CIFAR network's rule, the first n_s blocks of every
stage s, in torchvision's ImageNet layout (`imagenet_resnet.py`: 7x7/2 stem + max-pool, stages of
64/128/256/512 planes, projection shortcuts, stride on a bottleneck's 3x3 conv). `depths` is then
one list of four blocks-per-stage per sub-net, nested (no stage shrinks from one sub-net to the
next), and `block` is basic (2 convs, depth 2 + 2 sum(n)) or bottleneck (3 convs, 2 + 3 sum(n)):
- the imagenet profile: a basic ResNet-34 [3, 4, 6, 3] holding ResNet-18 [2, 2, 2, 2] and a
  ResNet-26 [2, 3, 4, 3] (d18 / d26 / d34), i.e. ResNet-18 and -34 as one network;
- `block: bottleneck`, depths [[2, 2, 2, 2], [3, 3, 3, 3], [3, 4, 6, 3]]: a ResNet-50 holding
  ResNet-26 / ResNet-38 style sub-nets (d26 / d38 / d50).
Full-depth costs equal torchvision's resnet18/34/50 (1.81 / 3.66 / 4.09 GMACs, 11.69 / 21.80 /
25.56 M parameters; tests/test_imagenet_archs.py).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel
from benchmark.models.cifar_resnet import STAGE_CHANNELS, option_a_shortcut
from benchmark.models.imagenet_resnet import (
    EXPANSION,
    MIN_IMAGENET_SIZE,
    STAGE_PLANES,
    check_variant,
    imagenet_stem,
)
from benchmark.models.switchable import Switch, SwitchableBatchNorm2d, set_active


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, n_bn: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = SwitchableBatchNorm2d([c_out] * n_bn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = SwitchableBatchNorm2d([c_out] * n_bn)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + option_a_shortcut(x, self.stride, self.pad))


def _conv_sbn(c_in: int, c_out: int, kernel: int, stride: int, n_bn: int) -> nn.Sequential:
    """Conv (no bias) and a private BatchNorm per sub-net."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(conv, SwitchableBatchNorm2d([c_out] * n_bn))


class _ImageNetBlock(nn.Module):
    """torchvision's BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1 to 4x
    planes), projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, kind: str, c_in: int, planes: int, stride: int, n_bn: int):
        super().__init__()
        out = planes * EXPANSION[kind]
        if kind == "basic":
            specs = [(c_in, planes, 3, stride), (planes, planes, 3, 1)]
        else:
            specs = [(c_in, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, 1)]
        self.convs = nn.ModuleList(_conv_sbn(*spec, n_bn) for spec in specs)
        proj = stride != 1 or c_in != out
        self.shortcut = _conv_sbn(c_in, out, 1, stride, n_bn) if proj else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # in place, as torchvision's blocks: BN's backward reads its input, not its output
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y) if i == len(self.convs) - 1 else F.relu(conv(y), inplace=True)
        y += self.shortcut(x)
        return F.relu(y, inplace=True)


class DDNNResNet(FlexibleModel):
    caps = Capabilities(("depth",))

    def __init__(
        self, num_classes: int, depths: list, width: float, private_bn: bool, block: str | None
    ) -> None:
        """`block` None: the CIFAR network (`depths`: ints, blocks per stage of each sub-net);
        basic / bottleneck: the ImageNet one (`depths`: per sub-net, blocks of each of 4 stages)."""
        super().__init__()
        self.private_bn, self.imagenet = private_bn, block is not None
        n_bn = len(depths) if private_bn else 1
        if block is None:
            self.depths = [[d] * len(STAGE_CHANNELS) for d in depths]
            c_in = self._cifar_stages(width, n_bn)
            names = [f"d{6 * d + 2}" for d in depths]
        else:
            self.depths = [list(d) for d in depths]
            c_in = self._imagenet_stages(block, width, n_bn)
            per_block = 2 if block == "basic" else 3
            names = [f"d{2 + per_block * sum(d)}" for d in depths]
        self.linear = nn.Linear(c_in, num_classes)
        self.switches = [m for m in self.modules() if isinstance(m, Switch)]
        self.submodels = [SubModel(i, name) for i, name in enumerate(names)]
        for m in self.modules():  # He-normal convs, as in common CIFAR ResNet code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _cifar_stages(self, width: float, n_bn: int) -> int:
        """3x3 stem and three stages of option-A basic blocks; returns the last width."""
        chans = [max(1, round(c * width)) for c in STAGE_CHANNELS]
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = SwitchableBatchNorm2d([chans[0]] * n_bn)
        c_in, n = chans[0], self.depths[-1][0]
        self.stages = nn.ModuleList()
        for s, c in enumerate(chans):
            blocks = [
                _Block(c_in if i == 0 else c, c, 2 if s > 0 and i == 0 else 1, n_bn)
                for i in range(n)
            ]
            self.stages.append(nn.ModuleList(blocks))
            c_in = c
        return c_in

    def _imagenet_stages(self, block: str, width: float, n_bn: int) -> int:
        """torchvision's stem and four stages of the full depth; returns the last width."""
        planes = [max(1, round(c * width)) for c in STAGE_PLANES]
        self.stem = imagenet_stem(planes[0], SwitchableBatchNorm2d([planes[0]] * n_bn))
        c_in = planes[0]
        self.stages = nn.ModuleList()
        for s, (p, n) in enumerate(zip(planes, self.depths[-1])):
            blocks = []
            for i in range(n):
                blocks.append(_ImageNetBlock(block, c_in, p, 2 if s > 0 and i == 0 else 1, n_bn))
                c_in = p * EXPANSION[block]
            self.stages.append(nn.ModuleList(blocks))
        return c_in

    def _run(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        set_active(self.switches, k if self.private_bn else 0)
        x = self.stem(x) if self.imagenet else F.relu(self.bn1(self.conv1(x)))
        feats = []
        for stage, n in zip(self.stages, self.depths[k]):
            for block in stage[:n]:
                x = block(x)
            feats.append(x)
        return self.linear(x.mean((2, 3))), feats

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k)[0]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self._run(x, k)


# The imagenet profile: ResNet-34 holding ResNet-26 and ResNet-18 (module docstring).
IMAGENET_DEPTHS = [[2, 2, 2, 2], [2, 3, 4, 3], [3, 4, 6, 3]]
BLOCKS = ("basic", "bottleneck")


@register_arch(
    "ddnn_resnet",
    defaults={
        "depths": [3, 5, 7, 9],
        "width": 1.0,
        "private_bn": True,
        "variant": "cifar",
        "block": "basic",
    },
    profiles={
        "smoke": {"depths": [1, 2], "width": 0.25},
        "mini": {"depths": [1, 2, 3], "width": 0.5},
        "imagenet": {"variant": "imagenet", "block": "basic", "depths": IMAGENET_DEPTHS},
    },
    # ImageNet schedule: the imagenet profile's (torchvision's reference recipe); EKD publishes
    # none (research/papers.md §5).
    description="depth-dynamic ResNet (CIFAR, or torchvision's ImageNet layout): sub-nets = "
    "first n blocks per stage, shared weights",
)
def build_ddnn_resnet(num_classes: int, image_size: int, **p) -> DDNNResNet:
    variant = check_variant("ddnn_resnet", p["variant"], image_size, MIN_IMAGENET_SIZE)
    check = _cifar_depths if variant == "cifar" else _imagenet_depths
    depths = check(p["depths"])
    if p["block"] not in BLOCKS:
        raise ConfigError(
            f"ddnn_resnet block must be one of {', '.join(BLOCKS)}, {got(p['block'])}"
        )
    if variant == "cifar" and p["block"] != "basic":
        raise ConfigError(
            f"ddnn_resnet variant cifar has basic blocks (He et al.'s CIFAR ResNet); block "
            f"bottleneck needs variant imagenet, {got(p['block'])}"
        )
    if isinstance(p["width"], bool) or not isinstance(p["width"], (int, float)) or p["width"] <= 0:
        raise ConfigError(f"ddnn_resnet width must be a positive number, {got(p['width'])}")
    if not isinstance(p["private_bn"], bool):
        raise ConfigError(f"ddnn_resnet private_bn must be true or false, {got(p['private_bn'])}")
    block = p["block"] if variant == "imagenet" else None
    return DDNNResNet(num_classes, depths, float(p["width"]), p["private_bn"], block)


def _is_count(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 1


def _cifar_depths(depths: object) -> list[int]:
    if (
        not isinstance(depths, (list, tuple))
        or not depths
        or not all(_is_count(d) for d in depths)
        or any(b <= a for a, b in zip(depths, depths[1:]))
    ):
        raise ConfigError(
            f"ddnn_resnet depths must be strictly increasing integers >= 1 (blocks per stage of "
            f"each sub-net, smallest first), {got(depths)}"
        )
    return list(depths)


def _imagenet_depths(depths: object) -> list[list[int]]:
    ok = (
        isinstance(depths, (list, tuple))
        and depths
        and all(
            isinstance(d, (list, tuple)) and len(d) == 4 and all(_is_count(n) for n in d)
            for d in depths
        )
    )
    nested = ok and all(
        all(x <= y for x, y in zip(a, b)) and sum(a) < sum(b) for a, b in zip(depths, depths[1:])
    )
    if not nested:
        raise ConfigError(
            "ddnn_resnet variant imagenet: depths must be one list of 4 blocks-per-stage "
            "(integers >= 1) per sub-net, smallest first, no stage shrinking and the total "
            f"growing from one sub-net to the next (e.g. {IMAGENET_DEPTHS}), {got(depths)}"
        )
    return [list(d) for d in depths]
