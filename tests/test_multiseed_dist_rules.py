"""Rules of multi-seed runs, data-parallel helpers and run safety that a mutation audit
could break unseen: how seeds are parsed, read back and shared out over workers, which
seed a summary row and its statistics come from (the last epoch, the right phase, a t
interval at two seeds), which seeds are run again, what a failed worker reports; the
mean over ranks of tensors, gradients, metrics and batch statistics (two gloo ranks
against one process holding the whole batch, float64); run locks, stop signals, atomic
writes and RNG states; and the run-directory records a resume is checked against.
Each test replays the rule by hand on a tiny example rather than comparing with numbers
the code once printed."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import locked_elsewhere
from ranks import join_ranks, load_rank, save_rank, spawn_ranks
from scipy import stats as scipy_stats
from test_multiseed import GENO, TINY_RUN, _finished_seeds, interrupt_second_poll
from torch import nn

from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.engine import checkpoint as ck
from diffnas.engine import distributed as dp
from diffnas.engine import multiseed as ms
from diffnas.engine import rundir, runlock
from diffnas.engine.loop import Callback
from diffnas.engine.runlock import (
    LOCK_FILE,
    RunInUseError,
    acquire_run_lock,
    file_lock,
    lock_scope,
    release_run_lock,
)
from diffnas.engine.signals import Terminated, raise_terminated, stop_signals_interrupt
from diffnas.genotype.published import published_genotype


def _rec(seed: int, **kw) -> dict:
    """A finished seed's summary record (no genotype unless given)."""
    return {"seed": seed, "run_dir": f"seed_{seed}", "genotype": None, "test_acc": None,
            "search_val_acc": None, "params": None, "macs": None, **kw}


# --- seeds: parsing, reading back, sharing out the cores ------------------------------
@pytest.mark.parametrize(("text", "seeds"), [
    ("3-3", [3]),  # a one-seed range is not reversed
    ("4294967295", [2**32 - 1]),  # numpy's largest seed
    ("7,0-1", [7, 0, 1]),  # the order given is kept
])
def test_parse_seeds_accepts_every_seed_numpy_takes(text, seeds):
    assert ms.parse_seeds(text) == seeds


def test_workers_are_at_least_one_and_a_zero_thread_limit_is_no_limit(monkeypatch):
    assert ms.default_workers(0, cores=8) == 1  # nothing pending still names one worker
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a limit: 8 cores // 2 workers
    assert ms.threads_per_worker(2) == 4


@pytest.mark.parametrize("bad", ["[true, 1]", f"[0, {2**32}]"])
def test_read_seeds_refuses_what_no_seed_can_be(tmp_path, bad):
    (tmp_path / rundir.SEEDS_FILE).write_text(f'{{"seeds": {bad}}}\n')
    with pytest.raises(ConfigError, match=r"'seeds' is not a list of integers in \[0, 2"):
        ms.read_seeds(tmp_path)


def test_prepare_seeds_keeps_earlier_seeds_and_their_configs(tmp_path):
    """Each seed's config carries its own seed; a later call adds its seeds to seeds.json
    after the earlier ones and leaves an existing seed's config alone."""
    cfg = load_config(None, TINY_RUN)
    dirs = ms.prepare_seeds(cfg, [3, 1], tmp_path)
    assert [load_config(d / "config.yaml").seed for d in dirs] == [3, 1]
    before = (dirs[0] / "config.yaml").read_text()
    other = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, epochs=7))
    ms.prepare_seeds(other, [5, 3], tmp_path)
    assert ms.read_seeds(tmp_path) == [3, 1, 5]
    assert (dirs[0] / "config.yaml").read_text() == before  # seed 3 keeps its settings
    assert load_config(tmp_path / "seed_5" / "config.yaml").search.epochs == 7


