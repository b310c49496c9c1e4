"""AutoAugment's CIFAR-10 policy, batched on the device: each image its own sub-policy draw.

The policy is the one the ViT-on-CIFAR reference trains with (omihub777/ViT-CIFAR,
`autoaugment.py` `CIFAR10Policy` + `ops.py`, from DeepVoltaire/AutoAugment; README: "AutoAugment:
True"), i.e. the 25 CIFAR-10 sub-policies of Cubuk et al., "AutoAugment" (CVPR 2019), Table 7
of the appendix. Each sub-policy is two (probability, operation, magnitude bin) steps; an image
draws one sub-policy uniformly, then applies each step with its probability. Magnitudes are the
reference's 10 bins (`SubPolicy.ranges`), the random sign of the reference's signed operations
included (shear, translate, colour, contrast, sharpness, brightness; rotation is not signed
there) and its grey fill (128) for the geometric ones.

Batched: an image's draws are (sub-policy, two uniforms for the two probabilities, two signs),
all drawn for the global batch from the epoch's augmentation generator right after the
crop/flip draws (`pipeline.crop_flip_params`), so they depend only on (seed, epoch) and a shard
takes its part of the same draws. The images of a batch that share one (operation, signed
magnitude) go through one call of the matching `torchvision.transforms.v2.functional` op (at
most 2 x 25 x 2 calls a batch); grouping costs one small host copy of the draws per step.
The ops are torchvision's tensor ops. Against the reference's PIL ops (tests/test_recipe.py):
equal bit for bit for invert, solarize, posterize, equalize, brightness, sharpness and integer
translations; within 1 (rounding) for autocontrast, contrast and colour; rotation differs at a
few edge pixels; shear is bilinear (the reference's PIL shear is bicubic, which torchvision's
tensor affine does not offer), and a fractional translation (the bins are 150/331 x 32 px
multiples) is resampled nearest, as PIL's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmark.errors import ConfigError, got

POLICIES = ("none", "autoaugment_cifar10")
FILL = [128.0, 128.0, 128.0]  # the reference's fillcolor for shear, translate and rotate
BINS = 10

# (p1, op1, bin1, p2, op2, bin2): ViT-CIFAR `autoaugment.py` `CIFAR10Policy.policies`, in order
CIFAR10_POLICY: tuple[tuple[float, str, int, float, str, int], ...] = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translate_x", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shear_y", 8, 0.7, "translate_y", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shear_y", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translate_x", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translate_y", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translate_y", 9, 0.7, "translate_y", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translate_y", 9, 0.9, "autocontrast", 1),
)

# the operations whose magnitude the reference negates with probability 1/2 (`ops.py`)
SIGNED = frozenset(
    {"shear_x", "shear_y", "translate_x", "translate_y", "color", "contrast", "sharpness",
     "brightness"}
)  # fmt: skip


def magnitude(op: str, level: int, size: int) -> float:
    """The unsigned magnitude of bin `level` (0..9) of `op` on a `size`-pixel side: ViT-CIFAR's
    `SubPolicy.ranges` (linspace over 10 bins): shear 0..0.3 (tangent), translate 0..150/331 of
    the side (pixels), rotate 0..30 degrees, colour/contrast/sharpness/brightness 0..0.9
    (enhance factor 1 +- m), posterize round(8..4) bits, solarize threshold 256..0; 0 for the
    parameter-free ops."""
    t = level / (BINS - 1)
    if op in ("shear_x", "shear_y"):
        return 0.3 * t
    if op in ("translate_x", "translate_y"):
        return 150 / 331 * t * size
    if op == "rotate":
        return 30.0 * t
    if op in ("color", "contrast", "sharpness", "brightness"):
        return 0.9 * t
    if op == "posterize":
        return float(round(8 - 4 * t))
    if op == "solarize":
        return 256.0 * (1 - t)
    return 0.0


def _ops() -> dict[str, Callable[[Tensor, float], Tensor]]:
    """op name -> f(images (n, 3, H, W) uint8, signed magnitude) -> same shape, uint8."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    def shear(x: Tensor, m: float, axis: int) -> Tensor:
        angles = [0.0, 0.0]
        angles[axis] = math.degrees(math.atan(m))  # PIL's (1, m, 0, 0, 1, 0) about the origin
        return F.affine(
            x, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=angles,
            interpolation=InterpolationMode.BILINEAR, fill=FILL, center=[0.0, 0.0],
        )  # fmt: skip

    def translate(x: Tensor, m: float, axis: int) -> Tensor:
        shift = [0.0, 0.0]
        shift[axis] = m
        return F.affine(x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], fill=FILL)

    return {
        "shear_x": lambda x, m: shear(x, m, 0),
        "shear_y": lambda x, m: shear(x, m, 1),
        "translate_x": lambda x, m: translate(x, m, 0),
        "translate_y": lambda x, m: translate(x, m, 1),
        "rotate": lambda x, m: F.rotate(x, m, fill=FILL),
        "color": lambda x, m: F.adjust_saturation(x, 1 + m),
        "contrast": lambda x, m: F.adjust_contrast(x, 1 + m),
        "sharpness": lambda x, m: F.adjust_sharpness(x, 1 + m),
        "brightness": lambda x, m: F.adjust_brightness(x, 1 + m),
        "posterize": lambda x, m: F.posterize(x, int(m)),
        "solarize": lambda x, m: F.solarize(x, m),
        "autocontrast": lambda x, m: F.autocontrast(x),
        "equalize": lambda x, m: F.equalize(x),
        "invert": lambda x, m: F.invert(x),
    }


