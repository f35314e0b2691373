"""Hardware checks: the latency predictor's op columns are matched by name (NAS-Bench-201
cells, fitting records, saved files), a latency dataset stops when the space has no new
architectures left, and a sweep's plot is titled after its own config."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import cost_predictor, search_finding

from diffnas.genotype import Genotype
from diffnas.hardware.dataset import (
    build_dataset,
    encode_indices,
    genotype_key,
    load_records,
    one_hot,
    sample_genotype,
    space_ops,
)
from diffnas.hardware.latency import LatencySettings
from diffnas.hardware.penalty import cell_latency_fn
from diffnas.hardware.predictor import LatencyPredictor, fit_predictor, space_shapes
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.nb201 import NB201_OPS, ops_to_genotype

SHAPE = DataShape(1, 8, 10)
NO_NONE = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]  # common variant


def _nb201(ops=None, **kw):
    section = {"name": "nb201", "C": 2, "N": 1, **kw}
    if ops is not None:
        section["ops"] = list(ops)
    return create_space(section, SHAPE)


def _cell(names):
    return tuple(NB201_OPS.index(n) for n in names)


# --- cell_latency_fn: NAS-Bench-201 indices mapped to the predictor's columns by name ----

def test_cell_latency_fn_maps_nb201_indices_by_op_name(tmp_path):
    costs = {"nor_conv_3x3": 10.0, "nor_conv_1x1": 3.0, "avg_pool_3x3": 1.0}
    path = tmp_path / "pred.pt"
    cost_predictor(NO_NONE, costs).save(path)
    lat = cell_latency_fn(str(path))  # loaded: the names travel with the file
    for names in [("nor_conv_3x3",) * 6, ("nor_conv_1x1",) * 6,
                  ("skip_connect", "nor_conv_3x3", "avg_pool_3x3", "nor_conv_1x1",
                   "nor_conv_3x3", "skip_connect")]:
        assert lat(_cell(names)) == pytest.approx(10.0 + sum(costs.get(n, 0.0) for n in names))
    # 'none' is an NB201 op the predictor was not fitted with: refused, naming it
    with pytest.raises(ValueError, match="'none'.*not fitted with"):
        lat(_cell(("none",) + ("skip_connect",) * 5))
    with pytest.raises(ValueError, match="does not fit"):
        lat((0, 0, 5, 0, 0, 0))


def test_cell_latency_fn_agrees_with_the_space_encoding():
    """A fitted predictor, queried with NB201 cells, gives what it gives the same
    architectures encoded through the space it was fitted on (whose op list differs)."""
    space = _nb201(NO_NONE)
    model, _ = fit_predictor(_records(space), space, target="raw", epochs=5)
    lat = cell_latency_fn(model)
    rng = torch.Generator().manual_seed(1)
    for _ in range(5):
        names = tuple(NO_NONE[int(i)] for i in torch.randint(0, 4, (6,), generator=rng))
        with torch.no_grad():
            direct = float(model(one_hot(encode_indices(ops_to_genotype(names), space), space)))
        assert lat(_cell(names)) == pytest.approx(direct, rel=1e-6)


def test_cell_latency_fn_takes_other_index_lists():
    costs = {"nor_conv_3x3": 10.0}
    lat = cell_latency_fn(cost_predictor(NO_NONE, costs), ops=list(reversed(NO_NONE)))
    conv3 = list(reversed(NO_NONE)).index("nor_conv_3x3")
    assert lat((conv3,) * 3 + (0,) * 3) == pytest.approx(40.0)


def test_cell_latency_fn_refuses_a_predictor_without_op_names():
    p = LatencyPredictor({"cell": (6, 5)}, hidden=4)
    with pytest.raises(ValueError, match="does not record which op"):
        cell_latency_fn(p)
    with pytest.raises(ValueError, match="do not match the predictor's shapes"):
        LatencyPredictor({"cell": (6, 5)}, hidden=4, ops={"cell": NO_NONE})


def _legacy_file(tmp_path, space_section):
    """A predictor file as saved before op names were stored (no 'ops' entry)."""
    p = cost_predictor(list(NB201_OPS), {"nor_conv_3x3": 10.0})
    meta = {} if space_section is None else {"settings": {"space": space_section}}
    path = tmp_path / "old.pt"
    torch.save({"shapes": p.shapes, "hidden": p.hidden, "meta": meta,
                "state": p.state_dict()}, path)
    return path


def test_old_predictor_files_load_with_default_order_only_where_unambiguous(tmp_path):
    lat = cell_latency_fn(str(_legacy_file(tmp_path, {"name": "nb201", "C": 16})))
    assert lat(_cell(("nor_conv_3x3",) * 2 + ("none",) * 4)) == pytest.approx(30.0)
    for section in [None, {"name": "nb201", "ops": list(reversed(NB201_OPS))},
                    {"name": "darts_cnn"}]:
        path = _legacy_file(tmp_path, section)
        assert LatencyPredictor.load(path).ops is None  # still loads (shape checks only)
        with pytest.raises(ValueError, match="does not record which op"):
            cell_latency_fn(str(path))


# --- fitting: records are read against the op list they were measured with ---------------

def _records(space, n=12, seed=0, with_ops=True):
    """Latency = 1 ms + 2 ms per nor_conv_3x3 edge."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        geno = sample_genotype(space, g)
        r = {"genotype": geno.to_dict(), "encoding": encode_indices(geno, space),
             "latency_ms": 1.0 + 2.0 * sum(e.op == "nor_conv_3x3" for e in geno.cells[0].edges),
             "device": {"id": "x"}, "settings": {"space": {"name": "nb201"}}}
        if with_ops:
            r["ops"] = {k: list(v) for k, v in space_ops(space).items()}
        out.append(r)
    return out


