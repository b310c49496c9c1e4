"""Method losses: hand-computed values, a regression fixture, and no gradient into teachers.

The reference math below follows the method definitions (sub-models s_1 < ... < s_K, logits z_k):
KD(z_s, z_t; T) = T^2 * mean_b sum_c p_t log(p_t / p_s), p = softmax(z / T), teacher detached.

Regenerate the fixture after an intended change of a method's math (or after registering a new
method) with:
    FLEXBENCH_REGEN_FIXTURES=1 .venv/bin/python -m pytest tests/test_methods.py -k fixture
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from benchmark.methods import METHODS, Stage
from benchmark.methods.base import OWN_TEACHER
from benchmark.models import ARCHS, build_model

FIXTURE = Path(__file__).parent / "fixtures" / "method_losses.json"
K = 3

# A tiny fixed batch: 4 samples, 5 classes, K=3 sub-models (smallest first).
LOGITS = [
    [[1.0, -0.5, 0.3, 2.0, 0.0], [0.2, 0.1, -1.0, 0.5, 1.5], [-0.3, 2.2, 0.0, 0.1, -1.2],
     [0.0, 0.0, 0.5, -0.5, 1.0]],
    [[1.5, -1.0, 0.0, 2.5, -0.2], [0.0, 0.4, -1.5, 0.9, 2.0], [-0.8, 2.9, 0.3, 0.0, -1.0],
     [0.3, -0.2, 0.9, -0.9, 1.6]],
    [[2.0, -1.2, -0.4, 3.1, -0.5], [-0.3, 0.6, -2.0, 1.0, 2.8], [-1.0, 3.5, 0.2, -0.4, -1.1],
     [0.6, -0.5, 1.2, -1.4, 2.3]],
]  # fmt: skip
LABELS = [3, 4, 1, 2]


# --- reference math, element by element --------------------------------------------------
def softmax_row(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_ce(z: list[list[float]], y: list[int]) -> float:
    return sum(-math.log(softmax_row(row)[t]) for row, t in zip(z, y)) / len(y)


def ref_kd(zs: list[list[float]], zt: list[list[float]], T: float) -> float:
    total = 0.0
    for rs, rt in zip(zs, zt):
        ps, pt = softmax_row(rs, T), softmax_row(rt, T)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    return T * T * total / len(zs)


def ref_ce_smoothed(z: list[list[float]], y: list[int], eps: float) -> float:
    """(1 - eps) CE + eps x the mean over classes of -log p (torch's label smoothing)."""
    total = 0.0
    for row, t in zip(z, y):
        logp = [math.log(p) for p in softmax_row(row)]
        total += (1 - eps) * -logp[t] + eps * -sum(logp) / len(logp)
    return total / len(y)


def ref_losses(method: str, T: float, a: float) -> list[float]:
    """Per-sub-model loss of `method` on LOGITS/LABELS, straight from the definitions."""
    z, y, last = LOGITS, LABELS, K - 1
    ce = [ref_ce(z[k], y) for k in range(K)]
    if method in ("joint", "independent"):
        return ce
    teacher = {
        "ipkd": lambda k: last,
        "sandwich": lambda k: last,  # over the step's drawn widths (test_uslim: the draws)
        "mutualnet": lambda k: last,  # over the drawn (width, resolution)s (test_mutualnet)
        "ipkd_ta": lambda k: k + 1,
        "takd": lambda k: k + 1,
        "hsd": lambda k: k + 1,
        "imta": lambda k: last,
        "bignas": lambda k: last,  # the largest: CE with label smoothing 0.1
        "attentive": lambda k: last,  # bignas's loss over attentively drawn widths
    }[method]
    if method in ("bignas", "attentive"):
        ce[last] = ref_ce_smoothed(z[last], y, 0.1)
    return [
        ce[k] if k == last else (1 - a) * ce[k] + a * ref_kd(z[k], z[teacher(k)], T)
        for k in range(K)
    ]


def ref_attention(f: list) -> list[list[float]]:
    """Attention map per sample: mean over channels of f^2 at each position, l2-normalised."""
    out = []
    for sample in f:  # (C, H, W) nested lists
        q = [
            sum(ch[i][j] ** 2 for ch in sample) / len(sample)
            for i in range(len(sample[0]))
            for j in range(len(sample[0][0]))
        ]
        norm = math.sqrt(sum(v * v for v in q))
        out.append([v / norm for v in q])
    return out


def ref_at(fs: list, ft: list) -> float:
    """Mean over samples and positions of the squared difference of attention maps."""
    qs, qt = ref_attention(fs), ref_attention(ft)
    diffs = [(a - b) ** 2 for rs, rt in zip(qs, qt) for a, b in zip(rs, rt)]
    return sum(diffs) / len(diffs)


# --- the methods as the trainer runs them ---------------------------------------------------
def method_params(name: str, case: dict[str, float]) -> dict[str, float]:
    """The values of `case` that `name` takes (its tunable loss parameters)."""
    return {k: v for k, v in case.items() if k in METHODS.get(name).PARAMS}


def run_losses(
    name: str, params: dict, logits: list, labels: list, feats: list | None = None
) -> dict[int, float]:
    """Loss of every sub-model over all stages, with teachers as benchmark.training.step provides
    them: frozen teachers' logits (and stage features) plus the larger sub-models of the same
    step, detached (and, for methods that read earlier exits, every exit of the one pass)."""
    torch.manual_seed(0)  # methods with learned parts (l2w's meta-network) start alike
    method = METHODS.get(name)(params)
    method.bind(len(logits))
    z = [torch.tensor(v, dtype=torch.float64) for v in logits]
    if hasattr(method, "guides"):  # ieb's EMA teacher at the first step: a copy of the model,
        method.guides = {j: zj.clone() for j, zj in enumerate(z)}  # so its logits are these
    f = [[torch.tensor(m, dtype=torch.float64) for m in sub] for sub in feats or []]
    y = torch.tensor(labels)
    out: dict[int, float] = {}
    stages = method.stages(len(z))
    if method.own_teacher:  # ofa_ps: its last phase, the largest logits as its frozen teacher
        stages = stages[-1:]
    for stage in stages:
        teachers = {t: z[t] for t in stage.frozen_teachers}
        if method.own_teacher:
            teachers[OWN_TEACHER] = z[-1].detach()
        if method.reads_earlier_exits:
            teachers.update({j: z[j].detach() for j in stage.train})
        for k in sorted(stage.train, reverse=True):
            fk = None
            if method.uses_features:
                fk = {j: [m.detach() for m in f[j]] for j in range(len(z)) if j != k}
                fk[k] = f[k]
            loss, terms = method.loss(k, z[k], teachers, y, len(z), fk)
            teachers[k] = z[k].detach()
            assert k not in out, f"{name}: sub-model {k} trained in two stages"
            out[k] = loss.item()
    return out


CASES = [(1.0, 1.0), (4.0, 0.5), (2.0, 0.0), (3.0, 0.3)]


def _feats(seed: int, shapes: list[tuple[int, ...]]) -> list:
    """Stage features for K sub-models (nested lists), one map per shape."""
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(s, generator=g, dtype=torch.float64).tolist() for s in shapes]
        for _ in range(K)
    ]


