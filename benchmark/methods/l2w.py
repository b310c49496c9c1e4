"""l2w (L2W-DEN: Han et al., "Learning to Weight Samples for Dynamic Early-exiting Networks",
ECCV 2022; code LeapLabTHU/L2W-DEN, `tools/main_cifar_DDP.py`, `train`, L287-460): a small
meta-network weights every sample's loss at every exit, trained so that each exit does well on
the samples it will receive at test time.

Each step splits the batch into halves (x1, y1), (x2, y2). With l_nk the CE of sample n at exit
k on half 1 and m = MLP_tanh(l) (N1, K) the meta-network's output (input type `loss`; the
reference's `models/weight_predict.py`, Linear-ReLU x layers, Linear, tanh):

    w = 1 + eps (m - mean_k m)                     (constraint `col`: centred per sample)
    L(theta) = sum_k mean_n w_nk l_nk(theta)

Meta step (every step, `--meta_interval 1`): the look-ahead theta' = theta - lr grad L(theta),
kept differentiable in the meta-network's parameters (`torch.func.functional_call`,
`create_graph`); on half 2 the look-ahead network's exits get the samples of the target exit
distribution (q_k ~ p^k, k = 1..K, `utils.calc_target_probs`): exit 1 its floor(q_1 N2) most
confident samples, each next exit its floor(q_k N2) most confident among those left, the last
exit the rest; the meta loss is the sum over exits of the mean CE on their samples, and one Adam
step updates the meta-network. Main step: L(theta) on half 1 only, with w from the updated
meta-network (no gradient into it).

Defaults: the README's CIFAR-100 MSDNet command (hidden size 500, 1 layer, eps 0.8, meta lr 1e-4,
meta weight decay 1e-4, `--target_p_index 15`: p = 15 / 20 = 0.75, input `loss`, constraint
`col`). The meta-network and its Adam state are the method's state (in the checkpoint); they
stay out of the trainer's optimizer (their gradients are cleared after the meta step).

Not reproduced exactly: the reference then repeats both steps with the halves swapped (its
"part 2": a second meta step on half 1 and a second SGD update on half 2); we do part 1, one
update per batch. Its look-ahead is the real optimizer's step (`tools/meta.py`, `MetaSGD`:
momentum buffer and weight decay); ours is plain SGD at the step's learning rate. Its meta lr
follows a cosine schedule; ours is constant. The look-ahead passes leave the network's
BatchNorm running statistics unchanged (the reference runs them on a copy), and the meta-step
forwards run in the step's autocast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from benchmark.dim import Dim
from benchmark.methods import register_method
from benchmark.methods.base import Method, ParamSpec, integer


def meta_net(num_exits: int, hidden: int, layers: int) -> nn.Sequential:
    """The reference `MLP_tanh`: K -> hidden (ReLU) -> (layers-1 more) -> K, tanh."""
    mods: list[nn.Module] = [nn.Linear(num_exits, hidden), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, num_exits), nn.Tanh())


def target_probs(num_exits: int, p: float) -> list[float]:
    """q_k = p^k / sum_j p^j, k = 1..K (reference `calc_target_probs`)."""
    raw = [p**k for k in range(1, num_exits + 1)]
    return [v / sum(raw) for v in raw]


def exit_assignment(logits: list[Tensor], q: list[float]) -> list[Tensor]:
    """Sample indices each exit receives on a held-out batch (reference L383-405): exit k takes
    the floor(q_k N) most confident (max softmax) samples not taken by an earlier exit, the last
    exit all that are left. `logits`: [(N, C), ...] smallest first."""
    n = logits[0].shape[0]
    taken = torch.zeros(n, dtype=torch.bool, device=logits[0].device)
    out = []
    for k, z in enumerate(logits):
        order = z.detach().softmax(1).amax(1).argsort(descending=True)
        free = order[~taken[order]]
        pick = free if k == len(logits) - 1 else free[: math.floor(n * q[k])]
        taken[pick] = True
        out.append(pick)
    return out


def sample_losses(logits: list[Tensor], y: Tensor, smoothing: float = 0.0) -> Tensor:
    """Per-sample CE (with label smoothing `smoothing`) of every exit [(N, C), ...], (N, K)."""
    return torch.stack(
        [
            F.cross_entropy(z.float(), y, reduction="none", label_smoothing=smoothing)
            for z in logits
        ],
        1,
    )


@register_method("l2w")
class L2W(Method):
    description = "L2W-DEN: a meta-network weights each sample per exit (look-ahead meta step)"
    plot_slot = 15
    PARAMS = {
        "eps": ParamSpec(0.8, lambda v: v >= 0, "eps must be >= 0", Dim(0.1, 1.0)),
        "hidden": integer(500, "hidden"),
        "layers": integer(1, "layers"),
        "meta_lr": ParamSpec(1e-4, lambda v: v > 0, "meta_lr must be > 0", Dim(1e-5, 1e-3, True)),
        "meta_wd": ParamSpec(1e-4, lambda v: v >= 0, "meta_wd must be >= 0", searched=False),
        "p": ParamSpec(0.75, lambda v: v > 0, "p must be > 0", Dim(0.25, 1.0)),
    }
    owns_step = True
    reads_earlier_exits = True  # every exit's per-sample loss is the meta-network's input

    def __init__(self, params: dict[str, Any] | None = None, label_smoothing: float = 0.0):
        super().__init__(params, label_smoothing)
        self.net: nn.Sequential | None = None
        self.meta_opt: torch.optim.Adam | None = None

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        need = "early exits from one pass (every exit's loss of each sample from one forward)"
        cls.require(model, arch, "single_pass", need)

    def bind(self, num_submodels: int) -> None:
        p = self.params
        self.net = meta_net(num_submodels, int(p["hidden"]), int(p["layers"]))
        self.meta_opt = torch.optim.Adam(
            self.net.parameters(), lr=p["meta_lr"], weight_decay=p["meta_wd"]
        )

    def weights(self, losses: Tensor) -> Tensor:
        """w = 1 + eps (m - mean_k m), m = meta-net(losses detached): (N, K) -> (N, K)."""
        m = self.net(losses.detach())
        return 1 + self.params["eps"] * (m - m.mean(1, keepdim=True))

    def meta_loss(self, model: nn.Module, x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor,
                  lr: float, weights: Tensor | None = None) -> Tensor:  # fmt: skip
        """The held-out loss of the look-ahead network theta - lr grad L(theta) on (x2, y2),
        differentiable in the sample weights of half 1 (`weights` (N1, K), default: the
        meta-network's, so differentiable in its parameters)."""
        params = dict(model.named_parameters())
        # copies: the look-ahead passes leave the network's BN running statistics unchanged
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        outs = functional_call(model, {**params, **buffers}, (x1,))
        losses = sample_losses(outs, y1, self.label_smoothing)
        w = self.weights(losses) if weights is None else weights
        grads = torch.autograd.grad(
            (w * losses).mean(0).sum(),
            list(params.values()),
            create_graph=True,
            allow_unused=True,
        )  # fmt: skip  (parameters no exit reads, e.g. MSDNet's pruned scales, stay as they are)
        ahead = {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads)}
        out = functional_call(model, {**ahead, **buffers}, (x2,))
        picks = exit_assignment(out, target_probs(len(out), self.params["p"]))
        return sum(F.cross_entropy(z[i].float(), y2[i]) for z, i in zip(out, picks) if len(i))

    def meta_step(self, model: nn.Module, x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor,
                  lr: float) -> Tensor:  # fmt: skip
        """One Adam step of the meta-network on `meta_loss`; returns that loss (detached). The
        network's parameters get no gradient from it."""
        meta = self.meta_loss(model, x1, y1, x2, y2, lr)
        meta_params = list(self.net.parameters())
        for p, g in zip(meta_params, torch.autograd.grad(meta, meta_params)):
            p.grad = g
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)  # out of the trainer's optimizer step
        return meta.detach()

    def train_step(self, model, x, y, lr):
        x1, x2 = x.chunk(2)
        y1, y2 = y.chunk(2)
        meta = self.meta_step(model, x1, y1, x2, y2, lr)
        logits = model.forward_all(x1)
        seen = {j: z.detach() for j, z in enumerate(logits)}
        total, terms = torch.zeros((), device=x.device), {}
        for k, z in enumerate(logits):
            loss_k, terms[k] = self.loss(k, z, seen, y1, len(logits))
            terms[k]["meta"] = meta
            total = total + loss_k
        total.backward()
        return total.detach(), terms, seen

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        """The main update's loss of exit k, mean_n w_nk l_nk, with w from the meta-network
        (no gradient into it) on every exit's per-sample CE (the other exits' from `teachers`,
        this step's detached logits)."""
        zs = [logits if j == k else teachers[j] for j in range(num_submodels)]
        losses = sample_losses(zs, y, self.label_smoothing)
        with torch.no_grad():
            w = self.weights(losses)[:, k]
        weighted = (w * losses[:, k]).mean()
        return weighted, {"weighted_ce": weighted, "ce": losses[:, k].mean()}

    def get_extra_state(self) -> dict[str, Any]:
        """The meta-network's Adam state (its weights are in the state dict already)."""
        return {"meta_opt": self.meta_opt.state_dict() if self.meta_opt else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["meta_opt"] is not None:
            self.meta_opt.load_state_dict(state["meta_opt"])
