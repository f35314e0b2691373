"""The run directory: where a run's config, log, metrics, genotypes and checkpoints live."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from diffnas.config import RunConfig, load_config, save_config

CONFIG_FILE = "config.yaml"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def new_run_dir(cfg: RunConfig, config_name: str = "run") -> Path:
    name = cfg.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    if (run_dir / CONFIG_FILE).exists():
        raise FileExistsError(
            f"run directory {run_dir} already holds a run; use --resume {run_dir} to continue "
            "it or choose another name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    return run_dir


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return load_config(path)


def setup_logging(run_dir: Path | None, verbose: bool = True) -> None:
    """Log to ``run_dir/log.txt`` and to the console."""
    logger = logging.getLogger("diffnas")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if verbose:
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        logger.addHandler(console)
    if run_dir is not None:
        fh = logging.FileHandler(Path(run_dir) / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False
