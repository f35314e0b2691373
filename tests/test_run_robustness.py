"""Run directories under stress: resuming the wrong kind of run, bad --seeds/--workers,
metrics files torn by a crash, runs started in the same second, damaged checkpoints and
configs, Ctrl-C, and the permissions of what a run writes."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import unreadable_fashion_mnist

from diffnas.cli import main
from diffnas.config import ConfigError, load_config, save_config
from diffnas.engine import multiseed as ms
from diffnas.engine import rundir
from diffnas.engine.callbacks import JsonLines
from diffnas.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
)
from diffnas.engine.diagnostics import CollapseDiagnostics
from diffnas.engine.search import run_search

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=2",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.enabled=false", "progress=false",
]

#: a tiny ``diffnas train`` of DARTS_V2 (the default space, 4 nodes)
TINY_TRAIN = [
    "data.name=digits", "data.test_subset=32", "progress=false", "retrain.epochs=1",
    "retrain.batch_size=16", "retrain.train_subset=32", "retrain.network={C: 4, layers: 2}",
    "retrain.auxiliary_weight=0", "retrain.cutout=0",
]


def _run(path: Path, seeds: list[int] | None = None) -> Path:
    """A run directory holding a tiny config (and ``seeds.json`` when ``seeds``)."""
    path.mkdir()
    save_config(load_config(None, TINY), path / "config.yaml")
    if seeds is not None:
        (path / ms.SEEDS_FILE).write_text(json.dumps({"seeds": seeds}) + "\n")
    return path


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the command should have been refused")


# --- 6: --seeds --resume on an ordinary run, train --resume on a multi-seed parent ----
def test_seeds_resume_refuses_an_ordinary_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ms, "run_seeds", _must_not_run)
    run = _run(tmp_path / "plain")
    assert main(["search", "--seeds", "0", "--workers", "1", "--resume", str(run)]) == 2
    assert "not a multi-seed run" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_a_seeds_parent_stopped_before_any_seed_ran_resumes_as_a_parent(tmp_path, capsys,
                                                                       monkeypatch):
    """A --seeds run killed just after its parent directory was made had no seeds.json
    (written when the seeds were prepared): its --seeds --resume was refused as "not a
    multi-seed run", sending the user to a plain resume that ran one seed in the parent.
    The parent is marked as one when it is made."""
    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "run_seeds", stop)
    argv = ["search", "--seeds", "0,1", "--workers", "1", *TINY, f"out_dir={tmp_path}",
            "name=par"]
    assert main(argv) == 130
    par = tmp_path / "par"
    assert f"diffnas search --seeds 0,1 --resume {par}" in capsys.readouterr().err
    assert json.loads((par / ms.SEEDS_FILE).read_text()) == {"seeds": []}
    reached = []
    monkeypatch.setattr(ms, "run_seeds", lambda cfg, seeds, parent, **kw: reached.append(
        (seeds, Path(parent))) or stop())
    assert main(["search", "--seeds", "0,1", "--workers", "1", "--resume", str(par)]) == 130
    assert reached == [([0, 1], par)]
    assert main(["search", "--resume", str(par)]) == 2  # and it stays a parent
    assert "is a multi-seed run" in capsys.readouterr().err


def test_train_resume_refuses_a_multiseed_parent(tmp_path, capsys, monkeypatch):
    import diffnas.engine.retrain as retrain

    monkeypatch.setattr(retrain, "run_retrain", _must_not_run)
    par = _run(tmp_path / "par", seeds=[0])
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(par)]) == 2
    assert "is a multi-seed run" in capsys.readouterr().err


# --- 7: --workers 0, reversed seed ranges ---------------------------------------------
def test_workers_zero_is_refused_before_anything_is_made(tmp_path, capsys):
    argv = ["search", "--seeds", "0", "--workers", "0", f"out_dir={tmp_path}", *TINY]
    assert main(argv) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--workers"):
        ms.run_seeds(load_config(None, TINY), [0], tmp_path / "p", workers=0)
    assert not (tmp_path / "p").exists()


def test_workers_without_seeds_is_refused(tmp_path, capsys):
    assert main(["search", "--workers", "2", f"out_dir={tmp_path}", *TINY]) == 2
    assert "--workers sets the parallel processes of --seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_reversed_seed_range_is_an_error():
    with pytest.raises(ConfigError, match="reversed"):
        ms.parse_seeds("0,3-1")
    assert ms.parse_seeds("2-2") == [2]


# --- 8: torn metrics lines ----------------------------------------------------------------
def _rows(*epochs: int) -> str:
    return "".join(json.dumps({"epoch": e, "loss": 1.0}) + "\n" for e in epochs)


@pytest.mark.parametrize("callback", [JsonLines, CollapseDiagnostics])
def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog, callback):
    path = tmp_path / "m.jsonl"
    path.write_text(_rows(0, 1) + '{"epoch": 2, "loss": 2.1')
    logger = logging.getLogger("diffnas")
    logger.addHandler(caplog.handler)
    try:
        callback(path).on_run_start(SimpleNamespace(epoch=2))
    finally:
        logger.removeHandler(caplog.handler)
    assert path.read_text() == _rows(0, 1)
    assert "incomplete last line" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("callback", [JsonLines, CollapseDiagnostics])
def test_a_corrupt_line_elsewhere_names_the_file_and_line(tmp_path, callback):
    path = tmp_path / "m.jsonl"
    text = _rows(0) + '{"epoch": 1, "lo\n' + _rows(2)
    path.write_text(text)
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2"):
        callback(path).on_run_start(SimpleNamespace(epoch=3))
    assert path.read_text() == text  # left as it was


@pytest.mark.parametrize("text, missing", [(_rows(1, 2), "1 of the 3 epochs .*\"epoch\": 0\\)"),
                                           ("", "3 of the 3 epochs .*\"epoch\": 0, 1, 2\\)"),
                                           (_rows(0, 2, 3), "1 of the 3 epochs .*\"epoch\": 1\\)")])
def test_rows_the_checkpoint_counts_done_must_be_there(tmp_path, text, missing):
    """A metrics file cut short or emptied since its checkpoint resumed silently (a torn
    line of a checkpointed epoch was dropped as if that epoch would run again), leaving
    a gap in the run's curves and in compare's times."""
    path = tmp_path / "search" / "m.jsonl"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=f"m.jsonl lacks the rows of {missing}: the file was "
                                         r"cut short .* delete the phase's checkpoint \("
                                         f"{path.parent / 'checkpoint.pt'}"):
        JsonLines(path).on_run_start(SimpleNamespace(epoch=3))
    assert path.read_text() == text  # left as it was
    JsonLines(path).on_run_start(SimpleNamespace(epoch=0))  # a phase that starts over


def test_seed_record_reads_past_a_torn_line(tmp_path):
    (tmp_path / "search").mkdir()
    (tmp_path / "search/metrics.jsonl").write_text(
        json.dumps({"epoch": 0, "val_acc": 0.5}) + "\n" + '{"epoch": 1, "val_a')
    assert ms.seed_record(tmp_path, 0)["search_val_acc"] == 0.5


def test_resume_after_a_torn_metrics_line(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=r"])
    run = rundir.new_run_dir(cfg)
    run_search(cfg, run, stop_after=1)  # killed after epoch 1 ...
    with (run / "search/metrics.jsonl").open("a") as f:
        f.write('{"epoch": 1, "loss": 2.1')  # ... while writing epoch 2's row
    assert main(["search", "--resume", str(run)]) == 0, capsys.readouterr().err
    rows = [json.loads(ln) for ln in (run / "search/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and "val_acc" in rows[1]


def test_a_damaged_recorded_genotype_says_how_the_run_gets_it_back(tmp_path, capsys):
    """An emptied genotype.json was "malformed DARTS genotype text: invalid syntax
    (<unknown>, line 0)", with no way on; each now names what rewrites it, which works."""
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=r"])
    run = rundir.new_run_dir(cfg)
    assert main(["search", "--resume", str(run)]) == 0
    good = (run / "search/genotype.json").read_text()
    (run / "search/genotype.json").write_text("")
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'search/genotype.json'} is empty, not a genotype file (this run recorded " \
           f"it; damaged since: delete {run / 'search/DONE'} and resume" in err, err
    (run / "search/DONE").unlink()
    assert main(["search", "--resume", str(run)]) == 0
    assert (run / "search/genotype.json").read_text() == good

    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, "retrain.epochs=2",
            f"out_dir={tmp_path}", "name=t"]
    assert main(argv) == 0
    (tmp_path / "t/retrain/genotype.json").write_text('{"cells": ')
    resume = ["train", "--resume", str(tmp_path / "t"), "--genotype", "DARTS_V2"]
    assert main(resume) == 2
    assert "(this run recorded it; damaged since: delete it and resume" in \
        capsys.readouterr().err
    (tmp_path / "t/retrain/genotype.json").unlink()
    assert main(resume) == 0


