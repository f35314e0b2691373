"""Built-in image datasets, read from local files only (no download unless asked)."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffnas.data.base import DataFormatError, DatasetNotFoundError, ImageData, prepare
from diffnas.data.registry import register_dataset, register_files_check

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HELP = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist, files in "
    "/usr/share/datasets/fashion-mnist) or put the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) in a directory and set data.root to it."
)


# (channels, side, classes) of the built-in image sets, known without reading their files
BUILTIN_SHAPES = {"fashion_mnist": (1, 28, 10), "digits": (1, 8, 10), "cifar10": (3, 32, 10)}


def known_image_shape(name: str, root: str | None, resolution: int | None = None
                      ) -> tuple[int, int, int] | None:
    """``(channels, side, classes)`` of an image dataset without loading its images: a
    built-in set's, your own data's from its headers (``custom.peek_shape``); None for
    any other dataset (a plugin's, a graph or a text). ``side`` is ``resolution`` when
    set."""
    from diffnas.data.custom import peek_shape

    if (peeked := peek_shape(name, root, resolution)) is not None:
        return peeked
    if name in BUILTIN_SHAPES:
        c, side, k = BUILTIN_SHAPES[name]
        return c, resolution or side, k
    return None


IDX_FIX = "the file is damaged (cut short or not the original): download or copy it again"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, ndim in byte 3, big-endian dims, data.
    A file that cannot be decompressed or whose size does not match its header is a
    :class:`DataFormatError` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataFormatError(f"{path}: cannot be decompressed ({exc}); {IDX_FIX}") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim:
        raise DataFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header; "
                              f"{IDX_FIX}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataFormatError(f"{path}: not an unsigned-byte IDX file; {IDX_FIX}")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataFormatError(f"{path}: its header says {'x'.join(map(str, dims))} = "
                              f"{int(np.prod(dims))} values, the file holds {data.size}; "
                              f"{IDX_FIX}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


FASHION_MNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@register_files_check("fashion_mnist")
def fashion_mnist_files(root: str | None = None, download: bool = False) -> list[Path]:
    """The four IDX files (gzipped or not) in ``root``, or in the first of
    :data:`FASHION_MNIST_DIRS` holding all four when ``root`` is unset."""
    if download:
        raise ValueError("fashion_mnist is read from local IDX files; " + FASHION_MNIST_HELP)
    roots = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    for r in roots:
        paths = [_find_idx(r, s) for s in FASHION_MNIST_STEMS]
        if all(paths):
            return paths
    looked = ", ".join(str(r) for r in roots)
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files not found in: {looked}. {FASHION_MNIST_HELP}"
    )


@register_dataset("fashion_mnist")
def load_fashion_mnist(root: str | None = None, download: bool = False) -> ImageData:
    """Fashion-MNIST (60k/10k, 28x28, 10 classes) from the original IDX files."""
    paths = fashion_mnist_files(root, download)
    arrays = [torch.from_numpy(read_idx(p).copy()) for p in paths]
    for p, a, ndim in zip(paths, arrays, (3, 1, 3, 1), strict=True):
        if a.dim() != ndim:
            raise DataFormatError(f"{p}: {a.dim()}-D, expected {ndim}-D "
                                  f"({'images' if ndim == 3 else 'labels'}); {IDX_FIX}")
    trx, try_, tex, tey = arrays
    for i in (0, 2):  # images and labels of one split
        if len(arrays[i]) != len(arrays[i + 1]):
            raise DataFormatError(f"{paths[i]} holds {len(arrays[i])} images but "
                                  f"{paths[i + 1]} {len(arrays[i + 1])} labels; one "
                                  "of them is damaged: download or copy both again")
    for i in (1, 3):
        _check_labels(paths[i], arrays[i], "one of the files is damaged: download or "
                      "copy the four files again")
    if trx.shape[1:] != tex.shape[1:]:
        raise DataFormatError(f"{paths[0]} holds {tuple(trx.shape[1:])} images but "
                              f"{paths[2]} {tuple(tex.shape[1:])} ones; copy the four "
                              "files of one Fashion-MNIST again")
    return prepare("fashion_mnist", trx[:, None], try_, tex[:, None], tey, 10, 255.0,
                   FASHION_MNIST_CLASSES)


@register_dataset("digits")
def load_digits(root: str | None = None, download: bool = False) -> ImageData:
    """scikit-learn's digits (1797 images, 8x8, 10 classes), shipped inside the wheel;
    a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None]
    y = torch.from_numpy(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return prepare("digits", x[tr], y[tr], x[te], y[te], 10, 16.0, [str(i) for i in range(10)])


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR_HELP = (
    "Give data.root = a directory containing 'cifar-10-batches-py' (torchvision's on-disk "
    "format: data_batch_1..5 and test_batch), or set data.download=true to fetch it with "
    "torchvision where you have internet."
)


#: what unpickling a damaged file may raise (the pickle docs list more than UnpicklingError)
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                  KeyError, TypeError, ValueError, OverflowError)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, strings, numpy arrays and
    scalars) and refuses any other global: a plain ``pickle.load`` runs whatever code a
    crafted file names (npz files are read without pickle for the same reason)."""

    ALLOWED = {
        *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
          for n in ("_reconstruct", "scalar")),
        *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds "
                                     "only arrays, lists and strings")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` and labels of one CIFAR-10 python batch; a damaged file
    is a :class:`DataFormatError` naming it."""
    fix = ("the file is damaged (cut short or not the original): delete it and download "
           "(data.download=true) or copy the cifar-10-batches-py folder again")
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except _PICKLE_ERRORS as exc:
        raise DataFormatError(f"{path}: not a readable CIFAR-10 batch ({exc}); {fix}") from None
    if not isinstance(d, dict) or "data" not in d or "labels" not in d:
        raise DataFormatError(f"{path}: not a CIFAR-10 batch (no 'data' and 'labels'); {fix}")
    try:
        raw = np.asarray(d["data"])
        if raw.dtype != np.uint8 and (not np.issubdtype(raw.dtype, np.integer) or raw.size
                                      and (raw.min() < 0 or raw.max() > 255)):
            raise ValueError(f"pixels must be bytes 0..255, got dtype {raw.dtype}"
                             + (f" values {raw.min()}..{raw.max()}"
                                if raw.size and raw.dtype.kind in "iuf" else ""))
        x = raw.astype(np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d["labels"])
        if not np.issubdtype(labels.dtype, np.integer):  # (a cast would cut 2.7 to 2)
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        y = labels.astype(np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataFormatError(f"{path}: malformed CIFAR-10 batch ({exc}); {fix}") from None
    if len(x) != len(y):
        raise DataFormatError(f"{path}: {len(x)} images but {len(y)} labels; {fix}")
    _check_labels(path, y, fix)
    return x, y


def _check_labels(path: Path, y: np.ndarray | torch.Tensor, fix: str) -> None:
    """Labels of a 10-class dataset must be 0..9 (a damaged file otherwise fails late,
    inside the loss)."""
    if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataFormatError(f"{path}: labels {int(y.min())}..{int(y.max())}, expected "
                              f"0..9; {fix}")


def _cifar_files(root: str) -> list[Path]:
    """The five training batches and the test batch, in ``root/cifar-10-batches-py`` where
    that folder exists, else in ``root`` itself."""
    base = Path(root)
    inner = base / "cifar-10-batches-py"
    folder = inner if inner.is_dir() else base
    return [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]


@register_files_check("cifar10")
def cifar10_files(root: str | None, download: bool = False) -> list[Path]:
    """The six batch files; absent ones are an error unless ``download`` fetches them,
    which then needs torchvision."""
    if root is None:
        raise DatasetNotFoundError("CIFAR-10 needs data.root. " + CIFAR_HELP)
    files = _cifar_files(root)
    missing = [str(f) for f in files if not f.is_file()]
    if missing and not download:
        raise DatasetNotFoundError(f"CIFAR-10 files missing: {missing[:3]}... {CIFAR_HELP}")
    if missing and importlib.util.find_spec("torchvision") is None:
        raise DatasetNotFoundError(
            "data.download=true needs torchvision: pip install 'diffnas[vision]'")
    return files


@register_dataset("cifar10")
def load_cifar10(root: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-10 from a local directory in torchvision's format."""
    files = cifar10_files(root, download)

    def fetch() -> None:
        if all(f.is_file() for f in _cifar_files(root)):
            return
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)

    if download:  # under torchrun every rank calls this: one process writes at a time
        from diffnas.engine.distributed import fetch_in_turn

        fetch_in_turn(fetch)
        files = cifar10_files(root)  # the download wrote them all, or says what it missed
    parts = [_cifar_batch(f) for f in files]
    trx = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    try_ = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    tex, tey = (torch.from_numpy(a) for a in parts[5])
    return prepare("cifar10", trx, try_, tex, tey, 10, 255.0, CIFAR10_CLASSES)
