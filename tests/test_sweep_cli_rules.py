"""Rules of the lambda sweep (``hardware/sweep.py``) and the ``diffnas latency`` command
line (``hardware/cli.py``) that a mutation audit could break: each row's lambda, accuracy
and predicted latencies replayed by hand with an exactly known (linear) predictor, the
anchored latency as the median sample ratio times the anchor's median, which network each
timing belongs to, the table, page, plot and ``sweep.json`` contents, which earlier runs
are reused or refused (and what the refusal names), the run locks and logs left as they
were found, and the command line's argument checks, defaults and the values it passes on.

The sweeps here are stubbed (search, retraining and timing replaced by stand-ins on a
NAS-Bench-201 space of C=2, N=1): only the sweep's own bookkeeping runs."""

from __future__ import annotations

import inspect
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cost_predictor, locked_elsewhere, search_finding

from diffnas.config import load_config
from diffnas.hardware import sweep
from diffnas.hardware.dataset import anchor_genotype
from diffnas.hardware.latency import LatencySettings, settings_dict
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.nb201 import ops_to_genotype

NO_NONE = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
COSTS = {"skip_connect": 0.25, "nor_conv_1x1": 1.5, "nor_conv_3x3": 4.0, "avg_pool_3x3": 0.75}
BASE_MS = 10.0
SECTION = {"name": "nb201", "C": 2, "N": 1, "ops": NO_NONE}
NETWORK = {"C": 2, "N": 1}
#: each lambda's (stand-in) searched cell: six op names in nb201's edge order
CELLS = {
    0.0: ("nor_conv_3x3",) * 6,
    0.5: ("nor_conv_1x1", "skip_connect", "nor_conv_3x3", "avg_pool_3x3", "skip_connect",
          "nor_conv_1x1"),
    2.0: ("skip_connect",) * 6,
}
ACCS = {0.0: 0.875, 0.5: 0.625, 2.0: 0.3125}
#: timed samples of the networks by their position in measure_many's list (anchor last);
#: skewed, so that a mean or an inverted ratio gives another number than the median
ROW_SAMPLES = [[1.0, 2.0, 9.0], [3.0, 1.0, 2.0], [4.0, 8.0, 1.0]]
ANCHOR_SAMPLES = [2.0, 1.0, 4.0]
TINY_CNN = "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}"


# --- helpers ---------------------------------------------------------------------------
def _space():
    return create_space(SECTION, DataShape(1, 8, 10))


def _last_alphas(lam: float) -> list[list[float]]:
    """The final relaxed weights (rows sum to 1) the stand-in search of ``lam`` records."""
    g = torch.Generator().manual_seed(int(lam * 10) + 1)
    return torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1).tolist()


def _lam_of(cfg) -> float:
    pens = [p for p in cfg.search.strategy.get("penalties", []) if p["name"] == "latency"]
    return pens[0]["lam"] if pens else 0.0


def _stub(tmp_path, monkeypatch, meta: dict | None = None, predictor: Path | None = None):
    """A stubbed sweep: the config file ``c.yaml`` (nb201, ops NO_NONE), the predictor
    file (``BASE_MS`` + COSTS per edge, exactly) and stand-ins that record their calls."""
    (tmp_path / "c.yaml").write_text(json.dumps({
        "device": "cpu", "data": {"name": "cifar10", "resolution": 8},
        "search": {"space": SECTION, "strategy": {"name": "gdas"}},
        "retrain": {"auxiliary_weight": 0.0, "network": NETWORK}}))
    pred = cost_predictor(NO_NONE, COSTS, base=BASE_MS)
    pred.meta = dict(meta or {})
    path = predictor or tmp_path / "p.pt"
    pred.save(path)
    calls = SimpleNamespace(search=[], retrain=[], measure=[], search_data=object(),
                            retrain_data=SimpleNamespace(in_channels=1, resolution=8,
                                                         num_classes=10))

    def search(cfg, run_dir, resume=False, data=None):
        lam = _lam_of(cfg)
        calls.search.append({"lam": lam, "run_dir": run_dir, "resume": resume, "data": data})
        (run_dir / "search").mkdir(parents=True, exist_ok=True)
        uniform = [[0.25] * 4] * 6
        (run_dir / "search" / "alphas.jsonl").write_text(
            json.dumps({"cell": uniform}) + "\n" + json.dumps({"cell": _last_alphas(lam)})
            + "\n")
        return SimpleNamespace(genotype=ops_to_genotype(CELLS[lam]))

    def retrain(cfg, genotype, run_dir, resume=False, data=None):
        lam = _lam_of(cfg)
        calls.retrain.append({"lam": lam, "resume": resume, "data": data,
                              "genotype": genotype})
        return {"test_acc": ACCS[lam]}

    def measure(models, input_shape, settings, seed=0):
        calls.measure.append({"models": models, "input_shape": input_shape,
                              "settings": settings})
        out = []
        for i, samples in enumerate([*ROW_SAMPLES[:len(models) - 1], ANCHOR_SAMPLES]):
            out.append(SimpleNamespace(samples_ms=samples, median_ms=20.0 + i,
                                       q25_ms=19.0 + i - 0.25, q75_ms=21.0 + i + 0.5))
        return out

    monkeypatch.setattr(sweep, "load_search_data", lambda cfg: calls.search_data)
    monkeypatch.setattr(sweep, "load_dataset", lambda *a, **k: calls.retrain_data)
    monkeypatch.setattr(sweep, "run_search", search)
    monkeypatch.setattr(sweep, "run_retrain", retrain)
    monkeypatch.setattr(sweep, "measure_many", measure)
    calls.config, calls.predictor = str(tmp_path / "c.yaml"), path
    return calls


