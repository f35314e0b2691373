"""Rules of the search spaces and the graph domain that a mutation audit could break:
graph ops replayed by hand in float64 on tiny graphs (GCN's in-degree normalisation,
GraphSAGE's neighbour mean, GAT's per-target softmax, GIN's ``1 + eps``), the gnn
networks' dropout, standardised stem and cell sums replayed with masks drawn by hand,
the graph data helpers (edge order, row sums), and per space the edge
lists, genotype validation, the config refusals at their exact boundaries, and the
retrain network's overrides (cells, channels, reductions) counted independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SHAPE, tiny_space

from diffnas.arch import ArchWeights
from diffnas.config import MAX_CELL_EDGES
from diffnas.data.graph import load_graph, row_normalize, symmetric_edges
from diffnas.genotype import CellGenotype, Edge, Genotype, GenotypeError, published_genotype
from diffnas.ops.graph import Graph, create_graph_op
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.darts_cnn import DartsCnnConfig
from diffnas.spaces.darts_rnn import DartsRnnConfig
from diffnas.spaces.gnn import GnnConfig, chain_genotype
from diffnas.spaces.nb201 import (
    NB201_EDGES,
    NB201_OPS,
    NUM_CELLS,
    Nb201Config,
    code_to_cell,
    genotype_to_ops,
    ops_to_genotype,
    str_to_genotype,
    str_to_ops,
)
from diffnas.supernet.gnn import CELL, Dropout, GnnNetwork, GraphInput

F64 = torch.float64


# --- graph ops, by hand ----------------------------------------------------------------
def _graph(pairs, n):
    """A Graph of the directed ``(src, dst)`` pairs plus one self loop per node."""
    e = list(pairs) + [(i, i) for i in range(n)]
    return Graph(torch.tensor(e).t(), n), e


# 0 -> 1, 0 -> 2, 1 -> 2, 2 -> 1, node 3 isolated: in- and out-degrees differ
DIRECTED = [(0, 1), (0, 2), (1, 2), (2, 1)]


def _x(n, c=8, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_gcn_normalises_by_the_in_degree_of_a_h_plus_i_as_pyg_does():
    """PyG's gcn_norm (flow source -> target) counts a node's degree over the edges that
    end at it: w_ij = deg_in(i)^-1/2 deg_in(j)^-1/2, bias added after propagation."""
    torch.manual_seed(0)
    g, e = _graph(DIRECTED, 4)
    op = create_graph_op("gcn", 8).double()
    with torch.no_grad():
        op.lin.bias.normal_()
    x = _x(4)
    deg = [sum(1 for _, d in e if d == i) for i in range(4)]
    agg = torch.zeros(4, 8, dtype=F64)
    for s, d in e:
        agg[d] += x[s] / (deg[s] * deg[d]) ** 0.5
    torch.testing.assert_close(op(x, g), agg @ op.lin.weight.t() + op.lin.bias)


def test_sage_adds_the_mean_of_the_neighbours_without_the_node_itself():
    torch.manual_seed(0)
    g, _ = _graph(DIRECTED, 4)
    op = create_graph_op("sage", 8).double()
    x = _x(4)
    mean = torch.zeros(4, 8, dtype=F64)
    for i in range(4):
        nbrs = [s for s, d in DIRECTED if d == i]
        if nbrs:  # node 0 and the isolated node 3 aggregate zero
            mean[i] = x[nbrs].mean(0)
    want = op.lin_self(x) + mean @ op.lin_nbr.weight.t()
    torch.testing.assert_close(op(x, g), want)


def _gat_by_hand(op, x, e, n):
    heads, hd = op.heads, op.head_dim
    h = (x @ op.lin.weight.t()).view(n, heads, hd)
    out = torch.zeros(n, heads, hd, dtype=F64)
    for i in range(n):
        srcs = [s for s, d in e if d == i]
        for k in range(heads):
            logits = torch.stack([
                F.leaky_relu(op.att_src[k] @ h[j, k] + op.att_dst[k] @ h[i, k], 0.2)
                for j in srcs])
            a = torch.softmax(logits, 0)
            out[i, k] = sum(a[t] * h[j, k] for t, j in enumerate(srcs))
    return out.reshape(n, -1) + op.bias


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_gat_is_a_softmax_over_each_target_s_incoming_edges(scale):
    """Velickovic et al.: alpha_ij = softmax_j LeakyReLU_0.2(a_s . W x_j + a_d . W x_i)
    over the sources j of target i (self loop included); large logits stay exact."""
    torch.manual_seed(0)
    g, e = _graph(DIRECTED, 4)
    op = create_graph_op("gat", 8).double()
    with torch.no_grad():
        op.bias.normal_()
        op.att_src.mul_(scale)
        op.att_dst.mul_(scale)
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(op(x, g), _gat_by_hand(op, x, e, 4))


def test_gat_stays_finite_where_exp_of_the_raw_logits_overflows():
    torch.manual_seed(0)
    g, e = _graph(DIRECTED, 4)
    op = create_graph_op("gat", 8).double()
    with torch.no_grad():
        op.att_src.fill_(1.0)
        op.att_dst.fill_(1.0)
        op.lin.weight.copy_(torch.eye(8))
    x = torch.full((4, 8), 200.0, dtype=F64)  # logits 800 per edge: exp overflows float64
    with torch.no_grad():
        y = op(x, g)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, x + op.bias)  # equal logits: the mean of equal states


def test_gin_scales_the_node_by_one_plus_eps_and_sums_its_neighbours():
    torch.manual_seed(0)
    g, _ = _graph(DIRECTED, 4)
    op = create_graph_op("gin", 8).double()
    with torch.no_grad():
        op.eps.fill_(0.3)
    x = _x(4)
    agg = 1.3 * x.clone()
    for s, d in DIRECTED:
        agg[d] += x[s]
    torch.testing.assert_close(op(x, g), op.mlp(agg))


@pytest.mark.parametrize("bad", [4, -1])
def test_graph_refuses_node_ids_outside_the_graph(bad):
    e = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 3, bad]])
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        Graph(e, 4)


# --- gnn networks --------------------------------------------------------------------------
def _mask(gen, like, p):
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen) / (1.0 - p)


def test_dropout_is_inverted_seeded_and_off_in_eval():
    x = torch.ones(200, 50, dtype=F64)
    y = Dropout(True, 3, x.device)(x, 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(kept.double().mean().item() - 0.75) < 0.02  # keeps 1 - p of the entries
    torch.testing.assert_close(Dropout(True, 3, x.device)(x, 0.25), y)  # seeded: same mask
    assert not torch.equal(Dropout(True, 4, x.device)(x, 0.25), y)  # other seed, other mask
    assert torch.equal(Dropout(False, 3, x.device)(x, 0.25), x)


def _standardise(h):
    return (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()


def _karate():
    d = load_graph("karate")
    return d, Graph(d.edge_index, d.num_nodes)


def test_fixed_network_replayed_by_hand_in_eval():
    """stem -> standardise (population variance) -> nodes relu(sum of edges) -> mean of
    concat -> next cell -> classifier; every cell its own weights."""
    torch.manual_seed(0)
    d, graph = _karate()
    cell = CellGenotype(CELL, (Edge("linear", 0, 1), Edge("skip_connect", 1, 2),
                               Edge("sage", 0, 3)), (1, 2, 3))
    net = GnnNetwork(d.num_features, 8, 2, cell, cells=2).double().eval()
    x = d.x.double()
    z = net.stem(x)
    v = ((z - z.mean(0)) ** 2).mean(0)  # the population variance over the nodes
    h = (z - z.mean(0)) / (v + 1e-5).sqrt()
    for c in net.cells:
        n1 = torch.relu(c.ops[0](h, graph))
        n2 = torch.relu(n1)
        n3 = torch.relu(c.ops[2](h, graph))
        h = (n1 + n2 + n3) / 3
    torch.testing.assert_close(net(GraphInput(x, graph)), net.classifier(h))
    assert len(net.cells) == 2 and net.cells[0].ops[0] is not net.cells[1].ops[0]


def test_training_pass_drops_what_ops_with_weights_read_and_not_the_identity():
    """One seeded generator, masks drawn in order: cell input, each node, classifier
    input; ``linear`` reads the dropped state, ``skip_connect`` the state itself."""
    torch.manual_seed(0)
    d, graph = _karate()
    p = 0.4
    cell = CellGenotype(CELL, (Edge("linear", 0, 1), Edge("skip_connect", 0, 2)), (1, 2))
    net = GnnNetwork(d.num_features, 8, 2, cell, dropout=p, in_dropout=0.0).double().train()
    x = d.x.double()
    gen = torch.Generator().manual_seed(7)
    h = _standardise(net.stem(x))
    h_drop = h * _mask(gen, h, p)
    n1 = torch.relu(net.cells[0].ops[0](h_drop, graph))
    _ = _mask(gen, n1, p)  # node 1's mask (read by nothing)
    n2 = torch.relu(h)
    _ = _mask(gen, n2, p)
    out = (n1 + n2) / 2
    want = net.classifier(out * _mask(gen, out, p))
    torch.testing.assert_close(net(GraphInput(x, graph, seed=7)), want)


def test_supernet_in_training_with_one_hot_weights_equals_the_fixed_network():
    torch.manual_seed(0)
    d, graph = _karate()
    s = create_space({"name": "gnn", "hidden": 8, "nodes": 1, "dropout": 0.4,
                      "in_dropout": 0.3}, DataShape(d.num_features, 1, 2))
    ops = list(s.config.ops)
    sup = s.build_supernet().double().train()
    net = s.build_network(chain_genotype(["linear"])).double().train()
    with torch.no_grad():
        net.stem.load_state_dict(sup.stem.state_dict())
        net.classifier.load_state_dict(sup.classifier.state_dict())
        net.cells[0].ops[0].load_state_dict(
            sup.cells[0].edges[0].ops[ops.index("linear")].state_dict())
    w = torch.zeros(1, len(ops), dtype=F64)
    w[0, ops.index("linear")] = 1.0
    inp = GraphInput(d.x.double(), graph, seed=11)
    torch.testing.assert_close(sup(inp, ArchWeights({CELL: w})), net(inp))


# --- gnn space -----------------------------------------------------------------------------
def gnn_space(**kw):
    return create_space({"name": "gnn", "hidden": 8, **kw}, DataShape(5, 1, 3))


def test_gnn_network_overrides_reach_the_network():
    g = chain_genotype(["gcn", "sage"], nodes=3)
    net = gnn_space(nodes=3).build_network(g, hidden=12, cells=3, dropout=0.1,
                                           in_dropout=0.2)
    assert net.stem.out_features == 12 and len(net.cells) == 3
    assert (net.dropout, net.in_dropout) == (0.1, 0.2)
    net = gnn_space(nodes=3, dropout=0.3).build_network(g)  # None: the search value
    assert (net.stem.out_features, len(net.cells), net.dropout) == (8, 1, 0.3)


def test_gat_widths_not_divisible_by_four_are_refused_by_name():
    with pytest.raises(ValueError, match="hidden=6 must divide by 4"):
        GnnConfig(hidden=6)
    GnnConfig(hidden=6, ops=["none", "gcn"])  # no gat: any width
    g = chain_genotype(["gat"])
    with pytest.raises(ValueError, match=r"retrain\.network\.hidden=10"):
        gnn_space(nodes=1).build_network(g, hidden=10)
    gnn_space(nodes=1).build_network(chain_genotype(["gcn"]), hidden=10)


def test_chain_genotype_outputs_the_chain_s_last_node_and_fits_its_space():
    g = chain_genotype(["gcn", "gcn"], nodes=4)
    cell = g.cell(CELL)
    assert cell.concat == (2,)
    assert sorted((e.src, e.dst, e.op) for e in cell.edges) == sorted(
        [(0, 1, "gcn"), (1, 2, "gcn"), (0, 3, "skip_connect"), (0, 4, "skip_connect")])
    gnn_space(nodes=4).validate(g)
    with pytest.raises(ValueError, match="2 ops need at least 2 nodes"):
        chain_genotype(["gcn", "gcn"], nodes=1)


@pytest.mark.parametrize("key", ["dropout", "in_dropout"])
@pytest.mark.parametrize("p", [1.0, -0.1])
def test_gnn_dropouts_outside_zero_one_are_refused(key, p):
    with pytest.raises(ValueError, match=rf"{key} must be in \[0, 1\)"):
        GnnConfig(**{key: p})


# --- graph data ----------------------------------------------------------------------------
def test_symmetric_edges_are_both_ways_once_with_self_loops_sorted_by_target():
    import numpy as np

    ei = symmetric_edges(np.array([0, 2, 1, 0]), np.array([1, 1, 0, 0]), 4)
    pairs = list(zip(ei[0].tolist(), ei[1].tolist(), strict=True))
    want = {(0, 1), (1, 0), (2, 1), (1, 2)} | {(i, i) for i in range(4)}
    assert sorted(pairs) == sorted(want)  # each once: the repeated 0-1 and loop 0-0 too
    assert pairs == sorted(pairs, key=lambda p: (p[1], p[0]))  # (target, source) order


def test_row_normalize_gives_unit_rows_and_keeps_empty_rows_zero():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    y = row_normalize(x)
    torch.testing.assert_close(y, torch.tensor([[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]]))


# --- nb201 ---------------------------------------------------------------------------------
def nb201(**kw):
    return create_space({"name": "nb201", "C": 4, "N": 1, **kw}, TINY_SHAPE)


EXAMPLE = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+"
           "|skip_connect~0|nor_conv_3x3~1|skip_connect~2|")


def test_nb201_validate_refuses_an_edge_listed_twice():
    cell = str_to_genotype(EXAMPLE).cell("cell")
    twice = Genotype("nb201", (CellGenotype("cell", cell.edges + cell.edges[:1], (3,)),))
    with pytest.raises(GenotypeError, match="exactly once"):
        nb201().validate(twice)
    with pytest.raises(GenotypeError, match="exactly once"):
        genotype_to_ops(twice)


def test_nb201_validate_holds_genotypes_to_the_space_s_own_ops():
    space = nb201(ops=["none", "skip_connect", "nor_conv_3x3"])
    with pytest.raises(GenotypeError, match="unknown op 'avg_pool_3x3' on edge 1->2"):
        space.validate(str_to_genotype(EXAMPLE))


@pytest.mark.parametrize("code", [-1, NUM_CELLS])
def test_nb201_codes_outside_the_space_are_refused(code):
    with pytest.raises(GenotypeError, match=f"0..{NUM_CELLS - 1}"):
        code_to_cell(code)


def test_nb201_code_is_base_five_with_edge_zero_most_significant():
    for ops in [("none",) * 5 + ("skip_connect",), ("avg_pool_3x3",) + ("none",) * 5]:
        want = sum(NB201_OPS.index(o) * 5 ** (5 - k) for k, o in enumerate(ops))
        assert code_to_cell(want) == ops


def test_nb201_refusals_name_the_problem():
    with pytest.raises(ValueError, match="auxiliary head"):
        nb201().build_network(str_to_genotype(EXAMPLE), auxiliary=True)
    with pytest.raises(ValueError, match="besides 'none'"):
        Nb201Config(ops=["none"])
    with pytest.raises(GenotypeError, match="unknown nb201 op 'conv_9x9'"):
        ops_to_genotype(["conv_9x9"] + ["none"] * 5)
    with pytest.raises(GenotypeError, match=r"needs 3 '\+'-separated nodes"):
        str_to_ops("|none~0|+|none~0|none~1|")


def test_nb201_network_override_sets_cells_per_stage():
    g = str_to_genotype(EXAMPLE)
    cells = lambda net: sum(1 for m in net.modules() if type(m).__name__ == "Nb201FixedCell")  # noqa: E731
    one, three = nb201().build_network(g), nb201().build_network(g, N=3)
    assert cells(three) == 3 * cells(one) > 0


def test_nb201_op_order_is_the_benchmark_s():
    """NAS-Bench-201's ``NAS_BENCH_201`` op list, in its order (cell codes depend on it)."""
    assert NB201_OPS == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3",
                         "avg_pool_3x3")
    assert NB201_EDGES == ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


