"""The graph domain: Cora loader, graph ops, the gnn space, its engine and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.cli import main
from diffnas.config import ConfigError, load_config
from diffnas.data.base import DatasetNotFoundError
from diffnas.data.graph import CORA_FILES, load_graph
from diffnas.engine.graph import (
    GraphSplits,
    build_graph_search,
    run_graph_retrain,
    run_graph_search,
)
from diffnas.genotype import CellGenotype, Edge, Genotype, GenotypeError
from diffnas.genotype.discretize import discretize
from diffnas.ops.graph import GRAPH_OPS, Graph, create_graph_op
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.gnn import chain_genotype
from diffnas.supernet.gnn import CELL, GraphInput

CORA = Path(__file__).resolve().parents[2] / "shared/data/cora"
CONFIG = Path(__file__).resolve().parents[1] / "configs/gnn_cora.yaml"
needs_cora = pytest.mark.skipif(not (CORA / "ind.cora.graph").is_file(),
                                reason=f"Cora files not in {CORA}")
KARATE = ["data.name=karate", "search.space.hidden=8", "progress=false"]


def karate_graph() -> tuple[torch.Tensor, Graph]:
    d = load_graph("karate")
    return d.edge_index, Graph(d.edge_index, d.num_nodes)


def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(CONFIG, [*KARATE, "search.epochs=4", "retrain.epochs=4",
                                f"out_dir={tmp_path}", *overrides])


# --- ops -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAPH_OPS.names())
def test_op_shape_backward_finite(name):
    torch.manual_seed(0)
    _, g = karate_graph()
    op = create_graph_op(name, 8).double()
    x = torch.randn(34, 8, dtype=torch.float64, requires_grad=True)
    y = op(x, g)
    assert y.shape == (34, 8) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    if name != "none":
        assert x.grad.abs().sum() > 0
    for p in op.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", [n for n in GRAPH_OPS.names() if n != "none"])
def test_op_is_permutation_equivariant(name):
    torch.manual_seed(0)
    edge_index, g = karate_graph()
    op = create_graph_op(name, 8).double()
    x = torch.randn(34, 8, dtype=torch.float64)
    perm = torch.randperm(34)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(34)
    g_perm = Graph(inv[edge_index], 34)  # node i of the new graph is node perm[i]
    torch.testing.assert_close(op(x[perm], g_perm), op(x, g)[perm])


PROPAGATING = ("gcn", "sage", "gat", "gin")


@pytest.mark.parametrize("name", PROPAGATING)
def test_propagation_follows_the_edges(name):
    torch.manual_seed(0)
    # path 0 - 1 - 2 and an isolated node 3 (self loops on all)
    src = torch.tensor([0, 1, 1, 2, 0, 1, 2, 3])
    dst = torch.tensor([1, 0, 2, 1, 0, 1, 2, 3])
    g = Graph(torch.stack([src, dst]), 4)
    op = create_graph_op(name, 8).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0] += torch.randn(8, dtype=torch.float64)  # change node 0 only
    y, y2 = op(x, g), op(x2, g)
    assert not torch.allclose(y[1], y2[1])  # its neighbour sees the change
    torch.testing.assert_close(y[2:], y2[2:])  # two hops away and isolated: unchanged
    if name == "gcn":  # the symmetric normalisation, by hand
        a = torch.zeros(4, 4, dtype=torch.float64)
        a[dst, src] = 1.0
        d = a.sum(1).rsqrt()
        ref = op.lin((d[:, None] * a * d[None, :]) @ x)
        torch.testing.assert_close(y, ref)


def test_gat_attention_sums_to_one_per_target():
    torch.manual_seed(0)
    _, g = karate_graph()
    op = create_graph_op("gat", 8).double()
    x = torch.randn(34, 8, dtype=torch.float64)
    # with W = identity and zero bias each head returns a convex mix of neighbour states;
    # a constant input must come back unchanged
    with torch.no_grad():
        op.lin.weight.copy_(torch.eye(8))
        op.bias.zero_()
    const = torch.ones(34, 8, dtype=torch.float64)
    torch.testing.assert_close(op(const, g), const)
    assert torch.isfinite(op(x * 1e3, g)).all()  # large logits: the max shift keeps it finite


# --- data ----------------------------------------------------------------------------------
@needs_cora
def test_cora_loader_counts_split_and_symmetric_adjacency():
    d = load_graph("cora", str(CORA))
    assert (d.num_nodes, d.num_features, d.num_classes) == (2708, 1433, 7)
    assert (len(d.train_idx), len(d.val_idx), len(d.test_idx)) == (140, 500, 1000)
    assert d.train_idx.tolist() == list(range(140))
    assert d.val_idx.tolist() == list(range(140, 640))
    assert int(d.test_idx.min()) == 1708 and int(d.test_idx.max()) == 2707
    assert d.y.bincount().tolist() == [351, 217, 418, 818, 426, 298, 180]
    src, dst = d.edge_index
    assert d.edge_index.shape[1] == 10556 + 2708  # undirected edges both ways + self loops
    assert int((src == dst).sum()) == 2708
    a = d.adjacency().to_dense()
    assert torch.equal(a, a.t()) and a.max() == 1
    torch.testing.assert_close(d.x.sum(1), torch.ones(2708))  # row-normalised


def test_cora_without_root_says_where_to_get_it():
    with pytest.raises(DatasetNotFoundError, match="data.root.*planetoid"):
        load_graph("cora", None)


def test_cora_missing_file_is_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"ind\.cora\.x\b"):
        load_graph("cora", str(tmp_path))


@needs_cora
def test_cora_malformed_file_is_named(tmp_path):
    for n in CORA_FILES:
        shutil.copy(CORA / f"ind.cora.{n}", tmp_path)
    (tmp_path / "ind.cora.graph").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"ind\.cora\.graph"):
        load_graph("cora", str(tmp_path))


def test_config_checks_the_dataset_kind():
    with pytest.raises(ConfigError, match="not a graph dataset"):
        load_config(CONFIG, ["data.name=fashion_mnist"])
    with pytest.raises(ConfigError, match="search.space.name=gnn"):
        load_config(None, ["data.name=cora"])
    with pytest.raises(ValueError, match="unknown graph op"):
        load_config(CONFIG, ["search.space.ops=[none, conv]"])


# --- space, discretization, networks -------------------------------------------------------
def space(**kw):
    return create_space({"name": "gnn", "hidden": 8, "nodes": 3, **kw},
                        DataShape(in_channels=34, resolution=1, num_classes=2))


def test_discretize_hand_made_alphas():
    s = space()
    arch = ArchParams(s)
    ops = list(s.config.ops)
    logits = torch.zeros_like(arch[CELL])
    rows = {(e.src, e.dst): i for i, e in enumerate(arch.edges[CELL])}

    def put(src, dst, op, v):
        logits[rows[(src, dst)], ops.index(op)] = v

    put(0, 1, "gcn", 2.0)
    put(0, 2, "none", 9.0)  # none never wins
    put(0, 2, "sage", 1.0)
    put(1, 2, "gat", 1.5)  # node 2: the strongest non-none edge is 1 -> 2 (gat)
    put(0, 3, "gin", 1.0)
    put(1, 3, "linear", 1.0)  # a tie with 0 -> 3: the lower source wins
    put(2, 3, "skip_connect", 0.5)
    g = discretize({CELL: logits}, s)
    assert g.cell(CELL).edges == (Edge("gcn", 0, 1), Edge("gat", 1, 2), Edge("gin", 0, 3))
    assert g.cell(CELL).concat == (1, 2, 3)
    s.validate(g)
    assert Genotype.from_json(g.to_json()) == g


def test_validate_wants_one_input_per_node():
    s = space(nodes=2)
    s.validate(chain_genotype(["gcn", "gcn"]))
    two = Genotype("gnn", (CellGenotype(CELL, (Edge("gcn", 0, 1), Edge("gcn", 0, 2),
                                                Edge("sage", 1, 2)), (2,)),))
    with pytest.raises(GenotypeError, match="node 2 has 2 inputs"):
        s.validate(two)


def test_supernet_with_one_hot_weights_is_the_fixed_network():
    torch.manual_seed(0)
    s = space(nodes=2)
    sup = s.build_supernet().double().eval()
    g = Genotype("gnn", (CellGenotype(CELL, (Edge("gcn", 0, 1), Edge("gat", 1, 2)),
                                      (1, 2)),))
    net = s.build_network(g).double().eval()
    ops = list(s.config.ops)
    w = torch.zeros(3, len(ops), dtype=torch.float64)  # edges 0->1, 0->2, 1->2
    w[0, ops.index("gcn")] = 1.0
    w[1, ops.index("none")] = 1.0
    w[2, ops.index("gat")] = 1.0
    with torch.no_grad():  # the fixed network takes the supernet's weights of those ops
        net.stem.load_state_dict(sup.stem.state_dict())
        net.classifier.load_state_dict(sup.classifier.state_dict())
        net.cells[0].ops[0].load_state_dict(sup.cells[0].edges[0].ops[ops.index("gcn")]
                                            .state_dict())
        net.cells[0].ops[1].load_state_dict(sup.cells[0].edges[2].ops[ops.index("gat")]
                                            .state_dict())
    d = load_graph("karate")
    splits = GraphSplits(d)
    inp = GraphInput(d.x.double(), splits.graph, x_support=splits.x_support)
    torch.testing.assert_close(sup(inp, ArchWeights({CELL: w})), net(inp))
    # the sparse stem path equals the dense one
    torch.testing.assert_close(net(GraphInput(d.x.double(), splits.graph)), net(inp))


# --- engine --------------------------------------------------------------------------------
@pytest.mark.parametrize("section", ["name=darts", "order=2", "name=gdas"])
def test_search_step_moves_alphas(tmp_path, section):
    key, value = section.split("=")
    cfg = tiny_cfg(tmp_path, f"search.strategy.{key}={value}")
    task = build_graph_search(cfg, load_graph("karate"))
    before = task.strategy.arch_params[CELL].detach().clone()
    w_before = task.supernet.stem.weight.detach().clone()
    stats = task.step(next(iter(task.batches(0))))
    assert {"loss", "acc", "val_loss"} <= set(stats)
    assert not torch.equal(task.strategy.arch_params[CELL], before)
    assert not torch.equal(task.supernet.stem.weight, w_before)
    assert all(torch.isfinite(p).all() for p in task.supernet.parameters())


def test_snas_searches_graphs_and_its_cnn_cost_term_is_refused_by_name(tmp_path):
    cfg = tiny_cfg(tmp_path, "search.strategy={name: snas}")
    task = build_graph_search(cfg, load_graph("karate"))
    before = task.strategy.arch_params[CELL].detach().clone()
    task.step(next(iter(task.batches(0))))
    assert not torch.equal(task.strategy.arch_params[CELL], before)
    with pytest.raises(ValueError, match="snas cost_weight counts the parameters of conv"):
        tiny_cfg(tmp_path / "c", "search.strategy={name: snas, cost_weight: 0.5}")  # at load
    cfg.search.strategy["cost_weight"] = 0.5  # past the config check: the strategy refuses it
    with pytest.raises(ValueError, match="snas cost_weight counts the parameters of conv"):
        build_graph_search(cfg, load_graph("karate"))


def test_search_and_retrain_resume_equal_an_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(tmp_path)
    data = load_graph("karate")
    full = run_graph_search(cfg, tmp_path / "a", data=data)
    run_graph_search(cfg, tmp_path / "b", stop_after=2, data=data)
    assert not (tmp_path / "b/search/DONE").exists()
    resumed = run_graph_search(cfg, tmp_path / "b", resume=True, data=data)
    assert (tmp_path / "b/search/DONE").exists()
    sa, sb = full.task.strategy.state_dict(), resumed.task.strategy.state_dict()
    for k in sa["supernet"]:
        assert torch.equal(sa["supernet"][k], sb["supernet"][k]), k
    assert torch.equal(sa["arch_params"]["logits.cell"], sb["arch_params"]["logits.cell"])
    assert full.history == resumed.history
    g = full.genotype
    ra = run_graph_retrain(cfg, g, tmp_path / "a", data=data)
    run_graph_retrain(cfg, g, tmp_path / "b", stop_after=3, data=data)
    rb = run_graph_retrain(cfg, g, tmp_path / "b", resume=True, data=data)
    assert ra == rb
    lines = (tmp_path / "b/retrain/metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1, 2, 3]


def test_cli_search_writes_the_run_dir(tmp_path, capsys):
    rc = main(["search", "--config", str(CONFIG), *KARATE, "search.epochs=3",
               "retrain.epochs=5", f"out_dir={tmp_path}", "name=run"])
    assert rc == 0
    run = tmp_path / "run"
    for f in ("config.yaml", "log.txt", "search/metrics.jsonl", "search/alphas.jsonl",
              "search/genotypes.jsonl", "search/checkpoint.pt", "search/genotype.json",
              "search/DONE", "retrain/metrics.jsonl", "retrain/checkpoint.pt",
              "retrain/model.pt", "retrain/genotype.json", "retrain/result.json"):
        assert (run / f).is_file(), f
    result = json.loads((run / "retrain/result.json").read_text())
    assert 0.0 <= result["test_acc"] <= 1.0 and result["epochs_done"] == 5
    g = Genotype.load(run / "search/genotype.json")
    assert g.space == "gnn" and len(g.cell(CELL).edges) == 3
    assert "test accuracy" in capsys.readouterr().out
    # a genotype retrained on its own, and its dry run
    (tmp_path / "gcn.json").write_text(chain_genotype(["gcn", "gcn"], 3).to_json())
    assert main(["train", "--config", str(CONFIG), "--genotype", str(tmp_path / "gcn.json"),
                 "--dry-run", *KARATE]) == 0
    assert '"params"' in capsys.readouterr().out
    assert main(["train", "--config", str(CONFIG), "--genotype", str(tmp_path / "gcn.json"),
                 *KARATE, "retrain.epochs=3", f"out_dir={tmp_path}", "name=train"]) == 0
    assert (tmp_path / "train/retrain/result.json").is_file()


def test_edge_lists_the_ops_cannot_use_are_refused():
    """gcn's D^-1/2 (A+I) D^-1/2 and gat's self-attention need one self loop per node and
    each edge once: a PyG-style list without loops, or with a repeat, is an error."""
    from diffnas.ops.graph import Graph

    ring = torch.tensor([[0, 1, 1, 2, 2, 0], [1, 0, 2, 1, 0, 2]])
    loops = torch.arange(3).repeat(2, 1)
    Graph(torch.cat([ring, loops], 1), 3)
    with pytest.raises(ValueError, match="0 self loops for 3 nodes"):
        Graph(ring, 3)
    with pytest.raises(ValueError, match="1 repeated edges"):
        Graph(torch.cat([ring, loops, ring[:, :1]], 1), 3)
    with pytest.raises(ValueError, match=r"names nodes outside 0..1"):
        Graph(torch.tensor([[0, 1, 0, 1, 0], [3, 0, 0, 1, 2]]), 2)


def test_repeated_gnn_ops_are_refused():
    with pytest.raises(ConfigError, match=r"search\.space\.ops must be without repeats"):
        load_config(str(CONFIG), ["search.space.ops=[gcn, gcn, none]"])


@pytest.mark.skipif(not CORA.is_dir(), reason="needs ../shared/data/cora")
def test_a_test_index_naming_a_node_twice_is_refused(tmp_path):
    """The test rows are put back at their node ids: a repeated id (and so a missing one)
    would scramble features and labels silently."""
    from diffnas.data.graph import load_graph

    for f in CORA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    ids = (tmp_path / "ind.cora.test.index").read_text().split()
    (tmp_path / "ind.cora.test.index").write_text("\n".join([ids[0], *ids[:-1]]) + "\n")
    with pytest.raises(ValueError, match="must name each of the nodes 1708..2707 once"):
        load_graph("cora", str(tmp_path))


def test_a_space_of_your_own_runs_on_the_engine_of_the_class_it_extends(tmp_path):
    """The engine is the space class's (``SearchSpace.engine``), not a built-in name: a
    plugin space subclassing gnn's runs the graph search and retraining."""
    from diffnas.spaces import SPACES, space_engine
    from diffnas.spaces.gnn import GnnSpace

    class MyGraphSpace(GnnSpace):
        pass

    SPACES.register("my_gnn")(MyGraphSpace)
    MyGraphSpace.name = "my_gnn"
    try:
        assert space_engine({"name": "my_gnn"}) == "graph"
        rc = main(["search", "--config", str(CONFIG), *KARATE, "search.space.name=my_gnn",
                   "search.epochs=1", "retrain.epochs=1", f"out_dir={tmp_path}", "name=run"])
        assert rc == 0
        result = json.loads((tmp_path / "run/retrain/result.json").read_text())
        assert 0.0 <= result["test_acc"] <= 1.0
    finally:
        SPACES._items.pop("my_gnn")


# (the epoch ends with no step taken: torch warns that the schedule stepped first)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_the_end_of_epoch_evaluation_draws_nothing_from_the_search_s_generator(tmp_path):
    """GDAS samples the architecture it evaluates with: from a forked generator, so what a
    search measures changes nothing it does next (engine/search.StrategyTask)."""
    task = build_graph_search(tiny_cfg(tmp_path, "search.strategy.name=gdas"),
                              load_graph("karate"))
    state = torch.get_rng_state()
    task.end_epoch(0)
    assert torch.equal(torch.get_rng_state(), state)
    task.strategy.arch_weights()  # (a plain draw does move it)
    assert not torch.equal(torch.get_rng_state(), state)
