"""Slimmable MobileNet-V1 (Yu et al., ICLR 2019) with a CIFAR stem.

As in the reference slimmable networks: one set of conv/linear weights, each width uses the
prefix slice `weight[:out, :in]`, channels are `make_divisible(c * width)`, and every width has its
own (switchable) BatchNorm with private affine parameters and running statistics. The CIFAR stem
(our choice; the IPKD-TA paper's adaptation is unpublished) makes the first conv stride 1, so a
32x32 input ends at 2x2 (total stride 16) before global average pooling; with `stem_stride=2` and
224x224 inputs the network is the ImageNet model of the reference.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel
from benchmark.models.switchable import Switch, SwitchableBatchNorm2d, set_active

# (channels, blocks, stride) of MobileNet-V1 after the stem, as in the reference.
STAGES = [(64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2)]


def make_divisible(v: float, divisor: int = 8, min_value: int = 8) -> int:
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SlimConv2d(nn.Conv2d, Switch):
    """Conv whose width-k variant uses the first in_list[k]/out_list[k] channels."""

    def __init__(self, in_list, out_list, kernel, stride, depthwise=False):
        super().__init__(
            max(in_list),
            max(out_list),
            kernel,
            stride,
            kernel // 2,
            groups=max(in_list) if depthwise else 1,
            bias=False,
        )
        self.in_list, self.out_list, self.depthwise = list(in_list), list(out_list), depthwise

    def forward(self, x: Tensor) -> Tensor:
        c_in, c_out = self.in_list[self.active], self.out_list[self.active]
        groups = c_in if self.depthwise else 1
        weight = self.weight[:c_out, : c_in // groups]
        return F.conv2d(x, weight, None, self.stride, self.padding, 1, groups)

    def active_num_params(self) -> int:
        c_in, c_out = self.in_list[self.active], self.out_list[self.active]
        k = self.kernel_size[0] * self.kernel_size[1]
        return c_out * (1 if self.depthwise else c_in) * k


class SlimLinear(nn.Linear, Switch):
    def __init__(self, in_list, num_classes):
        super().__init__(max(in_list), num_classes)
        self.in_list = list(in_list)

    def forward(self, x: Tensor) -> Tensor:
        c_in = self.in_list[self.active]
        return F.linear(x, self.weight[:, :c_in], self.bias)

    def active_num_params(self) -> int:
        return self.in_list[self.active] * self.out_features + self.out_features


def _dw_separable(in_list, out_list, stride) -> list[nn.Module]:
    return [
        SlimConv2d(in_list, in_list, 3, stride, depthwise=True),
        SwitchableBatchNorm2d(in_list),
        nn.ReLU6(inplace=True),
        SlimConv2d(in_list, out_list, 1, 1),
        SwitchableBatchNorm2d(out_list),
        nn.ReLU6(inplace=True),
    ]


class SlimmableMobileNetV1(FlexibleModel):
    caps = Capabilities(("width",))

    def __init__(self, num_classes, widths, width_mult, stage_blocks, stem_stride):
        super().__init__()
        self.widths = list(widths)

        def chans(c: int) -> list[int]:
            return [make_divisible(c * w * width_mult) for w in self.widths]

        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index in `features` after which the resolution drops
        c_in = chans(32)
        layers += [
            SlimConv2d([3] * len(widths), c_in, 3, stem_stride),
            SwitchableBatchNorm2d(c_in),
            nn.ReLU6(inplace=True),
        ]
        for (c, _, s), n in zip(STAGES, stage_blocks):
            c_out = chans(c)
            if s == 2 and layers:
                self.stage_ends.append(len(layers) - 1)
            for i in range(n):
                layers += _dw_separable(c_in, c_out, s if i == 0 else 1)
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = SlimLinear(c_in, num_classes)
        self.channels = c_in
        self.switches = [m for m in self.modules() if isinstance(m, Switch)]
        self.submodels = [SubModel(i, f"w{w}") for i, w in enumerate(self.widths)]
        reset_parameters(self)

    def set_width(self, k: int) -> None:
        set_active(self.switches, k)

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        self.set_width(k)
        return self.classifier(self.features(x).mean((2, 3)))

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        self.set_width(k)
        x, feats = stage_features(self.features, self.stage_ends, x)
        return self.classifier(x.mean((2, 3))), feats


def reset_parameters(model: nn.Module) -> None:
    """The reference initialisation of MobileNet-V1 (slimmable_networks' `models/
    s_mobilenet_v1.py`): He-normal convs (fan-out), N(0, 0.01) classifier, zero bias, BN (1, 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, (2.0 / n) ** 0.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def stage_features(
    features: nn.Sequential, stage_ends: list[int], x: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Run the body on x (N, 3, H, W); return its output (N, C, h, w) and the feature maps at
    the end of each stride stage (before each downsampling) plus the output."""
    feats = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in stage_ends:
            feats.append(x)
    feats.append(x)
    return x, feats


def _validate_widths(widths) -> list[float]:
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ConfigError(f"widths must be a non-empty list of numbers, {got(widths)}")
    if any(not isinstance(w, (int, float)) or w <= 0 for w in widths):
        raise ConfigError(f"widths must be positive numbers, {got(widths)}")
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(
            f"widths must be strictly increasing (smallest sub-model first), {got(widths)}"
        )
    return [float(w) for w in widths]


@register_arch(
    "slimmable_mobilenet_v1",
    defaults={
        "widths": [0.25, 0.5, 0.75, 1.0],
        "width_mult": 1.0,
        "stage_blocks": [1, 2, 2, 6, 2],
        "stem_stride": 1,
    },
    profiles={
        "smoke": {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1]},
        "mini": {"width_mult": 0.5, "stage_blocks": [1, 1, 1, 2, 1]},
        "imagenet": {"stem_stride": 2},  # 41 / 149 / 325 / 569 MMACs at widths 0.25..1.0
    },
    # S-MobileNet-V1 on ImageNet (JiahuiYu/slimmable_networks apps/s_mobilenet_v1_train_val.yml,
    # its override settings): 480 epochs, batch 160, SGD lr 0.045 nesterov, momentum 0.9, wd 1e-4,
    # lr x0.98 every epoch (exp_decaying); no warm-up, no label smoothing.
    train={
        "imagenet": {
            "epochs": 480,
            "batch_size": 160,
            "lr": 0.045,
            "nesterov": True,
            "weight_decay": 1e-4,
            "schedule": "exp",
            "gamma": 0.98,
        }
    },
    description="Slimmable MobileNet-V1 (CIFAR stem, or ImageNet's with stem_stride 2): one "
    "forward per width, switchable BN",
)
def build_slimmable_mobilenet_v1(num_classes: int, image_size: int, **p) -> SlimmableMobileNetV1:
    widths = _validate_widths(p["widths"])
    if not isinstance(p["width_mult"], (int, float)) or p["width_mult"] <= 0:
        raise ConfigError(f"width_mult must be a positive number, {got(p['width_mult'])}")
    blocks = p["stage_blocks"]
    if (
        not isinstance(blocks, (list, tuple))
        or len(blocks) != len(STAGES)
        or any(not isinstance(b, int) or b < 1 for b in blocks)
    ):
        raise ConfigError(f"stage_blocks must be {len(STAGES)} integers >= 1, {got(blocks)}")
    if p["stem_stride"] not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, {got(p['stem_stride'])}")
    return SlimmableMobileNetV1(
        num_classes, widths, float(p["width_mult"]), list(blocks), p["stem_stride"]
    )
