"""`diffnas compare`: runs side by side (statistics, differences, fairness, outputs), and
the per-epoch ``seconds`` that metrics.jsonl records for it."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import StatelessTask

from diffnas.cli import main
from diffnas.config import load_config, save_config
from diffnas.engine import multiseed as ms
from diffnas.engine.callbacks import duration
from diffnas.engine.engines import PERPLEXITY
from diffnas.engine.loop import Loop
from diffnas.engine.rundir import mark_made_by
from diffnas.genotype import published_genotype
from diffnas.report.compare import (
    CompareError,
    _delta_text,
    compare,
    compare_markdown,
    compare_runs,
    config_differences,
    difference,
    load_entry,
    paired_difference,
)
from diffnas.report.stats import relabel_p

TINY = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=2",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=2", "retrain.batch_size=16", "retrain.train_subset=32",
    "retrain.network={C: 4, layers: 2}", "retrain.auxiliary_weight=0", "retrain.cutout=0",
    "progress=false",
]
GENO = {"space": "darts_cnn", "cells": {
    "normal": {"edges": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2],
                         ["sep_conv_3x3", 0, 3], ["dil_conv_3x3", 2, 3]], "concat": [2, 3]},
    "reduce": {"edges": [["max_pool_3x3", 0, 2], ["skip_connect", 1, 2],
                         ["max_pool_3x3", 0, 3], ["skip_connect", 2, 3]], "concat": [2, 3]}}}
DATA = {"train": {"x": [48, 1, 8, 8], "labels": "abc"}}


def _finish(d: Path, acc: float, seconds: list[float | None], params: int = 100,
            data: dict | None = None) -> None:
    """The files of a finished search + retraining, written by hand (no training)."""
    (d / "search").mkdir(parents=True)
    (d / "search" / "DONE").write_text("")
    (d / "search" / "genotype.json").write_text(json.dumps(GENO))
    (d / "search" / "data.json").write_text(json.dumps(data or DATA))
    rows = [{"epoch": e, "val_acc": 0.5, **({"seconds": s} if s is not None else {})}
            for e, s in enumerate(seconds)]
    (d / "search" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "retrain").mkdir()
    (d / "retrain" / "result.json").write_text(json.dumps(
        {"epochs_done": 1, "test_acc": acc, "params": params, "macs": 10 * params}))


def _single(path: Path, acc: float, overrides: list[str] = (), seconds=(1.0, 2.0),
            **kw) -> Path:
    cfg = load_config(None, [*TINY, *overrides])
    path.mkdir(parents=True)
    save_config(cfg, path / "config.yaml")
    mark_made_by(path, "search")
    _finish(path, acc, list(seconds), **kw)
    return path


def _seeds(parent: Path, accs: dict[int, float], overrides: list[str] = (),
           seed_data: bool = False) -> Path:
    """A --seeds parent of the seeds in ``accs`` (in that order); ``seed_data``: each seed's
    data.json its own (as seeded subsets make it)."""
    cfg = load_config(None, [*TINY, *overrides])
    dirs = ms.prepare_seeds(cfg, list(accs), parent)
    save_config(cfg, parent / "config.yaml")  # as `search --seeds` writes its parent
    mark_made_by(parent, "search")
    for (s, acc), d in zip(accs.items(), dirs, strict=True):
        data = {"train": {**DATA["train"], "labels": f"seed{s}"}} if seed_data else None
        _finish(d, acc, [1.0 + s, 3.0], data=data)
    return parent


# --- statistics ------------------------------------------------------------------------
def test_the_same_seeds_in_another_order_are_paired_and_their_data_compared_by_seed(
        tmp_path):
    """--seeds 3,2,1,0 against --seeds 0,1,2,3 was compared unpaired (Welch, relabelling),
    said the runs used different seeds, and compared seed 0's data with seed 3's ("the data
    differ")."""
    accs = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.8}
    a = _seeds(tmp_path / "a", accs, seed_data=True)
    b = _seeds(tmp_path / "b", {s: accs[s] + 0.05 * (s + 1) for s in (3, 2, 1, 0)},
               seed_data=True)
    c = _seeds(tmp_path / "c", {s: accs[s] + 0.05 * (s + 1) for s in (0, 1, 2, 3)},
               seed_data=True)
    reversed_, ordered = (compare([load_entry(a), load_entry(x)]) for x in (b, c))
    for summary in (reversed_, ordered):
        assert summary["runs"][1]["vs_first"]["paired"] == 4
        assert not summary["seeds_differ"] and summary["data_differs"] == []
    assert reversed_["runs"][1]["vs_first"] == ordered["runs"][1]["vs_first"]
    # other data at the same seed is still found
    other = _seeds(tmp_path / "d", {1: 0.5, 0: 0.6})
    diff = compare([load_entry(a), load_entry(other)])["data_differs"]
    assert [(d["run"], d["phase"], d["fields"]) for d in diff] == [("d", "search", ["train"])]


