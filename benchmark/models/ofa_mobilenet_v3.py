"""ofa_mobilenet_v3: an elastic MobileNetV3 (Once-for-All, Cai et al., ICLR 2020) for CIFAR.

The network of mit-han-lab/once-for-all `ofa/imagenet_classification/elastic_nn/networks/
ofa_mbv3.py` (`OFAMobileNetV3`), with the layers of `elastic_nn/modules/dynamic_layers.py`
(`DynamicMBConvLayer`) and `dynamic_op.py`: a stem conv (3x3, h-swish), a fixed first block
(depthwise 3x3 + pointwise, expand 1, ReLU), five stages of up to max(depths) inverted-residual
blocks (widths 24, 40, 80, 112, 160; ReLU, ReLU, h-swish, h-swish, h-swish; squeeze-excite in
stages 2, 4 and 5, as MobileNetV3-Large), a final 1x1 expand to 960 (BN, h-swish), global
average pooling, a 1x1 feature mix to 1280 (no BN, h-swish), dropout 0.1 and the classifier.
Every channel count is make_divisible(c x width_mult, 8). Each block is elastic in:

- kernel size k in `kernels` (3/5/7): one depthwise 7x7 weight per block; the 5x5 kernel is
  its centre 5x5 times a learned 25x25 matrix, the 3x3 kernel the centre 3x3 of that times a
  9x9 matrix (shared by the block's channels, identity at initialisation): OFA's kernel
  transformation (`DynamicSeparableConv2d`, KERNEL_TRANSFORM_MODE 1), w_5 = crop_5(w_7) M_75^T,
  w_3 = crop_3(w_5) M_53^T per channel (flattened k x k filters);
- expand ratio e in `expands` (3/4/6): the first mid = make_divisible(round(c_in x e), 8)
  hidden channels of the expand conv, its BN, the depthwise conv, the SE (its reduced width
  make_divisible(mid // 4, 8)) and the projection's inputs;
- depth d in `depths` (2/3/4) per stage: the stage's first d blocks run (`runtime_depth`).

BatchNorm layers are shared by all sub-networks and sliced to the active channels (the
reference's `DynamicBatchNorm2d`), so every evaluated sub-network is recalibrated first
(`caps.bn_recalibration`), as the reference's validation resets BN statistics per sub-network
(`set_running_statistics`). Channel importance sorting (the reference's
`re_organize_middle_weights`, before each expand phase of progressive shrinking) is
`sort_channels`, called by `ofa_ps`.

Ours (OFA is ImageNet only): the CIFAR stem conv has stride 1 (reference 2) and the first
elastic stage stride 1 (reference 2): strides (stem, first block, stages) = 1, 1, [1, 2, 2, 1,
2], i.e. 32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4 px, total stride 8 (the reference's is 32); the
`imagenet` profile restores 2, 1, [2, 2, 2, 1, 2]. The sub-models every method sees are the
named sub-networks `subnets` ([k, d, e] each, one value everywhere), smallest first; the default
five run from k3-d2-e3 (the smallest of the space) to k7-d4-e6 (the full network).
Initialisation: the reference's `he_fout` (convs normal(0, sqrt(2 / (k^2 c_out))), BN (1, 0),
linear uniform(+-1/sqrt(c_in)), zero biases).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, ElasticSpace, FlexibleModel, SubModel, SubNet
from benchmark.models.slimmable_mobilenet_v1 import make_divisible
from benchmark.models.us_mobilenet_v1 import USBatchNorm2d

# (width, activation, squeeze-excite, stride at CIFAR) of the five elastic stages
# (`OFAMobileNetV3`: base_stage_width[2:7], act_stages[1:], se_stages[1:]; strides ours)
STAGES = (
    (24, "relu", False), (40, "relu", True), (80, "h_swish", False),
    (112, "h_swish", True), (160, "h_swish", True),
)  # fmt: skip
STEM, FIRST, FINAL_EXPAND, LAST = 16, 16, 960, 1280
SE_REDUCTION = 4  # `SEModule.REDUCTION`


def _act(name: str) -> nn.Module:
    return nn.ReLU(inplace=True) if name == "relu" else nn.Hardswish(inplace=True)


class ElasticBN(USBatchNorm2d):
    """BatchNorm over the input's first C channels (shared statistics and affine parameters,
    the reference's `DynamicBatchNorm2d`); counts its active 2 C parameters."""

    active = 0

    def forward(self, x: Tensor) -> Tensor:
        self.active = x.shape[1]
        return super().forward(x)

    def active_num_params(self) -> int:
        return 2 * self.active


