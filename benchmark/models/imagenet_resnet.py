"""Pieces shared by the ImageNet-size networks (ddnn_resnet, byot_resnet,
switchable_precision_resnet, msdnet, saliency_vgg with `variant: imagenet`).

The ResNet layout is torchvision's (`torchvision/models/resnet.py`, He et al. 2016 with the
"v1.5" stride on the 3x3 conv of a bottleneck): a 7x7 stride-2 stem conv, BN, ReLU and a 3x3
stride-2 max-pool, four stages of 64/128/256/512 planes (x4 channels out of a bottleneck) with
strides 1/2/2/2, projection shortcuts (1x1 conv + BN) where the shape changes, global average
pooling and one linear layer.
"""

from __future__ import annotations

from torch import nn

from benchmark.errors import ConfigError, got

VARIANTS = ("cifar", "imagenet")
STAGE_PLANES = (64, 128, 256, 512)
# blocks per stage of torchvision's resnet18/34/50 (the `layers` argument of `_resnet`)
LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
# The smallest image an ImageNet-stem ResNet takes: its total stride is 32 (stem 4, stages 8),
# so below 64 px the last stage is a single pixel (CIFAR images belong to `variant: cifar`).
MIN_IMAGENET_SIZE = 64


def check_variant(arch: str, variant: object, image_size: int, min_size: int) -> str:
    """`variant` is cifar or imagenet, and an ImageNet network gets images of at least
    `min_size` px. Raises ConfigError naming the valid values and the one received."""
    if variant not in VARIANTS:
        raise ConfigError(f"{arch} variant must be one of {', '.join(VARIANTS)}, {got(variant)}")
    if variant == "imagenet" and image_size < min_size:
        raise ConfigError(
            f"{arch} variant imagenet needs images of at least {min_size} px (ImageNet: 224), "
            f"got {image_size} px; use variant cifar for small images"
        )
    return str(variant)


def imagenet_stem(c_out: int, bn: nn.Module, bias: bool = False) -> nn.Sequential:
    """7x7 stride-2 conv (3 -> c_out), the given BatchNorm, ReLU, 3x3 stride-2 max-pool:
    (B, 3, H, W) -> (B, c_out, H/4, W/4) (torchvision's ResNet stem; MSDNet's ImageNet first
    layer has the same shape with a conv bias)."""
    return nn.Sequential(
        nn.Conv2d(3, c_out, 7, 2, 3, bias=bias), bn, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    )