# --- one seed's state and record ----------------------------------------------------------
def test_a_seed_is_finished_only_when_its_retraining_ran_every_epoch(tmp_path):
    cfg = load_config(None, [*TINY_RUN, "retrain.epochs=2"])
    run = tmp_path / "seed_0"
    (run / "search").mkdir(parents=True)
    assert not ms.is_finished(run, cfg)  # no DONE
    (run / "search" / "DONE").write_text("")
    off = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, enabled=False))
    assert ms.is_finished(run, off)  # nothing to retrain
    assert not ms.is_finished(run, cfg)  # no result yet
    (run / "retrain").mkdir()
    res = run / "retrain" / "result.json"
    res.write_text(json.dumps({"epochs_done": 1, "test_acc": 0.5}))
    assert not ms.is_finished(run, cfg)  # 1 of 2 epochs
    res.write_text(json.dumps({"epochs_done": 2, "test_acc": 0.5}))
    assert ms.is_finished(run, cfg)


def _rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_seed_record_takes_the_last_epoch_and_each_phases_own_seconds(tmp_path):
    run = tmp_path / "seed_4"
    _rows(run / "search" / "metrics.jsonl",
          [{"epoch": 0, "val_acc": 0.25, "valid_ppl": 90.0, "seconds": 1.5},
           {"epoch": 1, "val_acc": 0.75, "valid_ppl": 40.0, "seconds": 2.25}])
    _rows(run / "retrain" / "metrics.jsonl", [{"epoch": 0, "seconds": 10.0},
                                              {"epoch": 1, "seconds": 0.5}])
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"epochs_done": 2, "test_acc": 0.6, "test_ppl": 55.0, "params": 12}))
    rec = ms.seed_record(run, 4)
    assert (rec["seed"], rec["search_val_acc"], rec["test_acc"]) == (4, 0.75, 0.6)
    assert rec["search_seconds"] == 1.5 + 2.25 and rec["retrain_seconds"] == 10.5
    ppl = ms.seed_record(run, 4, "test_ppl")
    assert ppl["search_val_ppl"] == 40.0 and ppl["test_ppl"] == 55.0


def test_a_train_runs_record_has_the_genotype_it_was_given(tmp_path):
    run = tmp_path / "seed_0"
    (run / "retrain").mkdir(parents=True)
    (run / "retrain" / "genotype.json").write_text(json.dumps(GENO))
    assert ms.seed_record(run, 0)["genotype"] == GENO


@pytest.mark.parametrize("value", ['"0.9"', "true", "null"])
def test_a_result_whose_metric_is_no_number_is_named(tmp_path, value):
    run = tmp_path / "seed_0"
    (run / "retrain").mkdir(parents=True)
    res = run / "retrain" / "result.json"
    res.write_text(f'{{"epochs_done": 1, "test_acc": {value}}}')
    with pytest.raises(ValueError, match=rf"{res}: damaged, no number 'test_acc'"):
        ms.seed_record(run, 0)


# --- the summary's statistics -------------------------------------------------------------
def test_two_seeds_get_the_t_interval_with_one_degree_of_freedom():
    accs = [0.70, 0.80]
    summary = ms.summarize([_rec(0, test_acc=accs[0]), _rec(1, test_acc=accs[1])])
    ref = scipy_stats.ttest_1samp(accs, 0.0).confidence_interval(0.95)
    assert summary["test_acc"]["std"] == pytest.approx(statistics.stdev(accs), rel=1e-12)
    assert summary["test_acc"]["ci95"] == pytest.approx([ref.low, ref.high], rel=1e-12)


def test_seeds_without_spread_get_no_interval():
    """std 0 (all seeds equal): a t interval of zero width would claim certainty."""
    summary = ms.summarize([_rec(s, test_acc=0.5) for s in range(3)])
    assert summary["test_acc"]["std"] == 0.0 and summary["test_acc"]["ci95"] is None


def test_a_seed_without_a_recorded_measure_counts_as_val_acc():
    """Records written before the measure was recorded measured ``val_acc``: mixed with
    one that says val_acc they make one statistic."""
    recs = [_rec(0, search_val_acc=0.6), _rec(1, search_val_acc=0.8,
                                              search_val_measure="val_acc")]
    summary = ms.summarize(recs)
    assert summary["search_val_measures"] == ["val_acc"]
    assert summary["search_val_acc"]["mean"] == pytest.approx(0.7)


