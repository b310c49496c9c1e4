"""Input resolution as a sub-model axis and the mutualnet method: the step's losses by hand on
resized batches, the resolution draws (after the widths, on the step generator, the same after a
resume), the rows of every (width, resolution) pair with their costs, the BN recalibration at
each resolution, the report's curves per resolution, and the bad inputs refused before any
work."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, draws_whole_and_resumed, smoke_cfg
from torch.nn import functional as F

from benchmark.config import cell_key, resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError, IncompatibleError
from benchmark.methods import METHODS
from benchmark.models import ARCHS, build_model
from benchmark.models.us_mobilenet_v1 import USBatchNorm2d
from benchmark.record import schema
from benchmark.training.step import Step, step_generator
from benchmark.training.train import CellOptions, train_cell

TINY_US = {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1]}


def tiny_us(image_size: int = 32, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    params = ARCHS.get("us_mobilenet_v1").resolve({**TINY_US, **over})
    return build_model("us_mobilenet_v1", params, 10, image_size)


def _resized(x: torch.Tensor, r: int) -> torch.Tensor:
    """The reference's resize (MutualNet `utils/transforms.py` InputList), written out here."""
    if r == x.shape[-1]:
        return x
    return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=True)


# --- the draws ----------------------------------------------------------------------------------
def test_resolutions_are_drawn_after_the_widths_from_the_step_generator():
    """mutualnet's widths are sandwich's at the same seed and step; then n-1 uniform indices into
    arch.resolutions, the largest width at full resolution (None)."""
    model = tiny_us(resolutions="auto")
    assert model.caps.resolutions.listed == (32, 16)
    mutual, sandwich = METHODS.get("mutualnet")({}), METHODS.get("sandwich")({})
    g = step_generator(3, 2, 7)
    widths = mutual.draw_submodels(g, model)
    resolutions = mutual.draw_resolutions(g, model, len(widths))
    assert widths == sandwich.draw_submodels(step_generator(3, 2, 7), model)
    want = torch.Generator().manual_seed((3 * 1_000_003 + 2) * 1_000_003 + 7)
    torch.rand(2, generator=want, dtype=torch.float64)  # the two random widths
    picks = torch.randint(2, (3,), generator=want).tolist()
    assert resolutions == [(32, 16)[i] for i in picks] + [None]
    # the sandwich option: the same draws; off by default (every width on the batch as it is)
    opt = METHODS.get("sandwich")({"resolution": "random"})
    g2 = step_generator(3, 2, 7)
    assert opt.draw_submodels(g2, model) == widths
    assert opt.draw_resolutions(g2, model, 4) == resolutions
    assert sandwich.draw_resolutions(step_generator(3, 2, 7), model, 4) == [None] * 4


def _a_step_drawing_both_resolutions(model, method) -> tuple[int, list[float], list]:
    """The first step (seed 0, epoch 0) whose non-max widths draw 32 and 16 px both."""
    for i in range(100):
        g = step_generator(0, 0, i)
        widths = method.draw_submodels(g, model)
        res = method.draw_resolutions(g, model, len(widths))
        if {32, 16} <= set(res[:-1]):
            return i, widths, res
    raise AssertionError("no step drew both resolutions")


def test_mutualnet_step_losses_by_hand():
    """Max width on the batch as it is, CE on the labels; every other drawn width on the batch
    resized to its drawn resolution, KL to the max width's detached prediction (a = 1, T = 1)."""
    model = tiny_us(resolutions="auto").train()
    method = METHODS.get("mutualnet")({})
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    i, widths, res = _a_step_drawing_both_resolutions(model, method)
    (stage,) = method.stages(model.num_submodels)
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = Step(model, method, stage)(x, y, step_generator(0, 0, i))
    model.load_state_dict({**model.state_dict(), **bn_state})  # same BN state for the check
    with torch.no_grad():
        z_max = model.forward_width(x, widths[-1])
        z = [model.forward_width(_resized(x, r), w) for w, r in zip(widths[:-1], res[:-1])]
    ce = F.cross_entropy(z_max, y).item()
    assert out.terms["ce/max"].item() == pytest.approx(ce, rel=1e-5)
    p = z_max.softmax(1)
    kds = [(p * (p.log() - zi.log_softmax(1))).sum(1).mean().item() for zi in z]
    for name, want in zip(["min", "rand1", "rand2"], kds):
        assert out.terms[f"kd/{name}"].item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert out.loss.item() == pytest.approx(ce + sum(kds), rel=1e-5)
    # a resolution changes the prediction: the check is not blind to the resize
    small = next(k for k, r in enumerate(res[:-1]) if r == 16)
    with torch.no_grad():
        at_full = model.forward_width(x, widths[small])
    assert not torch.allclose(at_full, z[small])


