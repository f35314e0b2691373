"""Run directories under stress: resuming the wrong kind of run, bad --seeds/--workers,
metrics files torn by a crash, and runs started in the same second."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from diffnas.cli import main
from diffnas.config import ConfigError, load_config, save_config
from diffnas.engine import multiseed as ms
from diffnas.engine import rundir
from diffnas.engine.callbacks import JsonLines
from diffnas.engine.diagnostics import CollapseDiagnostics
from diffnas.engine.search import run_search

TINY = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=2",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.enabled=false", "progress=false",
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