def _run(calls, lambdas, out, overrides=(), settings=None, predictor=None):
    return sweep.run_sweep(calls.config, list(overrides), str(predictor or calls.predictor),
                           lambdas, out, settings)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _row(**kw) -> dict:
    row = {"lambda": 0.5, "test_acc": 0.8125, "measured_ms": 2.5, "measured_q25_ms": 2.25,
           "measured_q75_ms": 3.2, "anchored_ms": 2.75, "predicted_ms": 4.5,
           "relaxed_predicted_ms": 4.0, "predicted_outside_fitted_range": None}
    return {**row, **kw}


# --- each lambda's row: search, retraining, predictions ---------------------------------
def test_rows_follow_the_lambdas_with_their_retrained_accuracy_and_predictions(
        tmp_path, monkeypatch):
    """One row per lambda in the order given; its accuracy is its retrained genotype's, its
    predicted latency the predictor on the genotype's one-hot cell (BASE + the costs of its
    six ops) and its relaxed one the predictor on the search's *last* alphas record."""
    calls = _stub(tmp_path, monkeypatch)
    lambdas = [2.0, 0.0, 0.5]
    rows = _run(calls, lambdas, tmp_path / "sw")
    assert [r["lambda"] for r in rows] == lambdas
    for row in rows:
        lam = row["lambda"]
        assert row["test_acc"] == ACCS[lam]
        assert row["genotype"] == ops_to_genotype(CELLS[lam]).to_dict()
        assert row["predicted_ms"] == pytest.approx(
            BASE_MS + sum(COSTS[op] for op in CELLS[lam]), rel=1e-6)
        relaxed = BASE_MS + math.fsum(w * COSTS[op] for edge in _last_alphas(lam)
                                      for w, op in zip(edge, NO_NONE, strict=True))
        assert row["relaxed_predicted_ms"] == pytest.approx(relaxed, rel=1e-6)
    # each search and retraining continues its run (resume) with the data loaded for it
    assert [c["lam"] for c in calls.search] == lambdas == [c["lam"] for c in calls.retrain]
    assert all(c["resume"] and c["data"] is calls.search_data for c in calls.search)
    assert all(c["resume"] and c["data"] is calls.retrain_data for c in calls.retrain)
    assert [c["genotype"] for c in calls.retrain] == [ops_to_genotype(CELLS[lam])
                                                      for lam in lambdas]


def test_the_fitted_range_is_checked_on_the_genotypes_prediction(tmp_path, monkeypatch):
    """``predicted_outside_fitted_range`` is about the derived genotype's predicted latency
    (the row's ``predicted_ms``), not the relaxed one."""
    lo, hi = BASE_MS + 6 * COSTS["nor_conv_3x3"] - 0.5, BASE_MS + 6 * COSTS["nor_conv_3x3"] + 0.5
    calls = _stub(tmp_path, monkeypatch, {"latency_ms_range": [lo, hi]})
    (row,) = _run(calls, [0.0], tmp_path / "sw")
    assert lo <= row["predicted_ms"] <= hi and not lo <= row["relaxed_predicted_ms"] <= hi
    assert row["predicted_outside_fitted_range"] is None
    (tmp_path / "sw2").mkdir()
    calls = _stub(tmp_path / "sw2", monkeypatch, {"latency_ms_range": [hi, hi + 1]})
    (row,) = _run(calls, [0.0], tmp_path / "sw2" / "out")
    assert row["predicted_outside_fitted_range"] == [hi, hi + 1]


