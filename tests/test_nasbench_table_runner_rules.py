"""Rules of the NAS-Bench-201 query oracle, results table, runner and command line that a
second mutation audit found unchecked by the other nb201 tests: the oracle's answers as
plain ints and float64 (and its empty history), the table's refusal of a folder, the
mapping of every (dataset, split, epochs) to its column and of every column to the
official API's field, the runner's outcome (the queries actually spent, the seed of the
search) and the command line's checks. Each test replays the rule by hand on a tiny
made-up table or a stand-in benchmark; none compares with numbers the code once printed.
The strategies themselves are covered by test_nb201_rules.py and
test_query_strategy_rules.py."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nb201_bench import CellListApi

from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.table import (
    ALL_METRICS,
    COLUMNS,
    SEARCH_METRIC,
    ApiNb201Table,
    CsvNb201Table,
    Nb201Benchmark,
)
from diffnas.spaces.nb201 import NB201_OPS, ops_to_genotype, ops_to_str, str_to_ops

#: the benchmark's setting -> the prefix of its columns (docs/nb201.md)
PREFIX = {"cifar10-valid": "c10valid", "cifar10": "c10", "cifar100": "c100",
          "ImageNet16-120": "in16"}


# --- helpers ---------------------------------------------------------------------------
def _arch(k: int) -> str:
    """The nb201 string of the cell with base-5 code ``k``."""
    return ops_to_str([NB201_OPS[(k // 5 ** (5 - e)) % 5] for e in range(6)])


def _table(path: Path, metrics: tuple[str, ...], n: int = 3) -> Path:
    """A table of ``n`` cells; the value of column j of cell i is ``10 * j + i + 0.25``."""
    rows = [",".join([str(i), _arch(i), *(repr(10.0 * j + i + 0.25) for j in range(len(metrics)))])
            for i in range(n)]
    path.write_text(",".join(["index", "arch_str", *metrics]) + "\n" + "\n".join(rows) + "\n")
    return path


class _Space(Nb201Benchmark):
    """A stand-in benchmark of every cell of the space: the benchmark index is the cell's
    base-5 code and the value of column j is ``100 * j + index / 1000``."""

    def __init__(self, metrics: tuple[str, ...] = ALL_METRICS) -> None:
        self._metrics = metrics
        self.reads: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return 5 ** 6

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    def arch_str(self, index: int) -> str:
        return _arch(self.index_of(index))

    def _index_of_str(self, arch_str: str) -> int:
        return sum(NB201_OPS.index(op) * 5 ** (5 - e) for e, op in enumerate(str_to_ops(arch_str)))

    def _value(self, index: int, metric: str) -> float:
        self.reads.append((index, metric))
        return 100.0 * ALL_METRICS.index(metric) + index / 1000


# --- the oracle ----------------------------------------------------------------------------
def test_an_oracle_remembers_a_cell_given_as_a_list_or_an_array():
    oracle = QueryOracle(lambda c: float(sum(c)), budget=2)
    oracle.query([1, 2, 3, 4, 0, 1])
    for same in ([1, 2, 3, 4, 0, 1], (1, 2, 3, 4, 0, 1), np.array([1, 2, 3, 4, 0, 1])):
        assert oracle.seen(same)
    assert not oracle.seen([1, 2, 3, 4, 0, 2])


def test_an_oracle_answers_plain_ints_and_exact_float64():
    """A cell given as an array or as whole floats is stored as plain ints (the history,
    best() and data() are JSON-ready); accuracies are kept in float64, not rounded."""
    answers = {(0, 1, 2, 3, 4, 0): 93.123456789, (4, 4, 4, 4, 4, 4): 12.000000001}
    oracle = QueryOracle(lambda c: answers[c], budget=3)
    assert oracle.query(np.array([0, 1, 2, 3, 4, 0], dtype=np.int64)) == 93.123456789
    assert oracle.query([4.0] * 6) == 12.000000001
    for cell, _ in oracle.history:
        assert all(type(i) is int for i in cell)
    json.dumps(oracle.best())  # plain values: no numpy ints
    assert oracle.best() == ((0, 1, 2, 3, 4, 0), 93.123456789)
    cells, accs = oracle.data()
    assert accs.dtype == np.float64 and cells.dtype == np.int64
    np.testing.assert_array_equal(accs, [93.123456789, 12.000000001])
    np.testing.assert_array_equal(cells, [[0, 1, 2, 3, 4, 0], [4] * 6])


def test_an_oracle_that_was_never_asked_has_empty_data_of_six_columns():
    cells, accs = QueryOracle(lambda c: 1.0, budget=1).data()
    assert cells.shape == (0, 6) and accs.shape == (0,)


# --- the table -----------------------------------------------------------------------------
def test_a_folder_given_as_the_table_is_not_found_naming_it(tmp_path):
    folder = tmp_path / "nb201_compact.csv"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=f"NAS-Bench-201 table not found: {folder}"):
        CsvNb201Table(folder)


def test_every_setting_split_and_schedule_reads_its_own_column(tmp_path):
    """Column names follow ``<setting>_<split>_<epochs>``; ``accuracy`` reads the column of
    its key (epochs given as an int, a numpy int or the command line's text) and nothing
    else, and every column of the benchmark is reachable."""
    t = CsvNb201Table(_table(tmp_path / "t.csv", ALL_METRICS))
    assert sorted(COLUMNS.values()) == sorted(ALL_METRICS)
    for (dataset, split, epochs), column in COLUMNS.items():
        assert column == f"{PREFIX[dataset]}_{split}_{epochs}"
        want = 10.0 * ALL_METRICS.index(column) + 2 + 0.25
        for e in (epochs, np.int64(epochs), str(epochs)):
            assert t.accuracy(2, dataset, split, e) == want == t.query(2, column)


def test_values_follow_their_column_whatever_the_column_order(tmp_path):
    metrics = tuple(reversed(ALL_METRICS[:4]))
    t = CsvNb201Table(_table(tmp_path / "t.csv", metrics))
    for j, m in enumerate(metrics):
        np.testing.assert_array_equal(t.column(m), [10.0 * j + i + 0.25 for i in range(3)])


def test_column_names_an_unknown_metric_and_what_the_table_has(tmp_path):
    t = CsvNb201Table(_table(tmp_path / "t.csv", (SEARCH_METRIC, "c10_test_200")))
    for bad in ("c100_test_200", "c10_test"):
        with pytest.raises(KeyError, match=f"unknown nb201 metric '{bad}'; this table has "
                                           rf"\['{SEARCH_METRIC}', 'c10_test_200'\]"):
            t.column(bad)


SETTING = {"cifar10-valid": 1, "cifar10": 2, "cifar100": 3, "ImageNet16-120": 4}


def _fake_api(monkeypatch, calls: list, package: str = "nats_bench") -> None:
    """A stand-in API package of two cells whose answers encode what was asked: setting,
    schedule, cell and field (valid +0.25, test +0.75)."""
    cells = [_arch(0), _arch(1)]

    class FakeApi(CellListApi):
        def get_more_info(self, index, dataset, iepoch=None, hp="12", is_random=True):
            calls.append((index, dataset, hp, is_random))
            v = 10000 * index + 1000 * SETTING[dataset] + int(hp)
            return {"valid-accuracy": v + 0.25, "test-accuracy": v + 0.75}

    FakeApi.cells = cells
    fake = types.ModuleType(package)
    fake.create = lambda path, space, fast_mode=False, verbose=True: FakeApi()
    fake.API = FakeApi
    monkeypatch.setitem(sys.modules, package, fake)


@pytest.mark.parametrize("column", ALL_METRICS)
def test_the_api_backend_reads_each_column_from_its_setting_split_and_schedule(
        column, monkeypatch, tmp_path):
    """Every column asks ``get_more_info`` for its own setting and schedule (seed average)
    and reads its split's field, as :data:`COLUMNS` names them."""
    (dataset, split, epochs), = [k for k, v in COLUMNS.items() if v == column]
    calls: list = []
    _fake_api(monkeypatch, calls)
    api = ApiNb201Table(tmp_path / "tss", package="nats_bench")
    want = 10000 + 1000 * SETTING[dataset] + epochs + (0.25 if split == "valid" else 0.75)
    assert api.query(1, column) == want
    assert calls == [(1, dataset, str(epochs), False)]


def test_the_api_backend_opens_the_topology_space_and_gives_canonical_strings(
        monkeypatch, tmp_path):
    calls: list = []
    _fake_api(monkeypatch, calls)
    opened = []
    real = sys.modules["nats_bench"].create
    sys.modules["nats_bench"].create = lambda path, space, **kw: opened.append(
        (path, space, kw)) or real(path, space, **kw)
    api = ApiNb201Table(tmp_path / "tss", package="nats_bench")
    assert opened == [(str(tmp_path / "tss"), "tss", {"fast_mode": True, "verbose": False})]
    padded = type(api.api).arch
    monkeypatch.setattr(type(api.api), "arch", lambda self, i: f"  {padded(self, i)} ")
    assert api.arch_str(1) == _arch(1)
    assert api.genotype(1) == ops_to_genotype(str_to_ops(_arch(1)))


@pytest.mark.parametrize("backend, package", [("auto", "nats_bench"),
                                              ("nats_bench", "nats_bench"),
                                              ("nas_201_api", "nas_201_api")])
def test_open_benchmark_uses_the_backend_it_is_given(backend, package, monkeypatch, tmp_path):
    from diffnas.nasbench.table import open_benchmark

    for name in ("nats_bench", "nas_201_api"):
        _fake_api(monkeypatch, [], name)
    folder = tmp_path / "benchmark"
    folder.mkdir()
    bench = open_benchmark(folder, backend)
    assert isinstance(bench, ApiNb201Table) and bench.package == package


def test_a_gzipped_table_is_read_as_csv_by_its_suffix(tmp_path):
    import gzip

    from diffnas.nasbench.table import open_benchmark

    plain = _table(tmp_path / "t.csv", (SEARCH_METRIC,))
    packed = tmp_path / "nb201_compact.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    bench = open_benchmark(packed)
    assert isinstance(bench, CsvNb201Table) and bench.query(_arch(2)) == 2.25


def test_test_metrics_are_every_test_column_and_only_those():
    from diffnas.nasbench.table import REPORT_METRICS, TEST_METRICS

    assert TEST_METRICS == tuple(m for m in ALL_METRICS if m.split("_")[1] == "test")
    assert set(REPORT_METRICS) <= set(TEST_METRICS) and SEARCH_METRIC not in TEST_METRICS


# --- the runner ----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", [SEARCH_METRIC, "c10valid_valid_12", "c100_valid_12"])
def test_the_oracle_of_a_search_reads_the_metric_it_is_given_and_nothing_else(metric):
    from diffnas.nasbench.runner import make_oracle

    bench = _Space()
    oracle = make_oracle(bench, 2, metric)
    code = 1 * 5 ** 5 + 2 * 5 + 4  # cell (1, 0, 0, 0, 2, 4)
    assert oracle.query((1, 0, 0, 0, 2, 4)) == 100.0 * ALL_METRICS.index(metric) + code / 1000
    assert bench.reads == [(code, metric)]


@pytest.mark.parametrize("metric", ["c10_test_200", "c10valid_test_200", "in16_test_200"])
def test_the_oracle_of_a_search_refuses_every_test_column(metric):
    from diffnas.nasbench.runner import make_oracle

    with pytest.raises(ValueError, match=f"must not see a test metric, got '{metric}'"):
        make_oracle(_Space(), 2, metric)


class _Probe:
    """A strategy that spends ``n`` of its budget on cells drawn from its generator and
    chooses the *worst* of them (its own objective), recording the draws."""

    def __init__(self, n: int) -> None:
        self.n, self.draws, self.config = n, [], None

    def search(self, oracle, rng) -> None:
        while oracle.used < self.n:
            cell = tuple(int(i) for i in rng.integers(0, 5, 6))
            self.draws.append(cell)
            oracle.query(cell)

    def choose(self, oracle):
        return min(oracle.history, key=lambda item: item[1])

    def describe_choice(self, cell) -> dict:
        return {"code": sum(c * 5 ** (5 - e) for e, c in enumerate(cell))}


@pytest.mark.parametrize("seed", [0, 7])
def test_an_outcome_is_the_strategy_s_choice_with_its_seed_and_the_queries_spent(
        seed, monkeypatch):
    from diffnas.nasbench import runner
    from diffnas.nasbench.table import REPORT_METRICS

    probe = _Probe(3)
    monkeypatch.setattr(runner, "create_query_strategy", lambda name, settings: probe)
    bench = _Space()
    out = runner.run_query_search("probe", bench, budget=10, seed=seed)
    rng = np.random.default_rng(seed)  # the draws replayed by hand
    drawn = []
    while len(set(drawn)) < 3:
        drawn.append(tuple(int(i) for i in rng.integers(0, 5, 6)))
    assert probe.draws == drawn
    codes = [sum(c * 5 ** (5 - e) for e, c in enumerate(cell)) for cell in drawn]
    worst = min(codes)
    assert (out.strategy, out.seed, out.budget, out.queries) == ("probe", seed, 10, 3)
    assert out.index == worst and out.arch_str == _arch(worst)
    assert out.valid_acc == worst / 1000 and out.extras == {"code": worst}
    assert out.test == {m: 100.0 * ALL_METRICS.index(m) + worst / 1000 for m in REPORT_METRICS}
    # only the validation column was read before the search returned
    n_valid = len(set(drawn))
    assert {m for _, m in bench.reads[:n_valid]} == {SEARCH_METRIC}


def test_a_resolved_config_compares_equal_to_its_json_read_back_whatever_its_keys():
    """An outcome's config is compared with one read back from a JSON file (a rerun, the
    summary): a setting keyed by numbers must already have JSON's string keys."""
    from dataclasses import dataclass, field

    from diffnas.nasbench.runner import resolved_config

    @dataclass
    class Config:
        weights: dict = field(default_factory=lambda: {1: 0.5, 2: (1, 2)})

    got = resolved_config(Config())
    assert got == json.loads(json.dumps(got)) == {"weights": {"1": 0.5, "2": [1, 2]}}


# --- the command line ----------------------------------------------------------------------
def test_summary_refuses_to_write_over_an_input_given_by_another_spelling(
        tmp_path, monkeypatch, capsys):
    from diffnas.cli import main

    (tmp_path / "sub").mkdir()
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"outcomes": []}))
    before = f.read_text()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["bench", "nb201-summary", "../b.json", "--json", str(f)]) == 2
    assert "--json " + str(f) + " is one of the files summarised" in capsys.readouterr().err
    assert f.read_text() == before


