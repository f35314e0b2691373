"""``diffnas compare RUN [RUN ...]``: runs side by side, as a researcher compares methods.

Each RUN is a run directory (``diffnas search`` or ``diffnas train``) or a ``--seeds``
parent. One table gives each run's method, its seeds, the retrained figure its engine is
judged by (mean +- sample std over the finished seeds), the search's validation figure,
parameters, MACs and the wall-clock seconds of search and retraining (``metrics.jsonl``
rows' ``seconds``), and each run's difference to the first with its standard error, its
confidence interval and a permutation test's p-value (:mod:`diffnas.report.stats`),
Holm-adjusted when several runs are compared with the first, and which comparisons have
too few seeds to show a clear difference whatever their figures.
Below it, what else differs between the runs' configs and data, since a comparison is
fair only when the method is all that differs, and the genotypes each run found.
With ``--out DIR`` it writes ``compare.md``, ``compare.json`` and a strip plot
(``compare.png``, ``compare.svg``) of every seed's figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffnas.config import RunConfig, to_dict
from diffnas.engine.callbacks import counted, duration, finite_json, read_json
from diffnas.engine.engines import Metric, engine_settings
from diffnas.engine.multiseed import (
    failed_record,
    mean_std,
    read_seeds,
    search_field,
    seed_dir,
    seed_record,
    seeds_metric,
)
from diffnas.engine.rundir import load_run_config, recorded_threads, run_kind, same_data
from diffnas.report.stats import (
    holm,
    relabel_p,
    sign_flip_p,
    smallest_relabel_p,
    smallest_sign_flip_p,
    t_interval,
    welch_df,
)

#: the marker that tells a file ``diffnas compare`` wrote (replaced on the next run)
COMPARE_MARK = "diffnas compare"
#: config keys that say where and how a run ran, never what it computed
NOT_SETTINGS = ("seed", "name", "out_dir", "progress", "plots", "logger", "plugins", "device",
                "data.root")
#: the strategy and space a section without ``name`` means
DEFAULT_NAMES = {"strategy": "darts", "space": "darts_cnn"}
#: config keys that make up the method under comparison
METHOD_KEYS = ("search.strategy", "search.discretizer")
#: the confidence level of the intervals, and the significance level: a difference is
#: clear where its p < ALPHA (written out, as ``1 - LEVEL`` is 0.050000000000000044 in
#: floating point and a p of exactly 0.05, e.g. 1 seed against 19, would pass it)
LEVEL, ALPHA = 0.95, 0.05


class CompareError(ValueError):
    """Runs that cannot be compared (another kind of task, the same run twice, ...)."""


@dataclass
class Entry:
    """One compared run: its config, its seeds' records, and what its files say."""

    label: str
    path: Path
    kind: str  # "search" or "train"
    cfg: RunConfig
    metric: Metric
    records: list[dict[str, Any]] = field(default_factory=list)
    data: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # seed -> phase
    threads: int | None = None


# --- reading the runs ------------------------------------------------------------------
def _record(run_dir: Path, seed: int, metric: Metric) -> dict[str, Any]:
    try:
        return seed_record(run_dir, seed, metric)  # (with each phase's seconds)
    except ValueError as exc:  # a damaged file: the row says why, the others still compare
        return failed_record(run_dir, seed, str(exc), metric)


def _data_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each phase's ``data.json`` (what it computed on: shapes, label hashes), by phase."""
    out = {}
    for phase in ("search", "retrain"):
        path = run_dir / phase / "data.json"
        try:
            if path.is_file():
                out[phase] = read_json(path, "")
        except ValueError:  # damaged: not compared
            pass
    return out