# --- timing: which network each measurement is, the anchored latency --------------------
@pytest.mark.parametrize("anchor_ms", [3.0, None])
def test_measured_and_anchored_latencies_by_hand(tmp_path, monkeypatch, anchor_ms):
    """The derived networks (built with the retraining network settings) are timed in the
    rows' order, the anchor network last; a row's measured latency is its median and
    quartiles, and its anchored latency median(sample / anchor sample) times the
    predictor's recorded ``anchor_ms_median`` (none without one)."""
    meta = {"anchor_ms_median": anchor_ms} if anchor_ms else {}
    calls = _stub(tmp_path, monkeypatch, meta)
    lambdas = [0.0, 0.5, 2.0]
    settings = LatencySettings(warmup=0, repeats=3)
    rows = _run(calls, lambdas, tmp_path / "sw", settings=settings)
    (m,) = calls.measure
    assert m["input_shape"] == (1, 8, 8) and m["settings"] == settings
    space = _space()
    want = [space.build_network(ops_to_genotype(CELLS[lam]), **NETWORK) for lam in lambdas]
    want.append(space.build_network(anchor_genotype(space), **NETWORK))
    assert [_n_params(x) for x in m["models"]] == [_n_params(x) for x in want]
    assert len({_n_params(x) for x in want}) == len(want)  # (the check can tell them apart)
    for i, row in enumerate(rows):
        assert (row["measured_ms"], row["measured_q25_ms"], row["measured_q75_ms"]) == (
            20.0 + i, 19.0 + i - 0.25, 21.0 + i + 0.5)
        ratios = sorted(a / b for a, b in zip(ROW_SAMPLES[i], ANCHOR_SAMPLES, strict=True))
        if anchor_ms:
            assert row["anchored_ms"] == pytest.approx(ratios[1] * anchor_ms, rel=1e-12)
        else:
            assert row["anchored_ms"] is None


