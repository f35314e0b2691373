"""Rules of the NAS-Bench-201 command line, runner, table and cell encoding that a mutation
audit could break and the other nb201 tests did not check: the parsing of comma-separated
lists and ``--set key=value`` items, which outcomes of a sidecar a rerun reuses and what it
sets aside, the checks and merging of 'bench nb201' files for ``nb201-summary``, the
summary statistics (replayed by hand in float64), the CSV table's parsing and lookups on
tiny made-up tables, and the base-5 cell code and graph encoding. The strategies
themselves are covered by test_nb201_rules.py and test_nb201_bench.py."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffnas.genotype import GenotypeError
from diffnas.nasbench import cli
from diffnas.nasbench.cli import (
    _check_outcomes,
    _csv_list,
    _reusable,
    _settings,
    merge_outcomes,
    partial_path,
    set_aside_path,
    table_identity,
)
from diffnas.nasbench.runner import paired_comparison, summarize
from diffnas.nasbench.table import REPORT_METRICS, SEARCH_METRIC, CsvNb201Table
from diffnas.spaces.nb201 import NB201_OPS, ops_to_str


# --- helpers ---------------------------------------------------------------------------
def _outcome(strategy: str = "rea", budget: int = 10, seed: int = 0, **kw) -> dict:
    """One outcome as 'bench nb201' writes it (settings, resolved config and code
    recorded); ``kw`` replaces any field."""
    base = {"strategy": strategy, "seed": seed, "budget": budget, "queries": budget,
            "arch_str": "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "index": 0,
            "valid_acc": 80.0 + seed, "test": {m: 90.0 + seed for m in REPORT_METRICS},
            "seconds": 0.5, "config": {"population": 10} if strategy == "rea" else {},
            "extras": {}, "settings": {}, "code": {"diffnas": "1", "commit": None,
                                                   "dirty": None}}
    return {**base, **kw}


def _arch(k: int) -> str:
    """The nb201 string of the cell with base-5 code ``k``."""
    digits = [(k // 5 ** (5 - e)) % 5 for e in range(6)]
    return ops_to_str([NB201_OPS[d] for d in digits])


def _write_table(path: Path, rows: list[list], header: str | None = None) -> Path:
    header = header or f"index,arch_str,{SEARCH_METRIC},c10_test_200"
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


# --- comma-separated lists and --set items ---------------------------------------------
@pytest.mark.parametrize("text, kind, expected", [
    ("10, ,20,", int, [10, 20]),  # empty items (a trailing comma, a blank) are skipped
    (" random ,rea", str, ["random", "rea"]),
    (",5", int, [5]),
])
def test_csv_list_strips_items_and_skips_empty_ones(text, kind, expected):
    assert _csv_list(text, "--budget", kind) == expected


@pytest.mark.parametrize("text, kind, problem", [
    ("10,x", int, "--budget: 'x' is not an integer (in --budget 10,x, a comma-separated"),
    ("1.5,abc", float, "--budget: 'abc' is not a valid float (in --budget 1.5,abc"),
    (" , ,", int, "--budget: empty; give a comma-separated list"),
    ("", str, "--budget: empty"),
    ("3,4,3,4,5", int, "--budget: 3, 4 given more than once"),
])
def test_csv_list_names_the_flag_and_the_bad_item(text, kind, problem):
    with pytest.raises(ValueError) as err:
        _csv_list(text, "--budget", kind)
    assert str(err.value).startswith(problem)


def test_set_items_split_at_the_first_equals_sign_and_need_one():
    """``key=value``: the value is YAML and may hold '=' itself; an item without '=' is
    named; a key written with spaces is the same key (set twice -> refused)."""
    assert _settings(["note=a=b", " k =1"]) == {"note": "a=b", "k": 1}
    with pytest.raises(ValueError, match=r"^--set expects key=value, got 'population'$"):
        _settings(["population"])
    with pytest.raises(ValueError, match="--set population is given twice, as 20 and 30"):
        _settings(["population=20", "population =30"])
    assert _settings(["population=20", "population =30"], repeats=True) == {"population": 30}


# --- the sidecar: what a rerun reuses, what it sets aside -------------------------------
CODE = {"diffnas": "1", "commit": "a" * 40, "dirty": False}
TABLE = {"sha256": "b" * 64}


def _sidecar_row(strategy: str, seed: int, **kw) -> dict:
    return _outcome(strategy, 10, seed, **{"code": CODE, "table": TABLE, **kw})


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_a_rerun_reuses_only_matching_outcomes_and_sets_the_others_aside(tmp_path, capsys):
    """Each sidecar row is reused only when it is one of the tasks, not a repeat, with the
    same --set values AND resolved config, the same table and the same code. The others
    are appended (after what the set-aside file held) in their order; the sidecar keeps
    only the reused rows; a reused outcome does not carry its table."""
    tasks = [("rea", "t.csv", 10, 0, {}), ("rea", "t.csv", 10, 1, {}),
             ("random", "t.csv", 10, 0, {})]
    expected = {"rea": {"settings": {}, "config": {"population": 10}},
                "random": {"settings": {}, "config": {}}}
    rows = [
        _sidecar_row("rea", 0),  # reused: task 0
        _sidecar_row("rea", 0, valid_acc=1.0),  # a repeat of task 0
        # the same resolved config, but --set differs: not the same command
        _sidecar_row("rea", 1, settings={"population": 10}),
        _sidecar_row("random", 0, code={**CODE, "commit": "c" * 40}),  # other code
        _sidecar_row("rea", 7),  # not one of this command's searches
        _sidecar_row("random", 0, table={"sha256": "d" * 64}),  # another table
    ]
    sidecar, aside = tmp_path / "x.json.partial.jsonl", tmp_path / "x.json.set-aside.jsonl"
    sidecar.write_text(_lines(rows))
    aside.write_text("earlier\n")
    reused = _reusable(sidecar, aside, tasks, expected, CODE, TABLE)
    assert reused == {0: {k: v for k, v in rows[0].items() if k != "table"}}
    assert aside.read_text().splitlines() == ["earlier", *map(json.dumps, rows[1:])]
    assert sidecar.read_text() == _lines(rows[:1])
    err = capsys.readouterr().err
    assert (f"{sidecar}: not reusing 5 outcomes (1 a repeat, 1 other settings, 1 other code "
            f"(diffnas 1 at commit cccccccccccc), 1 not one of this command's searches, "
            f"1 another table); they are moved to {aside}") in err


def test_a_rerun_whose_config_differs_with_equal_settings_is_not_reused(tmp_path):
    """The resolved config is compared too: the same --set values under other defaults
    (another diffnas) ran other searches."""
    tasks = [("rea", "t.csv", 10, 0, {})]
    sidecar, aside = tmp_path / "s.jsonl", tmp_path / "a.jsonl"
    row = _sidecar_row("rea", 0, config={"population": 20})
    sidecar.write_text(_lines([row]))
    expected = {"rea": {"settings": {}, "config": {"population": 10}}}
    assert _reusable(sidecar, aside, tasks, expected, CODE, TABLE) == {}
    assert sidecar.read_text() == "" and aside.read_text() == _lines([row])


def test_a_torn_last_line_is_dropped_even_when_every_row_is_reused(tmp_path):
    tasks = [("random", "t.csv", 10, s, {}) for s in range(2)]
    rows = [_sidecar_row("random", s) for s in range(2)]
    sidecar, aside = tmp_path / "s.jsonl", tmp_path / "a.jsonl"
    sidecar.write_text(_lines(rows) + json.dumps(rows[0])[:25])
    expected = {"random": {"settings": {}, "config": {}}}
    assert sorted(_reusable(sidecar, aside, tasks, expected, CODE, TABLE)) == [0, 1]
    assert sidecar.read_text() == _lines(rows) and not aside.exists()


def test_the_sidecar_set_aside_and_lock_paths_sit_beside_json():
    """docs/nb201.md names them: <json>.partial.jsonl, <json>.set-aside.jsonl, <json>.lock."""
    assert partial_path("out/b.json") == Path("out/b.json.partial.jsonl")
    assert set_aside_path("out/b.json") == Path("out/b.json.set-aside.jsonl")
    assert cli.lock_path("out/b.json") == Path("out/b.json.lock")


def test_table_identity_is_the_hash_of_the_bytes_wherever_the_file_lies(tmp_path):
    import hashlib

    body = b"index,arch_str\n" * 1000
    a, b = tmp_path / "a.csv", tmp_path / "sub" / "b.csv"
    b.parent.mkdir()
    a.write_bytes(body)
    b.write_bytes(body)
    assert table_identity(a) == table_identity(b) == {"sha256": hashlib.sha256(body).hexdigest()}
    b.write_bytes(body + b"x")
    assert table_identity(b) != table_identity(a)
    assert table_identity(tmp_path) == {"path": str(tmp_path.resolve())}  # an API folder


def test_code_version_agrees_with_git_on_the_commit_and_uncommitted_changes():
    """``dirty`` is whether git sees changes under src/diffnas (replayed with git itself),
    ``commit`` the checked-out commit; both None outside a git checkout."""
    import subprocess
    from importlib.metadata import version

    pkg = Path(cli.__file__).resolve().parents[1]
    code = cli.code_version()
    assert code["diffnas"] == version("diffnas")

    def git(*argv):
        done = subprocess.run(["git", "-C", str(pkg), *argv], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    if not git("ls-files", "--", "__init__.py"):
        assert code["commit"] is None and code["dirty"] is None
        return
    assert code["commit"] == git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    assert code["dirty"] is (status != "")


@pytest.mark.parametrize("code, name", [
    (None, "an unrecorded diffnas version"),
    ({"diffnas": None}, "diffnas (version unknown)"),
    ({"diffnas": "2.1", "commit": "0123456789abcdef", "dirty": False},
     "diffnas 2.1 at commit 0123456789ab"),
    ({"diffnas": "2.1", "commit": "0123456789abcdef", "dirty": True},
     "diffnas 2.1 at commit 0123456789ab with uncommitted changes"),
    ({"diffnas": "2.1", "commit": None, "dirty": True}, "diffnas 2.1"),
])
def test_code_name_says_the_version_the_short_commit_and_uncommitted_changes(code, name):
    assert cli._code_name(code) == name


# --- nb201-summary: merging files like with like -----------------------------------------
def _file(*outcomes: dict, strategy: str = "random,rea", sets: list | None = None,
          table: dict | None = None) -> dict:
    data = {"command": "diffnas bench nb201", "args": {"strategy": strategy, "set": sets or []},
            "outcomes": list(outcomes)}
    if table is not None:
        data["table"] = table
    return data


def _legacy(o: dict) -> dict:
    """``o`` as written before outcomes recorded their settings, config and code."""
    return {k: v for k, v in o.items() if k not in ("settings", "config", "code")}


def test_merging_other_code_warns_once_per_pair_of_files_and_keeps_every_seed():
    """Equal settings from two code versions merge with ONE warning naming both (not one
    per outcome); the same settings from the same code merge silently."""
    other = {"diffnas": "1", "commit": "e" * 40, "dirty": True}
    a = _file(*(_outcome("rea", seed=s) for s in range(3)))
    b = _file(*(_outcome("rea", seed=s, code=other) for s in range(3, 6)))
    merged, warnings = merge_outcomes([("a.json", a), ("b.json", b)])
    assert sorted(o["seed"] for o in merged) == list(range(6))
    assert warnings == [
        "strategy 'rea': merged outcomes of diffnas 1 (a.json) and of diffnas 1 at commit "
        "eeeeeeeeeeee with uncommitted changes (b.json); their settings agree, but a change "
        "of the code that kept the settings would not show here"]
    assert merge_outcomes([("a.json", a), ("c.json", _file(_outcome("rea", seed=9)))])[1] == []


def test_a_setting_recorded_in_one_config_only_is_named_as_not_recorded():
    a = _file(_outcome("rea", seed=0))
    b = _file(_outcome("rea", seed=1, config={"population": 10, "sample_size": 3}))
    with pytest.raises(ValueError) as err:
        merge_outcomes([("a.json", a), ("b.json", b)])
    assert ("strategy 'rea' ran with other settings in a.json and in b.json "
            "(sample_size: '(not recorded)' vs 3): one row cannot mix them") in str(err.value)


def test_a_legacy_file_is_checked_against_the_set_values_of_a_recording_one():
    """Even with --allow-legacy, a legacy run made with other --set values than a newer
    recording run of the same strategy is refused, naming both values and files."""
    new = _file(_outcome("rea", seed=0, settings={"population": 3},
                         config={"population": 3}))
    old = _file(_legacy(_outcome("rea", seed=1)), sets=["rea.population=5"])
    for allow in (False, True):
        with pytest.raises(ValueError) as err:
            merge_outcomes([("new.json", new), ("old.json", old)], allow_legacy=allow)
        assert ("strategy 'rea' ran with settings {'population': 3} in new.json and "
                "{'population': 5} in old.json") in str(err.value)
    same = _file(_legacy(_outcome("rea", seed=1)), sets=["population=3"])
    merged, warnings = merge_outcomes([("new.json", new), ("old.json", same)], True)
    assert len(merged) == 2 and "merged as --allow-legacy asks" in warnings[0]


def test_legacy_files_are_compared_with_the_first_legacy_file_of_the_strategy():
    files = [(f"{n}.json", _file(_legacy(_outcome("rea", seed=i)), sets=[f"population={p}"]))
             for i, (n, p) in enumerate((("a", 20), ("b", 20), ("c", 30)))]
    with pytest.raises(ValueError, match=r"ran with settings \{'population': 20\} in a\.json "
                                         r"and \{'population': 30\} in c\.json"):
        merge_outcomes(files)


def test_a_legacy_files_settings_come_from_its_strategy_and_set_arguments_as_they_ran():
    """The --strategy list (also a strategy without outcomes) decides who takes a plain
    --set value; a key set twice reads as the last one (as the run did then)."""
    data = _file(_legacy(_outcome("random", seed=0)), strategy="random, rea",
                 sets=["population=20", "population=30"])
    assert cli._file_settings(data) == {"random": {}, "rea": {"population": 30}}
    no_args = {"outcomes": [_legacy(_outcome("rea"))]}
    assert cli._file_settings(no_args) == {"rea": {}}


def test_a_file_whose_set_values_no_strategy_takes_is_named():
    bad = _file(_legacy(_outcome("rea")), sets=["rea.nope=1"])
    with pytest.raises(ValueError) as err:
        merge_outcomes([("bad.json", bad)])
    assert str(err.value).startswith("bad.json: cannot tell the settings its runs used "
                                     "(--set rea.nope: strategy 'rea' has no setting 'nope'")


def test_a_file_of_a_strategy_renamed_since_merges_or_is_named():
    """Outcomes that record their settings need no strategy of today's code to merge; a
    legacy outcome's settings come from the command's --set, which only the strategy can
    read: the error names the file (it escaped as a KeyError naming no file)."""
    gone = _file(_outcome("oldname", config={}), strategy="oldname")
    merged, _ = merge_outcomes([("gone.json", gone)])
    assert [o["strategy"] for o in merged] == ["oldname"]
    legacy = {k: v for k, v in _outcome("oldname").items() if k not in ("settings", "config")}
    with pytest.raises(ValueError, match=r"gone\.json: cannot tell the settings its runs "
                                         r"used \(unknown query strategy 'oldname'"):
        merge_outcomes([("gone.json", _file(legacy, strategy="oldname"))])


def test_the_same_run_in_two_files_counts_once_and_another_result_is_refused():
    a = _file(_outcome("rea", seed=1), _outcome("random", seed=1))
    b = _file(_outcome("rea", seed=1, seconds=9.0))  # only the time differs: the same run
    merged, _ = merge_outcomes([("a.json", a), ("b.json", b)])
    assert sorted((o["strategy"], o["seed"]) for o in merged) == [("random", 1), ("rea", 1)]
    assert next(o for o in merged if o["strategy"] == "rea")["seconds"] == 0.5  # the first
    for key, value in (("arch_str", _arch(7)), ("index", 7), ("queries", 9),
                       ("test", {"c10_test_200": 1.0})):
        c = _file(_outcome("rea", seed=1, **{key: value}))
        with pytest.raises(ValueError, match=f"seed 1 is in a.json and in c.json with "
                                             f"different results \\({key}: "):
            merge_outcomes([("a.json", a), ("c.json", c)])


def test_files_of_different_tables_are_refused_but_an_unrecorded_table_is_not():
    t1, t2 = {"sha256": "1" * 64}, {"sha256": "2" * 64}
    a = _file(_outcome("random", seed=0), table=t1)
    legacy = _file(_outcome("random", seed=1))  # written before files recorded the table
    b = _file(_outcome("random", seed=2), table=t2)
    assert len(merge_outcomes([("a.json", a), ("old.json", legacy)])[0]) == 2
    with pytest.raises(ValueError, match=r"a\.json and b\.json were searched on different "
                                         r"NAS-Bench-201 tables \(sha256: '1+' vs '2+'\)"):
        merge_outcomes([("a.json", a), ("old.json", legacy), ("b.json", b)])


# --- the summary and the paired comparison, replayed by hand -------------------------------
def _sign_test_by_enumeration(d: list[float]) -> float:
    """Two-sided exact sign test: the share of the 2^n sign patterns of the non-zero
    differences with at most as few of one sign as observed."""
    signs = [x > 0 for x in d if x != 0]
    n, k = len(signs), min(sum(signs), len(signs) - sum(signs))
    if n == 0:
        return 1.0
    hits = sum(min(sum(p), n - sum(p)) <= k for p in itertools.product((0, 1), repeat=n))
    return hits / 2 ** n


@pytest.mark.parametrize("a, b", [
    ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]),  # 2 wins, 2 losses: p is 1, not 22/16
    ([3.0, 2.0, 5.0, 5.0, 1.0], [1.0, 2.0, 4.0, 5.5, 1.0]),  # ties are dropped
    ([0.25, 0.5, 0.75, 1.0, 2.0, 3.0], [0.0] * 6),
    ([1.0, 2.0], [1.0, 2.0]),
])
def test_paired_comparison_counts_and_sign_test_by_hand(a, b):
    r = paired_comparison(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    assert (r["wins"], r["ties"], r["losses"]) == (sum(x > 0 for x in d), sum(x == 0 for x in d),
                                                   sum(x < 0 for x in d))
    assert r["mean_diff"] == pytest.approx(math.fsum(d) / len(d), abs=1e-12)
    assert r["sign_test_p"] == pytest.approx(_sign_test_by_enumeration(d), abs=1e-12)
    assert 0.0 < r["sign_test_p"] <= 1.0


def test_paired_comparison_refuses_empty_lists():
    with pytest.raises(ValueError, match="two equally long, non-empty lists"):
        paired_comparison([], [])


def _run(strategy, budget, seed, c10, queries=None, seconds=1.0, **kw):
    test = {"c10_test_200": c10, "c100_test_200": c10 / 2, "in16_test_200": c10 - 40.0 + seed}
    return _outcome(strategy, budget, seed, test=test, valid_acc=c10 - 5.0 + 0.5 * seed,
                    queries=budget if queries is None else queries, seconds=seconds, **kw)


def _stat(values):
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return {"mean": pytest.approx(mean), "std": None}
    return {"mean": pytest.approx(mean),
            "std": pytest.approx(math.sqrt(math.fsum((v - mean) ** 2 for v in values)
                                           / (len(values) - 1)))}


def test_summary_groups_by_strategy_and_budget_and_pairs_with_random_by_seed():
    """Mean and sample std per (strategy, budget) over every seed; each strategy is
    compared with random search at its own budget, seed by seed (whatever the order),
    on c10_test_200 and only over the seeds both ran; random is not compared with itself."""
    outcomes = [
        _run("random", 10, 0, 90.0), _run("random", 10, 1, 91.0), _run("random", 10, 2, 95.0),
        _run("rea", 10, 2, 96.0, queries=8, seconds=3.0), _run("rea", 10, 0, 92.0, queries=10),
        _run("rea", 10, 1, 90.0, queries=9, seconds=2.0),
        _run("rea", 10, 5, 99.0, queries=10),  # no random run with seed 5
        _run("random", 20, 0, 80.0), _run("random", 20, 1, 85.0), _run("gcn", 20, 1, 84.5),
    ]
    report = summarize(outcomes)
    entries = {(e["strategy"], e["budget"]): e for e in report["summary"]}
    assert list(entries) == [("random", 10), ("rea", 10), ("random", 20), ("gcn", 20)]
    for (s, b), e in entries.items():
        rows = [o for o in outcomes if (o["strategy"], o["budget"]) == (s, b)]
        assert e["seeds"] == len(rows)
        for m in REPORT_METRICS:
            assert e[m] == _stat([o["test"][m] for o in rows])
        assert e["valid"] == _stat([o["valid_acc"] for o in rows])
        assert e["queries"] == pytest.approx(math.fsum(o["queries"] for o in rows) / len(rows))
        assert e["seconds_per_run"] == pytest.approx(
            math.fsum(o["seconds"] for o in rows) / len(rows))
        assert "predicted_latency_ms" not in e
    paired = {(p["strategy"], p["budget"]): p for p in report["paired"]}
    assert set(paired) == {("rea", 10), ("gcn", 20)}
    rea = paired[("rea", 10)]  # seeds 0, 1, 2: +2, -1, +1
    assert rea["metric"] == "c10_test_200" and rea["seeds"] == 3
    assert rea["mean_diff"] == pytest.approx(2 / 3)
    assert (rea["wins"], rea["ties"], rea["losses"]) == (2, 0, 1)
    gcn = paired[("gcn", 20)]
    assert gcn["seeds"] == 1 and gcn["mean_diff"] == pytest.approx(-0.5)
    assert [ln.split(" (")[0] for ln in report["paired_lines"]] == [
        "rea vs random @ 10", "gcn vs random @ 20"]


def test_summary_table_rows_start_with_the_strategy_left_aligned_and_line_up():
    report = summarize([_run("rea", 10, s, 90.0 + s) for s in range(3)])
    header, rule, row = report["table"].splitlines()
    assert header.startswith("strategy ") and row.startswith("rea ")
    assert len(header) == len(rule) == len(row)
    assert row.split()[:3] == ["rea", "10", "3"]


def test_predicted_latency_is_summarised_only_when_every_seed_has_one():
    lat = [_run("reinforce", 10, s, 90.0, extras={"predicted_latency_ms": 2.0 + s})
           for s in range(3)]
    e = summarize(lat)["summary"][0]
    assert e["predicted_latency_ms"] == _stat([2.0, 3.0, 4.0])
    mixed = [*lat[:2], _run("reinforce", 10, 2, 90.0)]
    e = summarize(mixed)["summary"][0]
    assert "predicted_latency_ms" not in e


# --- the CSV table on tiny made-up tables -------------------------------------------------
def _tiny(tmp_path: Path, n: int = 4, name: str = "t.csv") -> Path:
    return _write_table(tmp_path / name, [[i, _arch(i), 50.0 + i, 60.0 + 2 * i]
                                          for i in range(n)])


def test_a_tiny_table_answers_lookups_by_index_string_and_op_names(tmp_path):
    t = CsvNb201Table(_tiny(tmp_path))
    assert len(t) == 4 and t.metrics == (SEARCH_METRIC, "c10_test_200")
    for i in range(4):
        assert t.arch_str(i) == _arch(i)
        assert t.index_of(_arch(i)) == i == t.index_of(np.int64(i))
        assert t.query(i) == 50.0 + i and t.query(_arch(i), "c10_test_200") == 60.0 + 2 * i
        assert t.accuracy(i, "cifar10", "test", 200) == 60.0 + 2 * i
    assert t.record(3) == {"index": 3, "arch_str": _arch(3), SEARCH_METRIC: 53.0,
                           "c10_test_200": 66.0}


@pytest.mark.parametrize("bad", [4, -1, True, np.True_])
def test_an_index_outside_the_table_or_a_bool_is_refused(bad, tmp_path):
    t = CsvNb201Table(_tiny(tmp_path))
    with pytest.raises(GenotypeError, match="out of range 0..3|is not an nb201 cell"):
        t.index_of(bad)
    with pytest.raises(GenotypeError):
        t.arch_str(bad)


def test_column_is_a_copy(tmp_path):
    t = CsvNb201Table(_tiny(tmp_path))
    col = t.column("c10_test_200")
    col[:] = 0.0
    assert t.query(1, "c10_test_200") == 62.0
    np.testing.assert_array_equal(t.column("c10_test_200"), [60.0, 62.0, 64.0, 66.0])


def test_a_gzipped_table_and_blank_lines_and_padded_strings_are_read(tmp_path):
    import gzip

    text = (f"index,arch_str,{SEARCH_METRIC}\n0, {_arch(0)} ,50.5\n\n1,{_arch(1)},51.5\n\n")
    plain = tmp_path / "t.csv"
    plain.write_text(text)
    packed = tmp_path / "t.csv.gz"
    with gzip.open(packed, "wt") as f:
        f.write(text)
    for path in (plain, packed):
        t = CsvNb201Table(path)
        assert len(t) == 2 and t.arch_str(0) == _arch(0) and t.query(_arch(1)) == 51.5


@pytest.mark.parametrize("content, problem", [
    ("", "empty NAS-Bench-201 table"),
    (f"index,arch_str,{SEARCH_METRIC},{SEARCH_METRIC}\n0,{_arch(0)},1,2\n",
     f"column(s) {SEARCH_METRIC} appear more than once in the header"),
    (f"arch_str,{SEARCH_METRIC}\n{_arch(0)},1\n", "lacks column 'index'"),
    (f"index,{SEARCH_METRIC}\n0,1\n", "lacks column 'arch_str'"),
    ("index,arch_str,acc\n0,x,1\n", "no accuracy columns among"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(0)},1\n1,{_arch(1)}\n", "line 3: 2 values for 3"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(0)},1\n5,{_arch(1)},1\n2,{_arch(2)},1\n",
     "the index column must hold 0..2 once each"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(0)},1\n0,{_arch(1)},1\n",
     "the index column must hold 0..1 once each"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(3)},1\n1,{_arch(3)},2\n",
     "some arch_str appears more than once"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(0)},1\n1,{_arch(1)},nan\n",
     f"line 3: {SEARCH_METRIC} not finite"),
    (f"index,arch_str,{SEARCH_METRIC}\n0,{_arch(0)},1\n1,|nor_conv_3x3~0|,2\n",
     "line 3: nb201 string needs"),
])
def test_a_malformed_table_is_refused_naming_the_problem(content, problem, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        CsvNb201Table(path)
    assert str(err.value).startswith(f"{path}") and problem in str(err.value)


def test_open_benchmark_picks_the_csv_backend_by_suffix_and_needs_a_path(tmp_path):
    from diffnas.nasbench.table import open_benchmark

    assert isinstance(open_benchmark(_tiny(tmp_path)), CsvNb201Table)
    assert isinstance(open_benchmark(_tiny(tmp_path, name="t.txt"), "csv"), CsvNb201Table)
    with pytest.raises(ValueError, match="the CSV backend needs a table path"):
        open_benchmark(None, "csv")
    with pytest.raises(FileNotFoundError, match="NAS-Bench-201 file not found"):
        open_benchmark(tmp_path / "nope.pkl")


# --- the cell encoding ------------------------------------------------------------------------
def test_the_cell_code_is_base_5_in_edge_order_and_indexes_all_cells_array():
    from diffnas.nasbench.encoding import all_cells_array, code_of

    cells = all_cells_array()
    assert cells.shape == (5 ** 6, 6) and not cells.flags.writeable
    rng = np.random.default_rng(0)
    for c in [(0,) * 6, (4,) * 6, (0, 0, 0, 0, 0, 1), (1, 0, 0, 0, 0, 0),
              *(tuple(int(v) for v in rng.integers(0, 5, 6)) for _ in range(20))]:
        code = int("".join(map(str, c)), 5)
        assert code_of(c) == code
        assert tuple(cells[code]) == c
    with pytest.raises(ValueError):
        cells[0, 0] = 1


def test_random_cells_use_every_op_on_every_edge():
    from diffnas.nasbench.encoding import random_cell

    rng = np.random.default_rng(0)
    drawn = np.array([random_cell(rng) for _ in range(300)])
    assert drawn.shape == (300, 6)
    for e in range(6):
        assert set(drawn[:, e].tolist()) == set(range(5))


def test_a_mutation_reaches_each_other_op_of_one_edge_and_never_the_same():
    from diffnas.nasbench.encoding import mutate

    rng = np.random.default_rng(1)
    cell = (0, 1, 2, 3, 4, 2)
    seen: dict[int, set] = {e: set() for e in range(6)}
    for _ in range(600):
        new = mutate(cell, rng)
        changed = [e for e in range(6) if new[e] != cell[e]]
        assert len(changed) == 1 and 0 <= new[changed[0]] < 5
        seen[changed[0]].add(new[changed[0]])
    assert seen == {e: set(range(5)) - {cell[e]} for e in range(6)}


def test_one_hot_puts_edge_e_op_k_at_position_5e_plus_k():
    from diffnas.nasbench.encoding import one_hot

    cells = np.array([[0, 1, 2, 3, 4, 0], [4, 4, 0, 1, 3, 2]])
    out = one_hot(cells)
    expected = np.zeros((2, 30), dtype=np.float32)
    for n, c in enumerate(cells):
        for e, k in enumerate(c):
            expected[n, 5 * e + k] = 1
    np.testing.assert_array_equal(out, expected)


def test_graph_arrays_follow_the_cell_by_hand():
    """Node 0 input, 1..6 the op of each edge (s -> d), 7 output: op node k reads the input
    (s = 0) or each op node ending in s, feeds the output when d = 3; a ``none`` op node
    has no edges. Features: input, output, then the op one-hot."""
    from diffnas.nasbench.encoding import NONE, graph_arrays
    from diffnas.spaces.nb201 import NB201_EDGES

    rng = np.random.default_rng(3)
    cells = np.array([[0, 1, 2, 3, 4, 1], [NONE, 2, NONE, 3, 1, NONE],
                      *rng.integers(0, 5, (6, 6))])
    A, X = graph_arrays(cells)
    for n, cell in enumerate(cells):
        want = np.zeros((8, 8), dtype=np.float32)
        for k, (s, d) in enumerate(NB201_EDGES, start=1):
            if cell[k - 1] == NONE:
                continue
            if s == 0:
                want[0, k] = 1
            for j, (_, d2) in enumerate(NB201_EDGES, start=1):
                if d2 == s and cell[j - 1] != NONE:
                    want[j, k] = 1
            if d == 3:
                want[k, 7] = 1
        np.testing.assert_array_equal(A[n], want)
        feats = np.zeros((8, 7), dtype=np.float32)
        feats[0, 0] = feats[7, 1] = 1
        for k in range(6):
            feats[k + 1, 2 + cell[k]] = 1
        np.testing.assert_array_equal(X[n], feats)


# --- running the searches: appending each finished one, keeping nothing empty --------------
def _fake_one(task: tuple) -> dict:
    """A finished search without a search: the outcome of ``task``."""
    strategy, _table, budget, seed, settings = task
    return {**_outcome(strategy, budget, seed), "settings": settings}


def _args(tmp_path: Path, jobs: int = 1):
    import argparse

    return argparse.Namespace(json=str(tmp_path / "r.json"), jobs=jobs)


TASKS = [("rea", "t.csv", 10, s, {}) for s in range(4)]


def test_each_finished_search_is_appended_with_code_and_table_and_returned_in_task_order(
        tmp_path, monkeypatch):
    args = _args(tmp_path)
    sidecar = partial_path(args.json)
    first = {**_fake_one(TASKS[2]), "config": {"population": 10, "sample_size": 3,
                                               "max_cycles_factor": 50},
             "code": CODE, "table": TABLE}
    sidecar.write_text(_lines([first]))  # task 2 finished before: reused, not run
    calls = []
    monkeypatch.setattr(cli, "_one", lambda t: calls.append(t) or _fake_one(t))
    got = cli._run_searches(args, TASKS, {"rea": {}}, CODE, TABLE)
    assert [t[3] for t in calls] == [0, 1, 3]
    assert [o["seed"] for o in got] == [0, 1, 2, 3]
    assert all(o["code"] == CODE and "table" not in o for o in got)
    rows = [json.loads(ln) for ln in sidecar.read_text().splitlines()]
    assert [r["seed"] for r in rows] == [2, 0, 1, 3]
    assert all(r["table"] == TABLE and r["code"] == CODE for r in rows)
    assert args._interrupt_hint == (f"4 of 4 searches finished and are kept in {sidecar}; run "
                                    "the same command again to run only the others")


def test_an_interrupt_before_any_search_finished_leaves_no_empty_sidecar(tmp_path, monkeypatch):
    def interrupted(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_one", interrupted)
    args = _args(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cli._run_searches(args, TASKS, {"rea": {}}, CODE, TABLE)
    assert not partial_path(args.json).exists()
    assert args._interrupt_hint == "no search had finished, so nothing is kept"


def test_a_full_disk_while_appending_says_how_many_outcomes_are_kept(tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr(cli, "_one", _fake_one)
    args = _args(tmp_path)
    sidecar = partial_path(args.json)
    real, syncs = cli.os.fsync, []

    def fsync(fd):
        syncs.append(fd)
        if len(syncs) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(cli.os, "fsync", fsync)
    with pytest.raises(OSError) as err:
        cli._run_searches(args, TASKS, {"rea": {}}, CODE, TABLE)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(sidecar)
    assert ("No space left on device while appending a finished search; the 2 outcomes "
            "before it are kept there") in str(err.value)


# --- 'bench nb201' on a stand-in table: the checks before any search -----------------------
class _Cells:
    """A stand-in benchmark of ``n`` cells with the validation column (the searches are
    replaced by :func:`_fake_one`, so nothing is looked up)."""

    metrics = (SEARCH_METRIC, "c10_test_200")

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.fixture
def stand_in(monkeypatch):
    """``set(n)``: 'bench nb201' opens a stand-in table of n cells; its searches are fake
    and recorded."""
    import diffnas.nasbench.table as table_module

    calls: list = []
    monkeypatch.setattr(cli, "_BENCH_CACHE", {})
    monkeypatch.setattr(cli, "_one", lambda t: calls.append(t) or _fake_one(t))

    def use(n: int) -> list:
        monkeypatch.setattr(table_module, "open_benchmark", lambda *a, **k: _Cells(n))
        return calls

    return use


def _bench_argv(tmp_path: Path, budget: str = "10", seeds: str = "2", *extra: str) -> list:
    return ["bench", "nb201", "--strategy", "random,rea", "--budget", budget, "--seeds", seeds,
            "--table", str(tmp_path / "t.csv"), "--json", str(tmp_path / "b.json"), *extra]


@pytest.mark.parametrize("budget, seeds, cells, problem", [
    ("0", "2", 15625, "--seeds and every --budget must be >= 1"),
    ("10,0", "2", 15625, "--seeds and every --budget must be >= 1"),
    ("10", "0", 15625, "--seeds and every --budget must be >= 1"),
    ("10", "2", 15624, "15624 cells, not the 15625 of NAS-Bench-201: the table is incomplete"),
    ("10", "2", 15626, "15626 cells, not the 15625 of NAS-Bench-201: the table has more rows "
                       "than the space has cells"),
    ("10,15626", "2", 15625, "--budget 15626: more queries than the 15625 cells of the table"),
])
def test_bad_counts_and_tables_are_refused_before_any_search(
        budget, seeds, cells, problem, tmp_path, stand_in, capsys):
    from diffnas.cli import main

    calls = stand_in(cells)
    assert main(_bench_argv(tmp_path, budget, seeds)) == 2
    assert problem in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "b.json").exists()


def test_a_budget_of_every_cell_runs_seeds_0_to_s_minus_1_and_the_sidecar_goes(
        tmp_path, stand_in):
    from diffnas.cli import main

    calls = stand_in(15625)
    assert main(_bench_argv(tmp_path, "15625", "2")) == 0
    assert [(t[0], t[2], t[3]) for t in calls] == [
        ("random", 15625, 0), ("random", 15625, 1), ("rea", 15625, 0), ("rea", 15625, 1)]
    data = json.loads((tmp_path / "b.json").read_text())
    assert [(o["strategy"], o["seed"]) for o in data["outcomes"]] == [
        (t[0], t[3]) for t in calls]
    assert data["table"] == {"path": str((tmp_path / "t.csv").resolve())}
    assert not partial_path(tmp_path / "b.json").exists()
    assert not cli.lock_path(tmp_path / "b.json").exists()


# --- the checks of a 'bench nb201' file, and settings less their defaults -----------------
@pytest.mark.parametrize("change, problem", [
    ({"test": {"c10_test_200": True}}, "outcomes[1] has an invalid test['c10_test_200']"),
    ({"test": {"c10_test_200": math.inf}}, "outcomes[1] has an invalid test['c10_test_200']"),
    ({"test": {"c10_test_200": "93.1"}}, "outcomes[1] has an invalid test['c10_test_200']"),
    ({"seed": True}, "outcomes[1] has no valid 'seed' (got True)"),
    ({"queries": None}, "outcomes[1] has no valid 'queries' (got None)"),
    ({"valid_acc": math.nan}, "outcomes[1] has an invalid 'valid_acc' (not finite)"),
    ({"test": {}}, "outcomes[1] has an invalid 'test' (empty)"),
    ({"settings": [1]}, "outcomes[1] has an invalid 'settings'"),
    ({"extras": "x"}, "outcomes[1] has an invalid 'extras'"),
])
def test_a_damaged_outcome_is_named_by_file_entry_and_field(change, problem):
    _check_outcomes([_outcome(seed=0), _outcome(seed=1)], "f.json")  # as written: fine
    with pytest.raises(ValueError) as err:
        _check_outcomes([_outcome(seed=0), {**_outcome(seed=1), **change}], "f.json")
    assert str(err.value).startswith(f"f.json: {problem}")


def test_settings_equal_to_a_default_are_dropped_before_comparing():
    from diffnas.nasbench.cli import _without_defaults

    assert _without_defaults("rea", {"population": 10, "sample_size": 2}) == {"sample_size": 2}
    assert _without_defaults("random", {}) == {}
    assert _without_defaults("oldname", {"population": 10}) == {"population": 10}
    # a legacy run that gave a default explicitly ran as one that gave nothing
    new = _file(_outcome("rea", seed=0))
    old = _file(_legacy(_outcome("rea", seed=1)), sets=["rea.population=10"])
    merged, warnings = merge_outcomes([("new.json", new), ("old.json", old)], True)
    assert len(merged) == 2 and len(warnings) == 1


def test_the_summary_lists_each_budget_with_random_first_then_by_name_and_seed(
        tmp_path, capsys):
    from diffnas.cli import main

    runs = [("rea", 20, 1), ("gcn", 10, 0), ("random", 10, 1), ("random", 10, 0), ("rea", 10, 0),
            ("random", 20, 0), ("ctnas", 10, 0)]
    f = tmp_path / "b.json"
    f.write_text(json.dumps(_file(*(_run(s, b, seed, 90.0 + seed) for s, b, seed in runs),
                                  strategy="random,rea,gcn,ctnas")))
    out = tmp_path / "s.json"
    assert main(["bench", "nb201-summary", str(f), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(o["strategy"], o["budget"], o["seed"]) for o in data["outcomes"]] == [
        ("random", 10, 0), ("random", 10, 1), ("ctnas", 10, 0), ("gcn", 10, 0), ("rea", 10, 0),
        ("random", 20, 0), ("rea", 20, 1)]
    assert [(e["strategy"], e["budget"]) for e in data["summary"]] == [
        ("random", 10), ("ctnas", 10), ("gcn", 10), ("rea", 10), ("random", 20), ("rea", 20)]
    rows = capsys.readouterr().out.splitlines()[2:8]
    assert [r.split()[0] for r in rows] == ["random", "ctnas", "gcn", "rea", "random", "rea"]
    assert data["files"] == [str(f)]


def test_describe_cell_counts_the_skip_and_none_edges_of_the_genotype(tmp_path):
    from diffnas.nasbench.runner import describe_cell
    from diffnas.spaces.nb201 import ops_to_genotype, str_to_ops

    t = CsvNb201Table(_write_table(tmp_path / "t.csv", [[i, _arch(k), 50.0 + i, 60.0]
                                                        for i, k in enumerate((0, 1, 7, 781))]))
    for index in range(4):
        ops = str_to_ops(t.arch_str(index))
        record = describe_cell(t, ops_to_genotype(ops))
        assert record["index"] == index and record[SEARCH_METRIC] == 50.0 + index
        assert record["skip_connect_edges"] == ops.count("skip_connect")
        assert record["none_edges"] == ops.count("none")
        assert record["skip_connect_edges"] != record["none_edges"]  # (the cells tell them apart)


def test_resolved_config_is_plain_json_so_a_read_back_outcome_compares_equal():
    from dataclasses import dataclass

    from diffnas.nasbench.runner import resolved_config

    @dataclass
    class Config:
        sizes: tuple = (0.5, 1, 2)
        name: str = "x"

    got = resolved_config(Config())
    assert got == {"sizes": [0.5, 1, 2], "name": "x"} and type(got["sizes"]) is list
    assert json.loads(json.dumps(got)) == got
    assert resolved_config(None) == {}
