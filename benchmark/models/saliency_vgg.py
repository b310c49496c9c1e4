"""VGG with BatchNorm (CIFAR or ImageNet) whose sub-models keep a chosen subset of every layer's
channels.

From the literature: the VGG configurations (Simonyan & Zisserman, depths 11/13/16/19) in the
common CIFAR form (3x3 conv-BN-ReLU, 2x2 max-pool after each group, global pool -> one Linear);
HSD (Miles & Mikolajczyk, BMVC 2020) pruned VGG16 on CIFAR-10 with teaching assistants that
share weights with the student. HSD's per-layer allocation, saliency and schedule are not
published in anything we could read, so everything below is our design:
- Sub-model k keeps round(keeps[k] * C_l) (>= 1, half up) channels of EVERY conv layer l (one
  uniform ratio, so every method sees the same cost table).
- Which channels: a kept-index buffer per layer and level (checkpoints keep it), initially the
  first channels (a slimmable network); level k's channels are always chosen among level k+1's
  (nested: a student is pruned from its teacher assistant). Only `rerank` (used by the `hsd`
  method) changes them; every other method trains the prefix channels.
- Physical pruning: a level gathers the kept rows/columns of the shared weights and runs a small
  convolution, so its training cost, counted MACs and latency are those of the small network.
- BatchNorm is private per level (full-width affine parameters and running statistics per level;
  a level uses its kept channels' entries), as switchable BN is for slimmable networks.
- `forward_gated` runs level k on its candidates (level k+1's channels) with a 0/1 gate after each
  BN+ReLU, with batch statistics and frozen running statistics, so the gradient w.r.t. the gates
  gives first-order Taylor saliencies of every candidate (Molchanov et al., ICLR 2017).

`variant: imagenet` (the imagenet profile; HSD pruned VGG16 on ImageNet, research/papers.md §6):
torchvision's `vgg16_bn` layout (`torchvision/models/vgg.py`): the same 13 convs and 5 max-pools,
then a 7x7 adaptive average pool and the classifier 25088-4096-4096-classes with ReLU and
dropout 0.5 (hidden widths x `width_mult`). A sub-model prunes the conv channels as above; the
first linear layer reads the kept channels' 7x7 positions, and the two hidden layers stay whole
(filter-level pruning of the conv layers). Full width: 15.47 GMACs at 224 px (torchvision's
docs: 15.47 GFLOPS, which are MACs); 138.36 M parameters, torchvision's 138.37 M less the 4224
conv biases it keeps in front of BatchNorm (ours have none, as in the CIFAR network).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmark.errors import ConfigError, got
from benchmark.models import register_arch
from benchmark.models.base import Capabilities, FlexibleModel, SubModel
from benchmark.models.imagenet_resnet import MIN_IMAGENET_SIZE, check_variant
from benchmark.models.switchable import Switch
from benchmark.models.syncbn import batch_norm

# Conv widths per layer, "M" = 2x2 max-pool (ends a group), as in the common CIFAR VGGs.
CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M"] + [256] * 4 + ["M"] + ([512] * 4 + ["M"]) * 2,
}


def _count(idx: Tensor | None, full: int) -> int:
    return full if idx is None else idx.numel()


def scaled(ratio: float, channels: int) -> int:
    """round(ratio * channels), half up, at least one (layer widths and kept counts)."""
    return max(1, int(ratio * channels + 0.5))


class PrunedConv2d(nn.Conv2d):
    """3x3 conv running only the kept input/output channels (`None` = all), set before forward."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, 1, 1, bias=False)
        self.idx_in: Tensor | None = None
        self.idx_out: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.idx_out is not None:
            w = w.index_select(0, self.idx_out)
        if self.idx_in is not None:
            w = w.index_select(1, self.idx_in)
        return F.conv2d(x, w, None, 1, 1)

    def active_num_params(self) -> int:
        return _count(self.idx_out, self.out_channels) * _count(self.idx_in, self.in_channels) * 9


