"""mutualnet (Yang et al., MutualNet, ECCV 2020 / TPAMI): the sandwich rule over widths and input
resolutions, inplace distillation from the largest width at full resolution.

Each step trains n widths with one optimizer step: the largest w_max on the batch as it is
(N, 3, H, W), H = W = the data's image size, on the labels, CE(z_max, y); the smallest w_min and
n-2 widths drawn uniformly from [w_min, w_max], each on the batch resized (bilinear, aligned
corners) to a resolution r_i drawn uniformly from the network's `arch.resolutions` (the image
size among them), on the largest width's detached prediction of the same step:
(1-a) CE(z_i, y) + a D(z_i, z_max; T) with a = 1, T = 1 (soft targets only), z_i = f(w_i,
resize(x, r_i)) (N, C). Widths are the sandwich's draws at the same seed and step (the step
generator, `benchmark.training.step.step_generator`), resolutions are drawn after them from the
same generator: identical for every method at a seed and after a resume.

From the reference code (taoyang1122/MutualNet `train.py` L77-100, `train`): max width on
`input_list[0]` (full resolution) with CE; min width plus 2 uniform widths (n = 4), each on
`input_list[random.randint(0, 3)]` (one of the 4 resolutions, full included) with
`KLDivLoss(batchmean)(log_softmax(z), softmax(z_max))`; one backward per width, one optimizer
step. `utils/transforms.py` `InputList`: the resized inputs by `F.interpolate(bilinear,
align_corners=True)`. `apps/wideresnet.yml` (CIFAR): resolutions [32, 28, 24, 20] (stride 4),
SGD lr 0.1 cosine, nesterov, wd 5e-4, batch 128, 200 epochs. Evaluation (`test`): every width
at every resolution after BN statistics recomputed at that resolution (`ComputePostBN.py`).

Ours: the resolutions are the network's (`arch.resolutions`, which this method turns to `auto`
where it trains us_mobilenet_v1: the image size and 3 strides below it, [32, 28, 24, 20] at
stride 4, [224, 192, 160, 128] at stride 32 as the reference's two lists; us_mobilenet_v1's
CIFAR stride 16 leaves [32, 16]), so every method on that network is evaluated on the same
(width, resolution) sub-models; the resize runs on the device per width instead of four copies
per image in the data loader (the same images: bilinear on the normalised batch); KL with the
shared distillation term (`method.divergence`); the schedule is the profile's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmark.methods import register_method
from benchmark.methods.sandwich import Sandwich


@register_method("mutualnet")
class MutualNet(Sandwich):
    description = (
        "MutualNet: sandwich rule with a random input resolution per non-max width, "
        "inplace distillation from the max width at full resolution"
    )
    plot_slot = 19
    PARAMS = {k: v for k, v in Sandwich.PARAMS.items() if k != "resolution"}  # always random
    # the resolution axis on, where a network offers it (the arch's `resolutions`)
    ARCH_SETTINGS = {"us_mobilenet_v1": {"resolutions": "auto"}}

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        # the resolution axis first: its refusal names the architectures that have both axes
        cls.require(model, arch, "resolutions", "a network that runs several input resolutions")
        super().check_model(model, arch)
        cls.check_params(model, arch, {})

    @classmethod
    def random_resolution(cls, params: dict[str, Any]) -> bool:
        return True
