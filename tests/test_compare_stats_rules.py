"""Rules of ``diffnas compare`` and its statistics that a mutation audit could break: the
exact permutation p-values replayed by enumerating sign patterns and splits by hand (in
exact fractions), the random-draw branches, the floors of p, Holm's adjustment against a
direct formula, which seeds and phases data.json is compared at, which config keys are a
method's and which are where a run ran, the labels, the markdown text (p formatting,
signs, single-seed and too-few-seeds lines, the fairness section, genotypes), and the
command's printing and refusal to replace a user's files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
from fractions import Fraction
from pathlib import Path

import pytest
from test_compare import DATA, GENO, TINY, _seeds, _single

from diffnas.cli import main
from diffnas.config import load_config, save_config
from diffnas.engine.engines import ACCURACY
from diffnas.engine.rundir import THREADS_FILE, mark_made_by
from diffnas.report.compare import (
    Entry,
    _delta_text,
    _p_text,
    _stat,
    _too_few_lines,
    compare_markdown,
    compare_runs,
    config_differences,
    data_differences,
    difference,
    method_text,
    paired_difference,
)
from diffnas.report.stats import (
    holm,
    relabel_p,
    sign_flip_p,
    smallest_relabel_p,
    smallest_sign_flip_p,
    welch_df,
)


# --- helpers ---------------------------------------------------------------------------
def _sign_flip_by_hand(d: list[int]) -> Fraction:
    """The share of the 2^n sign patterns of the integers ``d`` whose sum is at least as
    far from 0 as the observed one (exact: integers have no rounding)."""
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
               for signs in itertools.product((-1, 1), repeat=len(d)))
    return Fraction(hits, 2 ** len(d))


def _relabel_by_hand(a: list[int], b: list[int]) -> Fraction:
    """The share of the ways to pick len(a) of the pooled integers as group a whose
    difference of means is at least as far from 0 as the observed one (in fractions)."""
    pooled, na = [*a, *b], len(a)
    nb, total = len(pooled) - na, sum(pooled)

    def gap(sum_a: int) -> Fraction:
        return abs(Fraction(total - sum_a, nb) - Fraction(sum_a, na))

    splits = list(itertools.combinations(pooled, na))
    return Fraction(sum(gap(sum(s)) >= gap(sum(a)) for s in splits), len(splits))


def _entry(cfg, kind: str = "search", label: str = "r") -> Entry:
    return Entry(label, Path(label), kind, cfg, ACCURACY)


# --- the permutation tests, by hand ----------------------------------------------------------
@pytest.mark.parametrize("d", [[1, 2, 3, -3, 7], [7, 1, 2, -3], [1, 2, 3, 6], [3, -1, 2],
                               [2, -2, 1, 1], [-3, -5, 6, 7, -8]])
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1e3, 1e7, 1e6 / 3])
def test_sign_flip_p_counts_tied_patterns_at_any_scale(d, scale):
    """Patterns whose |mean| ties the observed one (1 + 2 + 3 - 3 + 7 against 1 + 2 - 3 + 3
    + 7) count as at least as extreme, whatever the units of the figures: the float sums
    of 0.1-steps times 1e7 differ by rounding far above 1e-12, yet p is the exact count."""
    values = [x * scale / 10 for x in d]
    assert sign_flip_p(values) == pytest.approx(float(_sign_flip_by_hand(d)), abs=1e-15)
    thirds = [x * (1e5 / 3) for x in d]  # figures that 1/3 makes inexact
    assert sign_flip_p(thirds) == pytest.approx(float(_sign_flip_by_hand(d)), abs=1e-15)


@pytest.mark.parametrize("a,b", [([1, 2, 3], [4, 6]), ([5, 7, 6], [9, 5]), ([1, 3], [2, 4]),
                                 ([3], [1, 2, 6]), ([1, 2, 3, 4], [2, 3, 5])])
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1e3, 1e7])
def test_relabel_p_counts_the_splits_by_hand_at_any_scale(a, b, scale):
    fa, fb = [x * scale / 10 for x in a], [x * scale / 10 for x in b]
    assert relabel_p(fa, fb) == pytest.approx(float(_relabel_by_hand(a, b)), abs=1e-15)


@pytest.mark.parametrize("scale", [1e-13, 1e-14, 1e-300])
def test_tiny_figures_get_the_p_of_their_pattern(scale):
    """A permutation test does not depend on the units: 1, 2, 3 (all positive: 2 of the 8
    patterns) gives 0.25 in any units, and 1, 2 against 5, 6 gives 2 of the 6 splits."""
    assert sign_flip_p([x * scale for x in (1, 2, 3)]) == pytest.approx(
        float(_sign_flip_by_hand([1, 2, 3])))
    assert relabel_p([x * scale for x in (1, 2)], [x * scale for x in (5, 6)]) == (
        pytest.approx(float(_relabel_by_hand([1, 2], [5, 6]))))


def test_sixteen_differences_are_enumerated_exactly_seventeen_drawn():
    """Up to 16 differences every one of the 2^16 patterns is counted: all 16 of one sign
    give exactly 2 / 65536; 17 go to random draws, counted as (hits + 1) / (draws + 1)."""
    assert sign_flip_p([1.0 + i for i in range(16)]) == 2 / 2 ** 16
    assert sign_flip_p([1.0 + i for i in range(17)], permutations=999) == pytest.approx(1 / 1000)


def test_relabel_p_draws_count_hits_plus_one_and_follow_their_seed():
    """Two groups of 12 (C(24, 12) splits, above the exact limit) that do not overlap: no
    random split is as extreme, so p is 1 / (draws + 1), never 0, with the number of draws
    asked for; and the seed chooses the draws."""
    a, b = [float(i) for i in range(12)], [100.0 + i for i in range(12)]
    assert math.comb(24, 12) > 100_000
    assert relabel_p(a, b, permutations=2000) == pytest.approx(1 / 2001)
    assert relabel_p(a, b, permutations=50) == pytest.approx(1 / 51)
    mixed_a = [((7 * i) % 13) / 13 for i in range(12)]
    mixed_b = [((5 * i) % 11) / 11 + 0.05 for i in range(12)]
    ps = {relabel_p(mixed_a, mixed_b, 300, seed=k) for k in range(5)}
    assert len(ps) > 1


def test_sign_flip_p_refuses_a_table_of_differences():
    with pytest.raises(ValueError, match="non-empty list of differences"):
        sign_flip_p([[0.1, 0.2], [0.3, 0.4]])


def test_the_floors_of_p_never_exceed_one():
    """No differing seed at all: the sign-flip test can say nothing, p's floor is 1 (not
    2 / 2^0 = 2); one seed against one: the two splits are mirror images, floor 1."""
    assert smallest_sign_flip_p(0) == 1.0
    assert smallest_sign_flip_p(1) == 1.0
    assert smallest_relabel_p(1, 1) == 1.0
    for n in range(1, 10):
        assert smallest_sign_flip_p(n) == pytest.approx(min(1.0, 2 / 2 ** n))


def test_welch_df_with_one_spread_zero_is_the_other_groups_n_minus_one():
    """With sa = 0 the Welch-Satterthwaite formula reduces to nb - 1 (and na - 1 the other
    way round)."""
    assert welch_df(0.0, 3, 0.7, 5) == pytest.approx(4)
    assert welch_df(0.7, 5, 0.0, 3) == pytest.approx(4)
    assert welch_df(1.0, 4, 1.0, 4) == pytest.approx(6)  # equal: na + nb - 2


def _holm_by_formula(ps):
    """Holm's adjusted p of the i-th smallest: max over j <= i of min(1, (m - j) p_(j))."""
    m, order = len(ps), sorted(range(len(ps)), key=lambda i: ps[i])
    out = [0.0] * m
    for rank, i in enumerate(order):
        out[i] = max(min(1.0, (m - j) * ps[order[j]]) for j in range(rank + 1))
    return out


