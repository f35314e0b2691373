"""``diffnas bench nb201 ...`` (query-based search on the benchmark) and ``diffnas bench
nb201-lookup ...`` (the table's results of one cell, e.g. a DARTS-derived genotype).

``bench`` has its own small registry (:func:`register_bench`) so other benchmarks can add
subcommands without touching this file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
from collections.abc import Callable
from pathlib import Path

from diffnas.cli import register_command
from diffnas.engine.checkpoint import atomic_write_text, refuse_foreign_json

BenchSetup = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]
_BENCHES: dict[str, tuple[str, BenchSetup]] = {}


def register_bench(name: str, help: str) -> Callable[[BenchSetup], BenchSetup]:
    """Register ``setup(parser) -> handler`` as ``diffnas bench NAME``."""

    def deco(setup: BenchSetup) -> BenchSetup:
        _BENCHES[name] = (help, setup)
        return setup

    return deco


@register_command("bench", "benchmarks: query-based search and lookups on NAS-Bench-201")
def _bench(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="bench", required=True)
    handlers = {name: setup(sub.add_parser(name, help=h)) for name, (h, setup) in _BENCHES.items()}

    def run(args: argparse.Namespace) -> int:
        return handlers[args.bench](args)

    return run


def _csv_list(text: str, flag: str, kind: Callable = str) -> list:
    """The items of a comma-separated flag value, each converted by ``kind``; an item
    ``kind`` refuses is a ``ValueError`` naming ``flag`` and the item."""
    out = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        try:
            out.append(kind(t))
        except ValueError:
            what = "an integer" if kind is int else f"a valid {kind.__name__}"
            raise ValueError(f"{flag}: {t!r} is not {what} (in {flag} {text}, a "
                             "comma-separated list)") from None
    if not out:
        raise ValueError(f"{flag}: empty; give a comma-separated list")
    repeated = sorted({str(v) for v in out if out.count(v) > 1})
    if repeated:  # each would run the same seeds again and count them twice
        raise ValueError(f"{flag}: {', '.join(repeated)} given more than once")
    return out


def _settings(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _strategy_settings(strategies: list[str], items: list[str]) -> dict[str, dict]:
    """The ``--set`` values of each strategy. ``NAME.key=value`` sets ``key`` of strategy
    ``NAME`` only (and wins over a plain ``key``); a plain ``key=value`` goes to every
    strategy that has the setting, so ``random,rea`` with ``population=20`` changes REA's
    population and leaves random search as it is. A setting that reaches no strategy is
    an error, not silently ignored."""
    from dataclasses import fields

    from diffnas.nasbench.strategies import QUERY_STRATEGIES

    known = {s: sorted(f.name for f in fields(QUERY_STRATEGIES.get(s).Config) if f.init)
             for s in strategies}
    out: dict[str, dict] = {s: {} for s in strategies}
    values = _settings(items)
    for key, value in sorted(values.items(), key=lambda kv: "." in kv[0]):  # plain first
        name, dot, setting = key.rpartition(".")
        if not dot:
            takers = [s for s in strategies if key in known[s]]
            if not takers:
                raise ValueError(f"--set {key}: none of the strategies {', '.join(strategies)} "
                                 f"has this setting; prefix it with a strategy name "
                                 f"(e.g. rea.population=20) to name one")
            for s in takers:
                out[s][key] = value
        elif name not in known:
            raise ValueError(f"--set {key}: {name!r} is not one of the strategies run "
                             f"(--strategy {','.join(strategies)})")
        elif setting not in known[name]:
            raise ValueError(f"--set {key}: strategy {name!r} has no setting {setting!r}; "
                             f"its settings: {', '.join(known[name]) or 'none'}")
        else:
            out[name][setting] = value
    return out


def _worker_init() -> None:
    """One torch thread per worker process: ``--jobs`` processes share the cores (setting
    OMP_NUM_THREADS here would be too late, torch has already read it)."""
    import torch

    torch.set_num_threads(1)


def _one(task: tuple) -> dict:
    strategy, table, budget, seed, settings = task
    from diffnas.nasbench.runner import run_query_search
    from diffnas.nasbench.table import open_benchmark

    bench = _BENCH_CACHE.get(table) or _BENCH_CACHE.setdefault(table, open_benchmark(table))
    # the settings travel with the outcome: nb201-summary merges only like with like
    return {**run_query_search(strategy, bench, budget, seed, settings).to_dict(),
            "settings": settings}


_BENCH_CACHE: dict = {}

# the keys that mark each command's JSON output as one diffnas wrote (and may replace)
BENCH_KEYS = frozenset({"command", "summary", "outcomes"})
SUMMARY_KEYS = frozenset({"files", "summary", "outcomes"})
LOOKUP_KEYS = frozenset({"index", "arch_str"})


@register_bench("nb201", "query-based search on NAS-Bench-201 (no test leakage)")
def _nb201(p: argparse.ArgumentParser):
    p.add_argument("--strategy", required=True,
                   help="comma-separated: random, rea, reinforce, nao, gcn, comparator, ctnas")
    p.add_argument("--budget", required=True, help="queries (distinct cells), comma-separated")
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..S-1 per strategy and budget")
    p.add_argument("--table", required=True, help="nb201_compact.csv(.gz) or official file")
    p.add_argument("--backend", default="auto", help="auto, csv, nats_bench, nas_201_api")
    p.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   help="strategy setting: rea.population=20 sets it for rea only; a plain "
                        "population=20 for every strategy that has the setting")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--json", default="nb201_bench.json", help="where to write every outcome")

    def run(args: argparse.Namespace) -> int:
        from diffnas.nasbench.runner import summarize
        from diffnas.nasbench.strategies import QUERY_STRATEGIES
        from diffnas.nasbench.table import SEARCH_METRIC, open_benchmark

        strategies = _csv_list(args.strategy, "--strategy")
        for s in strategies:
            QUERY_STRATEGIES.get(s)  # unknown names fail before any work
        budgets = _csv_list(args.budget, "--budget", int)
        if args.seeds < 1 or not budgets or min(budgets) < 1:
            raise ValueError("--seeds and every --budget must be >= 1")
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: give 1 or more worker processes")
        settings = _strategy_settings(strategies, args.set)
        # checked before the searches, which can take hours: not after them
        refuse_foreign_json(args.json, BENCH_KEYS, "a 'bench nb201' result", "--json")
        if args.backend == "auto":
            bench = open_benchmark(args.table)
        else:
            bench = open_benchmark(args.table, args.backend)
        if SEARCH_METRIC not in bench.metrics:
            raise ValueError(f"{args.table}: the table has no {SEARCH_METRIC} column, the "
                             f"validation accuracy the searches query (it has "
                             f"{', '.join(bench.metrics) or 'no metric'})")
        if max(budgets) > len(bench):  # the queries are distinct cells
            raise ValueError(f"--budget {max(budgets)}: more queries than the {len(bench)} "
                             f"cells of the table {args.table}")
        _BENCH_CACHE[args.table] = bench
        tasks = [(s, args.table, b, seed, settings[s])
                 for s in strategies for b in budgets for seed in range(args.seeds)]
        if args.jobs > 1:
            with multiprocessing.get_context("fork").Pool(args.jobs, _worker_init) as pool:
                outcomes = pool.map(_one, tasks, chunksize=1)
        else:
            outcomes = [_one(t) for t in tasks]
        report = summarize(outcomes)
        print(report["table"])
        for line in report["paired_lines"]:
            print(line)
        out = {"command": "diffnas bench nb201", "args": {k: v for k, v in vars(args).items()
                                                          if not k.startswith("_")},
               "summary": report["summary"], "paired_vs_random": report["paired"],
               "outcomes": outcomes}
        atomic_write_text(json.dumps(out, indent=1) + "\n", args.json)
        print(f"wrote {args.json}")
        return 0

    return run


@register_bench("nb201-lookup", "look a cell (genotype file, string or index) up in the table")
def _lookup(p: argparse.ArgumentParser):
    p.add_argument("--genotype", required=True,
                   help="genotype JSON file (e.g. RUN/search/genotype.json), nb201 string or index")
    p.add_argument("--table", required=True, help="nb201_compact.csv(.gz) or official file")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", help="also write the record here")

    def run(args: argparse.Namespace) -> int:
        from diffnas.genotype import Genotype
        from diffnas.nasbench.runner import describe_cell
        from diffnas.nasbench.table import open_benchmark
        from diffnas.spaces.nb201 import str_to_genotype

        if args.json:
            refuse_foreign_json(args.json, LOOKUP_KEYS, "an 'nb201-lookup' record", "--json")
        bench = open_benchmark(args.table, args.backend)
        g = args.genotype
        if Path(g).is_file():
            genotype = Genotype.load(g)
        elif re.fullmatch(r"\s*[-+]?\d+\s*", g):
            genotype = bench.genotype(int(g))
        elif "|" not in g:  # neither a cell string nor an index: a path that is not there
            raise FileNotFoundError(f"--genotype {g}: no such file, and not a benchmark index "
                                    "or an nb201 string (|op~0|+|op~0|op~1|+|...|)")
        else:
            genotype = str_to_genotype(g)
        record = describe_cell(bench, genotype)
        for k, v in record.items():
            print(f"{k:>20}: {v}")
        if args.json:
            atomic_write_text(json.dumps(record, indent=1) + "\n", args.json)
        return 0

    return run


#: what each outcome of a 'bench nb201' file must hold for the summary: name -> types
_OUTCOME_FIELDS: dict[str, tuple[type, ...]] = {
    "strategy": (str,), "budget": (int,), "seed": (int,), "queries": (int, float),
    "valid_acc": (int, float), "seconds": (int, float), "test": (dict,)}


def _check_outcomes(outcomes: object, path: str) -> None:
    """A ``ValueError`` naming ``path`` and the entry when ``outcomes`` is not the list of
    outcome objects 'bench nb201' writes (a damaged or hand-edited file), instead of a
    ``KeyError`` from deep in the summary."""
    if not isinstance(outcomes, list):
        raise ValueError(f"{path}: 'outcomes' is {outcomes!r:.40}, not a list; "
                         "give a JSON file written by 'diffnas bench nb201'")
    for n, o in enumerate(outcomes):
        if not isinstance(o, dict):
            raise ValueError(f"{path}: outcomes[{n}] is {o!r:.40}, not an object")
        for key, types in _OUTCOME_FIELDS.items():
            value = o.get(key)
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"{path}: outcomes[{n}] has no valid {key!r} (got "
                                 f"{value!r}); the file is damaged or not from 'diffnas "
                                 "bench nb201'")
        bad = [m for m, v in o["test"].items()
               if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad or ("settings" in o and not isinstance(o["settings"], dict)):
            what = f"test[{bad[0]!r}]" if bad else "'settings'"
            raise ValueError(f"{path}: outcomes[{n}] has an invalid {what}; the file is "
                             "damaged or not from 'diffnas bench nb201'")


def _without_defaults(strategy: str, settings: dict) -> dict:
    """``settings`` less those equal to the strategy's defaults: a run that set
    ``rea.population=10`` explicitly ran with the same settings as one that did not."""
    from dataclasses import MISSING, fields

    from diffnas.nasbench.strategies import QUERY_STRATEGIES
    from diffnas.registry import UnknownNameError

    try:
        config = QUERY_STRATEGIES.get(strategy).Config
    except UnknownNameError:  # a strategy unknown here (renamed since): compare as written
        return dict(settings)
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    return {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}


def _file_settings(data: dict) -> dict[str, dict]:
    """Each strategy's settings in a 'bench nb201' JSON file written before its outcomes
    held them, from the command's ``--strategy`` and ``--set``."""
    args = data.get("args") or {}
    names = sorted({o["strategy"] for o in data["outcomes"]})
    if isinstance(args.get("strategy"), str):  # (as it ran: repeats allowed then)
        names = list(dict.fromkeys(t.strip() for t in args["strategy"].split(",") if t.strip()))
    return _strategy_settings(names, args.get("set") or [])


