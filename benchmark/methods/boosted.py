"""boosted (BoostNet: Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023; code
SHI-Labs/Boosted-Dynamic-Networks): each exit is a weak learner trained on top of the
stop-gradient ensemble of the exits before it, and predicts with that ensemble plus its own
logits.

With exit logits z_0..z_{K-1} of one pass (smallest first) and the running ensemble
F_{-1} = 0, F_s = r (z_s + F_{s-1}) (reference `models/dynamic_net.py`, `DynamicNet.forward_all`):

    L = sum_s CE(z_s + sg[F_{s-1}], y)            (`train_cifar100.py`, `train`, L40-67)

and exit s predicts z_s + F_{s-1} at evaluation (`DynamicNet.forward`, which writes the same sum
as G_s = z_s + r G_{s-1}; G_s = z_s + F_{s-1} by induction). `exit_outputs` gives those
predictions, so validation, test and early exiting all read the boosted ensemble.

Default r = 0.5: `--ensemble_reweight 0.5` of the reference's CIFAR-100 MSDNet scripts
(`msdnet_scripts/train_cifar100_any.sh`; its argparse default is 1.0). The reference also
accepts one r per exit (a linspace between two values); we keep one r.

Gradient equilibrium: the reference trains `msdnet_ge`, IMTA's GE MSDNet; here that is msdnet's
own `ge` option (`benchmark/models/msdnet.py`, the one GE of flexbench), which this method turns
on where it trains an MSDNet (`ARCH_SETTINGS`; `--set arch.ge=false` is the reference's plain
`msdnet` variant). Other multi-exit families (byot_resnet) have no GE option and train without
it. Not reproduced: the reference's per-exit weight decay (a linspace over the exits; its
scripts give one value, which is ours).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import Method, ParamSpec


def boosted_offsets(logits: list[Tensor], r: float) -> list[Tensor]:
    """F_{s-1} for s = 0..len(logits)-1 (F_{-1} = 0, F_s = r (z_s + F_{s-1})), each (N, C),
    from the exit logits [(N, C), ...] smallest first; exit s predicts z_s + F_{s-1}."""
    out, running = [], torch.zeros_like(logits[0])
    for z in logits:
        out.append(running)
        running = r * (z + running)
    return out


@register_method("boosted")
class Boosted(Method):
    description = "BoostNet: each exit boosts the stop-gradient ensemble of the earlier exits"
    plot_slot = 14
    PARAMS = {
        "r": ParamSpec(
            0.5, lambda v: v >= 0, "r (the ensemble reweight) must be >= 0", Dim(0.25, 1.0)
        ),
    }
    ARCH_SETTINGS = {"msdnet": {"ge": True}}  # the reference's msdnet_ge
    reads_earlier_exits = True

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = "early exits from one pass (each exit boosts the earlier exits of the same pass)"
        cls.require(model, arch, "early_exit", need)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        earlier = [teachers[j].detach() for j in range(k)]
        offset = boosted_offsets([*earlier, logits], self.params["r"])[k]
        ce = self.ce(logits + offset.detach(), y)
        return ce, {"ce": ce}

    def exit_outputs(self, logits: list[Tensor]) -> list[Tensor]:
        offsets = boosted_offsets(logits, self.params["r"])
        return [z + f for z, f in zip(logits, offsets)]
