"""Lambda sweep: search with the latency penalty at several strengths, retrain each
derived architecture briefly, measure it, and plot accuracy against measured latency."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffnas.config import ConfigError, load_config, save_config, to_dict
from diffnas.data import load_dataset
from diffnas.engine.callbacks import counted
from diffnas.engine.checkpoint import atomic_write_text, staged_path
from diffnas.engine.logs import LOG_FORMAT
from diffnas.engine.retrain import run_retrain
from diffnas.engine.rundir import made_by, mark_made_by, record_plugins
from diffnas.engine.runlock import LOCK_FILE, acquire_run_lock, release_run_lock
from diffnas.engine.search import load_search_data, run_search
from diffnas.genotype import Genotype
from diffnas.hardware.costs import predictor_mismatch
from diffnas.hardware.dataset import anchor_genotype, encode_indices, one_hot
from diffnas.hardware.latency import (
    LatencySettings,
    device_fingerprint,
    measure_many,
    settings_dict,
)
from diffnas.hardware.predictor import LatencyPredictor
from diffnas.spaces import DataShape, create_space

log = logging.getLogger("diffnas")


def _with_penalty(cfg, lam: float, predictor: str):
    """``cfg`` with one latency penalty of weight ``lam`` (none at 0) and ``predictor``;
    the config's own latency settings (``input``, ``normalize``) are kept."""
    c = copy.deepcopy(cfg)
    strategy = dict(c.search.strategy)
    penalties = strategy.get("penalties", [])
    own = next((p for p in penalties if p.get("name") == "latency"), {})
    others = [p for p in penalties if p.get("name") != "latency"]
    if lam > 0:
        others.append({**own, "name": "latency", "predictor": str(predictor), "lam": lam})
    strategy["penalties"] = others
    c.search.strategy = strategy
    return c


#: the sha256 of the predictor file a lambda's run searched with (beside its config.yaml)
PREDICTOR_DIGEST = "predictor.sha256"
#: where and how a run executes: not what it computes, so not compared on reuse
_RUN_ONLY = ("device", "progress", "plots", "logger")


def _computed(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the settings of where a run executes, predictor paths
    resolved (a relative and an absolute path to one file are one predictor)."""
    out = {k: v for k, v in cfg.items() if k not in _RUN_ONLY}
    strategy = dict(out["search"]["strategy"])
    strategy["penalties"] = [
        {**p, "predictor": str(Path(p["predictor"]).resolve())} if "predictor" in p else p
        for p in strategy.get("penalties", [])]
    out["search"] = {**out["search"], "strategy": strategy}
    return out


def _check_reusable(run_dir: Path, cfg: Any, digest: str) -> None:
    """A run under ``run_dir`` from an earlier sweep is reused only if it computes what
    this sweep would: the same settings and the same predictor file (its content)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    before = _computed(to_dict(load_config(saved, device=False, saved=True)))
    now = _computed(to_dict(cfg))
    if before != now:
        from diffnas.report.compare import flat

        a, b = flat(before), flat(now)
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        said = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys[:5])
        raise ValueError(
            f"{run_dir} holds a run made with other settings ({said}"
            f"{'; ...' if len(keys) > 5 else ''}: its config.yaml differs from this sweep's "
            "config, overrides or predictor): sweep into another --out, or delete it to run "
            "it again")
    recorded = run_dir / PREDICTOR_DIGEST
    if recorded.is_file() and recorded.read_text().strip() != digest:
        raise ValueError(f"{run_dir} searched with another version of the predictor file "
                         "(it was refitted since): sweep into another --out, or delete the "
                         "run to search again")


@contextlib.contextmanager
def _hold_runs(run_dirs: list[Path]) -> Iterator[None]:
    """Hold every lambda's run directory with the run lock ``search --resume`` takes, for
    the whole sweep: a resume of one of them, or a second sweep into the same ``--out``,
    is refused (naming the holder) instead of mixing its metrics and checkpoints. On a
    refusal the directories this call made (holding nothing but the lock) are removed."""
    made: list[Path] = []
    held: list[Path] = []
    try:
        for run_dir in run_dirs:
            if not run_dir.is_dir():
                run_dir.mkdir(parents=True, exist_ok=True)
                made.append(run_dir)
            acquire_run_lock(run_dir)
            held.append(run_dir)
    except BaseException:
        for run_dir in reversed(held):
            if run_dir in made:  # (emptied while still held: no one else locks it meanwhile)
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            release_run_lock(run_dir)
        raise
    try:
        yield
    finally:
        for run_dir in held:
            release_run_lock(run_dir)


