"""Rules of run directories, atomic checkpoints and multi-seed runs that a second mutation
audit found unchecked: which names a run directory may take and which files a new one
holds (marks written before its config), how a run's kind is judged, what a data
fingerprint sees (the last value, the spread, the dtype, a field only one side has), how
a saved config, a pinned genotype and a recorded test subset are refused when damaged;
where an atomic write stages its file, that an interrupt or an error inside the write
keeps the old file, and what a checkpoint that cannot be read says; and in multi-seed
runs, the summary's rows, counts and Markdown, which seeds are (re)run, and what a worker
keeps of its earlier output. Each test replays the rule by hand on a tiny example rather
than comparing with numbers the code once printed; it complements
tests/test_multiseed_dist_rules.py, which it does not repeat."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os

import pytest
import torch
from test_multiseed import GENO, TINY_RUN

from diffnas.config import ConfigError, load_config
from diffnas.engine import checkpoint as ck
from diffnas.engine import multiseed as ms
from diffnas.engine import rundir
from diffnas.genotype import GenotypeError
from diffnas.genotype.published import published_genotype


# --- run directories ------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", ".."])
def test_a_run_name_that_names_no_folder_of_its_own_is_refused(tmp_path, name):
    """``..`` is a single path part, yet it names the parent of out_dir: a run there would
    write its files beside out_dir."""
    out = tmp_path / "out"
    cfg = dataclasses.replace(load_config(None, [f"out_dir={out}"]), name=name)
    with pytest.raises(ConfigError, match=rf"name={name}: .*a single folder inside out_dir"):
        rundir.new_run_dir(cfg)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_new_run_holds_its_config_and_maker_and_its_marks_come_first(tmp_path,
                                                                       monkeypatch):
    """The marks (a seeds parent's seeds.json) are on disk before the config is saved: a
    run stopped between them must not read as a plain run."""
    seen = []
    real = rundir.save_config

    def save(cfg, path):
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        real(cfg, path)

    monkeypatch.setattr(rundir, "save_config", save)
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=p"])
    run = rundir.new_run_dir(cfg, command="train", marks={rundir.SEEDS_FILE: "{}\n"})
    assert rundir.SEEDS_FILE in seen[0]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [rundir.CONFIG_FILE, rundir.MADE_BY_FILE, rundir.SEEDS_FILE])  # no plugins.json
    assert rundir.made_by(run) == "train" and rundir.run_kind(run) == "train"


@pytest.mark.parametrize(("made", "folders", "kind"), [
    (None, ["search", "retrain"], "search"),  # a search that went on to retrain
    (None, ["retrain"], "train"),
    (None, [], None),
    ("train", ["search"], "train"),  # the record wins over the folders
])
def test_run_kind_prefers_the_record_then_the_search_folder(tmp_path, made, folders, kind):
    for f in folders:
        (tmp_path / f).mkdir()
    if made:
        rundir.mark_made_by(tmp_path, made)
    assert rundir.run_kind(tmp_path) == kind


def test_a_resume_of_the_same_thread_count_or_on_a_gpu_says_nothing(tmp_path, caplog,
                                                                    monkeypatch):
    now = torch.get_num_threads()
    caplog.set_level(logging.WARNING, logger="diffnas")
    monkeypatch.setattr(logging.getLogger("diffnas"), "propagate", True)
    rundir.record_threads(tmp_path, now)
    rundir.check_resume_threads(tmp_path, resume=True, device="cpu")
    assert "torch threads" not in caplog.text
    rundir.record_threads(tmp_path, now + 1)
    monkeypatch.setattr(rundir, "resolve_device", lambda name: torch.device("cuda"))
    rundir.check_resume_threads(tmp_path, resume=True, device="cuda")
    assert "torch threads" not in caplog.text  # GPU sums do not follow the CPU threads
    monkeypatch.undo()
    monkeypatch.setattr(logging.getLogger("diffnas"), "propagate", True)
    rundir.check_resume_threads(tmp_path, resume=True, device="cpu")
    assert f"started with {now + 1} torch threads and resumes with {now}" in caplog.text


@pytest.mark.parametrize(("held", "problem"), [
    ("{}", "'seed' is 'missing'"), ('{"seed": true}', "'seed' is True"),
    ('{"seed": "3"}', "'seed' is '3'")])
def test_a_damaged_test_subset_record_is_refused(tmp_path, held, problem):
    record = tmp_path / "retrain" / rundir.TEST_SUBSET_FILE
    record.parent.mkdir()
    record.write_text(held)
    with pytest.raises(ValueError, match=rf"damaged, {problem}, not a number or null"):
        rundir.test_subset_seed(tmp_path, 4)
    record.write_text('{"seed": null}')  # the fix the message gives
    assert rundir.test_subset_seed(tmp_path, 4) is None


# --- data fingerprints ------------------------------------------------------------------
@dataclasses.dataclass
class _Images:
    x: torch.Tensor


@dataclasses.dataclass
class _Labels:
    y: torch.Tensor
    words: object = ()


def _differs(a, b) -> list[str]:
    before = json.loads(json.dumps(rundir.data_fingerprint(a)))  # as data.json holds it
    return rundir.same_data(before, rundir.data_fingerprint(b))


def test_the_float_fingerprint_samples_the_last_value():
    """Swapping the last two values keeps the mean and the spread: only the sample at the
    last place (``(n - 1) * 15 // 15``) sees it."""
    x = torch.arange(32, dtype=torch.float64) ** 2
    swapped = x.clone()
    swapped[[30, 31]] = swapped[[31, 30]]
    assert _differs(_Images(x), _Images(swapped)) == ["x"]


def test_the_float_fingerprint_sees_the_spread_between_samples():
    """Values at places no sample reaches move apart by the same amount: mean and samples
    stay, the standard deviation does not."""
    x = torch.zeros(32, dtype=torch.float64)
    picks = {i * 31 // 15 for i in range(16)}
    a, b = [i for i in range(32) if i not in picks][:2]
    wider = x.clone()
    wider[a], wider[b] = 1.0, -1.0
    assert float(wider.mean()) == 0.0 and all(wider[i] == 0 for i in picks)
    assert _differs(_Images(x), _Images(wider)) == ["x"]


def test_the_fingerprint_sees_the_dtype_and_every_integer_value():
    x = torch.arange(8, dtype=torch.float32)
    assert _differs(_Images(x), _Images(x.double())) == ["x"]  # same values, other dtype
    y = torch.arange(10)
    last = y.clone()
    last[-1] = 0
    assert _differs(_Labels(y), _Labels(last)) == ["y"]


def test_a_long_tuple_is_recorded_like_a_long_list():
    words = tuple(f"w{i}" for i in range(65))
    rec = rundir.data_fingerprint(_Labels(torch.arange(2), words))["words"]
    assert set(rec) == {"len", "sha1"} and rec["len"] == 65


def test_a_field_only_the_new_data_has_is_a_difference():
    assert rundir.same_data({"x": 1}, {"x": 1, "extra": 2}) == ["extra"]
    assert rundir.same_data({"x": 1, "gone": 2}, {"x": 1}) == ["gone"]


def test_a_float_against_a_text_differs_and_the_tolerance_is_of_the_larger():
    assert rundir.same_data({"x": 1.0}, {"x": "1.0"}) == ["x"]
    # |a - b| <= 1e-6 + 1e-4 * max(|a|, |b|): a gap just inside that bound is the same,
    # though it is outside 1e-6 + 1e-4 * min(|a|, |b|)
    gap = 1.0100505e-4
    assert gap <= 1e-6 + 1e-4 * (1 + gap) and gap > 1e-6 + 1e-4 * 1.0
    assert rundir.same_data({"x": 1.0}, {"x": 1.0 + gap}) == []
    assert rundir.same_data({"x": 1.0}, {"x": 1.0 + 1.0102e-4}) == ["x"]


# --- saved configs, genotypes, messages -------------------------------------------------
def test_a_run_directory_that_is_a_file_or_a_list_config_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a run directory"):
        rundir.load_run_config(tmp_path / "f")
    run = tmp_path / "r"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of settings, not a list"):
        rundir.load_run_config(run)


def test_an_empty_config_beside_only_a_log_means_nothing_was_computed(tmp_path):
    (tmp_path / rundir.CONFIG_FILE).write_text("")
    (tmp_path / "log.txt").write_text("started\n")
    assert rundir.nothing_computed(tmp_path)
    with pytest.raises(ConfigError, match="stopped before its config was saved"):
        rundir.load_run_config(tmp_path)
    assert not rundir.nothing_computed(tmp_path / "missing")


@pytest.mark.parametrize(("phase", "fix"), [
    ("search", "delete .*DONE and resume"), ("retrain", "delete it and resume with the "
                                                        "genotype the run retrains")])
def test_a_damaged_genotype_says_how_its_phase_gets_it_back(tmp_path, phase, fix):
    path = tmp_path / phase / "genotype.json"
    path.parent.mkdir()
    path.write_text("{}")
    with pytest.raises(GenotypeError, match=fix):
        rundir.recorded_genotype(path)


def test_a_pinned_genotype_differing_in_one_op_is_refused(tmp_path):
    v2 = published_genotype("DARTS_V2")
    d = v2.to_dict()
    cell = next(iter(d["cells"]))
    edge = d["cells"][cell]["edges"][0]
    edge[0] = "max_pool_3x3" if edge[0] != "max_pool_3x3" else "avg_pool_3x3"
    changed = type(v2).from_dict(d)
    rundir.pin_genotype(tmp_path, v2, resume=False)
    with pytest.raises(ValueError, match="retraining another genotype"):
        rundir.pin_genotype(tmp_path, changed, resume=True)


def test_an_unfinished_search_without_retraining_gets_no_message(tmp_path):
    cfg = load_config(None, [*TINY_RUN, "retrain.enabled=false"])
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "genotype.json").write_text(json.dumps(GENO))
    assert rundir.unretrained_search_message(tmp_path, cfg) is None  # no DONE yet
    (tmp_path / "search" / "DONE").write_text("")
    assert "holds no retraining" in rundir.unretrained_search_message(tmp_path, cfg)


# --- atomic writes and checkpoints ------------------------------------------------------
def test_the_staged_file_lies_beside_the_target_and_the_data_is_synced_first(tmp_path,
                                                                            monkeypatch):
    """Beside it, so the rename is atomic (same file system) and a crash leaves nothing
    elsewhere; synced before the rename, so the new name never points at lost bytes."""
    target = tmp_path / "sub" / "result.json"
    synced = []
    real = os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: synced.append(target.exists()) or real(fd))
    with ck.staged_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".result.json.")
        tmp.write_text("{}")
    assert synced == [False] and target.read_text() == "{}"


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_an_interrupted_or_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "summary.json"
    ck.atomic_write_text("old\n", path)

    def write(f):
        f.write(b"half")
        raise error("stopped mid-write")

    with pytest.raises(error, match="stopped mid-write"):
        ck._atomic_write(write, path, "wb")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_os_error_in_the_context_of_a_writer_error_names_the_file(tmp_path):
    """torch.save's zip writer raises a RuntimeError whose context (not cause) is the
    OSError of the full disk; it becomes an OSError naming the file."""
    path = tmp_path / "ck.pt"

    def write(f):
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError:
            raise RuntimeError("unexpected pos") from None  # context kept, cause None

    with pytest.raises(OSError) as err:
        ck._atomic_write(write, path, "wb")
    assert err.value.errno == errno.EIO and err.value.filename == str(path)


