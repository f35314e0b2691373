"""More rules of the lambda sweep (``hardware/sweep.py``), from a second mutation audit:
which earlier runs are continued rather than reused (a search stopped before its last
epoch has ``genotype.json`` but no ``DONE``; a retraining without ``result.json``), what
a reused run keeps (its plugins' recorded sources), what a refusal to reuse names (a
setting only the earlier run had; "; ..." only past five differences), that predictor
paths are compared resolved, that the retraining data is loaded with the retraining's
subset, what ``sweep.json`` records of the timing, the progress lines (which lambdas, what
was reused, each lambda's accuracy and prediction, the timing), and the plot title of a
config that leaves the strategy and space names to their defaults.

The sweeps here are stubbed (search, retraining and timing replaced by stand-ins on a
NAS-Bench-201 space of C=2, N=1): only the sweep's own bookkeeping runs."""

from __future__ import annotations

import inspect
import json
import logging
from types import SimpleNamespace

import pytest
from conftest import cost_predictor

from diffnas.config import load_config, save_config
from diffnas.data import load_dataset
from diffnas.genotype import Genotype
from diffnas.hardware import sweep
from diffnas.hardware.latency import LatencySettings
from diffnas.spaces.nb201 import ops_to_genotype

NO_NONE = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
COSTS = {"skip_connect": 0.25, "nor_conv_1x1": 1.5, "nor_conv_3x3": 4.0, "avg_pool_3x3": 0.75}
SECTION = {"name": "nb201", "C": 2, "N": 1, "ops": NO_NONE}
#: the (stand-in) search's cell, and another one an earlier, stopped search had found
FOUND = ("nor_conv_1x1", "skip_connect", "nor_conv_3x3", "avg_pool_3x3", "skip_connect",
         "nor_conv_1x1")
EARLIER = ("skip_connect",) * 6
ACC = 0.625


def _stub(tmp_path, monkeypatch):
    """A stubbed sweep: the config ``c.yaml`` (nb201 without ``none``), the predictor
    ``p.pt`` (10 ms + COSTS per edge) and stand-ins that record their calls."""
    (tmp_path / "c.yaml").write_text(json.dumps({
        "device": "cpu", "data": {"name": "cifar10", "resolution": 8},
        "search": {"space": SECTION, "strategy": {"name": "gdas"}},
        "retrain": {"auxiliary_weight": 0.0, "network": {"C": 2, "N": 1}}}))
    cost_predictor(NO_NONE, COSTS).save(tmp_path / "p.pt")
    calls = SimpleNamespace(search=[], retrain=[], load_dataset=[], config=tmp_path / "c.yaml",
                            predictor=tmp_path / "p.pt")

    def search(cfg, run_dir, resume=False, data=None):
        calls.search.append({"run_dir": run_dir, "resume": resume})
        (run_dir / "search").mkdir(parents=True, exist_ok=True)
        (run_dir / "search" / "alphas.jsonl").write_text(
            json.dumps({"cell": [[0.25] * 4] * 6}) + "\n")
        return SimpleNamespace(genotype=ops_to_genotype(FOUND))

    def retrain(cfg, genotype, run_dir, resume=False, data=None):
        calls.retrain.append({"genotype": genotype, "resume": resume})
        return {"test_acc": ACC}

    def load_dataset(*args, **kwargs):
        calls.load_dataset.append((args, kwargs))
        return SimpleNamespace(in_channels=1, resolution=8, num_classes=10)

    def measure(models, input_shape, settings, seed=0):
        return [SimpleNamespace(samples_ms=[1.0, 2.0], median_ms=1.5, q25_ms=1.25,
                                q75_ms=1.75) for _ in models]

    monkeypatch.setattr(sweep, "load_search_data", lambda cfg: None)
    monkeypatch.setattr(sweep, "load_dataset", load_dataset)
    monkeypatch.setattr(sweep, "run_search", search)
    monkeypatch.setattr(sweep, "run_retrain", retrain)
    monkeypatch.setattr(sweep, "measure_many", measure)
    return calls


def _run(calls, lambdas, out, overrides=(), settings=None):
    return sweep.run_sweep(str(calls.config), list(overrides), str(calls.predictor), lambdas,
                           out, settings)