def test_summary_names_a_json_file_without_outcomes(tmp_path, capsys):
    from diffnas.cli import main

    f = tmp_path / "other.json"
    f.write_text(json.dumps({"summary": []}))
    assert main(["bench", "nb201-summary", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: not a 'bench nb201' JSON file (no 'outcomes')" in err
    assert "Traceback" not in err


def test_a_folder_table_is_identified_by_its_absolute_resolved_path(tmp_path, monkeypatch):
    from diffnas.nasbench.cli import table_identity

    (tmp_path / "bench" / "tss").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "bench")
    want = {"path": str((tmp_path / "bench" / "tss").resolve())}
    assert table_identity("tss") == want == table_identity("./tss/../tss")
    assert Path(want["path"]).is_absolute()


def test_a_table_is_opened_once_for_every_search_on_it(monkeypatch):
    """The worker keeps each opened table (reading the 15625-row CSV per search would
    cost more than many searches)."""
    import diffnas.nasbench.runner as runner
    import diffnas.nasbench.table as table_module
    from diffnas.nasbench import cli

    opened: list = []
    monkeypatch.setattr(cli, "_BENCH_CACHE", {})
    monkeypatch.setattr(table_module, "open_benchmark",
                        lambda path: opened.append(path) or _Space())

    class Outcome:
        def __init__(self, bench, seed):
            self.bench, self.seed = bench, seed

        def to_dict(self):
            return {"bench": self.bench, "seed": self.seed}

    monkeypatch.setattr(runner, "run_query_search",
                        lambda s, bench, b, seed, settings: Outcome(bench, seed))
    got = [cli._one(("random", table, 5, seed, {"x": 1}))
           for table, seed in [("a.csv", 0), ("a.csv", 1), ("b.csv", 0), ("a.csv", 2)]]
    assert opened == ["a.csv", "b.csv"]
    assert got[0]["bench"] is got[1]["bench"] is got[3]["bench"] is not got[2]["bench"]
    assert [o["seed"] for o in got] == [0, 1, 0, 2]
    assert all(o["settings"] == {"x": 1} for o in got)


# --- the graph encoder ----------------------------------------------------------------------
def test_normalized_adds_self_loops_and_divides_each_row_by_its_sum():
    from diffnas.nasbench.graph import normalized

    A = torch.tensor([[[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    want = torch.tensor([[[1 / 3, 1 / 3, 1 / 3], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]],
                        dtype=torch.float64)
    torch.testing.assert_close(normalized(A), want, rtol=0, atol=1e-15)


def test_the_forward_operator_averages_a_node_with_its_predecessors():
    from diffnas.nasbench.encoding import graph_arrays
    from diffnas.nasbench.graph import graph_tensors

    cells = np.array([[0, 1, 2, 3, 4, 0], [3, 3, 3, 3, 3, 3]], dtype=np.int64)
    A_f, A_b, X = graph_tensors(cells)
    A, feats = graph_arrays(cells)
    for n in range(len(cells)):
        for j in range(A.shape[1]):
            preds = [i for i in range(A.shape[1]) if A[n, i, j]] + [j]
            succs = [k for k in range(A.shape[1]) if A[n, j, k]] + [j]
            for i in range(A.shape[1]):
                assert float(A_f[n, j, i]) == pytest.approx((i in preds) / len(preds))
                assert float(A_b[n, j, i]) == pytest.approx((i in succs) / len(succs))
    np.testing.assert_array_equal(X.numpy(), feats)


def test_the_graph_encoder_replayed_by_hand_in_float64():
    from diffnas.nasbench.graph import GraphEncoder, graph_tensors

    torch.manual_seed(0)
    enc = GraphEncoder(hidden=5, layers=2).double()
    assert [(f.in_features, f.out_features) for f in enc.fwd] == [(7, 5), (5, 5)]
    assert [len(GraphEncoder(hidden=3, layers=k).bwd) for k in (1, 4)] == [1, 4]
    A_f, A_b, X = (t.double() for t in graph_tensors(np.array([[0, 1, 2, 3, 4, 0],
                                                                  [2, 2, 0, 1, 3, 4]])))
    h = X
    for f, b in zip(enc.fwd, enc.bwd, strict=True):
        fh = h @ f.weight.T + f.bias
        bh = h @ b.weight.T + b.bias
        h = (0.5 * (A_f @ fh + A_b @ bh)).clamp(min=0)
    torch.testing.assert_close(enc(A_f, A_b, X), h.sum(1) / h.shape[1], rtol=1e-12, atol=1e-12)