# Two stages of stage features: 4 samples x 2 channels at 3x2, then 3 channels at 2x2.
FEATS = _feats(7, [(4, 2, 3, 2), (4, 3, 2, 2)])


@pytest.mark.parametrize(
    "name",
    ["joint", "independent", "ipkd", "ipkd_ta", "takd", "hsd", "imta", "sandwich", "mutualnet",
     "bignas", "attentive"],
)  # fmt: skip
@pytest.mark.parametrize("T,a", CASES)
def test_loss_matches_hand_computed(name, T, a):
    got = run_losses(name, method_params(name, {"T": T, "a": a}), LOGITS, LABELS)
    want = ref_losses(name, T, a)
    assert sorted(got) == list(range(K))
    for k in range(K):
        assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), (name, k)


@pytest.mark.parametrize("T,b,g", [(1.0, 1.0, 500.0), (4.0, 0.5, 10.0), (2.0, 0.0, 0.0)])
def test_ekd_loss_matches_hand_computed(T, b, g):
    """L_k = CE + b KD(z_k, z_K; T) + g sum_s AT(f_k^s, f_K^s); the full net: CE only."""
    got = run_losses("ekd", {"T": T, "b": b, "g": g}, LOGITS, LABELS, FEATS)
    last = K - 1
    for k in range(K):
        want = ref_ce(LOGITS[k], LABELS)
        if k < last:
            want += b * ref_kd(LOGITS[k], LOGITS[last], T)
            want += g * sum(ref_at(FEATS[k][s], FEATS[last][s]) for s in range(2))
        assert got[k] == pytest.approx(want, rel=1e-10), k


