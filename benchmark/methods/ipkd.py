"""ipkd (inplace KD, Yu & Huang 2019): the full model teaches every smaller sub-model.

L = CE(z_K, y) + sum_{k<K} [(1-a) CE(z_k, y) + a KD(z_k, z_K; T)]. Defaults a=1, T=1 are the
published US-Nets setting (soft targets only); both are parameters that studies tune.
"""

from benchmark.methods import register_method
from benchmark.methods.base import DIVERGENCE, Method, temperature, weight


@register_method("ipkd")
class IPKD(Method):
    description = "inplace KD: the full model (same step, detached) teaches every sub-model"
    plot_slot = 2
    PARAMS = {"T": temperature(), "a": weight(), **DIVERGENCE}

    def teacher_of(self, k: int, num_submodels: int) -> int:
        return num_submodels - 1

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        if k == num_submodels - 1:
            return ce, {"ce": ce}
        a, T = self.params["a"], self.params["T"]
        kd = self.distill(logits, teachers[self.teacher_of(k, num_submodels)], T)
        return (1 - a) * ce + a * kd, {"ce": ce, "kd": kd}