def test_text_is_written_as_utf8(tmp_path):
    text = "genotype: α → β, ±0.5\n"
    ck.atomic_write_text(text, tmp_path / "g.txt")
    assert (tmp_path / "g.txt").read_bytes() == text.encode("utf-8")


def test_a_checkpoint_path_that_is_a_folder_is_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(ck.CheckpointError, match=rf"cannot read checkpoint {tmp_path}: "):
        ck.load_saved(tmp_path, "remedy")


def test_refusing_a_foreign_json_leaves_no_probe_and_turns_os_errors_into_a_message(
        tmp_path):
    ck.refuse_foreign_json(tmp_path / "out.json", {"a"}, "results", "--json")
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    (tmp_path / "file").write_text("x")  # a file where its folder should be
    with pytest.raises(ValueError, match=r"--json .*file/out\.json: cannot write there"):
        ck.refuse_foreign_json(tmp_path / "file" / "out.json", {"a"}, "results", "--json")


# --- multi-seed runs ------------------------------------------------------------------------
def _rec(seed: int, **kw) -> dict:
    return {**ms._empty_record(f"seed_{seed}", seed), **kw}


def test_seed_configs_name_their_own_folder_and_are_search_runs(tmp_path):
    cfg = load_config(None, TINY_RUN)
    d, = ms.prepare_seeds(cfg, [7], tmp_path)
    saved = load_config(d / rundir.CONFIG_FILE)
    assert (d.name, saved.name, saved.out_dir, saved.seed) == ("seed_7", "seed_7",
                                                               str(tmp_path), 7)
    assert rundir.made_by(d) == "search"


