"""Universally slimmable networks: the sandwich rule's per-width losses, AlphaNet's
alpha-divergence against its formula, BN recalibration (what it changes and which images it
sees), the step's width draws (same across methods and across a kill/resume), the width
spectrum's MLflow rows and the bad inputs refused before any work."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAST, draws_whole_and_resumed, smoke_cfg
from torch.nn import functional as F

from benchmark.config import cell_key, resolve
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.methods import METHODS
from benchmark.methods.base import alpha_kd_loss, kd_loss
from benchmark.models import ARCHS, build_model
from benchmark.record import schema
from benchmark.training import bn_calib
from benchmark.training.build import make_method, make_model
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, finish, prepare, train_cell, validate

TINY_US = {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1]}


def tiny_us(**over) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "us_mobilenet_v1", ARCHS.get("us_mobilenet_v1").resolve({**TINY_US, **over}), 10, 32
    )


# --- alpha-divergence: value from the formula, gradient of the formula -----------------------
def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def ref_alpha_div(zs: list[float], zt: list[float], alpha: float, clip: float) -> float:
    """D_alpha(p || q) = 1/(alpha (alpha-1)) sum_c q_c ((p_c/q_c)^alpha - 1), with the power
    (the ratio at alpha = 0) clipped at `clip`; alpha = 0: KL(q || p), alpha = 1: KL(p || q)."""
    q, p = softmax(zs), softmax(zt)
    if alpha == 0:
        return sum(qc * -math.log(min(pc / qc, clip)) for qc, pc in zip(q, p))
    if alpha == 1:
        return sum(pc * math.log(pc / qc) for qc, pc in zip(q, p))
    return sum(
        qc * (min((pc / qc) ** alpha, clip) - 1) / (alpha * (alpha - 1)) for qc, pc in zip(q, p)
    )


STUDENT = [[1.0, -0.5, 0.3, 2.0, 0.0], [0.2, 0.1, -1.0, 0.5, 1.5], [-0.3, 2.2, 0.0, 0.1, -1.2]]
TEACHER = [[2.0, -1.2, -0.4, 3.1, -0.5], [-0.3, 0.6, -2.0, 1.0, 2.8], [3.0, -1.0, 0.2, -0.4, 1.1]]


@pytest.mark.parametrize(
    "a_minus,a_plus,clip", [(-1.0, 1.0, 5.0), (-1.0, 1.0, 1e9), (0.0, 0.5, 1e9), (-2.0, 1.5, 3.0)]
)
def test_alpha_divergence_value_is_the_per_sample_max_of_the_formula(a_minus, a_plus, clip):
    got = alpha_kd_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), 1.0, a_minus, a_plus, clip)
    want = sum(
        max(ref_alpha_div(s, t, a_minus, clip), ref_alpha_div(s, t, a_plus, clip))
        for s, t in zip(STUDENT, TEACHER)
    ) / len(STUDENT)
    assert got.item() == pytest.approx(want, rel=1e-5)


# The samples: teacher and student log-probabilities 100 and 120 apart, where the ratio
# p/q (e^100, e^120) overflows float32 and q (e^-120) underflows to 0.
FAR_STUDENT = [[0.0, -100.0], [0.0, -120.0]]
FAR_TEACHER = [[-100.0, 0.0], [-120.0, 0.0]]


@pytest.mark.parametrize("a_minus,a_plus", [(-1.0, 1.0), (0.0, 0.5)])
def test_alpha_divergence_is_exact_where_log_probabilities_differ_by_more_than_88(a_minus, a_plus):
    """Finite and equal to the formula in float64 (1 = KL(p || q), 0 = KL(q || p): about 100
    and 120), with a finite gradient."""
    s = torch.tensor(FAR_STUDENT, requires_grad=True)
    got = alpha_kd_loss(s, torch.tensor(FAR_TEACHER), 1.0, a_minus, a_plus, 5.0)
    got.backward()
    want = sum(
        max(ref_alpha_div(zs, zt, a_minus, 5.0), ref_alpha_div(zs, zt, a_plus, 5.0))
        for zs, zt in zip(FAR_STUDENT, FAR_TEACHER)
    ) / len(FAR_STUDENT)
    assert want == pytest.approx(110.0, rel=1e-6)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_alpha_divergence_clipping_changes_the_value_where_the_ratio_is_large():
    """Sample 3: the teacher is confident where the student is not, (p/q)^-1 exceeds 5."""
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert alpha_kd_loss(s, t, 1.0, -1.0, 1.0, 5.0) != pytest.approx(
        alpha_kd_loss(s, t, 1.0, -1.0, 1.0, 1e9).item()
    )


def test_alpha_divergence_gradient_is_the_formula_gradient_without_clipping():
    """Unclipped, the surrogate's gradient equals autograd of the divergence itself."""
    s = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(TEACHER, dtype=torch.float64)
    alpha_kd_loss(s, t, 1.0, -1.0, 0.5, 1e12).backward()
    s2 = s.detach().clone().requires_grad_()
    q, p = s2.softmax(1), t.softmax(1)

    def div(alpha):
        return (q * ((p / q) ** alpha - 1)).sum(1) / (alpha * (alpha - 1))

    torch.maximum(div(-1.0), div(0.5)).mean().backward()
    assert torch.allclose(s.grad, s2.grad, rtol=1e-9, atol=1e-12)
    assert t.grad is None


