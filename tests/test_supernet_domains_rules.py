"""Rules of the non-CNN supernets a mutation audit could break (second pass): the DARTS
recurrent cell and language model (refusals of impossible cells, dropout ranges, mask
columns, initial weights, the gradient through the carried state, p = 0 drawing
nothing), the darts_rnn space's settings reaching the supernet and the network, the
NAS-Bench-201 mixed op and cells (the weighted sum and its alpha gradient against a hand
computation in float64, genotype edges in any order, refusals), and the gnn supernet
(one-hot weights on a 3-node, 2-cell supernet equal the fixed network in training, the
edge rows follow the space's labels, input dropout replayed with masks drawn by hand,
hard-sampled edges equal masked weights, cells hold their own weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SHAPE

from diffnas.arch import ArchWeights
from diffnas.data.graph import symmetric_edges
from diffnas.genotype import CellGenotype, Edge, Genotype, GenotypeError
from diffnas.ops.graph import Graph
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.darts_rnn import DartsRnnConfig, DartsRnnNetworkConfig
from diffnas.spaces.nb201 import (
    NB201_EDGES,
    NB201_OPS,
    Nb201Config,
    genotype_to_ops,
    ops_to_genotype,
)
from diffnas.supernet.gnn import CELL, GraphInput
from diffnas.supernet.nb201 import (
    Nb201FixedCell,
    Nb201MixedOp,
    Nb201SearchCell,
    ResNetBasicBlock,
)
from diffnas.supernet.rnn import (
    EMB_INIT_RANGE,
    INIT_RANGE,
    Dropouts,
    FixedCell,
    LmInput,
    Masks,
    RnnNetwork,
    SearchCell,
)

F64 = torch.float64
RNN_OPS = ("none", "tanh", "relu", "sigmoid", "identity")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rnn_genotype(edges, concat=None):
    """A recurrent cell genotype from (op, src, dst) triples; concat = every node."""
    es = tuple(Edge(op, s, d) for op, s, d in edges)
    concat = concat or tuple(sorted({d for _, _, d in edges}))
    return Genotype("darts_rnn", (CellGenotype("recurrent", es, concat),))


def rnn_space(**kw):
    section = {"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3, **kw}
    return create_space(section, DataShape(num_classes=11))


# --- the recurrent cell and language model ----------------------------------------------
@pytest.mark.parametrize("field", ["output", "h", "x", "input", "embedding", "weight"])
@pytest.mark.parametrize("p", [1.0, -0.1])
def test_dropouts_outside_zero_one_are_refused_naming_the_field(field, p):
    with pytest.raises(ValueError, match=rf"dropout '{field}' must be in \[0, 1\)"):
        Dropouts(**{field: p})
    Dropouts(**{field: 0.0})  # the boundaries inside
    Dropouts(**{field: 0.99})


@pytest.mark.parametrize("key, field", [("dropout", "output"), ("dropouth", "h"),
                                        ("dropoutx", "x"), ("dropouti", "input"),
                                        ("dropoute", "embedding"), ("weight_drop", "weight")])
def test_the_space_config_range_checks_every_dropout(key, field):
    with pytest.raises(ValueError, match=rf"dropout '{field}' must be in \[0, 1\)"):
        DartsRnnConfig(**{key: 1.0})


@pytest.mark.parametrize("key", ["dropout", "dropouth", "dropoutx", "dropouti", "dropoute",
                                 "weight_drop"])
def test_negative_retrain_dropouts_are_refused(key):
    with pytest.raises(ValueError, match=rf"retrain\.network\.{key} must be in \[0, 1\)"):
        DartsRnnNetworkConfig(**{key: -0.1})


@pytest.mark.parametrize("columns, ok", [((0, 1), True), ((1, 2), True), ((2, 2), False),
                                         ((-1, 2), False), ((0, 0), False)])
def test_mask_columns_need_a_rank_below_the_world_size(columns, ok):
    if ok:
        Masks(True, 0, columns=columns)
    else:
        with pytest.raises(ValueError, match=r"0 <= rank < world size"):
            Masks(True, 0, columns=columns)


def test_impossible_recurrent_cells_are_refused_by_name():
    d = Dropouts()
    with pytest.raises(ValueError, match="at least one node, got 0"):
        SearchCell(4, 4, 0, RNN_OPS, d)
    for init in (0, 4):
        with pytest.raises(ValueError, match=rf"init_nodes must be in 1\.\.3, got {init}"):
            SearchCell(4, 4, 3, RNN_OPS, d, init_nodes=init)
    SearchCell(4, 4, 3, RNN_OPS, d, init_nodes=1)
    SearchCell(4, 4, 3, RNN_OPS, d, init_nodes=3)
    with pytest.raises(ValueError, match="at least one op besides 'none'"):
        SearchCell(4, 4, 2, ("none",), d)
    with pytest.raises(ValueError, match="cannot use the 'none' op"):
        FixedCell(_rnn_genotype([("tanh", 0, 1), ("none", 1, 2)]), 4, 4, d)
    # node numbers must follow the inputs without gaps: 1.. (single), 2.. (two inputs)
    with pytest.raises(ValueError, match=r"genotype nodes \[2, 3\] must be 1\.\.2"):
        FixedCell(_rnn_genotype([("tanh", 0, 2), ("relu", 2, 3)]), 4, 4, d)
    with pytest.raises(ValueError, match=r"genotype nodes \[1, 2\] must be 2\.\.3"):
        FixedCell(_rnn_genotype([("tanh", 0, 1), ("relu", 1, 2)]), 4, 4, d, "two_input")


def test_the_language_model_refuses_what_it_cannot_be():
    g = _rnn_genotype([("tanh", 0, 1)])
    d = Dropouts()
    with pytest.raises(ValueError, match="tied weights need ninp == nhid, got 4 != 6"):
        RnnNetwork(FixedCell(g, 4, 6, d), 11, d)
    RnnNetwork(FixedCell(g, 4, 6, d), 11, d, tie_weights=False)
    net = RnnNetwork(FixedCell(g, 6, 6, d), 11, d)
    tokens = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="a fixed network takes no arch weights"):
        net(LmInput(tokens, net.init_hidden(2)), ArchWeights({"recurrent": torch.ones(1, 1)}))


def test_the_initial_state_has_the_model_s_dtype_and_is_zero():
    net = rnn_space().build_network(_rnn_genotype([("tanh", 0, 1), ("relu", 1, 2),
                                                   ("sigmoid", 2, 3)])).double()
    h = net.init_hidden(3)
    assert h.dtype == F64 and h.shape == (3, 6) and not h.any()
    net.eval()(LmInput(torch.zeros(2, 3, dtype=torch.long), h))  # runs in float64


def test_initial_weights_follow_the_darts_ranges():
    """Cell matrices U(-0.04, 0.04), embedding (tied decoder) U(-0.1, 0.1), decoder bias 0."""
    torch.manual_seed(0)
    net = rnn_space(ninp=40, nhid=40).build_supernet()
    mats = [net.cell.W0, *net.cell.Ws]
    for W in mats:
        assert W.abs().max() <= INIT_RANGE
        assert W.min() < -INIT_RANGE / 2 and W.max() > INIT_RANGE / 2  # spread both ways
    E = net.encoder.weight
    assert E.abs().max() <= EMB_INIT_RANGE
    assert E.min() < -EMB_INIT_RANGE / 2 and E.max() > EMB_INIT_RANGE / 2
    assert net.decoder.weight is E and not net.decoder.bias.any()


def test_a_zero_dropout_draws_nothing_from_the_global_generator():
    """p = 0 means no mask at all, not a mask of ones: a training pass with every dropout
    0 and no seed leaves torch's global random state as it was."""
    net = rnn_space(dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0,
                    dropoute=0.0).build_network(_rnn_genotype(
                        [("tanh", 0, 1), ("relu", 1, 2), ("identity", 0, 3)])).train()
    tokens = torch.randint(0, 11, (3, 2), generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    net(LmInput(tokens, net.init_hidden(2)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backbone", ["single", "two_input"])
def test_the_cell_is_differentiable_through_the_carried_state(backbone):
    """The window's output depends on h_{t-1} through the gate, the highway term and the
    node matrices: gradcheck w.r.t. the carried state and the inputs (float64)."""
    edges = ([("tanh", 0, 1), ("identity", 1, 2), ("sigmoid", 0, 3)] if backbone == "single"
             else [("tanh", 1, 2), ("relu", 0, 3), ("identity", 2, 4)])
    torch.manual_seed(0)
    cell = FixedCell(_rnn_genotype(edges), 3, 3, Dropouts(), backbone).double()
    x = _randn(2, 2, 3, seed=1).requires_grad_()
    h = _randn(2, 3, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, h: cell(x, h)[0], (x, h))


def test_the_space_s_dropouts_reach_the_supernet_and_the_network_field_by_field():
    vals = dict(dropout=0.11, dropouth=0.12, dropoutx=0.13, dropouti=0.14, dropoute=0.15,
                weight_drop=0.16)
    want = Dropouts(output=0.11, h=0.12, x=0.13, input=0.14, embedding=0.15, weight=0.16)
    space = rnn_space(**vals)
    sup = space.build_supernet()
    assert sup.dropouts == want and sup.cell.dropouts == want
    net = space.build_network(_rnn_genotype([("tanh", 0, 1), ("relu", 1, 2),
                                             ("sigmoid", 2, 3)]))
    assert net.dropouts == want and net.cell.dropouts == want
    net = space.build_network(_rnn_genotype([("tanh", 0, 1), ("relu", 1, 2),
                                             ("sigmoid", 2, 3)]),
                              dropoute=0.25, weight_drop=0.35)
    assert net.dropouts == dataclasses.replace(want, embedding=0.25, weight=0.35)


def test_a_two_input_space_builds_two_input_networks():
    space = rnn_space(backbone="two_input")
    net = space.build_network(_rnn_genotype([("tanh", 1, 2), ("relu", 0, 3), ("tanh", 2, 4)]))
    assert net.cell.backbone == "two_input" and net.cell.num_inputs == 2
    assert not hasattr(net.cell, "W0")


def test_retrain_widths_are_checked_against_the_search_widths():
    g = _rnn_genotype([("tanh", 0, 1), ("relu", 1, 2), ("sigmoid", 2, 3)])
    with pytest.raises(ValueError, match=r"retrain\.network\.ninp must be equal to nhid \(6"):
        rnn_space().build_network(g, ninp=8)
    assert rnn_space().build_network(g, ninp=8, nhid=8).cell.nhid == 8


# --- NAS-Bench-201 -----------------------------------------------------------------------
def test_nb201_blocks_refuse_the_strides_they_do_not_have():
    with pytest.raises(ValueError, match="reduction block has stride 2, got 1"):
        ResNetBasicBlock(4, 8, stride=1)
    with pytest.raises(ValueError, match="only have stride-1 edges"):
        Nb201MixedOp(4, 2, NB201_OPS)


def test_nb201_mixed_op_is_the_weighted_sum_and_its_weight_gradient_the_op_output():
    """out = sum_k w_k op_k(x) over a softmax row, ``none`` exactly zero; d<out, g>/dw_k =
    <op_k(x), g> for every op (0 for ``none``), replayed in float64."""
    torch.manual_seed(0)
    mixed = Nb201MixedOp(3, 1, NB201_OPS).double()
    x, g = _randn(2, 3, 5, 5, seed=1), _randn(2, 3, 5, 5, seed=2)
    w = torch.softmax(_randn(len(NB201_OPS), seed=3), 0).requires_grad_()
    out = mixed(x, w)
    outs = [torch.zeros_like(x) if n == "none" else op(x)
            for n, op in zip(NB201_OPS, mixed.ops, strict=True)]
    torch.testing.assert_close(out, sum(wk * o for wk, o in zip(w, outs, strict=True)),
                               rtol=1e-12, atol=1e-12)
    (out * g).sum().backward()
    want = torch.stack([(o * g).sum() for o in outs])
    torch.testing.assert_close(w.grad, want, rtol=1e-10, atol=1e-12)
    assert want[0] == 0 and (want[1:] != 0).all()


def test_nb201_search_cell_node_sums_every_earlier_node_in_edge_order():
    """Node j = sum over i < j of the mixture on edge (i, j), edge k taking row k of the
    weights in NB201_EDGES order; the cell output is node 3."""
    torch.manual_seed(0)
    cell = Nb201SearchCell(3, NB201_OPS).double()
    x = _randn(2, 3, 4, 4, seed=1)
    w = torch.softmax(_randn(6, len(NB201_OPS), seed=2), -1)
    nodes = [x]
    for dst in range(1, 4):
        rows = [(src, NB201_EDGES.index((src, dst))) for src in range(dst)]
        nodes.append(sum(cell.edges[k](nodes[src], w[k]) for src, k in rows))
    torch.testing.assert_close(cell(x, w), nodes[3], rtol=1e-12, atol=1e-12)


def test_nb201_fixed_cell_takes_the_genotype_s_edges_in_any_order():
    """A genotype read from JSON may list its edges in any order: the fixed cell still
    computes every node before it is read (same function as the canonical order)."""
    ops = ("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "nor_conv_3x3",
           "skip_connect")
    canon = ops_to_genotype(ops).cell("cell")
    shuffled = CellGenotype("cell", tuple(reversed(canon.edges)), canon.concat)
    torch.manual_seed(0)
    a = Nb201FixedCell(canon, 3).double().train()
    b = Nb201FixedCell(shuffled, 3).double().train()
    by_edge = dict(zip(a.spec, a.ops, strict=True))
    for (src, dst), op in zip(b.spec, b.ops, strict=True):
        op.load_state_dict(by_edge[(src, dst)].state_dict())
    x = _randn(2, 3, 4, 4, seed=1)
    torch.testing.assert_close(b(x), a(x), rtol=1e-12, atol=1e-12)


def nb201(**kw):
    return create_space({"name": "nb201", "C": 4, "N": 1, **kw}, TINY_SHAPE)


def _nb201_genotype(edges, concat=(3,), cells=("cell",), space="nb201"):
    cell = [CellGenotype(c, tuple(Edge(op, s, d) for op, (s, d) in edges), concat)
            for c in cells]
    return Genotype(space, tuple(cell))


ALL_SKIP = [("skip_connect", e) for e in NB201_EDGES]


@pytest.mark.parametrize("genotype, match", [
    (_nb201_genotype(ALL_SKIP, concat=(2, 3)), r"output must be node 3 \(concat \(3,\)\)"),
    (_nb201_genotype(ALL_SKIP, concat=(2,)), r"output must be node 3"),
    (_nb201_genotype(ALL_SKIP, cells=("cell", "extra")), r"exactly one cell 'cell'"),
    (_nb201_genotype(ALL_SKIP, space="darts_cnn"), "genotype is for space 'darts_cnn'"),
])
def test_nb201_validate_refuses_by_name(genotype, match):
    with pytest.raises(GenotypeError, match=match):
        nb201().validate(genotype)


def test_nb201_genotype_to_ops_refuses_an_edge_listed_twice():
    twice = _nb201_genotype([*ALL_SKIP, ("nor_conv_3x3", (0, 1))])
    with pytest.raises(GenotypeError, match="each edge .* exactly once"):
        genotype_to_ops(twice)


@pytest.mark.parametrize("key", ["C", "N"])
def test_nb201_sizes_below_one_are_refused(key):
    with pytest.raises(ValueError, match=rf"search\.space\.{key} must be >= 1"):
        Nb201Config(**{key: 0})
    Nb201Config(**{key: 1})


@pytest.mark.parametrize("flag", [True, False])
def test_nb201_channels_last_setting_reaches_both_networks(flag):
    space = nb201(channels_last=flag)
    g = ops_to_genotype(("nor_conv_3x3",) * 6)
    assert space.build_supernet().channels_last is flag
    assert space.build_network(g).channels_last is flag
    assert space.build_network(g, channels_last=not flag).channels_last is (not flag)


def test_nb201_ops_of_none_alone_are_refused():
    with pytest.raises(ValueError, match="at least one op besides 'none'"):
        Nb201Config(ops=["none"])


# --- the gnn supernet --------------------------------------------------------------------
def _tiny_graph(n=7, feats=5, seed=0):
    """A ring with two chords (symmetric, self loops) and sparse non-negative features."""
    import numpy as np

    src = np.array([i for i in range(n)] + [0, 2])
    dst = np.array([(i + 1) % n for i in range(n)] + [3, 5])
    graph = Graph(torch.as_tensor(symmetric_edges(src, dst, n)), n)
    x = _randn(n, feats, seed=seed).clamp(min=0)  # about half the entries are zero
    return x, graph


def gnn_space(**kw):
    section = {"name": "gnn", "hidden": 8, "nodes": 3, "dropout": 0.3, "in_dropout": 0.2,
               **kw}
    return create_space(section, DataShape(in_channels=5, resolution=1, num_classes=3))


def _one_hot_rows(space, genotype):
    """Weights with one row per space edge (label order): the genotype's op on its edges,
    ``none`` elsewhere."""
    ops = list(space.config.ops)
    chosen = {(e.src, e.dst): e.op for e in genotype.cell(CELL).edges}
    w = torch.zeros(len(space.edges()), len(ops), dtype=F64)
    for row, e in enumerate(space.edges()):
        w[row, ops.index(chosen.get((e.src, e.dst), "none"))] = 1.0
    return w


def _copy_into_network(sup, net, space, genotype):
    """The fixed network takes the supernet's weights of the ops the genotype keeps."""
    ops = list(space.config.ops)
    rows = {(e.src, e.dst): k for k, e in enumerate(space.edges())}
    net.stem.load_state_dict(sup.stem.state_dict())
    net.classifier.load_state_dict(sup.classifier.state_dict())
    for cs, cn in zip(sup.cells, net.cells, strict=True):
        for e, op in zip(genotype.cell(CELL).edges, cn.ops, strict=True):
            op.load_state_dict(cs.edges[rows[(e.src, e.dst)]].ops[ops.index(e.op)].state_dict())


# node 1 <- gcn(0), node 2 <- skip(1), node 3 <- linear(1): a skip edge that must read the
# undropped state, a node read by two edges, and rows that differ between edge orders
GNN_CELL = Genotype("gnn", (CellGenotype(CELL, (Edge("gcn", 0, 1), Edge("skip_connect", 1, 2),
                                                Edge("linear", 1, 3)), (1, 2, 3)),))


@pytest.mark.parametrize("train", [True, False])
def test_gnn_supernet_with_one_hot_rows_is_the_fixed_network(train):
    """3 nodes, 2 cells, training dropouts with one seed: the supernet whose weight rows
    (in the space's edge-label order) pick the genotype's ops and ``none`` elsewhere
    computes the fixed network, float64."""
    x, graph = _tiny_graph()
    space = gnn_space(cells=2)
    torch.manual_seed(0)
    sup = space.build_supernet().double().train(train)
    net = space.build_network(GNN_CELL).double().train(train)
    _copy_into_network(sup, net, space, GNN_CELL)
    inp = GraphInput(x, graph, seed=5)
    got = sup(inp, ArchWeights({CELL: _one_hot_rows(space, GNN_CELL)}))
    torch.testing.assert_close(got, net(inp), rtol=1e-10, atol=1e-10)


def test_gnn_supernet_cells_hold_their_own_weights():
    space = gnn_space(cells=2)
    sup = space.build_supernet()
    a, b = ({id(p) for p in c.parameters()} for c in sup.cells)
    assert a and not a & b
    one = sum(p.numel() for p in sup.cells[0].parameters())
    rest = sum(p.numel() for m in (sup.stem, sup.classifier) for p in m.parameters())
    assert sum(p.numel() for p in sup.parameters()) == rest + 2 * one


@pytest.mark.parametrize("sparse", [False, True])
def test_gnn_stem_drops_the_input_features_with_in_dropout(sparse):
    """Training: the cells read standardise(stem(x * mask)), the mask (p = in_dropout) the
    first draw of the seeded generator, over x (dense) or over its non-zero entries
    (``x_support``); the cell dropout is a different probability."""
    x, graph = _tiny_graph()
    space = gnn_space(dropout=0.5, in_dropout=0.25)
    torch.manual_seed(0)
    sup = space.build_supernet().double().train()
    seen = []
    sup.cells[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    support = torch.nonzero(x.flatten()).squeeze(1) if sparse else None
    w = torch.softmax(_randn(len(space.edges()), len(space.config.ops), seed=3), -1)
    sup(GraphInput(x, graph, seed=9, x_support=support), ArchWeights({CELL: w}))
    gen = torch.Generator().manual_seed(9)
    if sparse:
        vals = x.flatten()[support]
        keep = torch.empty_like(vals).bernoulli_(0.75, generator=gen) / 0.75
        dropped = torch.zeros(x.numel(), dtype=F64).index_put((support,), vals * keep)
        dropped = dropped.view_as(x)
    else:
        dropped = x * torch.empty_like(x).bernoulli_(0.75, generator=gen) / 0.75
    z = F.linear(dropped, sup.stem.weight, sup.stem.bias)
    want = (z - z.mean(0)) / (((z - z.mean(0)) ** 2).mean(0) + 1e-5).sqrt()
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(seen[0], want, rtol=1e-10, atol=1e-10)


def test_gnn_hard_sampled_edges_equal_the_masked_weights():
    """With ``active`` (GDAS) only each edge's sampled op runs, scaled by its weight: the
    same output as the dense mixture with every other weight zeroed."""
    x, graph = _tiny_graph()
    space = gnn_space()
    torch.manual_seed(0)
    sup = space.build_supernet().double().eval()
    E, K = len(space.edges()), len(space.config.ops)
    w = torch.softmax(_randn(E, K, seed=4), -1)
    active = torch.tensor([1 + e % (K - 1) for e in range(E)])
    masked = torch.zeros_like(w)
    masked[torch.arange(E), active] = w[torch.arange(E), active]
    inp = GraphInput(x, graph)
    a = sup(inp, ArchWeights({CELL: w}, {CELL: active}))
    b = sup(inp, ArchWeights({CELL: masked}))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a, sup(inp, ArchWeights({CELL: w})))


def test_a_gnn_edge_of_none_alone_is_refused():
    from diffnas.supernet.gnn import GnnMixedOp

    with pytest.raises(ValueError, match="an edge needs at least one op besides 'none'"):
        GnnMixedOp(4, ["none"])
    GnnMixedOp(4, ["none", "linear"])