def test_failed_seeds_count_as_seeds_but_add_no_genotype_to_the_op_counts():
    def geno(op):
        return {"space": "x", "cells": {"normal": {"edges": [[op, 0, 2]], "concat": [2]}}}

    recs = [_rec(0, test_acc=0.5, genotype=geno("a")), _rec(1, test_acc=0.7, genotype=geno("a")),
            _rec(2, test_acc=0.1, genotype=geno("b"), error="boom")]
    summary = ms.summarize(recs)
    assert summary["n"] == 3 and summary["seeds"] == [0, 1, 2] and summary["failed"] == [2]
    assert summary["test_acc"]["n"] == 2
    assert summary["op_frequency"] == {"normal": {"0->2": {"a": 2}}}


def test_op_counts_put_the_most_chosen_op_first():
    def geno(op):
        return {"space": "x", "cells": {"normal": {"edges": [[op, 0, 2]], "concat": [2]}}}

    freq = ms.op_frequency([geno("a_pool"), geno("z_conv"), geno("z_conv")])
    assert list(freq["normal"]["0->2"].items()) == [("z_conv", 2), ("a_pool", 1)]


def test_the_markdown_shows_one_seed_failures_and_op_counts():
    one = ms.summary_markdown(ms.summarize([_rec(0, test_acc=0.5, genotype=GENO)]))
    assert "(one seed: no spread to report)" in one
    assert "| 0->2 | sep_conv_3x3 x1 |" in one
    failed = ms.summary_markdown(ms.summarize(
        [_rec(0, test_acc=0.5, genotype=GENO), _rec(1, genotype=GENO, error="worker died")]))
    assert "FAILED or unfinished seeds: [1]" in failed
    assert "| 1 | - | - | - | `worker died` |" in failed  # the error, not the genotype


