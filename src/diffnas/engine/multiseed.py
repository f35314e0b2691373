"""Multi-seed runs: the same search (and retraining) under several seeds, then a summary.

DARTS results move from seed to seed; reporting one seed hides that. ``diffnas search
--seeds 0,1,2,3`` makes a parent directory with one ordinary run directory per seed
(``seed_<s>/``), runs them in parallel worker processes when there are cores for it (each
worker ``python -m diffnas.engine.multiseed SEED_DIR``, its output in
``seed_<s>/worker.log``), and writes ``summary.json`` and ``summary.md``: mean +- std of the
final retrained accuracy, each seed's genotype, and how often each op was chosen per edge.
Rerunning with ``--resume PARENT`` continues the unfinished seeds (with the overrides a
resume takes, ``rundir.RESUME_OVERRIDES``, for every seed). The statistics cover the
finished seeds; a failed or unfinished one keeps its row and says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffnas.config import ConfigError, RunConfig
from diffnas.engine.checkpoint import atomic_write_text
from diffnas.engine.engines import ACCURACY, PERPLEXITY, Metric
from diffnas.engine.rundir import SEEDS_FILE, recorded_genotype
from diffnas.engine.signals import stop_signals_interrupt

log = logging.getLogger("diffnas")



def parse_seeds(text: str) -> list[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``; ranges ``"0-3"`` work too. Duplicates are errors."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = map(int, part.split("-"))
            if lo > hi:
                raise ConfigError(f"--seeds {text!r}: the range {part!r} is reversed "
                                  f"(write {hi}-{lo})")
            seeds.extend(range(lo, hi + 1))
        elif part:
            try:
                seeds.append(int(part))
            except ValueError as exc:
                raise ConfigError(f"--seeds {text!r}: expected integers like 0,1,2,3") from exc
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seed given")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is repeated")
    if not all(0 <= s < 2**32 for s in seeds):  # before the parent directory is made
        raise ConfigError(f"--seeds {text!r}: seeds must be in [0, 2**32) (numpy's range)")
    return seeds


def default_workers(n_runs: int, cores: int | None = None) -> int:
    """One process per core (each run then uses one thread), at most one per seed."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(n_runs, cores))


def threads_per_worker(workers: int) -> int:
    """The torch threads of each of ``workers`` seed processes: the cores shared out, and
    no more than ``OMP_NUM_THREADS`` where the user set it (a machine shared with others)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def check_workers(workers: int | None) -> None:
    """``None`` (one per core) or a positive count."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")


def seed_dir(parent: str | Path, seed: int) -> Path:
    return Path(parent) / f"seed_{seed}"


def read_seeds(parent: str | Path) -> list[int]:
    """The seeds recorded in ``PARENT/seeds.json`` (none when it does not exist); a damaged
    file is a ``ConfigError`` naming it."""
    from diffnas.engine.callbacks import read_json

    path = Path(parent) / SEEDS_FILE
    if not path.is_file():
        return []
    fix = (f"restore it, or write the seeds of the folders {path.parent}/seed_<s> in it "
           'as {"seeds": [0, 1, ...]}')
    try:
        seeds = read_json(path, fix).get("seeds")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(seeds, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in seeds):
        raise ConfigError(f"{path}: damaged, 'seeds' is not a list of integers in "
                          f"[0, 2**32); {fix}")
    return seeds


# --- one seed ----------------------------------------------------------------------
def result_fix(run: Path) -> str:
    """How to get a good ``retrain/result.json`` of the seed ``run`` back."""
    return (f"restore it, or delete it and continue the seed (--seeds "
            f"{run.name.removeprefix('seed_')} --resume {run.parent}) to write it again")