def test_ekd_compares_only_same_resolution_maps_and_detaches_the_full_net():
    method = METHODS.get("ekd")({"T": 2.0, "b": 1.0, "g": 100.0})
    z = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in LOGITS]
    f = [[torch.tensor(m, dtype=torch.float64, requires_grad=True) for m in sub] for sub in FEATS]
    small = torch.randn(4, 3, 1, 2, dtype=torch.float64, requires_grad=True)  # another resolution
    feats = {0: [f[0][0], small], K - 1: f[K - 1]}  # NOT detached by the caller
    loss, terms = method.loss(0, z[0], {K - 1: z[K - 1]}, torch.tensor(LABELS), K, feats)
    assert terms["at"].item() == pytest.approx(ref_at(FEATS[0][0], FEATS[K - 1][0]), rel=1e-10)
    loss.backward()
    assert small.grad is None  # its resolution matches no map of the full net
    assert z[K - 1].grad is None and all(m.grad is None for m in f[K - 1])
    assert z[0].grad.abs().sum() > 0 and f[0][0].grad.abs().sum() > 0


@pytest.mark.parametrize("position", [None, (1, 10), (4, 10), (10, 10)])
def test_sdn_loss_matches_hand_computed(position):
    """tau_i CE_i for the ICs, C_i = 0.9 i / (K - 1), tau_i = min(C_i, 0.01 + e C_i / E); the
    final exit: CE. Before any epoch_start (None) tau = C."""
    method = METHODS.get("sdn")({})
    if position is not None:
        method.position = position
    e, E = position or (1, 1)
    z, y = [torch.tensor(v, dtype=torch.float64) for v in LOGITS], torch.tensor(LABELS)
    for k in range(K):
        got, terms = method.loss(k, z[k], {}, y, K)
        c = 0.9 * (k + 1) / (K - 1)
        w = 1.0 if k == K - 1 else min(c, 0.01 + e * c / E)
        assert got.item() == pytest.approx(w * ref_ce(LOGITS[k], LABELS), rel=1e-12), k


def test_sdn_ic_only_trains_the_final_exit_then_the_ics_on_plain_ce():
    method = METHODS.get("sdn")({"training": "ic_only"})
    assert method.stages(K) == [Stage((K - 1,)), Stage(tuple(range(K - 1)))]
    got = run_losses("sdn", {"training": "ic_only"}, LOGITS, LABELS)
    assert [got[k] for k in range(K)] == pytest.approx([ref_ce(z, LABELS) for z in LOGITS])


@pytest.mark.parametrize("T,a", CASES)
def test_pl_distill_loss_matches_hand_computed(T, a):
    """(1 - a) CE for the last exit; (1 - a) CE + a KD(z_k, z_K; T) for the others, at the
    step's T (the initial T on the first step)."""
    got = run_losses("pl_distill", {"T": T, "a": a}, LOGITS, LABELS)
    last = K - 1
    for k in range(K):
        want = (1 - a) * ref_ce(LOGITS[k], LABELS)
        if k < last:
            want += a * ref_kd(LOGITS[k], LOGITS[last], T)
        assert got[k] == pytest.approx(want, rel=1e-10), k


