"""Each extension point is one file: the worked example of docs/contributing.md, registered at
runtime, shows up everywhere the registries are enumerated (`flexbench ls`, the study space,
grid files' `all`, report colours), and so does an architecture registered with its own
profile sizes; both are removed again afterwards.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.config import PROFILES, resolve
from benchmark.grid.spec import load_grid
from benchmark.methods import METHODS
from benchmark.models import ARCHS, register_arch
from benchmark.models.slimmable_mobilenet_v1 import build_slimmable_mobilenet_v1
from benchmark.training.train import make_method, make_model
from reports.style import method_order, method_styles, slot_style
from studies.space import Dim, declared_space, resolve_space

GUIDE = Path(__file__).parent.parent / "docs" / "contributing.md"
MARK = "<!-- worked example: executed by tests/test_extension.py -->"
ARCH_MARK = "<!-- worked example (architecture): executed by tests/test_extension.py -->"


def worked_example(mark: str = MARK) -> str:
    """The Python block that follows the marker in the contributing guide."""
    text = GUIDE.read_text()
    assert mark in text, f"{GUIDE} lost its worked example"
    block = re.search(r"```python\n(.*?)```", text[text.index(mark) :], re.S)
    assert block is not None
    return block.group(1)


@pytest.fixture
def my_kd():
    """Registers the guide's method as `benchmark.methods.my_kd` would when its file exists."""
    before = method_styles(METHODS.names())
    namespace = {"__name__": "benchmark.methods.my_kd"}
    exec(compile(worked_example(), str(GUIDE), "exec"), namespace)
    try:
        yield METHODS.get("my_kd"), before
    finally:
        METHODS.unregister("my_kd")
    assert "my_kd" not in METHODS


@pytest.fixture
def tiny_us():
    """Registers the guide's width architecture as `benchmark/models/tiny_us.py` would."""
    namespace = {"__name__": "benchmark.models.tiny_us"}
    exec(compile(worked_example(ARCH_MARK), str(GUIDE), "exec"), namespace)
    try:
        yield namespace["TinyUS"]
    finally:
        ARCHS.unregister("tiny_us")
    assert "tiny_us" not in ARCHS


@pytest.fixture
def narrow_arch():
    """A new architecture: a narrow slimmable MobileNet variant with its own smoke sizes."""
    register_arch(
        "tmp_narrow_mobilenet",
        defaults={
            "widths": [0.5, 1.0],
            "width_mult": 0.5,
            "stage_blocks": [1, 1, 1, 1, 1],
            "stem_stride": 1,
        },
        profiles={"smoke": {"width_mult": 0.125}},
        train={"smoke": {"lr": 0.05}},
        description="throw-away test architecture",
    )(build_slimmable_mobilenet_v1)
    try:
        yield ARCHS.get("tmp_narrow_mobilenet")
    finally:
        ARCHS.unregister("tmp_narrow_mobilenet")


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    return rc, out.getvalue()