def is_finished(run_dir: str | Path, cfg: RunConfig) -> bool:
    """Search done, and retraining done when it is enabled. A damaged ``result.json`` is a
    ``ValueError`` naming it and saying what to do."""
    from diffnas.engine.callbacks import read_json

    run = Path(run_dir)
    if not (run / "search" / "DONE").exists():
        return False
    if not cfg.retrain.enabled:
        return True
    res = run / "retrain" / "result.json"
    return res.is_file() and \
        read_json(res, result_fix(run)).get("epochs_done") == cfg.retrain.epochs


def run_seed(run_dir: str | Path, threads: int | None = None,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Search and retrain one prepared seed directory (continuing where it stopped, with
    the resume ``overrides`` of ``rundir.RESUME_OVERRIDES``) and return its record for the
    summary. The ``diffnas`` logger is left as it was found (the seed's log.txt handler is
    closed): seeds run in this process, or a caller's, do not leave theirs behind."""
    import torch

    from diffnas.engine.logs import logging_scope
    from diffnas.engine.runlock import run_lock

    run = Path(run_dir)
    # a second process on the same seed is refused
    with run_lock(run), logging_scope():
        before = torch.get_num_threads()
        torch.set_num_threads(seed_threads(run, threads or before))
        try:
            return _run_seed(run, overrides)
        finally:  # the caller's thread count (a seed run in this process)
            torch.set_num_threads(before)


def seed_threads(run: Path, threads: int) -> int:
    """The thread count seed ``run`` started with (``rundir.THREADS_FILE``), else
    ``threads`` (recorded now): resumed with it, the seed computes what an uninterrupted
    run does (float sums split over other thread counts round differently)."""
    from diffnas.engine import rundir

    recorded = rundir.recorded_threads(run)
    if recorded is not None:
        return recorded
    rundir.record_threads(run, threads)
    return threads


def _run_seed(run: Path, overrides: Sequence[str]) -> dict[str, Any]:
    from diffnas.engine.logs import setup_logging
    from diffnas.engine.rundir import load_run_config, warn_changed_plugins

    cfg = load_run_config(run, list(overrides), warn_plugins=False)
    cfg = dataclasses.replace(cfg, progress=False)
    from diffnas.engine.engines import engine_of

    engine = engine_of(cfg)  # its search and retraining, each seed's run in this process
    setup_logging(run, verbose=False)
    warn_changed_plugins(run, cfg)  # into the seed's log.txt (the parent warned on screen)
    if (run / "search" / "DONE").exists():
        genotype = recorded_genotype(run / "search" / "genotype.json")
    else:
        genotype = engine.run_search(cfg, run, resume=True).genotype
    if cfg.retrain.enabled and not is_finished(run, cfg):
        engine.run_retrain(cfg, genotype, run, resume=True)
    from diffnas.report.plots import plots_after_run

    plots_after_run(run, cfg)
    return seed_record(run, cfg.seed, seeds_metric(cfg))


def seed_record(run_dir: str | Path, seed: int,
                metric: Metric | str = "test_acc") -> dict[str, Any]:
    """What the summary needs from a seed directory (None where a part is missing):
    ``metric`` (its engine's, ``seeds_metric``) read from the retraining's result and the
    search's last epoch. A damaged file is a ``ValueError`` naming it (``GenotypeError``
    for a genotype)."""
    from diffnas.engine.callbacks import read_json, read_jsonl, search_val_acc, total_seconds

    metric = as_metric(metric)
    run = Path(run_dir)
    rec = _empty_record(run, seed, metric)
    for phase in ("search", "retrain"):  # wall-clock time, from the rows' ``seconds``
        rec[f"{phase}_seconds"] = total_seconds(read_jsonl(run / phase / "metrics.jsonl"))
    gfile = run / "search" / "genotype.json"
    if not gfile.is_file():  # a diffnas train run: the genotype it was given
        gfile = run / "retrain" / "genotype.json"
    if gfile.is_file():
        rec["genotype"] = recorded_genotype(gfile).to_dict()
    metrics = read_jsonl(run / "search" / "metrics.jsonl")
    if metrics and isinstance(metrics[-1], dict):
        rec["search_val_acc"], rec["search_val_measure"] = search_val_acc(metrics[-1])
        if metric.search_key is not None and metric.search_key != "val_acc":
            v = metrics[-1].get(metric.search_key)  # e.g. a language model's valid_ppl
            rec[search_field(metric)] = float(v) if _number(v) else None
    res = run / "retrain" / "result.json"
    if res.is_file():
        r = read_json(res, result_fix(run))
        key = metric.key
        if not _number(r.get(key)):
            raise ValueError(f"{res}: damaged, no number {key!r}; {result_fix(run)}")
        rec.update({key: r[key]},
                   params=r.get("params") if isinstance(r.get("params"), int) else None,
                   macs=r.get("macs") if _number(r.get("macs")) else None)
    return rec


def _empty_record(run_dir: str | Path, seed: int,
                  metric: Metric | str = "test_acc") -> dict[str, Any]:
    metric = as_metric(metric)
    return {"seed": seed, "run_dir": str(run_dir), "genotype": None, "test_acc": None,
            "test_ppl": None, "params": None, "macs": None, "search_val_acc": None,
            "search_val_measure": None, "search_val_ppl": None, metric.key: None,
            search_field(metric): None, "search_seconds": None, "retrain_seconds": None}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def failed_record(run_dir: str | Path, seed: int, error: str,
                  metric: Metric | str = "test_acc") -> dict[str, Any]:
    """The summary row of a seed whose files cannot be read: it says why."""
    return {**_empty_record(run_dir, seed, metric), "error": error}


#: the headline figures of the built-in engines, by key: image and graph runs report
#: test accuracy, a language model's retraining test perplexity (lower is better); a
#: plugin engine brings its own :class:`~diffnas.engine.engines.Metric`
METRICS: dict[str, Metric] = {m.key: m for m in (ACCURACY, PERPLEXITY)}


def as_metric(metric: Metric | str) -> Metric:
    """``metric`` itself, or the built-in metric of that key (:data:`METRICS`)."""
    if isinstance(metric, Metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: one of {', '.join(METRICS)}, or a Metric")
    return METRICS[metric]


def search_field(metric: Metric) -> str:
    """The record and summary key of the search's validation figure for ``metric``
    (``search_val_acc``, ``search_val_ppl``, ``search_val_<short>``)."""
    return f"search_val_{metric.short}"


def seeds_metric(cfg: RunConfig) -> Metric:
    """The figure that summarises ``cfg``'s seeds: its engine's metric."""
    from diffnas.engine.engines import engine_of

    return engine_of(cfg).metric


# --- the summary --------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator). One value has no
    sample standard deviation: None (JSON null), not 0, which would read as no spread."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def op_frequency(genotypes: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """``{cell: {"src->dst": {op: count}}}`` over genotype dicts: how often each op was
    kept on each edge (an edge dropped by the discretizer counts for no op)."""
    freq: dict[str, dict[str, dict[str, int]]] = {}
    for g in genotypes:
        for cell, body in g["cells"].items():
            for op, src, dst in body["edges"]:
                edge = freq.setdefault(cell, {}).setdefault(f"{src}->{dst}", {})
                edge[op] = edge.get(op, 0) + 1
    for cell, edges in freq.items():  # stable order: by target node, then source
        freq[cell] = {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0])))
                      for k, v in sorted(edges.items(), key=lambda kv: _edge_key(kv[0]))}
    return freq


def _edge_key(label: str) -> tuple[int, int]:
    src, dst = label.split("->")
    return int(dst), int(src)


def summarize(records: Sequence[dict[str, Any]],
              metric: Metric | str = "test_acc") -> dict[str, Any]:
    """The metric's mean +- std (accuracy; ``"test_ppl"``: a language model's perplexity;
    a plugin engine's own), the genotypes, and op counts per edge over the finished seeds
    (a failed or unfinished seed's figures are mid-run ones: its row shows them, the
    statistics leave them out). A statistic over no seed is None (valid JSON)."""
    from diffnas.genotype import Genotype

    metric = as_metric(metric)
    done = [r for r in records if not r.get("error")]

    def finished(key: str) -> list[float]:
        return [r[key] for r in done if r.get(key) is not None]

    accs, vals = finished("test_acc"), finished("search_val_acc")
    # what the search's validation accuracy measured (callbacks.search_val_acc): seeds
    # that measured differently (runs resumed across versions) make no statistic
    measures = sorted({r.get("search_val_measure") or "val_acc" for r in done
                       if r.get("search_val_acc") is not None})
    genos = [r["genotype"] for r in done if r.get("genotype") is not None]

    def stat(values: list[float]) -> dict[str, Any]:
        values = [v for v in values if math.isfinite(v)]  # (a NaN makes no statistic)
        mean, std = mean_std(values) if values else (None, None)
        return {"mean": mean, "std": std, "n": len(values)}

    return {
        "seeds": [r["seed"] for r in records],
        "n": len(records),
        "metric": metric.key,
        "metric_spec": dataclasses.asdict(metric),  # how summary_markdown writes it
        "test_acc": stat(accs),
        "test_ppl": stat(finished("test_ppl")),
        "search_val_ppl": stat(finished("search_val_ppl")),
        metric.key: mean_interval(stat(finished(metric.key))),
        search_field(metric): stat(finished(search_field(metric))),
        "search_val_acc": stat(vals if len(measures) <= 1 else []),
        "search_val_measures": measures,
        "runs": [{**r, "genotype_text": str(Genotype.from_dict(r["genotype"]))
                  if r.get("genotype") else None} for r in records],
        "op_frequency": op_frequency(genos),
        "search_seconds": stat(finished("search_seconds")),
        "retrain_seconds": stat(finished("retrain_seconds")),
        "failed": [r["seed"] for r in records if r.get("error")],
    }


def mean_interval(stat: dict[str, Any], level: float = 0.95) -> dict[str, Any]:
    """``stat`` (mean, std, n) with ``ci95``: Student's t interval of the mean over the
    seeds (None for fewer than two seeds or no spread), which at few seeds is far wider
    than mean +- std suggests."""
    from diffnas.report.stats import t_interval

    ok = stat["n"] >= 2 and stat["std"]
    ci = (list(t_interval(stat["mean"], stat["std"] / math.sqrt(stat["n"]), stat["n"] - 1,
                          level)) if ok else None)
    return {**stat, "ci95": ci}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown page (also printed by the command)."""
    from diffnas.engine.callbacks import SEARCH_VAL_MEASURES, counted, duration
    from diffnas.genotype import cell_title

    spec = summary.get("metric_spec")  # (a summary written before it: a built-in metric)
    metric = Metric(**spec) if spec else as_metric(summary.get("metric", "test_acc"))
    accuracy = metric.search_key == "val_acc"  # its search figure: callbacks.search_val_acc
    fmt = metric.text
    acc, title = summary[metric.key], metric.headline
    val = summary.get(search_field(metric)) or {"n": 0}
    lines = [f"# Multi-seed summary ({counted(summary['n'], 'seed')}: "
             f"{', '.join(map(str, summary['seeds']))})", ""]
    if acc["n"] == 1:
        lines.append(f"{title}: **{fmt(acc['mean'])}** (one seed: no spread to report)")
    elif acc["n"]:
        ci = acc.get("ci95")  # (a summary written before it: none)
        lines.append(f"{title}: **{fmt(acc['mean'])} +- {fmt(acc['std'])}** "
                     f"(mean +- sample std over {acc['n']} seeds"
                     + (f"; 95% CI of the mean {fmt(ci[0])} to {fmt(ci[1])}" if ci else "")
                     + ")")
    else:
        lines.append(f"{title}: none (retraining disabled or not finished)")
    measures = (summary.get("search_val_measures") or []) if accuracy else []
    what = f"{metric.search_name[:1].upper()}{metric.search_name[1:]}, last epoch" + (
        f" ({SEARCH_VAL_MEASURES[measures[0]]})" if len(measures) == 1 else "")
    if len(measures) > 1:
        lines.append(f"{what}: measured differently between seeds ("
                     f"{'; '.join(SEARCH_VAL_MEASURES[m] for m in measures)}): no statistic")
    elif val["n"] == 1:
        lines.append(f"{what}: {fmt(val['mean'])} (one seed)")
    elif val["n"]:
        lines.append(f"{what}: {fmt(val['mean'])} +- {fmt(val['std'])}")
    times = [f"{phase} {duration(summary[f'{key}_seconds']['mean'])}"
             for phase, key in (("search", "search"), ("retraining", "retrain"))
             if (summary.get(f"{key}_seconds") or {}).get("mean") is not None]
    if times:
        lines.append(f"Wall-clock time per seed (mean): {', '.join(times)}")
    if summary["failed"]:
        lines.append(f"FAILED or unfinished seeds: {summary['failed']} (the table says why; "
                     "they are left out of the statistics)")
    lines += ["", f"| seed | {metric.column} | {metric.search_column} | params | genotype |",
              "|---|---|---|---|---|"]
    for r in summary["runs"]:
        params = f"{r['params']:,}" if r.get("params") is not None else "-"
        lines.append(f"| {r['seed']} | {fmt(r.get(metric.key))} | "
                     f"{fmt(r.get(search_field(metric)))} | {params} | "
                     f"`{r.get('error') or r.get('genotype_text') or '-'}` |")
    for cell, edges in summary["op_frequency"].items():
        lines += ["", f"## {cell_title(cell)}: how often each op was chosen per edge", "",
                  "| edge (src->dst) | ops chosen (count over seeds) |", "|---|---|"]
        for edge, ops in edges.items():
            lines.append(f"| {edge} | {', '.join(f'{op} x{n}' for op, n in ops.items())} |")
    return "\n".join(lines) + "\n"


def write_summary(parent: str | Path, records: Sequence[dict[str, Any]],
                  metric: Metric | str = "test_acc") -> dict[str, Any]:
    from diffnas.engine.callbacks import finite_json

    summary = summarize(records, metric)
    atomic_write_text(json.dumps(finite_json(summary), indent=1, allow_nan=False) + "\n",
                      Path(parent) / "summary.json")
    atomic_write_text(summary_markdown(summary), Path(parent) / "summary.md")
    return summary


# --- many seeds ---------------------------------------------------------------------
def prepare_seeds(cfg: RunConfig, seeds: Sequence[int], parent: str | Path) -> list[Path]:
    """Create (or find) one run directory per seed under ``parent``."""
    from diffnas.config import save_config
    from diffnas.engine.rundir import mark_made_by

    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    known = read_seeds(parent)
    all_seeds = list(dict.fromkeys([*known, *seeds]))
    atomic_write_text(json.dumps({"seeds": all_seeds}) + "\n", parent / SEEDS_FILE)
    dirs = []
    for s in seeds:
        d = seed_dir(parent, s)
        if not (d / "config.yaml").is_file():
            d.mkdir(parents=True, exist_ok=True)
            save_config(dataclasses.replace(cfg, seed=s, out_dir=str(parent), name=d.name),
                        d / "config.yaml")
            mark_made_by(d, "search")
        dirs.append(d)
    return dirs


def run_seeds(cfg: RunConfig, seeds: Sequence[int], parent: str | Path,
              workers: int | None = None, echo: bool = True,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run every seed (``workers`` processes at a time, each with ``cores // workers``
    threads; ``workers=1`` runs in this process; ``overrides``: a resume's
    ``rundir.RESUME_OVERRIDES``, for every seed), then write and return the summary."""
    from diffnas.engine.rundir import load_run_config

    check_workers(workers)
    parent = Path(parent)
    dirs = prepare_seeds(cfg, seeds, parent)
    def finished(d: Path) -> bool:
        try:
            return is_finished(d, load_run_config(d, list(overrides)))
        except (ConfigError, KeyError, ValueError, OSError):  # its worker reports it
            return False

    pending = [d for d in dirs if not finished(d)]
    if workers is None:
        workers = default_workers(len(pending) or 1)
    threads = threads_per_worker(workers)
    say = print if echo else log.info
    say(f"{len(seeds)} seeds in {parent}: {len(dirs) - len(pending)} already done, "
        f"{len(pending)} to run with {workers} worker(s) x {threads} thread(s)")
    errors: dict[Path, str] = {}
    if workers == 1:
        for d in pending:
            try:
                run_seed(d, threads, overrides=overrides)
                say(f"  {d.name}: done")
            except Exception as exc:  # one failing seed must not lose the others
                with (d / "log.txt").open("a") as f:  # where a worker's would be: its log
                    f.write(traceback.format_exc())
                errors[d] = f"{type(exc).__name__}: {exc} (traceback in {d / 'log.txt'})"
                say(f"  {d.name}: FAILED ({errors[d]})")
    else:
        errors = _run_in_processes(pending, workers, threads, say, overrides)
    records = []  # every seed of the parent, also those run by earlier calls
    metric = seeds_metric(cfg)
    for s in read_seeds(parent):
        d = seed_dir(parent, s)
        try:
            rec = seed_record(d, s, metric)
        except (ValueError, KeyError, TypeError, OSError) as exc:  # (GenotypeError too)
            # one damaged seed must not keep the others' summary from being written
            rec = failed_record(d, s, errors.get(d) or str(exc), metric)
            records.append(rec)
            continue
        if d in errors:
            rec["error"] = errors[d]
        elif not finished(d):  # a seed of the parent that this call did not run
            rec["error"] = (f"not finished (not run by this call: continue it with --seeds "
                            f"{s} --resume {parent})")
        records.append(rec)
    return write_summary(parent, records, metric)


#: the line each start of a worker adds to its seed's worker.log
WORKER_HEADER = "--- worker started"


def _run_in_processes(dirs: Sequence[Path], workers: int, threads: int, say,
                      overrides: Sequence[str] = ()) -> dict[Path, str]:
    """Run ``python -m diffnas.engine.multiseed DIR`` for each dir, ``workers`` at a time.
    Ctrl-C, SIGTERM or SIGHUP stops the running workers first (each seed stays resumable:
    checkpoints are atomic); a worker whose parent dies anyway (SIGKILL) stops itself
    (:func:`_die_with_parent`)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    queue, running, errors = list(dirs), {}, {}
    with stop_signals_interrupt() as handlers:
        try:
            _schedule(queue, running, errors, workers, threads, env, say, overrides)
        except KeyboardInterrupt:  # also when only this process got the SIGINT (kill -INT)
            for sig in handlers:  # a second signal must not cut the clean-up short
                signal.signal(sig, signal.SIG_IGN)
            for proc, _ in running.values():
                proc.terminate()
            for proc, logf in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                logf.close()
            raise
    return errors


def _schedule(queue: list[Path], running: dict, errors: dict[Path, str], workers: int,
              threads: int, env: dict[str, str], say, overrides: Sequence[str] = ()) -> None:
    """Start workers from ``queue`` as slots free up until every one has ended."""
    while queue or running:
        while queue and len(running) < workers:
            d = queue.pop(0)
            logf = (d / "worker.log").open("a")  # a resumed seed keeps its earlier output
            logf.write(f"{WORKER_HEADER} {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
            logf.flush()
            cmd = [sys.executable, "-m", "diffnas.engine.multiseed", str(d), "--threads",
                   str(threads), "--parent-pid", str(os.getpid()),
                   *(a for o in overrides for a in ("--override", o))]
            # stdin: a pipe the worker watches; it reads end-of-file when this process ends
            running[d] = (subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=logf,
                                           stderr=subprocess.STDOUT, env=env), logf)
        time.sleep(0.2)
        for d, (proc, logf) in list(running.items()):
            if proc.poll() is None:
                continue
            logf.close()
            if proc.stdin is not None:
                proc.stdin.close()
            del running[d]
            if proc.returncode == 0:
                say(f"  {d.name}: done")
            else:
                lines = [ln for ln in (d / "worker.log").read_text().strip().splitlines()
                         if not ln.startswith(WORKER_HEADER)]
                tail = lines[-1:] or ["(no output)"]
                errors[d] = (f"worker exit code {proc.returncode}: {tail[0]} (see "
                             f"{d / 'worker.log'})")
                say(f"  {d.name}: FAILED ({errors[d]})")


def seeds_command(args: argparse.Namespace) -> int:
    """``diffnas search --seeds 0,1,2,3 [--workers N] [--config ...] [overrides]`` or
    ``--seeds ... --resume PARENT``."""
    from diffnas.config import check_run_files, load_config
    from diffnas.engine.rundir import load_run_config, new_run_dir

    seeds = parse_seeds(args.seeds)
    check_workers(args.workers)
    if args.resume:
        if args.config:
            raise ConfigError(f"--seeds ... --resume {args.resume} continues every seed with "
                              "its own config.yaml; drop --config")
        parent = Path(args.resume)
        if not (parent / SEEDS_FILE).is_file():  # never turn an ordinary run into a parent
            raise ConfigError(f"{parent} is not a multi-seed run (no {SEEDS_FILE}): continue "
                              f"an ordinary run with --resume {parent} without --seeds")
        cfg = load_run_config(parent, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if not args.resume:
        check_run_files(cfg)  # before the parent directory exists
        parent = new_run_dir(cfg, (Path(args.config).stem if args.config else "run") + "-seeds",
                             marks={SEEDS_FILE: json.dumps({"seeds": []}) + "\n"})
    args._run_dir = parent  # for the resume hint of an interrupted run (cli.main)
    from diffnas.engine.runlock import acquire_run_lock

    acquire_run_lock(parent)  # one multi-seed run per parent; freed as the command returns
    print(f"multi-seed run directory: {parent}")
    summary = run_seeds(cfg, seeds, parent, workers=args.workers,
                        overrides=args.overrides if args.resume else ())
    print()
    print(summary_markdown(summary))
    print(f"summary written to {parent / 'summary.md'} and {parent / 'summary.json'}")
    return 1 if summary["failed"] else 0


def _die_with_parent(parent: int) -> None:
    """End this worker (SIGTERM to itself) when the ``--seeds`` process that started it
    ends, even by SIGKILL: its seed would otherwise run on unwatched, holding the seed's
    lock, and a later ``--resume`` could not continue it. The parent holds the other end
    of this worker's stdin, so a thread reading it gets end-of-file when the parent ends,
    on any OS and through a venv launcher (Windows); Linux also tells at once
    (``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass
    if os.name == "posix" and os.getppid() != parent:  # it ended before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        try:  # the raw descriptor: a read blocked in sys.stdin's buffer would hold its lock
            fd = sys.stdin.fileno()  # and stop the interpreter's shutdown
            while os.read(fd, 4096):  # the parent writes nothing
                pass
        except (OSError, ValueError, AttributeError):  # no stdin to watch
            return
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="diffnas-parent-watch", daemon=True).start()


def _worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run one prepared seed directory (internal)")
    p.add_argument("run_dir")
    p.add_argument("--threads", type=int)
    p.add_argument("--parent-pid", type=int, help="end when this process ends")
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args(argv)
    if a.parent_pid:
        _die_with_parent(a.parent_pid)
    rec = run_seed(a.run_dir, a.threads, a.override)
    print(json.dumps({k: v for k, v in rec.items()  # the seed and its figures (worker.log)
                      if k == "seed" or (k.startswith(("test_", "search_val_")) and
                                         _number(v))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main())
