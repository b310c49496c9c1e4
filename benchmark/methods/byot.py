"""byot (Zhang et al., "Be Your Own Teacher", ICCV 2019): self-distillation in a multi-exit
network. Every exit learns from the labels; each shallow exit also from the deepest exit's
softened prediction and from its feature (an L2 hint):

    L_k = (1-a) CE(z_k, y) + a KD(z_k, z_K; T) + g * mean_b ||f_k - f_K||^2     (k < K)
    L_K = (1-a) CE(z_K, y)

with z_K and f_K detached (teachers of the same step) and f_k the pooled exit feature
(B, C, 1, 1) of exit k (the first feature of every exit of a model with `exit_features`).
This is the paper's loss, summed over all classifiers (its KL and hint terms vanish for the
deepest one, which keeps the (1-a) CE). KD is the shared T^2-scaled batch-mean KL.

Defaults: the paper publishes no values of alpha, lambda or T (the unofficial reproduction
luanyunteng/pytorch-be-your-own-teacher says so in its README). T = 3 is the value both known
reimplementations use (luanyunteng's code; mmrazor's BYOT config, tau = 3). a = 0.3, g = 0.03
are mmrazor's `byot_logits_resnet18_cifar100` weights (0.7 CE, 0.3 KD, 0.03 feature loss).
mmrazor applies 0.03 to sqrt(sum over the batch of squared differences), not to the batch mean
of the squared l2 distance of the paper's ||F_i - F_C||^2; the value is kept as the weight of
the paper's form. Studies tune all three on the validation split.
"""

from __future__ import annotations

from torch import Tensor, nn

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import Method, kd_loss, scale, temperature, weight


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Batch mean of the squared l2 distance between two (B, ...) features, teacher detached."""
    return (student - teacher.detach()).pow(2).flatten(1).sum(1).mean()


@register_method("byot")
class BYOT(Method):
    description = "self-distillation: deepest exit teaches every exit (KD) and its feature (L2)"
    plot_slot = 9
    # the hint weight g is searched over two decades around mmrazor's 0.03
    PARAMS = {
        "T": temperature(3.0),
        "a": weight(0.3),
        "g": scale(0.03, "g", search=Dim(0.003, 0.3, log=True)),
    }
    uses_features = True

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = (
            "exit features (an early-exit model whose exits have features of their own, of one "
            "size, for the L2 hint)"
        )
        cls.require(model, arch, "exit_features", need)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        a, last = self.params["a"], num_submodels - 1
        ce = self.ce(logits, y)
        if k == last:
            return (1 - a) * ce, {"ce": ce}
        kd = kd_loss(logits, teachers[last], self.params["T"])
        hint = hint_loss(feats[k][0], feats[last][0])
        loss = (1 - a) * ce + a * kd + self.params["g"] * hint
        return loss, {"ce": ce, "kd": kd, "hint": hint}
