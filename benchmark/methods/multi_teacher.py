"""multi_teacher: CMT-KD-inspired multi-teacher distillation at the logit level.

Every smaller sub-model s_k (k < K) learns from all larger sub-models of the same step at once,
mixed by learned importance weights:
    p_k   = sum_{j>k} w_kj softmax(z_j / T),   w_k = softmax(pi_k),  pi_k learned (init 0: uniform)
    L_k   = CE(z_k, y) + b * T^2 * KL(p_k || softmax(z_k / T)) + L_imp,k
    L_imp,k = NLL(log sum_{j>k} w_kj softmax(z_j), y)                       (at T = 1)
The full model s_K learns from the labels only: L_K = CE(z_K, y).
Teachers' logits are detached. The importance term moves only pi (it sees detached teachers and
no student logits): pi learns which mixture of teachers best predicts the labels. The KD term
uses the weights detached, so the student never pulls pi towards itself. pi is trained by the
trainer's optimizer at lr/10 (`param_lr_scale`) without weight decay, as CMT-KD trains its
importance factors at a tenth of the learning rate. Learned weights are logged after every
epoch as `method/importance/<student>/<teacher>`.

From CMT-KD (Pham, Hoang & Do, WACV 2023; second-hand, from an independent re-implementation,
since the authors never released their code): teachers are the same network at higher
bit-widths, their knowledge is combined by softmax(pi) with pi learned at lr/10, CE weight
alpha = 1 and KL weight beta = 0.5 (our default b = 0.5). What we do NOT do, so this is
"CMT-KD-inspired", not CMT-KD:
- no feature fusion: CMT-KD mixes the teachers' quantized block outputs and feeds the mixture
  back into the teachers' next blocks; we mix only output distributions and never change a
  teacher's forward pass;
- no attention (feature) loss between the fused features and the student (CMT-KD's gamma = 100);
- no mutual learning: CMT-KD also trains the teachers towards a KDCL-MinLogit ensemble target;
  here the larger sub-models are teachers only and the full model learns from labels alone;
- no HWGQ quantizer (the switchable-precision architecture uses DoReFa), and the teachers are
  the other sub-models of one weight-shared network rather than separate networks;
- how pi is trained is ours: CMT-KD learns pi through the losses that flow through the fused
  features; we give pi its own term (the mixture's label likelihood).
Needs only logits, so it runs on every architecture; the number of importance vectors depends
on K, so they are created in `bind(K)` before the optimizer is built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import EpochContext, Method, scale, temperature


def log_mixture(teachers: list[Tensor], log_w: Tensor, T: float) -> Tensor:
    """log sum_j w_j softmax(z_j / T) per sample and class, computed stably in log space."""
    log_p = torch.stack([F.log_softmax(z / T, dim=1) for z in teachers])  # (J, B, C)
    return torch.logsumexp(log_p + log_w[:, None, None], dim=0)


@register_method("multi_teacher")
class MultiTeacher(Method):
    description = (
        "CMT-KD-inspired: each sub-model learns from all larger ones, mixed by learned importance"
    )
    plot_slot = 6
    # b searched in [0, 2] around CMT-KD's 0.5 (research notes).
    PARAMS = {"T": temperature(1.0), "b": scale(0.5, "b", search=Dim(0.0, 2.0))}
    param_lr_scale = 0.1

    def __init__(self, params: dict | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(params, label_smoothing)
        self.pi: nn.ParameterList | None = None  # created by bind(K)

    def bind(self, num_submodels: int) -> None:
        """One importance vector pi_k per student k < K, over its K-1-k teachers (init 0)."""
        self.pi = nn.ParameterList(
            nn.Parameter(torch.zeros(num_submodels - 1 - k)) for k in range(num_submodels - 1)
        )

    def importance(self, k: int) -> Tensor:
        """w_k = softmax(pi_k): the weight of teacher k+1+i at position i."""
        return self.pi[k].softmax(0)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        if k == num_submodels - 1:
            return ce, {"ce": ce}
        if self.pi is None or len(self.pi) != num_submodels - 1:
            raise RuntimeError(f"multi_teacher: call bind({num_submodels}) before training")
        zs = [teachers[j].detach() for j in range(k + 1, num_submodels)]
        log_w = self.pi[k].log_softmax(0)
        T = self.params["T"]
        target = log_mixture(zs, log_w.detach(), T)
        kd = (
            F.kl_div(
                F.log_softmax(logits / T, dim=1), target, reduction="batchmean", log_target=True
            )
            * T
            * T
        )
        imp = F.nll_loss(log_mixture(zs, log_w, 1.0), y)
        return ce + self.params["b"] * kd + imp, {"ce": ce, "kd": kd, "imp": imp}

    def epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        names = [s.name for s in ctx.model.submodels]
        out = {}
        for k in range(len(self.pi)):
            for i, w in enumerate(self.importance(k).tolist()):
                out[f"method/importance/{names[k]}/{names[k + 1 + i]}"] = w
        return out
