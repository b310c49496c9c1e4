"""The SDN family: the `sdn` architecture (Kaya et al., ICML 2019), the `sdn` method's tau
schedule and IC-only stages, and `pl_distill`'s temperature (Phuong & Lampert, ICCV 2019)."""

from __future__ import annotations

import pytest
import torch
from conftest import smoke_cfg

from benchmark.config import cell_key, resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.methods import METHODS, EpochContext, Stage
from benchmark.models import ARCHS, build_on_meta
from benchmark.models.sdn import REFERENCE_FRACTIONS, InternalClassifier, layout
from benchmark.training import checkpoint
from benchmark.training.build import make_model
from benchmark.training.train import CellOptions, train_cell

# Cumulative MMACs per exit at paper size (CIFAR-10, 32 px, width 1), anytime cost: the trunk up
# to the exit plus every head up to it. The backbone's cost fraction at each IC's block is what
# the reference's add_ic lists approximate (15 / 30 / 45 / 60 / 75 / 90 %).
PAPER_COSTS = {
    "resnet56": {
        "mmacs": [19.319, 38.196, 56.027, 74.907, 92.743, 111.627, 125.784],
        "fractions": [0.154, 0.304, 0.445, 0.596, 0.737, 0.887],
        "names": ["ic1_block4", "ic2_block8", "ic3_block12", "ic4_block16", "ic5_block20",
                  "ic6_block24", "final"],
    },
    "vgg16_bn": {
        "mmacs": [39.528, 96.172, 152.836, 190.626, 247.331, 285.1, 313.941],
        "fractions": [0.126, 0.306, 0.487, 0.607, 0.788, 0.908],
        "names": ["ic1_conv2", "ic2_conv4", "ic3_conv6", "ic4_conv7", "ic5_conv9", "ic6_conv10",
                  "final"],
    },
}  # fmt: skip


def paper_sdn(backbone: str, **over):
    return build_on_meta("sdn", ARCHS.get("sdn").resolve({"backbone": backbone, **over}), 10, 32)


@pytest.mark.parametrize("backbone", list(PAPER_COSTS))
def test_sdn_cost_table_at_paper_size(backbone):
    """Each IC sits within one block of its reference fraction of the backbone's MACs."""
    model, want = paper_sdn(backbone), PAPER_COSTS[backbone]
    costs = count_costs(model, 32)
    assert [c.mmacs for c in costs] == pytest.approx(want["mmacs"], abs=1e-3)
    assert [s.name for s in model.submodels] == want["names"]
    fr = model.fractions
    assert [fr[p] for p in model.positions] == pytest.approx(want["fractions"], abs=1e-3)
    for p, ref in zip(model.positions, REFERENCE_FRACTIONS):
        assert fr[p - 1] <= ref <= fr[p + 1], (backbone, p, ref)