@contextlib.contextmanager
def _sweep_logging() -> Iterator[None]:
    """Let the sweep's progress (and the engine's epoch lines) through while it runs: the
    ``diffnas`` logger at INFO, and a console handler when it has none of its own; the
    logger is left as it was found afterwards."""
    logger = logging.getLogger("diffnas")
    level = logger.level
    console = None
    if not logger.handlers:
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(*LOG_FORMAT))
        logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        if console is not None:
            logger.removeHandler(console)


@contextlib.contextmanager
def _log_to(run_dir: Path) -> Iterator[None]:
    """Also write the log to ``run_dir/log.txt`` (appended, as a resumed run's) while the
    block runs (unless the log already goes there: an earlier command in this process)."""
    logger = logging.getLogger("diffnas")
    path = (run_dir / "log.txt").resolve()
    if any(Path(h.baseFilename).resolve() == path for h in logger.handlers
           if getattr(h, "baseFilename", None)):  # (resolved: a path through a symlink)
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(*LOG_FORMAT))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _open_run(run_dir: Path, cfg: Any, digest: str) -> None:
    """Make ``run_dir`` a search run as ``diffnas search`` would: its config (after the
    predictor's digest), ``made_by.txt`` (so ``--resume``, report and plot take it for a
    search run) and the plugins' sources; a run of an earlier sweep keeps its own."""
    if not (run_dir / "config.yaml").is_file():  # (the digest first: a config.yaml
        # without the digest beside it would let a refitted predictor's run be reused)
        atomic_write_text(digest + "\n", run_dir / PREDICTOR_DIGEST)
        save_config(cfg, run_dir / "config.yaml")
        record_plugins(run_dir, cfg)
    if made_by(run_dir) is None:  # (also a run of a sweep from before it was recorded)
        mark_made_by(run_dir, "search")


def run_sweep(
    config: str, overrides: list[str], predictor: str, lambdas: list[float], out: Path,
    settings: LatencySettings | None = None,
) -> list[dict[str, Any]]:
    """One search + retrain per lambda (reusing finished runs under ``out``), then the
    derived networks are measured together (interleaved) and a table and plot written."""
    settings = settings or LatencySettings()
    if not lambdas:
        raise ValueError("--lambdas names no value: give at least one (e.g. 0,0.1,0.3,1)")
    lambdas = [lam + 0.0 for lam in lambdas]  # (-0.0 is 0.0: one directory, lam0)
    bad = [lam for lam in lambdas if not (math.isfinite(lam) and lam >= 0)]
    if bad:
        raise ValueError(f"--lambdas {bad}: each must be finite and >= 0 (0: no penalty)")
    if len({f"{lam:g}" for lam in lambdas}) != len(lambdas):
        raise ValueError(f"--lambdas {lambdas}: a value is repeated, or two agree in their "
                         "first 6 significant digits (they name the run directories "
                         "lam<value>)")
    base = load_config(config, overrides)
    if not base.retrain.enabled:  # each lambda's accuracy is its retrained genotype's
        raise ConfigError("latency sweep retrains each lambda's genotype to plot accuracy "
                          "against latency, but the config says retrain.enabled=false: set "
                          "retrain.enabled=true (and retrain.epochs, retrain.train_subset, "
                          "retrain.network to the size you want)")
    predictor = str(Path(predictor).resolve())  # as the runs record it
    digest = hashlib.sha256(Path(predictor).read_bytes()).hexdigest() \
        if Path(predictor).is_file() else ""
    # every earlier run under ``out`` is checked before any work starts
    runs = {lam: (out / f"lam{lam:g}", _with_penalty(base, lam, predictor)) for lam in lambdas}
    for run_dir, cfg in runs.values():
        _check_reusable(run_dir, cfg, digest)
    pred = LatencyPredictor.load(predictor)  # a missing or damaged one leaves no --out behind
    pred.check_space(create_space(base.search.space))  # (edges and ops need no data shape)
    out.mkdir(parents=True, exist_ok=True)
    # held until the sweep returns: refused here, before any data is read, when another
    # process (a sweep, a search --resume) computes in one of these runs
    with _hold_runs([run_dir for run_dir, _ in runs.values()]), _sweep_logging():
        rows, measured = _sweep_runs(base, runs, pred, digest, settings, out)
        mismatch = measured.pop("predictor_mismatch")
        summary = {"rows": rows, **measured, "config": config, "overrides": overrides,
                   "predictor": str(predictor), "predictor_mismatch": mismatch}
        atomic_write_text(json.dumps(summary, indent=1) + "\n", out / "sweep.json")
        atomic_write_text(sweep_page(rows, mismatch), out / "sweep.md")
        plot(rows, out / "sweep.png", sweep_title(base))
        log.info("sweep: wrote %s, sweep.md and sweep.png", out / "sweep.json")
    print(table(rows))
    return rows


