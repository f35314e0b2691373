"""The image engine: image-classification spaces (darts_cnn, nb201 and image plugin
spaces), searched by engine/search.py and retrained by engine/retrain.py, data parallel
under torchrun. Registered as ``image`` (engine/engines.py), the engine of every space
that declares no other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffnas.config import ConfigError, RunConfig
from diffnas.engine import distributed as dp
from diffnas.engine import retrain, search
from diffnas.engine.callbacks import counted
from diffnas.engine.engines import Engine, register_engine
from diffnas.genotype import Genotype
from diffnas.spaces import DataShape


def print_image_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    """The genotype and, after a retrain, its parameters, MACs and test accuracy."""
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"params (no auxiliary head): {result['params']:,}")
        print(f"MACs: {result['macs'] / 1e6:.2f} M")
        print(f"test accuracy: {100 * result['test_acc']:.2f}% after "
              f"{counted(result['epochs_done'], 'epoch')}")


# The search and retraining are looked up in their modules when called (not bound here),
# so that what replaces them there (a test's stand-in) is what runs.
def run_image_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False
                     ) -> search.SearchResult:
    """The image search alone (engine/search.run_search)."""
    return search.run_search(cfg, run_dir, resume=resume)


def run_image_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                      resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """The image retraining alone (engine/retrain.run_retrain)."""
    return retrain.run_retrain(cfg, genotype, run_dir, resume=resume, **kwargs)


def image_search(cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
    """``diffnas search`` for an image space: search (or the finished search's genotype),
    retrain when enabled, print on rank 0."""
    return search.search_then_retrain(
        cfg, run_dir, lambda: run_image_search(cfg, run_dir, resume).genotype,
        lambda g: run_image_retrain(cfg, g, run_dir, resume), print_image_result)


def image_train(cfg: RunConfig, genotype: Genotype, run_dir: Path, resume: bool = False
                ) -> None:
    """``diffnas train`` for an image space: retrain ``genotype``, print on rank 0."""
    from diffnas.data import load_dataset
    from diffnas.engine.rundir import test_subset_seed

    d = cfg.data
    data = load_dataset(d.name, d.root, d.download, d.resolution, cfg.retrain.train_subset,
                        d.test_subset, cfg.seed,
                        dp.main_process_result(test_subset_seed, run_dir, cfg.seed))  # rank 0
    result = run_image_retrain(cfg, genotype, run_dir, resume, data=data)
    if dp.is_main_process():
        print_image_result(genotype, result)


def dry_run_shape(name: str, resolution: int | None, root: str | None = None
                  ) -> tuple[int, int, int]:
    """(channels, side, classes) of a dataset, reading as little as possible: built-in
    sets are known, your own data (``npz``, ``folder``) is peeked at (headers, class
    folders, one image), and a dataset registered in Python (a plugin) is loaded."""
    from diffnas.data import load_dataset
    from diffnas.data.images import known_image_shape

    if (known := known_image_shape(name, root, resolution)) is not None:
        return known
    data = load_dataset(name, root, False, resolution)
    return data.in_channels, data.resolution, data.num_classes


def image_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    """What ``diffnas train --dry-run`` reports for an image network: its input, classes,
    parameters and MACs (the data is peeked at, not loaded, where it can be)."""
    d = cfg.data
    shape = DataShape(*dry_run_shape(d.name, d.resolution, d.root))
    _, model = retrain.build_network(cfg, genotype, shape)
    return {"input": [shape.in_channels, shape.resolution, shape.resolution],
            "classes": shape.num_classes, **retrain.network_summary(model, shape)}


def check_image_retrain(cfg: RunConfig) -> None:
    """The retraining batch: an equal slice for every process, and (with
    ``retrain.train_subset``) at least one complete batch (incomplete ones are dropped)."""
    r, world_size = cfg.retrain, dp.planned_world_size()
    if r.batch_size % world_size:
        raise ConfigError(f"retrain.batch_size={r.batch_size} does not divide by the "
                          f"{world_size} processes (each takes an equal slice of a batch)")
    if r.train_subset is not None and r.batch_size > r.train_subset:
        raise ConfigError(f"retrain.batch_size={r.batch_size} exceeds retrain.train_subset="
                          f"{r.train_subset}: no complete batch (incomplete ones are dropped)")


def _datasets():
    from diffnas.data import DATASETS

    return DATASETS


ENGINE = register_engine(Engine(
    name="image", label="image (engine/search.py, retrain.py)", a_run="an image run",
    data_kind="image", datasets=_datasets, search=image_search, train=image_train,
    run_search=run_image_search, run_retrain=run_image_retrain, summary=image_summary,
    check_search=search.check_search_config, check_retrain=check_image_retrain,
    retrain_network=lambda cfg: cfg.retrain.image_network(), exportable=True, timed=True,
    data_parallel=True))