# --- what an earlier run gives: continued, not reused, unless finished ------------------
def test_a_search_stopped_before_its_last_epoch_is_continued_not_reused(tmp_path,
                                                                        monkeypatch):
    """A search stopped early (``stop_after``, Ctrl-C) has written ``genotype.json`` but no
    ``DONE``: the rerun continues it from its checkpoint and takes the genotype the finished
    search derives, not the stopped one's."""
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    run = out / "lam0.5"
    ops_to_genotype(EARLIER).save(run / "search" / "genotype.json")  # no DONE beside it
    calls.search.clear()
    calls.retrain.clear()
    (row,) = _run(calls, [0.5], out)
    assert [c["resume"] for c in calls.search] == [True]
    assert row["genotype"] == ops_to_genotype(FOUND).to_dict()
    assert row["genotype_text"] == str(ops_to_genotype(FOUND))
    assert calls.retrain[0]["genotype"] == ops_to_genotype(FOUND)


def test_a_retraining_without_its_result_is_continued(tmp_path, monkeypatch):
    """``retrain/result.json`` marks a finished retraining: a ``retrain/`` folder holding
    only a checkpoint (a stopped retraining) is continued (resume), its accuracy taken from
    that retraining."""
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    (out / "lam0.5" / "retrain").mkdir()
    (out / "lam0.5" / "retrain" / "checkpoint.pt").write_bytes(b"stand-in")
    calls.retrain.clear()
    (row,) = _run(calls, [0.5], out)
    assert [c["resume"] for c in calls.retrain] == [True]
    assert row["test_acc"] == ACC


def test_a_reused_run_keeps_the_plugin_sources_it_ran_with(tmp_path, monkeypatch):
    """A run records its plugins' sources (sha256) so that a later edit is reported: a
    rerun that reuses the run keeps that record rather than the edited file's."""
    from diffnas.engine.rundir import PLUGINS_FILE

    plugin = tmp_path / "sweep_second_rules_plugin.py"
    plugin.write_text("X = 1\n")
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out, [f"plugins=[{plugin}]"])
    recorded = (out / "lam0.5" / PLUGINS_FILE).read_text()
    plugin.write_text("X = 2\n")  # edited after the run began
    _run(calls, [0.5], out, [f"plugins=[{plugin}]"])
    assert len(calls.search) == 2  # (reused: continued)
    assert (out / "lam0.5" / PLUGINS_FILE).read_text() == recorded


# --- what a refusal to reuse names --------------------------------------------------------
def _refusal(run_dir, before, now) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(before, run_dir / "config.yaml")
    with pytest.raises(ValueError, match="holds a run made with other settings") as err:
        sweep._check_reusable(run_dir, now, "")
    return str(err.value)


def test_exactly_five_differences_are_named_without_saying_there_are_more(tmp_path):
    five = ["seed=3", "search.epochs=7", "data.batch_size=8", "retrain.epochs=2",
            "retrain.lr=0.5"]
    said = _refusal(tmp_path / "lam1", load_config(None, []), load_config(None, five))
    named = said[said.index("(") + 1:said.index(": its config.yaml")].split("; ")
    assert len(named) == 5 and "..." not in named
    assert "seed: 0 there, 3 now" in named


def test_a_setting_only_the_earlier_run_had_is_named(tmp_path):
    """A key of the earlier run's config that this sweep's lacks (a strategy setting left
    out now) is a difference too, and the refusal names it with both values."""
    before = load_config(None, ["search.strategy={name: darts, a_optim: {lr: 0.02}}"])
    now = load_config(None, ["search.strategy={name: darts}"])
    said = _refusal(tmp_path / "lam1", before, now)
    assert "search.strategy.a_optim.lr: 0.02 there, None now" in said


def test_predictor_paths_are_compared_resolved(tmp_path, monkeypatch):
    """A relative path, an absolute one and one through a symlinked folder to one file
    are one predictor; where the run executes (device) is left out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)

    def config(predictor, device):
        pens = [{"name": "latency", "predictor": predictor, "lam": 1.0}, {"name": "other"}]
        return {"device": device, "seed": 0, "search": {"strategy": {"penalties": pens}}}

    want = str((tmp_path / "real" / "p.pt").resolve())
    seen = [sweep._computed(config(p, d)) for p, d in [
        ("real/p.pt", "cpu"), (str(tmp_path / "link" / "p.pt"), "cuda"), (want, "auto")]]
    assert all(c == seen[0] for c in seen)
    assert seen[0]["search"]["strategy"]["penalties"] == [
        {"name": "latency", "predictor": want, "lam": 1.0}, {"name": "other"}]
    assert "device" not in seen[0] and seen[0]["seed"] == 0


# --- checks before any work ------------------------------------------------------------
def test_a_predictor_of_another_op_list_is_refused_before_out_is_made(tmp_path, monkeypatch):
    """A predictor fitted with five op columns for a space of four: refused (naming both)
    before ``--out`` or any lambda's folder is made, and before any search."""
    calls = _stub(tmp_path, monkeypatch)
    cost_predictor([*NO_NONE, "none"], COSTS).save(calls.predictor)
    out = tmp_path / "sw"
    with pytest.raises(ValueError, match=r"the latency predictor expects .* space 'nb201' has"):
        _run(calls, [0.0, 0.5], out)
    assert not out.exists() and calls.search == []