class PrunedLinear(nn.Linear):
    """Linear layer reading only the kept channels of the last conv layer: its input is
    (N, channels x `spatial`), channel-major (a flattened (N, C, H, W) map, `spatial` = H x W)."""

    def __init__(self, c_in: int, num_classes: int, spatial: int = 1) -> None:
        super().__init__(c_in * spatial, num_classes)
        self.spatial = spatial
        self.idx_in: Tensor | None = None

    def _columns(self) -> Tensor | None:
        if self.idx_in is None or self.spatial == 1:
            return self.idx_in
        pos = torch.arange(self.spatial, device=self.idx_in.device)
        return (self.idx_in[:, None] * self.spatial + pos).flatten()

    def forward(self, x: Tensor) -> Tensor:
        cols = self._columns()
        w = self.weight if cols is None else self.weight.index_select(1, cols)
        return F.linear(x, w, self.bias)

    def active_num_params(self) -> int:
        kept = _count(self.idx_in, self.in_features // self.spatial) * self.spatial
        return (kept + 1) * self.out_features


def imagenet_classifier(c_in: int, hidden: int, num_classes: int) -> nn.Sequential:
    """torchvision VGG's head: 7x7 adaptive average pool, flatten, Linear(c_in x 49, hidden),
    ReLU, Dropout(0.5), Linear(hidden, hidden), ReLU, Dropout(0.5), Linear(hidden, classes);
    (N, c_in, H, W) -> (N, classes). Its first linear layer (index 2) reads the kept channels."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(1),
        PrunedLinear(c_in, hidden, 49),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )


class LevelBatchNorm2d(nn.Module, Switch):
    """Private BatchNorm per level over all C channels; the active level normalises the channels
    `idx` (None = all) with its own entries. Training mode uses batch statistics and updates the
    level's running statistics of those channels in place (as nn.BatchNorm2d would on them);
    `probe` = batch statistics without touching running statistics (saliency passes)."""

    def __init__(self, channels: int, levels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(levels, channels))
        self.bias = nn.Parameter(torch.zeros(levels, channels))
        self.register_buffer("running_mean", torch.zeros(levels, channels))
        self.register_buffer("running_var", torch.ones(levels, channels))
        self.eps, self.momentum = eps, momentum
        self.idx: Tensor | None = None
        self.probe = False

    def forward(self, x: Tensor) -> Tensor:
        k, idx = self.active, self.idx
        w, b = self.weight[k], self.bias[k]
        mean, var = self.running_mean[k], self.running_var[k]  # views of the shared buffers
        if idx is not None:
            w, b, mean, var = w[idx], b[idx], mean[idx], var[idx]  # copies
        if self.probe:
            return batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if not self.training:
            return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        if idx is None:  # copies too: an in-place update of the shared buffers' views would
            mean, var = mean.clone(), var.clone()  # invalidate another level's saved tensors
        out = batch_norm(x, mean, var, w, b, True, self.momentum, self.eps)  # updates mean/var
        with torch.no_grad():
            if idx is None:
                self.running_mean[k].copy_(mean)
                self.running_var[k].copy_(var)
            else:
                self.running_mean[k].index_copy_(0, idx, mean)
                self.running_var[k].index_copy_(0, idx, var)
        return out

    def active_num_params(self) -> int:
        return 2 * _count(self.idx, self.weight.shape[1])


class VGGLayer(nn.Module):
    """conv3x3-BN-ReLU with the kept channel indices of every non-full level (`kept{k}`)."""

    def __init__(self, c_in: int, c_out: int, counts: list[int]) -> None:
        super().__init__()
        self.conv = PrunedConv2d(c_in, c_out)
        self.bn = LevelBatchNorm2d(c_out, len(counts))
        self.counts = counts
        for k, c in enumerate(counts[:-1]):
            self.register_buffer(f"kept{k}", torch.arange(c))

    def kept(self, k: int) -> Tensor | None:
        """Sorted channel indices of level k; None for the full level (all channels)."""
        return None if k == len(self.counts) - 1 else getattr(self, f"kept{k}")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class SaliencyVGG(FlexibleModel):
    """One pass per level; `layers` are the conv layers in order, each holding its kept sets."""

    caps = Capabilities(("channels",), reranks_channels=True)

    def __init__(
        self,
        num_classes: int,
        depth: int,
        width_mult: float,
        keeps: list[float],
        variant: str = "cifar",
    ):
        super().__init__()
        self.keeps = list(keeps)
        blocks: list[nn.Module] = []
        c_in = 3
        for v in CFGS[depth]:
            if v == "M":
                blocks.append(nn.MaxPool2d(2))
                continue
            c = scaled(width_mult, v)
            blocks.append(VGGLayer(c_in, c, [scaled(p, c) for p in self.keeps]))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.layers = [m for m in blocks if isinstance(m, VGGLayer)]
        self.imagenet = variant == "imagenet"
        self.classifier: nn.Module = (
            imagenet_classifier(c_in, scaled(width_mult, 4096), num_classes)
            if self.imagenet
            else PrunedLinear(c_in, num_classes)
        )
        self.submodels = [SubModel(i, f"c{p}") for i, p in enumerate(self.keeps)]
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torchvision's VGG initialisation: He (fan-out) convs, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _logits(self, x: Tensor) -> Tensor:
        """Classifier on the last conv map (N, C, H, W): CIFAR global mean + linear, ImageNet
        torchvision's head."""
        return self.classifier(x) if self.imagenet else self.classifier(x.mean((2, 3)))

    def _route(self, k: int, over: int, probe: bool) -> None:
        """Run level k's BatchNorm entries on the channels of level `over` (k itself normally)."""
        idx_in = None  # all three image channels
        for layer in self.layers:
            idx = layer.kept(over)
            layer.conv.idx_in, layer.conv.idx_out = idx_in, idx
            layer.bn.active, layer.bn.idx, layer.bn.probe = k, idx, probe
            idx_in = idx
        first = self.classifier[2] if self.imagenet else self.classifier
        first.idx_in = idx_in

    def forward_sub(self, x: Tensor, k: int) -> Tensor:
        self._route(k, k, False)
        return self._logits(self.features(x))

    def forward_sub_features(self, x: Tensor, k: int) -> tuple[Tensor, list[Tensor]]:
        """Logits and the output of every conv group before its max-pool."""
        self._route(k, k, False)
        feats = []
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                feats.append(x)
            x = m(x)
        return self._logits(x), feats

    # --- saliency support (used by the hsd method) ----------------------------------------
    def _teacher(self, k: int) -> int:
        return min(k + 1, self.num_submodels - 1)

    def candidates(self, k: int) -> list[Tensor]:
        """Per layer, the channels level k chooses from: those of level k+1 (all for the full)."""
        out = []
        for layer in self.layers:
            idx = layer.kept(self._teacher(k))
            dev = layer.bn.running_mean.device
            out.append(torch.arange(layer.counts[-1], device=dev) if idx is None else idx)
        return out

    def gates(self, k: int) -> list[Tensor]:
        """Per layer, 1.0 for the candidates level k keeps, 0.0 for the others."""
        return [
            torch.ones(len(cand), device=cand.device)
            if layer.kept(k) is None
            else torch.isin(cand, layer.kept(k)).float()
            for layer, cand in zip(self.layers, self.candidates(k))
        ]

    def forward_gated(
        self, x: Tensor, k: int, gates: list[Tensor] | None = None, own: bool = False
    ) -> Tensor:
        """Logits of level k run on its candidates' channels, each layer's BN+ReLU output
        multiplied by `gates[l]` (shape (n_cand,) or (N, n_cand); default `gates(k)`, which
        gives level k's own output). BatchNorm uses batch statistics and level k's entries and
        leaves running statistics untouched. `own=True`: level k on its own channels only
        (e.g. a teacher's logits as in training, without updating its statistics)."""
        if own:
            self._route(k, k, True)
            return self._logits(self.features(x))
        gates = self.gates(k) if gates is None else gates
        self._route(k, self._teacher(k), True)
        i = 0
        for m in self.features:
            x = m(x)
            if isinstance(m, VGGLayer):
                x = x * gates[i][..., None, None]
                i += 1
        return self._logits(x)

    @torch.no_grad()
    def rerank(self, k: int, scores: list[Tensor]) -> float:
        """Level k keeps, in every layer, its number of level k+1's channels with the highest
        `scores[l]` (aligned with `candidates(k)[l]`; ties go to the lower channel index).

        Re-rank the largest level first: level k-1 must then choose among level k's new
        channels to stay nested. A channel that joins level k takes level k+1's running
        statistics for it (level k's own are stale or unused), so evaluation right after a
        re-rank is sensible; its affine entries stay level k's own (those the saliency pass
        evaluated it with). Returns the fraction of level k's channels that changed.
        """
        if not 0 <= k < self.num_submodels - 1:
            raise ValueError(f"only levels 0..{self.num_submodels - 2} can be re-ranked, got {k}")
        changed = total = 0
        for layer, cand, s in zip(self.layers, self.candidates(k), scores):
            top = torch.sort(s, descending=True, stable=True).indices[: layer.counts[k]]
            new = cand[top].sort().values
            old = layer.kept(k)
            added = new[~torch.isin(new, old)]
            bn = layer.bn
            bn.running_mean[k, added] = bn.running_mean[k + 1, added]
            bn.running_var[k, added] = bn.running_var[k + 1, added]
            old.copy_(new)
            changed += added.numel()
            total += new.numel()
        return changed / total


def _validate_keeps(keeps) -> list[float]:
    if not isinstance(keeps, (list, tuple)) or not keeps:
        raise ConfigError(f"keeps must be a non-empty list of numbers, {got(keeps)}")
    if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1 for p in keeps):
        raise ConfigError(f"keeps must be channel ratios in (0, 1], {got(keeps)}")
    if any(b <= a for a, b in zip(keeps, keeps[1:])):
        raise ConfigError(
            f"keeps must be strictly increasing (smallest sub-model first), {got(keeps)}"
        )
    if keeps[-1] != 1:
        raise ConfigError(f"keeps must end with 1.0 (the full model), {got(keeps)}")
    return [float(p) for p in keeps]