def _record_resolution_draws(monkeypatch) -> list[list]:
    seen: list[list] = []
    real = METHODS.get("sandwich").draw_resolutions

    def spy(self, g, model, n):
        drawn = real(self, g, model, n)
        seen.append(drawn)
        return drawn

    monkeypatch.setattr(METHODS.get("sandwich"), "draw_resolutions", spy)
    return seen


def test_resolution_draws_after_a_kill_and_resume_are_the_uninterrupted_ones(
    tracking_uri, tmp_path, monkeypatch
):
    seen = _record_resolution_draws(monkeypatch)
    full, resumed = draws_whole_and_resumed(
        seen, tracking_uri, tmp_path, "us_mobilenet_v1", "mutualnet"
    )
    assert resumed == full and len(full) == 3 * 4
    assert {16, 32} <= {r for drawn in full for r in drawn[:-1]}


# --- a cell: every (width, resolution), its costs, its BN recalibration, its report -------------
@pytest.fixture
def mutual_cell(tracking_uri, tmp_path, monkeypatch):
    """A smoke mutualnet cell on synthetic data (32 px, resolutions auto = [32, 16]), with
    (training mode, input height) of every pass through the network's first BatchNorm while
    the rows below the image size were measured."""
    import benchmark.training.final as final

    sizes: list[tuple[bool, int]] = []
    watched: list[torch.nn.Module] = []
    real_bn, real_measure = USBatchNorm2d.forward, final.measure_resolutions

    def bn(self, x):
        if watched and self is watched[0]:
            sizes.append((self.training, x.shape[-1]))
        return real_bn(self, x)

    def measure(model, *args):
        watched.append(next(m for m in model.modules() if isinstance(m, USBatchNorm2d)))
        try:
            return real_measure(model, *args)
        finally:
            watched.clear()

    monkeypatch.setattr(USBatchNorm2d, "forward", bn)
    monkeypatch.setattr(final, "measure_resolutions", measure)
    cfg = smoke_cfg("us_mobilenet_v1", "mutualnet", tmp_path, train__epochs=2)
    opts = CellOptions(tracking_uri=tracking_uri, experiment="res25", progress=False)
    return train_cell(cfg, opts), cfg, sizes


def test_a_mutualnet_cell_records_every_width_at_every_resolution(mutual_cell, client):
    result, cfg, _ = mutual_cell
    names = [r["name"] for r in result.rows]
    widths = ["w0.25", "w0.5", "w0.75", "w1.0"]
    spec = [f"spectrum/w{w:.2f}" for w in (0.25, 0.5, 0.75, 1.0)]
    assert names == [*widths, *(f"{w}-r16" for w in widths), *spec, *(f"{s}-r16" for s in spec)]
    assert [r["resolution"] for r in result.rows] == [32] * 4 + [16] * 4 + [32] * 4 + [16] * 4
    assert [r["spectrum"] for r in result.rows] == ["false"] * 8 + ["true"] * 8
    assert all(r["latency_ms"] is not None for r in result.rows[:8])
    run = client.get_run(result.run_id)
    for row in result.rows[4:8]:  # its own sub-model row: parent metrics and a child run
        assert run.data.metrics[f"test/top1/{row['name']}"] == row["top1"]
        assert run.data.metrics[f"latency_ms/{row['name']}"] == row["latency_ms"]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    tags = {c.data.tags[schema.SUBMODEL]: c.data.tags[schema.RESOLUTION] for c in children}
    assert tags["w0.5-r16"] == "16" and tags["w0.5"] == "32" and tags["spectrum/w0.50-r16"] == "16"
    mean = sum(r["top1"] for r in result.rows[:4]) / 4  # summaries: the image size only
    assert run.data.metrics["test/top1_mean"] == pytest.approx(mean)
    assert cfg["arch"]["resolutions"] == "auto"  # what mutualnet turns on (ARCH_SETTINGS)


def test_costs_of_each_pair_are_the_networks_cost_at_that_input_size(mutual_cell):
    """Each `-r16` row costs what the same width costs on 16 px data (a network built for
    16 px images, counted there); by hand: at total stride 16, every conv's output area is a
    quarter of its 32 px area, the classifier's MACs (c_in x 10 + nothing spatial) stay."""
    result, cfg, _ = mutual_cell
    rows = {r["name"]: r for r in result.rows}
    arch = {**{k: v for k, v in cfg["arch"].items() if k != "name"}, "resolutions": []}
    at16 = {c.name: c for c in count_costs(build_model("us_mobilenet_v1", arch, 10, 16), 16)}
    model = build_model("us_mobilenet_v1", arch, 10, 32)
    for k, w in enumerate(model.widths):
        name = model.submodels[k].name
        low, full = rows[f"{name}-r16"], rows[name]
        assert low["mmacs"] == pytest.approx(at16[name].mmacs, rel=1e-9)
        assert low["params_m"] == pytest.approx(full["params_m"], rel=1e-12)
        model.set_width(w)
        head = model.classifier.active_num_params() - 10  # weights: MACs of the linear layer
        assert (low["mmacs"] * 1e6 - head) == pytest.approx((full["mmacs"] * 1e6 - head) / 4)
        spec = rows[f"spectrum/w{w:.2f}-r16"]
        assert spec["mmacs"] == pytest.approx(low["mmacs"]) and spec["mflops"] < full["mflops"]


