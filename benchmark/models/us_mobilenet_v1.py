"""Universally slimmable MobileNet-V1 (Yu & Huang, ICCV 2019, "US-Nets") with a CIFAR stem.

Any width w in [w_min, w_max] runs: every layer uses the prefix slice of one set of weights,
`weight[:c_out(w), :c_in(w)]`, with c(w) = make_divisible(c * width_mult * w, divisor) (the
reference `USConv2d`/`USLinear` round to a divisor of 8 the same way). BatchNorm is one layer per
position with *shared* affine parameters sliced to the active channels (the reference
`USBatchNorm2d`) and no per-width parameters. Its running statistics are not meaningful for any
single width after training (every width updates the same buffers), so every width is evaluated
after BN recalibration (`benchmark.training.bn_calib`); the reference instead keeps private running
statistics for its listed test widths while training and calibrates the others. Our choice:
recalibrate every evaluated width, listed or not, so fixed and spectrum widths are measured alike.

Sub-models (what every method sees) are the fixed evaluation widths `widths`; `forward_width`
runs any width of the range (the sandwich rule's random widths and the width spectrum), declared
as `caps.widths` (a `WidthRange`) with `caps.bn_recalibration`. The trunk is fully convolutional
with global average pooling, so any input size runs; `caps.resolutions` declares its total
stride (16 with the CIFAR stem, 32 with `stem_stride=2`) and the resolutions of
`arch.resolutions` ([] by default: off; `auto` or a list, `benchmark.models.base.resolution_axis`)
at which every width is also evaluated (MutualNet's width x resolution sub-models).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError
from benchmark.models import register_arch
from benchmark.models.base import (
    Capabilities,
    FlexibleModel,
    ResolutionAxis,
    SubModel,
    WidthRange,
    resolution_axis,
)
from benchmark.models.slimmable_mobilenet_v1 import (
    STAGES,
    make_divisible,
    reset_parameters,
    stage_features,
)
from benchmark.models.syncbn import batch_norm


class _USLayer:
    """Mixin: the layer's channels at the active width `width` (set by the model)."""

    width: float = 1.0
    divisor: int = 8

    def channels(self, base: float, full: int) -> int:
        """make_divisible(base x width), never more than the allocated `full` channels."""
        return min(full, make_divisible(base * self.width, self.divisor))