def test_the_timed_networks_leave_out_the_auxiliary_head(tmp_path, monkeypatch):
    """``retrain.network.auxiliary`` is a training head: the timed networks (and the
    settings compared with the predictor's) are built without it (a DARTS space: nb201
    networks have none)."""
    from diffnas.hardware.dataset import sample_genotype
    from diffnas.hardware.predictor import LatencyPredictor, space_shapes

    calls = _stub(tmp_path, monkeypatch)
    section = {"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2, "stem_multiplier": 1}
    space = create_space(section, DataShape(1, 8, 10))
    LatencyPredictor(space_shapes(space), hidden=4).save(calls.predictor)
    geno = sample_genotype(space, torch.Generator().manual_seed(0))

    monkeypatch.setattr(sweep, "run_search", search_finding(geno, space))
    net = {"C": 4, "layers": 2}
    with_aux = json.dumps({**net, "auxiliary": True})
    _run(calls, [0.0], tmp_path / "sw", [f"search.space={json.dumps(section)}",
                                         "search.strategy.name=darts",
                                         f"retrain.network={with_aux}",
                                         "retrain.auxiliary_weight=0.4"])
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert summary["network"]["auxiliary"] is False
    (m,) = calls.measure
    assert _n_params(m["models"][0]) == _n_params(
        space.build_network(geno, **net)) < _n_params(
        space.build_network(geno, **net, auxiliary=True))


# --- outputs: sweep.json, sweep.md, the printed table, the plot --------------------------
def test_the_summary_names_the_config_overrides_predictor_and_device(tmp_path, monkeypatch,
                                                                     capsys):
    """``sweep.json`` holds the rows and what made them: the config, the overrides, the
    predictor's absolute path (as the runs record it, though given relative), the device
    fingerprint with the thread count asked for, no mismatch (null); the table is printed."""
    calls = _stub(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sw"
    overrides = ["search.epochs=1"]
    rows = _run(calls, [0.0, 0.5], out, overrides, LatencySettings(threads=2),
                predictor="p.pt")
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(rows))
    assert summary["config"] == calls.config and summary["overrides"] == overrides
    assert summary["predictor"] == str(tmp_path / "p.pt")
    assert summary["device"]["threads"] == 2
    assert summary["predictor_mismatch"] is None
    pens = [p for p in load_config(out / "lam0.5" / "config.yaml").search.strategy[
        "penalties"] if p["name"] == "latency"]
    assert [p["predictor"] for p in pens] == [str(tmp_path / "p.pt")]
    assert sweep.table(rows) in capsys.readouterr().out
    assert (out / "sweep.md").read_text() == sweep.sweep_page(rows, None)


def test_a_predictor_of_another_input_shape_is_named_in_the_summary_and_page(
        tmp_path, monkeypatch, caplog):
    """The input shape is among the settings compared with the predictor's records: a
    predictor fitted at 16x16 is said to differ (warning, sweep.json, sweep.md)."""
    fitted = {**settings_dict(LatencySettings()), "input_shape": [1, 16, 16],
              "network": NETWORK, "space": SECTION}
    calls = _stub(tmp_path, monkeypatch, {"settings": fitted})
    out = tmp_path / "sw"
    with caplog.at_level("WARNING", logger="diffnas"):
        rows = _run(calls, [0.0], out)
    summary = json.loads((out / "sweep.json").read_text())
    mismatch = summary["predictor_mismatch"]
    assert "input_shape" in mismatch and "[1, 16, 16]" in mismatch and "[1, 8, 8]" in mismatch
    assert "network" not in mismatch  # (the same network: only the shape differs)
    assert f"measured otherwise ({mismatch})" in caplog.text
    assert (out / "sweep.md").read_text() == sweep.sweep_page(rows, mismatch) != \
        sweep.sweep_page(rows, None)


@pytest.mark.parametrize("anchored", [2.75, None])
def test_table_rows_are_replayed_by_hand(anchored):
    r = _row(anchored_ms=anchored)
    lines = sweep.table([r, _row(**{"lambda": 2.0, "test_acc": 0.5})]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| lambda | test accuracy |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["0.5", "81.25%", "2.50 [2.25, 3.20]",
                     "-" if anchored is None else "2.75", "4.50"]
    assert lines[3].startswith("| 2 | 50.00% |")


@pytest.mark.parametrize("anchors", [[1.5, 3.5], [1.5, None]])
def test_the_plot_shows_accuracy_against_each_latency(tmp_path, monkeypatch, anchors):
    """Points at (measured median, accuracy in %) and (predicted, accuracy in %), labelled
    by lambda at the measured point; the anchored curve only when every row has one."""
    import matplotlib.figure

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: seen.extend(fig.axes))
    rows = [_row(**{"lambda": 0.0, "test_acc": 0.75, "measured_ms": 2.0,
                    "predicted_ms": 2.5, "anchored_ms": anchors[0]}),
            _row(**{"lambda": 1.5, "test_acc": 0.25, "measured_ms": 4.0,
                    "predicted_ms": 5.5, "anchored_ms": anchors[1]})]
    sweep.plot(rows, tmp_path / "s.png", "title")
    (ax,) = seen
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}
    assert lines["measured (median)"] == ([2.0, 4.0], [75.0, 25.0])
    assert lines["predicted"] == ([2.5, 5.5], [75.0, 25.0])
    anchored = lines.get("measured, anchored to the dataset")
    assert anchored == (([1.5, 3.5], [75.0, 25.0]) if None not in anchors else None)
    notes = [(t.get_text(), tuple(t.xy)) for t in ax.texts]
    assert notes == [("λ=0", (2.0, 75.0)), ("λ=1.5", (4.0, 25.0))]
    assert ax.get_title() == "title"