@pytest.mark.parametrize("ps", [[0.6, 0.7], [0.3, 0.01, 0.2, 0.04], [0.02, 0.02, 0.5],
                                [0.9], [0.04, 0.03, 0.6, 0.45, 0.2]])
def test_holm_is_the_step_down_formula_and_capped_at_one(ps):
    adjusted = holm(ps)
    assert adjusted == pytest.approx(_holm_by_formula(ps))
    assert all(0 <= q <= 1 and q >= p for p, q in zip(ps, adjusted))


# --- which data, config keys and genotypes count as differences ---------------------------
def _data(labels: str) -> dict:
    return {"train": {**DATA["train"], "labels": labels}}


def test_data_are_compared_at_the_smallest_seed_both_ran():
    """Seeds 1 and 2 shared: seed 1's records are compared (a seed draws its subsets), so
    other data at seed 2 alone is not flagged, and other data at seed 1 is."""
    first = {s: {"search": _data(f"s{s}")} for s in (0, 1, 2)}
    same_at_1 = {2: {"search": _data("other")}, 1: {"search": _data("s1")}}
    other_at_1 = {2: {"search": _data("s2")}, 1: {"search": _data("other")}}
    assert data_differences([first, same_at_1], ["a", "b"]) == []
    assert data_differences([first, other_at_1], ["a", "b"]) == [
        {"run": "b", "phase": "search", "fields": ["train"], "against": "a"}]