def test_times_are_over_finished_seeds_and_per_phase():
    recs = [_rec(0, search_seconds=10.0, retrain_seconds=100.0),
            _rec(1, search_seconds=30.0, retrain_seconds=300.0),
            _rec(2, search_seconds=1000.0, retrain_seconds=1.0, error="boom")]
    summary = ms.summarize(recs)
    assert summary["search_seconds"]["mean"] == pytest.approx(20.0)
    assert summary["retrain_seconds"]["mean"] == pytest.approx(200.0)
    assert summary["failed"] == [2]


def test_op_counts_break_ties_by_name_and_order_edges_by_node_number():
    def geno(edges):
        return {"space": "x", "cells": {"normal": {"edges": edges, "concat": [2]}}}

    genos = [geno([["sep_conv_3x3", 0, 2], ["skip_connect", 9, 10], ["max_pool_3x3", 3, 4]]),
             geno([["avg_pool_3x3", 0, 2], ["skip_connect", 9, 10], ["max_pool_3x3", 3, 4]])]
    freq = ms.op_frequency(genos)["normal"]
    assert list(freq["0->2"].items()) == [("avg_pool_3x3", 1), ("sep_conv_3x3", 1)]
    assert list(freq) == ["0->2", "3->4", "9->10"]  # by target node 2 < 4 < 10, as numbers


# --- running seeds --------------------------------------------------------------------------
def test_run_seeds_runs_only_the_unfinished_and_names_the_failure(tmp_path, monkeypatch):
    cfg, dirs = _finished_seeds(tmp_path, [0, 1, 2])
    (dirs[1] / "retrain" / "result.json").unlink()  # seed 1's retraining not done
    (dirs[1] / "log.txt").write_text("search log of an earlier call\n")
    ran = []

    def failing(d, threads=None, overrides=()):
        ran.append(Path(d).name)
        raise RuntimeError("out of memory in seed 1")

    monkeypatch.setattr(ms, "run_seed", failing)
    summary = ms.run_seeds(cfg, [0, 1, 2], tmp_path, workers=1, echo=False)
    assert ran == ["seed_1"]  # finished seeds are not run again
    assert summary["failed"] == [1]
    assert "RuntimeError: out of memory in seed 1" in summary["runs"][1]["error"]
    log = (dirs[1] / "log.txt").read_text()
    assert log.startswith("search log of an earlier call\n") and "Traceback" in log


def _fake_workers(monkeypatch, code: str) -> list:
    """Replace each worker by ``python -c code``; returns the (cmd, env) of each start."""
    real_popen = subprocess.Popen
    seen: list = []

    def start(cmd, **kw):
        seen.append((cmd, kw["env"]))
        return real_popen([sys.executable, "-c", code], **kw)

    monkeypatch.setattr(ms.subprocess, "Popen", start)
    return seen


def test_workers_get_their_threads_and_overrides_and_report_their_last_line(tmp_path,
                                                                            monkeypatch):
    seen = _fake_workers(monkeypatch, "print('loading'); print('ValueError: bad root'); "
                                      "raise SystemExit(2)")
    d = tmp_path / "seed_0"
    d.mkdir()
    errors = ms._run_in_processes([d], workers=1, threads=3, say=lambda _: None,
                                  overrides=["data.root=/x", "device=cpu"])
    assert errors[d].startswith("worker exit code 2: ValueError: bad root (see ")
    (cmd, env), = seen
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert cmd[cmd.index("--threads") + 1] == "3"
    assert cmd[-4:] == ["--override", "data.root=/x", "--override", "device=cpu"]


def test_an_interrupted_parent_ignores_further_signals_while_it_stops_workers(
        tmp_path, monkeypatch):
    during: list = []
    real_terminate = subprocess.Popen.terminate

    def terminate(proc):
        during.append(signal.getsignal(signal.SIGTERM))
        real_terminate(proc)

    monkeypatch.setattr(subprocess.Popen, "terminate", terminate)
    _fake_workers(monkeypatch, "import time; time.sleep(300)")
    interrupt_second_poll(monkeypatch)
    d = tmp_path / "seed_0"
    d.mkdir()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        ms._run_in_processes([d], workers=1, threads=1, say=lambda _: None)
    assert during == [signal.SIG_IGN]
    assert signal.getsignal(signal.SIGTERM) is before  # put back afterwards


