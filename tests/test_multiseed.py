"""Multi-seed runs: seed parsing, the summary against hand computations, and a real
two-seed run in worker processes that matches the same seeds run in this process."""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

import pytest
import torch
from conftest import unreadable_fashion_mnist
from scipy import stats as scipy_stats

from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.engine import multiseed as ms
from diffnas.engine import rundir

TINY_RUN = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=1",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=48",
    "retrain.network={C: 4, layers: 3}", "retrain.auxiliary_weight=0", "retrain.cutout=0",
    "progress=false",
]


def test_parse_seeds():
    assert ms.parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert ms.parse_seeds(" 5, 7 ,") == [5, 7]
    assert ms.parse_seeds("0-2,9") == [0, 1, 2, 9]
    for bad in ("", "a,b", "1,1", "0-2,2"):
        with pytest.raises(ConfigError):
            ms.parse_seeds(bad)


def test_default_workers_never_exceeds_cores_or_seeds():
    assert ms.default_workers(4, cores=2) == 2
    assert ms.default_workers(1, cores=16) == 1
    assert ms.default_workers(3, cores=1) == 1


def _geno(normal_edges):
    return {"space": "darts_cnn", "cells": {
        "normal": {"edges": normal_edges, "concat": [2, 3]},
        "reduce": {"edges": [["max_pool_3x3", 0, 2], ["skip_connect", 1, 2],
                             ["max_pool_3x3", 0, 3], ["skip_connect", 2, 3]], "concat": [2, 3]}}}


