"""Image datasets held in memory as tensors, and the errors for missing or damaged data."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when dataset files are absent; the message says where we looked and how
    to get them."""


class DataFormatError(ValueError):
    """The user's data exists but is not in the form the loader needs (the message names
    the file and what to do). ``setting``: the config setting that would also fix it
    (``data.resolution``), which a resumed run cannot change: the command says so."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


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
    channel (:func:`barely_varying`), is divided by its largest magnitude (1 where it is all
    zero) instead of its std: dividing by a std near 0 turned any test pixel that differs,
    and the crop's padding, into values near +-1e6. Data stored with an offset
    (temperatures in kelvin, raw sensor counts) is not "almost constant": its values are
    large, but so is their spread, and it is normalised like the same data without.

    The crop pads with the smallest training value per channel: black for images stored
    as 0-255 or 0-1 (what the reference pads with), and for data stored with an offset the
    same darkest value, where a 0 border would lie tens of standard deviations away from
    every real pixel and swamp the image."""
    for which, y in (("train", train_y), ("test", test_y)):
        if y.is_floating_point() and not torch.equal(y, y.round()):  # .long() would cut them
            raise DataFormatError(f"dataset {name!r}: {which} labels must be class indices "
                                  f"0..K-1, got fractional values such as "
                                  f"{float(y[y != y.round()][0])}")
    tx = train_x.float() / scale
    ex = test_x.float() / scale
    dims = (0, 2, 3)
    mean = tx.mean(dim=dims, keepdim=True)
    std = tx.std(dim=dims, keepdim=True)
    lo, hi = tx.amin(dim=dims, keepdim=True), tx.amax(dim=dims, keepdim=True)
    flat = barely_varying(tx, std.flatten(), (hi - lo).flatten()).view_as(std)
    if flat.any():
        channels = flat.flatten().nonzero().flatten().tolist()
        log.warning("%s: channel(s) %s barely vary over the training images (std %s); "
                    "they are scaled by their largest value instead of their std",
                    name, channels, [float(std.flatten()[c]) * scale for c in channels])
        peak = tx.abs().amax(dim=dims, keepdim=True)
        std = torch.where(flat, torch.where(peak > 0, peak, torch.ones_like(peak)), std)
    offset = (lo != 0).flatten().nonzero().flatten().tolist()
    if offset:
        log.info("%s: the darkest training pixel of channel(s) %s is not 0; the random crop "
                 "pads them with that value (%s), not with 0", name, offset,
                 [float(lo.flatten()[c]) * scale for c in offset])
    black = tuple(((lo - mean) / std).flatten().tolist())
    return ImageData(name, (tx - mean) / std, train_y.long(), (ex - mean) / std, test_y.long(),
                     num_classes, black, mean=tuple((mean * scale).flatten().tolist()),
                     std=tuple((std * scale).flatten().tolist()), classes=tuple(classes))


def check_image_data(data: ImageData) -> None:
    """Refuse what a loader returned (a plugin's, too) that training would stumble on
    later with a bare torch error: images not ``(N, C, H, W)``, a label count other than
    the image count, labels that are not integers in ``0..num_classes-1``, fewer than two
    classes. The message names the dataset and what to fix."""
    where = f"dataset {data.name!r}"
    if data.num_classes < 2:
        raise DataFormatError(f"{where}: num_classes is {data.num_classes}; classification "
                              "needs at least two")
    for which in ("train", "test"):
        x, y = getattr(data, f"{which}_x"), getattr(data, f"{which}_y")
        if x.ndim != 4:
            raise DataFormatError(f"{where}: {which}_x must be images (N, C, H, W), got "
                                  f"shape {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataFormatError(f"{where}: {which}_y must hold one label per image: "
                                  f"shape {tuple(y.shape)} for {len(x)} images")
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise DataFormatError(f"{where}: {which}_y must be integer class indices, got "
                                  f"dtype {y.dtype}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataFormatError(f"{where}: {which} label {bad} is outside 0.."
                                  f"{data.num_classes - 1} (num_classes={data.num_classes})")


#: a channel is "almost constant" when at least this share of its training pixels hold one
#: value (an alpha channel opaque but for a few anti-aliased pixels)
CONSTANT_SHARE = 0.999


def barely_varying(x: torch.Tensor, std: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Per channel of ``x`` ``(N, C, H, W)``: whether it is constant or nearly so, i.e.
    :data:`CONSTANT_SHARE` of its pixels hold its most common value. That share bounds the
    std by ``sqrt(1 - share)`` times the spread, so only channels under that bound are
    counted (none in ordinary images). Independent of offset and scale, unlike comparing
    the std with the values' size (offset data looked flat) or with their spread (one
    level of anti-aliasing looked like a full-range channel)."""
    flat = std == 0
    bound = math.sqrt(1 - CONSTANT_SHARE) * spread
    for c in ((std <= bound) & ~flat).nonzero().flatten().tolist():
        values = x[:, c].flatten()
        flat[c] = (values == values.mode().values).sum() >= CONSTANT_SHARE * values.numel()
    return flat


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
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
