"""Rules of latency modelling that the other hardware tests leave open (a mutation audit
of ``hardware/predictor.py``, ``hardware/dataset.py`` and ``hardware/latency.py``):

- the predictor: the per-edge term of its output, the input dtype kept, shape errors
  naming the cell type, the fitted range's closed bounds, the predictor file (JSON and
  incomplete files named, op names only guessed for files that never stored them);
- fitting: its option checks, its training replayed by hand (seeded init, Adam with one
  weight decay per part, a cosine schedule over the epochs, squared relative error), the
  fit report's metrics recomputed independently, the held-out split of merged files;
- the dataset: records read against a space (op indices, missing fields, the space a
  record names), one-hot rows of dropped edges, settings compared both ways, the JSONL
  reader's line numbers and refusals, what each new record holds;
- measuring: settings checks, one-sample statistics, synchronisation around each timed
  call (warm-up included), thread count restored, inference mode, the input's batch size
  and dtype, and the device fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics

import pytest
import torch
from conftest import TINY_SHAPE, tiny_space
from test_hardware_rules import _tau_a
from test_latency import _synthetic_records
from torch import nn

from diffnas.genotype import Genotype
from diffnas.hardware import dataset, latency
from diffnas.hardware.dataset import (
    anchored_latencies,
    build_dataset,
    encode_indices,
    genotype_key,
    load_records,
    one_hot,
    record_op_mismatch,
    sample_genotype,
    settings_differences,
)
from diffnas.hardware.latency import (
    LatencySettings,
    LatencyStats,
    device_fingerprint,
    measure_latency,
    measure_many,
    synchronizer,
    time_call,
)
from diffnas.hardware.predictor import (
    LatencyPredictor,
    encode_records,
    fit_predictor,
    kendall_tau,
    mean_relative_error,
    space_ops,
    space_shapes,
    split_by_architecture,
)
from diffnas.report.cost import count_macs, count_parameters
from diffnas.spaces import create_space
from diffnas.spaces.nb201 import NB201_OPS


def _onehot(indices: list[int], n_ops: int, dtype=torch.float32) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(indices), n_ops).to(dtype)


def _zeroed(p: LatencyPredictor) -> LatencyPredictor:
    with torch.no_grad():
        for t in p.parameters():
            t.zero_()
    return p


class _Records:
    """Log lines of the ``diffnas`` logger at WARNING, for tests that check one."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __enter__(self) -> list[str]:
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda rec: self.messages.append(rec.getMessage())
        logging.getLogger("diffnas").addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc) -> None:
        logging.getLogger("diffnas").removeHandler(self.handler)


# --- the predictor's output -------------------------------------------------------------