def test_the_plot_title_names_the_configs_strategy(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    base = load_config(calls.config, [])
    assert sweep.sweep_title(base) == "Latency-penalised gdas (nb201) on cifar10"
    other = load_config(calls.config, ["search.strategy.name=darts"])
    assert sweep.sweep_title(other) == "Latency-penalised darts (nb201) on cifar10"


# --- lambdas ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_lambdas_that_are_not_finite_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match=r"each must be finite and >= 0"):
        sweep.run_sweep(None, [], "p.pt", [0.0, bad], tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_lambdas_that_name_one_directory_are_refused(tmp_path, monkeypatch):
    """Run directories are named ``lam{value:g}``: two lambdas equal to 6 significant
    digits would share one; lambdas that differ there get their own."""
    with pytest.raises(ValueError, match="agree in their first 6 significant digits"):
        sweep.run_sweep(None, [], "p.pt", [1.0000001, 1.0000002], tmp_path / "sw")
    calls = _stub(tmp_path, monkeypatch)
    monkeypatch.setitem(CELLS, 0.00125, CELLS[0.5])
    monkeypatch.setitem(CELLS, 0.00126, CELLS[2.0])
    monkeypatch.setitem(ACCS, 0.00125, 0.5)
    monkeypatch.setitem(ACCS, 0.00126, 0.5)
    _run(calls, [0.00125, 0.00126], tmp_path / "sw")
    assert sorted(p.name for p in (tmp_path / "sw").glob("lam*")) == ["lam0.00125",
                                                                    "lam0.00126"]


def test_minus_zero_is_the_unpenalised_run_lam0(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    (row,) = _run(calls, [-0.0], tmp_path / "sw")
    assert [p.name for p in (tmp_path / "sw").glob("lam*")] == ["lam0"]
    assert math.copysign(1.0, row["lambda"]) == 1.0


# --- reuse of earlier runs -------------------------------------------------------------
def test_finished_searches_and_retrainings_are_reused_not_rerun(tmp_path, monkeypatch):
    """A run whose search has ``DONE`` takes its genotype from ``genotype.json``; one with a
    ``retrain/result.json`` takes its accuracy from there; neither is run again."""
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    run = out / "lam0.5"
    ops_to_genotype(CELLS[2.0]).save(run / "search" / "genotype.json")  # told apart below
    (run / "search" / "DONE").write_text("")
    calls.search.clear()
    calls.retrain.clear()
    (row,) = _run(calls, [0.5], out)
    assert calls.search == [] and row["genotype"] == ops_to_genotype(CELLS[2.0]).to_dict()
    assert calls.retrain[0]["genotype"] == ops_to_genotype(CELLS[2.0])
    (run / "retrain").mkdir(exist_ok=True)
    (run / "retrain" / "result.json").write_text(json.dumps({"test_acc": 0.0625}))
    calls.retrain.clear()
    (row,) = _run(calls, [0.5], out)
    assert calls.retrain == [] and row["test_acc"] == 0.0625


@pytest.mark.parametrize("override, reused", [
    ("device=auto", True), ("plots=false", True), ("progress=false", True),
    ("seed=3", False), ("search.epochs=7", False), ("data.batch_size=8", False),
])
def test_a_rerun_reuses_runs_that_compute_the_same(tmp_path, monkeypatch, override, reused):
    """Where and how a run executes (device, plots, progress) is not compared on reuse;
    what it computes (seed, epochs, batch size) is, and a difference is refused, naming
    the key with both values."""
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    before = (out / "lam0.5" / "config.yaml").read_text()
    if reused:
        _run(calls, [0.5], out, [override])
        assert len(calls.search) == 2
        # the earlier run keeps its own config.yaml (it computed with it)
        assert (out / "lam0.5" / "config.yaml").read_text() == before
    else:
        key, value = override.split("=")
        with pytest.raises(ValueError, match=rf"holds a run made with other settings \({key}: "
                                             rf".* there, {value} now: its config.yaml"):
            _run(calls, [0.5], out, [override])
        assert len(calls.search) == 1


def test_a_refusal_names_five_differences_and_says_there_are_more(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    two = ["seed=3", "search.epochs=7"]
    with pytest.raises(ValueError) as err:
        _run(calls, [0.5], out, two)
    said = str(err.value)
    assert "seed: 0 there, 3 now" in said and "search.epochs: " in said and "; ...:" not in said
    six = [*two, "data.batch_size=8", "retrain.epochs=2", "retrain.lr=0.5", "retrain.lr_min=0.01"]
    with pytest.raises(ValueError) as err:
        _run(calls, [0.5], out, six)
    said = str(err.value)
    named = said[said.index("(") + 1:said.index("; ...:")].split("; ")
    assert len(named) == 5 and all(" there, " in n and n.endswith(" now") for n in named)


def test_a_run_of_a_sweep_that_recorded_no_digest_is_reused(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    _run(calls, [0.5], out)
    (out / "lam0.5" / sweep.PREDICTOR_DIGEST).unlink()
    _run(calls, [0.5], out)
    assert len(calls.search) == 2


def test_the_digest_is_written_before_the_config(tmp_path, monkeypatch):
    """A run directory never holds a config.yaml without the predictor's digest beside it
    (it would be reused after a refit): when the digest cannot be written, no config is."""
    calls = _stub(tmp_path, monkeypatch)
    real = sweep.atomic_write_text

    def failing(text, path):
        if Path(path).name == sweep.PREDICTOR_DIGEST:
            raise OSError("disk full (stand-in)")
        return real(text, path)

    monkeypatch.setattr(sweep, "atomic_write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        _run(calls, [0.5], tmp_path / "sw")
    assert not (tmp_path / "sw" / "lam0.5" / "config.yaml").exists()


def test_a_run_records_the_plugins_of_its_config(tmp_path, monkeypatch):
    from diffnas.engine.rundir import PLUGINS_FILE

    plugin = tmp_path / "my_plugin_for_sweep.py"
    plugin.write_text("X = 1\n")
    calls = _stub(tmp_path, monkeypatch)
    _run(calls, [0.5], tmp_path / "sw", [f"plugins=[{plugin}]"])
    recorded = json.loads((tmp_path / "sw" / "lam0.5" / PLUGINS_FILE).read_text())
    assert [v["file"] for v in recorded.values()] == [str(plugin.resolve())]


# --- locks and logs --------------------------------------------------------------------
def test_a_refused_lock_frees_the_others_and_keeps_directories_it_did_not_make(
        tmp_path, monkeypatch):
    """lam1 held elsewhere: lam0 (there before) is unlocked again and kept, lam0.5 (made by
    this sweep) removed; nothing ran."""
    from diffnas.engine.runlock import RunInUseError, acquire_run_lock

    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    (out / "lam0").mkdir(parents=True)

    def acquire(run_dir):
        if Path(run_dir).name == "lam2":
            raise RunInUseError(f"{run_dir} is in use by another diffnas process (stand-in)")
        acquire_run_lock(run_dir)

    monkeypatch.setattr(sweep, "acquire_run_lock", acquire)
    with pytest.raises(RunInUseError, match="lam2 is in use"):
        _run(calls, [0.0, 0.5, 2.0], out)
    assert (out / "lam0").is_dir() and not locked_elsewhere(out / "lam0")
    assert not (out / "lam0.5").exists() and calls.search == []


def test_every_run_is_unlocked_after_the_sweep(tmp_path, monkeypatch):
    calls = _stub(tmp_path, monkeypatch)
    held = []

    def search(cfg, run_dir, **kw):
        held.append([locked_elsewhere(tmp_path / "sw" / n) for n in ("lam0", "lam0.5")])
        return real(cfg, run_dir, **kw)

    real = sweep.run_search
    monkeypatch.setattr(sweep, "run_search", search)
    _run(calls, [0.0, 0.5], tmp_path / "sw")
    assert held == [[True, True], [True, True]]
    assert not locked_elsewhere(tmp_path / "sw" / "lam0")
    assert not locked_elsewhere(tmp_path / "sw" / "lam0.5")


@pytest.fixture
def quiet_diffnas_logger():
    """The ``diffnas`` logger at WARNING with no handlers of its own (restored after, with
    ``setLevel``: it clears the loggers' cached levels)."""
    logger = logging.getLogger("diffnas")
    level, handlers = logger.level, logger.handlers[:]
    for h in handlers:
        logger.removeHandler(h)
    logger.setLevel(logging.WARNING)
    yield logger
    for h in logger.handlers[:]:
        logger.removeHandler(h)
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(level)


@pytest.mark.parametrize("own_handler", [False, True])
def test_the_sweep_lets_progress_through_and_leaves_the_logger_as_found(
        tmp_path, monkeypatch, quiet_diffnas_logger, own_handler):
    """While it runs: INFO level, a console handler only when the logger has none of its
    own; afterwards the level and handlers it had."""
    logger = quiet_diffnas_logger
    mine = logging.NullHandler()
    if own_handler:
        logger.addHandler(mine)
    calls = _stub(tmp_path, monkeypatch)
    during = []

    def search(cfg, run_dir, **kw):
        during.append((logger.level, [h for h in logger.handlers
                                      if not isinstance(h, logging.FileHandler)]))
        return real(cfg, run_dir, **kw)

    real = sweep.run_search
    monkeypatch.setattr(sweep, "run_search", search)
    _run(calls, [0.0], tmp_path / "sw")
    ((level, handlers),) = during
    assert level == logging.INFO
    if own_handler:
        assert handlers == [mine]
    else:
        assert len(handlers) == 1 and type(handlers[0]) is logging.StreamHandler
    assert logger.level == logging.WARNING
    assert logger.handlers == ([mine] if own_handler else [])


@pytest.mark.parametrize("via_link", [False, True])
def test_each_run_log_holds_its_own_lambda_appended_once(tmp_path, monkeypatch,
                                                         quiet_diffnas_logger, via_link):
    """``log.txt`` is appended to (an earlier run's lines kept), gets each line once even
    when the log already goes there (also opened through a symlinked folder), and holds
    only its own lambda's lines."""
    logger = quiet_diffnas_logger
    calls = _stub(tmp_path, monkeypatch)
    out = tmp_path / "sw"
    (out / "lam0").mkdir(parents=True)
    (out / "lam0" / "log.txt").write_text("an earlier line\n")
    (out / "lam0.5").mkdir()
    opened = out / "lam0.5"
    if via_link:
        opened = tmp_path / "link"
        opened.symlink_to(out / "lam0.5", target_is_directory=True)
    already = logging.FileHandler(opened / "log.txt")  # (an earlier command's)
    logger.addHandler(already)
    try:
        _run(calls, [0.0, 0.5], out)
    finally:
        logger.removeHandler(already)
        already.close()
    first = (out / "lam0" / "log.txt").read_text()
    assert first.startswith("an earlier line\n") and "lambda 0 (1/2): search in" in first
    assert "lambda 0.5" not in first
    second = (out / "lam0.5" / "log.txt").read_text()
    assert second.count("lambda 0.5 (2/2): search in") == 1
    assert second.count("lambda 0.5 (2/2): retraining its genotype in") == 1


# --- the command line --------------------------------------------------------------------
def _parsed(argv: list[str]):
    from diffnas.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", [
    ["latency", "measure", "--out", "l.jsonl"],
    ["latency", "report", "--genotype", "g.json"],
    ["latency", "sweep", "--config", "c.yaml", "--predictor", "p.pt", "--out", "sw"],
], ids=["measure", "report", "sweep"])
def test_timing_flags_default_to_the_librarys_latency_settings(command):
    from diffnas.hardware.cli import _settings

    assert _settings(_parsed(command)) == LatencySettings()


def test_fit_flags_default_to_fit_predictors_defaults_and_the_sweep_includes_lambda_0():
    from diffnas.hardware.predictor import fit_predictor

    args = _parsed(["latency", "fit", "--data", "l.jsonl", "--out", "p.pt"])
    defaults = {k: v.default for k, v in inspect.signature(fit_predictor).parameters.items()}
    for key in ("holdout", "epochs", "hidden", "seed", "target", "mlp_decay", "edge_decay"):
        assert getattr(args, key) == defaults[key], key
    lambdas = _parsed(["latency", "sweep", "--config", "c", "--predictor", "p", "--out",
                       "o"]).lambdas
    values = [float(x) for x in lambdas.split(",")]
    assert 0.0 in values and len(values) > 1 and values == sorted(values)


def test_each_flag_reaches_the_timing_settings_the_sweep_and_the_report(tmp_path,
                                                                        monkeypatch):
    from diffnas.cli import main
    from diffnas.hardware import costs

    got = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a: got.update(sweep=a) or [])
    flags = ["--batch-size", "2", "--warmup", "4", "--repeats", "5", "--threads", "1",
             "--clock", "thread"]
    want = LatencySettings(batch_size=2, warmup=4, repeats=5, threads=1, clock="thread")
    assert main(["latency", "sweep", "--config", "c.yaml", "--predictor", "p.pt",
                 "--lambdas", "0,0.5", "--out", str(tmp_path / "sw"), *flags,
                 "search.epochs=1"]) == 0
    assert got["sweep"] == ("c.yaml", ["search.epochs=1"], "p.pt", [0.0, 0.5],
                            tmp_path / "sw", want)
    monkeypatch.setattr(costs, "genotype_costs", lambda *a: got.update(report=a) or {})
    assert main(["latency", "report", "--genotype", "DARTS_V2", "--predictor", "q.pt",
                 *flags]) == 0
    assert got["report"][4] == want and got["report"][5] == "q.pt"


def test_measure_passes_its_flags_and_says_what_it_appended(tmp_path, monkeypatch, capsys):
    from diffnas.cli import main
    from diffnas.hardware import dataset

    got = {}

    def build(space, path, count, shape, network, settings, seed, chunk, **kw):
        got.update(count=count, network=network, settings=settings, seed=seed, chunk=chunk)
        return [{}] * 2  # fewer than asked: the space had no more

    monkeypatch.setattr(dataset, "build_dataset", build)
    assert main(["latency", "measure", "--out", str(tmp_path / "l.jsonl"), "-n", "7",
                 "--seed", "5", "--chunk", "3", "--repeats", "4", TINY_CNN, "device=auto",
                 "retrain.network={C: 4, auxiliary: true}"]) == 0
    assert got["count"] == 7 and got["seed"] == 5 and got["chunk"] == 3
    assert got["settings"] == LatencySettings(repeats=4)
    assert "auxiliary" not in got["network"] and got["network"]["C"] == 4
    assert f"appended 2 records to {tmp_path / 'l.jsonl'}" in capsys.readouterr().out


def test_a_measure_interrupted_before_its_first_chunk_says_nothing_was_appended(
        tmp_path, monkeypatch, capsys):
    from diffnas.cli import main
    from diffnas.hardware import dataset
    from diffnas.hardware.cli import measure_hint

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "build_dataset", interrupted)
    lat = tmp_path / "l.jsonl"
    assert main(["latency", "measure", "--out", str(lat), "-n", "12", TINY_CNN]) == 130
    err = capsys.readouterr().err
    assert f"nothing was appended to {lat}; run the same command again" in err
    assert measure_hint("o", 0, 12) != measure_hint("o", 1, 12)
    assert "-n 9 " in measure_hint("o", 3, 12) and "3 of 12 new records" in \
        measure_hint("o", 3, 12)


def test_report_refuses_a_cuda_config_but_fit_does_not_time(tmp_path, monkeypatch, capsys):
    """``report`` times networks on the CPU, so a config on the GPU is refused; ``fit``
    times nothing and fits for a GPU config as well."""
    from diffnas.cli import main
    from diffnas.hardware import predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["latency", "report", "--genotype", "DARTS_V2", TINY_CNN, "device=cuda"]) == 2
    assert "device=cuda: latency measure and report time networks on the CPU" in \
        capsys.readouterr().err
    got = {}

    def fit(records, space, **kw):
        got.update(kw)
        raise RuntimeError("fit reached (stand-in)")

    monkeypatch.setattr(predictor, "fit_predictor", fit)
    monkeypatch.setattr("diffnas.hardware.dataset.load_records", lambda path, fp=None: [])
    with pytest.raises(RuntimeError, match="fit reached"):
        main(["latency", "fit", "--data", str(tmp_path / "l.jsonl"), "--out",
              str(tmp_path / "p.pt"), TINY_CNN, "device=cuda"])


def test_fit_passes_each_flag_to_the_fit_and_the_fingerprint_to_the_reader(tmp_path,
                                                                            monkeypatch):
    from diffnas.cli import main
    from diffnas.hardware import dataset, predictor

    got = {}

    def fit(records, space, **kw):
        got.update(kw, records=records)
        raise RuntimeError("fit reached (stand-in)")

    monkeypatch.setattr(predictor, "fit_predictor", fit)
    monkeypatch.setattr(dataset, "load_records",
                        lambda path, fingerprint=None: [("records of", fingerprint)])
    with pytest.raises(RuntimeError, match="fit reached"):
        main(["latency", "fit", "--data", str(tmp_path / "l.jsonl"), "--out",
              str(tmp_path / "p.pt"), "--holdout", "0.3", "--epochs", "9", "--hidden", "5",
              "--mlp-decay", "0.25", "--edge-decay", "0.5", "--seed", "7", "--target", "raw",
              "--fingerprint", "abc", TINY_CNN])
    assert got == {"records": [("records of", "abc")], "holdout": 0.3, "epochs": 9,
                   "seed": 7, "target": "raw", "hidden": 5, "mlp_decay": 0.25,
                   "edge_decay": 0.5}


@pytest.mark.parametrize("out, data, message", [
    ("P.JSON", "l.jsonl", "name the predictor .pt"),
    ("./l.jsonl", "l.jsonl", "is the --data file"),
    ("sub/../l.jsonl", "l.jsonl", "is the --data file"),
])
def test_fit_refuses_an_out_that_would_replace_records_or_be_its_report(
        tmp_path, monkeypatch, capsys, out, data, message):
    from diffnas.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "l.jsonl").write_text("{}\n")
    assert main(["latency", "fit", "--data", data, "--out", out, TINY_CNN]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "l.jsonl").read_text() == "{}\n"


