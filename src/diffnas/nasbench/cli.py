"""``diffnas bench nb201 ...`` (query-based search on the benchmark) and ``diffnas bench
nb201-lookup ...`` (the table's results of one cell, e.g. a DARTS-derived genotype).

``bench`` has its own small registry (:func:`register_bench`) so other benchmarks can add
subcommands without touching this file.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from diffnas.cli import register_command
from diffnas.engine.checkpoint import atomic_write_text, refuse_foreign_json
from diffnas.engine.runlock import file_lock
from diffnas.registry import UnknownNameError

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
    p.allow_abbrev = False  # `--seed 3` is not taken for `--seeds 3` (a count)
    sub = p.add_subparsers(dest="bench", required=True)
    handlers = {name: setup(sub.add_parser(name, help=h, allow_abbrev=False))
                for name, (h, setup) in _BENCHES.items()}

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


def _settings(items: list[str], repeats: bool = False) -> dict:
    """``key -> value`` of ``--set key=value`` items; a value is YAML, and malformed YAML
    (or a key given twice inside one value) is a one-line error naming the item. A key
    set twice to different values is refused (which one was meant?) unless ``repeats``
    (a file written before this was checked: the last one ran)."""
    from diffnas.config import _load_yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        value = _load_yaml(v, f"--set {item!r}")
        if not repeats and k.strip() in out and out[k.strip()] != value:
            raise ValueError(f"--set {k.strip()} is given twice, as {out[k.strip()]!r} and "
                             f"{value!r}; give it once")
        out[k.strip()] = value
    return out


def _strategy_settings(strategies: list[str], items: list[str],
                       repeats: bool = False) -> dict[str, dict]:
    """The ``--set`` values of each strategy. ``NAME.key=value`` sets ``key`` of strategy
    ``NAME`` only (and wins over a plain ``key``); a plain ``key=value`` goes to every
    strategy that has the setting, so ``random,rea`` with ``population=20`` changes REA's
    population and leaves random search as it is. A setting that reaches no strategy is
    an error, not silently ignored (``repeats``: as in :func:`_settings`)."""
    from dataclasses import fields

    from diffnas.nasbench.strategies import QUERY_STRATEGIES

    known = {s: sorted(f.name for f in fields(QUERY_STRATEGIES.get(s).Config) if f.init)
             for s in strategies}
    out: dict[str, dict] = {s: {} for s in strategies}
    values = _settings(items, repeats)
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
    # the settings (the --set values; the outcome's 'config' holds every setting as it
    # ran) travel with the outcome: nb201-summary merges only like with like
    return {**run_query_search(strategy, bench, budget, seed, settings).to_dict(),
            "settings": settings}


def code_version() -> dict:
    """Which diffnas made an outcome: the package version and, where the package is a
    git checkout, its commit and whether ``src/diffnas`` had uncommitted changes (each
    ``None`` when git cannot tell)."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("diffnas")
    except PackageNotFoundError:
        release = None
    here = Path(__file__).resolve().parents[1]  # the diffnas package

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *argv], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = dirty = None
    if git("ls-files", "--", "__init__.py"):  # the package is tracked by this checkout
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        dirty = None if commit is None or status is None else bool(status)
    return {"diffnas": release, "commit": commit, "dirty": dirty}


_BENCH_CACHE: dict = {}

# the keys that mark each command's JSON output as one diffnas wrote (and may replace)
BENCH_KEYS = frozenset({"command", "summary", "outcomes"})
SUMMARY_KEYS = frozenset({"files", "summary", "outcomes"})
LOOKUP_KEYS = frozenset({"index", "arch_str"})


# --- keeping finished searches: the sidecar beside --json -----------------------------------
def partial_path(json_path: str | Path) -> Path:
    """The sidecar of a 'bench nb201' ``--json``: one JSON line per finished search,
    appended as each finishes, so an interrupted or failed command keeps them."""
    return Path(f"{json_path}.partial.jsonl")


def set_aside_path(json_path: str | Path) -> Path:
    """Where outcomes in the sidecar that a rerun does not reuse (another command's, other
    settings, table or code) are moved, one JSON line each, rather than deleted."""
    return Path(f"{json_path}.set-aside.jsonl")


def lock_path(json_path: str | Path) -> Path:
    """The lock a 'bench nb201' holds while it writes ``--json`` and its sidecar (removed
    when it ends): two identical commands at once would append every outcome twice."""
    return Path(f"{json_path}.lock")