def test_each_resolution_is_evaluated_after_bn_recalibration_at_that_resolution(mutual_cell):
    """During the lower-resolution rows the network only ever sees 16 px inputs: the BN
    calibration passes (train mode, training images resized) and the test passes (eval mode)."""
    _, cfg, sizes = mutual_cell
    n = cfg["train"]["bn_calib_batches"]
    calibration = [s for training, s in sizes if training]
    evaluation = [s for training, s in sizes if not training]
    assert len(calibration) == 4 * n and set(calibration) == {16}  # 4 widths, each recalibrated
    assert evaluation and set(evaluation) == {16}


def test_the_report_draws_one_curve_per_resolution(
    mutual_cell, tracking_uri, tmp_path, monkeypatch
):
    from reports import figures
    from reports.build import ReportOptions, build_report

    result, _, _ = mutual_cell
    drawn = []
    real_save = figures.save
    monkeypatch.setattr(
        figures, "save", lambda fig, out, stem: drawn.append((stem, fig.axes[0])) or []
    )
    build_report("res25", tracking_uri, ReportOptions(out=tmp_path, log_to_mlflow=False))
    monkeypatch.setattr(figures, "save", real_save)
    (ax,) = [a for stem, a in drawn if "acc_vs_mflops" in stem]
    spectra = {
        r["resolution"]: [x["mflops"] for x in result.rows if x["spectrum"] == "true"
                          and x["resolution"] == r["resolution"]]
        for r in result.rows
    }  # fmt: skip
    curves = {  # the lines with points (legend entries are empty lines)
        line.get_linestyle(): list(line.get_xdata())
        for line in ax.get_lines()
        if len(line.get_xdata())
    }
    assert curves["-"] == pytest.approx(spectra[32]) and curves["--"] == pytest.approx(spectra[16])
    labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert "at 16 px (resized input)" in labels


# --- bad input, before any work; cell keys of cells without the axis ----------------------------
def _resolve(method="mutualnet", arch="us_mobilenet_v1", **sets):
    return resolve(arch, "synthetic", method, 0, "smoke", {**FAST, **sets})


@pytest.mark.parametrize(
    "value",
    [[32, 28, 24, 20], [16, 32], [32], [32, 16, 16], [24, 16], [32, 16.0], "full", [32, True]],
)
def test_a_resolution_list_that_does_not_fit_the_network_is_one_line(value):
    with pytest.raises(ConfigError) as info:
        _resolve(**{"arch.resolutions": value})
    msg = str(info.value)
    assert "\n" not in msg and f"got {value!r}" in msg
    assert "the image size 32, then strictly decreasing multiples of the network's stride 16" in msg
    assert "below it (16)" in msg  # the valid values


def test_the_stride_follows_the_stem_and_auto_is_mutualnets_imagenet_list():
    model = tiny_us(image_size=224, stem_stride=2, resolutions="auto")
    assert model.caps.resolutions.stride == 32
    assert model.caps.resolutions.listed == (224, 192, 160, 128)  # MutualNet apps/mobilenet_v1


def test_methods_that_draw_resolutions_need_the_axis():
    with pytest.raises(
        ConfigError, match=r"draws input resolutions from arch.resolutions.*got \[\]"
    ):
        _resolve(**{"arch.resolutions": []})
    with pytest.raises(ConfigError, match=r"sandwich draws input resolutions"):
        _resolve("sandwich", **{"method.resolution": "random"})
    with pytest.raises(ConfigError, match=r"resolution must be one of full, random, got 'half'"):
        _resolve("sandwich", **{"method.resolution": "half"})
    with pytest.raises(IncompatibleError, match=r"several input resolutions.*use us_mobilenet_v1"):
        _resolve(arch="flex_vit")
    # an architecture without either axis is pointed at the one that has both
    with pytest.raises(IncompatibleError, match=r"resolutions; architecture msdnet .*; use us_mob"):
        _resolve(arch="msdnet")
    ok = _resolve("sandwich", **{"method.resolution": "random", "arch.resolutions": [32, 16]})
    assert ok["method"]["resolution"] == "random"


def test_the_axis_off_keeps_existing_cell_keys():
    """Cells recorded before the axis keep their keys: resolutions [] and resolution full are
    the old behaviour, left out of the key; setting either changes it."""
    base = _resolve("sandwich")
    assert base["arch"]["resolutions"] == [] and base["method"]["resolution"] == "full"
    old = {**base, "arch": dict(base["arch"]), "method": dict(base["method"])}
    del old["arch"]["resolutions"], old["method"]["resolution"]
    assert cell_key(base) == cell_key(old)
    assert cell_key(_resolve("sandwich", **{"arch.resolutions": "auto"})) != cell_key(base)