def test_the_per_edge_term_adds_the_weight_of_each_edges_op():
    """z = edge_linear(flattened edges): with the shared costs and the MLP zeroed, the
    output is mean + std * (sum over edges of the weight of that edge's op column)."""
    p = _zeroed(LatencyPredictor({"a": (3, 2), "b": (2, 2)}, hidden=3, mean_ms=1.0,
                                 std_ms=2.0))
    w = torch.tensor([0.5, -1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
    with torch.no_grad():
        p.edge_linear.weight.copy_(w[None])
    x = {"a": _onehot([1, 0, 1], 2), "b": _onehot([0, 1], 2)}
    # flattened in group order, row by row: columns 1, 2, 5 (a) and 6, 9 (b)
    want = 1.0 + 2.0 * float(w[1] + w[2] + w[5] + w[6] + w[9])
    with torch.no_grad():
        assert float(p(x)) == pytest.approx(want)


def test_a_fresh_predictor_has_no_per_edge_corrections():
    """edge_linear starts at zero: only the shared costs and the MLP start the fit."""
    p = LatencyPredictor({"a": (3, 2)}, hidden=3)
    assert torch.count_nonzero(p.edge_linear.weight) == 0


def test_the_prediction_has_the_dtype_of_the_weights_given():
    """A float64 alpha gets a float64 latency, equal to the float32 computation."""
    p = LatencyPredictor({"a": (3, 2)}, hidden=3, mean_ms=2.0, std_ms=0.5)
    w64 = torch.softmax(torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64), -1)
    out = p({"a": w64})
    assert out.dtype == torch.float64 and out.shape == (4,)
    torch.testing.assert_close(out, p({"a": w64.float()}).double())


def test_weights_of_the_wrong_shape_are_refused_naming_the_cell_type():
    p = LatencyPredictor({"normal": (3, 2), "reduce": (2, 2)}, hidden=3)
    with pytest.raises(ValueError, match=r"predictor expects 'reduce' weights of shape "
                                         r"\(\.\.\., 2, 2\), got \(3, 2\)"):
        p({"normal": torch.zeros(3, 2), "reduce": torch.zeros(3, 2)})


@pytest.mark.parametrize(("ms", "outside"), [(2.0, False), (5.0, False), (3.0, False),
                                             (1.999, True), (5.001, True)])
def test_the_fitted_range_includes_its_bounds(ms, outside):
    p = LatencyPredictor({"a": (3, 2)}, hidden=3)
    p.meta = {"latency_ms_range": [2.0, 5.0]}
    with _Records() as said:
        got = p.outside_fitted_range(ms)
    assert got == ([2.0, 5.0] if outside else None)
    assert bool(said) == outside  # a warning exactly when it extrapolates


def test_check_space_refuses_another_number_of_edges_naming_both_shapes():
    small, big = tiny_space(), tiny_space(nodes=3)
    p = LatencyPredictor(space_shapes(small), hidden=3, ops=space_ops(small))
    p.check_space(small)
    with pytest.raises(ValueError, match=r"expects \(edges, ops\) per cell type .*'normal': "
                                         r"\(5, 8\).* space 'darts_cnn' has .*'normal': \(9, 8\)"):
        p.check_space(big)


# --- the predictor file ------------------------------------------------------------------

@pytest.mark.parametrize("text", ['[{"latency_ms": 1.0}]', '\n  {"records": 10}'],
                         ids=["array", "leading-space"])
def test_json_given_as_a_predictor_is_named_also_as_an_array_or_after_blanks(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"is a JSON file \(a fit report or a latency "
                                         r"dataset\), not a latency predictor"):
        LatencyPredictor.load(path)


@pytest.mark.parametrize("drop", [("hidden",), ("shapes", "state")])
def test_a_predictor_file_lacking_entries_names_each_missing_one(tmp_path, drop):
    p = LatencyPredictor({"a": (3, 2)}, hidden=3)
    blob = {"shapes": p.shapes, "hidden": 3, "meta": {}, "ops": None, "state": p.state_dict()}
    for k in drop:
        del blob[k]
    torch.save(blob, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=rf"is not a latency predictor \(no "
                                         rf"{', '.join(drop)}\); refit it"):
        LatencyPredictor.load(tmp_path / "p.pt")


def test_a_saved_predictor_without_op_names_is_not_given_the_default_ones(tmp_path):
    """Only files from before op names were stored (no ``ops`` entry at all) get
    NAS-Bench-201's default order guessed; a file that stored ``ops: None`` (a hand-built
    predictor) stays without names, even for nb201-shaped records."""
    p = LatencyPredictor({"cell": (6, 5)}, hidden=3)
    p.meta = {"settings": {"space": {"name": "nb201"}}, "note": [1, 2]}
    p.save(tmp_path / "p.pt")
    loaded = LatencyPredictor.load(tmp_path / "p.pt")
    assert loaded.ops is None
    assert loaded.meta == p.meta
    # the same file written before op names existed: the default order is assumed
    blob = torch.load(tmp_path / "p.pt", weights_only=False)
    del blob["ops"]
    torch.save(blob, tmp_path / "old.pt")
    with _Records() as said:
        assert LatencyPredictor.load(tmp_path / "old.pt").ops == {"cell": tuple(NB201_OPS)}
    assert any("does not record its op names" in m for m in said)


def test_an_old_nb201_file_of_another_shape_loads_without_op_names(tmp_path):
    """Measured on nb201 with the default ops, but 4 columns (not 5): no order is
    assumed, and the file still loads (checked by shape only)."""
    p = LatencyPredictor({"cell": (6, 4)}, hidden=3)
    torch.save({"shapes": p.shapes, "hidden": 3, "state": p.state_dict(),
                "meta": {"settings": {"space": {"name": "nb201"}}}}, tmp_path / "old.pt")
    assert LatencyPredictor.load(tmp_path / "old.pt").ops is None


# --- encoding records ---------------------------------------------------------------------

def test_encode_records_refuses_a_record_with_other_edges_naming_its_line():
    space = tiny_space()
    records = _synthetic_records(space, 3)
    x = encode_records(records, space)
    assert x["normal"].shape == (3, 5, 8) and x["reduce"].shape == (3, 5, 8)
    bad = json.loads(json.dumps(records))
    bad[1]["encoding"]["normal"] = bad[1]["encoding"]["normal"][:-1]  # an edge short
    with pytest.raises(ValueError, match=r"record 2 does not fit space 'darts_cnn' \(edges "
                                         r"per group \{'normal': 5, 'reduce': 5\}"):
        encode_records(bad, space)


def test_a_dropped_edge_of_a_space_without_none_is_a_row_of_zeros():
    space = tiny_space(ops=["skip_connect", "max_pool_3x3"])
    g = sample_genotype(space, torch.Generator().manual_seed(0))
    enc = encode_indices(g, space)
    w = one_hot(enc, space)
    for group, idx in enc.items():
        want = torch.zeros(len(idx), 2)
        for row, i in enumerate(idx):
            if i >= 0:
                want[row, i] = 1.0
        assert torch.equal(w[group], want)
        assert -1 in idx  # (darts cells drop edges: the rule is exercised)


def test_an_op_outside_the_space_is_named_with_its_edge():
    space = tiny_space(ops=["none", "skip_connect", "max_pool_3x3"])
    wide = tiny_space()
    g = sample_genotype(wide, torch.Generator().manual_seed(1))
    assert any(e.op not in ("none", "skip_connect", "max_pool_3x3")
               for c in g.cells for e in c.edges)
    with pytest.raises(ValueError, match=r"op '\w+' on edge \d->\d of '\w+' is not among the "
                                         r"space's ops \['none', 'skip_connect', 'max_pool_3x3'\]"):
        encode_indices(g, space)


# --- records read against a space -------------------------------------------------------

def _nb201_record(space_section):
    space = create_space({"name": "nb201", "C": 2, "N": 1}, TINY_SHAPE)
    g = sample_genotype(space, torch.Generator().manual_seed(0))
    settings = {} if space_section is None else {"space": space_section}
    return space, {"genotype": g.to_dict(), "encoding": encode_indices(g, space),
                   "settings": settings}


def test_a_space_section_without_a_name_means_darts_cnn_and_no_section_is_unchecked():
    darts = tiny_space()
    rec = _synthetic_records(darts, 1)[0]
    rec["settings"] = {"space": {"C": 4}}  # name left at its default
    assert record_op_mismatch(rec, darts) is None
    nb201, nb_rec = _nb201_record({"C": 2})
    assert record_op_mismatch(nb_rec, nb201) == ("it was measured on space 'darts_cnn', not "
                                                 "'nb201'")
    # records that store no space section (older files) are read by their indices alone
    nb201, nb_rec = _nb201_record(None)
    assert record_op_mismatch(nb_rec, nb201) is None


def test_a_record_that_cannot_be_read_against_the_space_says_why():
    space = tiny_space()
    rec = _synthetic_records(space, 1)[0]
    assert record_op_mismatch({k: v for k, v in rec.items() if k != "encoding"}, space) == \
        "it lacks its genotype or encoding"
    other = tiny_space(ops=["none", "skip_connect", "max_pool_3x3"])
    why = record_op_mismatch(rec, other)
    assert why is not None and why.startswith("its genotype does not fit the space (")


def test_settings_differences_see_a_setting_that_only_one_side_has():
    a = {"batch_size": 1, "network": {"C": 4}}
    b = {"batch_size": 1, "clock": "thread", "network": {"C": 4, "layers": 3}}
    want = {"clock": (None, "thread"), "network.layers": (None, 3)}
    assert settings_differences(a, b) == want
    assert settings_differences(b, a) == {k: (y, x) for k, (x, y) in want.items()}


def test_only_warmup_and_repeats_may_differ_between_comparable_records():
    base = {"batch_size": 1, "warmup": 3, "repeats": 15, "threads": 1, "clock": "wall",
            "calls_per_sample": 1}
    assert settings_differences(base, {**base, "warmup": 0, "repeats": 31}) == {}
    for k, v in (("threads", 2), ("calls_per_sample", 4), ("batch_size", 8),
                 ("clock", "thread")):
        assert settings_differences(base, {**base, k: v}) == {k: (base[k], v)}


def test_an_architecture_is_one_key_whatever_order_its_inputs_are_listed_in():
    space = tiny_space()
    g = sample_genotype(space, torch.Generator().manual_seed(0))
    d = g.to_dict()
    for cell in d["cells"].values():
        cell["edges"] = list(reversed(cell["edges"]))
    flipped = Genotype.from_dict(d)
    assert flipped.to_dict() != g.to_dict()  # listed otherwise...
    assert genotype_key(flipped) == genotype_key(g)  # ...the same network


# --- reading a latency file ---------------------------------------------------------------

def _write_lines(path, lines: list[str], end: str = "\n") -> None:
    path.write_text("\n".join(lines) + end)


def test_blank_lines_are_skipped_and_line_numbers_count_them(tmp_path):
    recs = [json.dumps(r) for r in _synthetic_records(tiny_space(), 2)]
    path = tmp_path / "lat.jsonl"
    _write_lines(path, [recs[0], "", "  ", recs[1]])
    assert [r["latency_ms"] for r in load_records(path)] == \
        [json.loads(s)["latency_ms"] for s in recs]
    _write_lines(path, [recs[0], "", "{oops", recs[1]])
    with pytest.raises(ValueError, match=r"lat.jsonl:3: not a JSON record"):
        load_records(path)


def test_a_bad_last_line_that_ends_in_a_newline_is_an_error_not_a_torn_record(tmp_path):
    """Only an unterminated last line is a write cut short; a whole bad line is not."""
    recs = [json.dumps(r) for r in _synthetic_records(tiny_space(), 2)]
    path = tmp_path / "lat.jsonl"
    _write_lines(path, [*recs, "{oops"])
    with pytest.raises(ValueError, match=r"lat.jsonl:3: not a JSON record"):
        load_records(path)
    _write_lines(path, [*recs, "{oops"], end="")
    with _Records() as said:
        assert len(load_records(path)) == 2
    assert any("lat.jsonl:3: dropping a torn last record" in m for m in said)


@pytest.mark.parametrize("field", ["genotype", "encoding", "latency_ms", "device", "settings"])
def test_a_record_lacking_a_field_is_refused_naming_it_and_its_line(tmp_path, field):
    recs = _synthetic_records(tiny_space(), 2)
    del recs[1][field]
    path = tmp_path / "lat.jsonl"
    _write_lines(path, [json.dumps(r) for r in recs])
    with pytest.raises(ValueError, match=rf"lat.jsonl:2: record lacks \['{field}'\]"):
        load_records(path)


@pytest.mark.parametrize("line, words", [
    ("null", "not a JSON record: null,"), ("5", "not a JSON record: a number,"),
    ("[{}]", "not a JSON record: an array,"), ('"x"', "not a JSON record: a string,"),
    ("true", "not a JSON record: a boolean,"),
    ("DEVICE_WITHOUT_ID", "the record's device has no fingerprint id"),
    ("DEVICE_NOT_OBJECT", "the record's device has no fingerprint id")])
def test_a_line_that_is_json_but_not_a_record_is_refused_naming_its_line(tmp_path, line,
                                                                        words):
    """A JSON value that is not a record object, or a record whose device has no id, is a
    malformed file like any other: a ValueError naming the file and line."""
    recs = _synthetic_records(tiny_space(), 2)
    if line == "DEVICE_WITHOUT_ID":
        line = json.dumps({**recs[1], "device": {"cpu": "x"}})
    elif line == "DEVICE_NOT_OBJECT":
        line = json.dumps({**recs[1], "device": "cpu"})
    path = tmp_path / "lat.jsonl"
    _write_lines(path, [json.dumps(recs[0]), line])
    with pytest.raises(ValueError, match=rf"lat\.jsonl:2: {words}"):
        load_records(path)


# --- building a dataset ---------------------------------------------------------------------

def test_each_new_record_holds_its_own_networks_costs_and_the_load_around_its_chunk(
        tmp_path, monkeypatch):
    """measure_many and the load average stubbed: params and MACs are those of the
    record's own network (not the anchor's), ``load`` is (before, after) its chunk, and
    progress reports the records so far out of the count."""
    space = tiny_space()
    loads = iter([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(dataset, "load_average", lambda: next(loads))

    def fake_measure(models, input_shape, settings, seed=0):
        return [LatencyStats(2.0 + i, 1.0, 9.0, [2.0 + i]) for i in range(len(models))]

    monkeypatch.setattr(dataset, "measure_many", fake_measure)
    progress: list[tuple[int, int]] = []
    new = build_dataset(space, tmp_path / "lat.jsonl", 3, (1, 8, 8), {},
                        LatencySettings(warmup=0, repeats=1), chunk=2,
                        progress=lambda n, c: progress.append((n, c)))
    assert progress == [(2, 3), (3, 3)]
    assert [r["load"] for r in new] == [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]
    macs = set()
    for r in new:
        net = space.build_network(Genotype.from_dict(r["genotype"]))
        assert r["params"] == count_parameters(net)
        assert r["macs"] == count_macs(net, (1, 8, 8))
        macs.add(r["macs"])
    assert len(macs) > 1  # the networks differ in cost (so the anchor's would show)


def test_build_dataset_refuses_max_misses_below_1(tmp_path):
    with pytest.raises(ValueError, match="max_misses must be >= 1, got 0"):
        build_dataset(tiny_space(), tmp_path / "lat.jsonl", 1, (1, 8, 8), max_misses=0)
    assert not (tmp_path / "lat.jsonl").exists()


def test_a_ratio_in_a_file_without_anchors_keeps_the_raw_median():
    """'records without an anchor keep their raw median': with no ``anchor_ms`` anywhere
    in the file, a ``ratio`` has no anchor latency to scale, so the raw median stands."""
    records = [{"ratio": 2.0, "latency_ms": 5.0}, {"latency_ms": 7.0}]
    assert anchored_latencies(records) == [5.0, 7.0]


def test_only_a_record_timed_beside_an_anchor_is_scaled_by_the_median_anchor():
    """A ratio is read against the median anchor only in a record that has an anchor of
    its own; the others (a merged file) keep their raw median."""
    records = [{"ratio": 2.0, "anchor_ms": 3.0, "latency_ms": 6.5},
               {"ratio": 0.5, "anchor_ms": 5.0, "latency_ms": 2.4},
               {"ratio": 4.0, "latency_ms": 9.0}, {"latency_ms": 7.0}]
    assert anchored_latencies(records) == [2.0 * 4.0, 0.5 * 4.0, 9.0, 7.0]


# --- fitting: option checks ---------------------------------------------------------------

@pytest.mark.parametrize(("kw", "message"), [
    ({"target": "Raw"}, "target must be 'anchored' or 'raw', got 'Raw'"),
    ({"holdout": 0.0}, r"holdout must be in \(0, 1\), got 0.0"),
    ({"holdout": 1.0}, r"holdout must be in \(0, 1\), got 1.0"),
    ({"weight_decay": -0.5}, "weight_decay must be a finite number >= 0, got -0.5"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0, got nan"),
    ({"lr": math.inf}, "lr must be a finite number > 0, got inf"),
    ({"edge_decay": math.inf}, "edge_decay must be a finite number >= 0, got inf"),
])
def test_fit_refuses_bad_options_naming_them(kw, message):
    space = tiny_space()
    with pytest.raises(ValueError, match=message):
        fit_predictor(_synthetic_records(space, 12), space, epochs=1, **kw)


def test_fit_needs_ten_records():
    space = tiny_space()
    records = _synthetic_records(space, 10)
    with pytest.raises(ValueError, match="need at least 10 latency records to fit, got 9"):
        fit_predictor(records[:9], space, epochs=1)
    assert fit_predictor(records, space, epochs=1)[1]["records"] == 10


# --- fitting: the split, the training, the report -----------------------------------------

def test_a_small_holdout_still_holds_out_one_architecture():
    records = _synthetic_records(tiny_space(), 12)
    train, test = split_by_architecture(records, 0.01, seed=0)  # round(0.12) = 0
    assert len(test) == 1 and len(train) == 11
    merged = records + [dict(records[0])]
    train, test = split_by_architecture(merged, 0.01, seed=0)
    assert len(test) in (1, 2) and len(train) + len(test) == 13


def test_merged_files_hold_out_the_architectures_a_permutation_of_first_appearances_picks():
    """The held-out architectures are ``perm[:n]`` of the distinct architectures in the
    order they first appear in the records (replayed by hand)."""
    records = _synthetic_records(tiny_space(), 10, seed=4)
    merged = [records[i] for i in (3, 0, 3, 7, 1, 2, 0, 4, 5, 6, 8, 9, 9)]
    keys = [genotype_key(Genotype.from_dict(r["genotype"])) for r in merged]
    order = []
    for k in keys:
        if k not in order:
            order.append(k)
    assert order != sorted(order)  # (the rule is exercised)
    for seed in range(3):
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))
        held = {order[i] for i in perm[:2].tolist()}  # round(0.2 * 10)
        train, test = split_by_architecture(merged, 0.2, seed)
        assert test.tolist() == [i for i, k in enumerate(keys) if k in held]
        assert train.tolist() == [i for i, k in enumerate(keys) if k not in held]


def _hand_fit(records, space, epochs, lr, weight_decay, edge_decay, mlp_decay, hidden, seed):
    """fit_predictor's training replayed: a seeded init, Adam with one decay per part, the
    lr on a cosine from lr to 0 over the epochs, mean squared relative error on the
    training records (raw target)."""
    x = encode_records(records, space)
    y = torch.tensor([float(r["latency_ms"]) for r in records])
    train, _ = split_by_architecture(records, 0.2, seed)
    yt = y[train]
    torch.manual_seed(seed)
    model = LatencyPredictor(space_shapes(space), hidden, yt.mean().item(), yt.std().item())
    groups = [(model.linear, weight_decay), (model.edge_linear, edge_decay),
              (model.mlp, mlp_decay)]
    opt = torch.optim.Adam([{"params": m.parameters(), "weight_decay": d}
                            for m, d in groups], lr=lr)
    xtr = {k: v[train] for k, v in x.items()}
    for t in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * t / epochs)) / 2
        opt.zero_grad()
        rel = (model(xtr) - yt) / yt
        (rel * rel).sum().div(len(yt)).backward()
        opt.step()
    with torch.no_grad():
        return model(x)


