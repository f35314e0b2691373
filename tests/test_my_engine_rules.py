"""Rules of the guide's worked engine (docs/examples/plugins/my_engine.py, tabular
classification) that its end-to-end tests in test_extending_docs.py cannot see, each
replayed by hand rather than compared with numbers the code once printed.

The tables: a fixed 60/20/20 split of scikit-learn's rows (every row once, each with its
own label), standardised by the training rows' mean and std; the search supernet's
mixture replayed in float64 edge by edge (edge order as the space lists its edges, node
0 the stem's relu, the output the mean of the intermediate nodes); the retraining network
following its genotype; the space's one input per node; the search task's batches (the
validation rows only for strategies that take them, RLNAS's relabelled training rows); the
space's refusals; the retraining testing the weights of its best validation epoch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_extending_docs import ENGINE, TABULAR

from diffnas.config import ConfigError, load_config
from diffnas.genotype import Genotype
from diffnas.genotype.discretize import discretize
from diffnas.genotype.genotype import CellGenotype, Edge

F64 = torch.float64


@pytest.fixture(scope="module")
def eng():
    from diffnas.plugins import import_plugins

    (module,) = import_plugins([str(ENGINE)])
    return module


def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets

    d = getattr(sklearn.datasets, f"load_{name}")()
    return d.data.astype(np.float64), d.target


# --- the tables --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_a_table_is_every_row_once_split_60_20_20_and_standardised_by_its_training_rows(
        eng, name):
    x, y = _raw(name)
    n = len(y)
    torch.manual_seed(123)  # the split is fixed: not drawn from the global generator
    t = eng.load_table(name)
    torch.manual_seed(7)
    assert torch.equal(eng.load_table(name).x_val, t.x_val)
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (
        int(0.6 * n), int(0.2 * n), n - int(0.6 * n) - int(0.2 * n))
    assert t.num_classes == len(np.unique(y)) and t.num_features == x.shape[1]
    # map every split's rows back to the raw rows they came from: the training rows' own
    # mean and std standardise them, so undo that with the raw rows' statistics...
    train = t.x_train.double().numpy()
    assert np.allclose(train.mean(0), 0, atol=1e-5)
    assert np.allclose(train.std(0, ddof=1), 1, atol=1e-4)
    z = np.concatenate([t.batch(s)[0].double().numpy() for s in ("train", "val", "test")])
    labels = np.concatenate([t.batch(s)[1].numpy() for s in ("train", "val", "test")])
    # ...found from the whole table: z = (x - m) / s row for row, so per feature
    # s = std(x) / std(z) and m = mean(x) - s * mean(z)
    s = x.std(0) / z.std(0)
    m = x.mean(0) - s * z.mean(0)
    back = z * s + m
    scale = x.std(0)
    dist = np.abs((back[:, None, :] - x[None, :, :]) / scale).max(-1)  # n x n
    match = dist.argmin(1)
    assert dist.min(1).max() < 1e-4
    assert sorted(match.tolist()) == list(range(n))  # every raw row exactly once
    assert np.array_equal(labels, y[match])  # with its own label
    # the statistics used are the training rows' (not the whole table's)
    rows = x[match[:len(train)]]
    assert np.allclose(m, rows.mean(0), rtol=1e-5, atol=1e-6 * np.abs(x).max())
    assert np.allclose(s, rows.std(0, ddof=1), rtol=1e-4)


def test_an_unknown_table_is_refused_naming_the_tables(eng):
    with pytest.raises(ConfigError, match=r"'iris' is not a table; one of breast_cancer, wine"):
        eng.load_table("iris")


# --- the search supernet, replayed in float64 ---------------------------------------------
def _op_by_hand(name: str, op: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    if name == "none":
        return torch.zeros_like(h)
    if name == "skip_connect":
        return h
    lin = F.linear(h, op[0].weight, op[0].bias)
    return {"linear": lin, "linear_relu": lin.clamp_min(0),
            "linear_tanh": torch.tanh(lin)}[name]


@pytest.mark.parametrize("nodes,ops", [
    (3, ["none", "skip_connect", "linear", "linear_relu", "linear_tanh"]),
    (2, ["linear_tanh", "skip_connect"]),
])
def test_the_supernet_is_the_softmax_weighted_op_sum_on_each_edge_in_the_space_s_order(
        eng, nodes, ops):
    torch.manual_seed(0)
    cfg = eng.MlpCellConfig(hidden=4, nodes=nodes, ops=list(ops))
    net = eng._SuperNet(5, 3, cfg).to(F64)
    for p in net.parameters():  # nonzero biases everywhere
        torch.nn.init.normal_(p)
    edges = eng.MlpCellSpace.edges(type("S", (), {"config": cfg})())
    w = torch.softmax(torch.randn(len(edges), len(ops), dtype=F64), -1)
    x = torch.randn(6, 5, dtype=F64)
    states = [F.linear(x, net.stem.weight, net.stem.bias).clamp_min(0)]
    for dst in range(1, nodes + 1):
        total = torch.zeros_like(states[0])
        for src in range(dst):
            (i,) = [i for i, e in enumerate(edges) if (e.src, e.dst) == (src, dst)]
            assert edges[i].candidates == tuple(ops)
            for k, name in enumerate(ops):
                total = total + w[i, k] * _op_by_hand(name, net.edges[i][k], states[src])
        states.append(total.clamp_min(0))
    out = F.linear(torch.stack(states[1:]).mean(0), net.classifier.weight, net.classifier.bias)
    assert torch.allclose(net(x, {eng.CELL: w}), out, atol=1e-12)
    assert len(edges) == nodes * (nodes + 1) // 2


def test_the_retraining_network_follows_its_genotype_and_averages_its_concat(eng):
    torch.manual_seed(1)
    cell = CellGenotype(eng.CELL, (Edge("linear_relu", 0, 1), Edge("skip_connect", 0, 2),
                                   Edge("linear_tanh", 1, 3), Edge("linear", 2, 3)),
                        (2, 3))
    net = eng._Network(5, 2, 4, cell).to(F64)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(6, 5, dtype=F64)
    s0 = F.linear(x, net.stem.weight, net.stem.bias).clamp_min(0)
    s1 = _op_by_hand("linear_relu", net.edges[0], s0).clamp_min(0)
    s2 = s0  # relu(skip(s0)) of a relu'd state
    s3 = (_op_by_hand("linear_tanh", net.edges[2], s1)
          + _op_by_hand("linear", net.edges[3], s2)).clamp_min(0)
    out = F.linear((s2 + s3) / 2, net.classifier.weight, net.classifier.bias)
    assert torch.allclose(net(x), out, atol=1e-12)


def test_the_space_keeps_one_input_per_node_its_strongest_non_none_edge(eng):
    from diffnas.spaces import DataShape, create_space

    space = create_space({"name": "mlp_cell", "nodes": 3},
                         DataShape(in_channels=4, resolution=1, num_classes=2))
    ops = list(space.config.ops)
    logits = torch.zeros(6, len(ops))
    big = {(0, 1): ("linear", 2.0), (0, 2): ("linear_tanh", 1.0), (1, 2): ("skip_connect", 3.0),
           (0, 3): ("linear_relu", 1.5), (1, 3): ("none", 9.0), (2, 3): ("linear", 1.0)}
    for i, e in enumerate(space.edges()):
        op, value = big[(e.src, e.dst)]
        logits[i, ops.index(op)] = value
    genotype = discretize({eng.CELL: logits}, space)
    edges = {(e.dst, e.src, e.op) for e in genotype.cell(eng.CELL).edges}
    # node 3: the edge from 1 is strongest only through 'none', so 0's linear_relu wins
    assert edges == {(1, 0, "linear"), (2, 1, "skip_connect"), (3, 0, "linear_relu")}
    assert genotype.cell(eng.CELL).concat == (1, 2, 3)


@pytest.mark.parametrize("override,words", [
    ("search.space={name: mlp_cell, ops: [linear, conv_3x3]}", "unknown vector op(s) ['conv_3x3']"),
    ("search.space={name: mlp_cell, ops: [none]}", "needs an op besides 'none'"),
    ("search.space={name: mlp_cell, ops: [linear, linear]}", "search.space.ops"),
    ("search.space={name: mlp_cell, hidden: 0}", "search.space.hidden"),
    ("search.space={name: mlp_cell, nodes: 0}", "search.space.nodes"),
])
def test_the_space_refuses_bad_settings_naming_them(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*TABULAR, override])
    assert words in str(err.value)


def test_a_space_at_its_smallest_settings_is_accepted(eng):
    cfg = load_config(None, [*TABULAR, "search.space={name: mlp_cell, hidden: 1, nodes: 1, "
                                       "ops: [none, linear]}"])
    assert cfg.search.space["nodes"] == 1 and cfg.search.space["hidden"] == 1


# --- the search task's batches --------------------------------------------------------------
@pytest.mark.parametrize("strategy,validation,relabelled", [
    ("darts", True, False), ("single_level", False, False), ("random_labels", False, True)])
def test_the_search_task_steps_on_the_training_rows_and_the_validation_rows_when_used(
        eng, strategy, validation, relabelled):
    cfg = load_config(None, [*TABULAR, f"search.strategy={{name: {strategy}}}"])
    table = eng.load_table("breast_cancer")
    task = eng.TableSearchTask(cfg, table, torch.device("cpu"))
    (batch,) = list(task.batches(0))
    (x, y), val = batch
    assert x is table.x_train and task.num_batches() == 1
    assert torch.equal(y, table.y_train) != relabelled
    assert y.shape == table.y_train.shape
    if validation:
        assert val[0] is table.x_val and val[1] is table.y_val
    else:
        assert val is None


# --- the retraining tests its best validation epoch -------------------------------------------
def test_the_retraining_tests_the_weights_of_its_best_validation_epoch(eng, tmp_path):
    cfg = load_config(None, [*TABULAR, "retrain.epochs=6", "retrain.lr=0.05"])
    genotype = Genotype("mlp_cell", (CellGenotype(eng.CELL, (
        Edge("linear_relu", 0, 1), Edge("linear_tanh", 1, 2), Edge("skip_connect", 0, 3)),
        (1, 2, 3)),))
    result = eng.run_table_retrain(cfg, genotype, tmp_path)
    history = result["history"]
    assert len(history) == 6 == result["epochs_done"]
    # highest validation accuracy, the lower loss breaking a tie, the earlier epoch first
    best = min(range(6), key=lambda i: (-history[i]["val_acc"], history[i]["val_loss"], i))
    assert result["best_epoch"] == best
    assert result["valid_acc"] == history[best]["val_acc"]
    # the saved model is that epoch's, and the test figures are its figures on the test rows
    table = eng.load_table("breast_cancer")
    model = eng._space(cfg, table).build_network(genotype)
    model.load_state_dict(torch.load(tmp_path / "retrain" / "model.pt", weights_only=True))
    stats = eng._evaluate(model, table.batch("test"))
    assert stats["acc"] == pytest.approx(result["test_acc"], abs=1e-12)
    assert stats["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert eng._evaluate(model, table.batch("val"))["acc"] == pytest.approx(
        history[best]["val_acc"], abs=1e-12)
    saved = json.loads((tmp_path / "retrain" / "result.json").read_text())
    assert saved["best_epoch"] == best and saved["params"] == sum(
        p.numel() for p in model.parameters())
