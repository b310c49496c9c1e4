"""sdn (Kaya, Hong & Dumitras, "Shallow-Deep Networks", ICML 2019): the SDN training of a
multi-exit network, or the IC-only training of its internal classifiers.

SDN training (reference yigitcankaya/Shallow-Deep-Networks, `model_funcs.py`: `sdn_train`,
`sdn_training_step`), with exits 1..K (K the final classifier) and epochs e = 1..E:

    L = sum_{i<K} tau_i(e) CE(z_i, y) + CE(z_K, y),   tau_i(e) = min(C_i, 0.01 + e C_i / E)

The reference hard-codes C = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9) for its six ICs (the cost
fractions they sit at); ours is C_i = c_max * i / (K - 1), which is exactly that list for six ICs
at the default c_max = 0.9 and spreads the same ramp over any other number of exits (msdnet,
byot_resnet). tau is set once per epoch, at its start (the reference computes it at the top of
each epoch, e counted from 1), from the epoch and the stage's epoch count (`epoch_start`), so a
resumed cell recomputes it. Before the trainer has called `epoch_start`, tau = C (e = E).

IC-only training (`training: ic_only`; reference `train_networks.train(..., ic_only_sdn=True)`,
`aux_funcs.freeze_except_outputs`, `sdn_ic_only_step`): the reference loads a CNN trained
before (the same backbone, its own 100-epoch run), freezes every backbone weight (stem, blocks
and final classifier) and trains only the ICs with L = sum_{i<K} CE(z_i, y), using Adam at lr 1e-3
(weight decay as the backbone's), 25 epochs, x0.1 at epoch 15 (`get_lr_params`). Here it is two
stages of one cell: stage 1 trains the backbone with its final classifier alone (CE(z_K, y)),
stage 2 freezes all of that (`requires_grad` off, set in `epoch_start`) and trains the ICs. Not
as the reference: both stages run the cell's optimizer and schedule (SGD, `train.epochs` per
stage); the trainer has one optimizer kind. As in the reference, the frozen backbone stays in
train mode, so its BatchNorm statistics keep moving in stage 2.
"""

from __future__ import annotations

from torch import nn

from benchmark.errors import IncompatibleError
from benchmark.methods import register_method
from benchmark.methods.base import EpochContext, Method, ParamSpec, Stage, choice
from benchmark.models.sdn import SDN

TAU0 = 0.01  # tau's offset at epoch 0 (`model_funcs.sdn_train`)


def tau(c: list[float], epoch: int, epochs: int) -> list[float]:
    """tau_i = min(C_i, 0.01 + e C_i / E) with e = epoch (1-based) of E (`sdn_train`)."""
    return [min(ci, TAU0 + epoch * ci / epochs) for ci in c]


@register_method("sdn")
class SDNMethod(Method):
    description = "SDN: ICs' CE weighted by a ramp tau_i(e) to C_i, plus the final CE; or IC-only"
    plot_slot = 10
    PARAMS = {
        "training": choice("sdn", "training", ("sdn", "ic_only")),
        # the largest IC weight C_{K-1} (the reference's 0.9); a schedule setting, not searched
        "c_max": ParamSpec(
            0.9, lambda v: 0 < v <= 1, "c_max must be in (0, 1]", searched=False,
            active_if=("training", "sdn"),
        ),
    }  # fmt: skip

    def __init__(self, params: dict | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(params, label_smoothing)
        self.position = (1, 1)  # (epoch 1-based, epochs): tau = C until epoch_start sets it

    @classmethod
    def check_model(cls, model: nn.Module, arch: str) -> None:
        """Any early-exit model (IC-only: an SDN, `check_params`)."""
        cls.require(model, arch, "early_exit", "exits of one trunk (an early-exit model)")

    @classmethod
    def check_params(cls, model: nn.Module, arch: str, params: dict) -> None:
        if params.get("training") == "ic_only" and not isinstance(model, SDN):
            raise IncompatibleError(
                f"method sdn with training=ic_only freezes a backbone and trains its internal "
                f"classifiers; architecture {arch} is not an SDN; use sdn (or training=sdn)"
            )

    def weights(self, num_submodels: int) -> list[float]:
        """C_i = c_max i / (K - 1) for the K - 1 ICs, smallest first."""
        n = num_submodels - 1
        return [self.params["c_max"] * (i + 1) / n for i in range(n)]

    def stages(self, num_submodels: int) -> list[Stage]:
        if self.params["training"] == "sdn":
            return [Stage(tuple(range(num_submodels)))]
        return [Stage((num_submodels - 1,)), Stage(tuple(range(num_submodels - 1)))]

    def epoch_start(self, ctx: EpochContext) -> None:
        """SDN training: this epoch's tau. IC-only: in the ICs' stage, freeze the backbone."""
        self.position = (ctx.epoch + 1, ctx.epochs)
        if self.params["training"] == "ic_only" and len(ctx.model.submodels) - 1 not in (
            ctx.stage.train
        ):
            ics = {id(p) for p in ctx.model.heads[:-1].parameters()}
            for p in ctx.model.parameters():
                p.requires_grad_(id(p) in ics)

    def loss(self, k, logits, teachers, y, num_submodels, feats=None):
        ce = self.ce(logits, y)
        if k == num_submodels - 1 or self.params["training"] == "ic_only":
            return ce, {"ce": ce}
        t = tau(self.weights(num_submodels), *self.position)[k]
        return t * ce, {"ce": ce, "tau": ce.new_tensor(t)}