def test_fit_trains_as_replayed_by_hand():
    """Distinct decays per part and a large lr, so that swapping a decay, dropping the
    schedule or changing the loss shows in the predictions; the global RNG is disturbed
    first (the fit seeds its own init)."""
    space = tiny_space()
    records = _synthetic_records(space, 12)
    opts = {"epochs": 6, "lr": 0.05, "weight_decay": 0.0, "edge_decay": 3.0,
            "mlp_decay": 0.3, "hidden": 5, "seed": 2}
    want = _hand_fit(records, space, **opts)
    torch.manual_seed(99)
    model, _ = fit_predictor(records, space, target="raw", **opts)
    with torch.no_grad():
        got = model(encode_records(records, space))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _measured_records(space):
    """Synthetic records with quartiles, an anchor and a ratio differing from the raw
    median (so anchored and raw targets differ)."""
    out = []
    for i, r in enumerate(_synthetic_records(space, 14, seed=1)):
        lat = r["latency_ms"]
        anchor = 1.0 + 0.25 * (i % 5)
        out.append({**r, "q25_ms": lat * (1 - 0.01 * (i % 4)),
                    "q75_ms": lat * (1 + 0.03 * (i % 3)), "anchor_ms": anchor,
                    "ratio": lat / 2.0 * (1 + 0.05 * (i % 2))})
    return out


