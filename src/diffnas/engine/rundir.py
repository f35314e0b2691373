"""The run directory: where a run's config, log, metrics, genotypes and checkpoints live."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffnas.config import (
    ConfigError,
    RunConfig,
    _load_yaml,
    check_device,
    load_config,
    save_config,
    saved_config_edit,
)
from diffnas.engine.callbacks import read_json
from diffnas.engine.checkpoint import atomic_write_text
from diffnas.engine.runlock import LOCK_FILE
from diffnas.genotype import Genotype, GenotypeError

log = logging.getLogger("diffnas")

CONFIG_FILE = "config.yaml"
#: the command that created a run ("search" or "train"), so that --resume of the other
#: command is refused whatever the run holds so far
MADE_BY_FILE = "made_by.txt"
#: the plugins' source files (path, sha256) when the run started: edits are reported
PLUGINS_FILE = "plugins.json"
#: the test-subset seed a retraining started with (:func:`test_subset_seed`)
TEST_SUBSET_FILE = "test_subset.json"
#: what a phase (search/, retrain/) computed on: :func:`check_same_data`
DATA_FILE = "data.json"
#: a ``--seeds`` parent's seeds (written empty with its config: what makes it a parent)
SEEDS_FILE = "seeds.json"
#: the torch thread count a run started with: float sums split over another number of
#: threads round differently, so only a resume with the same count computes what the
#: uninterrupted run would (``--seeds`` resumes each seed with it; a plain run warns)
THREADS_FILE = "threads.json"
#: dataset fields that say where the data was read from, not what it is (left out of
#: :func:`data_fingerprint`: a resume may find the same files elsewhere)
LOCATION_FIELDS = frozenset({"source", "sources", "root", "path", "paths"})


def resolve_device(name: str) -> torch.device:
    """The torch device of ``config.device`` (``auto``: CUDA when present), checked as
    config loading checks it (:func:`diffnas.config.check_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def new_run_dir(cfg: RunConfig, config_name: str = "run", command: str = "search",
                marks: Mapping[str, str] | None = None) -> Path:
    """Create a new run's directory (claimed atomically) and save its config there, and
    which ``command`` made it (:data:`MADE_BY_FILE`). ``marks`` (file name -> text) are
    written before the config, so that no run stopped at any point lacks them (a
    ``--seeds`` parent's :data:`SEEDS_FILE`, without which it reads as a plain run). Unnamed:
    ``CONFIG_NAME-YYYYmmdd-HHMMSS``, plus ``-2``, ``-3``, ... for runs started in the same
    second; a ``cfg.name`` that already holds a run is refused."""
    out = Path(cfg.out_dir)
    if cfg.name and (Path(cfg.name).name != cfg.name or cfg.name in (".", "..")):
        raise ConfigError(f"name={cfg.name}: the run directory's own name, a single folder "
                          f"inside out_dir ({cfg.out_dir}), not a path; give the parent "
                          "folder as out_dir")
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
        for file, text in (marks or {}).items():
            atomic_write_text(text, run_dir / file)
        save_config(cfg, run_dir / CONFIG_FILE)
    except BaseException:
        for file in (CONFIG_FILE, *(marks or {})):  # no empty claim left behind
            (run_dir / file).unlink(missing_ok=True)
        raise
    mark_made_by(run_dir, command)
    record_plugins(run_dir, cfg)
    return run_dir


def record_plugins(run_dir: str | Path, cfg: RunConfig) -> None:
    """Write :data:`PLUGINS_FILE` (the plugins' source files and their sha256) for a run
    that uses plugins, so that an edit is reported later (:func:`warn_changed_plugins`)."""
    if cfg.plugins:
        from diffnas.plugins import plugin_sources

        atomic_write_text(json.dumps(plugin_sources(cfg.plugins), indent=1) + "\n",
                          Path(run_dir) / PLUGINS_FILE)


def mark_made_by(run_dir: str | Path, command: str) -> None:
    """Record that ``command`` ("search" or "train") made ``run_dir``."""
    if command not in ("search", "train"):
        raise ValueError(f"a run is made by 'search' or 'train', not {command!r}")
    atomic_write_text(command + "\n", Path(run_dir) / MADE_BY_FILE)


def recorded_threads(run_dir: str | Path) -> int | None:
    """The thread count ``run_dir`` started with (:data:`THREADS_FILE`); None for a run
    that has none recorded (made before it was) or an unreadable record."""
    path = Path(run_dir) / THREADS_FILE
    if not path.is_file():
        return None
    n = read_json(path, f"delete {path} to resume with this machine's count").get("threads")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def record_threads(run_dir: str | Path, threads: int) -> None:
    """Record the thread count ``run_dir`` starts with."""
    atomic_write_text(json.dumps({"threads": threads}) + "\n", Path(run_dir) / THREADS_FILE)


def check_resume_threads(run_dir: str | Path, resume: bool, device: str) -> None:
    """A new run records this process's thread count; a resumed CPU run with another count
    says so (it still runs: a resume elsewhere is allowed, but is not the uninterrupted
    run bit for bit, and the user can match the count). A run with none recorded gets
    none: its first count is not known."""
    now = torch.get_num_threads()
    if not resume:
        record_threads(run_dir, now)
        return
    try:
        then = recorded_threads(run_dir)
    except ValueError as exc:  # damaged: the warning it feeds is not worth refusing over
        log.warning("%s (the thread count it started with is not known)", exc)
        return
    if then is not None and then != now and resolve_device(device).type == "cpu":
        log.warning("this run started with %d torch threads and resumes with %d: float sums "
                    "split over another number of threads round differently, so it will not "
                    "repeat the uninterrupted run bit for bit (OMP_NUM_THREADS=%d resumes it "
                    "exactly)", then, now, then)


def made_by(run_dir: str | Path) -> str | None:
    """The command that made ``run_dir``; None for runs made before it was recorded."""
    path = Path(run_dir) / MADE_BY_FILE
    return path.read_text().strip() if path.is_file() else None


def test_subset_seed(run_dir: str | Path, seed: int) -> int | None:
    """The generator seed of ``data.test_subset`` for a retraining in ``run_dir``, chosen
    at its first start and recorded in ``retrain/test_subset.json``, so a resumed
    retraining scores the same images as its logged epochs: None (the fixed one of
    ``data.load_dataset``), except when continuing a retraining begun before runs recorded
    ``made_by.txt`` or this file, whose test subset followed the run's seed (``seed + 1``)."""
    out = Path(run_dir) / "retrain"
    record = out / TEST_SUBSET_FILE
    if record.is_file():
        fix = ("restore it, or write {\"seed\": null} there (the fixed test subset of "
               "runs that record one: a retraining begun before then scored another)")
        chosen = read_json(record, fix).get("seed", "missing")
        if chosen is not None and (not isinstance(chosen, int) or isinstance(chosen, bool)):
            raise ValueError(f"{record}: damaged, 'seed' is {chosen!r}, not a number or "
                             f"null; {fix}")
        return chosen
    legacy = made_by(run_dir) is None and (out / "metrics.jsonl").is_file()
    chosen = seed + 1 if legacy else None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"seed": chosen}) + "\n", record)
    return chosen


def data_fingerprint(data: Any) -> dict[str, Any]:
    """What identifies the data a run computes on, per field of a dataset dataclass
    (images, a corpus, a graph): an integer tensor (labels, tokens, edges) by its shape and
    a SHA-1 of its contents; a float tensor (normalised images, features) by its shape,
    mean, std and 16 values at fixed places, compared with a tolerance
    (:func:`same_data`), since the normalisation may round differently on another machine;
    a long list (a vocabulary) by its length and SHA-1; anything else as it is, except
    where the data was read from (:data:`LOCATION_FIELDS`: files may move)."""
    out: dict[str, Any] = {"type": type(data).__name__}
    for f in dataclasses.fields(data):
        if f.name in LOCATION_FIELDS:
            continue
        value = getattr(data, f.name)
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            rec: dict[str, Any] = {"shape": list(value.shape),
                                   "dtype": str(value.dtype).replace("torch.", "")}
            if t.is_floating_point():  # (float32 reductions: no copy of the images)
                picks = [i * (t.numel() - 1) // 15 for i in range(16)] if t.numel() else []
                rec.update(mean=t.float().mean().item() if t.numel() else 0.0,
                           std=t.float().std().item() if t.numel() > 1 else 0.0,
                           values=t[picks].double().tolist())
            else:
                rec["sha1"] = hashlib.sha1(t.view(torch.uint8).numpy().data).hexdigest()
            out[f.name] = rec
        elif isinstance(value, list | tuple) and len(value) > 64:  # a vocabulary
            out[f.name] = {"len": len(value),
                           "sha1": hashlib.sha1("\n".join(map(str, value)).encode()).hexdigest()}
        else:
            out[f.name] = json.loads(json.dumps(value, default=str))
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within a relative 1e-4 (absolute 1e-6); NaN equals NaN, and an
    infinity itself."""
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, int | float) and isinstance(b, int | float)):
            return False
        if not (math.isfinite(a) and math.isfinite(b)):
            return a == b or (math.isnan(a) and math.isnan(b))
        return abs(a - b) <= 1e-6 + 1e-4 * max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def same_data(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields in which two :func:`data_fingerprint` records differ."""
    return [k for k in dict.fromkeys([*before, *now]) if not _same(before.get(k), now.get(k))]


def check_same_data(out: str | Path, data: Any, resume: bool) -> None:
    """Record in ``out/data.json`` what a phase computes on (:func:`data_fingerprint`) at
    its start; a resume on other data is refused. ``data.root`` may change on resume (the
    files moved), but a root now holding other images, texts or graphs would continue the
    weights and metrics on a dataset they were not computed on. A phase begun before this
    record existed gets one now."""
    path = Path(out) / DATA_FILE
    now = data_fingerprint(data)
    if resume and path.is_file():
        diff = same_data(read_json(path, "restore it, or delete it to resume without the check "
                                   "that data.root holds the data this phase started with"),
                         now)
        if diff:
            raise ValueError(
                f"{Path(out)} was computed on other data than data.root now gives (differs: "
                f"{', '.join(diff)}; recorded in {path}): resume with the data the run "
                "started with, or start a new run")
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(now, indent=1) + "\n", path)


def seeds_parent_message(run_dir: str | Path, what: str) -> str | None:
    """Why ``what`` (report, plot, export) does not read ``run_dir`` when it is the parent
    of a ``--seeds`` run (its seeds are runs of their own), else None."""
    run = Path(run_dir)
    if not (run / "seeds.json").is_file():
        return None
    seeds = sorted(p.name for p in run.glob("seed_*") if p.is_dir())
    return (f"{run} is a multi-seed run: {what} one of its seeds "
            f"({', '.join(str(run / s) for s in seeds[:3]) or 'seed_<s>/'}"
            f"{', ...' if len(seeds) > 3 else ''}); {run / 'summary.md'} compares them, and "
            f"diffnas compare {run} OTHER_RUN ... puts them beside other runs")


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


def retrain_command(run_dir: str | Path, genotype: str | None = None) -> str | None:
    """The command that retrains a run's genotype (a search run's own, or ``genotype`` as a
    ``diffnas train`` run was given it) as a new run beside it, with the run's config
    (``diffnas train`` retrains whatever ``retrain.enabled`` says, with the run's
    ``retrain`` settings; append ``retrain.X=...`` to change one). The new run is named
    (``RUN-retrain``): the config names the run it was saved in. None while a search has
    written no genotype."""
    import os
    import shlex

    run = Path(run_dir)
    if run.name in ("", ".", ".."):  # (--resume . : the run's own name is needed)
        run = Path(os.path.abspath(run))
    if genotype is None:
        if not (run / "search" / "genotype.json").exists():
            return None
        genotype = str(run / "search" / "genotype.json")
    return shlex.join(["diffnas", "train", "--config", str(run / "config.yaml"),
                       "--genotype", genotype, f"out_dir={run.parent}",
                       f"name={run.name}-retrain"])


def unretrained_search_message(run_dir: str | Path, cfg: RunConfig) -> str | None:
    """What to do with a finished search run made with ``retrain.enabled=false`` (it has
    no retraining to resume or export: a new ``diffnas train`` run retrains its genotype);
    None for any other run."""
    run = Path(run_dir)
    command = retrain_command(run)
    if cfg.retrain.enabled or not (run / "search" / "DONE").exists() or command is None:
        return None
    return (f"{run} is a search made with retrain.enabled=false: it holds no retraining. "
            f"Retrain its genotype as a new run beside it: {command}")


#: settings a resumed run may change: where it runs, where its data lives and how it
#: reports, never what it computes
RESUME_OVERRIDES = ("device", "progress", "plots", "data.root", "plugins")


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None,
                    device: bool = True, search: bool = True, warn_plugins: bool = True
                    ) -> RunConfig:
    """The saved config of ``run_dir``, with ``overrides`` limited to
    :data:`RESUME_OVERRIDES` (a run continues with the settings it started with);
    ``device=False`` to read a run made on another machine (reports, export);
    ``search=False`` for a retraining (``diffnas train``), which reads no search settings;
    ``warn_plugins=False`` for a resume, which warns of edited plugins
    (:func:`warn_changed_plugins`) once the run's log.txt is open, so the log keeps it."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).exists():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not Path(run_dir).is_dir():
        raise NotADirectoryError(f"{run_dir} is a file, not a run directory")
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
    try:
        cfg = load_config(path, overrides, device=device, search=search, saved=True)
        if warn_plugins:
            warn_changed_plugins(run_dir, cfg)
        return cfg
    except ConfigError as exc:
        if not str(exc).startswith("config.plugins:") or not any(
                words in str(exc) for words in ("is not a file", "no module named")):
            raise
        if any(o.split("=", 1)[0].strip() == "plugins" for o in overrides):
            raise ConfigError(f"{exc} (named by the plugins= given after the run "
                              f"directory, which replaces the list in {path})") from None
        raise ConfigError(f"{exc} (named by {path}; if the plugin moved, say where it is now "
                          "after the run directory: plugins=[NEW/PLACE.py, ...], which "
                          "--resume, plot, report and export take)") from None


def warn_changed_plugins(run_dir: str | Path, cfg: RunConfig) -> list[str]:
    """Warn (and return) the plugin files whose code changed since ``run_dir`` started
    (:data:`PLUGINS_FILE`): a resumed run would continue with other code than it began
    with, and a checkpoint or data check that then fails may be the plugin's doing."""
    from diffnas.plugins import changed_plugins, plugin_sources

    record = Path(run_dir) / PLUGINS_FILE
    if not cfg.plugins or not record.is_file():
        return []
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    changed = changed_plugins(recorded, plugin_sources(cfg.plugins))
    for file in changed:
        log.warning("plugin %s changed since %s started (%s records its sha256): the run "
                    "goes on with the edited code", file, run_dir, record)
    return changed


def nothing_computed(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds only what :func:`new_run_dir` writes (and a log and a
    lock): a run stopped before it computed anything."""
    return Path(run_dir).is_dir() and all(
        p.name in (CONFIG_FILE, MADE_BY_FILE, PLUGINS_FILE, SEEDS_FILE, "log.txt", LOCK_FILE)
        for p in Path(run_dir).iterdir())


def _check_saved_config(path: Path) -> None:
    """Refuse a run's ``config.yaml`` that holds no settings, which would read as the
    defaults and run something else: empty (the claim :func:`new_run_dir` makes before
    saving the config, left by a run stopped in between), only comments, or no mapping;
    and one changed since it was saved (cut short or edited: :func:`saved_config_edit`)."""
    run_dir = path.parent
    text = path.read_text()
    data = _load_yaml(text, str(path)) if text.strip() else None
    if data is None:
        what = "is empty" if not text.strip() else "holds no settings (only comments)"
        if nothing_computed(run_dir):
            raise ConfigError(
                f"{path} {what}: the run was stopped before its config was saved, so "
                f"nothing was computed; delete {run_dir} and start the run again")
        raise ConfigError(f"{path} {what}, so the run's settings are lost: restore it "
                          f"from a copy, or delete {run_dir} and start the run again")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not a "
                          f"{type(data).__name__}: restore it from a copy")
    if saved_config_edit(text):
        raise ConfigError(
            f"{path} was changed since diffnas saved it (its first line holds the sha256 of "
            "what was saved): cut short or edited, it no longer holds the settings the run "
            "computed with (one left out reads as the default), which a resume would go on "
            "with and a report would show. Restore it from a copy, or start a new run for "
            "other settings (to change where and how it runs, --resume takes "
            f"{'=, '.join(RESUME_OVERRIDES)}=); "
            "to use the file as it is now, delete its first line")


def recorded_genotype(path: str | Path) -> Genotype:
    """A genotype a run recorded (``search/genotype.json``, ``retrain/genotype.json``); one
    damaged since says how the run gets it back rather than only that it is malformed."""
    try:
        return Genotype.load(path)
    except GenotypeError as exc:
        phase = Path(path).parent
        fix = (f"delete {phase / 'DONE'} and resume: the search's checkpoint writes it again"
               if phase.name == "search" else "delete it and resume with the genotype the "
               "run retrains (its checkpoint is checked against the network it builds)")
        raise GenotypeError(f"{exc} (this run recorded it; damaged since: {fix})") from None


def pin_genotype(out: str | Path, genotype: Genotype, resume: bool) -> None:
    """Record which genotype ``out`` (a retrain directory) trains, in ``genotype.json``;
    resuming it with another genotype is refused, since its checkpoint holds the weights
    and metrics of the recorded one."""
    path = Path(out) / "genotype.json"
    if resume and path.is_file():
        recorded = recorded_genotype(path)
        if recorded.to_dict() != genotype.to_dict():
            raise ValueError(f"{out} is retraining another genotype (recorded in {path}):\n"
                             f"  recorded: {recorded}\n  given:    {genotype}\n"
                             "resume with the recorded genotype, or start a new run")
        return
    atomic_write_text(genotype.to_json() + "\n", path)