def data_differences(records: Sequence[dict[int, dict[str, dict[str, Any]]]],
                     labels: Sequence[str]) -> list[dict[str, Any]]:
    """Where a run's data (per seed and phase, :func:`_data_records`) differ from the data
    of the first run that recorded that phase, compared at the same seed (the smallest both
    ran: a seed draws its subsets), or at each one's smallest where they share none:
    ``{"run", "phase", "fields", "against"}``."""
    out = []
    for phase in ("search", "retrain"):
        have = [(label, {s: r[phase] for s, r in by_seed.items() if phase in r})
                for label, by_seed in zip(labels, records)]
        have = [(label, by_seed) for label, by_seed in have if by_seed]
        for label, by_seed in have[1:]:
            first = have[0][1]
            common = sorted(set(first) & set(by_seed))
            a, b = (first[common[0]], by_seed[common[0]]) if common else \
                (first[min(first)], by_seed[min(by_seed)])
            fields = same_data(a, b)
            if fields:
                out.append({"run": label, "phase": phase, "fields": fields,
                            "against": have[0][0]})
    return out


def load_entry(path: str | Path, overrides: Sequence[str] = ()) -> Entry:
    """The run (or ``--seeds`` parent) at ``path`` as an :class:`Entry`; ``overrides``:
    ``plugins=[...]`` where its plugins are now."""
    path = Path(path)
    seeds = read_seeds(path) if path.is_dir() else []
    dirs = [seed_dir(path, s) for s in seeds] if seeds else [path]
    kind = run_kind(path) or next((k for k in map(run_kind, dirs) if k), None) or "search"
    cfg = load_run_config(path, list(overrides), device=False, search=kind == "search")
    metric = seeds_metric(cfg)
    entry = Entry(path.name or str(path), path, kind, cfg, metric)
    entry.records = [_record(d, s, metric) for d, s in zip(dirs, seeds or [cfg.seed])]
    entry.data = {s: _data_records(d) for d, s in zip(dirs, seeds or [cfg.seed])}
    try:
        entry.threads = recorded_threads(dirs[0]) if dirs[0].is_dir() else None
    except ValueError:  # a damaged threads.json: the count is not known
        entry.threads = None
    return entry


# --- the comparison ----------------------------------------------------------------------
def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"search.strategy.order": 1, ...}`` (an empty section
    stays one key)."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _under(key: str, roots: Sequence[str]) -> bool:
    return any(key == r or key.startswith(r + ".") for r in roots)