def test_alpha_divergence_is_zero_when_student_equals_teacher():
    z = torch.tensor(STUDENT)
    assert alpha_kd_loss(z, z, 1.0, -1.0, 1.0, 5.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["ipkd", "ipkd_ta", "sandwich"])
def test_kd_methods_use_the_chosen_divergence(name):
    z = [torch.tensor(STUDENT), torch.tensor(TEACHER)]
    y = torch.tensor([3, 4, 1])
    kl = METHODS.get(name)({"T": 1.0, "a": 1.0})
    alpha = METHODS.get(name)({"T": 1.0, "a": 1.0, "divergence": "alpha", "alpha_plus": 0.5})
    teachers = {1: z[1]}
    assert kl.loss(0, z[0], teachers, y, 2)[1]["kd"].item() == pytest.approx(
        kd_loss(z[0], z[1], 1.0).item()
    )
    got = alpha.loss(0, z[0], teachers, y, 2)[1]["kd"].item()
    assert got == pytest.approx(alpha_kd_loss(z[0], z[1], 1.0, -1.0, 0.5, 5.0).item())


# --- the sandwich rule ------------------------------------------------------------------------
def test_sandwich_draws_max_min_and_n_minus_2_uniform_widths_from_the_step_generator():
    model = tiny_us()
    method = METHODS.get("sandwich")({"n": 5})
    widths = method.draw_submodels(step_generator(3, 2, 7), model)
    assert len(widths) == 5 and widths[0] == 0.25 and widths[-1] == 1.0
    assert widths == sorted(widths) and all(0.25 <= w <= 1.0 for w in widths)
    g = torch.Generator().manual_seed((3 * 1_000_003 + 2) * 1_000_003 + 7)
    want = sorted((0.25 + 0.75 * torch.rand(3, generator=g, dtype=torch.float64)).tolist())
    assert widths[1:-1] == want
    assert method.draw_submodels(step_generator(3, 2, 8), model) != widths


def test_sandwich_step_losses_by_hand():
    """The step's per-width terms: max width CE on labels; every other drawn width KL to the max
    width's detached prediction of the same step (a = 1, T = 1: soft targets only)."""
    model = tiny_us().train()
    method = METHODS.get("sandwich")({"n": 4})
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    (stage,) = method.stages(model.num_submodels)
    g = step_generator(0, 1, 2)
    widths = method.draw_submodels(step_generator(0, 1, 2), model)
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = Step(model, method, stage)(x, y, g)
    model.load_state_dict({**model.state_dict(), **bn_state})  # same BN state for the check
    with torch.no_grad():
        z = {w: model.forward_width(x, w) for w in widths}
    z_max = z[widths[-1]]
    assert out.terms["ce/max"].item() == pytest.approx(F.cross_entropy(z_max, y).item(), rel=1e-5)
    names = ["min", "rand1", "rand2"]
    for name, w in zip(names, widths[:-1]):
        p = z_max.softmax(1)
        want = (p * (p.log() - z[w].log_softmax(1))).sum(1).mean().item()
        assert out.terms[f"kd/{name}"].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert f"ce/{name}" in out.terms  # logged, weighted by 1 - a = 0
    want_total = F.cross_entropy(z_max, y).item() + sum(out.terms[f"kd/{n}"].item() for n in names)
    assert out.loss.item() == pytest.approx(want_total, rel=1e-5)
    assert sorted(out.logits) == [0, 3]  # w_min and w_max are evaluation widths 0 and 3