# --- what the sweep loads, records and says ----------------------------------------------
def test_the_retraining_data_is_the_retrainings_subset(tmp_path, monkeypatch):
    """Each genotype is retrained on ``retrain.train_subset`` images (not the search's
    ``data.train_subset``) and tested on ``data.test_subset``, with the config's seed."""
    calls = _stub(tmp_path, monkeypatch)
    _run(calls, [0.0], tmp_path / "sw", ["retrain.train_subset=480", "data.train_subset=320",
                                         "data.test_subset=16", "seed=5"])
    ((args, kwargs),) = calls.load_dataset
    bound = inspect.signature(load_dataset).bind(*args, **kwargs).arguments
    assert (bound["name"], bound["resolution"]) == ("cifar10", 8)
    assert (bound["train_subset"], bound["test_subset"], bound["seed"]) == (480, 16, 5)


def test_the_summary_records_the_timing_settings_and_network(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    settings = LatencySettings(warmup=0, repeats=3, clock="thread", threads=1)
    _run(calls, [0.0], tmp_path / "sw", settings=settings)
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert summary["settings"] == json.loads(json.dumps(vars(settings)))
    assert (summary["settings"]["repeats"], summary["settings"]["clock"]) == (3, "thread")
    assert summary["network"]["C"] == 2 and summary["network"]["N"] == 1


def test_the_sweep_says_which_lambdas_it_runs_and_when_it_times_them(tmp_path, monkeypatch,
                                                                     caplog):
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    settings = LatencySettings(warmup=0, repeats=3, clock="thread", threads=1)
    with caplog.at_level(logging.INFO, logger="diffnas"):
        _run(calls, [0.5, 0.0], out, settings=settings)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"sweep: 2 lambdas (0.5, 0) into {out}" in said
    assert ("sweep: timing the 2 derived networks with the anchor (3 repeats, thread clock)"
            in said)


def test_the_title_names_the_default_strategy_and_space_when_the_config_leaves_them_out():
    """A strategy or space section without a name runs DARTS on ``darts_cnn`` (the
    config's defaults): the title says so."""
    cfg = load_config(None, ["search.strategy={}", "search.space={C: 4}"])
    assert dict(cfg.search.strategy) == {} and "name" not in dict(cfg.search.space)
    assert sweep.sweep_title(cfg) == (
        f"Latency-penalised darts (darts_cnn) on {cfg.data.name}")


def test_a_rerun_reuses_finished_work_and_says_so(tmp_path, monkeypatch, caplog):
    """With ``DONE`` the search is not run again (the genotype is ``genotype.json``'s), with
    ``retrain/result.json`` neither is the retraining (its accuracy is the file's); the log
    (console and the run's ``log.txt``) says each was reused, and the lambda's accuracy and
    predicted latency (10 ms + 6 x 0.25 ms for six skip connections)."""
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    run = out / "lam0.5"
    ops_to_genotype(EARLIER).save(run / "search" / "genotype.json")
    (run / "search" / "DONE").write_text("")
    (run / "retrain").mkdir()
    (run / "retrain" / "result.json").write_text(json.dumps({"test_acc": 0.0625}))
    calls.search.clear()
    calls.retrain.clear()
    with caplog.at_level(logging.INFO, logger="diffnas"):
        (row,) = _run(calls, [0.5], out)
    assert calls.search == [] and calls.retrain == []
    assert Genotype.from_dict(row["genotype"]) == ops_to_genotype(EARLIER)
    assert row["test_acc"] == 0.0625
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    lines = [f"lambda 0.5 (1/1): search finished earlier, reused from {run}",
             "lambda 0.5 (1/1): retraining finished earlier, reused",
             "lambda 0.5 (1/1): test accuracy 0.0625, predicted latency 11.50 ms"]
    assert all(line in said for line in lines)
    logged = (run / "log.txt").read_text()
    assert all(line in logged for line in lines)