def test_seeds_resume_refuses_a_config(tmp_path, capsys):
    assert main(["search", "--seeds", "0", "--resume", str(tmp_path), "--config",
                 str(tmp_path / "c.yaml")]) == 2
    assert "drop --config" in capsys.readouterr().err


# --- signals ----------------------------------------------------------------------------------
def test_term_and_hup_raise_terminated_with_their_number_and_are_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_interrupt() as handlers:
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
        assert handlers[signal.SIGTERM] is before
    assert signal.getsignal(signal.SIGTERM) is before
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(Terminated) as err:
            raise_terminated(sig, None)
        assert err.value.signum == sig and isinstance(err.value, KeyboardInterrupt)
        assert str(err.value) == signal.Signals(sig).name


# --- locks ----------------------------------------------------------------------------------------
def test_lock_scope_frees_only_the_locks_taken_inside(tmp_path):
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir()
    inner.mkdir()
    acquire_run_lock(outer)
    try:
        with lock_scope():
            acquire_run_lock(outer)
            acquire_run_lock(inner)
        assert locked_elsewhere(outer) and not locked_elsewhere(inner)
    finally:
        release_run_lock(outer)
    assert not locked_elsewhere(outer)


def test_a_lock_file_holds_only_the_current_pid(tmp_path):
    (tmp_path / LOCK_FILE).write_text("99999999999999\n")  # a longer pid of an old holder
    acquire_run_lock(tmp_path)
    try:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert runlock.run_lock_holder(tmp_path) == f"pid {os.getpid()}"
    finally:
        release_run_lock(tmp_path)
    assert runlock.run_lock_holder(tmp_path) is None


def test_a_file_lock_refuses_a_second_holder_and_removes_its_file(tmp_path):
    path = tmp_path / "out.json.lock"
    with file_lock(path, "out.json is busy{pid}"):
        assert path.is_file()
        with pytest.raises(RunInUseError, match=rf"out.json is busy \(pid {os.getpid()}\)"):
            with file_lock(path, "out.json is busy{pid}"):
                pass
    assert not path.exists()


def test_a_file_lock_taken_on_a_file_its_holder_removed_is_taken_again(tmp_path,
                                                                        monkeypatch):
    """The holder removed the file between our open and our flock: the lock we got is on
    a file no one else can find, so it is taken again on the path's new file."""
    path = tmp_path / "out.lock"
    real, calls = runlock._flock, []

    def racing(p, busy):
        fd = real(p, busy)
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(p)
        return fd

    monkeypatch.setattr(runlock, "_flock", racing)
    with file_lock(path, "busy{pid}"):
        assert len(calls) == 2 and path.is_file()
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


# --- checkpoints and RNG states ---------------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ck.atomic_save({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        ck.atomic_save({"epoch": 2, "x": _Unpicklable()}, path)
    assert ck.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing\.pt"):
        ck.load_checkpoint(tmp_path / "nothing.pt")


def test_a_checkpoint_of_a_plugin_class_not_imported_is_an_import_error(tmp_path):
    """Not 'damaged, delete it': the plugin is what is missing."""
    (tmp_path / "mutaudit_plugin.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mutaudit_plugin

        ck.atomic_save({"thing": mutaudit_plugin.Thing()}, tmp_path / "c.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mutaudit_plugin", None)
    with pytest.raises(ImportError, match="mutaudit_plugin"):
        ck.load_saved(tmp_path / "c.pt", "remedy")


def test_rng_states_round_trip_and_seeding_repeats_every_generator():
    def draws():
        return (torch.rand(3), np.random.rand(3), random.random())

    state = ck.rng_state()
    first = draws()
    ck.set_rng_state(state)
    again = draws()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]
    ck.seed_everything(11)
    a = draws()
    ck.seed_everything(11)
    b = draws()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_an_os_error_without_a_file_name_gets_the_path(tmp_path):
    path = tmp_path / "x.json"
    err = ck.write_error(OSError(errno.EIO, "Input/output error"), path)
    assert isinstance(err, OSError) and err.filename == str(path)
    assert err.errno == errno.EIO
    named = OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert ck.write_error(named, path) is named  # it already names its file


