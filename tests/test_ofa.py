"""Once-for-All: the elastic MobileNetV3 (kernel transformation, depth, expand ratio, channel
sorting, the cost table of its named sub-networks by formula) and progressive shrinking (the
phase schedule, draws seeded and inside the phase's choices, the frozen teacher, end to end at
smoke with a resume, and the bad input refused before any work)."""

from __future__ import annotations

import pytest
import torch
from conftest import smoke_cfg
from torch.nn import functional as F

from benchmark.config import resolve
from benchmark.costs.flops import count_costs, subnet_costs
from benchmark.errors import CellPruned, ConfigError, IncompatibleError
from benchmark.methods import METHODS, EpochContext
from benchmark.methods.ofa_ps import PHASES, full_network, phase_choices
from benchmark.models import ARCHS, build_model, build_on_meta
from benchmark.models.ofa_mobilenet_v3 import ElasticDepthwise
from benchmark.models.slimmable_mobilenet_v1 import make_divisible
from benchmark.record import schema
from benchmark.training import checkpoint
from benchmark.training.build import make_method, make_model
from benchmark.training.plan import plan_cell, split_epochs
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, train_cell

ARCH = "ofa_mobilenet_v3"
TINY = {"width_mult": 0.25, "stem_stride": 2}


def tiny(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, ARCHS.get(ARCH).resolve({**TINY, **over}), 10, 32)


# --- the cost table at paper size, by formula ---------------------------------------------------
# (width, stride, squeeze-excite) of the five elastic stages at CIFAR strides
STAGES = [(24, 1, False), (40, 2, True), (80, 2, False), (112, 1, True), (160, 2, True)]