# --- 9: runs started in the same second ---------------------------------------------
def test_unnamed_runs_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20240101-120000")
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    first = rundir.new_run_dir(cfg, "x")
    second = rundir.new_run_dir(cfg, "x")
    (tmp_path / "x-20240101-120000-3").mkdir()  # made by a run that has not saved yet
    fourth = rundir.new_run_dir(cfg, "x")
    assert [first.name, second.name, fourth.name] == [
        "x-20240101-120000", "x-20240101-120000-2", "x-20240101-120000-4"]
    assert all((d / "config.yaml").is_file() for d in (first, second, fourth))


def test_a_named_run_is_refused_when_it_exists(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=n"])
    (tmp_path / "n").mkdir()  # an empty directory may be used
    assert rundir.new_run_dir(cfg) == tmp_path / "n"
    with pytest.raises(FileExistsError, match="already holds a run"):
        rundir.new_run_dir(cfg)


# --- damaged checkpoints on --resume --------------------------------------------------
DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: b"garbage\n",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_load_checkpoint_names_a_damaged_file(tmp_path, damage):
    path = tmp_path / "search" / "checkpoint.pt"
    atomic_save({"epoch": 1, "w": torch.zeros(64)}, path)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(CheckpointError, match="unreadable") as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "delete it to restart this phase (search)" in msg
    assert "restore a copy" in msg and "\n" not in msg
    atomic_save([1, 2], path)  # loads, but is no checkpoint
    with pytest.raises(CheckpointError, match="does not hold a diffnas checkpoint"):
        load_checkpoint(path)


def test_search_resume_reports_a_truncated_checkpoint(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=r"])
    run = rundir.new_run_dir(cfg)
    run_search(cfg, run, stop_after=1)
    ckpt = run / "search/checkpoint.pt"
    damaged = DAMAGE["truncated"](ckpt.read_bytes())
    ckpt.write_bytes(damaged)
    metrics = (run / "search/metrics.jsonl").read_text()
    assert main(["search", "--resume", str(run)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # (the log of run_search came before)
    assert last.startswith(f"diffnas: error: checkpoint {ckpt} is unreadable"), last
    assert ckpt.read_bytes() == damaged  # left for the user to restore or delete
    assert (run / "search/metrics.jsonl").read_text() == metrics
    ckpt.unlink()  # as the message says: the search restarts from scratch
    assert main(["search", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert (run / "search/DONE").exists()


def test_train_resume_reports_an_empty_checkpoint(tmp_path, capsys):
    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}", "name=t"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = tmp_path / "t/retrain/checkpoint.pt"
    ckpt.write_bytes(b"")
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is unreadable (EOFError" in err
    assert "delete it to restart this phase (retrain)" in err


def test_a_retraining_killed_before_its_model_is_saved_is_not_finished(tmp_path, capsys,
                                                                       monkeypatch):
    """result.json marks a retraining finished (multi-seed resume skips such seeds), so it
    is written after model.pt: a kill between them leaves no result.json."""
    import diffnas.engine.retrain as retrain

    def killed(obj, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrain, "atomic_save", killed)  # model.pt; checkpoints save elsewhere
    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}", "name=t"]
    assert main(argv) == 130
    out = tmp_path / "t/retrain"
    assert (out / "checkpoint.pt").exists() and not (out / "result.json").exists()
    monkeypatch.undo()
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(tmp_path / "t")]) == 0
    assert (out / "model.pt").exists() and (out / "result.json").exists()


# --- a config.yaml without settings -----------------------------------------------------
@pytest.mark.parametrize("text, computed, match", [
    ("", False, "is empty: the run was stopped before its config was saved, so nothing was "
                "computed; delete"),
    ("# a comment\n\n", False, "holds no settings (only comments): the run was stopped"),
    ("", True, "is empty, so the run's settings are lost: restore it from a copy, or delete"),
    ("- search\n", True, "must hold a mapping of settings, not a list"),
])
def test_resume_refuses_a_config_without_settings(tmp_path, capsys, monkeypatch, text,
                                                  computed, match):
    import diffnas.engine.search as search

    monkeypatch.setattr(search, "run_search", _must_not_run)
    run = tmp_path / "r"
    run.mkdir()
    if computed:
        (run / "search").mkdir()
    (run / "config.yaml").write_text(text)
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffnas: error: {run / 'config.yaml'}") and match in err, err
    assert (run / "config.yaml").read_text() == text


@pytest.mark.parametrize("damage", ["cut", "edit", "crlf"])
def test_a_saved_config_cut_short_or_edited_is_refused_until_its_digest_line_goes(
        tmp_path, damage):
    """A config.yaml cut before its retrain section resumed with the default retraining (a
    1.7 M-parameter network for 600 epochs instead of the run's), and one edited to more
    search epochs stretched a schedule the checkpoint had fixed; both read as settings.
    save_config's first line holds the digest of the rest: a change is refused, naming the
    file, and deleting that line is the user's way to go on with the file as it is. Line
    ends changed by a copy through another system are no edit."""
    run = tmp_path / "r"
    run.mkdir()
    cfg = load_config(None, ["data.name=digits", "search.epochs=4", "retrain.epochs=2"])
    save_config(cfg, run / "config.yaml")
    text = (run / "config.yaml").read_text()
    assert rundir.load_run_config(run).search.epochs == 4
    changed = {"cut": text[:text.index("\nretrain:")] + "\n",
               "edit": text.replace("epochs: 4", "epochs: 6"),
               "crlf": text.replace("\n", "\r\n")}[damage]
    (run / "config.yaml").write_bytes(changed.encode())
    if damage == "crlf":
        assert rundir.load_run_config(run).search.epochs == 4
        return
    with pytest.raises(ConfigError, match=r"config.yaml was changed since diffnas saved it .*"
                                          r"delete its first line"):
        rundir.load_run_config(run)
    (run / "config.yaml").write_text(changed.split("\n", 1)[1])  # the user's decision
    got = rundir.load_run_config(run)
    assert (got.search.epochs, got.retrain.epochs) == \
        ((6, 2) if damage == "edit" else (4, load_config(None, []).retrain.epochs))


def test_a_config_claim_left_by_a_killed_start_is_refused(tmp_path, capsys):
    run = tmp_path / "k"
    run.mkdir()
    (run / "config.yaml").open("x").close()  # new_run_dir's claim; SIGKILL before the save
    with pytest.raises(ConfigError, match="nothing was computed; delete .*k and start"):
        rundir.load_run_config(run)
    assert main(["search", "--resume", str(run)]) == 2
    assert "start the run again" in capsys.readouterr().err


# --- search --resume on a train run, train --resume on a search run ------------------------
def test_search_resume_refuses_a_train_run(tmp_path, capsys, monkeypatch):
    import diffnas.engine.search as search

    monkeypatch.setattr(search, "run_search", _must_not_run)
    run = _run(tmp_path / "t")
    (run / "retrain").mkdir()
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is a retraining made by diffnas train" in err
    assert f"diffnas train --resume {run} --genotype GENOTYPE" in err  # none pinned yet
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "retrain"]
    (run / "retrain/genotype.json").write_text("{}")
    assert main(["search", "--resume", str(run)]) == 2
    assert f"--genotype {run / 'retrain/genotype.json'}" in capsys.readouterr().err


def test_a_train_run_whose_data_was_unreadable_stays_a_train_run(tmp_path, capsys):
    """diffnas train stopped by an unreadable dataset leaves only its config: search --resume
    must not take the run over (it used to, and train --resume was refused from then on)."""
    out = tmp_path / "runs"
    argv = ["--config", str(ROOT / "configs/darts_fashion_mnist.yaml"), f"out_dir={out}",
            "name=t", f"data.root={unreadable_fashion_mnist(tmp_path / 'bad')}"]
    assert main(["train", "--genotype", "DARTS_V2", *argv]) == 2
    run = out / "t"
    assert rundir.made_by(run) == "train"
    assert (run / "retrain" / "genotype.json").is_file()  # recorded: train --resume knows it
    capsys.readouterr()
    assert main(["search", "--resume", str(run), f"data.root={tmp_path}"]) == 2
    assert "is a retraining made by diffnas train" in capsys.readouterr().err
    assert not (run / "search").exists()
    # and a search stopped by unreadable data is not continued by train, whatever it holds
    assert main(["search", *argv[:3], "name=s", argv[4]]) == 2
    assert rundir.made_by(out / "s") == "search"
    (out / "s/search").rmdir()  # (it made an empty search/: judged by made_by.txt alone)
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(out / "s")]) == 2
    assert "is a search run made by diffnas search" in capsys.readouterr().err


