"""ekd (embedded knowledge distillation, Lyu/Zhao et al. 2021) for depth-dynamic networks.

L = sum_k CE(z_k, y) + b * sum_{k<K} KD(z_k, z_K; T) + g * sum_{k<K} sum_s AT(f_k^s, f_K^s):
the full net teaches every sub-net its class posterior (KL) and, at every stage where the two
have feature maps of the same resolution, its spatial attention. Full-net logits and features are
detached (teachers of the same step).

From the paper (abstract): full net -> sub-nets, a KL term for posterior consistency and
"self-attention" distillation between same-resolution features of different depths. Not
published, so ours: KD with temperature T (T^2-scaled batchmean KL, like every method here), and
the attention map and distance of Zagoruyko & Komodakis' attention transfer code:
Q(f) = l2-normalise(mean_c f_c^2) over positions, AT = mean over batch and positions of
(Q_s - Q_t)^2. That distance is small, so g needs 10^2-10^3 to matter: default g = 500 is the
AT code's beta/2 with beta = 1000. Defaults b = 1, T = 1 are the neutral "posterior
consistency" reading; all three are parameters the studies tune.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import DIVERGENCE, Method, scale, temperature


def attention_map(f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W): channel-mean of squared activations, l2-normalised."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def at_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Attention-transfer distance between two same-resolution feature maps (teacher detached)."""
    return (attention_map(student) - attention_map(teacher.detach())).pow(2).mean()


@register_method("ekd")
class EKD(Method):
    description = "embedded KD: full net teaches every sub-net logits (KL) + stage attention"
    plot_slot = 5
    # Search ranges from the research notes: the KL weight b around the neutral 1; the attention
    # weight g needs 10^2-10^3 to matter.
    PARAMS = {
        "T": temperature(1.0),
        "b": scale(1.0, "b", search=Dim(0.0, 2.0)),
        "g": scale(500.0, "g", search=Dim(1.0, 1000.0, log=True)),
        **DIVERGENCE,
    }
    uses_features = True

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        last = num_submodels - 1
        if k == last:
            return ce, {"ce": ce}
        kd = self.distill(logits, teachers[last], self.params["T"])
        pairs = [(s, t) for s, t in zip(feats[k], feats[last]) if s.shape[-2:] == t.shape[-2:]]
        at = sum((at_distance(s, t) for s, t in pairs), logits.new_zeros(()))
        loss = ce + self.params["b"] * kd + self.params["g"] * at
        return loss, {"ce": ce, "kd": kd, "at": at}