class ElasticPointwise(nn.Module):
    """1x1 conv running weight[:c_out, :c_in] (c_in: the input's channels; `DynamicConv2d`)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, 1, 1))
        self.active = (c_in, c_out)

    def forward(self, x: Tensor, c_out: int) -> Tensor:
        self.active = (x.shape[1], c_out)
        return F.conv2d(x, self.weight[:c_out, : x.shape[1]])

    def active_num_params(self) -> int:
        return self.active[0] * self.active[1]


class ElasticDepthwise(nn.Module):
    """Depthwise conv with an elastic kernel (`DynamicSeparableConv2d`): one max-size weight
    (C, 1, k_max, k_max) and, for each pair of neighbouring kernel sizes (large, small), a
    transformation matrix (small^2, small^2), identity at initialisation."""

    def __init__(self, channels: int, kernels: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.kernels, self.stride = tuple(sorted(kernels)), stride
        k = self.kernels[-1]
        self.weight = nn.Parameter(torch.empty(channels, 1, k, k))
        for small, large in zip(self.kernels, self.kernels[1:]):
            self.register_parameter(
                f"transform_{large}to{small}", nn.Parameter(torch.eye(small * small))
            )
        self.active = (channels, k)

    def filters(self, c: int, k: int) -> Tensor:
        """The (c, 1, k, k) filters of kernel size k: from the largest kernel down, each step
        crops the centre `small` x `small` and multiplies the flattened filters by the
        transposed matrix (the reference's `get_active_filter`, `F.linear(filters, matrix)`).
        The product is taken as a broadcast multiply and sum, not a matmul: the same numbers,
        and the FLOP counter (which counts matmuls and convolutions) leaves out this weight-only
        computation, which a deployed sub-network does once (`get_active_subnet`)."""
        w = self.weight[:c]
        for small, large in reversed(list(zip(self.kernels, self.kernels[1:]))):
            if large <= k:
                break
            lo = (large - small) // 2
            w = w[:, 0, lo : lo + small, lo : lo + small].reshape(c, 1, small * small)
            m = getattr(self, f"transform_{large}to{small}")
            w = (w * m).sum(-1).reshape(c, 1, small, small)  # w_flat @ m.T, per channel
        return w

    def forward(self, x: Tensor, k: int) -> Tensor:
        c = x.shape[1]
        self.active = (c, k)
        return F.conv2d(x, self.filters(c, k), None, self.stride, k // 2, 1, c)

    def active_num_params(self) -> int:
        """The deployed sub-network's c k^2 filter weights (the matrices only train them)."""
        c, k = self.active
        return c * k * k


class ElasticSE(nn.Module):
    """Squeeze-excite on the input's C channels (`DynamicSE`): reduce to
    m = make_divisible(C // 4, 8) (1x1 conv + bias, ReLU), expand back (1x1 conv + bias),
    hard sigmoid, times the input."""

    def __init__(self, channels: int, divisor: int) -> None:
        super().__init__()
        mid = make_divisible(channels // SE_REDUCTION, divisor)
        self.divisor = divisor
        self.reduce_weight = nn.Parameter(torch.empty(mid, channels, 1, 1))
        self.reduce_bias = nn.Parameter(torch.zeros(mid))
        self.expand_weight = nn.Parameter(torch.empty(channels, mid, 1, 1))
        self.expand_bias = nn.Parameter(torch.zeros(channels))
        self.active = (channels, mid)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        m = make_divisible(c // SE_REDUCTION, self.divisor)
        self.active = (c, m)
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(F.conv2d(y, self.reduce_weight[:m, :c], self.reduce_bias[:m]))
        y = F.conv2d(y, self.expand_weight[:c, :m], self.expand_bias[:c])
        return x * F.hardsigmoid(y)

    def active_num_params(self) -> int:
        c, m = self.active
        return 2 * c * m + c + m


class ElasticBlock(nn.Module):
    """Inverted residual (`DynamicMBConvLayer` in a `ResidualBlock`): 1x1 expand to mid + BN +
    act, depthwise k x k (stride) + BN + act (+ SE), 1x1 projection + BN; plus the input where
    stride is 1 and the widths agree. mid = make_divisible(round(c_in x e), divisor)."""

    def __init__(self, c_in, c_out, kernels, expands, stride, act, se, divisor) -> None:
        super().__init__()
        self.divisor = divisor
        mid = make_divisible(round(c_in * max(expands)), divisor)
        self.expand_conv, self.expand_bn = ElasticPointwise(c_in, mid), ElasticBN(mid)
        self.dw, self.dw_bn = ElasticDepthwise(mid, kernels, stride), ElasticBN(mid)
        self.se = ElasticSE(mid, divisor) if se else None
        self.project, self.project_bn = ElasticPointwise(mid, c_out), ElasticBN(c_out)
        self.act = _act(act)
        self.residual = stride == 1 and c_in == c_out
        self.c_out = c_out

    def mid(self, c_in: int, e: float) -> int:
        return make_divisible(round(c_in * e), self.divisor)

    def forward(self, x: Tensor, k: int, e: float) -> Tensor:
        h = self.act(self.expand_bn(self.expand_conv(x, self.mid(x.shape[1], e))))
        h = self.act(self.dw_bn(self.dw(h, k)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project(h, self.c_out))
        return x + h if self.residual else h

    @torch.no_grad()
    def sort_channels(self, keep: list[int]) -> None:
        """Re-order the hidden channels by importance, the L1 norm of each channel's projection
        weights, largest first, within the groups that the boundaries `keep` (channel counts of
        expand ratios already trained) delimit, so a trained smaller expand ratio keeps its
        channels (the reference's `re_organize_middle_weights`); the SE's reduced channels are
        sorted by the L1 norm of their expand weights, over all of them (as the reference
        does: a smaller expand ratio's SE may then use others). The full network's function
        is unchanged."""
        importance = self.project.weight.abs().sum((0, 2, 3))
        n, bounds = len(importance), sorted({b for b in keep if 0 < b < len(importance)})
        group = torch.zeros(n, dtype=torch.long)
        for b in bounds:
            group[b:] += 1
        order = sorted(range(n), key=lambda i: (int(group[i]), -float(importance[i])))
        idx = torch.tensor(order)
        self.project.weight.copy_(self.project.weight[:, idx])
        self.expand_conv.weight.copy_(self.expand_conv.weight[idx])
        self.dw.weight.copy_(self.dw.weight[idx])
        for bn in (self.expand_bn, self.dw_bn):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t[idx])
        if self.se is not None:
            se = self.se
            se.reduce_weight.copy_(se.reduce_weight[:, idx])
            se.expand_weight.copy_(se.expand_weight[idx])
            se.expand_bias.copy_(se.expand_bias[idx])
            inner = torch.argsort(se.expand_weight.abs().sum((0, 2, 3)), descending=True)
            se.expand_weight.copy_(se.expand_weight[:, inner])
            se.reduce_weight.copy_(se.reduce_weight[inner])
            se.reduce_bias.copy_(se.reduce_bias[inner])


def _conv_bn_act(c_in: int, c_out: int, k: int, stride: int, act: str) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        _act(act),
    ]


class OFAMobileNetV3(FlexibleModel):
    """Sub-model k = the named sub-network `caps.elastic.listed[k]`; `forward_subnet` runs any
    sub-network of `caps.elastic`; evaluation recalibrates BN per sub-network."""

    def __init__(
        self,
        num_classes: int,
        space: ElasticSpace,
        names: list[str],
        width_mult: float,
        strides: tuple[int, int],
        stage_strides: list[int],
        dropout: float,
        divisor: int = 8,
    ) -> None:
        super().__init__()
        self.space = space
        self.caps = Capabilities(
            ("kernel", "depth", "expand"), bn_recalibration=True, elastic=space
        )
        self.submodels = [SubModel(k, n) for k, n in enumerate(names)]

        def width(c: int) -> int:
            return make_divisible(c * width_mult, divisor)

        stem, first = width(STEM), width(FIRST)
        self.stem = nn.Sequential(*_conv_bn_act(3, stem, 3, strides[0], "h_swish"))
        self.first = nn.Sequential(  # depthwise 3x3 + BN + ReLU, pointwise + BN (expand 1)
            nn.Conv2d(stem, stem, 3, strides[1], 1, groups=stem, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, first, 1, bias=False),
            nn.BatchNorm2d(first),
        )
        self.first_residual = strides[1] == 1 and stem == first
        self.blocks = nn.ModuleList()
        c_in, per = first, max(space.depths)
        for (c, act, se), s in zip(STAGES, stage_strides):
            for j in range(per):
                self.blocks.append(
                    ElasticBlock(
                        c_in, width(c), space.kernels, space.expands, s if j == 0 else 1, act,
                        se, divisor,
                    )
                )  # fmt: skip
                c_in = width(c)
        final, last = width(FINAL_EXPAND), width(LAST)
        self.final_expand = nn.Sequential(*_conv_bn_act(c_in, final, 1, 1, "h_swish"))
        self.feature_mix = nn.Sequential(nn.Conv2d(final, last, 1, bias=False), nn.Hardswish())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        _init_weights(self)

    def _trunk(self, x: Tensor, s: SubNet) -> tuple[Tensor, list[Tensor]]:
        """The features (N, C, h, w) after the final expand and the output of each stage."""
        x = self.stem(x)
        h = self.first(x)
        x = x + h if self.first_residual else h
        feats, per = [], max(self.space.depths)
        for i, d in enumerate(s.depth):
            for j in range(d):
                b = i * per + j
                x = self.blocks[b](x, s.kernel[b], s.expand[b])
            feats.append(x)
        return self.final_expand(x), feats

    def _head(self, x: Tensor) -> Tensor:
        return self.classifier(
            self.dropout(self.feature_mix(x.mean((2, 3), keepdim=True)).flatten(1))
        )

    def forward_subnet(self, x: Tensor, s: SubNet) -> Tensor:
        """Logits (N, num_classes) of sub-network s (any SubNet of `caps.elastic`)."""
        return self._head(self._trunk(x, s)[0])

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._head(self._trunk(x, self.space.listed[k])[0])

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits of named sub-network k and the output of each of its five stages."""
        h, feats = self._trunk(x, self.space.listed[k])
        return self._head(h), feats

    def sort_channels(self, trained_expands: tuple[float, ...]) -> None:
        """Channel importance sorting of every block (`ElasticBlock.sort_channels`), keeping
        the channels of the expand ratios `trained_expands` in their prefixes."""
        for b in self.blocks:
            c_in = b.expand_conv.weight.shape[1]
            b.sort_channels([b.mid(c_in, e) for e in trained_expands])


def _init_weights(model: nn.Module) -> None:
    """The reference's `init_model("he_fout")`: conv weights normal(0, sqrt(2 / n)), n = k^2 x
    c_out (groups not divided out), BN weight 1 bias 0, linear uniform(+-1/sqrt(c_in)), biases 0
    (the SE's convolutions are convolutions there too)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(
                m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] ** 2 * m.out_channels))
            )
        elif isinstance(m, (ElasticPointwise, ElasticDepthwise)):
            c_out, _, k, _ = m.weight.shape
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k * k * c_out)))
        elif isinstance(m, ElasticSE):
            for w in (m.reduce_weight, m.expand_weight):
                nn.init.normal_(w, 0.0, math.sqrt(2.0 / w.shape[0]))
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _choices(p: dict, key: str, valid: tuple) -> tuple:
    """A non-empty, strictly increasing list of values from `valid`."""
    v = p[key]
    if (
        not isinstance(v, (list, tuple))
        or not v
        or any(isinstance(c, bool) or c not in valid for c in v)
        or any(b <= a for a, b in zip(v, v[1:]))
    ):
        raise ConfigError(
            f"{key} must be a strictly increasing list of values from {list(valid)}, {got(v)}"
        )
    return tuple(v)