def test_train_resume_refuses_a_search_run(tmp_path, capsys, monkeypatch):
    import diffnas.engine.retrain as retrain

    monkeypatch.setattr(retrain, "run_retrain", _must_not_run)
    run = _run(tmp_path / "s")
    (run / "search").mkdir()
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is a search run made by diffnas search" in err
    assert f"continue it with diffnas search --resume {run}" in err


# --- Ctrl-C ---------------------------------------------------------------------------
def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture
def sigint_restored():
    """main() run as the process's entry leaves SIGINT at its default after Ctrl-C (a
    second one ends the process): give pytest its own handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch,
                                                         sigint_restored):
    import diffnas.engine.retrain as retrain
    import diffnas.engine.search as search

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(search, "run_search", _interrupt)
    assert main(["search", f"out_dir={tmp_path}", "name=a", *TINY]) == 130
    hint = "diffnas: interrupted; resume with: diffnas search --resume "
    assert capsys.readouterr().err == f"{hint}{tmp_path / 'a'}\n"
    assert main(["search", "--resume", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err == f"{hint}{tmp_path / 'a'}\n"
    # a resume's overrides are not saved in config.yaml, so the hint repeats them
    assert main(["search", "--resume", str(tmp_path / "a"), "device=cpu",
                 "data.root=/my data"]) == 130
    assert capsys.readouterr().err == f"{hint}{tmp_path / 'a'} device=cpu 'data.root=/my data'\n"
    monkeypatch.setattr(retrain, "run_retrain", _interrupt)
    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}", "name=b"]
    assert main(argv) == 130
    err = capsys.readouterr().err  # after the data's log lines (train loads it first)
    assert err.endswith("\ndiffnas: interrupted; resume with: diffnas train "
                        f"--resume {tmp_path / 'b'} --genotype DARTS_V2\n")
    assert "Traceback" not in err and err.count("diffnas:") == 1
    monkeypatch.setattr(ms, "run_seeds", _interrupt)
    assert main(["search", "--seeds", "0,1", f"out_dir={tmp_path}", "name=new", *TINY]) == 130
    # the parent is one from the start (its seeds.json): before any seed ran, a hint too
    assert capsys.readouterr().err == ("diffnas: interrupted; resume with: diffnas search "
                                       f"--seeds 0,1 --resume {tmp_path / 'new'}\n")

    def prepared_then_interrupted(cfg, seeds, parent, **kw):
        ms.prepare_seeds(cfg, seeds, parent)
        raise KeyboardInterrupt

    monkeypatch.setattr(ms, "run_seeds", prepared_then_interrupted)
    assert main(["search", "--seeds", "0,1", f"out_dir={tmp_path}", "name=new2", *TINY]) == 130
    assert capsys.readouterr().err == (f"diffnas: interrupted; resume with: diffnas search "
                                       f"--seeds 0,1 --resume {tmp_path / 'new2'}\n")
    par = _run(tmp_path / "par", seeds=[0, 1])
    assert main(["search", "--seeds", "0,1", "--resume", str(par)]) == 130
    assert capsys.readouterr().err == (f"diffnas: interrupted; resume with: diffnas search "
                                       f"--seeds 0,1 --resume {par}\n")
    assert signal.getsignal(signal.SIGINT) is handler  # an in-process caller keeps its own
    monkeypatch.setattr(sys, "argv", ["diffnas", "search", "--seeds", "0,1", "--resume", str(par)])
    assert main() == 130  # the process's entry: a second Ctrl-C ends it at once
    capsys.readouterr()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    monkeypatch.setenv("RANK", "1")  # under torchrun rank 0 alone reports it
    assert main(["search", "--resume", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err == ""


# --- file modes -------------------------------------------------------------------------
@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text("{}\n", tmp_path / "result.json")
        atomic_save({"a": 1}, tmp_path / "checkpoint.pt")
        for name in ("result.json", "checkpoint.pt"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
        (tmp_path / "result.json").chmod(0o640)  # a mode the user chose is kept, as by open
        atomic_write_text("{}\n", tmp_path / "result.json")
        assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(tmp_path, capsys):
    """Resuming with data.root at other data (another class count) rebuilt another model;
    loading the checkpoint into it gave torch's raw RuntimeError traceback."""
    import torch

    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}", "name=t"]
    assert main(argv) == 0, capsys.readouterr().err
    ckpt = tmp_path / "t/retrain/checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    model = state["task"]["model"]
    head = next(k for k in model if k.endswith("classifier.weight"))
    model[head] = torch.zeros(model[head].shape[0] + 3, model[head].shape[1])  # 13 classes
    torch.save(state, ckpt)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"diffnas: error: the checkpoint {ckpt} does not fit the model this "
                          "run rebuilds (Error(s) in loading state_dict"), err
    assert "was data.root pointed at other data" in err
    # an edited plugin (which the resume warns about) is named as the other likely cause
    assert "or a plugin's code edited since (a warning above names such a plugin)" in err