def test_summary_matches_hand_computation():
    genos = [
        _geno([["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["sep_conv_3x3", 0, 3],
               ["dil_conv_3x3", 2, 3]]),
        _geno([["sep_conv_3x3", 0, 2], ["sep_conv_5x5", 1, 2], ["skip_connect", 1, 3],
               ["dil_conv_3x3", 2, 3]]),
        _geno([["skip_connect", 0, 2], ["skip_connect", 1, 2], ["sep_conv_3x3", 0, 3],
               ["dil_conv_3x3", 2, 3]]),
    ]
    accs = [0.81, 0.85, 0.92]
    records = [{"seed": s, "run_dir": f"seed_{s}", "genotype": g, "test_acc": a,
                "search_val_acc": a - 0.1, "params": 1000, "macs": 10}
               for s, (g, a) in enumerate(zip(genos, accs, strict=True))]
    summary = ms.summarize(records)
    assert summary["test_acc"]["mean"] == pytest.approx(statistics.mean(accs))
    assert summary["test_acc"]["std"] == pytest.approx(statistics.stdev(accs))
    assert summary["test_acc"]["n"] == 3
    freq = summary["op_frequency"]["normal"]
    assert freq["0->2"] == {"sep_conv_3x3": 2, "skip_connect": 1}
    assert freq["1->2"] == {"skip_connect": 2, "sep_conv_5x5": 1}
    assert freq["0->3"] == {"sep_conv_3x3": 2}
    assert freq["1->3"] == {"skip_connect": 1}
    assert freq["2->3"] == {"dil_conv_3x3": 3}
    assert list(freq) == ["0->2", "1->2", "0->3", "1->3", "2->3"]  # by node, then source
    assert summary["op_frequency"]["reduce"]["0->2"] == {"max_pool_3x3": 3}
    # every kept edge is counted once per seed
    assert sum(sum(v.values()) for v in freq.values()) == 3 * 4
    ref = scipy_stats.ttest_1samp(accs, 0.0).confidence_interval(0.95)
    assert summary["test_acc"]["ci95"] == pytest.approx([ref.low, ref.high])
    md = ms.summary_markdown(summary)
    assert "86.00% +- 5.57%" in md and "sep_conv_3x3 x2, skip_connect x1" in md
    assert (f"(mean +- sample std over 3 seeds; 95% CI of the mean {ref.low:.2%} to "
            f"{ref.high:.2%})") in md
    one = ms.summarize(records[:1])  # one seed: no interval
    assert one["test_acc"]["ci95"] is None


def test_mean_std_edge_cases():
    assert ms.mean_std([0.5]) == (0.5, None)  # no sample std of one value
    mean, std = ms.mean_std([])
    assert mean != mean and std != std  # NaN


def test_two_seeds_in_worker_processes_match_in_process_runs(tmp_path):
    cfg = load_config(None, TINY_RUN)
    summary = ms.run_seeds(cfg, [0, 1], tmp_path / "par", workers=2, echo=False)
    assert summary["seeds"] == [0, 1] and summary["failed"] == []
    assert (tmp_path / "par" / "summary.md").is_file()
    on_disk = json.loads((tmp_path / "par" / "summary.json").read_text())
    ci = summary["test_acc"].pop("ci95")
    assert on_disk["test_acc"].pop("ci95") == (ci if ci is None else pytest.approx(ci))
    assert on_disk["test_acc"] == pytest.approx(summary["test_acc"], nan_ok=True)
    for s in (0, 1):
        assert (tmp_path / "par" / f"seed_{s}" / "worker.log").is_file()
        assert load_config(tmp_path / "par" / f"seed_{s}" / "config.yaml").seed == s

    accs = [r["test_acc"] for r in summary["runs"]]
    assert None not in accs
    assert summary["test_acc"]["mean"] == pytest.approx(statistics.mean(accs))

    # seed 1 again, in this process, through the command line: the same result (with one
    # thread, as each of the two workers on this 2-core machine had)
    threads = torch.get_num_threads()
    torch.set_num_threads(ms.threads_per_worker(2))
    try:
        assert main(["search", "--seeds", "1", "--workers", "1", f"out_dir={tmp_path}",
                     "name=seq", *TINY_RUN]) == 0
    finally:
        torch.set_num_threads(threads)
    seq = json.loads((tmp_path / "seq" / "summary.json").read_text())
    assert seq["seeds"] == [1]
    assert seq["runs"][0]["genotype"] == summary["runs"][1]["genotype"]
    assert seq["runs"][0]["test_acc"] == summary["runs"][1]["test_acc"]

    # finished seeds are not run again
    stamp = (tmp_path / "par" / "seed_0" / "retrain" / "result.json").stat().st_mtime_ns
    again = ms.run_seeds(cfg, [0, 1], tmp_path / "par", workers=2, echo=False)
    assert again["runs"] == summary["runs"]
    assert (tmp_path / "par" / "seed_0" / "retrain" / "result.json").stat().st_mtime_ns == stamp
    # a later call naming one seed still summarises every seed of the parent
    one = ms.run_seeds(cfg, [1], tmp_path / "par", workers=1, echo=False)
    assert one["seeds"] == [0, 1] and one["runs"] == summary["runs"]


def test_a_failing_seed_is_reported_and_the_others_kept(tmp_path):
    cfg = load_config(None, [*TINY_RUN, "retrain.enabled=false"])
    dirs = ms.prepare_seeds(cfg, [0, 1], tmp_path)
    # break seed 1's config so its worker fails
    (dirs[1] / "config.yaml").write_text("data: {name: no_such_dataset}\n")
    summary = ms.run_seeds(cfg, [0, 1], tmp_path, workers=1, echo=False)
    assert summary["failed"] == [1]
    assert summary["runs"][0]["genotype"] is not None
    assert "FAILED or unfinished seeds: [1]" in ms.summary_markdown(summary)
    # in this process: the traceback goes to the seed's own log, and the table says so
    assert "Traceback" in (dirs[1] / "log.txt").read_text()
    assert f"traceback in {dirs[1] / 'log.txt'}" in summary["runs"][1]["error"]


def test_a_seed_failed_in_an_earlier_call_stays_reported(tmp_path):
    """Continuing some seeds of a parent (``--seeds 0 --resume``) must not hide another
    seed that is still unfinished: the summary counts it as failed."""
    cfg = load_config(None, [*TINY_RUN, "retrain.enabled=false"])
    dirs = ms.prepare_seeds(cfg, [0, 1], tmp_path)
    (dirs[1] / "config.yaml").write_text("data: {name: no_such_dataset}\n")
    assert ms.run_seeds(cfg, [0, 1], tmp_path, workers=1, echo=False)["failed"] == [1]
    again = ms.run_seeds(cfg, [0], tmp_path, workers=1, echo=False)
    assert again["failed"] == [1]
    assert "not finished" in again["runs"][1]["error"]
    assert "FAILED or unfinished seeds: [1]" in ms.summary_markdown(again)


def test_statistics_leave_out_failed_and_unfinished_seeds():
    """A seed that stopped mid-search has a mid-search accuracy: its row shows it, the mean
    does not take it; a statistic over no seed is None and summary.json stays JSON."""
    recs = [{"seed": 0, "run_dir": "a", "genotype": _geno([["skip_connect", 0, 2]]),
             "test_acc": 0.9, "search_val_acc": 0.8, "params": 1, "macs": 1},
            {"seed": 1, "run_dir": "b", "genotype": _geno([["sep_conv_3x3", 0, 2]]),
             "test_acc": None, "search_val_acc": 0.1, "params": None, "macs": None,
             "error": "not finished"}]
    summary = ms.summarize(recs)
    assert summary["search_val_acc"] == {"mean": 0.8, "std": None, "n": 1}
    assert summary["op_frequency"]["normal"]["0->2"] == {"skip_connect": 1}
    assert "| 1 | - | 10.00% |" in ms.summary_markdown(summary)
    none = ms.summarize(recs[1:])
    assert none["test_acc"] == {"mean": None, "std": None, "n": 0, "ci95": None}
    json.loads(json.dumps(none, allow_nan=False))
    # the table's last column says why a seed is left out, even when it has a genotype
    assert "`not finished` |" in ms.summary_markdown(summary)


def test_summary_json_stays_json_with_a_nan_value(tmp_path):
    rec = {"seed": 0, "run_dir": "a", "genotype": None, "test_acc": float("nan"),
           "search_val_acc": 0.5, "params": 1, "macs": 1}
    summary = ms.write_summary(tmp_path, [rec])
    assert summary["test_acc"]["n"] == 0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["runs"][0]["test_acc"] is None


def test_out_of_range_seeds_are_refused_before_the_parent_directory(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"seeds must be in \[0, 2\*\*32\)"):
        ms.parse_seeds("0,4294967296")
    assert main(["search", "--seeds", "0,4294967296", f"out_dir={tmp_path}", *TINY_RUN]) == 2
    assert not any(tmp_path.iterdir())


def test_resume_passes_the_resume_overrides_to_every_seed(tmp_path, capsys):
    """--seeds --resume takes data.root= (and the other resume overrides) for the seeds,
    in this process and in worker processes; other overrides are still refused."""
    argv = ["search", "--seeds", "0,1", f"out_dir={tmp_path}", "name=p", *TINY_RUN,
            "retrain.enabled=false", "data.name=fashion_mnist", "data.train_subset=32",
            "data.test_subset=16", f"data.root={unreadable_fashion_mnist(tmp_path / 'bad')}"]
    assert main([*argv, "--workers", "1"]) == 1  # unreadable data: both seeds fail
    par = tmp_path / "p"
    capsys.readouterr()
    assert main(["search", "--seeds", "0,1", "--resume", str(par), "search.epochs=2"]) == 2
    assert "only device, progress, plots, data.root, plugins may change" in capsys.readouterr().err
    fm = "/usr/share/datasets/fashion-mnist"
    if not Path(fm).is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    assert main(["search", "--seeds", "0", "--resume", str(par), f"data.root={fm}",
                 "--workers", "1"]) == 1  # seed 0 done; seed 1 still unfinished
    assert (par / "seed_0/search/DONE").exists()
    assert main(["search", "--seeds", "0,1", "--resume", str(par), f"data.root={fm}",
                 "--workers", "2"]) == 0
    assert (par / "seed_1/search/DONE").exists()
    summary = json.loads((par / "summary.json").read_text())
    assert summary["failed"] == [] and summary["search_val_acc"]["n"] == 2


def test_graph_searches_run_in_seed_workers(tmp_path):
    """--seeds dispatches a gnn config to the graph engine in each worker; a seed's
    result equals the same seed run in this process."""
    from diffnas.engine.graph import run_graph_retrain, run_graph_search

    graph = ["data.name=karate", "search.epochs=3", "retrain.epochs=3", "progress=false"]
    config = Path(__file__).resolve().parents[1] / "configs/gnn_cora.yaml"
    cfg = load_config(config, graph)
    summary = ms.run_seeds(cfg, [0, 1], tmp_path / "par", workers=2, echo=False)
    assert summary["failed"] == [] and None not in [r["test_acc"] for r in summary["runs"]]
    one = load_config(config, [*graph, "seed=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(ms.threads_per_worker(2))  # as each worker had
    try:
        genotype = run_graph_search(one, tmp_path / "seq").genotype
        result = run_graph_retrain(one, genotype, tmp_path / "seq")
    finally:
        torch.set_num_threads(threads)
    assert summary["runs"][1]["genotype"] == genotype.to_dict()
    assert summary["runs"][1]["test_acc"] == result["test_acc"]


def interrupt_second_poll(monkeypatch) -> None:
    """The parent's second wait between polls of its workers raises KeyboardInterrupt,
    as a Ctrl-C there would."""
    calls = {"n": 0}

    def interrupting_sleep(_):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ms.time, "sleep", interrupting_sleep)


def test_an_interrupted_parent_stops_its_workers(tmp_path, monkeypatch):
    """SIGINT to the parent alone (kill -INT PID; a terminal's Ctrl-C reaches the whole
    group) must not leave the seeds' worker processes running."""
    import subprocess
    import sys

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def sleeper(cmd, **kw):  # a worker that would run for minutes
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(300)"], **kw)
        started.append(proc)
        return proc

    monkeypatch.setattr(ms.subprocess, "Popen", sleeper)
    interrupt_second_poll(monkeypatch)
    dirs = [tmp_path / f"seed{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    with pytest.raises(KeyboardInterrupt):
        ms._run_in_processes(dirs, workers=2, threads=1, say=lambda _: None)
    assert len(started) == 2
    assert all(p.poll() is not None for p in started)  # none left running


def test_report_plot_and_export_of_a_seeds_parent_point_at_its_seeds(tmp_path):
    """A parent holds a config.yaml, so it read as a run: the report showed 0 search
    epochs and no retraining, plot found nothing and export asked to retrain."""
    from diffnas.config import save_config
    from diffnas.export import ExportError, load_retrained
    from diffnas.report.plots import PlotError, load_run

    parent = tmp_path / "par"
    (parent / "seed_0").mkdir(parents=True)
    save_config(load_config(None, TINY_RUN), parent / "config.yaml")
    (parent / ms.SEEDS_FILE).write_text('{"seeds": [0]}\n')
    with pytest.raises(PlotError, match=rf"multi-seed run: report or plot one of its seeds "
                                        rf"\({parent / 'seed_0'}\); .*summary.md compares "
                                        rf"them, and diffnas compare {parent} OTHER_RUN"):
        load_run(parent)
    with pytest.raises(ExportError, match="multi-seed run: export one of its seeds"):
        load_retrained(parent)


# --- damaged seed files (audit F3) and one seed (F6) ---------------------------------
GENO = _geno([["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["sep_conv_3x3", 0, 3],
              ["dil_conv_3x3", 2, 3]])


def _finished_seeds(parent: Path, seeds: list[int]) -> tuple:
    """A parent whose seeds look finished (search and a 1-epoch retraining), made by hand
    so that no training runs."""
    cfg = load_config(None, TINY_RUN)
    dirs = ms.prepare_seeds(cfg, seeds, parent)
    for s, d in zip(seeds, dirs, strict=True):
        (d / "search").mkdir()
        (d / "search" / "DONE").write_text("")
        (d / "search" / "genotype.json").write_text(json.dumps(GENO))
        (d / "search" / "metrics.jsonl").write_text('{"epoch": 0, "val_acc": 0.5}\n')
        (d / "retrain").mkdir()
        (d / "retrain" / "result.json").write_text(json.dumps(
            {"epochs_done": 1, "test_acc": 0.1 * (s + 1), "params": 100, "macs": 10}))
    return cfg, dirs


def test_a_seeds_own_outputs_are_free_its_run_files_are_not(tmp_path, capsys):
    """The parent's rule "everything under seed_*" claimed each seed's plots/, report.html
    and export/: plot, report and export of every seed were refused at their defaults.
    The innermost run decides; a seed folder that is no run yet stays the parent's."""
    from diffnas.cli import main
    from diffnas.config import save_config
    from diffnas.report.outputs import run_file_owner

    cfg, (seed0,) = _finished_seeds(tmp_path, [0])
    save_config(cfg, tmp_path / "config.yaml")  # as `search --seeds` writes its parent
    for free in ("plots/curves.svg", "report.html", "export/model.pt"):
        assert run_file_owner(seed0 / free) is None
    for own in ("config.yaml", "search/genotype.json", "retrain/result.json", "log.txt"):
        assert run_file_owner(seed0 / own) == seed0
    assert run_file_owner(tmp_path / "seed_7" / "anything") == tmp_path  # not a run yet
    assert run_file_owner(tmp_path / "summary.md") == tmp_path
    for _ in range(2):  # and again: its own earlier report is replaced
        assert main(["report", str(seed0)]) == 0, capsys.readouterr().err
    assert (seed0 / "report.html").is_file()


def test_one_damaged_seed_becomes_a_failed_row_and_the_summary_is_written(tmp_path):
    """A cut-short result.json of one seed: that seed is a FAILED row naming the file and
    what to do, the others are summarised (the summary was not rewritten at all)."""
    cfg, dirs = _finished_seeds(tmp_path, [0, 1, 2])
    res = dirs[1] / "retrain" / "result.json"
    res.write_bytes(res.read_bytes()[:20])
    logger = logging.getLogger("diffnas")
    handlers = list(logger.handlers)
    summary = ms.run_seeds(cfg, [0, 1, 2], tmp_path, workers=1, echo=False)
    assert summary["failed"] == [1]
    assert logger.handlers == handlers  # seed 1's log.txt handler did not stay behind
    assert summary["test_acc"]["n"] == 2
    assert summary["test_acc"]["mean"] == pytest.approx(0.2)
    error = summary["runs"][1]["error"]
    assert f"{res}: damaged, not valid JSON" in error and "--resume" in error
    assert "FAILED or unfinished seeds: [1]" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == [1]


def test_a_result_without_params_or_a_damaged_genotype_is_no_traceback(tmp_path):
    cfg, dirs = _finished_seeds(tmp_path, [0, 1, 2])
    res = dirs[0] / "retrain" / "result.json"
    res.write_text(json.dumps({"epochs_done": 1, "test_acc": 0.5}))  # no params
    (dirs[2] / "search" / "genotype.json").write_text("{")
    summary = ms.run_seeds(cfg, [0, 1, 2], tmp_path, workers=1, echo=False)
    assert summary["runs"][0]["params"] is None and summary["runs"][0]["test_acc"] == 0.5
    assert summary["failed"] == [2]
    assert str(dirs[2] / "search" / "genotype.json") in summary["runs"][2]["error"]
    assert (tmp_path / "summary.md").is_file()


def test_a_damaged_seeds_file_is_an_error_naming_it(tmp_path, capsys):
    from diffnas.config import save_config

    cfg, _ = _finished_seeds(tmp_path / "par", [0, 1])
    save_config(cfg, tmp_path / "par" / "config.yaml")  # as the command writes it
    (tmp_path / "par" / "seeds.json").write_text('{"seeds": [0, 1\n')
    with pytest.raises(ConfigError, match=r"seeds\.json: damaged, not valid JSON"):
        ms.run_seeds(cfg, [0, 1], tmp_path / "par", workers=1, echo=False)
    assert main(["search", "--seeds", "0,1", "--workers", "1", "--resume",
                 str(tmp_path / "par")]) == 2
    assert f"{tmp_path / 'par' / 'seeds.json'}: damaged" in capsys.readouterr().err
    for bad in ('{"seeds": "0,1"}', '{"seeds": [-1]}'):  # (-1: no seed a run can have)
        (tmp_path / "par" / "seeds.json").write_text(bad)
        with pytest.raises(ConfigError, match=r"'seeds' is not a list of integers in \[0, 2"):
            ms.run_seeds(cfg, [0, 1], tmp_path / "par", workers=1, echo=False)


def test_one_seed_has_no_standard_deviation(tmp_path):
    """A sample std is undefined for one value: JSON null and 'one seed', not +- 0.00%."""
    rec = {"seed": 0, "run_dir": "a", "genotype": GENO, "test_acc": 0.9,
           "search_val_acc": 0.5, "params": 1, "macs": 1}
    summary = ms.write_summary(tmp_path, [rec])
    assert summary["test_acc"] == {"mean": 0.9, "std": None, "n": 1, "ci95": None}
    assert json.loads((tmp_path / "summary.json").read_text())["test_acc"]["std"] is None
    md = (tmp_path / "summary.md").read_text()
    assert "90.00%** (one seed" in md and "+- 0.00%" not in md and "+- -" not in md
    assert md.startswith("# Multi-seed summary (1 seed: 0)")  # not "1 seeds"


def test_the_search_accuracy_says_what_it_measured_and_mixes_no_measures():
    """A seed's search accuracy is the eval-mode pass where the run made one; seeds that
    measured differently (resumed across versions) make no statistic."""
    from diffnas.engine.callbacks import search_val_acc

    assert search_val_acc({"val_acc": 0.5, "eval_val_acc": 0.7}) == (0.7, "eval_val_acc")
    assert search_val_acc({"val_acc": 0.5}) == (0.5, "val_acc")
    assert search_val_acc({"val_acc": float("nan")}) == (None, None)
    rec = {"run_dir": "r", "genotype": None, "test_acc": 0.9, "params": 1, "macs": 1}
    same = [{**rec, "seed": s, "search_val_acc": v, "search_val_measure": "eval_val_acc"}
            for s, v in ((0, 0.6), (1, 0.8))]
    summary = ms.summarize(same)
    assert summary["search_val_acc"]["mean"] == pytest.approx(0.7)
    assert "(end of epoch, whole validation split): 70.00% +- 14.14%" in \
        ms.summary_markdown(summary)
    mixed = ms.summarize([same[0], {**same[1], "search_val_measure": "val_acc"}])
    assert mixed["search_val_acc"]["n"] == 0
    assert "measured differently between seeds" in ms.summary_markdown(mixed)


def test_a_seed_resumes_with_the_thread_count_it_started_with(tmp_path, monkeypatch):
    """However many seeds are left (the worker count, so the threads per worker, follows
    them), a seed continues with the count it began with: 1 vs 2 threads round apart."""
    seen = []
    monkeypatch.setattr(ms, "_run_seed", lambda run, overrides: seen.append(
        torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    ms.run_seed(tmp_path, threads=1)
    ms.run_seed(tmp_path, threads=2)  # resumed when it was the last seed left
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert json.loads((tmp_path / rundir.THREADS_FILE).read_text()) == {"threads": 1}


def test_seed_workers_share_the_cores_within_the_users_thread_limit(monkeypatch):
    """cores / workers threads each, never more than an OMP_NUM_THREADS the user set."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ms.threads_per_worker(4) == 4 and ms.threads_per_worker(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ms.threads_per_worker(4) == 2 and ms.threads_per_worker(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert ms.threads_per_worker(4) == 4