def table_identity(table: str | Path) -> dict:
    """What a reused outcome's table must match: the SHA-256 of a table file's bytes
    (wherever it lies now), else the resolved path (the official backend's folder)."""
    import hashlib

    path = Path(table)
    if not path.is_file():
        return {"path": str(path.resolve())}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest()}


def _reusable(sidecar: Path, aside: Path, tasks: list[tuple], expected: dict[str, dict],
              code: dict, table: dict) -> dict[int, dict]:
    """The outcomes in ``sidecar`` a rerun of the same command reuses, by task index: those
    of one of ``tasks`` (strategy, budget, seed) with the same ``settings`` and resolved
    ``config`` (``expected[strategy]``), ``code`` and ``table``. The others (another
    command's, another diffnas version's) are said and moved from the sidecar to ``aside``
    (:func:`set_aside_path`); a last line cut short by a kill is dropped (the sidecar is
    rewritten atomically)."""
    from diffnas.engine.callbacks import counted, read_jsonl

    if not sidecar.is_file():
        return {}
    rows = read_jsonl(sidecar)  # a torn last line is dropped; damage elsewhere is an error
    _check_outcomes(rows, str(sidecar))
    index = {(s, b, seed): i for i, (s, _, b, seed, _) in enumerate(tasks)}
    reused: dict[int, dict] = {}
    kept, why = [], {}
    for o in rows:
        i = index.get((o["strategy"], o["budget"], o["seed"]))
        want = expected.get(o["strategy"], {})
        reason = ("not one of this command's searches" if i is None else
                  "a repeat" if i in reused else
                  "other settings" if any(o.get(k) != v for k, v in want.items()) else
                  "another table" if o.get("table") != table else
                  f"other code ({_code_name(o.get('code'))})" if o.get("code") != code
                  else None)
        if reason:
            why[reason] = why.get(reason, 0) + 1
            continue
        kept.append(o)
        reused[i] = {k: v for k, v in o.items() if k != "table"}
    lines = [ln for ln in sidecar.read_text(errors="replace").splitlines() if ln.strip()]
    if why:
        with open(aside, "a", encoding="utf-8") as f:  # on disk before the sidecar loses them
            f.write("".join(json.dumps(o) + "\n" for o in rows if all(o is not k for k in kept)))
            f.flush()
            os.fsync(f.fileno())
        print(f"diffnas: {sidecar}: not reusing {counted(sum(why.values()), 'outcome')} "
              f"({', '.join(f'{n} {r}' for r, n in why.items())}); they are moved to "
              f"{aside}", file=sys.stderr)
    if why or len(lines) != len(rows):
        atomic_write_text("".join(json.dumps(o) + "\n" for o in kept), sidecar)
    return reused


def _append(f: IO[str], row: dict, sidecar: Path, kept: int) -> None:
    """``row`` as one JSON line at the end of the sidecar, on disk before this returns (a
    kill or a full disk later loses nothing written here)."""
    from diffnas.engine.callbacks import counted

    try:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} while appending a finished search; "
                      f"the {counted(kept, 'outcome')} before it are kept there: free space "
                      "and run the same command again to continue", str(sidecar)) from exc


def _indexed(item: tuple[int, tuple]) -> tuple[int, dict]:
    """``(i, outcome of task i)``: results arrive in any order under ``--jobs``."""
    i, task = item
    return i, _one(task)


def _finished(todo: list[tuple[int, tuple]], jobs: int) -> Iterator[tuple[int, dict]]:
    """``(index, outcome)`` of each task of ``todo`` as it finishes, in this process
    (``jobs`` 1) or in ``jobs`` worker processes, so the caller keeps each at once."""
    if jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(todo)),
                                                      _worker_init) as pool:
            yield from pool.imap_unordered(_indexed, todo, chunksize=1)
    else:
        for item in todo:
            yield _indexed(item)


