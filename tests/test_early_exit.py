"""Early-exit evaluation of every multi-exit family: exits that stop the network, the curve's
area, real early exiting at batch 1, val-only thresholds, the record, and bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import smoke_cfg

from benchmark.config import resolve
from benchmark.costs.speed import Speed
from benchmark.data.base import Splits
from benchmark.data.pipeline import Normalizer, TensorSet
from benchmark.errors import ConfigError
from benchmark.methods.base import max_softmax
from benchmark.models import IndependentModel, archs_having, build_model
from benchmark.models.base import forward_hooks
from benchmark.models.msdnet import MSDNet
from benchmark.record import schema
from benchmark.training import budgeted, early_exit
from benchmark.training.budgeted import apply_thresholds, exit_proportions, fit_thresholds
from benchmark.training.evaluate import EvalSpec, evaluate
from benchmark.training.train import CellOptions, train_cell

STOPPING = archs_having("stops_at_exit")


def _smoke_model(arch: str, **params) -> torch.nn.Module:
    cfg = resolve(arch, "synthetic", "joint", 0, "smoke")
    torch.manual_seed(0)
    arch_params = {k: v for k, v in cfg["arch"].items() if k != "name"}
    return build_model(arch, {**arch_params, **params}, 10, 32).eval()


def test_msdnet_and_byot_resnet_stop_at_an_exit():
    assert {"msdnet", "byot_resnet"} <= set(STOPPING)
    assert not IndependentModel(_smoke_model("msdnet")).caps.stops_at_exit  # separate copies


@pytest.mark.parametrize("arch,params", [(a, {}) for a in STOPPING] + [("msdnet", {"isc": True})])
def test_forward_exits_yields_each_exit_and_runs_only_up_to_it(arch, params):
    model = _smoke_model(arch, **params)
    x = torch.randn(2, 3, 32, 32)
    blocks = list(model.blocks)
    ran: list[int] = []
    with torch.no_grad(), forward_hooks(blocks, lambda m, _i, _o: ran.append(blocks.index(m))):
        every = model.forward_all(x)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_exits(x), every))
        for stop in range(model.num_submodels):
            ran.clear()
            for k, z in enumerate(model.forward_exits(x)):
                if k == stop:
                    assert torch.equal(z, every[stop])
                    break
            assert ran == list(range(stop + 1)), (arch, stop)  # no block past the exit ran


def test_budgeted_auc_is_the_mean_top1_over_the_first_to_last_exit_cost():
    points = [{"mflops": 2.0, "top1": 50.0}, {"mflops": 3.0, "top1": 70.0}]
    # exit 1 alone: 2 of 5 correct (40 %), exit 3 alone: 4 of 5 (80 %); costs 1 and 4
    correct = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    auc = early_exit.budgeted_auc(points, correct, [1.0, 2.5, 4.0])
    # trapezoids over 1 -> 2 -> 3 -> 4: (45 + 60 + 75) / (4 - 1)
    assert auc == pytest.approx(60.0)


def _ensemble(logits: list[torch.Tensor]) -> torch.Tensor:
    """A rule that reads every exit so far (as ZTW's ensemble does): softmax of their sum."""
    return torch.stack(logits).sum(0).float().softmax(1)


def _val_and_test(seed: int) -> tuple[list[TensorSet], Normalizer]:
    """A 60-image validation and a 40-image test split of random images, and a normaliser."""
    g = torch.Generator().manual_seed(seed)
    sets = [
        TensorSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (n,), generator=g))
        for n in (60, 40)
    ]  # fmt: skip
    return sets, Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))


def test_real_early_exiting_decides_on_the_methods_exit_outputs():
    """boosted's exits predict with the sums of the earlier exits (`exit_outputs`): real early
    exiting decides on those sums too, so it takes the exits and reaches the top-1 the
    simulation on the evaluated outputs predicts."""
    from benchmark.training.build import make_method

    model = _smoke_model("msdnet")
    method = make_method(resolve("msdnet", "synthetic", "boosted", 0, "smoke"), 3)
    sets, norm = _val_and_test(seed=1)
    spec = EvalSpec(16, norm, outputs=method.exit_outputs)
    val, test = (evaluate(model, s, spec, True) for s in sets)
    raw = evaluate(model, sets[1], EvalSpec(16, norm), True)
    assert not torch.allclose(raw.confidence[1:], test.confidence[1:])  # the sums differ
    thresholds = fit_thresholds(val.confidence, exit_proportions(1.0, 3))
    costs = [1.0, 2.0, 4.0]
    rule = early_exit._on_outputs(max_softmax, method.exit_outputs)
    timing = early_exit.time_early_exit(
        model, sets[1], norm, Speed(), rule, thresholds, costs, 1.0, 40, 1
    )
    acc, cost = apply_thresholds(test.confidence, test.correct, thresholds, costs)
    assert timing.top1 == pytest.approx(acc) and timing.mflops == pytest.approx(cost)