def test_without_a_shared_seed_each_run_s_smallest_seed_is_compared():
    first = {4: {"search": _data("x")}, 3: {"search": _data("y")}}
    same_smallest = {7: {"search": _data("other")}, 5: {"search": _data("y")}}
    assert data_differences([first, same_smallest], ["a", "b"]) == []
    other_smallest = {7: {"search": _data("x")}, 5: {"search": _data("other")}}
    assert [d["run"] for d in data_differences([first, other_smallest], ["a", "b"])] == ["b"]


def test_a_run_without_a_phase_s_record_is_skipped_as_the_reference():
    """The first run recorded no search data: the others are compared with the second,
    the first that did; the retraining's data are compared too."""
    records = [{0: {}}, {0: {"search": _data("x"), "retrain": _data("r")}},
               {0: {"search": _data("y"), "retrain": _data("r2")}}]
    assert data_differences(records, ["a", "b", "c"]) == [
        {"run": "c", "phase": "search", "fields": ["train"], "against": "b"},
        {"run": "c", "phase": "retrain", "fields": ["train"], "against": "b"}]


def test_damaged_data_and_thread_records_are_unknown_not_fatal(tmp_path):
    """A cut-short data.json is not compared (the run has no data record, said so), and a
    cut-short threads.json leaves the thread count unknown ("threads not recorded")."""
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b", 0.6)
    (b / "search" / "data.json").write_text("{")
    (a / THREADS_FILE).write_text(json.dumps({"threads": 1}))
    (b / THREADS_FILE).write_text("{")
    summary = compare_runs([a, b])
    assert summary["data_differs"] == [] and summary["data_unknown"] == ["b"]
    assert [r["threads"] for r in summary["runs"]] == [1, None]
    text = compare_markdown(summary)
    assert "- No data record (data.json) in b: their data" in text
    assert ("- The times were measured with different devices or thread counts: a cpu, "
            "1 thread; b cpu, threads not recorded\n") in text


@pytest.mark.parametrize("field,value", [("logger", "tensorboard"), ("plugins", ["/p/x.py"]),
                                         ("plots", False), ("out_dir", "/elsewhere")])
def test_where_and_how_a_run_ran_is_no_setting_difference(field, value):
    cfg = load_config(None, TINY)
    assert config_differences([cfg, dataclasses.replace(cfg, **{field: value})]) == {}


def test_the_discretizer_is_part_of_the_method(tmp_path):
    """search.discretizer is named in the method and listed with the methods' differences,
    not with the other settings."""
    from diffnas.report.compare import compare

    cfg = load_config(None, TINY)
    rule = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search,
                                                               discretizer="my_rule"))
    assert method_text(_entry(rule)) == "darts discretizer=my_rule"
    assert method_text(_entry(cfg)) == "darts"
    summary = compare([_entry(cfg, label=str(tmp_path / "a")),
                       _entry(rule, label=str(tmp_path / "b"))])
    assert summary["method_differences"] == {"search.discretizer": [None, "my_rule"]}
    assert summary["setting_differences"] == {}