# The EMA teacher's logits at the 3 drawn widths (smallest first), unlike the model's own.
GUIDES = [[[0.5, 0.1, -0.2, 1.0, 0.3], [0.0, 0.2, -0.5, 0.4, 0.9], [-0.1, 1.1, 0.4, 0.0, -0.6],
           [0.2, 0.1, 0.3, -0.2, 0.5]],
          [[1.2, -0.3, 0.1, 1.9, 0.2], [0.1, 0.5, -1.0, 0.3, 1.4], [-0.4, 1.8, 0.6, 0.2, -0.9],
           [0.4, 0.0, 0.7, -0.6, 1.1]],
          [[2.2, -0.8, 0.0, 2.4, -0.1], [-0.2, 0.9, -1.2, 0.8, 2.1], [-0.7, 2.6, 0.1, 0.3, -0.8],
           [0.9, -0.1, 1.0, -1.1, 1.9]]]  # fmt: skip


def ref_kd_to_probs(zs: list[list[float]], p: list[list[float]]) -> float:
    """mean_b KL(p_b || softmax(zs_b)) for target probabilities p."""
    total = 0.0
    for rs, pt in zip(zs, p):
        ps = softmax_row(rs)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    return total / len(zs)


@pytest.mark.parametrize("ensemble", ["on", "off"])
def test_ieb_loss_matches_hand_computed(ensemble):
    """The largest: CE with label smoothing 0.1; the random width: KL to the EMA's largest; the
    smallest: KL to the mean of the EMA's softmaxes at the largest and the random width (on),
    or to the EMA's largest (off). The model's own logits of larger widths teach nothing."""
    method = METHODS.get("ieb")({"ensemble": ensemble})
    method.guides = {j: torch.tensor(g, dtype=torch.float64) for j, g in enumerate(GUIDES)}
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    y = torch.tensor(LABELS)
    got = [method.loss(k, z[k], {j: z[j] for j in range(k + 1, K)}, y, K)[0].item()
           for k in range(K)]  # fmt: skip
    p_max = [softmax_row(r) for r in GUIDES[2]]
    mean = [[(a + b) / 2 for a, b in zip(softmax_row(r1), softmax_row(r2))]
            for r1, r2 in zip(GUIDES[1], GUIDES[2])]  # fmt: skip
    want = [
        ref_kd_to_probs(LOGITS[0], mean if ensemble == "on" else p_max),
        ref_kd_to_probs(LOGITS[1], p_max),
        ref_ce_smoothed(LOGITS[2], LABELS, 0.1),
    ]
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("b,eps", [(1.0, 0.1), (0.5, 0.0), (2.0, 0.3)])
def test_ofa_ps_loss_matches_hand_computed(b, eps):
    """Progressive shrinking: CE_ls(z_k, y) + b KL(softmax(t) || softmax(z_k)) with t the frozen
    teacher's logits (here the largest's, at OWN_TEACHER); in the teacher phase (no teacher
    logits) CE_ls alone."""
    method = METHODS.get("ofa_ps")({"b": b}, label_smoothing=eps)
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    y = torch.tensor(LABELS)
    for k in range(K):
        loss, terms = method.loss(k, z[k], {OWN_TEACHER: z[-1]}, y, K)
        want = ref_ce_smoothed(LOGITS[k], LABELS, eps) + b * ref_kd(LOGITS[k], LOGITS[-1], 1.0)
        assert loss.item() == pytest.approx(want, rel=1e-10), k
        assert set(terms) == {"ce", "kd"}
        alone, terms = method.loss(k, z[k], {}, y, K)
        assert alone.item() == pytest.approx(ref_ce_smoothed(LOGITS[k], LABELS, eps), rel=1e-10)
        assert set(terms) == {"ce"}


