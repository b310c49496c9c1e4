"""Early-exit baselines: IMTA (gradient equilibrium, inline subnetwork collaboration, one-for-all
KD on msdnet) and BYOT (the multi-exit CIFAR ResNet `byot_resnet` and the `byot` loss).

Reference math is written out element by element (helpers of tests/test_methods.py); costs are
checked against multiply-add counts written as formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smoke_cfg
from test_methods import LABELS, LOGITS, ref_ce, ref_kd, softmax_row
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmark.config import resolve
from benchmark.costs.flops import count_costs
from benchmark.errors import ConfigError
from benchmark.methods import METHODS
from benchmark.models import ARCHS, build_model
from benchmark.models.base import count_active_params
from benchmark.training.train import make_model

K = len(LOGITS)
TINY_MSD = {"n_blocks": 3, "base": 1, "step": 1, "n_channels": 4, "growth_rate": 2,
            "head_channels": 8}  # fmt: skip


def msdnet(**arch) -> torch.nn.Module:
    return build_model("msdnet", ARCHS.get("msdnet").resolve({**TINY_MSD, **arch}), 10, 32)


def _params(name: str, **p) -> dict:
    return METHODS.get(name).resolve(p)


# --- imta: the one-for-all KD loss ----------------------------------------------------------
def ref_kl_mean_reduction(zs: list, zt: list, T: float) -> float:
    """IMTA's code: nn.KLDivLoss() with the default 'mean' over batch x classes (no T^2)."""
    total, n = 0.0, 0
    for rs, rt in zip(zs, zt):
        ps, pt = softmax_row(rs, T), softmax_row(rt, T)
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
        n += len(rs)
    return total / n


@pytest.mark.parametrize("T,a", [(3.0, 0.9), (1.0, 0.1), (2.0, 0.5)])
def test_imta_loss_is_hand_computed_one_for_all_kd(T, a):
    """Last exit: CE; exit k < K: (1-a) CE + a T^2 KL(softmax(z_K/T) || softmax(z_k/T)), with
    the KL averaged over the batch only: C times the reference's 'mean'-reduced KL."""
    method = METHODS.get("imta")(_params("imta", T=T, a=a))
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    y = torch.tensor(LABELS)
    teachers = {K - 1: z[K - 1]}
    loss, terms = method.loss(K - 1, z[K - 1], teachers, y, K)
    assert loss.item() == pytest.approx(ref_ce(LOGITS[K - 1], LABELS), rel=1e-12)
    n_classes = len(LOGITS[0][0])
    for k in range(K - 1):
        loss, terms = method.loss(k, z[k], teachers, y, K)
        kd = ref_kd(LOGITS[k], LOGITS[K - 1], T)
        assert terms["kd"].item() == pytest.approx(kd, rel=1e-12)
        theirs = ref_kl_mean_reduction(LOGITS[k], LOGITS[K - 1], T) * T * T
        assert terms["kd"].item() == pytest.approx(n_classes * theirs, rel=1e-12)
        want = (1 - a) * ref_ce(LOGITS[k], LABELS) + a * kd
        assert loss.item() == pytest.approx(want, rel=1e-12), k


def test_imta_defaults_are_the_reference_cifar_setting():
    assert METHODS.get("imta").resolve({}) == {"T": 3.0, "a": 0.9}


# --- byot: the loss -------------------------------------------------------------------------
def _exit_feats(seed: int, channels: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, channels, 1, 1, generator=g, dtype=torch.float64) for _ in range(K)]


def ref_hint(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """Mean over samples of the sum over channels of the squared difference."""
    rows = [sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist()))
            for s, t in zip(fs, ft)]  # fmt: skip
    return sum(rows) / len(rows)