def test_worked_example_method_is_everywhere_once_registered(my_kd, tmp_path):
    cls, before = my_kd
    rc, out = run_cli("ls")
    assert rc == 0
    assert re.search(r"^  my_kd +each sub-model distills .* \[T=4, a=0\.5\]$", out, re.M), out
    # the study space comes from the parameters' declared ranges
    assert declared_space("my_kd") == {"T": Dim(1.0, 10.0, log=True), "a": Dim(0.2, 0.8)}
    assert resolve_space("my_kd", items=["a=0.3:0.6"])["a"] == Dim(0.3, 0.6)
    # report colours: its own slot, and nobody else's colour moved
    styles = method_styles(METHODS.names())
    assert styles["my_kd"] == slot_style(cls.plot_slot)
    assert {m: s for m, s in styles.items() if m != "my_kd"} == before
    # its place in tables: after the baseline and every method of a lower slot
    order = method_order(METHODS.names(), "joint")
    lower = [m for m in order[1:] if m != "my_kd" and METHODS.get(m).plot_slot < cls.plot_slot]
    assert order[: len(lower) + 2] == ["joint", *lower, "my_kd"]
    # grids with `methods: all` get it; the loss trains the model
    grid = tmp_path / "g.yaml"
    doc = {"name": "ext", "profile": "smoke", "archs": ["slimmable_mobilenet_v1"]}
    doc.update(datasets=["synthetic"], methods="all", seeds=[0])
    grid.write_text(yaml.safe_dump(doc))
    spec = load_grid(grid)
    # hsd needs re-rankable channels, sandwich / attentive / bignas / ieb / mutualnet a width
    # range, imta an MSDNet, byot exit features, ztw / boosted / l2w / sdn / pl_distill early
    # exits, ofa_ps an elastic network: left out of this grid
    left_out = ("hsd", "sandwich", "attentive", "bignas", "ieb", "mutualnet", "imta", "byot",
                "ztw", "boosted", "l2w", "sdn", "pl_distill", "ofa_ps")  # fmt: skip
    assert [c.method for c in spec.cells] == [m for m in METHODS.names() if m not in left_out]
    cfg = next(c.cfg for c in spec.cells if c.method == "my_kd")
    assert cfg["method"] == {"name": "my_kd", "T": 4.0, "a": 0.5}
    model = make_model(cfg, 10, 32).train()
    method = make_method(cfg, model.num_submodels)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    n = model.num_submodels
    logits = {k: model.forward_sub(x, k) for k in range(n)}
    teachers = {k: logits[k].detach() for k in range(1, n)}
    loss, terms = method.loss(0, logits[0], teachers, y, n)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"ce", "kd"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_new_architecture_brings_its_profile_sizes_and_joins_all_grids(narrow_arch, tmp_path):
    cfg = resolve("tmp_narrow_mobilenet", "synthetic", "joint", 0, "smoke")
    assert cfg["arch"]["width_mult"] == 0.125 and cfg["arch"]["widths"] == [0.5, 1.0]
    assert cfg["train"]["lr"] == 0.05 != PROFILES["smoke"]["train"]["lr"]
    assert (
        resolve("tmp_narrow_mobilenet", "synthetic", "joint", 0, "paper")["arch"]["width_mult"]
        == 0.5
    )  # no entry for paper: its defaults
    rc, out = run_cli("ls")
    assert rc == 0 and "tmp_narrow_mobilenet" in out
    grid = tmp_path / "g.yaml"
    doc = {"name": "ext", "profile": "smoke", "archs": "all", "datasets": ["synthetic"]}
    doc.update(methods=["joint", "hsd"], seeds=[0])
    grid.write_text(yaml.safe_dump(doc))
    spec = load_grid(grid)
    assert ("tmp_narrow_mobilenet", "joint") in {(c.arch, c.method) for c in spec.cells}
    # hsd needs re-rankable channels: the new architecture's pair is left out and listed
    left_out = {(a, m) for a, m, _ in spec.incompatible}
    assert ("tmp_narrow_mobilenet", "hsd") in left_out
    assert ("saliency_vgg", "hsd") not in left_out
    rc, out = run_cli("grid", "plan", str(grid), "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert rc == 0 and "hsd x tmp_narrow_mobilenet: method hsd needs saliency-ranked" in out


def test_worked_example_width_architecture_trains_with_drawn_widths(tiny_us, tmp_path):
    """The guide's architecture declares its contract (a width range, BN recalibration) and
    nothing else is needed: it is listed, named where sandwich is refused elsewhere, and a
    sandwich cell trains it with drawn widths, recalibrated evaluation and a width spectrum."""
    from conftest import smoke_cfg

    from benchmark.models import archs_having
    from benchmark.training.train import CellOptions, train_cell

    rc, out = run_cli("ls")
    assert rc == 0 and "tiny_us" in out
    assert "tiny_us" in archs_having("widths") and "tiny_us" in archs_having("bn_recalibration")
    cfg = smoke_cfg("tiny_us", "sandwich", tmp_path)
    assert cfg["train"]["bn_calib_batches"] == 2  # the architecture's own training setting
    model = make_model(cfg, 10, 32)
    assert isinstance(model, tiny_us) and model.caps.widths.spectrum() == [0.25, 0.5, 0.75, 1.0]
    uri = f"sqlite:///{tmp_path}/m.db"
    result = train_cell(cfg, CellOptions(tracking_uri=uri, progress=False))
    names = [r["name"] for r in result.rows]
    assert names[:3] == ["w0.25", "w0.5", "w1.0"]
    assert names[3:] == [f"spectrum/w{w:.2f}" for w in (0.25, 0.5, 0.75, 1.0)]
    macs = [r["mmacs"] for r in result.rows[:3]]
    assert macs == sorted(macs) and macs[0] < macs[-1]  # smaller widths cost less