def _run_searches(args: argparse.Namespace, tasks: list[tuple], settings: dict[str, dict],
                  code: dict, table: dict) -> list[dict]:
    """The outcome of every task, in the order of ``tasks``. Each finished search is
    appended to the sidecar beside ``--json`` at once (by this process, also under
    ``--jobs``); those a rerun of the same command finds there are reused, not run again.
    ``args._interrupt_hint`` says on Ctrl-C what is kept and how to continue. ``table``:
    the table's :func:`table_identity`, which reused outcomes must match."""
    from diffnas.engine.callbacks import counted
    from diffnas.nasbench.runner import resolved_config
    from diffnas.nasbench.strategies import create_query_strategy

    sidecar = partial_path(args.json)
    expected = {s: {"settings": json.loads(json.dumps(v)),
                    "config": resolved_config(create_query_strategy(s, v).config)}
                for s, v in settings.items()}
    done = _reusable(sidecar, set_aside_path(args.json), tasks, expected, code, table)
    todo = [(i, t) for i, t in enumerate(tasks) if i not in done]
    if done:
        print(f"reusing {counted(len(done), 'outcome')} of finished searches from {sidecar}; "
              f"running the other {len(todo)}")

    def hint() -> str:
        if not done:
            return "no search had finished, so nothing is kept"
        return (f"{len(done)} of {len(tasks)} searches finished and are kept in {sidecar}; "
                "run the same command again to run only the others")

    args._interrupt_hint = hint()
    if todo:
        try:
            with open(sidecar, "a", encoding="utf-8") as f:
                for i, outcome in _finished(todo, args.jobs):
                    done[i] = {**outcome, "code": code}
                    _append(f, {**done[i], "table": table}, sidecar, len(done) - 1)
                    args._interrupt_hint = hint()
        except BaseException:  # (Ctrl-C, an error): an empty sidecar is not left behind
            if sidecar.is_file() and sidecar.stat().st_size == 0:
                sidecar.unlink()
            raise
    return [done[i] for i in range(len(tasks))]