def _subnets(p: dict, kernels, depths, expands) -> list[tuple[int, int, float]]:
    """The named sub-networks: [k, d, e] triples inside the choices, each one no smaller than
    the one before in every setting and larger in one (smallest first)."""
    subs = p["subnets"]
    ok = isinstance(subs, (list, tuple)) and subs
    ok = ok and all(isinstance(s, (list, tuple)) and len(s) == 3 for s in subs)
    ok = ok and all(s[0] in kernels and s[1] in depths and s[2] in expands for s in subs)
    if not ok:
        raise ConfigError(
            f"subnets must be a non-empty list of [kernel, depth, expand] with kernel in "
            f"{list(kernels)}, depth in {list(depths)}, expand in {list(expands)}, {got(subs)}"
        )
    pairs = list(zip(subs, subs[1:]))
    if any(any(b < a for a, b in zip(s, t)) or list(s) == list(t) for s, t in pairs):
        raise ConfigError(
            f"subnets must grow, smallest first (each [k, d, e] no smaller than the one before "
            f"in every setting and different from it), got {subs}"
        )
    return [(int(k), int(d), e) for k, d, e in subs]


def _strides(p: dict) -> tuple[tuple[int, int], list[int]]:
    stem, stages = p["stem_stride"], p["strides"]
    if stem not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, {got(stem)}")
    if (
        not isinstance(stages, (list, tuple))
        or len(stages) != len(STAGES)
        or any(s not in (1, 2) for s in stages)
    ):
        raise ConfigError(f"strides must be {len(STAGES)} values, each 1 or 2, {got(stages)}")
    return (stem, 1), list(stages)