def test_the_method_names_plain_settings_and_leaves_nested_ones_to_the_differences():
    cfg = load_config(None, [*TINY, "search.strategy={name: darts, edge_norm: true, "
                                    "a_optim: {lr: 0.001}}"])
    assert method_text(_entry(cfg)) == "darts edge_norm=true"
    assert config_differences([load_config(None, TINY), cfg])["search.strategy.a_optim.lr"][1] \
        == 0.001


def _train_run(path: Path, acc: float, genotype: dict | None) -> Path:
    """A `diffnas train` run's files, written by hand."""
    path.mkdir(parents=True)
    save_config(load_config(None, TINY), path / "config.yaml")
    mark_made_by(path, "train")
    (path / "retrain").mkdir()
    (path / "retrain" / "result.json").write_text(json.dumps({"test_acc": acc, "params": 7}))
    if genotype is not None:
        (path / "retrain" / "genotype.json").write_text(json.dumps(genotype))
    return path


def test_a_train_run_without_its_genotype_stands_for_an_unknown_one(tmp_path):
    known = _train_run(tmp_path / "known", 0.5, GENO)
    lost = _train_run(tmp_path / "lost", 0.6, None)
    searched = _single(tmp_path / "s", 0.7)
    given = compare_runs([searched, lost, known])["method_differences"][
        "genotype (given to diffnas train)"]
    assert given[:2] == ["searched", "unknown"] and given[2].startswith("genotype ")


# --- the rows --------------------------------------------------------------------------------
def test_stat_keeps_only_finite_numbers():
    stat = _stat([1.0, None, math.inf, 3, "x", math.nan])
    assert stat == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert _stat([None, math.inf]) == {"mean": None, "std": None, "n": 0}


def test_no_figure_on_either_side_is_no_difference():
    assert difference([], [0.5, 0.6]) is None and difference([0.5], []) is None


def test_runs_of_the_same_folder_name_are_labelled_by_their_paths(tmp_path):
    one, two = _single(tmp_path / "x" / "run", 0.5), _single(tmp_path / "y" / "run", 0.6)
    summary = compare_runs([one, two])
    assert [r["label"] for r in summary["runs"]] == [str(one), str(two)]
    assert f"| {one} | darts |" in compare_markdown(summary)


def test_the_same_run_by_another_path_is_refused(tmp_path):
    from diffnas.report.compare import CompareError

    a = _single(tmp_path / "a", 0.5)
    _single(tmp_path / "b", 0.6)
    with pytest.raises(CompareError, match="given more than once"):
        compare_runs([a, tmp_path / "b" / ".." / "a"])
    os.symlink(a, tmp_path / "link")
    with pytest.raises(CompareError, match="given more than once"):
        compare_runs([a, tmp_path / "link"])


def test_a_search_without_retraining_shows_its_search_figure_and_no_difference(tmp_path):
    """No retrained figure: the row still gives the search's validation figure, counts no
    finished seed, and the difference cell says which side has none."""
    done, searched = _single(tmp_path / "done", 0.5), _single(tmp_path / "searched", 0.6)
    (searched / "retrain" / "result.json").unlink()
    summary = compare_runs([done, searched])
    row = summary["runs"][1]
    assert row["finished"] == 0 and row["vs_first"] is None
    assert row["search_val"]["mean"] == pytest.approx(0.5)  # metrics.jsonl's val_acc
    assert "| searched | darts | 0/1 | - | - (no finished seed) | 50.00% |" in (
        compare_markdown(summary))
    text = compare_markdown(compare_runs([searched, done]))
    assert "| done | darts | 1/1 | 50.00% | - (the first run has no finished seed) |" in text