@pytest.mark.parametrize("backbone", list(PAPER_COSTS))
def test_sdn_block_costs_add_up_to_the_counted_backbone(backbone):
    """The shape-only block MACs (used to place fractional ICs) sum to the counted cost of the
    plain backbone (the final exit alone, no IC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = paper_sdn(backbone).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_sub(torch.empty(1, 3, 32, 32, device="meta"), model.num_submodels - 1)
    assert sum(m for _, _, m in layout(backbone, 1.0, 32, 10)) == counter.get_total_flops() // 2


def test_sdn_fractional_ics_land_on_the_nearest_block():
    model = paper_sdn("resnet56", ics=[0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    assert model.positions == [3, 7, 11, 15, 19, 23]  # the reference's own list
    assert paper_sdn("resnet56", ics=[0.5]).positions == [12]  # 0.483 < 0.5 < 0.5205: nearer


def test_internal_classifier_mixes_max_and_avg_pooling_to_4x4():
    torch.manual_seed(0)
    ic = InternalClassifier(8, 3, 5)
    x = torch.randn(2, 3, 8, 8)
    a = ic.alpha
    mixed = a * torch.nn.functional.max_pool2d(x, 2) + (1 - a) * torch.nn.functional.avg_pool2d(
        x, 2
    )
    z, reduced = ic(x)
    assert reduced.shape == (2, 3, 4, 4) and ic.linear.in_features == 48
    assert torch.allclose(z, ic.linear(mixed.flatten(1)))
    small = InternalClassifier(2, 3, 5)  # below 4 px: no reduction, no alpha
    assert not hasattr(small, "alpha") and small.linear.in_features == 12


def test_sdn_all_exits_come_from_one_pass():
    cfg = smoke_cfg("sdn", "joint", "unused")
    model = make_model(cfg, 10, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    together = model.forward_all(x)
    for k in range(model.num_submodels):
        assert torch.allclose(together[k], model.forward_sub(x, k), atol=1e-6)


@pytest.mark.parametrize(
    "over,error",
    [
        ({"arch.ics": [0.3, 0.2]}, "strictly increasing and inside (0, 1)"),
        ({"arch.ics": [0.0, 0.5]}, "strictly increasing and inside (0, 1)"),
        ({"arch.ics": [0.5, 1.0]}, "strictly increasing and inside (0, 1)"),
        ({"arch.ics": [0.1, 0.11]}, "two ICs on one block"),
        ({"arch.ics": "all"}, "'reference' or a list of cost fractions, got 'all' (str)"),
        ({"arch.backbone": "resnet110"}, "one of resnet56, vgg16_bn, got 'resnet110'"),
        ({"arch.width": 0}, "width must be a positive number, got 0 (int)"),
        ({"method.training": "ic"}, "training must be one of sdn, ic_only, got 'ic'"),
        ({"method.c_max": 1.5}, "c_max must be in (0, 1]"),
    ],
)
def test_sdn_bad_input_is_refused_at_resolve(over, error):
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        resolve("sdn", "synthetic", "sdn", 0, "smoke", over)


def test_sdn_refuses_methods_it_cannot_take_with_their_reason():
    for method, why in [
        ("byot", "needs exit features"),
        ("hsd", "needs saliency-ranked channels"),
        ("imta", "trains an MSDNet"),
    ]:
        with pytest.raises(IncompatibleError, match=why):
            resolve("sdn", "synthetic", method, 0, "smoke")
    with pytest.raises(IncompatibleError, match="architecture msdnet is not an SDN"):
        resolve("msdnet", "synthetic", "sdn", 0, "smoke", {"method.training": "ic_only"})
    with pytest.raises(IncompatibleError, match="needs exits of one trunk"):
        resolve("us_mobilenet_v1", "synthetic", "pl_distill", 0, "smoke")


# --- the sdn method: tau per epoch, IC-only stages ------------------------------------------
def _ctx(model, stage: Stage, epoch: int, epochs: int) -> EpochContext:
    return EpochContext(model, stage, epoch, epochs, lambda e: iter(()), torch.no_grad)


def test_sdn_tau_follows_the_reference_schedule_over_the_epochs():
    """model_funcs.sdn_train: tau = min(C, 0.01 + e C / E), e = 1..E at each epoch's start,
    C = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9) for six ICs."""
    method, C, E = METHODS.get("sdn")({}), [0.15, 0.3, 0.45, 0.6, 0.75, 0.9], 5
    z, y = torch.zeros(2, 10, dtype=torch.float64), torch.tensor([0, 1])
    for epoch in range(E):
        method.epoch_start(_ctx(None, Stage(tuple(range(7))), epoch, E))
        for i in range(6):
            _, terms = method.loss(i, z, {}, y, 7)
            want = min(C[i], 0.01 + (epoch + 1) * C[i] / E)
            assert terms["tau"].item() == pytest.approx(want, rel=1e-12), (epoch, i)
    assert terms["tau"].item() == pytest.approx(0.9)  # the last epoch reaches C


def test_sdn_ic_only_freezes_the_backbone_in_the_ic_stage(tracking_uri, tmp_path):
    """Stage 1 trains the backbone and final classifier (ICs untouched); stage 2 only the ICs
    (every backbone weight as stage 1 left it)."""
    cfg = smoke_cfg("sdn", "sdn", tmp_path / "runs", train__epochs=1, method__training="ic_only")
    ckpt = checkpoint.cell_dir(cfg, "flexbench", cell_key(cfg)) / "checkpoint.pt"
    snaps = []
    opts = CellOptions(
        tracking_uri=tracking_uri,
        progress=False,
        epoch_callback=lambda e, m: snaps.append(checkpoint.load(ckpt)["model"]),
    )
    train_cell(cfg, opts)
    init = make_model(cfg, 10, 32).state_dict()
    weights = [n for n in init if "running" not in n and "num_batches" not in n]
    ics = {n for n in weights if n.startswith("heads.") and not n.startswith("heads.6.")}
    changed = [{n for n in weights if not torch.equal(a[n], b[n])} for a, b in
               ((init, snaps[0]), (snaps[0], snaps[1]))]  # fmt: skip
    assert changed[0] and not changed[0] & ics
    assert changed[1] == ics


# --- pl_distill: the temperature ------------------------------------------------------------
def test_pl_distill_temperature_follows_the_reference_rule_over_steps():
    """main.py DistillationBasedLoss: T starts at 1; after a step whose teacher has mean max
    probability (at the current T) > 0.5, T *= 1.05; the step's own loss uses T before it."""
    method = METHODS.get("pl_distill")({})
    y = torch.tensor([0, 1])
    confident = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])
    unsure = torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.2, 0.0]])
    T, seen = 1.0, []
    for teacher in [confident] * 4 + [unsure] * 2 + [confident] * 2:
        _, terms = method.loss(2, teacher, {}, y, 3)
        p = torch.softmax(teacher / T, 1).amax(1).mean().item()
        assert terms["T"].item() == pytest.approx(T) and terms["teacher_maxprob"].item() == (
            pytest.approx(p)
        )
        _, kd_terms = method.loss(0, torch.zeros(2, 3), {2: teacher}, y, 3)  # same step's T
        seen.append(float(method.temperature))
        T = T * 1.05 if p > 0.5 else T
        assert seen[-1] == pytest.approx(T)
    assert seen[3] == pytest.approx(1.05**4) and seen[5] == seen[3] and seen[7] > seen[5]