@pytest.mark.parametrize("saved, visible", [(4, 1), (1, 2)])
def test_cuda_rng_states_go_to_the_gpus_this_machine_has(monkeypatch, saved, visible):
    """A checkpoint of a run with more GPUs visible, resumed with fewer, indexed a missing
    device in set_rng_state_all."""
    import random

    import numpy as np
    import torch

    from diffnas.engine import checkpoint

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)

    def set_state(s, device):
        if device >= visible:
            raise IndexError(f"no CUDA device {device}")
        calls.append((int(s[0]), device))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [
        set_state(s, i) for i, s in enumerate(states)])
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(),
             "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(saved)]}
    checkpoint.set_rng_state(state)
    assert calls == [(i, i) for i in range(min(saved, visible))]


def test_a_resume_with_another_thread_count_says_it_will_not_repeat_the_run(tmp_path):
    """A run records the thread count it starts with; resumed on the CPU with another
    count (sums round differently, so not bit for bit the uninterrupted run) it warns and
    says how to match it, for search and for train; with the same count it says nothing."""
    now = torch.get_num_threads()
    for command, argv in (("search", TINY), ("train", ["--genotype", "DARTS_V2", *TINY_TRAIN])):
        run = tmp_path / command
        assert main([command, *argv, f"out_dir={tmp_path}", f"name={command}"]) == 0
        assert rundir.recorded_threads(run) == now
        extra = ["--genotype", "DARTS_V2"] if command == "train" else []
        rundir.record_threads(run, now + 1)
        assert main([command, "--resume", str(run), *extra]) == 0  # finished: nothing to do
        said = f"started with {now + 1} torch threads and resumes with {now}"
        assert (run / "log.txt").read_text().count(said) == 1
        assert f"OMP_NUM_THREADS={now + 1}" in (run / "log.txt").read_text()
        rundir.record_threads(run, now)
        assert main([command, "--resume", str(run), *extra]) == 0
        assert (run / "log.txt").read_text().count("torch threads and resumes") == 1
        assert rundir.recorded_threads(run) == now  # a resume records nothing
    (run / rundir.THREADS_FILE).write_text("{")  # damaged: said, and the resume goes on
    assert main(["train", "--resume", str(run), "--genotype", "DARTS_V2"]) == 0
    assert f"{run / rundir.THREADS_FILE}: damaged" in (run / "log.txt").read_text()


