"""Depth-level dynamic ResNet (DDNN, Lyu/Zhao et al. 2021) for CIFAR.

One CIFAR ResNet (He et al. 2016: 3 stages of basic blocks with 16/32/64 channels, option-A
parameter-free shortcuts) whose sub-nets of different depth share one set of weights. Sub-net k
runs the first `depths[k]` blocks of every stage (depth 6n+2 for n blocks per stage, so the
default depths [3, 5, 7, 9] are ResNet-20/32/44/56 inside one ResNet-56; names `d20`..`d56`).

From the paper (abstract): different-depth sub-nets of similar architecture share one set of
weights and all are trained in every iteration. Our choices (the paper's are not published):
which blocks a sub-net keeps (the first n of each stage, so the stride-2 first block of a stage is
always kept), and private BatchNorm per sub-net (`private_bn`, default true: a block's input
statistics depend on how many blocks ran before it; `false` shares BN across depths).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel
from benchmark.models.cifar_resnet import STAGE_CHANNELS, option_a_shortcut
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


class DDNNResNet(FlexibleModel):
    caps = Capabilities(("depth",))

    def __init__(self, num_classes: int, depths: list[int], width: float, private_bn: bool) -> None:
        super().__init__()
        self.depths, self.private_bn = list(depths), private_bn
        n_bn = len(depths) if private_bn else 1
        chans = [max(1, round(c * width)) for c in STAGE_CHANNELS]
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = SwitchableBatchNorm2d([chans[0]] * n_bn)
        c_in = chans[0]
        self.stages = nn.ModuleList()
        for s, c in enumerate(chans):
            blocks = [
                _Block(c_in if i == 0 else c, c, 2 if s > 0 and i == 0 else 1, n_bn)
                for i in range(max(depths))
            ]
            self.stages.append(nn.ModuleList(blocks))
            c_in = c
        self.linear = nn.Linear(c_in, num_classes)
        self.switches = [m for m in self.modules() if isinstance(m, Switch)]
        self.submodels = [SubModel(i, f"d{6 * d + 2}") for i, d in enumerate(self.depths)]
        for m in self.modules():  # He-normal convs, as in common CIFAR ResNet code
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _run(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        set_active(self.switches, k if self.private_bn else 0)
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for stage in self.stages:
            for block in stage[: self.depths[k]]:
                x = block(x)
            feats.append(x)
        return self.linear(x.mean((2, 3))), feats

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k)[0]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self._run(x, k)


@register_arch(
    "ddnn_resnet",
    defaults={"depths": [3, 5, 7, 9], "width": 1.0, "private_bn": True},
    profiles={
        "smoke": {"depths": [1, 2], "width": 0.25},
        "mini": {"depths": [1, 2, 3], "width": 0.5},
    },
    description="depth-dynamic CIFAR ResNet: sub-nets = first n blocks per stage, shared weights",
)
def build_ddnn_resnet(num_classes: int, image_size: int, **p) -> DDNNResNet:
    depths = p["depths"]
    if (
        not isinstance(depths, (list, tuple))
        or not depths
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths)
        or any(b <= a for a, b in zip(depths, depths[1:]))
    ):
        raise ConfigError(
            f"ddnn_resnet depths must be strictly increasing integers >= 1 (blocks per stage of "
            f"each sub-net, smallest first), {got(depths)}"
        )
    if isinstance(p["width"], bool) or not isinstance(p["width"], (int, float)) or p["width"] <= 0:
        raise ConfigError(f"ddnn_resnet width must be a positive number, {got(p['width'])}")
    if not isinstance(p["private_bn"], bool):
        raise ConfigError(f"ddnn_resnet private_bn must be true or false, {got(p['private_bn'])}")
    return DDNNResNet(num_classes, list(depths), float(p["width"]), p["private_bn"])