@register_bench("nb201", "query-based search on NAS-Bench-201 (no test leakage)")
def _nb201(p: argparse.ArgumentParser):
    p.add_argument("--strategy", required=True,
                   help="comma-separated: random, rea, reinforce, nao, gcn, comparator, ctnas")
    p.add_argument("--budget", required=True, help="queries (distinct cells), comma-separated")
    p.add_argument("--seeds", type=int, default=10, metavar="S",
                   help="how many seeds (a count, not a list as in 'diffnas search "
                        "--seeds'): runs seeds 0..S-1 per strategy and budget (default 10)")
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
        from diffnas.nasbench.strategies import create_query_strategy

        for s in strategies:  # every value checked now, not when s's first search starts
            create_query_strategy(s, settings[s])
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
        from diffnas.nasbench.encoding import NUM_CELLS

        if len(bench) != NUM_CELLS:  # a search may query any cell of the space
            what = ("the table is incomplete (cut short?)" if len(bench) < NUM_CELLS
                    else "the table has more rows than the space has cells")
            raise ValueError(f"{args.table}: {len(bench)} cells, not the {NUM_CELLS} of "
                             f"NAS-Bench-201: {what}; a search needs them all "
                             "(nb201-lookup still reads it)")
        if max(budgets) > len(bench):  # the queries are distinct cells
            raise ValueError(f"--budget {max(budgets)}: more queries than the {len(bench)} "
                             f"cells of the table {args.table}")
        _BENCH_CACHE[args.table] = bench
        code = code_version()  # the code these searches run (read before they start)
        tasks = [(s, args.table, b, seed, settings[s])
                 for s in strategies for b in budgets for seed in range(args.seeds)]
        with file_lock(lock_path(args.json),
                       f"{args.json} is being written by another 'diffnas bench nb201'{{pid}}: "
                       "wait for it to end or give another --json (both would append "
                       f"every outcome to {partial_path(args.json)})"):
            table = table_identity(args.table)
            outcomes = _run_searches(args, tasks, settings, code, table)
            report = summarize(outcomes)  # over every outcome, in the order of the tasks
            print(report["table"])
            for line in report["paired_lines"]:
                print(line)
            out = {"command": "diffnas bench nb201",
                   "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "summary": report["summary"], "paired_vs_random": report["paired"],
                   "table": table, "outcomes": outcomes}
            sidecar = partial_path(args.json)
            try:
                atomic_write_text(json.dumps(out, indent=1) + "\n", args.json)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror or exc}; the {len(outcomes)} "
                              f"outcomes are kept in {sidecar}: free space (or fix the "
                              "path) and run the same command again to write --json from "
                              "them, without searching again", exc.filename or args.json
                              ) from exc
            sidecar.unlink(missing_ok=True)  # --json holds every outcome now
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
        if not math.isfinite(o["valid_acc"]) or not o["test"]:
            what = "'valid_acc' (not finite)" if o["test"] else "'test' (empty)"
            raise ValueError(f"{path}: outcomes[{n}] has an invalid {what}; the file is "
                             "damaged or not from 'diffnas bench nb201'")
        bad = [m for m, v in o["test"].items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        bad_key = next((k for k in ("settings", "config", "code", "extras")
                        if k in o and not isinstance(o[k], dict)), None)
        if bad or bad_key:
            what = f"test[{bad[0]!r}]" if bad else repr(bad_key)
            raise ValueError(f"{path}: outcomes[{n}] has an invalid {what}; the file is "
                             "damaged or not from 'diffnas bench nb201'")


def _without_defaults(strategy: str, settings: dict) -> dict:
    """``settings`` less those equal to the strategy's defaults: a run that set
    ``rea.population=10`` explicitly ran with the same settings as one that did not."""
    from dataclasses import MISSING, fields

    from diffnas.nasbench.strategies import QUERY_STRATEGIES

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
    return _strategy_settings(names, args.get("set") or [], repeats=True)


#: what makes two outcomes of one (strategy, budget, seed) the same run (not 'seconds')
_RESULT_KEYS = ("arch_str", "index", "queries", "valid_acc", "test")


def _code_name(code: object) -> str:
    if not isinstance(code, dict):
        return "an unrecorded diffnas version"
    name = f"diffnas {code.get('diffnas') or '(version unknown)'}"
    if code.get("commit"):
        name += f" at commit {str(code['commit'])[:12]}"
        if code.get("dirty"):
            name += " with uncommitted changes"
    return name


def _differences(a: dict, b: dict) -> str:
    """The settings that differ between ``a`` and ``b``: ``key: A vs B``."""
    absent = "(not recorded)"
    return "; ".join(f"{k}: {a.get(k, absent)!r} vs {b.get(k, absent)!r}"
                     for k in sorted(set(a) | set(b), key=str)
                     if k not in a or k not in b or a[k] != b[k])


def merge_outcomes(files: list[tuple[str, dict]], allow_legacy: bool = False,
                   ) -> tuple[list[dict], list[str]]:
    """The outcomes of 'bench nb201' files (``(path, data)`` pairs, already checked) as one
    list, and the warnings to show. Like is merged only with like, per strategy:

    - outcomes that record their resolved settings (``config``: every setting as it ran,
      defaults included) merge where those agree; they are an error otherwise, naming the
      files and the settings. Different code versions (``code``) with equal settings are
      merged with a warning: a code change that kept the settings would not show.
    - outcomes written before outcomes held ``config`` (legacy files) are compared on
      their ``--set`` values less the defaults of today's code; a legacy file and a
      recording one for the same strategy are refused unless ``allow_legacy`` (then a
      warning): the defaults the legacy run used are unknown (ctnas's ``choice`` changed).
    - the same (strategy, budget, seed) in two places is counted once where the results
      agree (every search is deterministic per seed) and is an error naming both files
      where they differ.
    """
    merged: dict[tuple, tuple[dict, str]] = {}
    recorded: dict[str, tuple[dict, dict, str, object]] = {}  # -> config, --set, file, code
    legacy_of: dict[str, tuple[dict, str]] = {}  # strategy -> (--set less defaults, file)
    warnings: list[str] = []

    def warn(text: str) -> None:
        if text not in warnings:
            warnings.append(text)

    first_table: tuple[dict, str] | None = None  # the first file's recorded table
    for f, data in files:
        table = data.get("table")  # (files written before 2026-12-07 do not record it)
        if isinstance(table, dict):
            if first_table is None:
                first_table = (table, f)
            elif table != first_table[0]:
                raise ValueError(
                    f"{first_table[1]} and {f} were searched on different NAS-Bench-201 "
                    f"tables ({_differences(first_table[0], table)}): their accuracies do not "
                    "compare; summarise them separately")
        legacy: dict[str, dict] = {}
        if any("settings" not in o for o in data["outcomes"]):  # (only legacy outcomes
            try:  # read the command's --set: a recording one holds its own settings)
                legacy = _file_settings(data)
            except (ValueError, UnknownNameError) as exc:  # e.g. a strategy renamed since
                raise ValueError(f"{f}: cannot tell the settings its runs used ({exc})"
                                 ) from None
        for o in data["outcomes"]:
            s = o["strategy"]
            mine = _without_defaults(s, o["settings"] if "settings" in o
                                     else legacy.get(s, {}))
            others = [legacy_of[s]] if s in legacy_of else []
            if "config" not in o and s in recorded:
                others.append(recorded[s][1:3])
            for seen, where in others:  # (a legacy outcome involved: its --set values)
                if seen != mine:
                    raise ValueError(
                        f"strategy {s!r} ran with settings {seen or 'defaults'} in {where} "
                        f"and {mine or 'defaults'} in {f}: one row cannot mix them; "
                        "summarise those files separately")
            if "config" in o:
                if s in recorded:
                    config, _, where, code = recorded[s]
                    if o["config"] != config:
                        raise ValueError(
                            f"strategy {s!r} ran with other settings in {where} and in {f} "
                            f"({_differences(config, o['config'])}): one row cannot mix "
                            "them; summarise those files separately")
                    if o.get("code") != code:
                        warn(f"strategy {s!r}: merged outcomes of {_code_name(code)} "
                             f"({where}) and of {_code_name(o.get('code'))} ({f}); their "
                             "settings agree, but a change of the code that kept the "
                             "settings would not show here")
                else:
                    recorded[s] = (o["config"], mine, f, o.get("code"))
            else:
                legacy_of.setdefault(s, (mine, f))
            if s in recorded and s in legacy_of:
                old, new = legacy_of[s][1], recorded[s][2]
                text = (f"strategy {s!r}: {old} was written before outcomes recorded every "
                        f"setting and the diffnas version, {new} after")
                unknown = ("the defaults of the older run are unknown (they have changed, "
                           "e.g. ctnas's choice on 2026-12-04)")
                if recorded[s][0] == {}:  # a strategy without settings: only the code
                    warn(f"{text}; merged ({s} has no settings), but a change of its code "
                         "would not show here")
                elif allow_legacy:
                    warn(f"{text}; {unknown}; merged as --allow-legacy asks")
                else:
                    raise ValueError(f"{text}; {unknown}, so one row must not mix them: "
                                     "summarise them separately, or give --allow-legacy to "
                                     "merge them anyway")
            key = (s, o["budget"], o["seed"])
            if key in merged:
                prev, where = merged[key]
                differ = [k for k in _RESULT_KEYS if prev.get(k) != o.get(k)]
                if differ:
                    k = differ[0]
                    raise ValueError(
                        f"strategy {s!r}, budget {o['budget']}, seed {o['seed']} is in {where} "
                        f"and in {f} with different results ({k}: {prev.get(k)!r} vs "
                        f"{o.get(k)!r}): they come from other code or settings; summarise "
                        "those files separately")
                continue  # the same run twice (deterministic per seed): counted once
            merged[key] = (o, f)
    return [o for o, _ in merged.values()], warnings


@register_bench("nb201-summary", "merge JSON files of 'bench nb201' runs and print the table")
def _summary(p: argparse.ArgumentParser):
    p.add_argument("files", nargs="+", help="JSON files written by 'diffnas bench nb201'")
    p.add_argument("--json", help="write the merged summary here")
    p.add_argument("--allow-legacy", action="store_true",
                   help="merge a file written before outcomes recorded their settings with "
                        "a newer one for the same strategy (a warning, not an error)")

    def run(args: argparse.Namespace) -> int:
        from diffnas.engine.callbacks import read_json
        from diffnas.nasbench.runner import summarize

        if args.json:
            if any(Path(f).resolve() == Path(args.json).resolve() for f in args.files):
                raise ValueError(f"--json {args.json} is one of the files summarised; write "
                                 "the summary to another path")
            refuse_foreign_json(args.json, SUMMARY_KEYS, "an 'nb201-summary' result", "--json")
        files = []
        for f in args.files:
            data = read_json(f, "give a JSON file written by 'diffnas bench nb201'")
            if "outcomes" not in data:
                raise ValueError(f"{f}: not a 'bench nb201' JSON file (no 'outcomes')")
            _check_outcomes(data["outcomes"], f)
            files.append((f, data))
        outcomes, warnings = merge_outcomes(files, args.allow_legacy)
        for text in warnings:
            print(f"diffnas: warning: {text}", file=sys.stderr)
        outcomes.sort(key=lambda o: (o["budget"], o["strategy"] != "random", o["strategy"],
                                     o["seed"]))
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