def resolved_config(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as a plain dict whose strategy, space, retrain network, ``engine`` and ``lm``
    sections hold every setting, their defaults included (a run that left ``order: 1``
    out and one that wrote it ran the same method); a section that cannot be resolved (a
    plugin no longer registered) stays as written."""
    from diffnas.spaces.registry import network_config, space_config, space_engine
    from diffnas.strategies.registry import strategy_config

    out = to_dict(cfg)
    search, retrain = out["search"], out["retrain"]
    for section, resolve, where in (
            ("strategy", strategy_config, search), ("space", space_config, search)):
        try:
            where[section] = {"name": where[section].get("name", DEFAULT_NAMES[section]),
                              **to_dict(resolve(where[section]))}
        except (ValueError, KeyError, TypeError):
            pass
    try:
        net = network_config(cfg.search.space, cfg.retrain.network)
        if net is not None:
            retrain["network"] = to_dict(net)
    except (ValueError, KeyError, TypeError):
        pass
    try:  # a plugin engine's own settings (Engine.settings)
        settings = engine_settings(cfg)
        if settings is not None:
            out["engine"] = to_dict(settings)
    except (ValueError, KeyError, TypeError):
        pass
    try:  # a language model's section (a run of another engine leaves it empty)
        if cfg.lm or space_engine(cfg.search.space) == "language_model":
            from diffnas.engine.lm import lm_config

            out["lm"] = to_dict(lm_config(cfg))
    except (ValueError, KeyError, TypeError):
        pass
    return out


def config_differences(cfgs: Sequence[RunConfig], searched: Sequence[bool] | None = None
                       ) -> dict[str, list[Any]]:
    """Each config key (dotted) whose value is not the same in every config, with each
    config's value (None where a config lacks the key: another strategy has no such
    setting), defaults filled in (:func:`resolved_config`). A key is compared among the
    configs that hold it (GDAS's ``tau`` against no other strategy's), and keys that say
    only where and how a run ran (:data:`NOT_SETTINGS`) are left out. ``searched[i]``
    False: config ``i`` is a ``diffnas train`` run's, whose ``search.*`` settings were
    never read (None there, and compared among the searches alone)."""
    searched = list(searched) if searched is not None else [True] * len(cfgs)
    flats = [{k: v for k, v in flat(resolved_config(c)).items()
              if ran or not _under(k, ("search",))} for c, ran in zip(cfgs, searched)]
    keys = sorted({k for f in flats for k in f if not _under(k, NOT_SETTINGS)})

    def differs(key: str) -> bool:  # among the configs that hold the key
        values = [f[key] for f, ran in zip(flats, searched)
                  if key in f and (ran or not _under(key, ("search",)))]
        return any(v != values[0] for v in values[1:])

    return {k: [f.get(k) for f in flats] for k in keys if differs(k)}


def method_text(entry: Entry) -> str:
    """The method a run stands for: its strategy and those of the strategy's plain
    settings that are not its defaults (``order: 1`` written out or left out is the same
    DARTS; nested settings, e.g. the optimizers, are in the differences), or the genotype
    a ``diffnas train`` run retrained."""
    from diffnas.strategies.registry import strategy_config

    if entry.kind != "search":
        return "train (a given genotype)"
    strategy = dict(entry.cfg.search.strategy)
    name = strategy.pop("name", "darts")
    try:  # (a plugin strategy no longer registered: its settings as written)
        defaults = to_dict(strategy_config({"name": name}))
        strategy = {k: v for k, v in to_dict(strategy_config(entry.cfg.search.strategy)).items()
                    if v != defaults.get(k)}
    except (ValueError, KeyError, TypeError):
        pass
    plain = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in strategy.items()
             if not isinstance(v, dict | list)]
    rule = entry.cfg.search.discretizer
    return " ".join([str(name), *plain, *([f"discretizer={rule}"] if rule else [])])


def _stat(values: Sequence[float | None]) -> dict[str, Any]:
    kept = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    mean, std = mean_std(kept)
    return {"mean": mean, "std": std, "n": len(kept)}


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """``b``'s mean minus ``a``'s (the figures of two runs' finished seeds, unpaired): its
    standard error sqrt(sa^2/na + sb^2/nb) and Welch's :data:`LEVEL` confidence interval
    (None unless both have two seeds or more), and the p-value of a permutation test over
    the ways to split the pooled figures (:func:`~diffnas.report.stats.relabel_p`);
    None without a figure on both sides."""
    if not a or not b:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    out = {"diff": mb - ma, "se": None, "df": None, "ci": None, "paired": 0,
           "seeds": [len(a), len(b)],
           "test": "permutation of the runs' labels", "p": relabel_p(a, b),
           "smallest_p": smallest_relabel_p(len(a), len(b))}
    if sa is not None and sb is not None:
        se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
        df = welch_df(sa, len(a), sb, len(b))
        out.update(se=se, df=df, ci=_interval(mb - ma, se, df))
    return out


def _interval(mean: float, se: float, df: float | None) -> list[float] | None:
    """The t interval, or None where the figures have no spread at all (every seed the
    same, or one test image apart on every seed): a zero-width interval would read as
    certainty that seeds this few cannot give."""
    return None if se == 0 or df is None else list(t_interval(mean, se, df, LEVEL))


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """``b`` minus ``a`` seed by seed (``{seed: figure}`` of two runs' finished seeds) over
    the seeds both finished, when there are two or more: the mean of the differences, its
    standard error (their sample std / sqrt(n)), which leaves out what the seeds share
    (the data subset a seed draws, and the initial weights on one space), Student's
    :data:`LEVEL` confidence interval at n - 1 degrees of freedom, and the p-value of a
    sign-flip permutation test (:func:`~diffnas.report.stats.sign_flip_p`), whose
    smallest possible value counts only the seeds that differ (a tie flips to itself);
    else None."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [b[s] - a[s] for s in common]
    mean, std = mean_std(d)
    se = std / math.sqrt(len(d))
    differing = sum(x != 0 for x in d)
    return {"diff": mean, "se": se, "df": len(d) - 1,
            "ci": _interval(mean, se, len(d) - 1), "paired": len(d),
            "seeds": [len(a), len(b)],
            "test": "sign flips of the per-seed differences", "p": sign_flip_p(d),
            "differing": differing, "smallest_p": smallest_sign_flip_p(differing)}


def _adjust(rows: Sequence[dict[str, Any]]) -> None:
    """Holm's adjustment of the rows' p-values over all comparisons with the first run
    (``p_holm``), and whether each difference is clear at :data:`ALPHA` by it."""
    tested = [r["vs_first"] for r in rows if r.get("vs_first")]
    for d, p in zip(tested, holm([d["p"] for d in tested])):
        d["p_holm"] = p
        d["clear"] = p < ALPHA


def genotype_differences(entries: Sequence[Entry]) -> list[str] | None:
    """What ``diffnas train`` runs were given to retrain, where that differs between the
    runs (it is their method): a published name, else a short digest of the genotype
    (the genotypes section shows it whole); a search run's is its outcome, "searched".
    None where no train run is compared or all were given the same."""
    if not any(e.kind == "train" for e in entries):
        return None
    names = [_genotype_name(e.records[0].get("genotype")) if e.kind == "train" else "searched"
             for e in entries]
    return names if len(set(names)) > 1 else None


def _genotype_name(genotype: dict[str, Any] | None) -> str:
    import hashlib

    from diffnas.genotype import published_genotype
    from diffnas.genotype.published import PUBLISHED

    if genotype is None:
        return "unknown"
    for name in PUBLISHED:
        if published_genotype(name).to_dict() == genotype:
            return name
    text = json.dumps(genotype, sort_keys=True)
    return f"genotype {hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _by_seed(records: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: float(r[key]) for r in records if not r.get("error")
            and isinstance(r.get(key), int | float) and math.isfinite(r[key])}


def compare(entries: Sequence[Entry]) -> dict[str, Any]:
    """The comparison of ``entries`` (the first is the baseline of the differences) as a
    plain dict: what ``compare.json`` holds and :func:`compare_markdown` writes out."""
    if not entries:
        raise CompareError("compare needs at least one run")
    paths = [e.path.resolve() for e in entries]
    twice = sorted({str(p) for p in paths if paths.count(p) > 1})
    if twice:
        raise CompareError(f"{', '.join(twice)}: given more than once; compare each run once")
    metrics = {e.metric.key for e in entries}
    if len(metrics) > 1:
        said = ", ".join(f"{e.label} by {e.metric.key}" for e in entries)
        raise CompareError(f"these runs are judged by different figures ({said}): compare "
                           "runs of one kind of task")
    metric = entries[0].metric
    labels = [e.label for e in entries]
    if len(set(labels)) < len(labels):  # same folder names in other places: their paths
        labels = [str(e.path) for e in entries]
    rows = []
    for label, e in zip(labels, entries):
        readable = [r for r in e.records if not r.get("error")]
        finite = _by_seed(readable, metric.key)
        finished = [r for r in readable if r["seed"] in finite]
        done = finished or readable  # (a search without retraining: its search figures)

        def values(key: str, done: list[dict[str, Any]] = done) -> list[Any]:
            return [r.get(key) for r in done]

        rows.append({
            "label": label, "path": str(e.path), "kind": e.kind, "method": method_text(e),
            "seeds": [r["seed"] for r in e.records],
            "finished": len(finished),
            "failed": [r["seed"] for r in e.records if r.get("error")],
            "not_finite": {str(r["seed"]): r[metric.key] for r in readable  # (ints are)
                           if isinstance(r.get(metric.key), float)
                           and not math.isfinite(r[metric.key])},
            metric.key: _stat(values(metric.key)),
            "search_val": _stat(values(search_field(metric))),
            "params": _stat(values("params")), "macs": _stat(values("macs")),
            "search_seconds": _stat(values("search_seconds")),
            "retrain_seconds": _stat(values("retrain_seconds")),
            "device": e.cfg.device, "threads": e.threads,
            "runs": [{"seed": r["seed"], "run_dir": r["run_dir"], metric.key: r.get(metric.key),
                      "genotype": r.get("genotype"), "error": r.get("error")}
                     for r in e.records],
        })
    base_seeds = _by_seed(entries[0].records, metric.key)
    for row, e in zip(rows[1:], entries[1:]):
        seeds = _by_seed(e.records, metric.key)
        same_design = set(row["seeds"]) == set(rows[0]["seeds"])  # the same seeds: paired
        row["vs_first"] = ((paired_difference(base_seeds, seeds) if same_design else None)
                           or difference(list(base_seeds.values()), list(seeds.values())))
    _adjust(rows[1:])
    differs = config_differences([e.cfg for e in entries], [e.kind == "search" for e in entries])
    method = {k: v for k, v in differs.items() if _under(k, METHOD_KEYS)}
    retrained = genotype_differences(entries)
    if retrained:  # a train run's method is the genotype it was given
        method["genotype (given to diffnas train)"] = retrained
    return {
        "generator": COMPARE_MARK,
        "metric": metric.key,
        "metric_spec": dataclasses.asdict(metric),  # how compare_markdown writes it
        "runs": rows,
        "method_differences": method,
        "setting_differences": {k: v for k, v in differs.items() if not _under(k, METHOD_KEYS)},
        "data_differs": data_differences([e.data for e in entries], labels),
        "data_unknown": [label for label, e in zip(labels, entries)
                         if not any(e.data.values())],
        "seeds_differ": len({frozenset(r["seeds"]) for r in rows}) > 1,  # (in any order)
        "timing_differs": len({(r["device"], r["threads"]) for r in rows if _timed(r)}) > 1,
    }


def _timed(row: dict[str, Any]) -> bool:
    """Whether a row has a time of either phase (runs made before times were recorded
    have none)."""
    return any(row[f"{phase}_seconds"]["n"] for phase in ("search", "retrain"))


# --- writing it out ------------------------------------------------------------------
def _mean_text(stat: dict[str, Any], fmt: Any) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt(stat["mean"])
    return text if stat["std"] is None else f"{text} +- {fmt(stat['std'])}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|")