@pytest.mark.parametrize("with_ops", [True, False])
def test_fit_refuses_records_of_another_op_order(with_ops):
    measured, fitted = _nb201(), _nb201(list(reversed(NB201_OPS)))
    with pytest.raises(ValueError, match="record 1 does not fit space 'nb201'"):
        fit_predictor(_records(measured, with_ops=with_ops), fitted, target="raw", epochs=2)


def test_fit_refuses_records_that_name_another_op_list():
    # indices agree (the fitting list extends the measured one) but the lists differ
    measured, fitted = _nb201(NO_NONE), _nb201([*NO_NONE, "none"])
    with pytest.raises(ValueError, match="measured with ops"):
        fit_predictor(_records(measured), fitted, target="raw", epochs=2)


def test_fitted_predictor_keeps_its_op_names(tmp_path):
    space = _nb201(NO_NONE)
    model, _ = fit_predictor(_records(space), space, target="raw", epochs=2)
    assert model.ops == {"cell": tuple(NO_NONE)}
    model.save(tmp_path / "p.pt")
    loaded = LatencyPredictor.load(tmp_path / "p.pt")
    assert loaded.ops == model.ops
    loaded.check_space(space)
    with pytest.raises(ValueError, match="fitted with ops"):
        loaded.check_space(_nb201(list(reversed(NO_NONE))))


def test_genotype_costs_refuses_a_predictor_of_another_op_list(tmp_path):
    from diffnas.hardware.costs import genotype_costs

    space = _nb201(NO_NONE)
    path = tmp_path / "p.pt"
    LatencyPredictor(space_shapes(space), hidden=4,
                     ops={"cell": list(reversed(NO_NONE))}).save(path)
    geno = sample_genotype(space, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="fitted with ops"):
        genotype_costs(space, geno, (1, 8, 8), {"C": 2, "N": 1}, predictor=str(path))


def test_genotype_costs_flags_a_predictor_fitted_under_other_settings(tmp_path):
    """A predictor's records were measured with one network, input and device: a report
    measured otherwise says so next to the prediction (it is not for that measurement)."""
    from diffnas.hardware.costs import genotype_costs
    from diffnas.hardware.latency import device_fingerprint, settings_dict

    space = _nb201(NO_NONE)
    s = LatencySettings(warmup=0, repeats=1)
    fitted = {**settings_dict(s), "input_shape": [1, 8, 8], "network": {"C": 2, "N": 1},
              "space": {"name": "nb201"}}
    pred = LatencyPredictor(space_shapes(space), hidden=4, ops={"cell": NO_NONE})
    pred.meta = {"settings": fitted, "device": device_fingerprint("cpu", s.threads)}
    pred.save(tmp_path / "p.pt")
    geno = sample_genotype(space, torch.Generator().manual_seed(0))
    same = genotype_costs(space, geno, (1, 8, 8), {"C": 2, "N": 1}, s, str(tmp_path / "p.pt"))
    assert "predicted_ms" in same and "predictor_mismatch" not in same
    other = genotype_costs(space, geno, (1, 8, 8), {"C": 4, "N": 1}, s, str(tmp_path / "p.pt"))
    assert other["predictor_mismatch"] == "network.C: 2 vs 4"
    pred.meta["device"] = {**pred.meta["device"], "id": "elsewhere"}
    pred.save(tmp_path / "p.pt")
    moved = genotype_costs(space, geno, (1, 8, 8), {"C": 2, "N": 1}, s, str(tmp_path / "p.pt"))
    assert moved["predictor_mismatch"].startswith("device: 'elsewhere' vs ")