def test_the_fit_report_recomputed_independently():
    space = tiny_space()
    records = _measured_records(space)
    model, rep = fit_predictor(records, space, epochs=3, seed=1)
    train, test = (t.tolist() for t in split_by_architecture(records, 0.2, 1))
    with torch.no_grad():
        pred = model(encode_records(records, space)).double().tolist()
    anchors = [r["anchor_ms"] for r in records]
    ref = statistics.median(anchors)
    y = [r["ratio"] * ref for r in records]
    raw = [r["latency_ms"] for r in records]

    def mre(idx, target, p=pred):
        return statistics.fmean(abs(p[i] - target[i]) / target[i] for i in idx)

    assert (rep["records"], rep["train"], rep["heldout"]) == (14, len(train), len(test))
    assert rep["heldout_mre"] == pytest.approx(mre(test, y), rel=1e-5)
    assert rep["train_mre"] == pytest.approx(mre(train, y), rel=1e-5)
    assert rep["heldout_mre_vs_raw_median"] == pytest.approx(mre(test, raw), rel=1e-5)
    assert rep["heldout_mre_vs_raw_median"] != pytest.approx(rep["heldout_mre"], rel=1e-3)
    assert rep["heldout_max_rel_err"] == pytest.approx(
        max(abs(pred[i] - y[i]) / y[i] for i in test), rel=1e-5)
    mean_train = statistics.fmean(y[i] for i in train)
    assert rep["mean_baseline_heldout_mre"] == pytest.approx(
        mre(test, y, [mean_train] * len(y)), rel=1e-5)
    assert rep["heldout_kendall_tau"] == pytest.approx(
        _tau_a([pred[i] for i in test], [y[i] for i in test]))
    assert rep["median_relative_iqr"] == pytest.approx(statistics.median(
        (r["q75_ms"] - r["q25_ms"]) / r["latency_ms"] for r in records), rel=1e-5)
    assert rep["anchor_ms_median"] == pytest.approx(ref)
    assert ref != pytest.approx(statistics.fmean(anchors))  # (median, not mean: shows)
    # one record without an anchor: no file-wide anchor median is reported
    records[5] = {k: v for k, v in records[5].items() if k not in ("anchor_ms", "ratio")}
    assert fit_predictor(records, space, epochs=1, seed=1)[1]["anchor_ms_median"] is None


