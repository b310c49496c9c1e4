"""Batched, on-device data pipeline: uint8 tensors in, normalised channels_last floats out.

No PIL, no DataLoader workers, no per-sample Python: the dataset lives on the training device;
each epoch is a seeded permutation, and pad-4 random crop + horizontal flip are one gather.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Data order and augmentation depend only on (seed, epoch): same for every method, and a
    resumed run replays exactly the epochs it has not finished."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def crop_flip(x: Tensor, g: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with zero padding `pad` and random horizontal flip, as one indexed gather.

    Returns (B, C, H, W) uint8 with channels_last strides (the gather yields NHWC memory).
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev)
    flip = torch.rand((b, 1), generator=g, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy + ar_h
    cols = dx + torch.where(flip, ar_w.flip(0), ar_w)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


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


Shard = tuple[int, int]  # (rank, world size): this process's part of every batch or split


def shard_slice(n: int, shard: Shard) -> slice:
    """The rank-th contiguous 1/world part of n items (the first parts one shorter when world
    does not divide n)."""
    rank, world = shard
    return slice(n * rank // world, n * (rank + 1) // world)


class TrainBatches:
    """Shuffled, augmented training batches on the device (last partial batch dropped, so every
    step has the same shape: BatchNorm never sees a batch of 1 and compiled graphs stay static).

    `shard=(rank, world)`: this rank's contiguous 1/world part of each global batch of
    `batch_size` images (world must divide batch_size): order and augmentation are those of the
    global batch, so the ranks together see exactly what one process sees."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        norm: Normalizer,
        seed: int,
        device: torch.device,
        shard: Shard = (0, 1),
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.norm, self.seed, self.device = batch_size, norm, seed, device
        self.part = shard_slice(batch_size, shard)

    def __len__(self) -> int:
        return self.x.shape[0] // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images (b, 3, H, W) normalised float, labels (b,) int64) per step; b = batch_size
        / world with a shard."""
        g = epoch_generator(self.seed, epoch, self.device)
        perm = torch.randperm(self.x.shape[0], generator=g, device=self.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            xb = crop_flip(self.x[idx], g)[self.part]  # the global batch's draws, then the part
            yield self.norm(xb), self.y[idx][self.part]


def eval_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    norm: Normalizer,
    device: torch.device,
    shard: Shard = (0, 1),
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of `batch_size` over the split (x, y), or over its rank-th contiguous 1/world
    part with `shard=(rank, world)`."""
    part = shard_slice(x.shape[0], shard)
    x, y = x[part], y[part]
    for i in range(0, x.shape[0], batch_size):
        yield norm(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