class USConv2d(nn.Conv2d, _USLayer):
    """Conv running the prefix slice of its weights for the active width. `base_in/base_out`
    are the channels at width 1.0 before rounding (None: that side does not slim, e.g. RGB)."""

    def __init__(self, c_in, c_out, base_in, base_out, kernel, stride, depthwise=False):
        super().__init__(
            c_in, c_out, kernel, stride, kernel // 2, groups=c_in if depthwise else 1, bias=False
        )
        self.base_in, self.base_out, self.depthwise = base_in, base_out, depthwise

    def active_channels(self) -> tuple[int, int]:
        c_in = (
            self.in_channels
            if self.base_in is None
            else self.channels(self.base_in, self.in_channels)
        )
        c_out = self.channels(self.base_out, self.out_channels)
        return (c_out, c_out) if self.depthwise else (c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        c_in, c_out = self.active_channels()
        groups = c_in if self.depthwise else 1
        weight = self.weight[:c_out, : c_in // groups]
        return F.conv2d(x, weight, None, self.stride, self.padding, 1, groups)

    def active_num_params(self) -> int:
        c_in, c_out = self.active_channels()
        k = self.kernel_size[0] * self.kernel_size[1]
        return c_out * (1 if self.depthwise else c_in) * k


class USLinear(nn.Linear, _USLayer):
    def __init__(self, c_in: int, base_in: float, num_classes: int):
        super().__init__(c_in, num_classes)
        self.base_in = base_in

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)

    def active_num_params(self) -> int:
        return self.channels(self.base_in, self.in_features) * self.out_features + self.out_features


class USBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of shared affine parameters and running statistics
    (C = the input's channels). Training uses batch statistics; with `momentum=None` the running
    statistics are the cumulative average (what BN recalibration uses), as in nn.BatchNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        return batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training,
            factor,
            self.eps,
        )


def _dw_separable(c_in, c_out, b_in, b_out, stride) -> list[nn.Module]:
    return [
        USConv2d(c_in, c_in, b_in, b_in, 3, stride, depthwise=True),
        USBatchNorm2d(c_in),
        nn.ReLU6(inplace=True),
        USConv2d(c_in, c_out, b_in, b_out, 1, 1),
        USBatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    ]


class USMobileNetV1(FlexibleModel):
    """Sub-model k = evaluation width `widths[k]`; `forward_width` runs any width of
    `caps.widths`; evaluation recalibrates BN per width (`caps.bn_recalibration`)."""

    def __init__(
        self,
        num_classes,
        widths,
        width_range,
        width_mult,
        stage_blocks,
        stem_stride,
        divisor,
        spectrum_step=0.0,
        resolutions: ResolutionAxis | None = None,
    ):
        super().__init__()
        self.widths = list(widths)
        lo, w_max = width_range
        res = resolutions or ResolutionAxis(stem_stride * math.prod(s for _, _, s in STAGES))
        self.caps = Capabilities(
            ("width", "resolution") if res.on else ("width",), bn_recalibration=True,
            widths=WidthRange(lo, w_max, tuple(self.widths), spectrum_step), resolutions=res,
        )  # fmt: skip

        def alloc(c: int) -> tuple[int, float]:  # allocated channels, base (width 1.0)
            base = c * width_mult
            return make_divisible(base * w_max, divisor), base

        layers: list[nn.Module] = []
        self.stage_ends: list[int] = []
        c_in, b_in = alloc(32)
        layers += [
            USConv2d(3, c_in, None, b_in, 3, stem_stride),
            USBatchNorm2d(c_in),
            nn.ReLU6(True),
        ]
        for (c, _, s), n in zip(STAGES, stage_blocks):
            c_out, b_out = alloc(c)
            if s == 2:
                self.stage_ends.append(len(layers) - 1)
            for i in range(n):
                layers += _dw_separable(c_in, c_out, b_in, b_out, s if i == 0 else 1)
                c_in, b_in = c_out, b_out
        self.features = nn.Sequential(*layers)
        self.classifier = USLinear(c_in, b_in, num_classes)
        self.us_layers = [m for m in self.modules() if isinstance(m, _USLayer)]
        for m in self.us_layers:
            m.divisor = divisor
        self.submodels = [SubModel(i, f"w{w}") for i, w in enumerate(self.widths)]
        reset_parameters(self)

    def set_width(self, w: float) -> None:
        """Make every layer run width w; raises ValueError outside `caps.widths`."""
        rng = self.caps.widths
        if not rng.contains(w):
            raise ValueError(f"width {w} is outside the network's range [{rng.low}, {rng.high}]")
        for m in self.us_layers:
            m.width = w

    def forward_width(self, x: Tensor, w: float) -> Tensor:
        """Logits (N, num_classes) of width w (any value in `caps.widths`)."""
        return self._run(x, w)

    def _run(self, x: Tensor, w: float) -> Tensor:
        self.set_width(w)
        return self.classifier(self.features(x).mean((2, 3)))

    def forward_width_features(self, x: Tensor, w: float) -> tuple[Tensor, list[Tensor]]:
        """Logits of width w and its stage features (see FlexibleModel.forward_sub_features)."""
        self.set_width(w)
        x, feats = stage_features(self.features, self.stage_ends, x)
        return self.classifier(x.mean((2, 3))), feats

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, self.widths[k])

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self.forward_width_features(x, self.widths[k])


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _validate(p: dict) -> tuple[list[float], tuple[float, float]]:
    rng = p["width_range"]
    if not isinstance(rng, (list, tuple)) or len(rng) != 2:
        raise ConfigError(f"width_range must be [w_min, w_max], got {rng!r}")
    lo, hi = (_number(v, "width_range") for v in rng)
    if not 0 < lo < hi:
        raise ConfigError(f"width_range must satisfy 0 < w_min < w_max, got {rng!r}")
    widths = p["widths"]
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ConfigError(f"widths must be a non-empty list of numbers, got {widths!r}")
    widths = [_number(w, "widths") for w in widths]
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"widths must be strictly increasing (smallest first), got {widths}")
    outside = [w for w in widths if not lo <= w <= hi]
    if outside:
        raise ConfigError(
            f"widths {outside} are outside the network's range width_range=[{lo}, {hi}]; "
            f"valid evaluation widths are in [{lo}, {hi}]"
        )
    step = _number(p["spectrum_step"], "spectrum_step")
    if not 0 <= step <= hi - lo:
        raise ConfigError(
            f"spectrum_step must be in [0, {hi - lo:g}] (0: no spectrum), "
            f"got {p['spectrum_step']!r}"
        )
    if p["divisor"] not in (1, 2, 4, 8, 16):
        raise ConfigError(f"divisor must be one of 1, 2, 4, 8, 16, got {p['divisor']!r}")
    return widths, (lo, hi)


