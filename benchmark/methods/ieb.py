"""ieb (in-place ensemble bootstrapping, DS-Net: Li et al., "Dynamic Slimmable Network", CVPR
2021, §3.3): the sandwich rule whose teacher is an exponential moving average (EMA) of the
model instead of the model itself.

Each step trains n widths w_1 = w_min < w_2 .. w_{n-1} (uniform in [w_min, w_max], drawn from the
step's generator as `sandwich` draws them) < w_n = w_max, largest first, one forward + backward
each, one optimizer step. With z_i (N, C) the model's logits at w_i and e_i (N, C) the EMA
copy's logits at the same width on the same batch (no gradient):

    L = CE_eps(z_n, y) + sum_{1<i<n} KL(softmax(e_n) || softmax(z_i)) + KL(p_min || softmax(z_1))
    p_min = mean_{i=2..n} softmax(e_i)      (`ensemble=on`; `off`: p_min = softmax(e_n))

i.e. the largest learns from the labels (smoothed, eps = `smoothing`), the random widths from the
EMA's largest, and the smallest from the mean of the EMA's softmaxes at the largest and the
random widths (reference changlin31/DS-Net `dyn_slim/apis/train_slim.py` L53-103: `largest`
-> loss_fn, `uniform` -> distill_loss_fn against softmax(EMA largest), `smallest` -> the mean of
the `guide_list` softmaxes with `ensemble_ib`). KL at T = 1, batch mean; the reference's
`SoftTargetCrossEntropy` has the same gradient (the logged value differs by the target's
entropy).

The EMA (timm `ModelEma` as DS-Net's `dyn_slim/utils/helpers.py` has it): a copy of the model
made before the first step, never trained, updated after every optimizer step as
e <- decay e + (1 - decay) theta for every floating-point entry of the state dict (weights and
BN statistics; integer counters are copied), no bias correction. It is method state: saved in
the checkpoint (`get_extra_state`) and restored on resume. It runs as the reference's does, in
eval mode, except on a model whose BN statistics are shared by all widths
(`caps.bn_recalibration`, `us_mobilenet_v1`): such statistics belong to no width, so there it
uses the batch's statistics (train mode, its buffers left unchanged). DS-Net's network keeps
private statistics per width (`DSBatchNorm2d`).

Defaults: decay 0.997 (`model_ema_decay`), eps 0.1 (`smoothing`), n = 4 (`sample_list`:
largest, uniform, uniform, smallest), all from `configs/mobilenetv1_bn_uniform.yml` and
`train_slim.py`. `ensemble=on` is the paper's IEB; the released config has `ensemble_ib: false`
(commit 15cd303, "set default ensemble false"), i.e. `ensemble=off`. Ours: the EMA's random
sub-models in the ensemble are the step's own random widths; in the reference, the EMA's
`set_mode('uniform')` draws its width again from the RNG the student's draw advanced, so the
EMA's random sub-models are drawn independently of the students'. Not taken: its dropout 0.2 on
the largest (our width models have none) and its evaluation of the EMA weights instead of the
model's (`train.py` L529-558): every method here is evaluated on the trained network.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.methods import register_method
from benchmark.methods.base import ParamSpec, StepBatch, choice, kd_loss
from benchmark.methods.bignas import BigNAS, largest_smoothing
from benchmark.methods.sandwich import Sandwich
from benchmark.models import FlexibleModel
from benchmark.models.base import buffers_kept


@register_method("ieb")
class IEB(Sandwich):
    description = "DS-Net in-place ensemble bootstrapping: an EMA copy of the model teaches"
    plot_slot = 18
    PARAMS = {
        "n": Sandwich.PARAMS["n"],
        "decay": ParamSpec(0.997, lambda v: 0 < v < 1, "decay must be in (0, 1)", searched=False),
        "smoothing": largest_smoothing(),
        "ensemble": choice("on", "ensemble", ("on", "off")),
    }

    def __init__(self, params: dict | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(params, label_smoothing)
        # the EMA copy, outside the module tree: no parameter of it reaches the optimizer
        self._ema: list[FlexibleModel] = []
        self._pending: dict[str, Tensor] | None = None  # a restored EMA state, until the copy
        self.guides: dict[int, Tensor] | None = None  # this step's EMA logits by drawn index

    @property
    def ema(self) -> FlexibleModel | None:
        return self._ema[0] if self._ema else None

    def ensure_teacher(self, model: FlexibleModel) -> FlexibleModel:
        """The EMA copy; made from `model` on first use (before the first optimizer step it is
        the initial network), with a restored state loaded into it."""
        if not self._ema:
            ema = copy.deepcopy(model)
            for p in ema.parameters():
                p.requires_grad_(False)
                p.grad = None
            if self._pending is not None:
                ema.load_state_dict(self._pending)
                self._pending = None
            self._ema.append(ema)
        return self._ema[0]

    def draw_submodels(
        self, g: torch.Generator, model: FlexibleModel, batch: StepBatch | None = None
    ) -> list[float]:
        """The sandwich's widths; the EMA's logits at the widths that teach (`guides`)."""
        if batch is None:
            raise ValueError("method ieb runs its EMA teacher on the step's batch: pass it")
        widths = super().draw_submodels(g, model)
        n = len(widths)
        teach = range(1, n) if self.params["ensemble"] == "on" else [n - 1]
        self.guides = self.teacher_logits(model, batch, {i: widths[i] for i in teach})
        return widths

    def teacher_logits(
        self, model: FlexibleModel, batch: StepBatch, widths: dict[int, float]
    ) -> dict[int, Tensor]:
        """The EMA's logits (N, C) float32 at each width, without gradient."""
        ema = self.ensure_teacher(model)
        ema.train(ema.caps.bn_recalibration)  # shared BN statistics: the batch's
        with torch.no_grad(), buffers_kept(ema), batch.autocast():
            return {i: ema.forward_width(batch.x, w).float() for i, w in widths.items()}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """e <- decay e + (1 - decay) theta over the state dict (integer entries copied)."""
        if self.ema is None:
            return
        d = float(self.params["decay"])
        mine = model.state_dict()
        with torch.no_grad():
            for name, e in self.ema.state_dict().items():
                theta = mine[name].detach()
                if e.dtype.is_floating_point:
                    e.mul_(d).add_(theta.to(e.dtype), alpha=1 - d)
                else:
                    e.copy_(theta)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        last = num_submodels - 1
        if k == last:
            ce = self.largest_ce(logits, y)
            return ce, {"ce": ce}
        if self.guides is None:
            raise ValueError("method ieb: no EMA logits for this step (draw_submodels first)")
        if k == 0 and self.params["ensemble"] == "on":
            p = torch.stack([self.guides[i].softmax(1) for i in range(1, num_submodels)])
            target = p.mean(0).log()  # log-probabilities: log_softmax leaves them as they are
        else:
            target = self.guides[last]
        kd = kd_loss(logits, target, 1.0)
        return kd, {"kd": kd}

    largest_ce = BigNAS.largest_ce  # CE_eps(z, y), eps = `smoothing`

    def get_extra_state(self) -> dict[str, Any]:
        """The EMA copy's state dict (None before the first step)."""
        return {"ema": self.ema.state_dict() if self.ema is not None else self._pending}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["ema"] is None:
            return
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        else:
            self._pending = state["ema"]
