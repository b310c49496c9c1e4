"""Batched, on-device data pipeline: uint8 tensors in, normalised channels_last floats out.

No PIL, no DataLoader workers, no per-sample Python: the dataset lives on the training device;
each epoch is a seeded permutation, and pad-4 random crop + horizontal flip are one gather,
optionally followed by an augmentation policy (`benchmark.data.autoaugment`,
`train.augment_policy`) drawn from the same generator. The streamed counterpart (encoded images
decoded per batch) is `benchmark.data.stream`; both give the same batches for the same cell
(same permutation, same crop, flip and policy draws).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from benchmark.data.autoaugment import augment_policy, check_policy
from benchmark.errors import ConfigError

Shard = tuple[int, int]  # (rank, world): this process's part of every batch / split
NO_SHARD: Shard = (0, 1)


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Data order and augmentation depend only on (seed, epoch): same for every method, and a
    resumed run replays exactly the epochs it has not finished."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def epoch_order(
    seed: int, epoch: int, n: int, device: torch.device
) -> tuple[Tensor, torch.Generator]:
    """(permutation of range(n) on CPU, generator of the crop/flip draws on `device`).

    The permutation comes from a CPU generator seeded by (seed, epoch) on every device, so the
    order is the same on CPU and CUDA and the streamed path (whose workers run on CPU) can draw
    it too. On a CPU device the crop/flip draws continue that same generator (the batches of
    flexbench before streaming, bit for bit); on CUDA they come from a device generator with the
    same seed."""
    g = epoch_generator(seed, epoch, torch.device("cpu"))
    perm = torch.randperm(n, generator=g)
    return perm, (g if device.type == "cpu" else epoch_generator(seed, epoch, device))


def check_shard(shard: Shard, batch_size: int | None = None) -> None:
    """ConfigError unless 0 <= rank < world and (training) world divides the global batch."""
    rank, world = shard
    if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise ConfigError(f"shard (rank, world) must have 0 <= rank < world, got {shard}")
    if batch_size is not None and batch_size % world:
        valid = [w for w in range(1, batch_size + 1) if batch_size % w == 0]
        raise ConfigError(
            f"train.batch_size {batch_size} is not divisible by the world size {world}; "
            f"valid world sizes: {', '.join(map(str, valid))}"
        )


def shard_slice(n: int, shard: Shard) -> slice:
    """The rank's contiguous part of `n` items: sizes differ by at most one (the first
    n % world ranks hold one more)."""
    rank, world = shard
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def crop_flip_params(b: int, g: torch.Generator, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """(row offsets (b, 1), column offsets (b, 1), flips (b, 1) bool), drawn in that order on
    the generator's device: the draws of `crop_flip`."""
    dev = g.device
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev)
    flip = torch.rand((b, 1), generator=g, device=dev) < 0.5
    return dy, dx, flip


def apply_crop_flip(x: Tensor, params: tuple[Tensor, Tensor, Tensor], pad: int = 4) -> Tensor:
    """Zero-pad by `pad`, crop at the offsets and flip where drawn, as one indexed gather.
    Returns (B, C, H, W) uint8 with channels_last strides (the gather yields NHWC memory)."""
    dy, dx, flip = (p.to(x.device) for p in params)
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy + ar_h
    cols = dx + torch.where(flip, ar_w.flip(0), ar_w)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def crop_flip(x: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding `pad` and random horizontal flip (torchvision's
    `RandomCrop(size, padding=4)` + `RandomHorizontalFlip`), as one indexed gather."""
    return apply_crop_flip(x, crop_flip_params(x.shape[0], g, pad), pad)


class Normalizer:
    """uint8 -> float, (x/255 - mean)/std, in `memory_format` (the model's:
    benchmark.costs.speed)."""

    def __init__(
        self,
        mean,
        std,
        device: torch.device,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        self.memory_format = memory_format
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(
            1, 3, 1, 1
        )

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=self.memory_format).float()
        return x * self.scale + self.shift


class TrainSource(Protocol):
    """Training batches of one split: `len()` steps per epoch, `batch_size` images per step
    (this shard's), `epoch(e)` -> (normalised images (b, 3, S, S), labels (b,)) on the device."""

    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]: ...


class ImageSet(Protocol):
    """One split of a dataset, decoded in memory (`TensorSet`) or encoded and decoded per batch
    (`benchmark.data.stream.EncodedSet`): `len()` images, `labels` (N,) int64 on CPU."""

    labels: Tensor

    def __len__(self) -> int: ...

    def train_batches(
        self, batch_size: int, norm: Normalizer, seed: int, device: torch.device,
        shard: Shard = NO_SHARD, policy: str = "none",
    ) -> TrainSource: ...  # fmt: skip

    def eval_batches(
        self, batch_size: int, norm: Normalizer, device: torch.device, shard: Shard = NO_SHARD
    ) -> Iterator[tuple[Tensor, Tensor]]: ...

    def shard_len(self, shard: Shard = NO_SHARD) -> int: ...


class TrainBatches:
    """Shuffled, augmented training batches on the device (last partial batch dropped, so every
    step has the same shape: BatchNorm never sees a batch of 1 and compiled graphs stay static).

    With `shard` = (rank, world), each global batch of `batch_size` images is drawn (order and
    crop/flip draws) exactly as without sharding, and this rank gets its contiguous r-th part of
    `batch_size // world` images; ConfigError when world does not divide batch_size. `policy`
    (`autoaugment.POLICIES`) follows the crop/flip, its draws from the same generator."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        norm: Normalizer,
        seed: int,
        device: torch.device,
        shard: Shard = NO_SHARD,
        policy: str = "none",
    ) -> None:
        check_shard(shard, batch_size)
        check_policy(policy)
        self.x, self.y = x.to(device), y.to(device)
        self.global_batch, self.norm, self.seed, self.device = batch_size, norm, seed, device
        self.part, self.policy = shard_slice(batch_size, shard), policy
        self.batch_size = self.part.stop - self.part.start

    def __len__(self) -> int:
        return self.x.shape[0] // self.global_batch

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm, g = epoch_order(self.seed, epoch, self.x.shape[0], self.device)
        perm = perm.to(self.device)
        b = self.global_batch
        for i in range(len(self)):
            idx = perm[i * b : (i + 1) * b][self.part]
            params = tuple(p[self.part] for p in crop_flip_params(b, g))
            x = augment_policy(apply_crop_flip(self.x[idx], params), g, b, self.part, self.policy)
            yield self.norm(x), self.y[idx]


class TensorSet:
    """A split decoded in memory: uint8 images `x` (N, 3, S, S) and labels `y` (N,) on CPU."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    @property
    def labels(self) -> Tensor:
        return self.y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def shard_len(self, shard: Shard = NO_SHARD) -> int:
        s = shard_slice(len(self), shard)
        return s.stop - s.start

    def train_batches(
        self, batch_size: int, norm: Normalizer, seed: int, device: torch.device,
        shard: Shard = NO_SHARD, policy: str = "none",
    ) -> TrainBatches:  # fmt: skip
        return TrainBatches(self.x, self.y, batch_size, norm, seed, device, shard, policy)

    def eval_batches(
        self, batch_size: int, norm: Normalizer, device: torch.device, shard: Shard = NO_SHARD
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The rank's contiguous part of the split, in order, `batch_size` images a batch."""
        check_shard(shard)
        part = shard_slice(len(self), shard)
        x, y = self.x[part], self.y[part]
        for i in range(0, x.shape[0], batch_size):
            yield norm(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