# --- run-directory records ------------------------------------------------------------------
def test_a_run_name_that_is_a_path_is_refused(tmp_path):
    cfg = dataclasses.replace(load_config(None, [f"out_dir={tmp_path}"]), name="a/b")
    with pytest.raises(ConfigError, match="a single folder inside out_dir"):
        rundir.new_run_dir(cfg)
    assert not (tmp_path / "a").exists()


def test_a_failed_start_leaves_no_claim_behind(tmp_path, monkeypatch):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=r"])

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "save_config", full_disk)
    with pytest.raises(OSError):
        rundir.new_run_dir(cfg, marks={rundir.SEEDS_FILE: '{"seeds": []}\n'})
    assert list((tmp_path / "r").iterdir()) == []
    monkeypatch.undo()
    assert rundir.new_run_dir(cfg) == tmp_path / "r"  # free to start again


def test_made_by_names_only_search_or_train(tmp_path):
    with pytest.raises(ValueError, match="not 'retrain'"):
        rundir.mark_made_by(tmp_path, "retrain")
    assert not (tmp_path / rundir.MADE_BY_FILE).exists()


@pytest.mark.parametrize(("held", "count"), [(3, 3), (0, None), (True, None), (-2, None),
                                             ("2", None)])
def test_recorded_thread_counts_are_positive_integers(tmp_path, held, count):
    (tmp_path / rundir.THREADS_FILE).write_text(json.dumps({"threads": held}))
    assert rundir.recorded_threads(tmp_path) == count


def test_a_resume_keeps_the_thread_count_the_run_started_with(tmp_path):
    rundir.check_resume_threads(tmp_path, resume=False, device="cpu")
    assert rundir.recorded_threads(tmp_path) == torch.get_num_threads()
    rundir.record_threads(tmp_path, torch.get_num_threads() + 5)
    rundir.check_resume_threads(tmp_path, resume=True, device="cpu")
    assert rundir.recorded_threads(tmp_path) == torch.get_num_threads() + 5


def test_only_a_legacy_retraining_keeps_the_seed_plus_one_test_subset(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for run in (old, new):
        _rows(run / "retrain" / "metrics.jsonl", [{"epoch": 0}])
    rundir.mark_made_by(new, "train")
    assert rundir.test_subset_seed(old, 4) == 5  # made before made_by.txt: seed + 1
    assert rundir.test_subset_seed(new, 4) is None
    assert json.loads((old / "retrain" / rundir.TEST_SUBSET_FILE).read_text()) == {"seed": 5}


@pytest.mark.parametrize(("before", "now", "differ"), [
    (1.0, 1.0 + 1e-5, False), (1.0, 1.001, True),  # relative 1e-4
    (1, 1.0 + 1e-9, False),  # an int and a float of the same value
    (math.inf, math.inf, False), (math.inf, -math.inf, True), (math.nan, math.nan, False),
    ({"a": 1}, {"a": 1, "b": 2}, True),  # a field more
    ([1, 2, 3], [1, 2], True),  # a value fewer
])
def test_same_data_tolerance_and_structure(before, now, differ):
    assert rundir.same_data({"x": before}, {"x": now}) == (["x"] if differ else [])


@dataclasses.dataclass
class _Data:
    images: torch.Tensor
    vocab: list


def test_the_data_fingerprint_sees_a_moved_value_and_a_changed_word():
    t = torch.arange(32, dtype=torch.float32)
    swapped = t.clone()
    swapped[[2, 3]] = swapped[[3, 2]]  # mean and std unchanged, a sampled place differs
    words = [f"w{i}" for i in range(100)]
    base = rundir.data_fingerprint(_Data(t, words))
    assert rundir.same_data(base, rundir.data_fingerprint(_Data(swapped, words))) == ["images"]
    other = [*words[:-1], "changed"]
    assert rundir.same_data(base, rundir.data_fingerprint(_Data(t, other))) == ["vocab"]


def test_a_new_phase_rerecords_its_data_and_only_a_resume_is_checked(tmp_path):
    a = _Data(torch.zeros(4), [])
    b = _Data(torch.ones(4), [])
    rundir.check_same_data(tmp_path, a, resume=False)
    rundir.check_same_data(tmp_path, b, resume=False)  # a restart from scratch
    rundir.check_same_data(tmp_path, b, resume=True)
    with pytest.raises(ValueError, match="computed on other data"):
        rundir.check_same_data(tmp_path, a, resume=True)


def test_pinned_genotype_is_checked_on_resume_and_replaced_by_a_new_retraining(tmp_path):
    v1, v2 = published_genotype("DARTS_V1"), published_genotype("DARTS_V2")
    rundir.pin_genotype(tmp_path, v1, resume=False)
    with pytest.raises(ValueError, match="retraining another genotype"):
        rundir.pin_genotype(tmp_path, v2, resume=True)
    rundir.pin_genotype(tmp_path, v2, resume=False)
    assert rundir.recorded_genotype(tmp_path / "genotype.json").to_dict() == v2.to_dict()


def test_run_messages_for_unretrained_searches_and_seed_parents(tmp_path):
    cfg = load_config(None, TINY_RUN)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "DONE").write_text("")
    (tmp_path / "search" / "genotype.json").write_text(json.dumps(GENO))
    assert rundir.unretrained_search_message(tmp_path, cfg) is None  # retraining enabled
    off = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, enabled=False))
    assert "holds no retraining" in rundir.unretrained_search_message(tmp_path, off)
    assert not rundir.nothing_computed(tmp_path)
    par = tmp_path / "par"
    par.mkdir()
    (par / rundir.SEEDS_FILE).write_text('{"seeds": []}\n')
    assert rundir.nothing_computed(par)
    for s in range(3):
        (par / f"seed_{s}").mkdir()
    assert ", ...)" not in rundir.seeds_parent_message(par, "plot")
    (par / "seed_3").mkdir()
    assert ", ...)" in rundir.seeds_parent_message(par, "plot")