def test_sandwich_loss_is_ipkd_over_the_drawn_widths():
    """Method.loss of sandwich on n sub-models equals ipkd's (teacher = the largest)."""
    z = [torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TEACHER) * 1.5]
    y = torch.tensor([3, 4, 1])
    s, i = METHODS.get("sandwich")({"T": 2.0, "a": 0.3}), METHODS.get("ipkd")({"T": 2.0, "a": 0.3})
    for k in range(3):
        teachers = {j: z[j] for j in range(k + 1, 3)}
        assert s.loss(k, z[k], teachers, y, 3)[0].item() == pytest.approx(
            i.loss(k, z[k], teachers, y, 3)[0].item()
        )


# --- width draws: same across methods, same across a kill/resume ------------------------------
def _record_draws(monkeypatch) -> list[list[float]]:
    """Every width list a sandwich-like method draws during training (the real draws)."""
    seen: list[list[float]] = []
    real = METHODS.get("sandwich").draw_submodels

    def spy(self, g, model, batch=None):
        widths = real(self, g, model, batch)
        seen.append(widths)
        return widths

    monkeypatch.setattr(METHODS.get("sandwich"), "draw_submodels", spy)
    return seen


def test_same_seed_same_draws_across_methods_and_divergences(tracking_uri, tmp_path, monkeypatch):
    seen = _record_draws(monkeypatch)
    opts = CellOptions(tracking_uri=tracking_uri, progress=False)
    train_cell(smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path / "a"), opts)
    kl = list(seen)
    seen.clear()
    alpha = smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path / "b", method__divergence="alpha")
    train_cell(alpha, opts)
    assert seen == kl and len(kl) == 2 * 4  # 2 epochs x 4 steps of 32 images
    seen.clear()
    train_cell(smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path / "c", seed=1), opts)
    assert seen != kl


def test_draws_after_a_kill_and_resume_are_the_uninterrupted_ones(
    tracking_uri, tmp_path, monkeypatch
):
    seen = _record_draws(monkeypatch)
    full, resumed = draws_whole_and_resumed(
        seen, tracking_uri, tmp_path, "us_mobilenet_v1", "sandwich"
    )
    assert resumed == full and len(full) == 3 * 4