def test_genotype_costs_flags_a_prediction_outside_the_fitted_latencies(tmp_path):
    """A prediction beyond the latencies the predictor was fitted on is an extrapolation:
    the report says so, with the fitted range; one inside it carries no flag."""
    from diffnas.hardware.costs import genotype_costs

    space = _nb201(NO_NONE)
    pred = LatencyPredictor(space_shapes(space), hidden=4, ops={"cell": NO_NONE})
    geno = sample_genotype(space, torch.Generator().manual_seed(0))
    s = LatencySettings(warmup=0, repeats=1)

    def report(fitted_range: list[float] | None) -> dict:
        pred.meta = {"latency_ms_range": fitted_range} if fitted_range else {}
        pred.save(tmp_path / "p.pt")
        return genotype_costs(space, geno, (1, 8, 8), {"C": 2, "N": 1}, s,
                              str(tmp_path / "p.pt"))

    ms = report(None)["predicted_ms"]
    assert "predicted_outside_fitted_range" not in report([ms - 1, ms + 1])
    assert report([ms + 1, ms + 2])["predicted_outside_fitted_range"] == [ms + 1, ms + 2]
    assert report([ms - 2, ms - 1])["predicted_outside_fitted_range"] == [ms - 2, ms - 1]


def test_sweep_table_marks_a_prediction_outside_the_fitted_latencies():
    from diffnas.hardware.sweep import table

    row = {"lambda": 1, "test_acc": 0.9, "measured_ms": 2.0, "measured_q25_ms": 1.9,
           "measured_q75_ms": 2.1, "anchored_ms": None, "predicted_ms": 3.0}
    assert "outside" not in table([{**row, "predicted_outside_fitted_range": None}])
    assert "| 3.00 (outside the fitted range) |" in table(
        [{**row, "predicted_outside_fitted_range": [4.0, 5.0]}])


# --- build_dataset: a space with no new architectures left ------------------------------

@pytest.mark.timeout(60)  # fail, rather than hang, if it loops (pytest-timeout)
@pytest.mark.parametrize("which", ["nb201", "darts_cnn"])
def test_dataset_stops_when_the_space_is_exhausted(tmp_path, which):
    if which == "nb201":
        space = _nb201(["skip_connect", "avg_pool_3x3"])  # 2 ** 6 = 64 cells
    else:  # node 3 keeps 2 of its 3 inputs, ops fixed: 3 x 3 = 9 networks, whose
        # discretized genotypes list a node's inputs in the order of random strengths
        space = create_space({"name": "darts_cnn", "C": 2, "layers": 3, "nodes": 2,
                              "stem_multiplier": 1, "ops": ["none", "skip_connect"]}, SHAPE)
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=1)
    logger = logging.getLogger("diffnas")
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        new = build_dataset(space, path, 65, (1, 8, 8), {}, s, chunk=100, max_misses=100)
        # again: the file's architectures count as seen; at most the rest can be new
        again = build_dataset(space, path, 65, (1, 8, 8), {}, s, max_misses=100)
    finally:
        logger.removeHandler(handler)
    assert 0 < len(new) and len(new) + len(again) <= 64
    records = load_records(path)
    assert len(records) == len(new) + len(again)
    assert len({genotype_key(Genotype.from_dict(r["genotype"])) for r in records}) == \
        len(records)
    assert len({json.dumps(r["encoding"]) for r in records}) == len(records)
    assert sum("looks exhausted" in m for m in handler.messages) == 2


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_dataset_refuses_to_extend_a_file_of_another_op_list(tmp_path):
    path = tmp_path / "lat.jsonl"
    s = LatencySettings(warmup=0, repeats=1)
    build_dataset(_nb201(), path, 2, (1, 8, 8), {}, s)
    assert all(r["ops"] == {"cell": list(NB201_OPS)} for r in load_records(path))
    with pytest.raises(ValueError, match="another op list"):
        build_dataset(_nb201(list(reversed(NB201_OPS))), path, 1, (1, 8, 8), {}, s)
    assert len(load_records(path)) == 2