# --- darts cnn -----------------------------------------------------------------------------
def test_darts_cnn_ops_are_the_paper_s_primitives_in_order():
    """DARTS ``genotypes.PRIMITIVES``: alpha columns and saved logits follow this order."""
    assert DartsCnnConfig().ops == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                                    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                    "dil_conv_5x5"]


def test_darts_cnn_edges_and_strides():
    s = tiny_space(nodes=4)
    for group in ("normal", "reduce"):
        edges = [e for e in s.edges() if e.cell == group]
        assert len(edges) == 14
        assert [(e.src, e.dst) for e in edges] == [
            (j, 2 + i) for i in range(4) for j in range(2 + i)]
        for e in edges:
            assert e.stride == (2 if group == "reduce" and e.src < 2 else 1)


def _largest(formula):
    return max(n for n in range(1, 200) if formula(n) <= MAX_CELL_EDGES)


@pytest.mark.parametrize("make, formula", [
    (lambda n: DartsCnnConfig(nodes=n), lambda n: n * (n + 3) // 2),
    (lambda n: DartsRnnConfig(nodes=n), lambda n: n * (n + 1) // 2),
    (lambda n: DartsRnnConfig(nodes=n, backbone="two_input"), lambda n: n * (n + 3) // 2),
    (lambda n: GnnConfig(nodes=n, ops=["none", "gcn"]), lambda n: n * (n + 1) // 2),
], ids=["cnn", "rnn", "rnn-two-input", "gnn"])
def test_cell_size_limit_sits_at_the_space_s_edge_count(make, formula):
    n = _largest(formula)
    make(n)
    with pytest.raises(ValueError, match=f"at most {n} "):
        make(n + 1)


@pytest.mark.parametrize("kw, match", [
    ({"layers": 2}, r"layers must be >= 3"),
    ({"stem_multiplier": 0}, r"stem_multiplier must be >= 1"),
    ({"ops": ["none"]}, "besides 'none'"),
    ({"ops": ["skip_connect", "skip_connect"]}, "without repeats"),
])
def test_darts_cnn_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        DartsCnnConfig(**kw)


def test_darts_cnn_reduce_cell_cannot_concat_its_inputs():
    g = published_genotype("DARTS_V2")
    s = tiny_space(nodes=4)
    s.validate(g)
    red = g.cell("reduce")
    bad = Genotype(g.space, (g.cell("normal"),
                             CellGenotype("reduce", red.edges, (0, 2, 3, 4, 5))))
    with pytest.raises(GenotypeError, match=r"node\(s\) \[0\]"):
        s.validate(bad)
    norm = g.cell("normal")  # a normal cell may
    s.validate(Genotype(g.space, (CellGenotype("normal", norm.edges, (1, 2, 3)), red)))


@pytest.mark.parametrize("layers", [3, 4, 5, 6, 8, 9])
def test_darts_network_reduces_at_a_third_and_two_thirds_and_doubles_channels(layers):
    torch.manual_seed(0)
    C = 2
    net = tiny_space(nodes=4).build_network(published_genotype("DARTS_V2"), C=C,
                                            layers=layers, auxiliary=True).eval()
    assert len(net.cells) == layers
    red = {layers // 3, 2 * layers // 3}
    assert [c.reduction for c in net.cells] == [i in red for i in range(layers)]
    shapes = []
    hooks = [c.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for c in net.cells]
    net(torch.randn(1, 1, 8, 8))
    for h in hooks:
        h.remove()
    for i, shape in enumerate(shapes):
        r = sum(1 for k in red if k <= i)
        assert shape == (1, 4 * C * 2 ** r, 8 >> r, 8 >> r)
    # the auxiliary head reads the cell at 2/3 depth (DARTS: 2 * layers // 3)
    assert net.aux_position == 2 * layers // 3
    aux_in = next(m for m in net.auxiliary_head.modules() if isinstance(m, torch.nn.Conv2d))
    assert aux_in.in_channels == shapes[2 * layers // 3][1]


# --- darts rnn -----------------------------------------------------------------------------
def rnn_space(**kw):
    section = {"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3, **kw}
    return create_space(section, DataShape(num_classes=11))


def _chain_rnn(first=1, nodes=3, op="tanh"):
    edges = tuple(Edge(op, d - 1, d) for d in range(first, first + nodes))
    return Genotype("darts_rnn", (CellGenotype(
        "recurrent", edges, tuple(range(first, first + nodes))),))


@pytest.mark.parametrize("backbone, k", [("single", 1), ("two_input", 2)])
def test_rnn_edges_reach_every_intermediate_node_from_every_earlier_node(backbone, k):
    s = rnn_space(backbone=backbone)
    assert [(e.src, e.dst) for e in s.edges()] == [
        (i, j) for j in range(k, k + 3) for i in range(j)]


@pytest.mark.parametrize("growth, match", [
    ({"mode": "grow_prune", "init_nodes": 0, "grow_epochs": [1, 2, 3]},
     r"init_nodes must be in 1\.\.3"),
    ({"mode": "grow_prune", "init_nodes": 1, "grow_epochs": [2, 1]}, "increasing"),
    ({"mode": "grow_prune", "init_nodes": 1, "grow_epochs": [0, 1]}, ">= 1"),
    ({"mode": "grow_prune", "init_nodes": 2, "grow_epochs": [1], "fade_steps": 0},
     "fade_steps must be >= 1"),
    ({"init_nodes": 1}, "grows nothing"),
])
def test_rnn_growth_settings_are_refused(growth, match):
    from diffnas.spaces.darts_rnn import GrowthConfig

    with pytest.raises(ValueError, match=match):
        DartsRnnConfig(nodes=3, growth=GrowthConfig(**growth))


def test_rnn_widths_must_match_and_retrain_dropouts_stay_below_one():
    with pytest.raises(ValueError, match="equal to search.space.nhid"):
        DartsRnnConfig(ninp=6, nhid=8)
    with pytest.raises(ValueError, match=r"retrain\.network\.dropoutx must be in \[0, 1\)"):
        rnn_space().build_network(_chain_rnn(), dropoutx=1.0)


def test_rnn_genotype_of_the_other_backbone_names_the_setting_that_fits():
    with pytest.raises(GenotypeError, match="backbone=two_input"):
        rnn_space().validate(_chain_rnn(first=2))
    with pytest.raises(GenotypeError, match="backbone=single"):
        rnn_space(backbone="two_input").validate(_chain_rnn(first=1))


def test_rnn_genotype_with_a_none_edge_is_refused():
    with pytest.raises(GenotypeError, match=r"1->2 use op 'none'"):
        rnn_space().validate(Genotype("darts_rnn", (CellGenotype("recurrent", (
            Edge("tanh", 0, 1), Edge("none", 1, 2), Edge("relu", 0, 3)), (1, 2, 3)),)))


def test_rnn_network_overrides_reach_the_network():
    s = rnn_space(dropout=0.1, dropouth=0.2, dropoutx=0.3, dropouti=0.4)
    net = s.build_network(_chain_rnn(), ninp=8, nhid=8, dropouth=0.05)
    d = net.dropouts
    assert (d.output, d.h, d.x, d.input) == (0.1, 0.05, 0.3, 0.4)
    assert net.cell.dropouts == d
    assert (net.cell.ninp, net.cell.nhid) == (8, 8)