@pytest.mark.parametrize("T,a,g", [(3.0, 0.3, 0.03), (1.0, 0.0, 1.0), (4.0, 1.0, 0.0)])
def test_byot_loss_matches_hand_computed(T, a, g):
    """L_k = (1-a) CE + a KD(z_k, z_K; T) + g mean_b ||f_k - f_K||^2 for k < K; L_K = (1-a) CE.
    Only each exit's first feature (its pooled exit feature) enters the hint."""
    method = METHODS.get("byot")(_params("byot", T=T, a=a, g=g))
    z = [torch.tensor(v, dtype=torch.float64) for v in LOGITS]
    f = _exit_feats(3)
    stage_maps = [torch.randn(4, 2, 3, 3, dtype=torch.float64) * (k + 1) for k in range(K)]
    feats = {k: [f[k], stage_maps[k]] for k in range(K)}
    y = torch.tensor(LABELS)
    for k in range(K):
        loss, terms = method.loss(k, z[k], {K - 1: z[K - 1]}, y, K, feats)
        want = (1 - a) * ref_ce(LOGITS[k], LABELS)
        if k < K - 1:
            want += a * ref_kd(LOGITS[k], LOGITS[K - 1], T) + g * ref_hint(f[k], f[K - 1])
            assert terms["hint"].item() == pytest.approx(ref_hint(f[k], f[K - 1]), rel=1e-12)
        assert loss.item() == pytest.approx(want, rel=1e-12), k


def test_byot_gives_no_gradient_to_the_deepest_exit():
    method = METHODS.get("byot")({})
    z = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in LOGITS]
    f = [t.requires_grad_() for t in _exit_feats(5)]
    feats = {k: [f[k]] for k in range(K)}  # NOT detached by the caller
    loss, _ = method.loss(0, z[0], {K - 1: z[K - 1]}, torch.tensor(LABELS), K, feats)
    loss.backward()
    assert z[K - 1].grad is None and f[K - 1].grad is None
    assert z[0].grad.abs().sum() > 0 and f[0].grad.abs().sum() > 0


def test_byot_defaults_and_bad_parameters(tmp_path):
    assert METHODS.get("byot").resolve({}) == {"T": 3.0, "a": 0.3, "g": 0.03}
    for bad, msg in [
        ({"method.T": 0}, "method byot: T must be > 0, got 0"),
        ({"method.a": 1.5}, r"method byot: a must be in \[0, 1\], got 1.5"),
        ({"method.g": -1}, "method byot: g must be >= 0, got -1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            resolve("byot_resnet", "synthetic", "byot", 0, "smoke", bad)
    sets = {"arch.ge": True, "arch.isc": True}
    with pytest.raises(ConfigError, match=r"a \(IMTA's gamma\) must be in \[0, 1\], got -0.1"):
        resolve("msdnet", "synthetic", "imta", 0, "smoke", {**sets, "method.a": -0.1})
    with pytest.raises(ConfigError, match="method imta: T must be > 0, got -2"):
        resolve("msdnet", "synthetic", "imta", 0, "smoke", {**sets, "method.T": -2})


# --- bad combinations fail before any work ----------------------------------------------------
def test_ge_isc_imta_byot_on_the_wrong_architecture_name_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown parameter.*ge for arch ddnn_resnet.*"
                       "ge is a parameter of msdnet"):  # fmt: skip
        resolve("ddnn_resnet", "synthetic", "joint", 0, "smoke", {"arch.ge": True})
    with pytest.raises(ConfigError, match="isc is a parameter of msdnet"):
        resolve("byot_resnet", "synthetic", "joint", 0, "smoke", {"arch.isc": True})
    with pytest.raises(ConfigError, match="msdnet ge must be true or false, got 'yes'"):
        resolve("msdnet", "synthetic", "joint", 0, "smoke", {"arch.ge": "yes"})
    with pytest.raises(ConfigError, match="architecture byot_resnet is not one; use msdnet"):
        resolve("byot_resnet", "synthetic", "imta", 0, "smoke")
    with pytest.raises(
        ConfigError,
        match="needs msdnet with arch.ge=true and arch.isc=true.*got arch.isc=false"
        ".*add --set arch.isc=true",
    ):
        resolve("msdnet", "synthetic", "imta", 0, "smoke", {"arch.isc": False})
    # imta turns both on by itself (one way to say "IMTA"); the user's value still wins above
    cfg = resolve("msdnet", "synthetic", "imta", 0, "smoke")
    assert cfg["arch"]["ge"] is True and cfg["arch"]["isc"] is True
    with pytest.raises(
        ConfigError,
        match="method byot needs exit features.*architecture slimmable_mobilenet_v1 has none "
        "with these settings; use byot_resnet or msdnet",
    ):
        resolve("slimmable_mobilenet_v1", "synthetic", "byot", 0, "smoke")
    with pytest.raises(ConfigError, match="byot_resnet depth must be one of 18, 50, got 34"):
        resolve("byot_resnet", "synthetic", "joint", 0, "smoke", {"arch.depth": 34})


# --- gradient equilibrium ----------------------------------------------------------------------
def _coarse_grads(model, x, y, exits: list[int]) -> tuple[list[torch.Tensor], dict]:
    """Gradient of sum_{j in exits} CE(z_j, y) at each block's coarsest-scale output (before
    the GE rescaling), and every parameter's gradient."""
    outs: list[torch.Tensor] = []

    def keep(_mod, _inp, out):
        out[-1].retain_grad()
        outs.append(out[-1])

    handles = [b.register_forward_hook(keep) for b in model.blocks]
    logits = model.forward_all(x)
    sum(F.cross_entropy(logits[j], y) for j in exits).backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.grad for t in outs], grads