# --- data parallelism, in this process ------------------------------------------------------
def test_torchrun_environment_rules(monkeypatch):
    for v in dp.TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dp.init_distributed() == dp.DistEnv()  # one process: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"\['LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', "
                                           r"'RANK'\] unset: launch with torchrun"):
        dp.init_distributed()
    assert not dp.launched_by_torchrun() and dp.planned_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(v, "0")
    assert dp.launched_by_torchrun() and dp.planned_world_size() == 4
    assert dp.nccl_for_cuda()  # no group yet: CUDA tensors would go over NCCL
    assert dp.DistEnv().is_main and not dp.DistEnv(rank=1, world_size=2).is_main


def test_a_main_process_error_is_marked_as_raised_on_every_rank():
    def fails():
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused") as err:
        dp.main_process_result(fails)
    assert err.value.on_every_rank is True
    assert dp.main_process_result(lambda x: x + 1, 1) == 2


class _Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_run_start(self, loop):
        self.calls.append("run_start")

    def on_epoch_start(self, loop, epoch):
        self.calls.append("epoch_start")

    def on_step_end(self, loop, step, metrics):
        self.calls.append("step_end")

    def on_epoch_end(self, loop, epoch, metrics):
        self.calls.append("epoch_end")

    def on_run_end(self, loop):
        self.calls.append("run_end")

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.calls.append(("loaded", state["calls"]))


@pytest.mark.parametrize("main_rank", [True, False])
def test_main_process_only_runs_hooks_on_rank_0_and_keeps_state_everywhere(monkeypatch,
                                                                          main_rank):
    monkeypatch.setattr(dp, "is_main_process", lambda: main_rank)
    inner = _Recorder()
    cb = dp.MainProcessOnly(inner)
    cb.on_run_start(None)
    cb.on_epoch_start(None, 0)
    cb.on_step_end(None, 0, {})
    cb.on_epoch_end(None, 0, {})
    cb.on_run_end(None)
    hooks = ["run_start", "epoch_start", "step_end", "epoch_end", "run_end"]
    assert inner.calls == (hooks if main_rank else [])
    assert cb.state_dict() == {"calls": len(inner.calls)}
    cb.load_state_dict({"calls": 7})
    assert inner.calls[-1] == ("loaded", 7)


