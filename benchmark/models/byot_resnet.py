"""Multi-exit ResNet of BYOT (Zhang et al., "Be Your Own Teacher", ICCV 2019), CIFAR or ImageNet.

A CIFAR ResNet-18 (basic blocks [2, 2, 2, 2]) or ResNet-50 (bottleneck blocks [3, 4, 6, 3]):
3x3 stride-1 stem with 64 channels, no max-pool, four stages of 64/128/256/512 (x4 for
bottlenecks) channels with strides 1/2/2/2, 1x1-conv + BN projection shortcuts where the shape
changes, global average pool and one linear layer (He et al. 2016, in the CIFAR form the BYOT
reimplementations use). BYOT divides it into four sections and attaches an exit after each:
exit i = the trunk up to stage i plus its head; exit 4 is the plain network. All exits come
from one forward pass.

Shallow exit heads: BYOT describes a "bottleneck" layer before each shallow classifier whose
output has the size of the deepest feature (so that an L2 hint can compare them). The paper gives
no layer list; ours follows the unofficial code its results are usually reproduced with
(luanyunteng/pytorch-be-your-own-teacher, `branchBottleNeck`): 1x1 conv to C_K/4 channels, a
k x k conv with stride k (k = 2^(3-i), down to the deepest stage's resolution), 1x1 conv to C_K
(the deepest stage's channels), each followed by BN and ReLU, then global average pooling and a
linear layer. Our choice: no bias in those convs (BN follows). The pooled (B, C_K, 1, 1) output
is the exit feature; the deepest exit's is the pooled last-stage output.

`variant: imagenet` (the imagenet profile): the same network with torchvision's ImageNet stem
(7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool; `imagenet_resnet.py`) instead of the 3x3
stride-1 one, so the stages run at 56/28/14/7 px of a 224 px image and the heads keep their
construction (k = 8/4/2). Exit 4 is then exactly torchvision's resnet18 / resnet50 (1.81 / 4.09
GMACs, 11.69 / 25.56 M parameters at 1000 classes).

Costs: exit i's anytime cost is the trunk up to stage i plus every head up to i (MSDNet's
convention); `forward_sub(x, 4)` alone is exactly a plain CIFAR ResNet (no shallow head runs).

`cascade` (Zero-Time-Waste, Wojcik et al., NeurIPS 2021): exit i also reads exit i-1's detached
logits (`benchmark.models.base.CascadeLinks`); then every exit needs the heads before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, EarlyExitModel, ExitOutput, SubModel
from benchmark.models.imagenet_resnet import MIN_IMAGENET_SIZE, check_variant, imagenet_stem

STAGE_WIDTHS = (64, 128, 256, 512)
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, pad: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False), nn.BatchNorm2d(c_out)
    )


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(c_in, planes, 3, stride, 1)
        self.conv2 = _conv_bn(planes, planes, 3, 1, 1)
        out = planes * self.expansion
        self.shortcut = (
            _conv_bn(c_in, out, 1, stride, 0) if stride != 1 or c_in != out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv_bn(c_in, planes, 1, 1, 0)
        self.conv2 = _conv_bn(planes, planes, 3, stride, 1)
        self.conv3 = _conv_bn(planes, out, 1, 1, 0)
        self.shortcut = (
            _conv_bn(c_in, out, 1, stride, 0) if stride != 1 or c_in != out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(y) + self.shortcut(x))


class _ShallowHead(nn.Module):
    """BYOT shallow exit: bottleneck (1x1 -> k x k stride k -> 1x1, BN + ReLU each) to the
    deepest feature's shape, global average pool, linear."""

    def __init__(self, c_in: int, c_deep: int, stride: int, num_classes: int):
        super().__init__()
        mid = max(1, c_deep // 4)
        layers = []
        for a, b, k in ((c_in, mid, 1), (mid, mid, stride), (mid, c_deep, 1)):
            layers += [*_conv_bn(a, b, k, k, 0), nn.ReLU(inplace=True)]
        self.bottleneck = nn.Sequential(*layers)
        self.linear = nn.Linear(c_deep, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C_i, H_i, W_i) -> logits (B, classes), exit feature (B, C_K, 1, 1)."""
        feat = F.adaptive_avg_pool2d(self.bottleneck(x), 1)
        return self.linear(feat.flatten(1)), feat


class _FinalHead(nn.Module):
    """The plain ResNet's classifier: global average pool, linear."""

    def __init__(self, c_deep: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(c_deep, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = F.adaptive_avg_pool2d(x, 1)
        return self.linear(feat.flatten(1)), feat


class ByotResNet(EarlyExitModel):
    """BYOT (Zhang et al., ICCV 2019) ResNet-18/50 (CIFAR or ImageNet stem) with an exit after
    each of the four stages; see `_walk` for what each exit reads (and `cascade`, the module
    docstring). Exits can be stopped at (`forward_exits`, real early exiting)."""

    caps: Capabilities = replace(EarlyExitModel.caps, stops_at_exit=True, cascade=True)

    def __init__(
        self, num_classes: int, depth: int, width: float, variant: str = "cifar",
        cascade: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        kind, blocks = DEPTHS[depth]
        block = _Basic if kind == "basic" else _Bottleneck
        widths = [max(1, round(c * width)) for c in STAGE_WIDTHS]
        if variant == "imagenet":
            self.stem = imagenet_stem(widths[0], nn.BatchNorm2d(widths[0]))
        else:
            self.stem = nn.Sequential(*_conv_bn(3, widths[0], 3, 1, 1), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList()
        c_in, outs = widths[0], []
        for s, (planes, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(block(c_in, planes, 2 if s > 0 and j == 0 else 1))
                c_in = planes * block.expansion
            self.blocks.append(nn.Sequential(*stage))
            outs.append(c_in)
        deep = outs[-1]
        self.heads = nn.ModuleList(
            [_ShallowHead(outs[i], deep, 2 ** (3 - i), num_classes) for i in range(3)]
            + [_FinalHead(deep, num_classes)]
        )
        self.submodels = [SubModel(i, f"exit{i + 1}") for i in range(4)]
        self.init_cascade(cascade, num_classes)
        for m in self.modules():  # He-normal convs, unit BN (torchvision and the BYOT code)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _walk(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> Iterator[tuple[int, ExitOutput]]:
        """Stages 0..upto and the heads in `heads`, each head's output yielded right after its
        stage. Features of exit i: [its pooled exit feature (B, C_K, 1, 1), stage 0 output,
        ..., stage i output]."""
        h, stages = self.stem(x), []
        for i in range(upto + 1):
            h = self.blocks[i](h)
            stages.append(h)
            if i in heads:
                z, feat = self.heads[i](h)
                yield i, ((z, [feat, *stages]) if features else z)


@register_arch(
    "byot_resnet",
    defaults={"depth": 18, "width": 1.0, "variant": "cifar", "cascade": False},
    description="BYOT multi-exit ResNet-18/50 (CIFAR or ImageNet stem): an exit after each of "
    "the 4 stages",
    profiles={
        "smoke": {"width": 0.0625},
        "mini": {"width": 0.125},
        "imagenet": {"variant": "imagenet"},
    },
    # channels_last crashed natively (segfault / double free in backward) on torch 2.14.1's CPU
    # kernels at the smoke width (4..32 channels); NCHW trains it.
    memory_format="contiguous",
    # BYOT's CIFAR schedule as in the unofficial code whose ResNet-18 per-exit numbers match the
    # paper (luanyunteng/pytorch-be-your-own-teacher, train.py): 200 epochs, batch 128, SGD 0.1,
    # momentum 0.9, wd 5e-4, lr x0.1 at epochs 75, 130 and 180.
    train={
        "paper": {
            "epochs": 200,
            "batch_size": 128,
            "weight_decay": 5e-4,
            "milestones": [0.375, 0.65, 0.9],
        },
        # ImageNet: no BYOT ImageNet schedule was read (research/papers.md has none), so the
        # imagenet profile's torchvision reference recipe applies.
    },
)
def build_byot_resnet(num_classes: int, image_size: int, **p) -> ByotResNet:
    if p["depth"] not in DEPTHS or isinstance(p["depth"], bool):
        raise ConfigError(
            f"byot_resnet depth must be one of {', '.join(map(str, DEPTHS))}, got {p['depth']!r}"
        )
    width = p["width"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"byot_resnet width must be a positive number, got {width!r}")
    variant = check_variant("byot_resnet", p["variant"], image_size, MIN_IMAGENET_SIZE)
    stride = 8 if variant == "cifar" else 32  # three stride-2 stages (and the ImageNet stem's 4)
    if image_size < stride or image_size % stride:
        raise ConfigError(
            f"byot_resnet variant {variant} needs an image size divisible by {stride} (total "
            f"stride of its stages), got {image_size}"
        )
    if not isinstance(p["cascade"], bool):
        raise ConfigError(f"byot_resnet cascade must be true or false, got {p['cascade']!r}")
    return ByotResNet(num_classes, p["depth"], float(width), variant, p["cascade"])
