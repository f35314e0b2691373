"""Deterministic batch iteration over in-memory tensors, and batch-level augmentation.

The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at an epoch
boundary sees exactly the batches an uninterrupted run would. ``rank``/``world_size``
shard each batch for data-parallel runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augment:
    """Random crop, horizontal flip and cutout, applied per batch to normalised images.
    The crop pads with ``fill`` per channel (``ImageData.black``: black, as the reference
    pipeline pads before normalising; None: 0, the mean pixel); cutout zeroes after
    normalisation, as the reference does."""

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    fill: tuple[float, ...] | None = None

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            if self.fill is not None:
                border = torch.ones(1, 1, h + 2 * p, w + 2 * p, dtype=torch.bool)
                border[..., p:p + h, p:p + w] = False
                fill = torch.tensor(self.fill, dtype=x.dtype).view(1, -1, 1, 1)
                padded = torch.where(border, fill, padded)
            dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
            rows = (
                (dy[:, None] + torch.arange(h)[None])
                .view(n, 1, h, 1)
                .expand(n, x.shape[1], h, w + 2 * p)
            )
            x = padded.gather(2, rows)
            cols = (
                (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
            )
            x = x.gather(3, cols)
        if self.flip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        if self.cutout:
            # a cutout x cutout square centred on a random pixel, clipped at the borders
            cy = torch.randint(0, h, (n, 1, 1), generator=g) - self.cutout // 2
            cx = torch.randint(0, w, (n, 1, 1), generator=g) - self.cutout // 2
            ys = torch.arange(h).view(1, h, 1)
            xs = torch.arange(w).view(1, 1, w)
            inside = (ys >= cy) & (ys < cy + self.cutout) & (xs >= cx) & (xs < cx + self.cutout)
            x = x * (~inside).unsqueeze(1).to(x.dtype)
        return x


class BatchLoader:
    """Shuffled (or ordered) mini-batches of ``(x, y)`` tensors, seeded per epoch."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: Augment | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide by world_size {world_size}")
        if world_size > 1 and not drop_last:
            raise ValueError("a loader sharded over ranks needs drop_last=True: a last, "
                             "partial batch would give the ranks unequal (or empty) slices")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.augment = augment
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.x)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        per_rank = self.batch_size // self.world_size
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment is not None and self.augment.active:
                xb = self.augment(xb, g)
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def split_train_val(
    x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Split the training set into search-train (``fraction``) and search-validation."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"search_split must be in (0, 1), got {fraction}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 7))
    k = int(round(fraction * len(x)))
    a, b = perm[:k], perm[k:]
    return (x[a], y[a]), (x[b], y[b])