def subnet_name(k: int, d: int, e: float) -> str:
    """`k3-d2-e3`: kernel 3, depth 2 and expand ratio 3 everywhere."""
    return f"k{k}-d{d}-e{e:g}"


# OFA's training settings (train_ofa_net.py), shared by the paper and imagenet profiles, which
# differ only in the epochs ofa_ps splits over its phases (see the train= comment below)
OFA_RECIPE = {
    "batch_size": 64,
    "lr": 3e-2,
    "nesterov": True,
    "weight_decay": 3e-5,
    "weight_decay_on": "matrices",
    "schedule": "cosine",
    "label_smoothing": 0.1,
    "bn_calib_batches": 20,
}


@register_arch(
    "ofa_mobilenet_v3",
    defaults={
        "kernels": [3, 5, 7],
        "depths": [2, 3, 4],
        "expands": [3, 4, 6],
        "subnets": [[3, 2, 3], [3, 3, 4], [5, 3, 4], [5, 4, 6], [7, 4, 6]],
        "width_mult": 1.0,
        "stem_stride": 1,
        "strides": [1, 2, 2, 1, 2],
        "dropout": 0.1,
    },
    profiles={
        # smoke: 16 px inside (stem stride 2), two depth choices, three named sub-networks
        "smoke": {
            "width_mult": 0.25,
            "stem_stride": 2,
            "depths": [1, 2],
            "subnets": [[3, 1, 3], [5, 2, 4], [7, 2, 6]],
        },
        # mini: 16 px inside too: at the CIFAR stem's 32 px the 7x7 depthwise backward alone
        # made the full network's step 1.6 s (fp32, 1 CPU thread, batch 64), 0.41 s at 16 px
        "mini": {"width_mult": 0.5, "stem_stride": 2},
        "imagenet": {"stem_stride": 2, "strides": [2, 2, 2, 1, 2]},
    },
    # OFA's recipe (train_ofa_net.py): SGD nesterov, momentum 0.9, wd 3e-5 without decay on BN
    # and biases ("bn#bias": our weight_decay_on matrices), label smoothing 0.1, cosine, lr
    # 3e-2 per 64 images (its kernel phase's base_lr; batch 64 per GPU, init_lr = base_lr x
    # GPUs), BN recalibrated per sub-network. epochs: the total that ofa_ps splits over its
    # phases (methods.md); the other methods train as long.
    train={
        "smoke": {"epochs": 6, "bn_calib_batches": 2, "label_smoothing": 0.1},
        "mini": {"epochs": 12, "bn_calib_batches": 10, "label_smoothing": 0.1},
        "paper": {"epochs": 300, **OFA_RECIPE},
        "imagenet": {"epochs": 530, **OFA_RECIPE},
    },
    description="Once-for-All elastic MobileNetV3 (CIFAR strides): kernel 3/5/7, depth 2-4, "
    "expand 3/4/6; named sub-networks, BN recalibration",
)
def build_ofa_mobilenet_v3(num_classes: int, image_size: int, **p) -> OFAMobileNetV3:
    """The elastic network of the resolved knobs (module docstring); ConfigError on bad input."""
    kernels = _choices(p, "kernels", (3, 5, 7))
    depths = _choices(p, "depths", (1, 2, 3, 4, 5, 6))
    expands = _choices(p, "expands", (1, 2, 3, 4, 5, 6))
    subs = _subnets(p, kernels, depths, expands)
    wm = p["width_mult"]
    if isinstance(wm, bool) or not isinstance(wm, (int, float)) or not wm > 0:
        raise ConfigError(f"width_mult must be a positive number, {got(wm)}")
    dropout = p["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1), {got(dropout)}")
    strides, stage_strides = _strides(p)
    stride = strides[0] * math.prod(stage_strides)
    if image_size % stride:
        raise ConfigError(
            f"the image size {image_size} px must be divisible by the network's total stride "
            f"{stride} (stem_stride x strides); valid: stem_stride / strides that multiply to a "
            f"divisor of {image_size}"
        )
    space = ElasticSpace(kernels, depths, tuple(float(e) for e in expands), len(STAGES), ())
    listed = tuple(space.uniform(k, d, float(e)) for k, d, e in subs)
    space = ElasticSpace(space.kernels, depths, space.expands, len(STAGES), listed)
    names = [subnet_name(*s) for s in subs]
    return OFAMobileNetV3(
        num_classes, space, names, float(wm), strides, stage_strides, float(dropout)
    )
