"""joint: every sub-model learns from the labels only, L = sum_k CE(z_k, y)."""

from benchmark.methods import register_method
from benchmark.methods.base import Method


@register_method("joint")
class Joint(Method):
    description = "sum of CE over sub-models, shared weights, no distillation"
    plot_slot = 0

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        return ce, {"ce": ce}