@pytest.mark.parametrize("exits", [[0, 1, 2, 3], [3], [1], [1, 2]])
def test_ge_divides_the_coarsest_trunk_gradient_by_the_exits_that_use_it(exits):
    """kalviny/IMTA msdnet_ge.py: block i's coarsest output is rescaled by 1/(K-i) before exit i
    and by K-i-1 after it. Telescoped, the gradient reaching it from any loss of exits >= i is
    the plain gradient times exactly 1/(K-i); exit heads' own parameters are unchanged."""
    torch.manual_seed(0)
    plain = msdnet(n_blocks=4).double()
    ge = msdnet(n_blocks=4, ge=True).double()
    ge.load_state_dict(plain.state_dict())
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    g_plain, p_plain = _coarse_grads(plain, x, y, exits)
    g_ge, p_ge = _coarse_grads(ge, x, y, exits)
    n = 4
    for i in range(n):
        if i > max(exits):  # no loss reads this block
            assert g_plain[i] is None and g_ge[i] is None
            continue
        assert g_plain[i].abs().sum() > 0
        torch.testing.assert_close(g_ge[i], g_plain[i] / (n - i), rtol=1e-12, atol=1e-15)
    heads = [k for k in p_plain if k.startswith("heads.")]
    assert heads and all(torch.allclose(p_ge[k], p_plain[k], rtol=1e-12) for k in heads)
    trunk = [k for k in p_plain if k.startswith("blocks.0.")]
    assert any(not torch.allclose(p_ge[k], p_plain[k]) for k in trunk)


def test_ge_leaves_the_forward_unchanged():
    torch.manual_seed(0)
    plain, ge = msdnet().eval(), msdnet(ge=True).eval()
    ge.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(plain.forward_all(x), ge.forward_all(x)):
        assert torch.equal(a, b)


# --- inline subnetwork collaboration -------------------------------------------------------------
def test_isc_feeds_each_exit_the_previous_prediction_and_costs_it():
    """Exit k's classifier reads [its features, ReLU(BN(Linear(z_{k-1})))]: exit k's loss
    reaches exit k-1's classifier, and each exit costs its own and all earlier ISC transforms
    and wider classifiers: k * 2 * hc * C extra MACs for exit k (0-based)."""
    torch.manual_seed(0)
    plain, isc = msdnet(), msdnet(isc=True)
    hc, C = TINY_MSD["head_channels"], 10
    assert [h.linear.in_features for h in isc.heads] == [hc, 2 * hc, 2 * hc]
    isc.train()
    z = isc.forward_all(torch.randn(4, 3, 32, 32), [1])
    F.cross_entropy(z[0], torch.tensor([1, 2, 3, 4])).backward()
    assert isc.heads[0].linear.weight.grad.abs().sum() > 0
    assert isc.isc_modules[0][0].weight.grad.abs().sum() > 0
    assert isc.heads[2].linear.weight.grad is None
    c_plain, c_isc = count_costs(plain, 32), count_costs(isc, 32)
    for k, (a, b) in enumerate(zip(c_plain, c_isc)):
        assert (b.mmacs - a.mmacs) * 1e6 == pytest.approx(k * 2 * hc * C, abs=1e-6), k
        isc_params = k * ((C * hc + hc) + 2 * hc + hc * C)  # Linear+bias, BN, wider linear
        assert round((b.params_m - a.params_m) * 1e6) == isc_params, k