@register_arch(
    "us_mobilenet_v1",
    defaults={
        "widths": [0.25, 0.5, 0.75, 1.0],
        "width_range": [0.25, 1.0],
        "spectrum_step": 0.05,
        "divisor": 8,
        "width_mult": 1.0,
        "stage_blocks": [1, 2, 2, 6, 2],
        "stem_stride": 1,
        # input resolutions every width is also evaluated at: [] (off), auto, or a list
        "resolutions": [],
    },
    profiles={
        "smoke": {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1], "spectrum_step": 0.25},
        "mini": {"width_mult": 0.5, "stage_blocks": [1, 1, 1, 2, 1]},
        "imagenet": {"stem_stride": 2},
    },
    train={
        "smoke": {"bn_calib_batches": 2},
        "mini": {"bn_calib_batches": 10},
        "paper": {"bn_calib_batches": 20},
        # US-MobileNet-V1 on ImageNet (JiahuiYu/slimmable_networks
        # apps/us_mobilenet_v1_train_val.yml, its override settings): 250 epochs, batch 1024
        # (8 GPUs), SGD lr 0.5 nesterov, momentum 0.9, wd 1e-4, linear decay to 0 per step
        # (linear_decaying), no warm-up or label smoothing (soft_target is the inplace
        # distillation of the sandwich method); BN calibrated on bn_cal_batch_num 5 batches.
        "imagenet": {
            "epochs": 250,
            "batch_size": 1024,
            "lr": 0.5,
            "nesterov": True,
            "weight_decay": 1e-4,
            "schedule": "linear",
            "bn_calib_batches": 5,
        },
    },
    description="Universally slimmable MobileNet-V1 (CIFAR stem): any width, shared BN, "
    "BN recalibration per evaluated width",
)
def build_us_mobilenet_v1(num_classes: int, image_size: int, **p) -> USMobileNetV1:
    widths, rng = _validate(p)
    if _number(p["width_mult"], "width_mult") <= 0:
        raise ConfigError(f"width_mult must be a positive number, got {p['width_mult']!r}")
    blocks = p["stage_blocks"]
    if (
        not isinstance(blocks, (list, tuple))
        or len(blocks) != len(STAGES)
        or any(not isinstance(b, int) or b < 1 for b in blocks)
    ):
        raise ConfigError(f"stage_blocks must be {len(STAGES)} integers >= 1, got {blocks!r}")
    if p["stem_stride"] not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, got {p['stem_stride']!r}")
    stride = p["stem_stride"] * math.prod(s for _, _, s in STAGES)  # total: stem x stages
    resolutions = resolution_axis(p["resolutions"], image_size, stride)
    return USMobileNetV1(
        num_classes,
        widths,
        rng,
        float(p["width_mult"]),
        list(blocks),
        p["stem_stride"],
        p["divisor"],
        float(p["spectrum_step"]),
        resolutions,
    )
