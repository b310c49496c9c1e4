"""independent: K separate networks (no weight sharing), each trained alone with CE."""

from benchmark.methods import register_method
from benchmark.methods.base import Method


@register_method("independent")
class Independent(Method):
    description = "K separate networks, each trained alone with CE (no sharing, no KD)"
    plot_slot = 1
    separate_networks = True

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        return ce, {"ce": ce}