def test_single_runs_of_the_same_seed_are_compared_unpaired(tmp_path):
    """One seed each (both seed 0): no pairs to take an error from, so the unpaired
    difference and its relabelling p; the cell says each run has a single seed."""
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b", 0.6)
    d = compare_runs([a, b])["runs"][1]["vs_first"]
    assert d["paired"] == 0 and d["diff"] == pytest.approx(0.1)
    assert d["p"] == pytest.approx(float(_relabel_by_hand([5], [6])))
    assert "+10.00% (each run has a single seed: no standard error; p = 1.00)" in (
        compare_markdown(compare_runs([a, b])))


def test_a_single_seed_first_run_is_named_as_such(tmp_path):
    single = _single(tmp_path / "single", 0.5)
    many = _seeds(tmp_path / "many", {1: 0.6, 2: 0.7, 3: 0.65})
    text = compare_markdown(compare_runs([single, many]))
    assert "(the first run has a single seed: no standard error; p = 0.25)" in text


def test_all_seeds_tied_can_show_nothing(tmp_path):
    """Every paired seed equal: no differing seed, so the floor of p is 1; the cell and
    the too-few line say so."""
    d = paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.6, 2: 0.7})
    assert d["differing"] == 0 and d["p"] == 1.0 and d["smallest_p"] == 1.0
    lines = _too_few_lines([{"label": "a"}, {"label": "b", "vs_first": d}])
    assert lines == ["- b: with 3 paired seeds, 0 of them differing (a tie tells nothing), "
                     "the test's smallest p is 1.00; at least 6 differing paired seeds are "
                     "needed"]


# --- the page --------------------------------------------------------------------------------
@pytest.mark.parametrize("p,text", [(0.1, "0.10"), (0.0999, "0.0999"), (0.001, "0.001"),
                                    (0.000999, "1.0e-03"), (1 / 2001, "5.0e-04"),
                                    (1 / 21, "0.0476"), (1.0, "1.00")])
def test_p_text_switches_format_at_its_thresholds(p, text):
    """Two decimals from 0.1 up, three significant digits from 0.001, powers of ten below
    (the text must never round a p across 0.05)."""
    assert _p_text(p) == text


def test_one_run_is_a_run_with_nothing_to_compare(tmp_path):
    text = compare_markdown(compare_runs([_single(tmp_path / "a", 0.5)]))
    assert text.startswith("# Comparison of 1 run: retrained test accuracy\n")
    assert "One run: nothing to compare it with." in text
    assert "Holm" not in text


def test_holm_is_named_only_with_several_comparisons(tmp_path):
    a, b, c = (_single(tmp_path / n, acc) for n, acc in (("a", 0.5), ("b", 0.6), ("c", 0.7)))
    assert "Holm" not in compare_markdown(compare_runs([a, b]))
    text = compare_markdown(compare_runs([a, b, c]))
    assert ", p Holm-adjusted over the comparisons with the first run." in text


def test_a_zero_difference_is_written_with_a_plus_and_a_pipe_escaped(tmp_path):
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b|c", 0.5)
    text = compare_markdown(compare_runs([a, b]))
    assert "| b\\|c | darts | 1/1 | 50.00% | +0.00% (each run has a single seed" in text


def test_the_seeds_each_run_used_are_listed_when_they_differ(tmp_path):
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b", 0.6, ["seed=3"])
    summary = compare_runs([a, b])
    assert summary["seeds_differ"]
    assert "- The runs used different seeds: a [0]; b [3]\n" in compare_markdown(summary)


def test_each_seed_s_genotype_line_gives_its_figure_or_none_yet(tmp_path):
    a = _single(tmp_path / "a", 0.5)
    (a / "search" / "genotype.json").unlink()
    text = compare_markdown(compare_runs([a]))
    assert "**a**\n\n- seed 0 (50.00%): none yet\n" in text


def _unpaired_need() -> int:
    """The fewest seeds per run at which 2 / C(2n, n) falls below 0.05."""
    return next(n for n in range(1, 20) if 2 / math.comb(2 * n, n) < 0.05)