_OPS: dict[str, Callable[[Tensor, float], Tensor]] = {}


def op(name: str) -> Callable[[Tensor, float], Tensor]:
    """The batched operation `name` (a key of the policy table): f(images, signed magnitude)."""
    if not _OPS:
        _OPS.update(_ops())
    return _OPS[name]


@dataclass(frozen=True)
class PolicyDraw:
    """Per-image draws of one batch: `sub` (b,) sub-policy index, `apply` (b, 2) bool (step 1,
    step 2 taken), `sign` (b, 2) +-1 (the sign of each step's magnitude, used by SIGNED ops)."""

    sub: Tensor
    apply: Tensor
    sign: Tensor

    def part(self, s: slice) -> PolicyDraw:
        """This shard's images of the global batch's draws."""
        return PolicyDraw(self.sub[s], self.apply[s], self.sign[s])


def draw_policy(b: int, g: torch.Generator) -> PolicyDraw:
    """The draws of `b` images, in this order on `g`'s device: sub-policy (uniform over 25),
    two uniforms in [0, 1) (step j is taken when its uniform < p_j, as the reference's
    `random.random() < p`), two signs."""
    dev = g.device
    sub = torch.randint(0, len(CIFAR10_POLICY), (b,), generator=g, device=dev)
    u = torch.rand((b, 2), generator=g, device=dev)
    sign = torch.randint(0, 2, (b, 2), generator=g, device=dev) * 2 - 1
    probs = torch.tensor([[p[0], p[3]] for p in CIFAR10_POLICY], device=dev)
    return PolicyDraw(sub, u < probs[sub], sign)


def _groups(draw: PolicyDraw, step: int, hw: tuple[int, int]) -> dict[tuple[str, float], Tensor]:
    """(op, signed magnitude) -> indices (CPU int64) of the images that apply it at `step` (0 or
    1) on (H, W) images: translate_y scales with the height, every other op with the width (the
    reference: `x.size[1]`, `x.size[0]`). One host copy of the draws; no per-image Python."""
    key = (draw.sub * 2 + (draw.sign[:, step] > 0)).where(draw.apply[:, step], -1).cpu()
    out: dict[tuple[str, float], list[Tensor]] = {}
    for k in key.unique().tolist():
        if k < 0:
            continue
        sub, positive = divmod(k, 2)
        name, level = CIFAR10_POLICY[sub][1 + 3 * step], CIFAR10_POLICY[sub][2 + 3 * step]
        size = hw[0] if name == "translate_y" else hw[1]
        m = magnitude(name, level, size) * (1 if positive or name not in SIGNED else -1)
        out.setdefault((name, m), []).append((key == k).nonzero().squeeze(1))
    return {g: torch.cat(idx) for g, idx in out.items()}


def apply_policy(x: Tensor, draw: PolicyDraw) -> Tensor:
    """Images (b, 3, H, W) uint8 after crop/flip -> the same shape, each image through its drawn
    sub-policy (step 1 then step 2); a new contiguous tensor, `x` is not changed."""
    out = x.clone(memory_format=torch.contiguous_format)
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    for step in (0, 1):
        for (name, m), idx in _groups(draw, step, hw).items():
            ii = idx.to(x.device)
            out[ii] = op(name)(out[ii], m)
    return out


def augment_policy(x: Tensor, g: torch.Generator, batch: int, part: slice, policy: str) -> Tensor:
    """`x` (this shard's images of a global batch of `batch`) through `policy`: "none" returns
    `x` and draws nothing (the batches of flexbench before policies, bit for bit);
    "autoaugment_cifar10" draws the global batch on `g` and applies this shard's part."""
    if policy == "none":
        return x
    return apply_policy(x, draw_policy(batch, g).part(part))


def check_policy(policy: str, where: str = "train.augment_policy") -> None:
    """ConfigError naming the valid policies unless `policy` is one."""
    if policy not in POLICIES:
        raise ConfigError(f"{where} must be one of {', '.join(POLICIES)}, {got(policy)}")