def compare_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown page (also printed by the command)."""
    metric = Metric(**summary["metric_spec"])
    rows = summary["runs"]
    lines = [f"# Comparison of {len(rows)} run{'s' if len(rows) != 1 else ''}: "
             f"{metric.headline.lower()}", "",
             f"{metric.headline} and {metric.search_name} (last epoch): mean +- sample std "
             "over each run's finished seeds. diff vs first: the run's mean minus the first "
             f"run's, +- its standard error, with its {LEVEL:.0%} confidence interval (Student's "
             "t) and the p-value of a permutation test (no normal distribution assumed); "
             "paired seed by seed where both runs were given the same seeds, over those both "
             "finished (the error of the mean difference; sign flips of the differences), "
             "else unpaired (sqrt(s1^2/n1 + "
             "s2^2/n2), Welch's interval; relabelings of the pooled seeds)"
             + (", p Holm-adjusted over the comparisons with the first run" if len(rows) > 2
                else "")
             + f". Clear: p < {ALPHA:g}. Times: wall-clock time of each phase per seed "
             "(mean), as its metrics.jsonl recorded it.",
             "",
             f"| run | method | seeds | {metric.column}"
             f"{' (lower is better)' if metric.lower_is_better else ''} | diff vs first | "
             f"{metric.search_column} | params | MACs | search time | retrain time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        seeds = f"{r['finished']}/{len(r['seeds'])}"
        delta = "(baseline)" if i == 0 else _delta_text(rows[0], r, metric, len(rows) > 2)
        lines.append(
            f"| {_cell(r['label'])} | {_cell(r['method'])} | {seeds} | "
            f"{_mean_text(r[metric.key], metric.text)} | {delta} | "
            f"{_mean_text(r['search_val'], metric.text)} | "
            f"{_mean_text(r['params'], lambda v: f'{v:,.0f}')} | "
            f"{_mean_text(r['macs'], lambda v: f'{v:,.0f}')} | "
            f"{duration(r['search_seconds']['mean'])} | "
            f"{duration(r['retrain_seconds']['mean'])} |")
    few = _too_few_lines(rows)
    if few:
        lines += ["", f"Too few seeds to show a clear difference (p < {ALPHA:g}) "
                  "whatever the figures:", *few]
    for r in rows:
        for seed, value in r["not_finite"].items():
            lines.append(f"- {r['label']} seed {seed}: {metric.key} is {value} (diverged?), "
                         "left out of the statistics")
    lines += ["", "## Is it a fair comparison?", ""]
    if len(rows) == 1:
        lines.append("One run: nothing to compare it with.")
    else:
        if summary["method_differences"]:
            lines.append("The methods (what the comparison is about):")
            lines += [*_difference_lines(summary["method_differences"], rows), ""]
        if summary["setting_differences"]:
            lines.append("**Other settings differ** (a difference in the figures may come "
                         "from them, not from the method):")
            lines += _difference_lines(summary["setting_differences"], rows)
        else:
            lines.append("No other config setting differs (seed, name, output folder, "
                         "device, data.root, plugins and progress/plots/logging are not compared).")
    for d in summary["data_differs"]:
        lines.append(f"- **The data differ**: {d['run']}'s {d['phase']} computed on other data "
                     f"than {d['against']}'s ({d['phase']}/data.json differs in "
                     f"{', '.join(d['fields'])})")
    if summary["data_unknown"]:
        lines.append(f"- No data record (data.json) in {', '.join(summary['data_unknown'])}: "
                     "their data, if they have any (a plugin engine may record none), could not be "
                     "compared")
    if summary["seeds_differ"]:
        lines.append("- The runs used different seeds: " + "; ".join(
            f"{r['label']} {r['seeds']}" for r in rows))
    if summary["timing_differs"]:
        lines.append("- The times were measured with different devices or thread counts: "
                     + "; ".join(f"{r['label']} {r['device']}, "
                                 + (counted(r["threads"], "thread") if r["threads"] else
                                    "threads not recorded") for r in rows if _timed(r)))
    for r in rows:
        for run in r["runs"]:
            if run["error"]:
                lines.append(f"- {r['label']} seed {run['seed']} could not be read: "
                             f"{run['error']}")
    lines += ["", "## Genotypes", ""]
    for r in rows:
        lines.append(f"**{r['label']}**")
        lines.append("")
        for run in r["runs"]:
            text = ("unreadable (above)" if run.get("error") else
                    _genotype_text(run.get("genotype")))
            lines.append(f"- seed {run['seed']} ({metric.text(run.get(metric.key))}): {text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _p_text(p: float) -> str:
    """p to two decimals, three significant digits below 0.1 (0.0476 must not read as the
    0.05 it falls short of), in powers of ten below 0.001."""
    return f"{p:.2f}" if p >= 0.1 else f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def _delta_text(base: dict[str, Any], row: dict[str, Any], metric: Metric,
                adjusted: bool) -> str:
    """A table cell: the difference of ``row`` to the first run, its error, interval and
    test, and how the seeds were matched."""
    d = row.get("vs_first")
    if d is None:
        return ("- (the first run has no finished seed)" if not base["finished"] else
                "- (no finished seed)" if not row["finished"] else "-")

    def signed(v: float) -> str:
        return ("+" if v >= 0 else "-") + metric.text(abs(v))

    p = f"p = {_p_text(d['p'])}" + (f", Holm {_p_text(d['p_holm'])}" if adjusted else "")
    verdict = "no clear difference"
    if d["clear"]:
        verdict = "clear: " + ("better" if (d["diff"] > 0) != metric.lower_is_better else "worse")
    if d["se"] is None:
        na, nb = d["seeds"]
        who = ("each run has" if na == nb == 1 else "the first run has" if na == 1 else
               "this run has")
        return f"{signed(d['diff'])} ({who} a single seed: no standard error; {p}): {verdict}"
    if d["paired"]:
        given = len(row["seeds"])
        design = (f"paired over {d['paired']}"
                  + (f" of {given}" if d["paired"] < given else "") + " seeds")
    else:
        design = "unpaired"
    interval = (f"{LEVEL:.0%} CI {signed(d['ci'][0])} to {signed(d['ci'][1])}"
                if d["ci"] is not None else "no spread: no interval")
    return (f"{signed(d['diff'])} +- {metric.text(d['se'])} ({interval}; {p}, {design}): "
            f"{verdict}")


def _too_few_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line for each comparison whose test cannot give p < :data:`ALPHA` at all, whatever
    its figures, with the fewest seeds per run (of the same design) that could; Holm's
    adjustment over several comparisons can only ask for more."""
    tested = [r for r in rows[1:] if r.get("vs_first")]
    level = ALPHA
    holm_note = (f", more with Holm's adjustment over {len(tested)} comparisons"
                 if len(tested) > 1 else "")
    lines = []
    for r in tested:
        d = r["vs_first"]
        if d["smallest_p"] < level:
            continue
        if d["paired"]:
            need = next(n for n in range(1, 64) if smallest_sign_flip_p(n) < level)
            differing = d["differing"]
            how = f"{d['paired']} paired seeds" + (
                f", {differing} of them differing (a tie tells nothing)"
                if differing < d["paired"] else "")
            what = "differing paired seeds"
        else:
            need = next(n for n in range(1, 64) if smallest_relabel_p(n, n) < level)
            how = "{} and {} unpaired seeds".format(*d["seeds"])
            what = "seeds per run"
        lines.append(f"- {r['label']}: with {how}, the test's smallest p is "
                     f"{_p_text(d['smallest_p'])}; at least {need} {what} are needed"
                     f"{holm_note}")
    return lines


