"""takd (teacher-assistant KD, Mirzadeh et al. 2020) as staged, offline distillation.

Runs on K independent networks: stage 1 trains the largest with CE; each next stage trains the
next smaller one with (1-a) CE + a KD(z_k, z_{k+1}; T) from the already trained, frozen s_{k+1}.
On a weight-sharing model "freezing the teacher" would freeze (or silently change) the student's
shared weights, so TAKD is defined on independent networks only, as in the paper.
"""

from benchmark.methods import register_method
from benchmark.methods.base import DIVERGENCE, Method, Stage, temperature, weight


@register_method("takd")
class TAKD(Method):
    description = "offline TA chain on independent networks: largest first, each stage frozen"
    plot_slot = 4
    # Defaults: the TAKD author's confirmed CIFAR-100 ResNet-110 -> ResNet-20 setting.
    PARAMS = {"T": temperature(5.0), "a": weight(0.5), **DIVERGENCE}
    separate_networks = True

    def stages(self, num_submodels: int) -> list[Stage]:
        last = num_submodels - 1
        return [Stage((last,))] + [Stage((k,), (k + 1,)) for k in range(last - 1, -1, -1)]

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        if k == num_submodels - 1:
            return ce, {"ce": ce}
        a, T = self.params["a"], self.params["T"]
        kd = self.distill(logits, teachers[k + 1], T)
        return (1 - a) * ce + a * kd, {"ce": ce, "kd": kd}
