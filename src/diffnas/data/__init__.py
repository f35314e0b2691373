"""Datasets (read from local files), subsets, splits and deterministic loaders."""

from diffnas.data import custom, images  # noqa: F401  (registration)
from diffnas.data.base import DatasetNotFoundError, ImageData
from diffnas.data.loaders import Augment, BatchLoader, split_train_val
from diffnas.data.registry import DATASETS, list_datasets, load_dataset, register_dataset

__all__ = [
    "DATASETS", "Augment", "BatchLoader", "DatasetNotFoundError", "ImageData", "list_datasets",
    "load_dataset", "register_dataset", "split_train_val",
]
