"""Your own images, no Python needed: ``data.name=npz`` and ``data.name=folder``.

- ``npz``: ``data.root`` is ONE ``.npz`` file (``np.savez``) holding ``x_train``, ``y_train``,
  ``x_test``, ``y_test``, and optionally ``classes`` (names, index = label) and ``layout``
  (``"NHW"``, ``"NHWC"`` or ``"NCHW"``, for when the layout cannot be inferred).
- ``folder``: ``data.root`` is a directory in torchvision's ImageFolder layout, split in two:
  ``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (any depth below the class
  folder); class names sorted, label = index. Both halves are required.

Everything is checked when loaded and every problem raises an error naming the file and
what is wrong; nothing is guessed silently. docs/data.md is the user's guide.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffnas.data.base import DataFormatError, DatasetNotFoundError, ImageData, prepare
from diffnas.data.registry import register_dataset, register_files_check

log = logging.getLogger("diffnas")

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL = ("classes", "layout")
LAYOUTS = ("NHW", "NHWC", "NCHW")
#: channel counts that tell channels-first from channels-last when no layout is given
INFERRED_CHANNELS = (1, 3, 4)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
NPZ_HELP = ("data.name=npz reads one .npz file (np.savez) with arrays x_train, y_train, x_test, "
            "y_test; see docs/data.md")
FOLDER_HELP = ("data.name=folder reads root/train/<class>/<image> and root/test/<class>/<image> "
               "(PNG, JPEG, ...); see docs/data.md")


@dataclass
class CustomImageData(ImageData):
    """:class:`ImageData` plus where it came from."""

    source: str = ""


def _no_download(name: str, download: bool) -> None:
    if download:
        raise DataFormatError(f"data.name={name} reads your local files; data.download=true "
                              "applies only to cifar10")


def _to_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (stretch) float images ``(N, C, H, W)`` to ``side`` x ``side``."""
    if x.shape[-2:] == (side, side):
        return x
    smaller = side < x.shape[-2] and side < x.shape[-1]
    if smaller:
        return F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def _check_side(h: int, w: int, resolution: int | None, where: str) -> int:
    """The side of the square images the network gets: ``resolution``, or ``h`` when square."""
    if resolution is not None:
        if resolution < 1:
            raise DataFormatError(f"data.resolution must be >= 1, got {resolution}")
        return resolution
    if h != w:
        raise DataFormatError(f"{where}: images are {h}x{w} (height x width), not square; set "
                              "data.resolution=N to resize (stretch) them to N x N",
                              setting="data.resolution")
    return h


# --- npz -------------------------------------------------------------------------------
@register_files_check("npz")
def _npz_path(root: str | None, download: bool = False) -> Path:
    """The ``.npz`` file ``root`` names (an archive; its arrays are checked on loading)."""
    if root is None:
        raise DatasetNotFoundError(f"data.name=npz needs data.root=path/to/data.npz. {NPZ_HELP}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file. {NPZ_HELP}")
    if path.is_dir():
        raise DatasetNotFoundError(f"{path} is a directory; data.root must be the .npz file "
                                   f"itself. {NPZ_HELP}")
    if not zipfile.is_zipfile(path):
        raise DataFormatError(f"{path} is not a .npz archive (np.savez writes one; a .npy "
                              f"file holds a single array). {NPZ_HELP}")
    return path


