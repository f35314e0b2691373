"""``logger: tensorboard`` in the language-model and graph engines (engine/lm.py,
engine/graph.py), as in the image engine: RUN_DIR/tensorboard/{search,retrain} hold the
numbers of the JSON-lines files and the alpha images; and the language-model engine
refuses ``search.diagnostics`` (as the graph engine does) instead of ignoring it."""

from __future__ import annotations

import re

import pytest
from conftest import jsonl, tb_events
from test_graph_space import CONFIG as GRAPH_CONFIG
from test_graph_space import KARATE
from test_rnn_lm import _tiny_lm_config

from diffnas.cli import main
from diffnas.config import load_config

TINY_LM = ["search.epochs=2", "search.space.ninp=8", "search.space.nhid=8",
           "search.space.nodes=3", "retrain.epochs=1"]


def _assert_scalars_match(acc, phase, rows, keys):
    for key in keys:
        got = [(e.step, e.value) for e in acc.Scalars(f"{phase}/{key}")]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key


def _assert_alpha_images(acc, group, epochs):
    assert [im.step for im in acc.Images(f"alphas/{group}")] == list(range(epochs))
    assert [e.step for e in acc.Scalars(f"alphas/{group}_entropy")] == list(range(epochs))


def test_lm_search_and_retrain_write_tensorboard_events(tmp_path):
    path = _tiny_lm_config(tmp_path)
    assert main(["search", "--config", str(path), "logger=tensorboard", *TINY_LM]) == 0
    run = tmp_path / "runs" / "t"
    search = tb_events(run / "tensorboard" / "search")
    rows = jsonl(run / "search" / "metrics.jsonl")
    assert len(rows) == 2
    _assert_scalars_match(search, "search", rows, ("loss", "ppl", "valid_loss", "valid_ppl",
                                                   "lr", "seconds"))
    _assert_alpha_images(search, "recurrent", 2)
    retrain = tb_events(run / "tensorboard" / "retrain")
    rows = jsonl(run / "retrain" / "metrics.jsonl")
    assert len(rows) == 1
    _assert_scalars_match(retrain, "retrain", rows, ("loss", "ppl", "valid_ppl", "asgd",
                                                     "seconds"))


def test_graph_search_and_retrain_write_tensorboard_events(tmp_path):
    assert main(["search", "--config", str(GRAPH_CONFIG), *KARATE, "search.epochs=2",
                 "retrain.epochs=3", f"out_dir={tmp_path}", "name=g",
                 "logger=tensorboard"]) == 0
    run = tmp_path / "g"
    search = tb_events(run / "tensorboard" / "search")
    rows = jsonl(run / "search" / "metrics.jsonl")
    assert len(rows) == 2
    _assert_scalars_match(search, "search", rows, ("loss", "acc", "eval_val_loss",
                                                   "eval_val_acc", "lr", "seconds"))
    _assert_alpha_images(search, "cell", 2)
    retrain = tb_events(run / "tensorboard" / "retrain")
    rows = jsonl(run / "retrain" / "metrics.jsonl")
    assert len(rows) == 3
    _assert_scalars_match(retrain, "retrain", rows, ("loss", "acc", "val_loss", "val_acc",
                                                     "best_val_acc"))


def test_default_logger_writes_no_event_files_for_a_graph_run(tmp_path):
    assert main(["search", "--config", str(GRAPH_CONFIG), *KARATE, "search.epochs=1",
                 "retrain.epochs=1", f"out_dir={tmp_path}", "name=g"]) == 0
    assert not (tmp_path / "g" / "tensorboard").exists()
    assert (tmp_path / "g" / "retrain" / "metrics.jsonl").is_file()


DIAGNOSTICS = ("search.diagnostics.enabled is for image searches; the language-model "
               "(engine/lm.py) search does not take it")


def test_lm_search_refuses_diagnostics_with_a_clear_error(tmp_path, capsys):
    path = _tiny_lm_config(tmp_path)
    assert main(["search", "--config", str(path), *TINY_LM,
                 "search.diagnostics.enabled=true"]) == 2
    assert DIAGNOSTICS in capsys.readouterr().err
    run = tmp_path / "runs" / "t"
    assert not (run / "search").exists()  # refused before the search touched the run dir


def test_lm_engine_entry_points_refuse_diagnostics(tmp_path):
    from diffnas.data.text import load_corpus
    from diffnas.engine.lm import build_lm_search, run_lm, run_lm_search

    cfg = load_config(str(_tiny_lm_config(tmp_path)), TINY_LM)
    cfg.search.diagnostics.enabled = True  # past load_config, which refuses it
    with pytest.raises(ValueError, match=re.escape(DIAGNOSTICS)):
        build_lm_search(cfg, load_corpus(cfg.data.name, cfg.data.root))
    for run in (lambda d: run_lm_search(cfg, d), lambda d: run_lm(cfg, d)):
        with pytest.raises(ValueError, match=re.escape(DIAGNOSTICS)):
            run(tmp_path / "r")
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_missing_tensorboard_package_is_refused_before_a_run_directory(
        tmp_path, capsys, monkeypatch, command):
    """It was found once the run directory was written (the logger is built with the
    run); a report of such a run on another machine needs no tensorboard."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    argv = (["search", "--config", str(GRAPH_CONFIG), *KARATE, "search.epochs=1"]
            if command == "search" else ["train", "--genotype", "DARTS_V2", "data.name=digits"])
    argv += ["retrain.epochs=1", "logger=tensorboard", f"out_dir={tmp_path}", "name=g"]
    assert main(argv) == 2
    assert "config.logger: tensorboard needs the tensorboard package: pip install " \
           "'diffnas[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert load_config(None, ["logger=tensorboard"], device=False).logger == "tensorboard"
