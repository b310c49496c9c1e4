"""sdn: Shallow-Deep Networks (Kaya, Hong & Dumitras, ICML 2019): a CIFAR CNN with internal
classifiers (ICs) attached after chosen blocks; all exits come from one forward pass.

From the reference code (yigitcankaya/Shallow-Deep-Networks):
- Backbones (`architectures/SDNs/*.py`, `network_architectures.py`):
  `resnet56`: 3x3 stem conv (16 channels) + BN + ReLU, three stages of 9 basic blocks
  (16/32/64 channels, strides 1/2/2), 1x1-conv + BN projection shortcuts where the shape changes
  (`ResNet_SDN.BasicBlockWOutput`), global average pool, linear.
  `vgg16_bn`: 13 conv blocks (3x3 conv with bias, BN, ReLU, a 2x2 max-pool after conv 2, 4, 7,
  10, 13), one FC block (linear to 512, ReLU, dropout 0.5) and the end layers (linear 512 -> 512,
  dropout 0.5, linear to the classes; the reference has no ReLU between them, kept).
- IC placement (`add_ic` of `create_resnet56` / `create_vgg16bn`, "15, 30, 45, 60, 75, 90
  percent of GFLOPs"): after ResNet-56 blocks 4, 8, 12, 16, 20, 24 of 27 and after VGG-16 conv
  blocks 2, 4, 6, 7, 9, 10 of 13 (1-based). A ResNet IC reads the block's sum of residual and
  shortcut before the block's last ReLU (`BasicBlockWOutput.forward`); a VGG IC the block's
  output after its max-pool.
- IC head (`aux_funcs.InternalClassifier`): on an s x s map with s >= 4, max-pool and avg-pool
  with kernel s // 4 mixed as a * max + (1 - a) * avg with one learned a (initialised U(0, 1),
  `torch.rand`), then a linear layer on the flattened C x (s / (s // 4))^2 map (4 x 4 when s is
  a multiple of 4); with s < 4 the linear layer reads the flattened map.
- Initialisation (`initialize_weights`): He-normal (fan-out) convs, unit BN; VGG also N(0, 0.01)
  linear weights with zero biases (ICs included).

Ours: `width` scales every channel count (and VGG's 512-wide FC layers) for the smoke and mini
sizes; `ics` as a list of cost fractions places each IC after the conv block whose cumulative
backbone MACs are nearest that fraction (the reference lists are hand-placed; `ics: reference`
keeps them, as block indices, at any width). Costs follow
MSDNet's anytime convention (`EarlyExitModel`): IC i costs the trunk up to its block plus every
head up to i; `forward_sub(x, K-1)` alone is the plain backbone. `cascade` (off by default;
`ztw` turns it on) adds Zero-Time-Waste's cascade connections (`CascadeLinks`), as on msdnet and
byot_resnet; exits can be stopped at (`forward_exits`, real early exiting).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, EarlyExitModel, ExitOutput, SubModel

BACKBONES = ("resnet56", "vgg16_bn")
# The reference's add_ic lists as 0-based block indices (ResNet: of 27 basic blocks; VGG: of 13
# conv blocks); each list approximates 15/30/45/60/75/90 % of the backbone's cost.
REFERENCE_ICS = {"resnet56": (3, 7, 11, 15, 19, 23), "vgg16_bn": (1, 3, 5, 6, 8, 9)}
REFERENCE_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)
# VGG-16 conv blocks: (channels, max-pool after it) (`create_vgg16bn`: conv_channels,
# max_pool_sizes)
VGG16 = ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False),
         (256, True), (512, False), (512, False), (512, True), (512, False), (512, False),
         (512, True))  # fmt: skip
RESNET56_STAGES = ((16, 9), (32, 9), (64, 9))  # (channels, basic blocks) per stage
VGG_FC = 512  # `fc_layers` [512, 512] at 32 px


class InternalClassifier(nn.Module):
    """SDN's IC head (reference `aux_funcs.InternalClassifier`) on a (B, C, s, s) map: mixed
    max/avg feature reduction with kernel s // 4 (s >= 4), then one linear layer."""

    def __init__(self, size: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.kernel = size // 4 if size >= 4 else 0
        side = size // self.kernel if self.kernel else size
        if self.kernel:
            self.alpha = nn.Parameter(torch.rand(1))  # the reference's U(0, 1) mixing weight
        self.linear = nn.Linear(channels * side * side, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, s, s) -> logits (B, classes) and the reduced map (B, C, s', s') it reads."""
        if self.kernel:
            a, k = self.alpha, self.kernel
            x = a * F.max_pool2d(x, k) + (1 - a) * F.avg_pool2d(x, k)
        return self.linear(x.flatten(1)), x


class _Basic(nn.Module):
    """The reference's ResNet basic block; returns (output after ReLU, pre-ReLU sum for an IC)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.body(x) + self.shortcut(x)
        return F.relu(s), s


class _VGGConv(nn.Module):
    """3x3 conv (with bias, as the reference) + BN + ReLU (+ 2x2 max-pool); (out, out)."""

    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        super().__init__()
        layers = [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.layers(x)
        return y, y


def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


def layout(backbone: str, width: float, size: int, num_classes: int) -> list[tuple[int, int, int]]:
    """Per block: (output size s, output channels C, backbone MACs of the block), from the
    shapes alone; the stem's MACs count in the first block, the classifier's in the last."""
    out, c_in, s = [], 3, size
    if backbone == "resnet56":
        c_in = _scaled(16, width)
        stem = 9 * 3 * c_in * size * size
        for i, (c, n) in enumerate(RESNET56_STAGES):
            c = _scaled(c, width)
            for j in range(n):
                s //= 2 if i > 0 and j == 0 else 1
                macs = 9 * c * (c_in + c) * s * s + (c_in * c * s * s if c_in != c else 0)
                out.append((s, c, macs + (stem if not out else 0)))
                c_in = c
        head = c_in * num_classes
    else:
        for c, pool in VGG16:
            c = _scaled(c, width)
            macs = 9 * c_in * c * s * s
            s //= 2 if pool else 1
            out.append((s, c, macs))
            c_in = c
        h = _scaled(VGG_FC, width)
        head = c_in * s * s * h + h * h + h * num_classes
    s, c, macs = out[-1]
    out[-1] = (s, c, macs + head)
    return out


def backbone_fractions(blocks: list[tuple[int, int, int]]) -> list[float]:
    """Cumulative backbone MACs (no IC) after each block of a `layout`, over its total."""
    total, run, out = sum(m for _, _, m in blocks), 0, []
    for _, _, m in blocks:
        run += m
        out.append(run / total)
    return out


class SDN(EarlyExitModel):
    """A Shallow-Deep Network: `backbone` with ICs after the blocks in `positions` (0-based,
    increasing, none after the last block) and the backbone's own classifier as the last exit."""

    # exit features differ in width from IC to IC (the reference IC has no projection), so the
    # early-exit capabilities hold without `exit_features` (byot's L2 hint cannot compare them)
    caps = Capabilities(
        ("exit",), single_pass=True, early_exit=True, stops_at_exit=True, cascade=True
    )

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        backbone: str,
        width: float,
        positions: list[int],
        cascade: bool = False,
    ) -> None:
        super().__init__()
        blocks = layout(backbone, width, image_size, num_classes)
        self.positions = list(positions)
        self.fractions = backbone_fractions(blocks)
        self.stem, trunk = self._trunk(backbone, width, blocks)
        ends = [*positions, len(blocks) - 1]
        starts = [0] + [p + 1 for p in positions]
        # blocks[i]: the backbone blocks between exit i-1 and exit i; heads[i]: exit i's head
        self.blocks = nn.ModuleList(_Segment(trunk[a : b + 1]) for a, b in zip(starts, ends))
        self.heads = nn.ModuleList(
            [InternalClassifier(blocks[p][0], blocks[p][1], num_classes) for p in positions]
            + [self._final(backbone, blocks[-1], width, num_classes)]
        )
        unit = "block" if backbone == "resnet56" else "conv"
        self.submodels = [
            SubModel(i, f"ic{i + 1}_{unit}{p + 1}") for i, p in enumerate(positions)
        ] + [SubModel(len(positions), "final")]
        self._init(backbone)
        self.init_cascade(cascade, num_classes)  # after _init: the links keep torch's init

    @staticmethod
    def _trunk(
        backbone: str, width: float, blocks: list[tuple[int, int, int]]
    ) -> tuple[nn.Module, list[nn.Module]]:
        """The stem (ResNet: 3x3 conv, BN, ReLU; VGG: none) and the blocks of `layout`."""
        if backbone == "resnet56":
            c_in = _scaled(16, width)
            stem = nn.Sequential(
                nn.Conv2d(3, c_in, 3, 1, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()
            )
            sizes = [blocks[0][0]] + [s for s, _, _ in blocks]  # the first block keeps the size
            mods = []
            for (_, c, _), s_in, s_out in zip(blocks, sizes, sizes[1:]):
                mods.append(_Basic(c_in, c, s_in // s_out))
                c_in = c
            return stem, mods
        c_ins = [3] + [c for _, c, _ in blocks[:-1]]
        mods = [_VGGConv(a, c, pool) for a, (_, c, _), (_, pool) in zip(c_ins, blocks, VGG16)]
        return nn.Identity(), mods

    @staticmethod
    def _final(
        backbone: str, last: tuple[int, int, int], width: float, num_classes: int
    ) -> nn.Module:
        """The backbone's classifier: ResNet global average pool + linear; VGG's FC block and
        end layers (`VGG_SDN`)."""
        size, c, _ = last
        if backbone == "resnet56":
            return _FinalHead(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        h = _scaled(VGG_FC, width)
        return _FinalHead(
            nn.Flatten(), nn.Linear(c * size * size, h), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(h, h), nn.Dropout(0.5), nn.Linear(h, num_classes),
        )  # fmt: skip

    def _init(self, backbone: str) -> None:
        """The reference's `initialize_weights` (ResNet_SDN / VGG_SDN)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and backbone == "vgg16_bn":
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def _walk(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> Iterator[tuple[int, ExitOutput]]:
        """Segments 0..upto, each head in `heads` yielded right after its segment. Features
        of exit i: [the map its head reads]: an IC's block tap (B, C, s, s), the final exit's
        last block output."""
        last = len(self.heads) - 1
        h = self.stem(x)
        for i in range(upto + 1):
            h, tap = self.blocks[i](h)
            if i in heads:
                fed = h if i == last else tap
                z, _ = self.heads[i](fed)
                yield i, ((z, [fed]) if features else z)


class _Segment(nn.Module):
    """Consecutive backbone blocks between two exits: (output, the last block's IC tap)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for layer in self.layers:
            x, tap = layer(x)
        return x, tap


class _FinalHead(nn.Sequential):
    """The backbone's classifier as an exit head: (logits, the map it read)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(x), x


def ic_positions(fractions: list[float], ics: object, backbone: str) -> list[int]:
    """Block indices of the ICs: the reference's list (`ics: reference`) or, for a list of cost
    fractions, the block whose cumulative backbone MACs are nearest each. ConfigError unless
    the fractions are numbers in (0, 1), strictly increasing, and fall on distinct blocks
    before the last."""
    if ics == "reference":
        return list(REFERENCE_ICS[backbone])
    if (
        not isinstance(ics, list)
        or not ics
        or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in ics)
    ):
        raise ConfigError(f"sdn ics must be 'reference' or a list of cost fractions, {got(ics)}")
    if any(not 0 < f < 1 for f in ics) or any(b <= a for a, b in zip(ics, ics[1:])):
        raise ConfigError(
            f"sdn ics fractions must be strictly increasing and inside (0, 1) (e.g. "
            f"{list(REFERENCE_FRACTIONS)}), got {ics}"
        )
    cands = fractions[:-1]  # no IC after the last block: the final classifier is there
    pos = [min(range(len(cands)), key=lambda b: abs(cands[b] - f)) for f in ics]
    if len(set(pos)) != len(pos):
        raise ConfigError(
            f"sdn ics fractions {ics} fall on blocks {[p + 1 for p in pos]} of {backbone}: two "
            f"ICs on one block; use fractions at least one block apart"
        )
    return pos


@register_arch(
    "sdn",
    defaults={"backbone": "resnet56", "width": 1.0, "ics": "reference", "cascade": False},
    description="Shallow-Deep Network (ResNet-56 or VGG-16-BN) with 6 internal classifiers at "
    "15..90 % of its cost; all exits from one forward pass",
    # SDN has no ImageNet network (its largest images are Tiny-ImageNet's 64 px): the imagenet
    # profile runs the VGG-16-BN backbone, whose 13 convs and 5 pools are torchvision's vgg16_bn
    # at 224 px (15.4 GMACs), with the ICs at the same conv blocks and the reference's 512-wide
    # FC head on the 7x7 map (ours; torchvision's is 4096 wide)
    profiles={
        "smoke": {"width": 0.125},
        "mini": {"width": 0.5},
        "imagenet": {"backbone": "vgg16_bn"},
    },
    # The reference schedule (`network_architectures.get_lr_params`): SGD 0.1, momentum 0.9,
    # 100 epochs, lr x0.1 at epochs 35, 60 and 85, weight decay 1e-4 (ResNet; VGG: 5e-4,
    # `--set train.weight_decay=5e-4`); batch 128 (`data.py` CIFAR loaders).
    # smoke and mini (ours): with unit weights on the 7 exits (joint, ztw, boosted, pl_distill,
    # l2w) the ICs' unbounded max/avg mix weight diverges early at those profiles' rates: mini
    # (lr 0.05) in epoch 1 in 3 of 3 real CIFAR-10 cells tried (non-finite loss by step 20-80),
    # hence one warm-up epoch; smoke (lr 0.1, 3 epochs) at step 15 on every seed tried, with
    # or without warm-up, hence lr 0.02. SDN's own weights start at 0.01 and did not diverge;
    # the reference has neither: it never trains unit weights.
    train={
        "smoke": {"lr": 0.02},
        "mini": {"warmup_epochs": 1},
        "paper": {
            "epochs": 100,
            "batch_size": 128,
            "lr": 0.1,
            "weight_decay": 1e-4,
            "schedule": "multistep",
            "milestones": [0.35, 0.6, 0.85],
            "gamma": 0.1,
        },
    },
)
def build_sdn(
    num_classes: int, image_size: int, backbone: str, width: float, ics: object, cascade: object
) -> SDN:
    if backbone not in BACKBONES:
        raise ConfigError(f"sdn backbone must be one of {', '.join(BACKBONES)}, {got(backbone)}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"sdn width must be a positive number, {got(width)}")
    stride = 4 if backbone == "resnet56" else 32
    if image_size < stride or image_size % stride:
        raise ConfigError(
            f"sdn backbone {backbone} needs an image size divisible by {stride} (its total "
            f"stride), got {image_size}"
        )
    if ics != "reference" and not isinstance(ics, list):
        raise ConfigError(f"sdn ics must be 'reference' or a list of cost fractions, {got(ics)}")
    if not isinstance(cascade, bool):
        raise ConfigError(f"sdn cascade must be true or false, {got(cascade)}")
    blocks = layout(backbone, float(width), image_size, num_classes)
    positions = ic_positions(backbone_fractions(blocks), ics, backbone)
    return SDN(num_classes, image_size, backbone, float(width), positions, cascade)