# --- sweep: the plot says which search it shows --------------------------------------------

def test_sweep_plot_is_titled_after_the_config(tmp_path, monkeypatch):
    import matplotlib.figure

    from diffnas.hardware import sweep

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "device: cpu\ndata: {name: cifar10, resolution: 8}\n"
        "search: {space: {name: nb201, C: 2, N: 1}, strategy: {name: gdas}}\n"
        "retrain: {auxiliary_weight: 0.0, network: {C: 2, N: 1}}\n")
    space = _nb201()
    pred_file = tmp_path / "p.pt"
    LatencyPredictor(space_shapes(space), hidden=4).save(pred_file)
    geno = sample_genotype(space, torch.Generator().manual_seed(0))

    def fake_measure(models, input_shape, settings, seed=0):
        return [SimpleNamespace(samples_ms=[1.0, 1.0], median_ms=1.0, q25_ms=1.0,
                                q75_ms=1.0) for _ in models]

    titles: list[str] = []
    monkeypatch.setattr(sweep, "load_search_data", lambda cfg: None)
    monkeypatch.setattr(sweep, "load_dataset", lambda *a, **k: SimpleNamespace(
        in_channels=1, resolution=8, num_classes=10))
    monkeypatch.setattr(sweep, "run_search", search_finding(geno, space))
    monkeypatch.setattr(sweep, "run_retrain", lambda *a, **k: {"test_acc": 0.5})
    monkeypatch.setattr(sweep, "measure_many", fake_measure)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.extend(ax.get_title() for ax in fig.axes))
    sweep.run_sweep(str(cfg_file), [], str(pred_file), [0.0], tmp_path / "out")
    assert len(titles) == 1
    assert "gdas" in titles[0] and "cifar10" in titles[0] and "nb201" in titles[0]
    assert "Fashion" not in titles[0] and "DARTS" not in titles[0]


# --- the search penalty: a predictor of another op list is refused up front --------------
def test_latency_penalty_refuses_a_search_of_another_op_list(tmp_path):
    from diffnas.arch import ArchParams
    from diffnas.strategies import ClassificationObjective, create_strategy

    path = tmp_path / "pred.pt"
    cost_predictor(NO_NONE, {"nor_conv_3x3": 1.0}).save(path)

    def strategy(ops):
        space = _nb201(ops)
        return create_strategy({"name": "darts", "penalties": [
            {"name": "latency", "predictor": str(path), "normalize": False}]},
            space.build_supernet(),
            ArchParams(space), ClassificationObjective(), epochs=1)

    assert strategy(NO_NONE).penalties  # the predictor's own op list: accepted
    with pytest.raises(ValueError, match="fitted with ops .* the search has"):
        strategy(list(reversed(NO_NONE)))  # same shape, other columns
    with pytest.raises(ValueError, match=r"expects \(edges, ops\)"):
        strategy(NB201_OPS)  # five ops


# --- mistakes found by the latency audit (2026-12-07) --------------------------------------
def test_a_sweep_of_a_config_without_retraining_or_of_another_space_writes_nothing(tmp_path):
    """retrain.enabled=false was ignored: each lambda retrained with the built-in 600-epoch
    defaults. A predictor of another space was refused only after the lambdas' folders
    existed. Both are refused before --out is made."""
    from diffnas.config import ConfigError
    from diffnas.hardware import sweep

    nb201 = LatencyPredictor(space_shapes(_nb201()), hidden=4, ops=space_ops(_nb201()))
    nb201.save(tmp_path / "p.pt")
    out = tmp_path / "sw"
    with pytest.raises(ConfigError, match="retrains each lambda's genotype .* "
                                          "retrain.enabled=false: set retrain.enabled=true"):
        sweep.run_sweep(None, ["retrain.enabled=false"], str(tmp_path / "p.pt"), [0.0], out)
    with pytest.raises(ValueError, match="the latency predictor expects"):  # darts_cnn config
        sweep.run_sweep(None, [], str(tmp_path / "p.pt"), [0.0, 1.0], out)
    assert not out.exists()