def formula(k: int, d: int, e: int, size: int = 32, classes: int = 10) -> tuple[int, int]:
    """(MACs, parameters) of the uniform sub-network (kernel k, depth d, expand e everywhere)
    of the paper-size network (width_mult 1) at `size` px, stem stride 1:
    stem 3x3 3 -> 16 (h^2 16 3 9 MACs; 16 x 27 weights + BN 2 x 16), first block depthwise
    3x3 + pointwise 16 -> 16; then per block of stage (c, s) with c_in in, mid =
    make_divisible(round(c_in e), 8), h -> h / s: expand h^2 c_in mid, depthwise h'^2 mid k^2,
    projection h'^2 mid c (params c_in mid + mid k^2 + mid c + BN 2 mid + 2 mid + 2 c), and with
    SE m = make_divisible(mid // 4, 8): 2 mid m MACs, 2 mid m + mid + m params; final expand
    h^2 160 960 (+ BN 2 x 960), feature mix 960 x 1280, classifier 1280 x classes + bias."""
    h, c_in = size, 16
    macs = h * h * 16 * 3 * 9 + h * h * 16 * 9 + h * h * 16 * 16
    params = 3 * 16 * 9 + 2 * 16 + 16 * 9 + 2 * 16 + 16 * 16 + 2 * 16
    for c, s, se in STAGES:
        for j in range(d):
            mid = make_divisible(round(c_in * e), 8)
            h_out = h // (s if j == 0 else 1)
            macs += h * h * c_in * mid + h_out * h_out * mid * (k * k + c)
            params += c_in * mid + 2 * mid + mid * k * k + 2 * mid + mid * c + 2 * c
            if se:
                m = make_divisible(mid // 4, 8)
                macs += 2 * mid * m
                params += 2 * mid * m + mid + m
            c_in, h = c, h_out
    macs += h * h * 160 * 960 + 960 * 1280 + 1280 * classes
    params += 160 * 960 + 2 * 960 + 960 * 1280 + 1280 * classes + classes
    return macs, params


# the stated table (CIFAR-10, 32 px, paper size): name -> (MMACs, params in M), from `formula`
PAPER_TABLE = {
    "k3-d2-e3": (35.293824, 2.142602),
    "k3-d3-e4": (68.725760, 3.212946),
    "k5-d3-e4": (77.130752, 3.283602),
    "k5-d4-e6": (153.643776, 6.177690),
    "k7-d4-e6": (179.706624, 6.396570),
}


def test_cost_table_of_the_named_subnetworks_at_paper_size():
    cfg = resolve(ARCH, "cifar10", "ofa_ps", 0, "paper")
    params = {k: v for k, v in cfg["arch"].items() if k != "name"}
    model = build_on_meta(ARCH, params, 10, 32)
    counted = {c.name: (c.mmacs, c.params_m) for c in count_costs(model, 32)}
    assert list(counted) == list(PAPER_TABLE)  # smallest first
    for (name, (mmacs, params_m)), sub in zip(PAPER_TABLE.items(), params["subnets"]):
        macs, n = formula(*sub)
        assert (macs / 1e6, n / 1e6) == pytest.approx((mmacs, params_m), abs=1e-9), name
        assert counted[name] == pytest.approx((mmacs, params_m), abs=1e-9), name
    # any sub-network: the same counter through forward_subnet
    space = model.caps.elastic
    (cost,) = subnet_costs(model, [space.uniform(7, 2, 3.0)], ["k7-d2-e3"], 32)
    assert (cost.mmacs * 1e6, cost.params_m * 1e6) == pytest.approx(formula(7, 2, 3), abs=1e-3)


def test_info_prints_the_cost_table(capsys):
    from benchmark import cli

    assert cli.main(["info", "--arch", ARCH, "--profile", "paper", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name, (mmacs, params_m) in PAPER_TABLE.items():
        assert f"{name:10s} {mmacs:10.3f}" in out and f"{params_m:11.4f}" in out, name


# --- the elastic network ------------------------------------------------------------------------
def test_kernel_transformation_is_the_reference_centre_crop_times_the_matrices():
    torch.manual_seed(0)
    conv = ElasticDepthwise(6, (3, 5, 7), 1)
    with torch.no_grad():
        conv.weight.normal_()
        assert torch.equal(conv.filters(6, 5), conv.weight[:, :, 1:6, 1:6])  # identity at init
        conv.transform_7to5.normal_()
        conv.transform_5to3.normal_()
    w5 = F.linear(conv.weight[:, 0, 1:6, 1:6].reshape(6, 25), conv.transform_7to5)
    w3 = F.linear(w5.reshape(6, 5, 5)[:, 1:4, 1:4].reshape(6, 9), conv.transform_5to3)
    assert torch.equal(conv.filters(6, 7), conv.weight)
    assert torch.allclose(conv.filters(6, 5).reshape(6, 25), w5, atol=1e-5)
    assert torch.allclose(conv.filters(4, 3).reshape(4, 9), w3[:4], atol=1e-5)
    x = torch.randn(2, 4, 8, 8)
    assert conv(x, 3).shape == (2, 4, 8, 8) and conv.active_num_params() == 4 * 9


def test_depth_runs_the_first_blocks_and_expand_the_first_hidden_channels():
    model = tiny().eval()
    space = model.caps.elastic
    ran: list[int] = []
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda *_, i=i: ran.append(i))
    s = space.uniform(5, 2, 3.0)
    model.forward_subnet(torch.randn(1, 3, 32, 32), s)
    assert ran == [i * 4 + j for i in range(5) for j in range(2)]
    assert space.active_blocks(s) == ran
    block = model.blocks[1]
    c_in = block.expand_conv.weight.shape[1]
    assert block.mid(c_in, 3.0) == make_divisible(round(c_in * 3), 8) < block.mid(c_in, 6.0)
    # a sub-network's output does not depend on the hidden channels beyond its own
    with torch.no_grad():
        block.expand_conv.weight[block.mid(c_in, 3.0) :] = 7.0
    x = torch.randn(2, 3, 32, 32)
    before = model.forward_subnet(x, s)
    with torch.no_grad():
        block.expand_conv.weight[block.mid(c_in, 3.0) :] = -3.0
    assert torch.equal(model.forward_subnet(x, s), before)


def test_channel_sorting_keeps_the_function_and_the_trained_prefix():
    """Sorting hidden channels by importance leaves the full network's output unchanged, sorts
    each group, and keeps the channels of a trained expand ratio in its prefix (their set;
    the SE's reduced channels are sorted over all of them, as the reference does)."""
    model = tiny()
    model.eval()  # BN running statistics are permuted with the channels
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    space, x = model.caps.elastic, torch.randn(2, 3, 32, 32)
    full = full_network(space)
    want_full = model.forward_subnet(x, full)
    b = model.blocks[0]  # stage 0: no SE
    c_in = b.expand_conv.weight.shape[1]
    k4 = b.mid(c_in, 4.0)
    prefix = sorted(b.project.weight.abs().sum((0, 2, 3))[:k4].tolist())
    model.sort_channels((4.0, 6.0))
    assert torch.allclose(model.forward_subnet(x, full), want_full, atol=1e-4)
    imp = b.project.weight.abs().sum((0, 2, 3))
    assert sorted(imp[:k4].tolist()) == pytest.approx(prefix)
    assert (imp[:k4].diff() <= 0).all() and (imp[k4:].diff() <= 0).all()
    model.sort_channels((6.0,))  # nothing kept: one order over all hidden channels
    assert torch.allclose(model.forward_subnet(x, full), want_full, atol=1e-4)
    assert (b.project.weight.abs().sum((0, 2, 3)).diff() <= 0).all()


def test_named_subnetworks_are_the_submodels_smallest_first():
    model = tiny()
    assert [s.name for s in model.submodels] == [
        "k3-d2-e3", "k3-d3-e4", "k5-d3-e4", "k5-d4-e6", "k7-d4-e6",
    ]  # fmt: skip
    space = model.caps.elastic
    assert model.caps.bn_recalibration and model.caps.axes == ("kernel", "depth", "expand")
    assert space.listed[-1] == full_network(space)
    assert space.submodel_of(space.uniform(3, 2, 3.0)) == 0
    # settings of skipped blocks do not matter
    s = space.uniform(3, 2, 3.0)
    odd = type(s)((7,) * len(s.kernel), s.depth, s.expand)
    assert space.submodel_of(odd) is None
    skip = list(s.kernel)
    skip[3] = 7  # block 3 of stage 0 does not run at depth 2
    assert space.submodel_of(type(s)(tuple(skip), s.depth, s.expand)) == 0
    costs = [c.mmacs for c in count_costs(model, 32)]
    assert costs == sorted(costs)


@pytest.mark.parametrize(
    "sets,match",
    [
        ({"arch.kernels": [3, 9]}, r"kernels must be a strictly increasing list of values from"),
        ({"arch.expands": [6, 4]}, r"expands must be a strictly increasing list"),
        ({"arch.subnets": [[3, 2, 3], [9, 4, 6]]}, r"kernel in \[3, 5, 7\].*got \[\[3, 2, 3\]"),
        ({"arch.subnets": [[5, 2, 3], [3, 2, 6]]}, r"subnets must grow, smallest first"),
        ({"arch.strides": [1, 2, 2]}, r"strides must be 5 values, each 1 or 2"),
        ({"arch.stem_stride": 2, "arch.strides": [2, 2, 2, 2, 2]}, r"divisible by the network"),
    ],
)
def test_bad_architecture_values_are_refused_before_any_work(sets, match):
    with pytest.raises(ConfigError, match=match):
        resolve(ARCH, "synthetic", "joint", 0, "smoke", sets)


# --- progressive shrinking ------------------------------------------------------------------
def test_phase_schedule_of_every_profile():
    method = METHODS.get("ofa_ps")({})
    stages = method.stages(5)
    assert [s.name for s in stages] == [p[0] for p in PHASES] == [
        "teacher", "kernel", "depth1", "depth2", "expand1", "expand2",
    ]  # fmt: skip
    assert [s.lr_scale for s in stages] == pytest.approx([1, 1, 1 / 12, 0.25, 1 / 12, 0.25])
    assert stages[0].train == (4,) and all(s.train == tuple(range(5)) for s in stages[1:])
    assert split_epochs([s.share for s in stages], 530) == [120, 120, 25, 120, 25, 120]
    want = {"smoke": [1] * 6, "mini": [3, 3, 1, 2, 1, 2], "paper": [68, 68, 14, 68, 14, 68]}
    for profile, split in want.items():
        cfg = resolve(ARCH, "cifar10", "ofa_ps", 0, profile)
        plan = plan_cell(cfg)
        assert [plan.stage_epochs(i) for i in range(6)] == split, profile
        assert plan.total_epochs == cfg["train"]["epochs"] == sum(split)
        lr = cfg["train"]["lr"]
        assert [plan.stage_train(i, cfg["train"])["lr"] for i in range(6)] == pytest.approx(
            [lr, lr, lr / 12, lr / 4, lr / 12, lr / 4]
        )
    with pytest.raises(ConfigError, match=r"train.epochs must be at least 6, .* got 5"):
        plan_cell(resolve(ARCH, "synthetic", "ofa_ps", 0, "smoke", {"train.epochs": 5}))


def test_draws_are_seeded_and_inside_the_phase_choices():
    model = tiny()
    space = model.caps.elastic
    method = METHODS.get("ofa_ps")({})
    per_step = {"teacher": 1, "kernel": 1, "depth1": 2, "depth2": 2, "expand1": 4, "expand2": 4}
    for name, n in per_step.items():
        method.phase = name
        kernels, depths, expands = phase_choices(space, name)
        seen = {"kernel": set(), "depth": set(), "expand": set()}
        for step in range(40):
            draws = method.draw_submodels(step_generator(0, 3, step), model)
            assert len(draws) == n
            assert draws == method.draw_submodels(step_generator(0, 3, step), model)  # resume
            for s in draws:
                seen["kernel"] |= set(s.kernel)
                seen["depth"] |= set(s.depth)
                seen["expand"] |= set(s.expand)
        assert seen == {"kernel": set(kernels), "depth": set(depths), "expand": set(expands)}
    assert phase_choices(space, "depth1") == ((3, 5, 7), (3, 4), (6.0,))
    assert phase_choices(space, "expand1") == ((3, 5, 7), (2, 3, 4), (4.0, 6.0))
    other = method.draw_submodels(step_generator(1, 3, 0), model)
    assert other != method.draw_submodels(step_generator(0, 3, 0), model)


def _ctx(model, stage, epoch=0, epochs=1) -> EpochContext:
    return EpochContext(model, stage, epoch, epochs, lambda e: iter(()), torch.autocast)


def test_teacher_is_a_frozen_copy_that_survives_the_checkpoint():
    model = tiny().train()
    method = METHODS.get("ofa_ps")({})
    stages = method.stages(model.num_submodels)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.epoch_start(_ctx(model, stages[0]))
    assert method.teacher_logits(x) is None
    Step(model, method, stages[0])(x, y, step_generator(0, 0, 0))
    method.epoch_end(_ctx(model, stages[0]))
    teacher = method.teacher
    assert teacher is not None and teacher is not model
    assert not list(method.parameters())  # outside the optimizer
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    want = method.teacher_logits(x)
    method.epoch_start(_ctx(model, stages[1]))
    model.zero_grad(set_to_none=True)
    out = Step(model, method, stages[1])(x, y, step_generator(0, 1, 0))
    assert any(name.startswith("kd/") for name in out.terms)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    now = teacher.state_dict()
    assert all(torch.equal(now[k], frozen[k]) for k in frozen if "num_batches" not in k)
    assert torch.equal(method.teacher_logits(x), want)
    assert not torch.equal(model.forward_subnet(x, full_network(model.caps.elastic)), want)
    # the checkpoint: the teacher is the method's state; a fresh method rebuilds it
    state = method.state_dict()
    fresh = METHODS.get("ofa_ps")({})
    fresh.load_state_dict(state)
    fresh.epoch_start(_ctx(model, stages[2]))
    assert torch.equal(fresh.teacher_logits(x), want)


def test_a_shrinking_phase_without_its_teacher_is_an_error():
    model = tiny()
    method = METHODS.get("ofa_ps")({})
    method.epoch_start(_ctx(model, method.stages(5)[1]))
    with pytest.raises(RuntimeError, match="without the teacher phase's copy"):
        method.teacher_logits(torch.randn(1, 3, 32, 32))


def test_phases_for_a_network_without_elastic_kernels_are_refused():
    with pytest.raises(ConfigError) as err:
        resolve(ARCH, "synthetic", "ofa_ps", 0, "smoke", {"arch.kernels": [7],
                "arch.subnets": [[7, 1, 3], [7, 2, 6]]})  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg and "needs at least two choices of each" in msg
    assert "has kernels [7]" in msg and "arch.kernels=[3,5,7]" in msg
    with pytest.raises(IncompatibleError, match="needs an elastic network .* use ofa_mobilenet_v3"):
        resolve("msdnet", "synthetic", "ofa_ps", 0, "smoke")


def test_other_methods_train_the_named_subnetworks(tmp_path):
    """joint and ipkd train the named sub-networks (one forward each); sandwich (a width
    range) is refused with its reason."""
    for name in ("joint", "ipkd"):
        cfg = smoke_cfg(ARCH, name, tmp_path)
        model = make_model(cfg, 10, 32).train()
        method = make_method(cfg, model.num_submodels)
        (stage,) = method.stages(model.num_submodels)
        out = Step(model, method, stage)(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        assert sorted(out.logits) == list(range(model.num_submodels)) and torch.isfinite(out.loss)
    with pytest.raises(IncompatibleError, match="sandwich needs a network that runs any width"):
        smoke_cfg(ARCH, "sandwich", tmp_path)


def test_ofa_ps_runs_its_phases_end_to_end_and_resumes_identically(tracking_uri, tmp_path):
    """Six phases of one epoch each at smoke: the learning rate follows each phase, the
    distillation term appears after the teacher phase, and a cell stopped after the kernel
    phase resumes (teacher, draws and all) to the uninterrupted cell's weights."""
    import mlflow

    sets = {"train__epochs": 6, "data__train_subset": 96}

    def run(workdir, stop_after=None, resume=False):
        cfg = smoke_cfg(ARCH, "ofa_ps", workdir, **sets)

        def stop(epoch, metrics):
            if epoch == stop_after:
                raise CellPruned("stopped")

        opts = CellOptions(
            tracking_uri=tracking_uri, progress=False, resume=resume,
            epoch_callback=stop if stop_after is not None else None,
        )  # fmt: skip
        return train_cell(cfg, opts), cfg

    result, cfg = run(tmp_path / "a")
    client = mlflow.tracking.MlflowClient(tracking_uri)
    run_id = result.run_id
    lr = [m.value for m in client.get_metric_history(run_id, "lr")]
    base = cfg["train"]["lr"]
    assert len(lr) == 6 and lr[2] < base / 12 + 1e-9 and lr[3] <= base / 4 + 1e-9
    history = client.get_run(run_id).data.metrics
    assert "train/loss_terms/kd/net1" in history and "train/loss_terms/kd/net4" in history
    assert all(f"test/top1/{n}" in history for n in ("k3-d1-e3", "k5-d2-e4", "k7-d2-e6"))
    assert history[schema.TOP1_MEAN.format(split="test")] >= 0
    with pytest.raises(CellPruned):
        run(tmp_path / "b", stop_after=1)
    resumed, cfg_b = run(tmp_path / "b", resume=True)
    assert [r["top1"] for r in resumed.rows] == [r["top1"] for r in result.rows]
    final = [checkpoint.load(checkpoint.cell_dir(c, "flexbench", result.key) / "checkpoint.pt")
             for c in (cfg, cfg_b)]  # fmt: skip
    model = (final[0]["model"], final[1]["model"])
    teacher = (final[0]["method"]["_extra_state"], final[1]["method"]["_extra_state"])
    for a, b in (model, teacher):  # the network, and the teacher (the method's state)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