def test_is_predictor_tells_a_predictor_from_other_files(tmp_path):
    from diffnas.hardware.cli import _is_predictor

    cost_predictor(NO_NONE, COSTS).save(tmp_path / "p.pt")
    (tmp_path / "notes.pt").write_text("my notes")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert _is_predictor(tmp_path / "p.pt") and _is_predictor(str(tmp_path / "p.pt"))
    assert not _is_predictor(tmp_path / "notes.pt")
    assert not _is_predictor(tmp_path / "other.pt")
    assert not _is_predictor(tmp_path / "missing.pt")


@pytest.mark.parametrize("lambdas", ["0, ,1", "0,1,", " ,1"])
def test_lambdas_with_a_blank_item_name_it(tmp_path, capsys, lambdas):
    from diffnas.cli import main

    assert main(["latency", "sweep", "--config", "c.yaml", "--predictor", "p.pt",
                 "--lambdas", lambdas, "--out", str(tmp_path / "sw")]) == 2
    assert f"--lambdas {lambdas!r}: an empty item" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_a_measure_interrupted_after_its_last_chunk_does_not_advise_n_0():
    """A Ctrl-C after the last chunk was appended (every record of ``-n`` kept) should not
    suggest a command line the same command refuses."""
    from diffnas.hardware.cli import measure_hint

    hint = measure_hint("l.jsonl", 12, 12)
    assert hint == "all 12 new records were appended to l.jsonl and are kept"
    assert "-n 0" not in hint and "the rest" not in hint