@pytest.mark.parametrize("rule", [max_softmax, _ensemble])
def test_real_early_exiting_takes_the_exits_the_budgeted_simulation_predicts(rule):
    model = _smoke_model("msdnet")
    sets, norm = _val_and_test(seed=0)
    spec = EvalSpec(16, norm)
    val, test = (evaluate(model, s, spec, True, rule) for s in sets)
    # the confidences are the rule's, exit k reading exits 0..k of the same pass
    xs = norm(sets[1].x.to(torch.device("cpu")))
    with torch.no_grad():
        outs = model.forward_all(xs)
    for k in range(3):
        assert torch.allclose(test.confidence[k], rule(outs[: k + 1]).amax(1), atol=1e-6)
    thresholds = fit_thresholds(val.confidence, exit_proportions(1.0, 3))
    costs = [1.0, 2.0, 4.0]
    timing = early_exit.time_early_exit(
        model, sets[1], norm, Speed(), rule, thresholds, costs, 1.0, 30, 1
    )
    exits = test.confidence[:, :30] >= thresholds[:, None]
    exits[-1] = True
    first = exits.float().argmax(0)
    assert timing.exits == torch.bincount(first, minlength=3).tolist()
    acc, cost = apply_thresholds(test.confidence[:, :30], test.correct[:, :30], thresholds, costs)
    assert timing.top1 == pytest.approx(acc) and timing.mflops == pytest.approx(cost)
    assert timing.images == 30 and timing.ms_median > 0 and timing.full_ms_median > 0
    assert f"q={timing.q:g}" in timing.note() and "batch 1" in timing.note()


def test_thresholds_are_fitted_on_validation_confidences_only(
    tracking_uri, client, tmp_path, monkeypatch
):
    """Instrumented like the best-epoch selection: every confidence tensor a threshold fit
    receives came from an evaluation of the validation split, and test is read once."""
    test_sets, val_conf, fitted, reads = [], set(), [], []
    real_test, real_eval, real_fit = Splits.test, early_exit.evaluate, budgeted.fit_thresholds

    def spy_test(self):
        reads.append(1)
        test_sets.append(real_test(self))
        return test_sets[-1]

    def spy_eval(model, data, spec, confidences=False, rule=max_softmax):
        acc = real_eval(model, data, spec, confidences, rule)
        if not any(data is t for t in test_sets):
            val_conf.add(id(acc.confidence))
        return acc

    def spy_fit(conf, proportions):
        fitted.append(id(conf))
        return real_fit(conf, proportions)

    monkeypatch.setattr(Splits, "test", spy_test)
    monkeypatch.setattr(early_exit, "evaluate", spy_eval)
    monkeypatch.setattr(budgeted, "fit_thresholds", spy_fit)
    monkeypatch.setattr(early_exit, "fit_thresholds", spy_fit)
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs", runtime__early_exit_images=8)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    assert reads == [1]
    assert len(fitted) == 39 + 1  # one per budgeted point, one for the timed setting
    assert set(fitted) <= val_conf and len(val_conf) == 1
    # the record: the curve's area and the timing beside its FLOPs estimate
    run = client.get_run(result.run_id)
    m = run.data.metrics
    assert 0 <= m[schema.BUDGETED_AUC] <= 100
    for name in ("ms_per_image", "ms_per_image_iqr", "full_ms_per_image", "mflops", "top1"):
        assert schema.EARLY_EXIT.format(name=name) in m
    assert m["early_exit/images"] == 8 and m["early_exit/q"] == 1.0
    assert m["mflops/exit1"] <= m["early_exit/mflops"] <= m["mflops/exit3"]
    assert "batch 1" in run.data.tags[schema.EARLY_EXIT_TIMING]


def test_a_model_that_cannot_stop_at_an_exit_skips_the_timing(
    tracking_uri, client, tmp_path, monkeypatch
):
    monkeypatch.setattr(MSDNet, "caps", replace(MSDNet.caps, stops_at_exit=False))
    cfg = smoke_cfg("msdnet", "joint", tmp_path / "runs")
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    run = client.get_run(result.run_id)
    assert schema.BUDGETED_AUC in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("early_exit/")]
    assert run.data.tags[schema.EARLY_EXIT_TIMING].startswith("not measured: architecture msdnet")


@pytest.mark.parametrize(
    "arch,method,value,shown",
    [
        (
            "slimmable_mobilenet_v1",
            "joint",
            1.0,
            "architecture slimmable_mobilenet_v1 has no exits",
        ),
        ("msdnet", "joint", 0, "runtime.early_exit_q must be auto or a number > 0, got 0"),
        ("msdnet", "joint", "high", "runtime.early_exit_q must be auto or a number > 0"),
    ],
)
def test_thresholds_on_a_model_without_exits_are_refused(arch, method, value, shown):
    with pytest.raises(ConfigError, match=shown) as err:
        resolve(arch, "synthetic", method, 0, "smoke", {"runtime.early_exit_q": value})
    assert "\n" not in str(err.value)
    if "has no exits" in shown:
        assert "msdnet" in str(err.value) and "got 1.0" in str(err.value)


def test_bad_timing_image_count_is_refused():
    with pytest.raises(ConfigError, match="runtime.early_exit_images must be an integer >= 0"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"runtime.early_exit_images": -1})


def test_l2w_reference_rows_name_the_exits_of_the_step4_imagenet_msdnet():
    """The README's step-4 rows match cells of msdnet's imagenet profile (preset
    imagenet_step4, 5 exits); its other schedules have no counterpart (matched by arch only)."""
    from benchmark.models import ARCHS, build_on_meta
    from reports.references import load_references

    refs = {r.id: r for r in load_references()}
    step4, other = refs["l2w-msdnet-step4-imagenet"], refs["l2w-msdnet-imagenet-other-schedules"]
    params = ARCHS.get("msdnet").resolve({"preset": "imagenet_step4"})
    names = [s.name for s in build_on_meta("msdnet", params, 1000, 224).submodels]
    assert [e["submodel"] for e in step4.entries] == names == [f"exit{i}" for i in range(1, 6)]
    assert [e["value"] for e in step4.entries] == [59.54, 67.22, 71.03, 72.33, 73.93]
    assert step4.flexbench["method"] == "l2w" and other.flexbench is None
    assert len(other.entries) == 25  # 5 more README rows x 5 exits
