"""imta (Li et al., "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019; code
kalviny/IMTA): one-for-all knowledge transfer on an MSDNet with gradient equilibrium (GE) and
inline subnetwork collaboration (ISC).

GE and ISC change the network (its gradients, its classifiers and its cost table), so they are
architecture options of `msdnet` (`arch.ge`, `arch.isc`); this method is the third part, the
loss. It turns both options on where it trains an MSDNet (`ARCH_SETTINGS`) and refuses them
off, so that `imta` always means all three. Ablations: GE alone =
`joint` with arch.ge=true, ISC alone = `joint` with arch.isc=true, the KD term alone = `ipkd`
with method.T=3 method.a=0.9 (the same loss on a plain MSDNet).

Loss (reference `utils.KDLoss.loss_fn_kd`): CE(z_K, y) + sum_{k<K} [(1-a) CE(z_k, y)
+ a KD(z_k, z_K; T)], the last exit's logits detached, i.e. ipkd's loss; a is IMTA's gamma.
Defaults T = 3, a = 0.9 are the reference code's argparse defaults (its CIFAR setting: the only
shipped script, ImageNet `run_IMTA.sh`, uses T = 1, gamma = 0.1). The reference's KL uses
`nn.KLDivLoss()` ('mean' over batch x classes), ours the batch mean of the KL: the same gamma is
num_classes times stronger here (docs/methods.md).

Schedule: the reference trains in two stages, (1) the GE MSDNet from scratch with the sum of CE,
(2) the trunk and its conv heads frozen, new ISC classifiers trained with the KD loss, the
teacher being stage 1's frozen final classifier. flexbench runs one stage: GE + ISC network
trained from scratch with the KD loss, the teacher being the last exit of the same step
(detached). The trainer has one optimizer over all parameters; freezing the trunk in a second
stage needs a trainer hook (see docs/methods.md).
"""

from __future__ import annotations

from torch import nn

from benchmark.errors import ConfigError, IncompatibleError
from benchmark.methods import register_method
from benchmark.methods.base import temperature, weight
from benchmark.methods.ipkd import IPKD
from benchmark.models.msdnet import MSDNet


@register_method("imta")
class IMTA(IPKD):
    description = "IMTA: GE + ISC MSDNet, the last exit teaches every exit ((1-a) CE + a KD)"
    plot_slot = 8
    PARAMS = {"T": temperature(3.0), "a": weight(0.9, "a (IMTA's gamma)")}
    ARCH_SETTINGS = {"msdnet": {"ge": True, "isc": True}}  # IMTA = GE + ISC + this loss

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        if not isinstance(model, MSDNet):
            raise IncompatibleError(
                f"method imta trains an MSDNet with gradient equilibrium and inline subnetwork "
                f"collaboration; architecture {arch} is not one; use msdnet"
            )
        off = [key for key, on in (("ge", model.ge), ("isc", model.isc)) if not on]
        if off:
            sets = " ".join(f"--set arch.{key}=true" for key in off)
            raise ConfigError(
                f"method imta needs msdnet with arch.ge=true and arch.isc=true (IMTA = GE + ISC + "
                f"one-for-all KD), got {', '.join(f'arch.{k}=false' for k in off)}; add {sets} "
                f"(for an ablation use joint with arch.ge or arch.isc, or ipkd with method.T=3 "
                f"method.a=0.9 for the KD term alone)"
            )