def test_kd_is_batchmean_kl_times_t_squared():
    from benchmark.methods import kd_loss

    zs = torch.tensor(LOGITS[0], dtype=torch.float64)
    zt = torch.tensor(LOGITS[2], dtype=torch.float64)
    for T in (1.0, 2.0, 4.0):
        assert kd_loss(zs, zt, T).item() == pytest.approx(ref_kd(LOGITS[0], LOGITS[2], T), 1e-12)
    assert kd_loss(zt, zt, 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_label_smoothing_applies_to_ce():
    eps = 0.1
    method = METHODS.get("joint")({}, label_smoothing=eps)
    z = torch.tensor(LOGITS[1], dtype=torch.float64)
    loss, _ = method.loss(1, z, {}, torch.tensor(LABELS), K)
    want = 0.0
    for row, t in zip(LOGITS[1], LABELS):
        logp = [math.log(p) for p in softmax_row(row)]
        want += (1 - eps) * -logp[t] + eps * -sum(logp) / len(logp)
    assert loss.item() == pytest.approx(want / len(LABELS), rel=1e-12)


def test_takd_stages_largest_first_with_next_larger_frozen_teacher():
    method = METHODS.get("takd")({})
    assert method.stages(4) == [
        Stage((3,)),
        Stage((2,), (3,)),
        Stage((1,), (2,)),
        Stage((0,), (1,)),
    ]
    assert METHODS.get("takd").separate_networks
    assert METHODS.get("independent").separate_networks


@pytest.mark.parametrize("name", ["joint", "ipkd", "ipkd_ta"])
def test_online_methods_train_every_submodel_in_one_stage(name):
    assert METHODS.get(name)({}).stages(4) == [Stage((0, 1, 2, 3))]
    assert not METHODS.get(name).separate_networks


# --- regression fixture --------------------------------------------------------------------
FIXTURE_CASES = [
    {"T": 1.0, "a": 1.0, "b": 1.0, "g": 500.0},
    {"T": 4.0, "a": 0.5, "b": 0.5, "g": 10.0},
    {"T": 2.0, "a": 0.9, "b": 2.0, "g": 0.0},
    # the alpha-divergence option of the shared distillation term (methods that declare it)
    {"T": 1.0, "a": 1.0, "b": 1.0, "g": 500.0, "divergence": "alpha", "alpha_plus": 0.5},
]


def _fixture_batch() -> dict:
    """The stored batch if there is one (so regenerating never moves existing numbers)."""
    batch = json.loads(FIXTURE.read_text())["batch"] if FIXTURE.exists() else {}
    if "logits" not in batch:
        g = torch.Generator().manual_seed(2024)
        batch["logits"] = (torch.randn(K, 8, 10, generator=g, dtype=torch.float64) * 2).tolist()
        batch["labels"] = torch.randint(0, 10, (8,), generator=g).tolist()
    if "feats" not in batch:
        g = torch.Generator().manual_seed(2025)
        batch["feats"] = [
            [torch.randn(s, generator=g, dtype=torch.float64).tolist() for s in FEAT_SHAPES]
            for _ in range(K)
        ]
    return batch


FEAT_SHAPES = [(8, 3, 4, 4), (8, 4, 2, 2)]


def _case_key(name: str, case: dict[str, float | str]) -> str:
    keys = [k for k in case if k in ("T", "a") or k in METHODS.get(name).PARAMS]
    return ",".join(f"{k}={case[k]:g}" if k != "divergence" else f"{k}={case[k]}" for k in keys)


def _compute_fixture(batch: dict) -> dict:
    methods = {}
    for name in METHODS.names():
        cases = {}
        for case in FIXTURE_CASES:
            params = method_params(name, case)
            per = run_losses(name, params, batch["logits"], batch["labels"], batch["feats"])
            cases[_case_key(name, case)] = {
                "params": params,
                "submodels": [per[k] for k in range(K)],
                "total": sum(per.values()),
            }
        methods[name] = cases
    return {
        "_doc": "loss of every registered method on a fixed batch; regenerate with "
        "FLEXBENCH_REGEN_FIXTURES=1 pytest tests/test_methods.py -k fixture",
        "batch": batch,
        "methods": methods,
    }


def test_loss_regression_fixture():
    if os.environ.get("FLEXBENCH_REGEN_FIXTURES") == "1":
        fixture = _compute_fixture(_fixture_batch())
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    stored = json.loads(FIXTURE.read_text())
    missing = sorted(set(METHODS.names()) - set(stored["methods"]))
    assert not missing, (
        f"registered method(s) missing from {FIXTURE.name}: {', '.join(missing)}; regenerate "
        f"it with FLEXBENCH_REGEN_FIXTURES=1 pytest tests/test_methods.py -k fixture (existing "
        f"methods' numbers stay: the stored batch is reused)"
    )
    batch = stored["batch"]
    mismatches = []
    for name in METHODS.names():
        for case, want in stored["methods"][name].items():
            got = run_losses(name, want["params"], batch["logits"], batch["labels"], batch["feats"])
            got_list = [got[k] for k in range(K)]
            if got_list != pytest.approx(want["submodels"], rel=1e-5) or sum(
                got_list
            ) != pytest.approx(want["total"], rel=1e-5):
                mismatches.append(f"{name} {case}: {got_list} != {want['submodels']}")
    assert not mismatches, "method losses changed:\n" + "\n".join(mismatches)


# --- teachers get no gradient from students' KD terms ----------------------------------------
@pytest.mark.parametrize("name", ["ipkd", "ipkd_ta", "takd", "hsd", "sandwich", "mutualnet"])
@pytest.mark.parametrize("student", range(K - 1))
def test_kd_term_gives_no_gradient_to_teacher_logits(name, student):
    method = METHODS.get(name)({"T": 2.0, "a": 1.0})
    z = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in LOGITS]
    teachers = {k: z[k] for k in range(K)}  # deliberately NOT detached by the caller
    loss, terms = method.loss(student, z[student], teachers, torch.tensor(LABELS), K)
    assert set(terms) == {"ce", "kd"}
    loss.backward()
    teacher = K - 1 if name in ("ipkd", "sandwich", "mutualnet") else student + 1
    assert z[teacher].grad is None
    assert z[student].grad is not None and z[student].grad.abs().sum() > 0


