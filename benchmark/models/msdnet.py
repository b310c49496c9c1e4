"""MSDNet for CIFAR (Huang et al., ICLR 2018), following the reference PyTorch implementation.

Structure, channel arithmetic, "max" scale pruning, transition layers and the CIFAR exit heads
match the reference MSDNet-PyTorch CIFAR model, so per-exit multiply-adds and parameter counts
match its op counter. One deliberate note on initialisation: the reference defines a custom
initialiser but applies it only to the direct children of each block (never to a Conv2d,
BatchNorm2d or Linear), so its networks train from PyTorch's default initialisation; we do the
same instead of the initialiser it never ran.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import FlexibleModel, SubModel


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
    """CIFAR stem: a stride-1 3x3 conv, then one stride-2 3x3 conv per coarser scale."""

    def __init__(self, n_channels: int, gr_factor: list[int]):
        super().__init__()
        layers, n_in = [], 3
        for i, g in enumerate(gr_factor):
            layers.append(_conv_bn_relu(n_in, n_channels * g, 3, 1 if i == 0 else 2))
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
    """CIFAR exit: two stride-2 3x3 ConvBNReLU (head_channels), AvgPool(2), Linear."""

    def __init__(self, n_in: int, head_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(n_in, head_channels, 3, 2),
            _conv_bn_relu(head_channels, head_channels, 3, 2),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(head_channels, num_classes)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return self.linear(self.features(xs[-1]).flatten(1))


def block_steps(n_blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: `even` -> [base, step, step, ...]; `lin_grow` -> [base, step*i+1]."""
    return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, n_blocks)]


class MSDNet(FlexibleModel):
    single_pass = True
    early_exit = True

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        n_blocks: int,
        base: int,
        step: int,
        step_mode: str,
        n_channels: int,
        growth_rate: int,
        gr_factor: list[int],
        bn_factor: list[int],
        reduction: float,
        bottleneck: bool,
        head_channels: int,
    ):
        super().__init__()
        gr, bn = list(gr_factor), list(bn_factor)
        n_scales = len(gr)
        steps = block_steps(n_blocks, base, step, step_mode)
        n_layers_all = sum(steps)
        interval = math.ceil(n_layers_all / n_scales)
        self.steps = steps
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        n_in, layer_idx = n_channels, 0
        for b in range(n_blocks):
            mods: list[nn.Module] = [_Stem(n_channels, gr)] if b == 0 else []
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
            self.heads.append(_Head(n_in * gr[-1], head_channels, num_classes))
        self.submodels = [SubModel(i, f"exit{i + 1}") for i in range(n_blocks)]

    def _run(
        self, x: Tensor, upto: int, heads: set[int], features: bool = False
    ) -> dict[int, Tensor | tuple[Tensor, list[Tensor]]]:
        out: dict[int, Tensor | tuple[Tensor, list[Tensor]]] = {}
        h = x
        for i in range(upto + 1):
            h = self.blocks[i](h)
            if i in heads:
                # The feature of an exit is the coarsest-scale map its classifier reads.
                out[i] = (self.heads[i](h), [h[-1]]) if features else self.heads[i](h)
        return out

    def forward_all(self, x: Tensor, which: list[int] | None = None) -> list[Tensor]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._run(x, max(which), set(which))
        return [out[k] for k in which]

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        return self._run(x, k, {k}, features=True)[k]

    def forward_all_features(
        self, x: Tensor, which: list[int] | None = None
    ) -> list[tuple[Tensor, list[Tensor]]]:
        which = list(range(len(self.submodels))) if which is None else which
        out = self._run(x, max(which), set(which), features=True)
        return [out[k] for k in which]

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        return self._run(x, k, {k})[k]

    def cost_forward(self, x: Tensor, k: int) -> Tensor:
        """Anytime cost: the trunk up to exit k plus every exit head up to and including k."""
        return self._run(x, k, set(range(k + 1)))[k]


ANYTIME = {"n_blocks": 7, "step_mode": "even", "step": 2, "base": 4}
BUDGETED = {"n_blocks": 5, "step_mode": "lin_grow", "step": 1, "base": 1}


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
    },
    presets={"anytime": ANYTIME, "budgeted": BUDGETED},
    description="MSDNet (CIFAR): one exit per block, all exits from one forward pass",
)
def build_msdnet(num_classes: int, image_size: int, **p) -> MSDNet:
    if p["step_mode"] not in ("even", "lin_grow"):
        raise ConfigError(f"msdnet step_mode {p['step_mode']!r}; valid: even, lin_grow")
    for key in ("n_blocks", "base", "step", "n_channels", "growth_rate", "head_channels"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ConfigError(f"msdnet {key} must be an integer >= 1, {got(p[key])}")
    if len(p["gr_factor"]) != len(p["bn_factor"]) or not p["gr_factor"]:
        raise ConfigError("msdnet gr_factor and bn_factor must be non-empty and of equal length")
    if not 0 <= p["reduction"] < 1:
        raise ConfigError(f"msdnet reduction must be in [0, 1), {got(p['reduction'])}")
    coarsest = image_size // 2 ** (len(p["gr_factor"]) - 1)
    if coarsest < 8:
        raise ConfigError(
            f"msdnet with {len(p['gr_factor'])} scales needs images of at least "
            f"{8 * 2 ** (len(p['gr_factor']) - 1)} px for its CIFAR exit heads, got {image_size}"
        )
    return MSDNet(num_classes=num_classes, image_size=image_size, **p)