@register_arch(
    "saliency_vgg",
    defaults={"depth": 16, "width_mult": 1.0, "keeps": [0.25, 0.5, 0.75, 1.0], "variant": "cifar"},
    profiles={
        "smoke": {"depth": 11, "width_mult": 0.125},
        "mini": {"depth": 11, "width_mult": 0.25},
        "imagenet": {"variant": "imagenet", "depth": 16},
    },
    # A plain VGG sums four sub-models' gradients on its shared weights: at the mini profile's
    # lr 0.05 it learns slowly in 8 epochs (ipkd_ta 36-41% vs 39-49% at 0.02, real CIFAR-10
    # subset); smoke uses the same rate.
    # ImageNet: the imagenet profile's torchvision reference recipe (its README lowers the lr to
    # 0.01 only for the VGGs without BatchNorm; the *_bn ones train with the defaults).
    train={"smoke": {"lr": 0.02}, "mini": {"lr": 0.02}},
    description="VGG-BN (CIFAR, or torchvision's ImageNet vgg*_bn), sub-models keep a nested "
    "subset of every layer's channels (prefix unless the hsd method re-ranks them by saliency)",
)
def build_saliency_vgg(num_classes: int, image_size: int, **p) -> SaliencyVGG:
    if p["depth"] not in CFGS:
        raise ConfigError(f"depth must be one of {', '.join(map(str, CFGS))}, {got(p['depth'])}")
    w = p["width_mult"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
        raise ConfigError(f"width_mult must be a positive number, {got(w)}")
    variant = check_variant("saliency_vgg", p["variant"], image_size, MIN_IMAGENET_SIZE)
    if image_size < 32:
        raise ConfigError(
            f"saliency_vgg pools five times and needs images >= 32px, got {image_size}"
        )
    keeps = _validate_keeps(p["keeps"])
    return SaliencyVGG(num_classes, p["depth"], float(w), keeps, variant)