def test_metric_helpers_divide_by_the_measured_latency_and_tau_of_one_is_zero():
    pred, target = torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])
    assert mean_relative_error(pred, target) == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert kendall_tau(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0


# --- measuring ---------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "message"), [
    ({"batch_size": 0}, "latency batch_size must be >= 1, got 0"),
    ({"repeats": 0}, "latency repeats must be >= 1, got 0"),
    ({"calls_per_sample": 0}, "latency calls_per_sample must be >= 1, got 0"),
    ({"warmup": -1}, "latency warmup and threads must be >= 0"),
    ({"threads": -1}, "latency warmup and threads must be >= 0"),
    ({"clock": "cpu"}, r"latency clock must be one of \['thread', 'wall'\], got 'cpu'"),
    ({"clock": "thread", "threads": 0}, "clock='thread' times one thread: it needs threads=1"),
    ({"clock": "thread", "threads": 2}, "clock='thread' times one thread: it needs threads=1"),
])
def test_latency_settings_refuse_what_would_measure_nothing_or_wrongly(kw, message):
    with pytest.raises(ValueError, match=message):
        LatencySettings(**kw)


def test_one_sample_is_its_own_median_and_quartiles():
    st = LatencyStats.from_samples([0.003])
    assert (st.q25_ms, st.median_ms, st.q75_ms) == pytest.approx((3.0, 3.0, 3.0))
    assert st.samples_ms == pytest.approx([3.0])


