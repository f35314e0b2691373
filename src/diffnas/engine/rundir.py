"""The run directory: where a run's config, log, metrics, genotypes and checkpoints live."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from diffnas.config import (
    ConfigError,
    RunConfig,
    _load_yaml,
    check_device,
    load_config,
    save_config,
)
from diffnas.engine.checkpoint import atomic_write_text
from diffnas.genotype import Genotype

CONFIG_FILE = "config.yaml"
#: the command that created a run ("search" or "train"), so that --resume of the other
#: command is refused whatever the run holds so far
MADE_BY_FILE = "made_by.txt"


def resolve_device(name: str) -> torch.device:
    """The torch device of ``config.device`` (``auto``: CUDA when present), checked as
    config loading checks it (:func:`diffnas.config.check_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def new_run_dir(cfg: RunConfig, config_name: str = "run", command: str = "search") -> Path:
    """Create a new run's directory (claimed atomically) and save its config there, and
    which ``command`` made it (:data:`MADE_BY_FILE`). Unnamed:
    ``CONFIG_NAME-YYYYmmdd-HHMMSS``, plus ``-2``, ``-3``, ... for runs started in the same
    second; a ``cfg.name`` that already holds a run is refused."""
    out = Path(cfg.out_dir)
    if cfg.name:
        run_dir = out / cfg.name
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # claim the config file: a concurrent run of the same name fails here
            (run_dir / CONFIG_FILE).open("x").close()
        except FileExistsError:
            raise FileExistsError(
                f"run directory {run_dir} already holds a run; use --resume {run_dir} to "
                "continue it or choose another name") from None
    else:
        out.mkdir(parents=True, exist_ok=True)
        base = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in itertools.count(1):
            run_dir = out / (base if n == 1 else f"{base}-{n}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    try:
        save_config(cfg, run_dir / CONFIG_FILE)
    except BaseException:
        (run_dir / CONFIG_FILE).unlink(missing_ok=True)  # no empty claim left behind
        raise
    mark_made_by(run_dir, command)
    return run_dir


def mark_made_by(run_dir: str | Path, command: str) -> None:
    """Record that ``command`` ("search" or "train") made ``run_dir``."""
    if command not in ("search", "train"):
        raise ValueError(f"a run is made by 'search' or 'train', not {command!r}")
    atomic_write_text(command + "\n", Path(run_dir) / MADE_BY_FILE)


def made_by(run_dir: str | Path) -> str | None:
    """The command that made ``run_dir``; None for runs made before it was recorded."""
    path = Path(run_dir) / MADE_BY_FILE
    return path.read_text().strip() if path.is_file() else None


def test_subset_seed(run_dir: str | Path, seed: int) -> int | None:
    """The generator seed of ``data.test_subset`` for a retraining in ``run_dir``: None
    (the fixed one of ``data.load_dataset``), except when continuing a retraining begun
    before runs recorded ``made_by.txt``, whose test subset followed the run's seed
    (``seed + 1``): its logged epochs were scored on those images."""
    run = Path(run_dir)
    if made_by(run) is None and (run / "retrain" / "metrics.jsonl").is_file():
        return seed + 1
    return None


def seeds_parent_message(run_dir: str | Path, what: str) -> str | None:
    """Why ``what`` (report, plot, export) does not read ``run_dir`` when it is the parent
    of a ``--seeds`` run (its seeds are runs of their own), else None."""
    run = Path(run_dir)
    if not (run / "seeds.json").is_file():
        return None
    seeds = sorted(p.name for p in run.glob("seed_*") if p.is_dir())
    return (f"{run} is a multi-seed run: {what} one of its seeds "
            f"({', '.join(str(run / s) for s in seeds[:3]) or 'seed_<s>/'}"
            f"{', ...' if len(seeds) > 3 else ''}); {run / 'summary.md'} compares them")


def run_kind(run_dir: str | Path) -> str | None:
    """The command ("search" or "train") that made ``run_dir``; for runs made before that
    was recorded, judged by their folders (search/: a search; retrain/ alone: a train run;
    neither: None)."""
    run, kind = Path(run_dir), made_by(run_dir)
    if kind is not None:
        return kind
    if (run / "search").is_dir():
        return "search"
    return "train" if (run / "retrain").is_dir() else None


#: settings a resumed run may change: where it runs, where its data lives and how it
#: reports, never what it computes
RESUME_OVERRIDES = ("device", "progress", "data.root", "plugins")


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None,
                    device: bool = True, search: bool = True) -> RunConfig:
    """The saved config of ``run_dir``, with ``overrides`` limited to
    :data:`RESUME_OVERRIDES` (a run continues with the settings it started with);
    ``device=False`` to read a run made on another machine (reports, export);
    ``search=False`` for a retraining (``diffnas train``), which reads no search settings."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    _check_saved_config(path)
    overrides = list(overrides or [])
    refused = [o for o in overrides if o.split("=", 1)[0].strip() not in RESUME_OVERRIDES]
    if refused:
        raise ConfigError(
            f"--resume continues {run_dir} with its saved {CONFIG_FILE}; only "
            f"{', '.join(RESUME_OVERRIDES)} may change, not {refused} (start a new run for "
            "other settings)")
    return load_config(path, overrides, device=device, search=search)


def _check_saved_config(path: Path) -> None:
    """Refuse a run's ``config.yaml`` that holds no settings, which would read as the
    defaults and run something else: empty (the claim :func:`new_run_dir` makes before
    saving the config, left by a run stopped in between), only comments, or no mapping."""
    run_dir = path.parent
    text = path.read_text()
    data = _load_yaml(text, str(path)) if text.strip() else None
    if data is None:
        what = "is empty" if not text.strip() else "holds no settings (only comments)"
        if all(p.name in (CONFIG_FILE, "log.txt", MADE_BY_FILE) for p in run_dir.iterdir()):
            raise ConfigError(
                f"{path} {what}: the run was stopped before its config was saved, so "
                f"nothing was computed; delete {run_dir} and start the run again")
        raise ConfigError(f"{path} {what}, so the run's settings are lost: restore it "
                          f"from a copy, or delete {run_dir} and start the run again")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not a "
                          f"{type(data).__name__}: restore it from a copy")


def pin_genotype(out: str | Path, genotype: Genotype, resume: bool) -> None:
    """Record which genotype ``out`` (a retrain directory) trains, in ``genotype.json``;
    resuming it with another genotype is refused, since its checkpoint holds the weights
    and metrics of the recorded one."""
    path = Path(out) / "genotype.json"
    if resume and path.is_file():
        recorded = Genotype.load(path)
        if recorded.to_dict() != genotype.to_dict():
            raise ValueError(f"{out} is retraining another genotype (recorded in {path}):\n"
                             f"  recorded: {recorded}\n  given:    {genotype}\n"
                             "resume with the recorded genotype, or start a new run")
        return
    atomic_write_text(genotype.to_json() + "\n", path)


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
