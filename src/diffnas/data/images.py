"""Built-in image datasets, read from local files only (no download unless asked)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from diffnas.data.base import DatasetNotFoundError, ImageData, prepare
from diffnas.data.registry import register_dataset

FASHION_MNIST_DIRS = ["/usr/share/datasets/fashion-mnist"]
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_HELP = (
    "Install Debian's package (sudo apt-get install dataset-fashion-mnist, files in "
    "/usr/share/datasets/fashion-mnist) or put the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) in a directory and set data.root to it."
)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, ndim in byte 3, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


@register_dataset("fashion_mnist")
def load_fashion_mnist(root: str | None = None, download: bool = False) -> ImageData:
    """Fashion-MNIST (60k/10k, 28x28, 10 classes) from the original IDX files."""
    if download:
        raise ValueError("fashion_mnist is read from local IDX files; " + FASHION_MNIST_HELP)
    roots = [Path(root)] if root else [Path(d) for d in FASHION_MNIST_DIRS]
    stems = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for r in roots:
        paths = [_find_idx(r, s) for s in stems]
        if all(paths):
            arrays = [torch.from_numpy(read_idx(p).copy()) for p in paths]
            trx, try_, tex, tey = arrays
            return prepare("fashion_mnist", trx[:, None], try_, tex[:, None], tey, 10, 255.0,
                           FASHION_MNIST_CLASSES)
    looked = ", ".join(str(r) for r in roots)
    raise DatasetNotFoundError(
        f"Fashion-MNIST IDX files not found in: {looked}. {FASHION_MNIST_HELP}"
    )


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


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d["labels"], dtype=np.int64)


@register_dataset("cifar10")
def load_cifar10(root: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-10 from a local directory in torchvision's format."""
    if root is None:
        raise DatasetNotFoundError("CIFAR-10 needs data.root. " + CIFAR_HELP)
    base = Path(root)
    folder = base / "cifar-10-batches-py" if (base / "cifar-10-batches-py").is_dir() else base
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    if not all(f.is_file() for f in files):
        if download:
            try:
                import torchvision
            except ImportError as exc:
                raise DatasetNotFoundError(
                    "data.download=true needs torchvision: pip install 'diffnas[vision]'"
                ) from exc
            torchvision.datasets.CIFAR10(str(base), train=True, download=True)
            folder = base / "cifar-10-batches-py"
            files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
        else:
            missing = [str(f) for f in files if not f.is_file()]
            raise DatasetNotFoundError(f"CIFAR-10 files missing: {missing[:3]}... {CIFAR_HELP}")
    parts = [_cifar_batch(f) for f in files]
    trx = torch.from_numpy(np.concatenate([p[0] for p in parts[:5]]))
    try_ = torch.from_numpy(np.concatenate([p[1] for p in parts[:5]]))
    tex, tey = (torch.from_numpy(a) for a in parts[5])
    return prepare("cifar10", trx, try_, tex, tey, 10, 255.0, CIFAR10_CLASSES)