def test_pl_distill_temperature_survives_checkpoint_and_resume(tracking_uri, tmp_path):
    """The temperature is method state: a run stopped after its first epoch and resumed ends at
    the T of the uninterrupted run (and T moved, so the check means something)."""
    sets = {"train__epochs": 2, "method__maxprob": 0.11}

    def run(experiment: str, stop_after: int | None) -> list[float]:
        cfg = smoke_cfg("sdn", "pl_distill", tmp_path / experiment, **sets)
        ckpt = checkpoint.cell_dir(cfg, experiment, cell_key(cfg)) / "checkpoint.pt"
        temps = []

        def record(epoch: int, metrics: dict) -> None:
            temps.append(float(checkpoint.load(ckpt)["method"]["temperature"]))
            assert metrics["method/temperature"] == pytest.approx(temps[-1])
            if epoch == stop_after:
                raise KeyboardInterrupt

        opts = dict(tracking_uri=tracking_uri, experiment=experiment, progress=False)
        try:
            train_cell(cfg, CellOptions(**opts, epoch_callback=record))
        except KeyboardInterrupt:
            train_cell(cfg, CellOptions(**opts, epoch_callback=record, resume=True))
        return temps

    whole, resumed = run("whole", None), run("resumed", 0)
    assert resumed == pytest.approx(whole) and whole[-1] > whole[0] > 1.0


# the other families' cells are slow: tests/test_train.py's matrix steps every pair already
OTHER_FAMILIES = [pytest.param(a, marks=pytest.mark.slow) for a in ("msdnet", "byot_resnet")]


@pytest.mark.parametrize("arch", ["sdn", *OTHER_FAMILIES])
@pytest.mark.parametrize("method", ["sdn", "pl_distill"])
def test_smoke_cell_of_the_sdn_family_methods(arch, method, tracking_uri, tmp_path):
    """A whole cell (train, validate, checkpoint, final test evaluation, MLflow record) of each
    new method on the early-exit families it applies to: every exit gets a finite test top-1."""
    cfg = smoke_cfg(arch, method, tmp_path / "runs", train__epochs=1)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    model = make_model(cfg, 10, 32)
    tops = {r["name"]: r["top1"] for r in result.rows}
    assert set(tops) == {s.name for s in model.submodels}
    assert all(0.0 <= v <= 100.0 for v in tops.values())


def test_sdn_smoke_profile_trains_unit_weight_methods_without_diverging(tracking_uri, tmp_path):
    """`make demo`'s sdn cells: the smoke profile's own schedule (3 epochs x 20 steps, sdn's
    smoke lr) trains joint (a weight of 1 on every exit) to the end; at the profile's lr 0.1
    its loss turned non-finite at step 15 on every seed tried."""
    cfg = resolve(
        "sdn", "synthetic", "joint", profile="smoke",
        overrides={"runtime.workdir": str(tmp_path), "runtime.threads": 1,
                   "runtime.device": "cpu", "runtime.latency_repeats": 1},
    )  # fmt: skip
    assert cfg["train"]["lr"] == 0.02
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert len(result.rows) == 7