# --- BN recalibration -----------------------------------------------------------------------
def test_recalibration_resets_and_averages_exactly_the_layers_a_width_uses():
    model = tiny_us(width_mult=1.0)
    first_bn = model.features[1]
    model.set_width(0.5)
    c_half = model.features[0].active_channels()[1]
    c_full = model.features[0].out_channels
    assert c_half < c_full
    first_bn.running_mean.fill_(7.0)  # stale statistics from "training"
    batches = [
        torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    n = bn_calib.recalibrate_bn(model, lambda x: model.forward_width(x, 0.5), iter(batches), 2)
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():  # cumulative average of the first two batches' means, by hand
        w = model.features[0].weight[:c_half]
        means = [F.conv2d(b, w, None, 1, 1).mean((0, 2, 3)) for b in batches[:2]]
    assert torch.allclose(first_bn.running_mean[:c_half], (means[0] + means[1]) / 2, atol=1e-5)
    assert first_bn.momentum == 0.1 and model.training  # restored
    assert int(first_bn.num_batches_tracked) == 2


def test_recalibration_changes_an_uncalibrated_switchable_width_only():
    """On the switchable-BN network, calibrating width k changes its own BN statistics and no
    other width's."""
    torch.manual_seed(0)
    model = build_model(
        "slimmable_mobilenet_v1",
        ARCHS.get("slimmable_mobilenet_v1").resolve(TINY_US | {"widths": [0.5, 1.0]}),
        10,
        32,
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    batches = (torch.randn(8, 3, 32, 32) for _ in range(2))
    bn_calib.recalibrate_bn(model, lambda x: model.forward_sub(x, 0), batches, 2)
    after = {k: v for k, v in model.state_dict().items() if "running_mean" in k}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".bn.0." in k for k in changed)  # width 0's private BN only
    assert all(".bn.1." not in k for k in changed)


SENTINEL = 255  # val and test images made all-white: a calibration batch must never hold one


def test_recalibration_sees_training_images_only(tracking_uri, tmp_path, monkeypatch):
    cfg = smoke_cfg("us_mobilenet_v1", "ipkd", tmp_path)
    cell = prepare(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    cell.splits.val.x.fill_(SENTINEL)
    cell.splits._test.x.fill_(SENTINEL)  # without counting a test read
    assert not (cell.splits.train.x == SENTINEL).flatten(1).all(1).any()
    white = cell.norm(torch.full((1, 3, 32, 32), SENTINEL, dtype=torch.uint8))
    seen: list[torch.Tensor] = []
    real = bn_calib.recalibrate_bn

    def spy(model, run, batches, n):
        batches = list(batches)[:n]
        seen.extend(batches)
        return real(model, run, iter(batches), n)

    monkeypatch.setattr(bn_calib, "recalibrate_bn", spy)
    metrics = validate(cell)
    k, n = cell.model.num_submodels, cfg["train"]["bn_calib_batches"]
    assert len(seen) == k * n and n >= 1 and len(metrics) == k + 1
    result = finish(cell)  # test split: every sub-model and every spectrum width, calibrated
    assert len(seen) == (2 * k + len(result.rows) - k) * n
    for x in seen:
        assert not (x == white).flatten(1).all(1).any()  # no all-white image
    # the same calibration batches for every width (a fixed virtual epoch of the training set)
    assert all(torch.equal(seen[i], seen[i % n]) for i in range(len(seen)))


def test_evaluation_without_recalibration_differs_on_the_us_network(tracking_uri, tmp_path):
    """After training, shared BN statistics belong to no width: evaluation with and without
    recalibration must differ (the mechanism is not a no-op)."""
    cfg = smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path)
    cell = prepare(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    from benchmark.training.evaluate import EvalSpec, evaluate

    for xb, _ in cell.batches.epoch(0):  # a few training forwards move the shared statistics
        cell.model.train()
        with torch.no_grad():
            for w in (0.3, 0.9):
                cell.model.forward_width(xb, w)
    val = cell.splits.val
    plain = evaluate(cell.model, val, EvalSpec(64, cell.norm))
    calibrated = evaluate(cell.model, val, EvalSpec(64, cell.norm, calibrate=cell.eval.calibrate))
    assert plain.top1 != calibrated.top1 or plain.top5 != calibrated.top5


# --- the width spectrum in the MLflow record ----------------------------------------------------
def test_spectrum_points_are_marked_child_runs_and_parent_metrics(tracking_uri, client, tmp_path):
    cfg = smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path, arch__spectrum_step=0.25)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    spectrum = [r for r in result.rows if r["spectrum"] == "true"]
    fixed = [r for r in result.rows if r["spectrum"] == "false"]
    assert [r["name"] for r in spectrum] == [f"spectrum/w{w:.2f}" for w in (0.25, 0.5, 0.75, 1.0)]
    assert len(fixed) == 4
    # the same width, recalibrated the same way: the spectrum point equals the fixed sub-model
    for f, s in zip(fixed, spectrum):
        assert f["top1"] == s["top1"] and f["mflops"] == pytest.approx(s["mflops"])
    assert [r["mflops"] for r in spectrum] == sorted(r["mflops"] for r in spectrum)
    run = client.get_run(result.run_id)
    assert run.data.metrics["test/top1/spectrum/w0.50"] == spectrum[1]["top1"]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    flags = {c.data.tags[schema.SUBMODEL]: c.data.tags[schema.SPECTRUM] for c in children}
    assert flags["spectrum/w0.75"] == "true" and flags["w0.75"] == "false"
    mean = sum(r["top1"] for r in fixed) / 4  # summaries over the fixed sub-models only
    assert run.data.metrics["test/top1_mean"] == pytest.approx(mean)


# --- bad input, before any work -------------------------------------------------------------
def _resolve(method="sandwich", arch="us_mobilenet_v1", **sets):
    return resolve(arch, "synthetic", method, 0, "smoke", {**FAST, **sets})


@pytest.mark.parametrize(
    "sets,match",
    [
        ({"method.n": 1}, r"n must be an integer >= 2, got 1"),
        ({"method.n": 2.5}, r"n must be an integer >= 2, got 2.5"),
        ({"arch.widths": [0.1, 1.0]}, r"widths \[0.1\] are outside the network's range"),
        ({"arch.widths": [0.5, 1.2]}, r"valid evaluation widths are in \[0.25, 1.0\]"),
        (
            {"method.divergence": "alpha", "method.alpha_minus": 1.0},
            r"alpha_minus must be < alpha_plus, got alpha_minus=1, alpha_plus=1",
        ),
        ({"method.divergence": "js"}, r"divergence must be one of kl, alpha, got 'js'"),
        ({"method.alpha_plus": 2.0}, r"alpha_plus has an effect only with divergence=alpha"),
        ({"train.bn_calib_batches": 0}, r"train.bn_calib_batches must be >= 1"),
        ({"train.bn_calib_batches": -1}, r"bn_calib_batches must be an integer >= 0"),
        ({"arch.spectrum_step": 2.0}, r"spectrum_step must be in \[0, 0.75\]"),
    ],
)
def test_bad_input_is_refused_at_resolve_time(sets, match):
    with pytest.raises(ConfigError, match=match):
        _resolve(**sets)


@pytest.mark.parametrize("arch", sorted(set(ARCHS.names()) - {"us_mobilenet_v1", "flex_vit"}))
def test_sandwich_on_an_architecture_without_a_width_range_is_refused(arch):
    with pytest.raises(IncompatibleError, match="use flex_vit or us_mobilenet_v1"):
        _resolve(arch=arch)


def test_more_calibration_batches_than_the_training_set_is_refused(tracking_uri, tmp_path):
    cfg = smoke_cfg("us_mobilenet_v1", "ipkd", tmp_path, train__bn_calib_batches=5)
    with pytest.raises(ConfigError, match=r"bn_calib_batches 5 exceeds the 4 training batches"):
        prepare(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert not list(tmp_path.rglob("checkpoint.pt"))


def test_divergence_parameters_at_their_defaults_keep_existing_cell_keys():
    """Cells recorded before the divergence option keep their keys (KL is the old behaviour)."""
    base = resolve("msdnet", "synthetic", "ipkd", 0, "smoke")
    assert base["method"]["divergence"] == "kl" and base["train"]["bn_calib_batches"] == 0
    old = {k: v for k, v in base.items()}
    old["method"] = {"name": "ipkd", "T": 1.0, "a": 1.0}
    old["train"] = {k: v for k, v in base["train"].items() if k != "bn_calib_batches"}
    assert cell_key(base) == cell_key(old)
    alpha = resolve("msdnet", "synthetic", "ipkd", 0, "smoke", {"method.divergence": "alpha"})
    assert cell_key(alpha) != cell_key(base)


def test_every_existing_method_trains_the_us_network_on_its_evaluation_widths(tmp_path):
    for name in METHODS.names():
        try:
            cfg = smoke_cfg("us_mobilenet_v1", name, tmp_path)
        except IncompatibleError:
            # hsd needs saliency-ranked channels; imta an MSDNet; byot exit features; sdn and
            # pl_distill exits of one trunk
            # and ofa_ps an elastic network
            elsewhere = ("hsd", "imta", "byot", "sdn", "pl_distill", "ztw", "boosted", "l2w")
            assert name in (*elsewhere, "ofa_ps"), name
            continue
        model = make_model(cfg, 10, 32)
        method = make_method(cfg, model.num_submodels)
        assert model.num_submodels == 4, name
        assert method.stages(4)


def test_reports_draw_the_spectrum_as_a_line_and_fixed_widths_as_markers(
    tracking_uri, tmp_path, monkeypatch
):
    from reports import figures
    from reports.build import ReportOptions, build_report

    for seed in (0, 1):
        cfg = smoke_cfg("us_mobilenet_v1", "sandwich", tmp_path, seed, arch__spectrum_step=0.25)
        train_cell(cfg, CellOptions(tracking_uri=tracking_uri, experiment="us", progress=False))
    drawn = []  # the axes of each accuracy-vs-cost figure, taken where it would be saved
    real_save = figures.save
    monkeypatch.setattr(
        figures,
        "save",
        lambda fig, out, stem: (
            (drawn.append(fig.axes[0]) or []) if "acc_vs" in stem else real_save(fig, out, stem)
        ),
    )
    opts = ReportOptions(out=tmp_path / "rep", log_to_mlflow=False)
    r = build_report("us", tracking_uri, opts)
    assert set(r.experiment.tidy["submodel"]) == {"w0.25", "w0.5", "w0.75", "w1.0"}
    spec = r.experiment.spectrum
    assert sorted(spec["width"].unique()) == [0.25, 0.5, 0.75, 1.0] and len(spec) == 8
    (ax,) = drawn
    line, markers = ax.get_lines()[0], ax.get_lines()[1]
    mean = spec.groupby("width")["mflops"].mean().sort_values()
    assert list(line.get_xdata()) == pytest.approx(list(mean))  # the spectrum: a line
    assert line.get_marker() in ("None", None, "")
    assert markers.get_linestyle() == "None" and markers.get_marker() not in ("None", None, "")