TINY = {
    "msdnet": {"n_blocks": 3, "base": 1, "step": 1, "n_channels": 4, "growth_rate": 2,
               "head_channels": 8},
    "slimmable_mobilenet_v1": {"width_mult": 0.25, "stage_blocks": [1, 1, 1, 1, 1],
                               "widths": [0.25, 0.5, 1.0]},
}  # fmt: skip


@pytest.mark.parametrize("arch", ["msdnet", "slimmable_mobilenet_v1"])
@pytest.mark.parametrize("name", ["ipkd", "ipkd_ta"])
def test_students_kd_terms_leave_teacher_params_without_gradient(arch, name):
    """One real training step (benchmark.training.step, all sub-models in one stage) in which the
    full model's own CE is switched off and a=1: only the students' KD terms backpropagate, so the
    parameters that only the full model uses must get no gradient."""
    from benchmark.training.step import Step

    class KDTermsOnly(METHODS.get(name)):
        def loss(self, k, logits, teachers, y, num_submodels, feats=None):
            loss, terms = super().loss(k, logits, teachers, y, num_submodels, feats)
            return (loss * 0 if k == num_submodels - 1 else loss), terms

    torch.manual_seed(0)
    model = build_model(arch, ARCHS.get(arch).resolve(TINY[arch]), 10, 32).train()
    method = KDTermsOnly({"T": 2.0, "a": 1.0})
    (stage,) = method.stages(K)
    step = Step(model, method, stage)
    step(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))

    def grads(sub: int) -> list:
        if arch == "msdnet":  # the trunk block and the head only exit `sub` uses
            mods = [model.blocks[sub], model.heads[sub]]
        else:  # the private BatchNorm of width `sub`
            mods = [m.bn[sub] for m in model.modules() if hasattr(m, "bn")]
        return [p.grad for m in mods for p in m.parameters()]

    assert all(g is None or not g.any() for g in grads(K - 1))
    assert all(g is not None and g.any() for g in grads(0)[:1])
    if arch == "slimmable_mobilenet_v1":  # shared weights: slices beyond the students' widths
        from benchmark.models.slimmable_mobilenet_v1 import SlimConv2d

        for m in model.modules():
            if isinstance(m, SlimConv2d):
                assert not m.weight.grad[m.out_list[K - 2] :].any()
                assert m.weight.grad[: m.out_list[K - 2]].any()