def test_a_resume_on_other_data_is_refused(tmp_path):
    """data.root may change on resume (the files moved); a root holding other data of the
    same shapes continued the weights on a dataset they were not computed on. A float
    rounding difference (another machine's normalisation) is not other data."""
    import dataclasses

    from diffnas.data import load_dataset
    from diffnas.engine.search import load_search_data

    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "name=r"])
    run = rundir.new_run_dir(cfg)
    data = load_search_data(cfg)
    run_search(cfg, run, stop_after=1, data=data)
    recorded = json.loads((run / "search" / rundir.DATA_FILE).read_text())
    assert recorded["train_y"]["shape"] == [48] and recorded["num_classes"] == 10
    other = dataclasses.replace(data, train_y=data.train_y.roll(1))  # same shapes
    with pytest.raises(ValueError, match=r"search was computed on other data than data.root "
                                         r"now gives \(differs: train_y;"):
        run_search(cfg, run, resume=True, data=other)
    full = load_dataset("digits")
    with pytest.raises(ValueError, match="differs: train_x, train_y"):
        run_search(cfg, run, resume=True, data=dataclasses.replace(
            data, train_x=full.train_x[:48], train_y=full.train_y[:48]))
    rounded = dataclasses.replace(data, train_x=data.train_x * (1 + 1e-7))
    assert run_search(cfg, run, resume=True, data=rounded).genotype is not None


