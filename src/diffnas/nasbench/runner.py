"""The search protocol on NAS-Bench-201, without leakage.

1. The strategy gets a :class:`QueryOracle` answering only ``c10valid_valid_200`` (the
   validation accuracy of the CIFAR-10 "valid" setting) within a budget of distinct cells.
2. The chosen cell is the queried cell with the best validation accuracy.
3. Only then are its test accuracies read: ``c10_test_200``, ``c100_test_200``,
   ``in16_test_200``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from diffnas.engine.multiseed import mean_std
from diffnas.genotype import Genotype
from diffnas.nasbench.encoding import cell_names
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies import create_query_strategy
from diffnas.nasbench.table import REPORT_METRICS, SEARCH_METRIC, Nb201Benchmark
from diffnas.report.stats import sign_flip_p


def make_oracle(bench: Nb201Benchmark, budget: int, metric: str = SEARCH_METRIC) -> QueryOracle:
    """An oracle that reads nothing from ``bench`` but ``metric``."""
    if "test" in metric:
        raise ValueError(f"a search must not see a test metric, got {metric!r}")
    return QueryOracle(lambda cell: bench.query(cell_names(cell), metric), budget)


@dataclass
class SearchOutcome:
    strategy: str
    seed: int
    budget: int
    queries: int  # distinct cells queried (<= budget)
    arch_str: str
    index: int
    valid_acc: float
    test: dict[str, float]  # REPORT_METRICS of the chosen cell
    seconds: float
    # every setting of the strategy as the search ran (defaults included), JSON-ready:
    # nb201-summary merges outcomes only where these agree
    config: dict = field(default_factory=dict)
    # figures of the chosen cell beyond the table's (QueryStrategy.describe_choice: the
    # predicted latency of a latency-aware REINFORCE's pick)
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_query_search(
    strategy: str, bench: Nb201Benchmark, budget: int, seed: int,
    settings: dict | None = None,
) -> SearchOutcome:
    """Run ``strategy`` for ``budget`` queries with ``seed``; report the chosen cell. The
    search runs on one torch thread: its float sums, and so the cells a predictor-based
    strategy queries, would otherwise depend on the thread count (``--jobs 1`` vs 2)."""
    search = create_query_strategy(strategy, settings)
    oracle = make_oracle(bench, budget)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        search.search(oracle, np.random.default_rng(seed))
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    cell, valid = search.choose(oracle)  # (by validation, or the strategy's own objective)
    ops = cell_names(cell)
    # The search is over: from here on test columns may be read.
    test = {m: bench.query(ops, m) for m in REPORT_METRICS if m in bench.metrics}
    index = bench.index_of(ops)
    return SearchOutcome(strategy, seed, budget, oracle.used, bench.arch_str(index), index,
                         valid, test, seconds, resolved_config(search.config),
                         search.describe_choice(cell))


def resolved_config(config: object) -> dict:
    """Every setting of a strategy config (defaults included) as plain JSON values (a
    tuple becomes a list), so that one read back from an outcome file compares equal."""
    import json

    from diffnas.config import to_dict

    if config is None:
        return {}
    return json.loads(json.dumps(to_dict(config)))


# --- statistics ---------------------------------------------------------------------------
def _pm(stat: dict) -> str:
    """``mean +- std`` for the table; one seed has no sample std (``n/a``, JSON null)."""
    std = "n/a" if stat["std"] is None else f"{stat['std']:4.2f}"
    return f"{stat['mean']:7.2f} +- {std:>4}"


_COLUMNS = (("strategy", 11), ("budget", 6), ("seeds", 5), ("C10 test", 15), ("C100 test", 15),
            ("IN16 test", 15), ("C10 valid", 15), ("queries", 7), ("s/run", 6))


def _table(rows: list[list[str]]) -> str:
    """The summary table: each column as wide as its widest cell (a spread of 10 points or
    more widens its column rather than shifting the row), the strategy left-aligned."""
    widths = [max([w, len(name)] + [len(r[i]) for r in rows])
              for i, (name, w) in enumerate(_COLUMNS)]

    def line(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    header = line([name for name, _ in _COLUMNS])
    return "\n".join([header, "-" * len(header), *(line(r) for r in rows)])


def paired_comparison(a: list[float], b: list[float], permutations: int = 100_000,
                      seed: int = 0) -> dict[str, float]:
    """Compare paired samples ``a`` vs ``b`` (same seeds): mean difference, wins/ties/
    losses, a two-sided exact sign test (ties dropped) and a two-sided sign-flip
    permutation test of the mean difference (:func:`~diffnas.report.stats.sign_flip_p`)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_comparison needs two equally long, non-empty lists")
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = wins + losses
    k = min(wins, losses)
    sign_p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    perm_p = sign_flip_p(d, permutations, seed)
    return {"mean_diff": float(d.mean()), "wins": wins, "ties": int(len(d) - n),
            "losses": losses, "sign_test_p": float(sign_p), "permutation_p": perm_p}