def test_latency_penalty_normalize_takes_a_boolean_only(tmp_path):
    """``normalize: 'false'`` (a quoted string) was truthy: normalised silently."""
    from diffnas.hardware.penalty import LatencyPenalty

    space = _nb201()
    LatencyPredictor(space_shapes(space), hidden=4, ops=space_ops(space)).save(tmp_path / "p.pt")
    assert LatencyPenalty(str(tmp_path / "p.pt"), normalize=False).scale == 1.0
    with pytest.raises(ValueError, match="normalize must be true or false, got 'false'"):
        LatencyPenalty(str(tmp_path / "p.pt"), normalize="false")


def test_a_json_file_given_as_the_predictor_is_named_for_what_it_is(tmp_path):
    """The fit's report (X.json) or the dataset given as --predictor read as a damaged
    checkpoint ("cut short ... or damaged in a copy")."""
    (tmp_path / "p.json").write_text(json.dumps({"records": 10}))
    (tmp_path / "d.jsonl").write_text(json.dumps({"latency_ms": 1.0}) + "\n")
    for name in ("p.json", "d.jsonl"):
        with pytest.raises(ValueError, match=r"is a JSON file \(a fit report or a latency "
                                             r"dataset\), not a latency predictor"):
            LatencyPredictor.load(tmp_path / name)


def test_fit_numbers_records_as_the_file_lines_from_1():
    """A record measured with other settings is named by its line in the file (the
    messages counted from 0, so "record 2" pointed at the file's third line)."""
    records = _records(_nb201())
    records[2]["settings"] = {**records[2]["settings"], "threads": 4}
    with pytest.raises(ValueError, match=r"records 1 and 3 were measured with different "
                                         r"settings \(threads"):
        fit_predictor(records, _nb201(), target="raw", epochs=2)


def test_fit_on_records_of_another_space_names_both_spaces():
    """Records measured on nb201 fitted with a darts_cnn config (``fit`` without
    --config) blamed the op lists."""
    records = _records(_nb201())
    for r in records:
        r["settings"]["space"] = {"name": "darts_cnn"}
    with pytest.raises(ValueError, match="record 1 does not fit space 'nb201': it was "
                                         "measured on space 'darts_cnn', not 'nb201'"):
        fit_predictor(records, _nb201(), target="raw", epochs=2)


def test_lambdas_with_an_empty_item_are_refused(tmp_path, capsys):
    from diffnas.cli import main

    assert main(["latency", "sweep", "--config", "c.yaml", "--predictor", "p.pt",
                 "--lambdas", "0,,1", "--out", str(tmp_path / "sw")]) == 2
    assert "--lambdas '0,,1': an empty item" in capsys.readouterr().err


def test_reinforce_with_a_latency_predictor_needs_a_target():
    """The target defaulted to 1 ms, below any CPU predictor's fitted latencies."""
    from diffnas.nasbench.strategies.reinforce import ReinforceConfig

    with pytest.raises(ValueError, match="latency_predictor needs reinforce.latency_target_ms"):
        ReinforceConfig(latency_predictor="p.pt")
    assert ReinforceConfig(latency_predictor="p.pt", latency_target_ms=5.0)


def test_records_compare_their_space_with_its_defaults_filled_in():
    """``latency measure`` refused a file measured with nb201's default ops when the
    default op list was written out ("space.ops: None vs [...]"): the same space."""
    from diffnas.hardware.dataset import settings_differences

    plain = {"space": {"name": "nb201", "C": 2, "N": 1}, "network": {"C": 2, "N": 1}}
    spelled = {**plain, "space": {**plain["space"], "ops": list(NB201_OPS)}}
    assert settings_differences(plain, spelled) == {}
    other = {**plain, "space": {**plain["space"], "ops": list(reversed(NB201_OPS))}}
    assert list(settings_differences(plain, other)) == ["space.ops"]


def test_sweep_page_says_when_predictions_are_for_other_measurements():
    from diffnas.hardware.sweep import sweep_page, table

    rows = [{"lambda": 0, "test_acc": 0.9, "measured_ms": 2.0, "measured_q25_ms": 1.9,
             "measured_q75_ms": 2.1, "anchored_ms": None, "predicted_ms": 3.0}]
    assert sweep_page(rows, None) == table(rows) + "\n"
    page = sweep_page(rows, "input_shape: [1, 16, 16] vs [1, 8, 8]")
    assert page.startswith(table(rows)) and ("measured otherwise (input_shape: [1, 16, 16] "
                                             "vs [1, 8, 8]): its predictions are not") in page