def _sweep_runs(
    base: Any, runs: dict[float, tuple[Path, Any]], pred: LatencyPredictor, digest: str,
    settings: LatencySettings, out: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The locked part of :func:`run_sweep`: each lambda's search and retraining (logged,
    also to its ``log.txt``), then the derived networks timed together; the rows and the
    summary's timing fields."""
    search_data = load_search_data(base)
    d, r = base.data, base.retrain
    retrain_data = load_dataset(d.name, d.root, d.download, d.resolution, r.train_subset,
                                d.test_subset, base.seed)
    shape = DataShape(retrain_data.in_channels, retrain_data.resolution,
                      retrain_data.num_classes)
    space = create_space(base.search.space, shape)
    network = space.network_settings(
        {k: v for k, v in base.retrain.network.items() if k != "auxiliary"})
    input_shape = (shape.in_channels, shape.resolution, shape.resolution)
    device = device_fingerprint("cpu", settings.threads)
    # said before the searches: measured and predicted latencies will not be comparable
    mismatch = predictor_mismatch(pred.meta, device, {
        **settings_dict(settings), "input_shape": list(input_shape), "network": network})
    if mismatch:
        log.warning("the latency predictor was fitted on records measured otherwise (%s): "
                    "the sweep's measured and predicted latencies are not comparable",
                    mismatch)
    log.info("sweep: %s (%s) into %s", counted(len(runs), "lambda"),
             ", ".join(f"{lam:g}" for lam in runs), out)
    rows = []
    for i, (lam, (run_dir, cfg)) in enumerate(runs.items(), 1):
        _open_run(run_dir, cfg, digest)
        with _log_to(run_dir):
            rows.append(_lambda_row(lam, f"{i}/{len(runs)}", run_dir, cfg, pred, space,
                                    search_data, retrain_data))
    log.info("sweep: timing the %s derived networks with the anchor (%s, %s)",
             len(rows), f"{settings.repeats} repeats", f"{settings.clock} clock")
    models = [space.build_network(Genotype.from_dict(row["genotype"]), **network)
              for row in rows]
    # timed interleaved with the dataset's anchor network, so the load-corrected latency
    # (ratio to the anchor times the anchor's median over the dataset) is comparable with
    # what the predictor was fitted on
    anchor = space.build_network(anchor_genotype(space), **network)
    *stats, anchor_stats = measure_many([*models, anchor], input_shape, settings)
    anchor_ref = pred.meta.get("anchor_ms_median")
    for row, st in zip(rows, stats, strict=True):
        ratio = statistics.median(
            a / b for a, b in zip(st.samples_ms, anchor_stats.samples_ms, strict=True))
        row.update(measured_ms=st.median_ms, measured_q25_ms=st.q25_ms,
                   measured_q75_ms=st.q75_ms,
                   anchored_ms=ratio * anchor_ref if anchor_ref else None)
    return rows, {"settings": vars(settings), "network": network, "device": device,
                  "predictor_mismatch": mismatch or None}


