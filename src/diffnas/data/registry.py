"""Registry of datasets and the one entry point that applies subsets and resizing; and the
registry of dataset file checks, run before a run directory is written."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable

from diffnas.data.base import ImageData, check_image_data, resize, subset
from diffnas.registry import Registry

log = logging.getLogger(__name__)

DatasetLoader = Callable[..., ImageData]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

#: ``check(root, download)``: raises :class:`~diffnas.data.base.DatasetNotFoundError` when
#: the files a dataset reads are not where ``root`` (or its default place) says
FilesCheck = Callable[[str | None, bool], None]
DATASET_FILES: Registry[FilesCheck] = Registry("dataset files check")


#: generator seed of ``data.test_subset`` (fixed: every run seed scores the same images)
TEST_SUBSET_SEED = 1


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register ``loader(root, download) -> ImageData`` as ``data.name``."""
    return DATASETS.register(name)


def register_files_check(name: str) -> Callable[[FilesCheck], FilesCheck]:
    """Register the files check of dataset ``name`` (image, text or graph): the function
    its loader locates its files with, so the check and the load cannot disagree."""
    return DATASET_FILES.register(name)


def check_dataset_files(name: str, root: str | None, download: bool = False) -> None:
    """Refuse a run whose dataset files are absent before its run directory exists (a
    resumable directory holding nothing but a config helped no one). Only presence is
    checked (cheap, no reading); damaged files are found by the loader. A dataset without
    a registered check (shipped data, a plugin's) passes."""
    if name in DATASET_FILES:
        DATASET_FILES.get(name)(root, download)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str, root: str | None = None, download: bool = False, resolution: int | None = None,
    train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
    test_seed: int | None = None,
) -> ImageData:
    """Load dataset ``name``, then take subsets (the training one seeded by ``seed``, the
    test one the same for every seed, unless ``test_seed`` says otherwise) and resize as
    configured. A loader
    with a ``resolution`` parameter receives it (data/custom.py: images of mixed sizes are
    resized as they are read, and only when it is set). The loader's ``ImageData`` subclass
    and its extra fields (e.g. class names) are kept."""
    loader = DATASETS.get(name)
    extra = {"resolution": resolution} if "resolution" in inspect.signature(loader).parameters \
        else {}
    data = loader(root=root, download=download, **extra)
    check_image_data(data)
    for which, n, have in (("train", train_subset, len(data.train_x)),
                           ("test", test_subset, len(data.test_x))):
        if n is not None and n > have:  # subset() takes all: said, not silent
            log.warning("%s: a %s subset of %d asked for, but the dataset has %d %s images: "
                        "all of them are used", name, which, n, have, which)
    trx, try_ = subset(data.train_x, data.train_y, train_subset, seed)
    # the test subset is the same whatever the seed, so that seeds (--seeds) are scored on
    # the same images (its generator seed, 1, is the one seed 0 always used)
    tex, tey = subset(data.test_x, data.test_y, test_subset,
                      TEST_SUBSET_SEED if test_seed is None else test_seed)
    if len(trx) < len(data.train_x) or len(tex) < len(data.test_x):  # the loader logged all
        log.info("%s: using %d of %d train / %d of %d test images (the subsets)", name,
                 len(trx), len(data.train_x), len(tex), len(data.test_x))
    return dataclasses.replace(data, train_x=resize(trx, resolution), train_y=try_,
                               test_x=resize(tex, resolution), test_y=tey)