def test_resume_loop_loads_the_checkpoint_only_when_resuming(tmp_path):
    class Loop:
        loaded = None

        def load_state_dict(self, state, source=None):
            self.loaded = (state, source)

    ckpt = tmp_path / "checkpoint.pt"
    ck.atomic_save({"epoch": 3}, ckpt)
    loop = Loop()
    assert dp.resume_loop(loop, ckpt, resume=False) is False and loop.loaded is None
    assert dp.resume_loop(loop, tmp_path / "none.pt", resume=True) is False
    assert dp.resume_loop(loop, ckpt, resume=True) is True
    assert loop.loaded == ({"epoch": 3}, ckpt)


def test_converting_batchnorm_keeps_its_mode_tensors_and_count():
    bn = nn.BatchNorm2d(3)
    bn.num_batches_tracked.fill_(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), bn).eval()
    dp.convert_sync_batchnorm(net)
    new = net[1]
    assert isinstance(new, dp.SyncBatchNorm) and not new.training
    assert new.weight is bn.weight and new.running_var is bn.running_var
    assert new.num_batches_tracked is bn.num_batches_tracked


# --- data parallelism, two gloo ranks against one process ----------------------------------
def _full_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64) * (k + 1) + k
            for k in range(2)]


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    join_ranks(rank, world, port)
    try:
        half = slice(rank * 4, rank * 4 + 4)
        found: dict = {}
        a = torch.tensor([1.0, 2.0]) * (rank + 1)  # float32
        b = torch.full((2, 2), 3.0 * rank, dtype=torch.float64)
        c = torch.tensor([10.0 * rank, -1.0, 5.0])  # float32 again: one bucket with a
        found["mean"] = dp.all_reduce_mean([a, None, b, c])
        p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([1.0, 2.0, 3.0]) * (2 * rank + 1)
        dp.average_grads_([p, q])
        found["grad"], found["no_grad"] = p.grad, q.grad
        found["metrics"] = dp.all_reduce_metrics({"loss": 1.0 + rank, "acc": 0.5 * rank})
        bn = dp.convert_sync_batchnorm(nn.BatchNorm2d(3, momentum=None).double())
        for x in _full_batches():
            bn(x[half])
        found["cumulative"] = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        bn.eval()
        bn(_full_batches()[0][half])  # eval with running statistics: they stay
        found["eval_count"] = bn.num_batches_tracked.clone()
        free = dp.SyncBatchNorm(3, affine=False, track_running_stats=False).double().eval()
        found["no_stats"] = free(_full_batches()[1][half])
        found["global_bn"] = dp.global_batch_norm(_full_batches()[0][half])
        save_rank(found, out, rank)
        dp.shutdown(together=True)
    finally:
        dp.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = spawn_ranks(_rank_worker, tmp_path_factory.mktemp("ranks2"))
    return [load_rank(out, r) for r in (0, 1)]


def test_means_over_ranks_of_tensors_gradients_and_metrics(two_ranks):
    for found in two_ranks:
        a, none, b, c = found["mean"]
        assert none is None
        torch.testing.assert_close(a, torch.tensor([1.5, 3.0]))  # (1 + 2) / 2
        torch.testing.assert_close(b, torch.full((2, 2), 1.5, dtype=torch.float64))
        torch.testing.assert_close(c, torch.tensor([5.0, -1.0, 5.0]))
        torch.testing.assert_close(found["grad"], torch.tensor([2.0, 4.0, 6.0]))  # x(1+3)/2
        assert found["no_grad"] is None
        assert found["metrics"] == pytest.approx({"loss": 1.5, "acc": 0.25}, rel=1e-15)


def test_sync_batchnorm_cumulative_average_matches_one_process(two_ranks):
    ref = nn.BatchNorm2d(3, momentum=None).double()
    for x in _full_batches():
        ref(x)
    for found in two_ranks:
        mean, var, count = found["cumulative"]
        torch.testing.assert_close(mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert int(count) == 2 and int(found["eval_count"]) == 2


def test_batch_statistics_without_running_ones_are_the_global_batchs(two_ranks):
    for rank, found in enumerate(two_ranks):
        half = slice(rank * 4, rank * 4 + 4)
        for key, x in (("no_stats", _full_batches()[1]), ("global_bn", _full_batches()[0])):
            want = F.batch_norm(x, None, None, training=True)[half]
            torch.testing.assert_close(found[key], want, rtol=1e-12, atol=1e-12)