# --- describing a cell (e.g. the one a differentiable search derived) ----------------------
def describe_cell(bench: Nb201Benchmark, genotype: Genotype) -> dict:
    """Index, string, every table metric and the op counts of ``genotype``."""
    record = bench.record(genotype)
    record["skip_connect_edges"] = genotype.count_op("skip_connect")
    record["none_edges"] = genotype.count_op("none")
    return record


def summarize(outcomes: list[dict]) -> dict:
    """Mean +- std over seeds per (strategy, budget) and paired comparisons against random
    search at each budget (on ``c10_test_200``, seeds matched)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for o in outcomes:
        groups.setdefault((o["strategy"], o["budget"]), []).append(o)
    summary = []
    rows_text: list[list[str]] = []
    for (strategy, budget), rows in groups.items():
        entry: dict = {"strategy": strategy, "budget": budget, "seeds": len(rows)}
        cells = []
        for m in REPORT_METRICS:
            vals = [r["test"][m] for r in rows if m in r["test"]]
            if vals:
                entry[m] = dict(zip(("mean", "std"), mean_std(vals), strict=True))
                cells.append(_pm(entry[m]))
            else:
                cells.append("-")
        entry["valid"] = dict(zip(("mean", "std"), mean_std([r["valid_acc"] for r in rows]),
                                  strict=True))
        latencies = [(r.get("extras") or {}).get("predicted_latency_ms") for r in rows]
        if all(v is not None for v in latencies):  # picked by a latency-aware reward
            entry["predicted_latency_ms"] = dict(zip(("mean", "std"), mean_std(latencies),
                                                     strict=True))
        entry["queries"] = float(np.mean([r["queries"] for r in rows]))
        entry["seconds_per_run"] = float(np.mean([r["seconds"] for r in rows]))
        summary.append(entry)
        rows_text.append([strategy, str(budget), str(len(rows)), *cells, _pm(entry["valid"]),
                          f"{entry['queries']:.1f}", f"{entry['seconds_per_run']:.2f}"])
    paired, paired_lines = [], []
    for entry in summary:
        if "predicted_latency_ms" in entry:
            paired_lines.append(
                f"{entry['strategy']} @ {entry['budget']}: each seed's pick is the best queried "
                f"cell by its latency-aware reward (not by accuracy alone); predicted latency "
                f"{_pm(entry['predicted_latency_ms']).strip()} ms")
    metric = REPORT_METRICS[0]
    for (strategy, budget), rows in groups.items():
        base = {r["seed"]: r for r in groups.get(("random", budget), [])}
        if strategy == "random" or not base:
            continue
        both = [(r, base[r["seed"]]) for r in rows if r["seed"] in base
                and metric in r["test"] and metric in base[r["seed"]]["test"]]
        if not both:  # (a table without the metric: no comparison, the rest is reported)
            continue
        cmp = paired_comparison([a["test"][metric] for a, _ in both],
                                [b["test"][metric] for _, b in both])
        paired.append({"strategy": strategy, "budget": budget, "metric": metric,
                       "seeds": len(both), **cmp})
        paired_lines.append(
            f"{strategy} vs random @ {budget} ({metric}, {len(both)} seeds): mean diff "
            f"{cmp['mean_diff']:+.3f}, wins/ties/losses {cmp['wins']}/{cmp['ties']}/"
            f"{cmp['losses']}, sign test p={cmp['sign_test_p']:.2g}, "
            f"permutation p={cmp['permutation_p']:.2g}")
    return {"summary": summary, "paired": paired, "table": _table(rows_text),
            "paired_lines": paired_lines}