def test_time_call_synchronises_before_starting_and_before_stopping_the_clock():
    events: list[str] = []
    ticks = iter([10.0, 16.0])

    def clock():
        events.append("clock")
        return next(ticks)

    per_call = time_call(lambda: events.append("call"), lambda: events.append("sync"),
                         calls=3, clock=clock)
    assert events == ["sync", "clock", "call", "call", "call", "sync", "clock"]
    assert per_call == pytest.approx(2.0)


def test_cuda_synchronizer_waits_on_its_own_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append(d))
    synchronizer(torch.device("cuda", 1))()
    assert seen == [torch.device("cuda", 1)]
    synchronizer(torch.device("cpu"))()
    assert len(seen) == 1


class _Seen(nn.Module):
    """Records what each forward call sees: input shape and dtype, threads, modes."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), x.dtype, torch.get_num_threads(),
                          torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.lin(x)


def test_each_call_gets_a_batch_of_the_set_size_in_the_models_dtype_in_inference_mode():
    m = _Seen(torch.float64)
    measure_latency(m, (3,), LatencySettings(batch_size=4, warmup=1, repeats=2))
    assert m.seen == [((4, 3), torch.float64, 1, True, False)] * 3


@pytest.mark.parametrize(("threads", "inside"), [(1, 1), (0, 2)])
def test_threads_are_set_for_the_measurement_and_restored(threads, inside):
    """With 2 threads set outside: ``threads=1`` times on one and gives the 2 back;
    ``threads=0`` leaves the 2 as they are."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        m = _Seen()
        measure_latency(m, (3,), LatencySettings(warmup=0, repeats=2, threads=threads))
        assert {s[2] for s in m.seen} == {inside}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_warmup_calls_are_synchronised_but_not_timed(monkeypatch):
    """On a device that queues work, a warm-up call must also be waited for (or its
    kernels run into the first timed sample)."""
    log: list[str] = []
    monkeypatch.setattr(latency, "synchronizer", lambda dev: lambda: log.append("sync"))

    class Calls(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 1)

        def forward(self, x):
            log.append("call")
            return x

    st = measure_many([Calls()], (1,), LatencySettings(warmup=2, repeats=3))[0]
    assert log == ["sync", "call", "sync"] * 5
    assert len(st.samples_ms) == 3


def test_the_device_id_hashes_every_other_field_of_the_fingerprint():
    fp = device_fingerprint("cpu", 3)
    rest = {k: v for k, v in fp.items() if k != "id"}
    assert fp["id"] == hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:12]
    assert set(rest) == {"device", "cpu", "cpu_count", "machine", "torch", "threads",
                         "accelerator"}
    assert rest["threads"] == 3 and rest["accelerator"] is None


def test_a_cuda_fingerprint_names_the_card_and_no_thread_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    fp = device_fingerprint("cuda", 4)
    assert fp["device"] == "cuda" and fp["accelerator"] == "Fake GPU"
    assert fp["threads"] is None
    assert fp["id"] != device_fingerprint("cpu", 4)["id"]