def test_the_data_fingerprint_leaves_out_where_the_files_are_and_keeps_nan():
    """npz and folder data name their file (source): a moved file, or the same file named
    relatively, was refused as other data. A NaN in plugin data never equalled itself."""
    import dataclasses

    from diffnas.data.custom import CustomImageData
    from diffnas.data.graph import GraphData

    x = torch.rand(4, 1, 8, 8)
    y = torch.arange(4)
    a = CustomImageData("npz", x, y, x, y, 4, source="/data/old/set.npz")
    b = dataclasses.replace(a, source="set.npz")
    assert rundir.same_data(rundir.data_fingerprint(a), rundir.data_fingerprint(b)) == []
    c = dataclasses.replace(a, test_x=x.flip(0))
    assert rundir.same_data(rundir.data_fingerprint(a), rundir.data_fingerprint(c)) == [
        "test_x"]
    feats = torch.rand(5, 3)
    feats[0, 0] = float("nan")
    g = GraphData("g", feats, torch.arange(5), torch.zeros(2, 0, dtype=torch.long),
                  torch.arange(2), torch.arange(2, 3), torch.arange(3, 5), 5)
    before = json.loads(json.dumps(rundir.data_fingerprint(g)))  # as data.json holds it
    assert rundir.same_data(before, rundir.data_fingerprint(g)) == []


