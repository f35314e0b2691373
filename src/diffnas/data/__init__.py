"""Datasets (read from local files), subsets, splits and deterministic loaders."""

from diffnas.data import custom, graph, images, text  # noqa: F401  (registration)
from diffnas.data.base import DataFormatError, DatasetNotFoundError, ImageData
from diffnas.data.graph import GRAPH_DATASETS, register_graph_dataset
from diffnas.data.loaders import Augment, BatchLoader, split_train_val
from diffnas.data.registry import (
    DATASETS,
    check_dataset_files,
    list_datasets,
    load_dataset,
    register_dataset,
    register_files_check,
)
from diffnas.data.text import TEXT_DATASETS, register_text_dataset

__all__ = [
    "DATASETS", "GRAPH_DATASETS", "TEXT_DATASETS", "Augment", "BatchLoader", "DataFormatError",
    "DatasetNotFoundError", "ImageData", "check_dataset_files", "list_datasets",
    "load_dataset", "register_dataset", "register_files_check", "register_graph_dataset",
    "register_text_dataset", "split_train_val",
]