def test_imta_and_joint_on_the_same_network_start_from_the_same_weights(tmp_path):
    sets = {"arch__ge": True, "arch__isc": True}
    a = make_model(smoke_cfg("msdnet", "imta", tmp_path, **sets), 10, 32).state_dict()
    b = make_model(smoke_cfg("msdnet", "joint", tmp_path, **sets), 10, 32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("isc_modules.") for k in a)


# --- byot_resnet ----------------------------------------------------------------------------------
def resnet18_macs(num_classes: int, size: int = 32) -> int:
    """Conv + linear multiply-adds of a plain CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool,
    [2, 2, 2, 2] basic blocks of 64/128/256/512 channels, 1x1 projection shortcuts)."""
    macs, c_in, r = 3 * 64 * 9 * size * size, 64, size
    for s, c in enumerate((64, 128, 256, 512)):
        if s:
            r //= 2
            macs += c_in * c * r * r  # projection shortcut
        macs += c_in * c * 9 * r * r + 3 * c * c * 9 * r * r  # 4 3x3 convs, first reads c_in
        c_in = c
    return macs + 512 * num_classes


def byot_head_macs(num_classes: int, size: int = 32) -> list[int]:
    """Our BYOT shallow heads: 1x1 (C_i -> 128), k x k stride k (128 -> 128) down to the
    deepest resolution, 1x1 (128 -> 512), linear."""
    out, deep = [], size // 8
    for i, c in enumerate((64, 128, 256)):
        r = size >> i
        k = r // deep
        out.append(c * 128 * r * r + 128 * 128 * k * k * deep**2 + 128 * 512 * deep**2
                   + 512 * num_classes)  # fmt: skip
    return out


def test_byot_resnet18_costs_at_paper_size():
    """The last exit's own path is exactly a plain CIFAR ResNet-18: 555,468,800 MACs for
    CIFAR-100 (555.47 MMACs, 11.22 M parameters); the anytime column adds the three heads."""
    model = build_model("byot_resnet", ARCHS.get("byot_resnet").resolve({}), 100, 32).eval()
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_sub(x, 3)
    assert resnet18_macs(100) == 555_468_800
    assert counter.get_total_flops() / 2 == resnet18_macs(100)
    own = count_active_params(model, lambda: model.forward_sub(x, 3))
    assert own == 11_220_132
    heads = byot_head_macs(100)
    costs = count_costs(model, 32)
    assert [c.name for c in costs] == ["exit1", "exit2", "exit3", "exit4"]
    assert costs[3].mmacs * 1e6 == pytest.approx(resnet18_macs(100) + sum(heads), abs=1e-3)
    trunk = [3 * 64 * 9 * 1024 + 4 * 64 * 64 * 9 * 1024]  # stem + stage 1
    for c_in, c, r in ((64, 128, 16), (128, 256, 8)):
        trunk.append(trunk[-1] + c_in * c * 9 * r * r + 3 * c * c * 9 * r * r + c_in * c * r * r)
    for i in range(3):
        assert costs[i].mmacs * 1e6 == pytest.approx(trunk[i] + sum(heads[: i + 1]), abs=1e-3)


def test_byot_resnet_exits_from_one_pass_with_shared_feature_size():
    torch.manual_seed(0)
    for depth, deep in ((18, 32), (50, 128)):
        model = build_model(
            "byot_resnet", ARCHS.get("byot_resnet").resolve({"depth": depth, "width": 0.0625}),
            10, 32,
        ).eval()  # fmt: skip
        x = torch.randn(2, 3, 32, 32)
        outs = model.forward_all_features(x)
        assert [f[0].shape for _, f in outs] == [(2, deep, 1, 1)] * 4
        assert [len(f) for _, f in outs] == [2, 3, 4, 5]  # exit feature + stage outputs
        for k, (z, _) in enumerate(outs):
            torch.testing.assert_close(z, model.forward_sub(x, k))
        assert model.caps.single_pass and model.caps.early_exit and model.caps.exit_features