@pytest.mark.parametrize("exc", [KeyError("arch_optimizer"), KeyError()])
def test_a_checkpoint_missing_an_entry_says_so(exc):
    """Every KeyError read as "other data?"; an empty one raised IndexError."""
    from diffnas.engine.loop import Loop

    class Task:
        def load_state_dict(self, state):
            raise exc

    loop = Loop(Task(), 2, [])
    with pytest.raises(ValueError, match=r"the checkpoint ck.pt holds no .* entry that this "
                                         r"run reads: was it written by another diffnas"):
        loop.load_state_dict({"epoch": 1, "history": [], "task": {}}, source="ck.pt")


class _RecordingTask:
    """A task whose state is a counter, to see whether a checkpoint was taken in."""

    def __init__(self) -> None:
        self.loaded: list[dict] = []

    def state_dict(self) -> dict:
        return {"n": 3}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(state)


def test_a_checkpoint_names_its_format_and_one_without_it_is_read_as_format_one():
    """Checkpoints carry a format number so a newer layout is refused by name; those
    written before the field existed have the first layout and still resume."""
    from diffnas.engine.loop import CHECKPOINT_FORMAT, Loop

    state = Loop(_RecordingTask(), 2, []).state_dict()
    assert state["format"] == CHECKPOINT_FORMAT == 1
    for held in (state, {k: v for k, v in state.items() if k != "format"}):
        task = _RecordingTask()
        loop = Loop(task, 2, [])
        loop.load_state_dict(dict(held, epoch=1), source="ck.pt")
        assert task.loaded == [{"n": 3}] and loop.epoch == 1


@pytest.mark.parametrize("fmt, words", [
    (2, "has format 2, written by a newer diffnas (this one reads format 1 and older)"),
    (0, "has format 0, not a positive whole number"),
    ("1", "has format '1', not a positive whole number"),
    (True, "has format True, not a positive whole number"),
    (1.0, "has format 1.0, not a positive whole number"),
])
def test_a_checkpoint_of_another_format_is_refused_before_anything_is_loaded(fmt, words):
    from diffnas.engine.loop import Loop

    task = _RecordingTask()
    loop = Loop(task, 2, [])
    state = dict(loop.state_dict(), format=fmt, epoch=1)
    with pytest.raises(ValueError, match="^" + re.escape(f"the checkpoint ck.pt {words}")):
        loop.load_state_dict(state, source="ck.pt")
    assert task.loaded == [] and loop.epoch == 0


def test_resuming_a_search_from_a_newer_checkpoint_format_keeps_the_run(tmp_path, capsys):
    """The CLI names the checkpoint and the format, exits 2, and leaves the run's files as
    they were, so the run resumes with a diffnas that reads it."""
    argv = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}", "name=t"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    ckpt = tmp_path / "t/retrain/checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    state["format"] += 1
    torch.save(state, ckpt)
    held = ckpt.read_bytes()
    result = (tmp_path / "t/retrain/result.json").read_text()
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {ckpt} has format {state['format']}, written by a newer diffnas" \
        in err
    assert ckpt.read_bytes() == held
    assert (tmp_path / "t/retrain/result.json").read_text() == result