def test_difference_and_its_standard_error_by_hand():
    a = [1.0, 2.0, 3.0]  # mean 2, std 1
    b = [2.0, 4.0]  # mean 3, std sqrt(2)
    d = difference(a, b)
    assert d["diff"] == pytest.approx(1.0)
    assert d["se"] == pytest.approx(math.sqrt(1 / 3 + 2 / 2))
    assert d["df"] == pytest.approx((4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + 1))  # Welch: 32/19
    lo, hi = d["ci"]  # t at 1.68 degrees of freedom is far above 2
    assert lo < 1.0 - 2 * d["se"] and hi > 1.0 + 2 * d["se"]
    assert d["p"] == pytest.approx(relabel_p(a, b)) and d["paired"] == 0
    one = difference(a, [2.5])  # one seed: no spread, no interval, still a permutation p
    assert one["diff"] == pytest.approx(0.5) and one["se"] is None and one["ci"] is None
    assert one["smallest_p"] == pytest.approx(1 / 4)
    assert difference(a, []) is None


def test_runs_of_the_same_seeds_are_paired_seed_by_seed(tmp_path):
    """Both runs finished seeds 0, 1, 2: the difference is the mean of the per-seed
    differences, its error their sample std / sqrt(3) (by hand with statistics); other
    seeds, or one seed, fall back to the unpaired error."""
    a = {0: 0.5, 1: 0.7, 2: 0.6}
    b = {0: 0.6, 1: 0.9, 2: 0.65}
    d = paired_difference(a, b)
    diffs = [0.1, 0.2, 0.05]
    assert d["diff"] == pytest.approx(statistics.mean(diffs))
    assert d["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert d["paired"] == 3 and d["df"] == 2
    assert d["p"] == pytest.approx(0.25)  # all three positive: 2 of the 8 sign patterns
    assert d["ci"][0] < 0 < d["ci"][1]  # beyond 2 SE (0.117 > 2 x 0.044), yet t(2) = 4.3
    two = paired_difference(a, {0: 0.6, 1: 0.9, 3: 0.65})  # over the seeds both finished
    assert two["paired"] == 2 and two["diff"] == pytest.approx(0.15)
    assert paired_difference({0: 0.5}, {0: 0.6}) is None
    base = _seeds(tmp_path / "base", a)
    other = _seeds(tmp_path / "other", b, ["search.strategy={name: gdas}"])
    row = compare_runs([base, other])["runs"][1]
    assert row["vs_first"]["diff"] == pytest.approx(statistics.mean(diffs))
    assert row["vs_first"]["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    text = compare_markdown(compare_runs([base, other]))
    assert ("+11.67% +- 4.41% (95% CI -7.31% to +30.64%; p = 0.25, paired over 3 seeds): "
            "no clear difference") in text
    assert ("- other: with 3 paired seeds, the test's smallest p is 0.25; at least 6 differing "
            "paired seeds are needed") in text
    (other / "seed_2" / "retrain" / "result.json").unlink()  # seed 2 unfinished: 2 pairs
    summary = compare_runs([base, other])
    row = summary["runs"][1]
    assert row["vs_first"]["paired"] == 2 and row["finished"] == 2
    assert row["vs_first"]["se"] == pytest.approx(statistics.stdev([0.1, 0.2]) / math.sqrt(2))
    assert "paired over 2 of 3 seeds): no clear difference" in compare_markdown(summary)
    # other seeds given: unpaired, said so
    other = _seeds(tmp_path / "other2", {3: 0.6, 4: 0.9, 5: 0.65})
    row = compare_runs([base, other])["runs"][1]
    assert row["vs_first"]["paired"] == 0
    assert row["vs_first"]["se"] == pytest.approx(math.sqrt(
        statistics.variance(a.values()) / 3 + statistics.variance([0.6, 0.9, 0.65]) / 3))
    assert "; p = 0.50, unpaired): no clear difference" in compare_markdown(
        compare_runs([base, other]))


def test_a_clear_difference_needs_enough_seeds_and_holm_counts_the_comparisons(tmp_path):
    """Six paired seeds all better: p = 2/64, clear. A third run compared as well: Holm
    doubles the smallest p (0.0625), no longer clear, and the page says how many seeds
    would do (7)."""
    base = _seeds(tmp_path / "base", {s: 0.60 + 0.01 * s for s in range(6)})
    better = _seeds(tmp_path / "better", {s: 0.65 + 0.012 * s for s in range(6)},
                    ["search.strategy={name: gdas}"])
    row = compare_runs([base, better])["runs"][1]["vs_first"]
    assert row["p"] == pytest.approx(1 / 32) and row["p_holm"] == row["p"] and row["clear"]
    text = compare_markdown(compare_runs([base, better]))
    assert "p = 0.0312, paired over 6 seeds): clear: better |" in text
    assert "Too few seeds" not in text
    # the same differences in a figure where lower is better (perplexity): worse
    row = compare_runs([base, better])["runs"][1]
    as_ppl = _delta_text({"finished": 6}, row, PERPLEXITY, False)
    assert as_ppl.endswith("paired over 6 seeds): clear: worse")
    mixed = _seeds(tmp_path / "mixed", {s: 0.60 + 0.01 * s + (-0.02 if s % 2 else 0.02)
                                         for s in range(6)}, ["search.strategy={name: snas}"])
    summary = compare_runs([base, better, mixed])
    better_row, mixed_row = (r["vs_first"] for r in summary["runs"][1:])
    assert mixed_row["p"] > 0.5  # three seeds up, three down by as much
    assert better_row["p_holm"] == pytest.approx(2 / 32) and not better_row["clear"]
    text = compare_markdown(summary)
    assert "p = 0.0312, Holm 0.0625, paired over 6 seeds): no clear difference |" in text
    assert "Too few seeds" not in text  # each alone could be clear: Holm is not the floor


def test_ties_no_spread_and_a_p_just_short_of_the_threshold_are_said_as_they_are(tmp_path):
    """A tied seed cannot move a sign-flip test: 6 paired seeds with one tie can give no
    p below 2/2^5. The same difference on every seed has no interval (not a zero-width
    one). A p of 1/21 prints as 0.0476, not as the 0.05 it falls short of."""
    base = _seeds(tmp_path / "base", {s: 0.60 + 0.01 * s for s in range(6)})
    tie = _seeds(tmp_path / "tie", {s: 0.60 + 0.01 * s + (0.02 if s else 0.0)
                                    for s in range(6)}, ["search.strategy={name: gdas}"])
    summary = compare_runs([base, tie])
    d = summary["runs"][1]["vs_first"]
    assert d["differing"] == 5 and d["smallest_p"] == pytest.approx(1 / 16)
    assert d["p"] == pytest.approx(1 / 16) and not d["clear"]
    assert d["ci"] is not None  # the tie gives the differences a spread
    assert ("- tie: with 6 paired seeds, 5 of them differing (a tie tells nothing), the "
            "test's smallest p is 0.0625; at least 6 differing paired seeds are needed"
            ) in compare_markdown(summary)
    same = _seeds(tmp_path / "same", {s: 0.61 + 0.01 * s for s in range(6)},
                  ["search.strategy={name: snas}"])
    d = compare_runs([base, same])["runs"][1]["vs_first"]
    assert d["se"] == 0 and d["ci"] is None and d["clear"]  # p = 2/64: clear, no interval
    assert ("+1.00% +- 0.00% (no spread: no interval; p = 0.0312, paired over 6 seeds): "
            "clear: better") in compare_markdown(compare_runs([base, same]))
    two = _seeds(tmp_path / "two", {10: 0.1, 11: 0.11})  # unpaired: 2 vs 6 far apart
    d = compare_runs([base, two])["runs"][1]["vs_first"]
    assert d["paired"] == 0 and d["p"] == pytest.approx(1 / 28)  # 1 of C(8, 2) splits
    assert d["smallest_p"] == pytest.approx(1 / 28) and d["clear"]
    assert "p = 0.0357, unpaired): clear: worse" in compare_markdown(compare_runs([base, two]))


def test_a_seeds_parent_against_a_single_run(tmp_path):
    """Means and sample stds over the seeds as statistics computes them, the difference to
    the first run, times summed per seed, and the seeds and epochs that differ said."""
    base = _seeds(tmp_path / "darts", {0: 0.5, 1: 0.7, 2: 0.6})
    other = _single(tmp_path / "gdas", 0.9, ["search.strategy={name: gdas}",
                                              "search.epochs=3"], seconds=(2.0, 2.0, 2.5))
    summary = compare_runs([base, other])
    first, second = summary["runs"]
    assert first["test_acc"]["mean"] == pytest.approx(statistics.mean([0.5, 0.7, 0.6]))
    assert first["test_acc"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert first["finished"] == 3 and first["seeds"] == [0, 1, 2]
    assert first["search_seconds"]["mean"] == pytest.approx(statistics.mean([4.0, 5.0, 6.0]))
    assert second["search_seconds"]["mean"] == pytest.approx(6.5)
    assert second["test_acc"] == {"mean": 0.9, "std": None, "n": 1}
    assert second["vs_first"]["diff"] == pytest.approx(0.3) and second["vs_first"]["se"] is None
    assert second["method"] == "gdas" and first["method"] == "darts"
    assert summary["method_differences"] == {  # defaults filled in: GDAS's relaxation
        "search.strategy.name": ["darts", "gdas"],
        "search.strategy.relaxation.name": ["softmax", "hard_gumbel"]}
    assert summary["setting_differences"] == {"search.epochs": [2, 3]}
    assert summary["seeds_differ"] and not summary["data_differs"]
    text = compare_markdown(summary)
    assert "| darts | darts | 3/3 | 60.00% +- 10.00% | (baseline) |" in text
    assert ("| gdas | gdas | 1/1 | 90.00% | +30.00% (this run has a single seed: no standard "
            "error; p = 0.25): no clear difference |") in text  # 0.9: 1 of 4 ways to pick one
    assert "- `search.epochs`: darts: 2; gdas: 3" in text
    assert "- `search.strategy.relaxation.name`: darts: softmax; gdas: hard_gumbel" in text
    assert "5.00 s" in text and "6.50 s" in text
    # the --seeds summary says the mean time too (only the phases that recorded times)
    seeds = ms.summarize([ms.seed_record(base / f"seed_{s}", s) for s in (0, 1, 2)])
    assert seeds["search_seconds"]["mean"] == pytest.approx(5.0)
    assert "Wall-clock time per seed (mean): search 5.00 s\n" in ms.summary_markdown(seeds)


def test_the_same_settings_say_so_and_other_data_is_flagged(tmp_path):
    """Where only the method differs the page says no other setting does; seed, name,
    device and data.root are where a run ran, not what it computed. Other data (another
    data.json) is flagged even when every config key agrees."""
    a = _single(tmp_path / "a", 0.5, ["search.strategy={order: 1}"])
    saved = yaml.safe_load((a / "config.yaml").read_text())  # (digits reads no data.root:
    saved["data"]["root"] = "/somewhere"  # a new run refuses it; a saved one is read as is)
    (a / "config.yaml").write_text(yaml.safe_dump(saved))
    b = _single(tmp_path / "b", 0.6, ["search.strategy={name: darts, order: 2}", "seed=3",
                                      "name=other"])
    c = _single(tmp_path / "c", 0.7, data={"train": {"x": [48, 1, 8, 8], "labels": "xyz"}})
    summary = compare_runs([a, b])
    assert summary["setting_differences"] == {}
    assert summary["method_differences"] == {"search.strategy.order": [1, 2]}  # 1: default
    assert "No other config setting differs" in compare_markdown(summary)
    other = compare_runs([a, c])
    assert other["method_differences"] == {}  # order 1 written out, or the default
    assert other["data_differs"] == [{"run": "c", "phase": "search", "fields": ["train"],
                                      "against": "a"}]
    assert ("**The data differ**: c's search computed on other data than a's "
            "(search/data.json differs in train)") in compare_markdown(other)


def test_config_differences_leave_out_where_a_run_ran():
    one = load_config(None, TINY)
    two = load_config(None, [*TINY, "seed=5", "device=cpu", "progress=true", "out_dir=/x",
                             "retrain.lr=0.1", "data.batch_size=8"])
    assert config_differences([one, two]) == {"data.batch_size": [16, 8],
                                              "retrain.lr": [one.retrain.lr, 0.1]}


def test_a_damaged_seed_is_a_failed_row_and_old_runs_have_no_times(tmp_path):
    parent = _seeds(tmp_path / "p", {0: 0.5, 1: 0.7})
    (parent / "seed_1" / "retrain" / "result.json").write_text("{")  # cut short
    old = _single(tmp_path / "old", 0.4, seconds=(1.0, None))  # a row without seconds
    summary = compare_runs([parent, old])
    first, second = summary["runs"]
    assert first["failed"] == [1] and first["finished"] == 1
    assert first["test_acc"] == {"mean": 0.5, "std": None, "n": 1}
    assert "result.json" in first["runs"][1]["error"]
    assert second["search_seconds"]["mean"] is None
    assert ms.seed_record(old, 0)["search_seconds"] is None  # and no retraining rows
    assert ms.seed_record(old, 0)["retrain_seconds"] is None
    text = compare_markdown(summary)
    assert (f"- p seed 1 could not be read: {first['runs'][1]['error']}" in text
            and "result.json" in text)  # why, on the page itself
    assert "- seed 1 (-): unreadable (above)" in text


def test_a_figure_that_is_not_finite_is_left_out_and_said(tmp_path):
    parent = _seeds(tmp_path / "p", {0: 0.5, 1: 0.7})
    (parent / "seed_1/retrain/result.json").write_text('{"epochs_done": 1, "test_acc": Infinity}')
    summary = compare_runs([parent])
    row = summary["runs"][0]
    assert row["finished"] == 1 and row["not_finite"] == {"1": math.inf}
    assert row["test_acc"] == {"mean": 0.5, "std": None, "n": 1}
    assert ("- p seed 1: test_acc is inf (diverged?), left out of the statistics"
            in compare_markdown(summary))


def test_the_method_names_the_settings_that_are_not_the_strategy_s_defaults(tmp_path):
    runs = [_single(tmp_path / n, 0.5, [f"search.strategy={{name: darts{extra}}}"])
            for n, extra in (("plain", ""), ("one", ", order: 1"), ("two", ", order: 2"))]
    summary = compare_runs(runs)
    assert [r["method"] for r in summary["runs"]] == ["darts", "darts", "darts order=2"]
    assert summary["method_differences"] == {"search.strategy.order": [1, 1, 2]}


def test_refusals_name_the_problem(tmp_path):
    a = _single(tmp_path / "a", 0.5)
    with pytest.raises(CompareError, match="given more than once"):
        compare_runs([a, tmp_path / "a" / "." ])
    acc, lm = load_entry(a), load_entry(a)
    lm.metric, lm.label, lm.path = PERPLEXITY, "lm", tmp_path / "lm"
    with pytest.raises(CompareError, match="judged by different figures.*a by test_acc, "
                                           "lm by test_ppl"):
        compare([acc, lm])
    with pytest.raises(CompareError, match="at least one run"):
        compare([])


def test_a_train_run_compares_with_a_search(tmp_path):
    """A `diffnas train` run (no search settings read) stands for its genotype."""
    a = _single(tmp_path / "a", 0.5)
    t = tmp_path / "t"
    t.mkdir()
    save_config(load_config(None, [*TINY, "search.epochs=9", "retrain.lr=0.2"]),
                t / "config.yaml")
    mark_made_by(t, "train")
    (t / "retrain").mkdir()
    (t / "retrain" / "result.json").write_text(json.dumps({"test_acc": 0.8, "params": 7}))
    (t / "retrain" / "genotype.json").write_text(json.dumps(GENO))  # as train pins it
    summary = compare_runs([a, t])
    assert summary["runs"][1]["method"].startswith("train")
    assert summary["runs"][1]["test_acc"]["mean"] == 0.8
    assert summary["runs"][1]["search_seconds"]["mean"] is None
    # its search settings were never read: only what it ran differs
    assert summary["setting_differences"] == {"retrain.lr": [0.025, 0.2]}
    digest = summary["method_differences"]["genotype (given to diffnas train)"][1]
    assert summary["method_differences"] == {
        "genotype (given to diffnas train)": ["searched", digest]}
    assert summary["runs"][1]["runs"][0]["genotype"] == GENO  # shown, not "none yet"
    # two train runs of other genotypes: that is what differs (a published one by name)
    v2 = tmp_path / "v2"
    shutil.copytree(t, v2)
    (v2 / "retrain" / "genotype.json").write_text(
        json.dumps(published_genotype("DARTS_V2").to_dict()))
    summary = compare_runs([t, v2])
    assert summary["method_differences"] == {
        "genotype (given to diffnas train)": [digest, "DARTS_V2"]}
    assert "- `genotype (given to diffnas train)`: t: " + digest + "; v2: DARTS_V2" in (
        compare_markdown(summary))
    shutil.copytree(t, tmp_path / "same")  # the same genotype given: nothing differs
    assert compare_runs([t, tmp_path / "same"])["method_differences"] == {}


# --- the command and its files ------------------------------------------------------------
def test_the_command_prints_writes_and_keeps_a_users_files(tmp_path, capsys):
    a, b = _single(tmp_path / "a", 0.5), _single(tmp_path / "b", 0.6)
    out = tmp_path / "out"
    for _ in range(2):  # the second call replaces its own files
        assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# Comparison of 2 runs: retrained test accuracy" in printed
    for name in ("compare.md", "compare.json", "compare.png", "compare.svg"):
        assert (out / name).is_file(), name
    assert json.loads((out / "compare.json").read_text())["runs"][1]["label"] == "b"
    (out / "compare.md").write_text("my notes\n")
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
    assert "that file is not a comparison diffnas wrote" in capsys.readouterr().err
    assert (out / "compare.md").read_text() == "my notes\n"
    assert main(["compare", str(a), str(b), "--out", str(out), "--force"]) == 0
    assert main(["compare", str(a), "--out", str(a / "search")]) == 2  # a run's own folder
    assert "that path is the run" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "nope: no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize("seconds,text", [(None, "-"), (0.354, "0.35 s"), (48.25, "48.2 s"),
                                          (185, "3 min 5 s"), (7440, "2 h 4 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text


# --- what the runs record ----------------------------------------------------------------
def test_a_real_search_and_retraining_record_their_seconds_and_compare(tmp_path, capsys):
    """metrics.jsonl rows of both phases carry the epoch's wall-clock seconds; the loop's
    history (what checkpoints and result.json hold) does not, so a resumed run still
    equals an uninterrupted one."""
    assert main(["search", *TINY, f"out_dir={tmp_path}", "name=real"]) == 0
    run = tmp_path / "real"
    for phase, epochs in (("search", 2), ("retrain", 2)):
        rows = [json.loads(x) for x in (run / phase / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == epochs
        assert all(isinstance(r["seconds"], float) and r["seconds"] > 0 for r in rows)
        assert ms.seed_record(run, 0)[f"{phase}_seconds"] == pytest.approx(
            sum(r["seconds"] for r in rows))
    result = json.loads((run / "retrain" / "result.json").read_text())
    assert all("seconds" not in h for h in result["history"])
    capsys.readouterr()
    assert main(["compare", str(run)]) == 0
    assert "| real | darts | 1/1 |" in capsys.readouterr().out


def test_loop_seconds_time_the_epoch_and_stay_out_of_its_history():
    import time

    class Sleepy(StatelessTask):
        n = 2

        def step(self, batch):
            time.sleep(0.05)
            return {"loss": 1.0}

    loop = Loop(Sleepy(), 1)
    assert loop.seconds is None
    history = loop.run()
    assert loop.seconds >= 0.1
    assert history == [{"epoch": 0, "loss": 1.0}]


def test_language_model_sections_are_compared_with_their_defaults():
    """``lm: {}`` and ``lm: {bptt: 35}`` (the default) ran the same; ``bptt: 20`` did not."""
    rnn = ["search.space={name: darts_rnn}", "data.name=ptb", "data.root=/nowhere"]
    plain = load_config(None, rnn, device=False)
    same = load_config(None, [*rnn, "lm={bptt: 35}"], device=False)
    other = load_config(None, [*rnn, "lm={bptt: 20}"], device=False)
    assert config_differences([plain, same]) == {}
    assert config_differences([plain, other]) == {"lm.bptt": [35, 20]}


def test_a_plugin_engine_s_runs_compare_by_its_own_metric(tmp_path, capsys):
    """Two searches of the quantum example (its plugin named again after the runs, as
    for moved plugins): the table and plot are headed by its energy error, not accuracy."""
    quantum = Path(__file__).resolve().parents[1] / "docs/examples/plugins/quantum_engine.py"
    vqe = [f"plugins=[{quantum}]", "search.space={name: qcircuit, qubits: 3, nodes: 3}",
           "data.name=tfim", "search.epochs=5", "retrain.epochs=5", "progress=false",
           f"out_dir={tmp_path}"]
    assert main(["search", *vqe, "name=darts"]) == 0
    assert main(["search", *vqe, "name=gdas", "search.strategy={name: gdas}"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "darts"), str(tmp_path / "gdas"),
                 f"plugins=[{quantum}]", "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "# Comparison of 2 runs: retrained energy error above the exact ground" in text
    assert "| test err |" not in text and "| err (lower is better) | diff vs first |" in text
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    errors = [json.loads((tmp_path / r / "retrain" / "result.json").read_text())["energy_error"]
              for r in ("darts", "gdas")]
    assert [r["energy_error"]["mean"] for r in summary["runs"]] == errors
    assert summary["runs"][1]["vs_first"]["diff"] == pytest.approx(errors[1] - errors[0])


def test_a_folder_where_a_file_goes_is_refused_before_anything_is_written(tmp_path, capsys):
    """compare and plot share one writer (report/outputs.write_outputs): a folder in the
    way of one output stops the command before it writes any."""
    a = _single(tmp_path / "a", 0.5)
    out = tmp_path / "out"
    (out / "compare.json").mkdir(parents=True)
    assert main(["compare", str(a), "--out", str(out)]) == 2
    assert "compare.json is a folder where compare writes a file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["compare.json"]  # compare.md not written
    pics = tmp_path / "pics"
    (pics / "curves.svg").mkdir(parents=True)
    assert main(["plot", str(a), "--out", str(pics)]) == 2
    assert "curves.svg is a folder where plot writes a file" in capsys.readouterr().err
    assert sorted(p.name for p in pics.iterdir()) == ["curves.svg"]


def test_times_from_other_thread_counts_are_flagged_and_untimed_runs_left_out(tmp_path):
    from diffnas.engine.rundir import record_threads

    one, two = _single(tmp_path / "one", 0.5), _single(tmp_path / "two", 0.5)
    old = _single(tmp_path / "old", 0.5, seconds=(None,))  # made before times were recorded
    record_threads(one, 1)
    record_threads(two, 2)
    record_threads(old, 8)
    assert not compare_runs([one, old])["timing_differs"]  # old has no time to compare
    summary = compare_runs([one, two, old])
    assert summary["timing_differs"]
    assert ("- The times were measured with different devices or thread counts: one cpu, "
            "1 thread; two cpu, 2 threads\n") in compare_markdown(summary)