def test_a_result_with_text_params_or_macs_gives_none(tmp_path):
    run = tmp_path / "seed_0"
    (run / "retrain").mkdir(parents=True)
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"epochs_done": 1, "test_acc": 0.5, "params": "12", "macs": "9"}))
    rec = ms.seed_record(run, 0)
    assert rec["test_acc"] == 0.5 and rec["params"] is None and rec["macs"] is None
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"epochs_done": 1, "test_acc": 0.5, "params": 12, "macs": 9.5}))
    rec = ms.seed_record(run, 0)
    assert (rec["params"], rec["macs"]) == (12, 9.5)


def test_a_damaged_result_says_which_seed_to_continue(tmp_path):
    run = tmp_path / "seed_4"
    (run / "retrain").mkdir(parents=True)
    (run / "retrain" / "result.json").write_text("{")
    with pytest.raises(ValueError, match=rf"--seeds 4 --resume {tmp_path}\)"):
        ms.seed_record(run, 4)


def test_an_unknown_metric_name_is_refused():
    with pytest.raises(ValueError, match="metric 'top5': one of test_acc, test_ppl"):
        ms.as_metric("top5")


def test_a_seed_whose_config_cannot_be_read_is_run_so_its_worker_reports_it(tmp_path,
                                                                          monkeypatch):
    from test_multiseed import _finished_seeds

    cfg, dirs = _finished_seeds(tmp_path, [0, 1])
    (dirs[1] / rundir.CONFIG_FILE).write_text("")
    ran = []
    monkeypatch.setattr(ms, "run_seed", lambda d, threads=None, overrides=(): ran.append(
        d.name) or {})
    ms.run_seeds(cfg, [0, 1], tmp_path, workers=1, echo=False)
    assert ran == ["seed_1"]