def test_too_few_unpaired_seeds_say_how_many_would_do_and_that_holm_asks_more(tmp_path):
    base = _seeds(tmp_path / "base", {0: 0.5, 1: 0.6})
    b = _seeds(tmp_path / "b", {2: 0.7, 3: 0.8})
    c = _seeds(tmp_path / "c", {4: 0.4, 5: 0.45})
    text = compare_markdown(compare_runs([base, b]))
    floor = _p_text(2 / math.comb(4, 2))
    assert (f"- b: with 2 and 2 unpaired seeds, the test's smallest p is {floor}; at least "
            f"{_unpaired_need()} seeds per run are needed\n") in text
    text = compare_markdown(compare_runs([base, b, c]))
    assert (f"at least {_unpaired_need()} seeds per run are needed, more with Holm's "
            "adjustment over 2 comparisons\n") in text


# --- the command -------------------------------------------------------------------------------
def test_the_command_says_what_it_wrote_and_keeps_a_users_json(tmp_path, capsys):
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b", 0.6)
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("compare.md", "compare.json", "compare.png", "compare.svg"):
        assert f"wrote {out / name}\n" in printed
    mine = json.dumps({"generator": "my own script", "runs": []})
    (out / "compare.json").write_text(mine)
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
    assert "compare.json" in capsys.readouterr().err
    assert (out / "compare.json").read_text() == mine


def test_the_delta_cell_of_a_paired_difference_by_hand():
    """The cell's figures replayed: mean of the per-seed differences, sample std / sqrt(n),
    and the sign flips' p over the 2^3 patterns (in integers of 0.01)."""
    a, b = {0: 0.50, 1: 0.70, 2: 0.60}, {0: 0.62, 1: 0.69, 2: 0.66}
    d = paired_difference(a, b)
    diffs = [12, -1, 6]
    assert d["diff"] == pytest.approx(statistics.mean(diffs) / 100)
    assert d["se"] == pytest.approx(statistics.stdev(diffs) / 100 / math.sqrt(3))
    assert d["p"] == pytest.approx(float(_sign_flip_by_hand(diffs)))
    d.update(p_holm=d["p"], clear=False)
    cell = _delta_text({"finished": 3}, {"seeds": [0, 1, 2], "vs_first": d}, ACCURACY, False)
    assert cell.startswith(f"+{d['diff']:.2%} +- {d['se']:.2%} (95% CI -")
    assert cell.endswith(f"p = {_p_text(d['p'])}, paired over 3 seeds): no clear difference")


def test_a_setting_that_differs_in_a_middle_run_only_is_a_difference():
    plain = load_config(None, TINY)
    other = load_config(None, [*TINY, "retrain.lr=0.2"])
    assert config_differences([plain, other, plain]) == {
        "retrain.lr": [plain.retrain.lr, 0.2, plain.retrain.lr]}


def test_a_run_timed_only_in_its_retraining_counts_for_the_times(tmp_path):
    """A `diffnas train` run has no search time, only its retraining's: its thread count
    still makes the times unlike a search's measured with another."""
    from diffnas.engine.rundir import record_threads

    search = _single(tmp_path / "s", 0.5)
    train = _train_run(tmp_path / "t", 0.6, GENO)
    (train / "retrain" / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "seconds": 2.0})
                                                     + "\n")
    record_threads(search, 1)
    record_threads(train, 4)
    summary = compare_runs([search, train])
    assert summary["runs"][1]["retrain_seconds"]["mean"] == pytest.approx(2.0)
    assert summary["timing_differs"]
    assert "s cpu, 1 thread; t cpu, 4 threads\n" in compare_markdown(summary)


def test_the_command_passes_plugin_locations_to_the_runs_it_reads(tmp_path, monkeypatch):
    """plugins=[...] among the RUNs is where the runs' plugins are now: it is handed to
    every run's config, not read as a run."""
    from diffnas.report import compare as cmp

    a = _single(tmp_path / "a", 0.5)
    seen = []
    real = cmp.compare_runs
    monkeypatch.setattr(cmp, "compare_runs", lambda runs, overrides=(): (
        seen.append((list(runs), list(overrides))), real(runs))[1])
    assert main(["compare", str(a), "plugins=[]"]) == 0
    assert seen == [([str(a)], ["plugins=[]"])]
