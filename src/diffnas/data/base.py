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
    #: what the random crop pads with per channel, normalised: the darkest training pixel,
    #: i.e. black (0) for images stored as 0-255 or 0-1, as torchvision's RandomCrop pads
    #: before normalisation, and the same for data stored with an offset; None: 0
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
    channel, is divided by its range (by its largest magnitude, or 1, where it is
    constant) instead of its std: dividing by a std near 0 turned any test pixel that
    differs, and the crop's padding, into values near +-1e6. "Almost constant" compares
    the std with the range, not with the values' size, so data stored with an offset
    (temperatures in kelvin, raw sensor counts) is treated like the same data without.

    The crop pads with the smallest training value per channel: black for images stored
    as 0-255 or 0-1 (what the reference pads with), and for data stored with an offset the
    same darkest value, where a 0 border would lie tens of standard deviations away from
    every real pixel and swamp the image."""
    tx = train_x.float() / scale
    ex = test_x.float() / scale
    dims = (0, 2, 3)
    mean = tx.mean(dim=dims, keepdim=True)
    std = tx.std(dim=dims, keepdim=True)
    lo, hi = tx.amin(dim=dims, keepdim=True), tx.amax(dim=dims, keepdim=True)
    spread = hi - lo
    flat = (std <= 1e-3 * spread) | (std == 0)
    if flat.any():
        channels = flat.flatten().nonzero().flatten().tolist()
        log.warning("%s: channel(s) %s barely vary over the training images (std %s); "
                    "they are scaled by their range instead of their std",
                    name, channels, [float(std.flatten()[c]) * scale for c in channels])
        peak = tx.abs().amax(dim=dims, keepdim=True)
        constant = torch.where(peak > 0, peak, torch.ones_like(peak))
        std = torch.where(flat, torch.where(spread > 0, spread, constant), std)
    offset = (lo != 0).flatten().nonzero().flatten().tolist()
    if offset:
        log.info("%s: the darkest training pixel of channel(s) %s is not 0; the random crop "
                 "pads them with that value (%s), not with 0", name, offset,
                 [float(lo.flatten()[c]) * scale for c in offset])
    black = tuple(((lo - mean) / std).flatten().tolist())
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