def test_the_default_worker_count_follows_the_seeds_left(tmp_path, monkeypatch):
    """Two of three seeds done: one seed left runs in this process, whatever the cores."""
    from test_multiseed import _finished_seeds

    cfg, dirs = _finished_seeds(tmp_path, [0, 1, 2])
    (dirs[2] / "retrain" / "result.json").unlink()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    ran = []
    monkeypatch.setattr(ms, "run_seed", lambda d, threads=None, overrides=(): ran.append(
        (d.name, threads)) or {})
    monkeypatch.setattr(ms, "_run_in_processes", lambda *a, **k: pytest.fail("processes"))
    ms.run_seeds(cfg, [0, 1, 2], tmp_path, echo=False)
    assert ran == [("seed_2", ms.threads_per_worker(1))]


class _FakeProc:
    """A worker that ends, with ``code``, at its second poll; ``live`` counts the running."""

    def __init__(self, code, live):
        self.returncode, self.polls, self.stdin = None, 0, None
        self.code, self.live = code, live
        live[0] += 1

    def poll(self):
        self.polls += 1
        if self.polls >= 2 and self.returncode is None:
            self.returncode = self.code
            self.live[0] -= 1
        return self.returncode


def test_workers_start_no_more_than_asked_and_keep_earlier_output(tmp_path, monkeypatch):
    """A worker silent before it failed reports "(no output)", not the header line each
    start adds to worker.log, which keeps an earlier call's output."""
    dirs = [tmp_path / f"seed_{s}" for s in range(3)]
    for d in dirs:
        d.mkdir()
    (dirs[0] / "worker.log").write_text("earlier call\n")
    live, running_at_start = [0], []

    def popen(cmd, **kw):
        running_at_start.append(live[0])
        return _FakeProc(3 if cmd[3].endswith("seed_1") else 0, live)

    monkeypatch.setattr(ms.subprocess, "Popen", popen)
    monkeypatch.setattr(ms.time, "sleep", lambda s: None)
    errors = ms._run_in_processes(dirs, workers=2, threads=1, say=lambda _: None)
    assert len(running_at_start) == 3 and max(running_at_start) == 1  # never a third
    log0 = (dirs[0] / "worker.log").read_text()
    assert log0.startswith("earlier call\n") and log0.count(ms.WORKER_HEADER) == 1
    assert set(errors) == {dirs[1]}
    assert errors[dirs[1]].startswith("worker exit code 3: (no output) (see ")


def test_a_worker_prints_the_seed_and_its_figures_that_are_numbers(tmp_path, monkeypatch,
                                                                   capsys):
    rec = {**_rec(5), "test_acc": None, "test_ppl": 51.5, "search_val_acc": 0.25,
           "params": 9}
    monkeypatch.setattr(ms, "run_seed", lambda run, threads, overrides: rec)
    assert ms._worker_main([str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"seed": 5, "test_ppl": 51.5, "search_val_acc": 0.25}