def _npz_keys(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        names = [n[:-4] if n.endswith(".npy") else n for n in z.namelist()]
    missing = [k for k in NPZ_ARRAYS if k not in names]
    if missing:
        raise DataFormatError(f"{path}: missing array(s) {', '.join(missing)}; it holds "
                              f"{', '.join(sorted(names)) or 'nothing'}. {NPZ_HELP}")
    unknown = sorted(set(names) - set(NPZ_ARRAYS) - set(NPZ_OPTIONAL))
    if unknown:
        raise DataFormatError(
            f"{path}: unexpected array(s) {', '.join(unknown)}; the known ones are "
            f"{', '.join(NPZ_ARRAYS + NPZ_OPTIONAL)} (the search takes its validation images "
            "from x_train, see data.search_split)")
    return names


#: what reading a damaged npz (bad CRC, truncated or garbled member) raises
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


def _damaged(path: Path, key: str, exc: BaseException) -> DataFormatError:
    return DataFormatError(f"{path}: {key} is damaged or not a .npy array ({exc}); write the "
                           "file again (np.savez)")


def _npz_header_shape(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` from its .npy header, without reading the data."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, *DAMAGED) as exc:
        raise _damaged(path, key, exc) from None
    return tuple(shape), dtype


def _read_layout(path: Path, npz) -> str | None:
    if "layout" not in npz.files:
        return None
    value = npz["layout"]
    layout = str(value.item()) if value.ndim == 0 else None
    if layout not in LAYOUTS:
        raise DataFormatError(f"{path}: layout must be one of {', '.join(LAYOUTS)}, got "
                              f"{value!r}")
    return layout


def infer_layout(shape: tuple[int, ...], layout: str | None, where: str) -> str:
    """The layout of image array ``shape``: ``layout`` when given (checked against the
    shape), else ``NHW`` for 3 dimensions, and for 4 the one of ``NHWC`` / ``NCHW`` whose
    channel axis (dim 3 / dim 1) alone holds 1, 3 or 4; both or neither is an error."""
    if len(shape) not in (3, 4):
        raise DataFormatError(f"{where}: images must be N x H x W, N x H x W x C or N x C x H x "
                              f"W, got shape {shape}")
    if 0 in shape[1:]:
        raise DataFormatError(f"{where}: images of shape {shape} have a dimension of size 0")
    if layout is not None:
        if len(layout) != len(shape):
            raise DataFormatError(f"{where}: layout {layout} does not fit shape {shape}")
        return layout
    if len(shape) == 3:
        return "NHW"
    last, first = shape[3] in INFERRED_CHANNELS, shape[1] in INFERRED_CHANNELS
    guess = "NHWC" if last and not first else "NCHW" if first and not last else None
    if guess is not None:
        other = "NCHW" if guess == "NHWC" else "NHWC"
        (_, h, w), (_, h2, w2) = _chw(shape, guess), _chw(shape, other)
        if h == w or h2 != w2:
            return guess
        # e.g. 3x3 patches of 13 bands: the guess reads non-square images, the other
        # reading square ones; a resize would then silently stretch the wrong axes
        raise DataFormatError(
            f"{where}: shape {shape} reads as {guess} ({h}x{w} images, not square) or as "
            f"{other} ({h2}x{w2}); add layout='{other}' or layout='{guess}' to the npz "
            f"(np.savez(..., layout='{other}'))")
    why = "both dim 1 and dim 3 could be" if last else "neither dim 1 nor dim 3 is"
    raise DataFormatError(
        f"{where}: cannot tell channels-first from channels-last in shape {shape} ({why} a "
        f"channel count of {INFERRED_CHANNELS}); add layout='NHWC' or layout='NCHW' to the "
        "npz (np.savez(..., layout='NHWC'))")


def _chw(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    if layout == "NHW":
        return 1, shape[1], shape[2]
    if layout == "NHWC":
        return shape[3], shape[1], shape[2]
    return shape[1], shape[2], shape[3]


def _image_kind(dtype: np.dtype, n: int, where: str) -> str:
    """``uint8``, ``integer`` or ``float`` for images of ``dtype`` (``n`` of them); other
    dtypes (bool, complex, strings) and no images are errors naming ``where``. Checks what
    the array's header tells, so :func:`peek_shape` refuses what the load refuses."""
    if n == 0:
        raise DataFormatError(f"{where}: no images (0 in the array)")
    if dtype == np.uint8:
        return "uint8"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    if np.issubdtype(dtype, np.floating):
        return "float"
    raise DataFormatError(f"{where}: images must be integers (uint8 0-255) or floats, got "
                          f"dtype {dtype}")


def _images(x: np.ndarray, layout: str, where: str) -> tuple[torch.Tensor, float]:
    """``x`` as a ``(N, C, H, W)`` tensor and the scale dividing it (255 for uint8)."""
    if _image_kind(x.dtype, len(x), where) == "uint8":
        scale = 255.0
    else:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataFormatError(f"{where}: images contain NaN or infinite values")
        if x.size and np.abs(x).max() > np.finfo(np.float32).max:
            raise DataFormatError(f"{where}: image values up to {np.abs(x).max():.3g} are "
                                  "beyond float32 (3.4e38), which the network computes in; "
                                  "rescale them")
        x = x.astype(np.float32, copy=False)
        scale = 1.0
    t = torch.from_numpy(np.ascontiguousarray(x))
    if layout == "NHW":
        t = t[:, None]
    elif layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    return t.contiguous(), scale


def _labels(y: np.ndarray, n_images: int, where: str) -> np.ndarray:
    if y.ndim != 1:
        hint = " (one-hot? use y.argmax(1))" if y.ndim == 2 and y.shape[1] > 1 else \
            " (use y.ravel())" if y.ndim == 2 else ""
        raise DataFormatError(f"{where}: labels must be a 1-D array of class indices, got "
                              f"shape {y.shape}{hint}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataFormatError(f"{where}: labels must be integers 0..K-1, got dtype {y.dtype} "
                              "(convert with y.astype(np.int64), or map names to indices)")
    if len(y) != n_images:
        raise DataFormatError(f"{where}: {len(y)} labels for {n_images} images")
    if len(y) and y.dtype.kind == "u" and int(y.max()) > np.iinfo(np.int64).max:
        raise DataFormatError(f"{where}: label {int(y.max())} is beyond int64; labels must "
                              "be 0..K-1")
    if len(y) and y.min() < 0:
        raise DataFormatError(f"{where}: label {int(y.min())} is negative; labels must be 0..K-1")
    return y.astype(np.int64, copy=False)


def _num_classes(path: Path, y_train: np.ndarray, y_test: np.ndarray,
                 classes: np.ndarray | None) -> int:
    """K from ``classes`` when given, else ``max(y_train) + 1``; every label of both sets
    must be below K and every class must have training images."""
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise DataFormatError(f"{path}: classes must be a 1-D array of names, got shape "
                                  f"{classes.shape} dtype {classes.dtype}")
        if len(set(classes.tolist())) != len(classes):
            raise DataFormatError(f"{path}: classes has repeated names")
        k = len(classes)
    else:
        k = int(y_train.max()) + 1
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and int(y.max()) >= k:
            bound = f"classes has {k} names" if classes is not None else \
                f"y_train's labels are 0..{k - 1}"
            raise DataFormatError(f"{path}: {key} has label {int(y.max())} but {bound}")
    present = np.unique(y_train)
    # the first missing labels without building range(k): ID-like labels (1e9) made that
    # set gigabytes; among the first len(present) + 10 integers at least 10 are missing
    absent = np.setdiff1d(np.arange(min(k, len(present) + 10)), present).tolist()
    if absent:
        raise DataFormatError(
            f"{path}: class(es) {absent[:10]} have no training images; labels must be 0..K-1 "
            f"with every class present in y_train (labels found: {int(y_train.min())}.."
            f"{int(y_train.max())})")
    if k < 2:
        raise DataFormatError(f"{path}: y_train has a single class; classification needs two")
    return k


def _npz_read(path: Path, keys: tuple[str, ...]
              ) -> tuple[dict[str, np.ndarray], np.ndarray | None, str | None]:
    """Arrays ``keys``, the optional ``classes`` and the layout of the npz at ``path``."""
    with np.load(path, allow_pickle=False) as npz:
        wanted = [*keys, *(k for k in ("classes",) if k in npz.files)]
        read = {}
        for k in wanted:
            try:
                read[k] = npz[k]
            except DAMAGED as exc:
                raise _damaged(path, k, exc) from None
            except ValueError as exc:  # an object array would need pickle: refused, as untrusted
                fix = (" (np.array(names, dtype=str) stores names as strings)"
                       if k == "classes" else " (store it as numbers, e.g. "
                       "np.asarray(x, dtype=np.uint8) or y.astype(np.int64))")
                raise DataFormatError(f"{path}: {k} is an array of Python objects (numpy "
                                      f"says: {exc}), which diffnas does not unpickle; save "
                                      f"it with a plain dtype{fix}") from None
            if not isinstance(read[k], np.ndarray):  # a member that is not a .npy comes as bytes
                raise _damaged(path, k, TypeError("not a .npy member"))
        arrays = {k: read[k] for k in keys}
        return arrays, read.get("classes"), _read_layout(path, npz)


def _same_kind(path: Path, train: tuple[np.dtype, int], test: tuple[np.dtype, int]) -> str:
    """The image kind (:func:`_image_kind`) shared by x_train and x_test, given as
    ``(dtype, count)``; different kinds (uint8 against another dtype, integers against
    floats) are refused. Shared by the load and :func:`peek_shape`."""
    kinds = [_image_kind(dtype, n, f"{path}: x_{s}")
             for s, (dtype, n) in (("train", train), ("test", test))]
    if kinds[0] != kinds[1]:
        raise DataFormatError(f"{path}: x_train is {train[0]} but x_test is {test[0]}; "
                              "store both on the same scale (and dtype kind)")
    return kinds[0]


def _same_scale(path: Path, train: np.ndarray, test: np.ndarray) -> None:
    """Refuse train and test images stored on different scales (:func:`_same_kind`, or
    largest values more than 10x apart, as 0-255 against 0-1): the test images would be
    normalised by the wrong statistics."""
    if _same_kind(path, (train.dtype, len(train)), (test.dtype, len(test))) != "uint8":
        peaks = [float(np.abs(a.astype(np.float64)).max()) for a in (train, test)]
        if min(peaks) > 0 and max(peaks) > 10 * min(peaks) or (min(peaks) == 0) != (
                max(peaks) == 0):
            raise DataFormatError(
                f"{path}: x_train's values reach {peaks[0]:.4g} but x_test's reach "
                f"{peaks[1]:.4g}; store both on the same scale (both 0-255 or both 0-1)")


@register_dataset("npz")
def load_npz(root: str | None = None, download: bool = False,
             resolution: int | None = None) -> CustomImageData:
    """Images and labels from one ``.npz`` file (module docstring); normalised per channel
    with the training set's mean and std."""
    _no_download("npz", download)
    path = _npz_path(root)
    _npz_keys(path)
    arrays, classes, layout = _npz_read(path, NPZ_ARRAYS)
    xs = {}
    for split in ("train", "test"):
        where = f"{path}: x_{split}"
        x = arrays[f"x_{split}"]
        xs[split] = _images(x, infer_layout(x.shape, layout, where), where)
    (trx, scale), (tex, _) = xs["train"], xs["test"]
    if trx.shape[1:] != tex.shape[1:]:
        raise DataFormatError(f"{path}: x_train images are {tuple(trx.shape[1:])} (C, H, W) but "
                              f"x_test images are {tuple(tex.shape[1:])}")
    _same_scale(path, arrays["x_train"], arrays["x_test"])
    side = _check_side(trx.shape[2], trx.shape[3], resolution, f"{path}: x_train")
    y_train = _labels(arrays["y_train"], len(trx), f"{path}: y_train")
    y_test = _labels(arrays["y_test"], len(tex), f"{path}: y_test")
    k = _num_classes(path, y_train, y_test, classes)
    if trx.shape[2] != trx.shape[3]:  # load_dataset's resize keeps the aspect of non-squares
        trx, tex = _to_square(trx.float(), side), _to_square(tex.float(), side)
    names = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()) \
        if classes is not None else tuple(str(i) for i in range(k))
    data = prepare("npz", trx, torch.from_numpy(y_train), tex, torch.from_numpy(y_test), k, scale,
                   names)
    _log_loaded("npz", path, data, names, side)
    return CustomImageData(**vars(data), source=str(path))


def _log_loaded(name: str, source: Path, data: ImageData, classes: tuple[str, ...],
                side: int | None = None) -> None:
    """One log line about what was read; ``side``: the side the images are resized to
    after this (``data.resolution``), said where it differs from the stored one."""
    c, h, w = data.train_x.shape[1:]
    named = classes != tuple(str(i) for i in range(len(classes)))
    resized = f" (resized to {c}x{side}x{side}: data.resolution)" if side not in (None, h) else ""
    log.info("data.name=%s %s: %d train / %d test images, %dx%dx%d%s, %d classes%s", name,
             source, len(data.train_x), len(data.test_x), c, h, w, resized, len(classes),
             " (label=name): " + ", ".join(f"{i}={n}" for i, n in enumerate(classes)) if named
             else f", labels 0..{len(classes) - 1} (no class names stored)")


# --- folder ----------------------------------------------------------------------------
def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # Pillow is a core dependency (matplotlib needs it too)
        raise ImportError("data.name=folder reads images with Pillow: pip install pillow") \
            from exc
    return Image, UnidentifiedImageError


#: PIL mode -> the mode images are converted to (its channel count follows)
_MODES = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "CMYK": "RGB",
          "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "RGBA": "RGBA", "RGBa": "RGBA",
          "PA": "RGBA", "RGBX": "RGB"}
_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _target_mode(im, path: Path) -> str:
    if im.mode == "P":
        return "RGBA" if "transparency" in im.info else "RGB"
    if im.mode not in _MODES:
        raise DataFormatError(f"{path}: PIL mode {im.mode!r} (16-bit or float pixels?) is not "
                              "supported; save the images as 8-bit grayscale, RGB or RGBA")
    return _MODES[im.mode]


def _visible(p: Path, base: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(base).parts)


def _class_dirs(split: Path) -> list[Path]:
    entries = sorted(p for p in split.iterdir() if _visible(p, split))
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DataFormatError(f"{stray[0]}: files directly in {split} have no class; put each "
                              f"image in {split}/<class name>/. {FOLDER_HELP}")
    return [p for p in entries if p.is_dir()]


def _class_files(folder: Path) -> list[Path]:
    """The image files of a class folder, its subfolders included: also those reached
    through a symbolic link (``Path.rglob`` skipped them, so a linked subfolder's images
    were silently left out), each real folder once (a link loop ends)."""
    files, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(top) / n for n in names if not n.startswith(".")]
    files = sorted(p for p in files if p.is_file())
    for p in files:
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataFormatError(f"{p}: not an image file (extensions read: "
                                  f"{' '.join(IMAGE_EXTENSIONS)}); move it out of {folder.parent}")
    if not files:
        raise DataFormatError(f"{folder}: empty class folder (no image files); remove it or "
                              "add images")
    return files


@register_files_check("folder")
def _folder_splits(root: str | None, download: bool = False
                   ) -> tuple[Path, list[str], dict[str, list[Path]]]:
    """The root, the sorted class names and per split the class folders, checked (folders
    only: the images are listed and read on loading)."""
    if root is None:
        raise DatasetNotFoundError(f"data.name=folder needs data.root=DIR. {FOLDER_HELP}")
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is not a directory" if base.exists() else "does not exist"
        raise DatasetNotFoundError(f"{base} {what}. {FOLDER_HELP}")
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise DatasetNotFoundError(
                f"{base / split} does not exist; {FOLDER_HELP} (hold some images of each class "
                "out of training in test/: it only scores the retrained network)")
    dirs = {split: _class_dirs(base / split) for split in ("train", "test")}
    classes = [d.name for d in dirs["train"]]
    if len(classes) < 2:
        raise DataFormatError(f"{base / 'train'}: {len(classes)} class folder(s) "
                              f"{classes}; classification needs at least two. {FOLDER_HELP}")
    unknown = [d.name for d in dirs["test"] if d.name not in classes]
    if unknown:
        raise DataFormatError(f"{base / 'test'}: class folder(s) {unknown} have no training "
                              f"folder in {base / 'train'} (classes: {classes})")
    return base, classes, dirs


def _read_folder_images(files: list[tuple[Path, int]], resolution: int | None,
                        ref: dict) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` from image files; ``ref`` (the first image's path, mode and size,
    filled by the first call) is what every other image must match."""
    Image, Unidentified = _pil()
    out = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                mode = _target_mode(im, path)
                if not ref:
                    ref.update(path=path, mode=mode, size=im.size)
                    _check_side(im.size[1], im.size[0], resolution, str(path))
                if _CHANNELS[mode] != _CHANNELS[ref["mode"]]:
                    raise DataFormatError(
                        f"{path}: {_CHANNELS[mode]} channel(s) ({im.mode}) but {ref['path']} "
                        f"has {_CHANNELS[ref['mode']]} ({ref['mode']}); convert all images to "
                        "one mode (all grayscale or all RGB)")
                if resolution is None and im.size != ref["size"]:
                    raise DataFormatError(
                        f"{path}: {im.size[0]}x{im.size[1]} pixels but {ref['path']} is "
                        f"{ref['size'][0]}x{ref['size'][1]}; set data.resolution=N to resize "
                        "every image to N x N", setting="data.resolution")
                im = im.convert(mode)
                if resolution is not None and im.size != (resolution, resolution):
                    im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (Unidentified, OSError) as exc:
            raise DataFormatError(f"{path}: cannot read the image ({exc})") from None
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


@register_dataset("folder")
def load_folder(root: str | None = None, download: bool = False,
                resolution: int | None = None) -> CustomImageData:
    """Images from ``root/train/<class>/`` and ``root/test/<class>/`` (module docstring);
    classes sorted by name, normalised with the training set's mean and std."""
    _no_download("folder", download)
    base, classes, dirs = _folder_splits(root)
    ref: dict = {}
    tensors = []
    for split in ("train", "test"):
        files = [(f, classes.index(d.name)) for d in dirs[split] for f in _class_files(d)]
        if not files:
            raise DataFormatError(f"{base / split}: no class folders")
        x = torch.from_numpy(_read_folder_images(files, resolution, ref)).permute(0, 3, 1, 2)
        tensors += [x.contiguous(), torch.tensor([label for _, label in files])]
    trx, try_, tex, tey = tensors
    data = prepare("folder", trx, try_, tex, tey, len(classes), 255.0, classes)
    _log_loaded("folder", base, data, tuple(classes))
    return CustomImageData(**vars(data), source=str(base))


# --- shapes without loading --------------------------------------------------------------
def peek_count(name: str, root: str | None) -> int | None:
    """The training images of an ``npz`` (its header) or ``folder`` dataset (its class
    folders listed, each checked: none empty, no stray files, in test/ too), without
    reading them; None for other datasets."""
    if name == "npz":
        shape, _ = _npz_header_shape(_npz_path(root), "x_train")
        return shape[0] if shape else 0
    if name == "folder":
        _, _, dirs = _folder_splits(root)
        for folder in dirs["test"]:
            _class_files(folder)
        return sum(len(_class_files(folder)) for folder in dirs["train"])
    return None


def peek_shape(name: str, root: str | None, resolution: int | None = None
               ) -> tuple[int, int, int] | None:
    """``(channels, side, classes)`` of an ``npz`` or ``folder`` dataset from the npz headers
    and labels / the class folders and one image, without loading the images; None for
    other datasets. ``side`` is ``resolution`` when set."""
    if name == "npz":
        path = _npz_path(root)
        _npz_keys(path)
        labels, classes, layout = _npz_read(path, ("y_train", "y_test"))
        y_train, y_test = labels["y_train"], labels["y_test"]
        shape, dtype = _npz_header_shape(path, "x_train")
        test_shape, test_dtype = _npz_header_shape(path, "x_test")
        _same_kind(path, (dtype, shape[0] if shape else 0),
                   (test_dtype, test_shape[0] if test_shape else 0))
        c, h, w = _chw(shape, infer_layout(shape, layout, f"{path}: x_train"))
        test_chw = _chw(test_shape, infer_layout(test_shape, layout, f"{path}: x_test"))
        if test_chw != (c, h, w):
            raise DataFormatError(f"{path}: x_train images are {(c, h, w)} (C, H, W) but "
                                  f"x_test images are {test_chw}")
        y_train = _labels(y_train, shape[0], f"{path}: y_train")
        y_test = _labels(y_test, test_shape[0], f"{path}: y_test")
        k = _num_classes(path, y_train, y_test, classes)
        return c, _check_side(h, w, resolution, f"{path}: x_train"), k
    if name == "folder":
        base, classes, dirs = _folder_splits(root)
        first = _class_files(dirs["train"][0])[0]
        Image, _ = _pil()
        with Image.open(first) as im:
            c = _CHANNELS[_target_mode(im, first)]
            side = _check_side(im.size[1], im.size[0], resolution, str(first))
        return c, side, len(classes)
    return None
