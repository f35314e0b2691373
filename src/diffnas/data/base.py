"""Image datasets held in memory as tensors, and the error for missing data."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when dataset files are absent; the message says where we looked and how
    to get them."""


@dataclass
class ImageData:
    """Normalised float images ``(N, C, H, W)`` and integer labels for train and test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    #: the normalised value of a black pixel per channel (``-mean / std``): what the random
    #: crop pads with, as torchvision's RandomCrop does before normalisation; None: 0
    black: tuple[float, ...] | None = None
    #: per-channel mean and std in the units the pixels were read in (e.g. 0..255): a
    #: deployed model's input is ``(pixels - mean) / std``; None where a loader did not say
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: class names, ``classes[label]``; empty where the source has none
    classes: tuple[str, ...] = ()

    def describe(self) -> dict:
        """What a user of the trained model needs about its input and output: shape, the
        normalisation to apply to raw pixels, and the class names."""
        return {"name": self.name, "input": [self.in_channels, self.resolution,
                                             self.resolution],
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None,
                "num_classes": self.num_classes, "classes": list(self.classes)}

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def resolution(self) -> int:
        return self.train_x.shape[-1]


def prepare(
    name: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
    test_y: torch.Tensor, num_classes: int, scale: float, classes: Sequence[str] = (),
) -> ImageData:
    """uint8/float arrays -> normalised float tensors (per-channel train mean/std).

    A channel (almost) constant over the training images, such as an opaque alpha
    channel, is divided by its largest magnitude (1 where it is all zero) instead of
    its std: dividing by a std near 0 turned any test pixel that differs, and the
    crop's padding, into values near +-1e6."""
    tx = train_x.float() / scale
    ex = test_x.float() / scale
    mean = tx.mean(dim=(0, 2, 3), keepdim=True)
    std = tx.std(dim=(0, 2, 3), keepdim=True)
    peak = tx.abs().amax(dim=(0, 2, 3), keepdim=True)
    flat = (std <= 1e-3 * peak) | (std == 0)
    if flat.any():
        channels = flat.flatten().nonzero().flatten().tolist()
        log.warning("%s: channel(s) %s barely vary over the training images (std %s); "
                    "they are scaled by their largest value instead of their std",
                    name, channels, [float(std.flatten()[c]) * scale for c in channels])
        std = torch.where(flat, torch.where(peak > 0, peak, torch.ones_like(peak)), std)
    black = tuple((-mean / std).flatten().tolist())
    return ImageData(name, (tx - mean) / std, train_y.long(), (ex - mean) / std, test_y.long(),
                     num_classes, black, mean=tuple((mean * scale).flatten().tolist()),
                     std=tuple((std * scale).flatten().tolist()), classes=tuple(classes))


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int):
    """A seeded random subset of ``n`` samples (all when ``n`` is None or too large)."""
    if n is None or n >= len(x):
        return x, y
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def resize(x: torch.Tensor, side: int | None) -> torch.Tensor:
    """Resize images to ``side`` x ``side`` (area interpolation when shrinking)."""
    if side is None or side == x.shape[-1]:
        return x
    mode = "area" if side < x.shape[-1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=(side, side), mode=mode, **kwargs)