@register_bench("nb201-summary", "merge JSON files of 'bench nb201' runs and print the table")
def _summary(p: argparse.ArgumentParser):
    p.add_argument("files", nargs="+", help="JSON files written by 'diffnas bench nb201'")
    p.add_argument("--json", help="write the merged summary here")

    def run(args: argparse.Namespace) -> int:
        from diffnas.engine.callbacks import read_json
        from diffnas.nasbench.runner import summarize

        if args.json:
            if any(Path(f).resolve() == Path(args.json).resolve() for f in args.files):
                raise ValueError(f"--json {args.json} is one of the files summarised; write "
                                 "the summary to another path")
            refuse_foreign_json(args.json, SUMMARY_KEYS, "an 'nb201-summary' result", "--json")
        merged: dict[tuple, dict] = {}
        setting_of: dict[str, tuple[dict, str]] = {}  # strategy -> (its settings, a file)
        for f in args.files:
            data = read_json(f, "give a JSON file written by 'diffnas bench nb201'")
            if "outcomes" not in data:
                raise ValueError(f"{f}: not a 'bench nb201' JSON file (no 'outcomes')")
            _check_outcomes(data["outcomes"], f)
            try:
                legacy = _file_settings(data)
            except ValueError as exc:  # e.g. a strategy renamed since
                raise ValueError(f"{f}: cannot tell the settings its runs used ({exc})") \
                    from None
            for o in data["outcomes"]:  # a (strategy, budget, seed) run repeated: keep one
                mine = _without_defaults(o["strategy"], o["settings"] if "settings" in o
                                         else legacy.get(o["strategy"], {}))
                seen, where = setting_of.setdefault(o["strategy"], (mine, f))
                if seen != mine:
                    raise ValueError(
                        f"strategy {o['strategy']!r} ran with settings {seen or 'defaults'} in "
                        f"{where} and {mine or 'defaults'} in {f}: one row cannot mix them; "
                        "summarise those files separately")
                merged[(o["strategy"], o["budget"], o["seed"])] = o
        outcomes = sorted(merged.values(), key=lambda o: (o["budget"], o["strategy"] != "random",
                                                          o["strategy"], o["seed"]))
        report = summarize(outcomes)
        print(report["table"])
        for line in report["paired_lines"]:
            print(line)
        if args.json:
            atomic_write_text(json.dumps(
                {"files": args.files, "summary": report["summary"],
                 "paired_vs_random": report["paired"], "outcomes": outcomes}, indent=1) + "\n",
                args.json)
        return 0

    return run
