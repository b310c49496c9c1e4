"""Bit-width-switchable ResNet and the multi_teacher method: the DoReFa quantizer, shared weights
with private BatchNorm, full-precision first/last layers, bit-ops per sub-model, the
multi-teacher loss against hand-computed values, and one real cell through the trainer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smoke_cfg
from test_methods import LABELS, LOGITS, K, softmax_row
from torch.nn import functional as F

from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError
from benchmark.methods import METHODS, Stage
from benchmark.models import ARCHS, IndependentModel, build_model
from benchmark.models.switchable import SwitchableBatchNorm2d
from benchmark.models.switchable_precision import (
    QuantConv2d,
    quantize_activation,
    quantize_weight,
)
from benchmark.training import checkpoint
from benchmark.training.step import Step
from benchmark.training.train import CellOptions, train_cell

ARCH = "switchable_precision_resnet"
TINY = {"depth": 8, "width": 0.25}


def model_of(num_classes: int = 10, **over):
    torch.manual_seed(0)
    return build_model(ARCH, ARCHS.get(ARCH).resolve({**TINY, **over}), num_classes, 32)


# --- quantizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantized_values_lie_on_the_k_bit_grid(bits):
    n = 2**bits - 1
    x = torch.linspace(-0.5, 1.5, 2001)
    a = quantize_activation(x, bits)
    assert a.min() == 0 and a.max() == 1
    torch.testing.assert_close(a * n, (a * n).round(), rtol=0, atol=1e-4)
    assert len(a.unique()) == n + 1  # every level is used by a dense input, no more
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    q = quantize_weight(w, bits)
    assert q.min() >= -1 and q.max() <= 1
    u = (q + 1) / 2 * n  # back to integer levels 0..n
    torch.testing.assert_close(u, u.round(), rtol=0, atol=1e-4)
    assert len(q.unique()) <= n + 1


def test_weight_quantizer_matches_dorefa_formula():
    w = [0.5, -1.0, 0.1, 2.0, -0.3]
    m = max(abs(math.tanh(v)) for v in w)
    for bits in (2, 3):
        n = 2**bits - 1
        want = [2 * round((math.tanh(v) / (2 * m) + 0.5) * n) / n - 1 for v in w]
        got = quantize_weight(torch.tensor(w, dtype=torch.float64), bits).tolist()
        assert got == pytest.approx(want, abs=1e-12), bits
    # activations: clamp to [0, 1], then round to the grid
    a = [-0.4, 0.1, 0.2, 0.5, 0.9, 1.7]
    want = [round(min(max(v, 0.0), 1.0) * 3) / 3 for v in a]
    assert quantize_activation(torch.tensor(a, dtype=torch.float64), 2).tolist() == pytest.approx(
        want, abs=1e-12
    )


def test_32_bits_is_the_identity():
    w = torch.randn(8, 4, 3, 3)
    a = torch.randn(2, 4, 5, 5) * 3
    assert quantize_weight(w, 32) is w and quantize_activation(a, 32) is a


def test_straight_through_gradients():
    x = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(quantize_activation(x, 2).sum(), x)
    inside = (x > 0) & (x < 1)
    assert torch.equal(grad, inside.to(grad.dtype))  # identity inside the clamp, 0 outside
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    up = torch.randn_like(w)
    (g_q,) = torch.autograd.grad((quantize_weight(w, 2) * up).sum(), w)
    t = w.tanh()
    (g_ref,) = torch.autograd.grad((t / t.abs().max() * up).sum(), w)  # the unrounded map
    torch.testing.assert_close(g_q, g_ref)


# --- architecture ---------------------------------------------------------------------------
def test_submodels_share_conv_weights_and_keep_private_batchnorm():
    model = model_of(bits=[2, 4, 32]).train()
    assert [s.name for s in model.submodels] == ["b2", "b4", "b32"]
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert bns and all(len(m.bn) == 3 for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(model.forward_sub(x, 0), y).backward()  # train b2 only
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    for key in after:
        if ".bn." in key:  # private statistics and affine: only b2's moved
            assert (key in changed) == (".bn.0." in key), key
        else:  # every conv and the classifier: one tensor, used (and trained) by all bit-widths
            assert key in changed, key
    model.eval()
    with torch.no_grad():
        outs = [model.forward_sub(x, k) for k in range(3)]
        model.stages[1][0].conv2.weight.mul_(-1)
        for k in range(3):  # a change of a shared conv weight changes every sub-model
            assert not torch.allclose(model.forward_sub(x, k), outs[k]), k


def test_first_conv_and_classifier_stay_full_precision():
    model = model_of().eval()
    quant = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convs) - set(quant) == {"conv1"} and len(quant) == 6
    seen: dict[str, list] = {"conv1": [], "fc": []}
    for name in seen:
        getattr(model, name).register_forward_hook(
            lambda _m, inp, out, n=name: seen[n].append((inp[0], out))
        )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        low, full = model.forward_sub(x, 0), model.forward_sub(x, 3)
    assert not torch.allclose(low, full)
    assert torch.equal(seen["conv1"][0][1], seen["conv1"][1][1])  # same stem output at b2, b32
    for inp, out in seen["fc"]:  # the classifier's plain float weights at every bit-width
        torch.testing.assert_close(out, F.linear(inp, model.fc.weight, model.fc.bias))
    model.forward_sub(x, 0)
    assert {model.get_submodule(n).active_bits() for n in quant} == {(2, 2)}


def test_stage_features_and_channels():
    model = model_of(width=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_sub_features(x, 1)
        torch.testing.assert_close(logits, model.forward_sub(x, 1))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32), (16, 16, 16), (32, 8, 8)]


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"bits": [4, 2]}, "strictly increasing"),
        ({"bits": [2, 2, 32]}, "strictly increasing"),
        ({"bits": [0, 32]}, "integers in 1..32"),
        ({"bits": [2, 64]}, "integers in 1..32"),
        ({"bits": [2.5, 32]}, "integers in 1..32"),
        ({"bits": []}, "non-empty list"),
        ({"depth": 10}, "6n\\+2"),
        ({"depth": 2}, "6n\\+2"),
        ({"width": 0}, "positive number"),
        ({"width": "wide"}, "positive number"),
    ],
)
def test_bad_settings_are_rejected(over, msg):
    with pytest.raises(ConfigError, match=msg):
        model_of(**over)


# --- costs ----------------------------------------------------------------------------------
def test_bitops_fall_with_the_bit_width_and_match_layer_macs():
    costs = count_costs(model_of(width=0.5), 32)  # channels 8/16/32, one block per stage
    assert [c.name for c in costs] == ["b2", "b4", "b8", "b32"]
    assert len({c.mmacs for c in costs}) == 1 and len({c.params_m for c in costs}) == 1
    assert [c.gbitops for c in costs] == sorted({c.gbitops for c in costs})
    stem, fc = 3 * 8 * 9 * 32 * 32, 32 * 10  # full precision at every bit-width
    quant = [
        8 * 8 * 9 * 32 * 32,  # stage 1: two 3x3 convs at 32x32
        8 * 8 * 9 * 32 * 32,
        8 * 16 * 9 * 16 * 16,  # stage 2: strided conv, then 16 -> 16 at 16x16
        16 * 16 * 9 * 16 * 16,
        16 * 32 * 9 * 8 * 8,  # stage 3 at 8x8
        32 * 32 * 9 * 8 * 8,
    ]
    macs = stem + fc + sum(quant)
    assert costs[0].mmacs == pytest.approx(macs / 1e6, rel=1e-12)
    for c, bits in zip(costs, [2, 4, 8, 32]):
        want = ((stem + fc) * 32 * 32 + sum(quant) * bits * bits) / 1e9
        assert c.gbitops == pytest.approx(want, rel=1e-12), c.name
    assert costs[-1].gbitops == pytest.approx(costs[-1].mmacs * 1024 / 1000, rel=1e-12)
    # the same costs for K separate networks (independent, takd)
    assert count_costs(IndependentModel(model_of(width=0.5)), 32) == costs


# --- multi_teacher (on the fixed logits of tests/test_methods.py) -----------------------------
PI = {0: [0.4, -0.3], 1: [0.8]}  # importance logits of students 0 and 1 over their teachers


def ref_terms(k: int, T: float) -> dict[str, float]:
    """ce, kd and imp of student k, element by element from the definitions."""
    teachers = list(range(k + 1, K))
    e = [math.exp(p) for p in PI.get(k, [])]
    w = [v / sum(e) for v in e]
    ce = kd = imp = 0.0
    for b, t in enumerate(LABELS):
        ce -= math.log(softmax_row(LOGITS[k][b])[t])
        if k == K - 1:
            continue
        mix_T = [sum(w[i] * softmax_row(LOGITS[j][b], T)[c] for i, j in enumerate(teachers))
                 for c in range(5)]  # fmt: skip
        q = softmax_row(LOGITS[k][b], T)
        kd += T * T * sum(p * (math.log(p) - math.log(s)) for p, s in zip(mix_T, q))
        imp -= math.log(sum(w[i] * softmax_row(LOGITS[j][b])[t] for i, j in enumerate(teachers)))
    n = len(LABELS)
    return {"ce": ce / n, "kd": kd / n, "imp": imp / n}


def bound_method(T: float, b: float):
    method = METHODS.get("multi_teacher")({"T": T, "b": b})
    method.bind(K)
    method.double()  # float64 like the reference math (pi included)
    with torch.no_grad():
        for k, values in PI.items():
            method.pi[k].copy_(torch.tensor(values, dtype=torch.float64))
    return method


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("b", [0.5, 1.0])
def test_multi_teacher_loss_matches_hand_computed(T, b):
    method = bound_method(T, b)
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    teachers: dict[int, torch.Tensor] = {}
    for k in reversed(range(K)):  # largest first, as the trainer does
        loss, terms = method.loss(k, z[k], teachers, torch.tensor(LABELS), K)
        teachers[k] = z[k]
        want = ref_terms(k, T)
        if k == K - 1:
            assert set(terms) == {"ce"}
            assert loss.item() == pytest.approx(want["ce"], rel=1e-12)
            continue
        assert set(terms) == {"ce", "kd", "imp"}
        for name in terms:
            assert terms[name].item() == pytest.approx(want[name], rel=1e-10), (k, name)
        total = want["ce"] + b * want["kd"] + want["imp"]
        assert loss.item() == pytest.approx(total, rel=1e-10), k


def test_multi_teacher_gradients_reach_only_their_targets():
    method = bound_method(2.0, 0.5)
    z = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in LOGITS]
    teachers = {1: z[1], 2: z[2]}  # NOT detached by the caller
    loss, terms = method.loss(0, z[0], teachers, torch.tensor(LABELS), K)
    pi = method.pi[0]

    def grads(t):
        return torch.autograd.grad(t, [z[0], z[1], z[2], pi], allow_unused=True, retain_graph=True)

    g_student, g_t1, g_t2, g_pi = grads(loss)
    assert g_t1 is None and g_t2 is None  # no gradient into the teachers' logits
    assert g_student.abs().sum() > 0 and g_pi.abs().sum() > 0
    g_student, _, _, g_pi_kd = grads(terms["kd"])
    assert g_pi_kd is None and g_student.abs().sum() > 0  # KD term: the student only
    g_student, _, _, g_pi = grads(terms["imp"])
    assert g_student is None and g_pi.abs().sum() > 0  # importance term: pi only
    # d imp / d pi_i = w_i - mean_b r_bi, r_bi = w_i p_i(y_b) / sum_j w_j p_j(y_b): descent moves
    # weight towards the teachers that give the true labels more probability
    e = [math.exp(v) for v in PI[0]]
    w = [v / sum(e) for v in e]
    want = [w[i] for i in range(2)]
    for b, t in enumerate(LABELS):
        p = [w[i] * softmax_row(LOGITS[1 + i][b])[t] for i in range(2)]
        for i in range(2):
            want[i] -= p[i] / sum(p) / len(LABELS)
    assert g_pi.tolist() == pytest.approx(want, rel=1e-10)


def test_multi_teacher_parameters_exist_after_bind_and_learn_in_a_training_step():
    method = METHODS.get("multi_teacher")({})
    assert list(method.parameters()) == []  # K is unknown until the trainer binds it
    method.bind(4)
    assert [tuple(p.shape) for p in method.pi] == [(3,), (2,), (1,)]
    assert set(method.state_dict()) == {"pi.0", "pi.1", "pi.2"}
    assert METHODS.get("multi_teacher").param_lr_scale == 0.1
    model = model_of()
    step = Step(model, method, Stage((0, 1, 2, 3)))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in method.pi]
    terms = step(x, y).terms
    assert {"imp/b2", "kd/b2", "ce/b2", "imp/b8", "ce/b32"} <= set(terms)
    assert method.pi[0].grad.abs().sum() > 0 and method.pi[1].grad.abs().sum() > 0
    torch.optim.SGD(method.parameters(), lr=1.0).step()
    assert not torch.equal(method.pi[0], before[0])


def test_multi_teacher_cell_logs_bitops_and_importance(tracking_uri, client, tmp_path):
    cfg = smoke_cfg(ARCH, "multi_teacher", tmp_path, arch__depth=8, arch__width=0.25)
    result = train_cell(cfg, CellOptions(tracking_uri=tracking_uri, progress=False))
    run = client.get_run(result.run_id)
    m = run.data.metrics
    names = ["b2", "b4", "b8", "b32"]
    bitops = [m[f"gbitops/{n}"] for n in names]
    assert bitops == sorted(set(bitops))
    assert len({m[f"mmacs/{n}"] for n in names}) == 1
    epochs = cfg["train"]["epochs"]
    learned = {}
    for s in range(3):
        row = {t: m[f"method/importance/{names[s]}/{t}"] for t in names[s + 1 :]}
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-6), names[s]
        learned[names[s]] = row
        for t in row:
            hist = client.get_metric_history(result.run_id, f"method/importance/{names[s]}/{t}")
            assert sorted(h.step for h in hist) == list(range(epochs))
    assert learned["b8"] == {"b32": 1.0}
    assert learned["b2"] != pytest.approx({t: 1 / 3 for t in ("b4", "b8", "b32")}, abs=1e-6)
    # the learned importance is part of the checkpoint (resume continues from it)
    state = checkpoint.load(checkpoint.cell_dir(cfg, "flexbench", result.key) / "checkpoint.pt")
    w = state["method"]["pi.0"].softmax(0).tolist()
    assert w == pytest.approx([learned["b2"][t] for t in ("b4", "b8", "b32")], rel=1e-6)