def test_a_search_without_config_says_it_runs_the_built_in_defaults(tmp_path, capsys,
                                                                    monkeypatch):
    """Forgetting --config started the paper's settings on all of Fashion-MNIST (hours on
    a CPU) without a word; the first lines now say so (and --help does)."""
    import diffnas.engine.search as search

    monkeypatch.setattr(search, "run_search", _interrupt)
    assert main(["search", f"out_dir={tmp_path}", "name=a", *TINY]) == 130
    assert "no --config: the built-in defaults" in capsys.readouterr().out
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "darts_fashion_mnist.yaml")
    assert main(["search", "--config", cfg, f"out_dir={tmp_path}", "name=b", *TINY]) == 130
    assert "no --config" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "without it the built-in defaults" in " ".join(capsys.readouterr().out.split())


def _disk_full_save(obj: object, f: object) -> None:
    """torch.save on a full disk: its zip writer's RuntimeError, the OSError in context."""
    import errno

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from diffnas.engine.checkpoint import atomic_save

    atomic_save({"epoch": 1}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", _disk_full_save)
    with pytest.raises(OSError) as err:
        atomic_save({"epoch": 2}, tmp_path / "checkpoint.pt")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "checkpoint.pt")
    assert "no space left" in str(err.value)
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pt") == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_a_full_disk_during_a_search_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", _disk_full_save)
    assert main(["search", *TINY, f"out_dir={tmp_path}", "name=full"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'full/search/checkpoint.pt'}: no space left on the device" in err, err
    assert f"free some space, then resume with: diffnas search --resume {tmp_path / 'full'}" \
        in err


def test_a_diverged_retraining_keeps_no_diverged_checkpoint_and_says_what_to_do(
        tmp_path, capsys):
    """One step per epoch at lr 1e30: the step's loss is finite, the weights after it are
    not. The epoch is refused before its checkpoint, and since a resume keeps the lr, the
    message gives the command of a new retraining."""
    args = ["train", "--genotype", "DARTS_V2", *TINY_TRAIN, "retrain.train_subset=16",
            "retrain.epochs=2", "retrain.lr=1e30", "retrain.grad_clip=1e30",
            f"out_dir={tmp_path}", "name=nan"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "retrain epoch 1: the weights diverged" in err and "retrain.lr=1e+30" in err, err
    command = (f"diffnas train --config {tmp_path / 'nan/config.yaml'} --genotype DARTS_V2 "
               f"out_dir={tmp_path} name=nan-retrain")
    assert f"retrain the genotype in a new run with a lower retrain.lr: {command} " \
           "retrain.lr=..." in err
    assert not (tmp_path / "nan/retrain/checkpoint.pt").exists()
    # as printed, it runs (the saved config names the diverged run: it used to land there)
    assert main([*shlex.split(command)[1:], "retrain.lr=0.01", "retrain.epochs=1"]) == 0
    assert (tmp_path / "nan-retrain/retrain/result.json").is_file()


def test_an_output_on_a_full_disk_is_refused_before_the_work(tmp_path, monkeypatch):
    """The probe writes a byte: an empty file takes no block, so a full disk passed."""
    import errno

    from diffnas.engine import checkpoint

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "write", full)
    with pytest.raises(ValueError, match=r"--json .*out\.json: cannot write there \(No space"):
        checkpoint.refuse_foreign_json(tmp_path / "out.json", {"a"}, "results", "--json")
    assert list(tmp_path.iterdir()) == []


def test_only_a_json_diffnas_wrote_there_may_be_replaced(tmp_path):
    """A file is diffnas's when it holds every key diffnas writes into it: one sharing a
    key or two with a user's own JSON (``name``, ``params``) is the user's, kept."""
    from diffnas.engine.checkpoint import written_by_diffnas

    keys = {"genotype", "params", "latency_ms"}
    path = tmp_path / "out.json"
    assert written_by_diffnas(path, keys)  # nothing there yet
    for held, ours in (({"genotype": 1, "params": 2, "latency_ms": 3, "extra": 4}, True),
                       ({"params": 2, "name": "mine"}, False), ([1, 2], False),
                       ("not json", False)):
        path.write_text(json.dumps(held) if held != "not json" else held)
        assert written_by_diffnas(path, keys) is ours, held
    assert not written_by_diffnas(tmp_path, keys)  # a folder