def _lambda_row(
    lam: float, which: str, run_dir: Path, cfg: Any, pred: LatencyPredictor, space: Any,
    search_data: Any, retrain_data: Any,
) -> dict[str, Any]:
    """Search (or reuse the finished search of) ``run_dir``, retrain its genotype (or
    reuse the result), and return the lambda's row before timing; ``which`` ("2/4")
    words the log lines."""
    if (run_dir / "search" / "DONE").exists():
        log.info("lambda %g (%s): search finished earlier, reused from %s", lam, which,
                 run_dir)
        genotype = Genotype.load(run_dir / "search" / "genotype.json")
    else:  # (continues a stopped search from its checkpoint)
        log.info("lambda %g (%s): search in %s", lam, which, run_dir)
        genotype = run_search(cfg, run_dir, resume=True, data=search_data).genotype
    # the softmax weights at the end of the search (the last alphas.jsonl record)
    final = json.loads((run_dir / "search" / "alphas.jsonl").read_text().splitlines()[-1])
    with torch.no_grad():
        relaxed = float(pred({g: torch.tensor(final[g]) for g in pred.shapes}))
    result_file = run_dir / "retrain" / "result.json"
    if result_file.exists():
        log.info("lambda %g (%s): retraining finished earlier, reused", lam, which)
        acc = json.loads(result_file.read_text())["test_acc"]
    else:
        log.info("lambda %g (%s): retraining its genotype in %s", lam, which,
                 run_dir / "retrain")
        acc = run_retrain(cfg, genotype, run_dir, resume=True,
                          data=retrain_data)["test_acc"]
        from diffnas.report.plots import plots_after_run

        plots_after_run(run_dir, cfg)  # as an ordinary run ends
    with torch.no_grad():
        predicted = float(pred(one_hot(encode_indices(genotype, space), space)))
    log.info("lambda %g (%s): test accuracy %.4f, predicted latency %.2f ms", lam, which,
             acc, predicted)
    return {"lambda": lam, "test_acc": acc, "predicted_ms": predicted,
            "predicted_outside_fitted_range": pred.outside_fitted_range(predicted),
            "relaxed_predicted_ms": relaxed, "genotype": genotype.to_dict(),
            "genotype_text": str(genotype)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| lambda | test accuracy | measured latency, ms (median [q25, q75]) | "
             "measured, anchored (ms) | predicted latency (ms) |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        anchored = "-" if r.get("anchored_ms") is None else f"{r['anchored_ms']:.2f}"
        outside = " (outside the fitted range)" if r.get("predicted_outside_fitted_range") \
            else ""
        lines.append(f"| {r['lambda']:g} | {100 * r['test_acc']:.2f}% | "
                     f"{r['measured_ms']:.2f} [{r['measured_q25_ms']:.2f}, "
                     f"{r['measured_q75_ms']:.2f}] | {anchored} | "
                     f"{r['predicted_ms']:.2f}{outside} |")
    return "\n".join(lines)


def sweep_page(rows: list[dict[str, Any]], mismatch: str | None) -> str:
    """``sweep.md``: the table, and under it what makes its predicted and measured
    latencies incomparable when the predictor's records were measured otherwise."""
    note = (f"\nThe latency predictor was fitted on records measured otherwise ({mismatch}): "
            "its predictions are not for the measured latencies above.\n" if mismatch else "")
    return table(rows) + "\n" + note


def sweep_title(cfg: Any) -> str:
    """The plot title of a sweep of ``cfg``: its search strategy, space and dataset."""
    strategy = dict(cfg.search.strategy).get("name", "darts")  # the config's defaults
    space = dict(cfg.search.space).get("name", "darts_cnn")
    return f"Latency-penalised {strategy} ({space}) on {cfg.data.name}"


def plot(rows: list[dict[str, Any]], path: Path,
         title: str = "Latency-penalised search") -> None:
    """Accuracy against measured (and predicted) latency, one point per lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [r["measured_ms"] for r in rows]
    ys = [100 * r["test_acc"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", label="measured (median)")
    if all(r.get("anchored_ms") for r in rows):
        ax.plot([r["anchored_ms"] for r in rows], ys, "^--", color="tab:green", alpha=0.7,
                label="measured, anchored to the dataset")
    ax.plot([r["predicted_ms"] for r in rows], ys, "s", mfc="none", color="tab:orange",
            label="predicted")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"λ={r['lambda']:g}", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("latency of the derived network (ms; measured: median)")
    ax.legend(loc="best", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with staged_path(path) as staged:  # (matplotlib picks the format by the suffix)
        fig.savefig(staged, dpi=120)
    plt.close(fig)