def _difference_lines(differences: dict[str, list[Any]], rows: list[dict[str, Any]]
                      ) -> list[str]:
    return [f"- `{key}`: " + "; ".join(f"{r['label']}: {_cell(v)}" for r, v in zip(rows, vals))
            for key, vals in differences.items()]


def _genotype_text(genotype: dict[str, Any] | None) -> str:
    from diffnas.genotype import Genotype

    return f"`{Genotype.from_dict(genotype)}`" if genotype else "none yet"


def compare_figure(summary: dict[str, Any]) -> Any:
    """A strip plot: each run's per-seed figures (dots) and their mean (a bar); a bare
    ``Figure``, so no pyplot backend is chosen or changed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    metric = Metric(**summary["metric_spec"])
    rows = summary["runs"]
    fig = Figure(figsize=(1.6 + 1.3 * len(rows), 3.6))
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        ys = [run[metric.key] for run in r["runs"] if isinstance(run.get(metric.key), int | float)]
        if ys:
            step = min(0.08, 0.4 / len(ys))  # seeds side by side, inside the mean's bar
            xs = [i + step * (j - (len(ys) - 1) / 2) for j in range(len(ys))]
            ax.scatter(xs, ys, s=22, zorder=3)
            ax.hlines(sum(ys) / len(ys), i - 0.3, i + 0.3, colors="black", zorder=2)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel(metric.headline)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: metric.text(v)))
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _is_compare_text(path: Path) -> bool:
    from diffnas.report.outputs import has_mark

    return has_mark(path, f"<!-- {COMPARE_MARK} -->", f'"generator": "{COMPARE_MARK}"')


def write_compare(summary: dict[str, Any], out: str | Path, force: bool = False) -> list[Path]:
    """``compare.md``, ``compare.json``, ``compare.png`` and ``compare.svg`` in ``out``. A
    file of those names is replaced only when ``diffnas compare`` wrote it (or, with
    ``force``, when it is the user's), never when a run needs it."""
    from diffnas.report.outputs import is_plot, mark_picture, write_outputs
    from diffnas.report.plots import figure_bytes

    out = Path(out)
    fig = compare_figure(summary)
    text = f"<!-- {COMPARE_MARK} -->\n{compare_markdown(summary)}"
    data = json.dumps(finite_json(summary), indent=1, allow_nan=False) + "\n"
    return write_outputs(
        [(out / "compare.md", text.encode(), _is_compare_text),
         (out / "compare.json", data.encode(), _is_compare_text),
         *[(out / f"compare.{fmt}", mark_picture(figure_bytes(fig, fmt), fmt), is_plot)
           for fmt in ("png", "svg")]],
        out, "a comparison", "compare", "--out", force)


def compare_runs(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read every run of ``paths`` and compare them (:func:`compare`)."""
    return compare([load_entry(p, overrides) for p in paths])
