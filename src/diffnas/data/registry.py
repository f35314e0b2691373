"""Registry of datasets and the one entry point that applies subsets and resizing."""

from __future__ import annotations

from collections.abc import Callable

from diffnas.data.base import ImageData, resize, subset
from diffnas.registry import Registry

DatasetLoader = Callable[..., ImageData]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(name: str):
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str, root: str | None = None, download: bool = False, resolution: int | None = None,
    train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
) -> ImageData:
    """Load dataset ``name``, then take seeded subsets and resize as configured."""
    data = DATASETS.get(name)(root=root, download=download)
    trx, try_ = subset(data.train_x, data.train_y, train_subset, seed)
    tex, tey = subset(data.test_x, data.test_y, test_subset, seed + 1)
    return ImageData(data.name, resize(trx, resolution), try_, resize(tex, resolution), tey,
                     data.num_classes, data.black)
