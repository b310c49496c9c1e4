"""ztw (Zero Time Waste: Wojcik et al., "Zero Time Waste: Recycling Predictions in Early Exit
Neural Networks", NeurIPS 2021; code gmum/Zero-Time-Waste): cascade connections between the
exits, then a geometric ensemble of the exits fitted after training.

Stage 1 (training): every exit learns from the labels, L = sum_k CE(z_k, y) (joint's loss), on
a network built with cascade connections: exit k also reads LayerNorm(sg[z_{k-1}])
(`benchmark.models.base.CascadeLinks`, reference `ztw_cv/architectures/early_exits/heads.py`,
`ConvCascadingHead`; detach and layer norm on, its defaults). The cascade is an architecture
option (`arch.cascade`, declared by the families with `caps.cascade`) because it changes the
network and its cost; this method turns it on (`ARCH_SETTINGS`), and `--set arch.cascade=false`
is ZTW without cascade.

Stage 2 (`ensemble=on`, a fitting stage of one epoch): for each exit k a geometric ensemble of
exits 0..k (reference `ztw_cv/architectures/early_exits/ztw.py`, `GeometricWeightedEnsemble`):

    e_k = (1 / (k+1)) sum_{j<=k} exp(w_kj) log_softmax(z_j) + b_k

with w_kj ~ N(0, 0.01) and b_k = 0 at the start, fitted by Adam on CE(e_k, y) over the frozen
network's exit logits. Defaults from `ztw_cv_original/train_networks.py` and `model_funcs.py`
(`run_ensb_train`): 501 epochs (`--run_ensb_epochs`), Adam lr 5e-4, batch 512, and the weight
variance penalty at alpha = 0 (every shipped script), hence left out. The fitted weights are the
method's state (in the checkpoint) and the ensembles are what every exit is evaluated as
(`exit_outputs`): validation after the fit, test, early exiting.

Where we differ from the reference, on purpose or by necessity:
- the ensembles are fitted on the VALIDATION split (the reference fits on the augmented training
  set, `eval_aug_train_loader`; the extension `ztw_cv` trains them 2 epochs on the training set);
- the heads are trained together with the trunk from scratch (the reference trains them on a
  frozen, pretrained backbone, with the mean instead of the sum of the heads' CE);
- every exit after the first has a cascade input, the last (the network's own classifier)
  included (in `ztw_cv` the backbone's classifier has none).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.methods import register_method
from benchmark.methods.base import Method, ParamSpec, Stage, choice, integer

_ON = ("ensemble", "on")


def geometric_ensembles(logits: Tensor, weights: Tensor, bias: Tensor) -> Tensor:
    """e_k = mean_{j<=k} exp(w_kj) log_softmax(z_j) + b_k for every exit k: logits (K, N, C),
    weights (K, K) (entries above the diagonal unused), bias (K, C) -> (K, N, C)."""
    k = logits.shape[0]
    mask = torch.ones(k, k, device=logits.device).tril()
    scale = weights.exp() * mask / mask.sum(1, keepdim=True)
    return torch.einsum("kj,jnc->knc", scale, logits.log_softmax(-1)) + bias[:, None, :]


@register_method("ztw")
class ZTW(Method):
    description = "Zero Time Waste: cascaded exits, then geometric ensembles fitted on val"
    plot_slot = 13
    PARAMS = {
        "ensemble": choice("on", "ensemble", ("on", "off")),
        "fit_epochs": replace(integer(501, "fit_epochs"), active_if=_ON),
        "fit_lr": ParamSpec(
            5e-4, lambda v: v > 0, "fit_lr must be > 0", searched=False, active_if=_ON
        ),
        "fit_batch": replace(integer(512, "fit_batch"), active_if=_ON),
    }
    ARCH_SETTINGS = {name: {"cascade": True} for name in ("msdnet", "byot_resnet", "sdn")}

    def __init__(self, params: dict[str, Any] | None = None, label_smoothing: float = 0.0):
        super().__init__(params, label_smoothing)
        self.fitted: tuple[Tensor, Tensor] | None = None  # fitted (weights, bias)

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = (
            "cascade connections (an early-exit model whose exit heads can read the previous "
            "exit's detached logits: capability cascade, arch option cascade)"
        )
        cls.require(model, arch, "cascade", need)

    def stages(self, num_submodels: int) -> list[Stage]:
        train = [Stage(tuple(range(num_submodels)))]
        if self.params["ensemble"] == "off":
            return train
        return [*train, Stage((), epochs=1, fit=True)]

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        return ce, {"ce": ce}

    def fit(self, logits: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
        """Fit every exit's ensemble on (K, N, C) exit logits of the validation split."""
        p = self.params
        g = torch.Generator().manual_seed(seed)
        k, n, c = logits.shape
        weights = (torch.randn(k, k, generator=g) * 0.01).to(logits.device).requires_grad_()
        bias = torch.zeros(k, c, device=logits.device, requires_grad=True)
        opt = torch.optim.Adam([weights, bias], lr=p["fit_lr"])
        batch = int(p["fit_batch"])
        with torch.enable_grad():
            for _ in range(int(p["fit_epochs"])):
                for idx in torch.randperm(n, generator=g).to(logits.device).split(batch):
                    e = geometric_ensembles(logits[:, idx], weights, bias)
                    loss = F.cross_entropy(e.flatten(0, 1), labels[idx].repeat(k)) * k
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.fitted = (weights.detach(), bias.detach())
        with torch.no_grad():
            e = geometric_ensembles(logits, *self.fitted)
            per_exit = [F.cross_entropy(e[j], labels).item() for j in range(k)]
        return {"loss": sum(per_exit), **{f"ensemble_ce/{j}": v for j, v in enumerate(per_exit)}}

    def exit_outputs(self, logits: list[Tensor]) -> list[Tensor]:
        if self.fitted is None:  # before the fit, or without the ensemble
            return logits
        n = len(logits)  # the first n exits (early exiting runs a prefix): their ensembles
        weights, bias = (t.to(logits[0].device) for t in self.fitted)
        stacked = torch.stack([z.float() for z in logits])
        return list(geometric_ensembles(stacked, weights[:n, :n], bias[:n]))

    def get_extra_state(self) -> dict[str, Tensor | None]:
        """The fitted ensemble, kept in the checkpoint with the method's state."""
        w, b = self.fitted if self.fitted is not None else (None, None)
        return {"weights": w, "bias": b}

    def set_extra_state(self, state: dict[str, Tensor | None]) -> None:
        w, b = state["weights"], state["bias"]
        self.fitted = None if w is None else (w, b)
