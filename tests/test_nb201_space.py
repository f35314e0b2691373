"""The nb201 space: conversions, validation, parameter counts by hand, and the supernet
against the fixed network it should equal for one-hot weights."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPE

from diffnas.arch import ArchParams, ArchWeights
from diffnas.genotype import CellGenotype, Edge, Genotype, GenotypeError
from diffnas.genotype.discretize import discretize
from diffnas.report.cost import count_parameters
from diffnas.spaces import DataShape, create_space
from diffnas.spaces.nb201 import (
    NB201_EDGES,
    NB201_OPS,
    NUM_CELLS,
    all_cells,
    cell_code,
    code_to_cell,
    genotype_to_ops,
    genotype_to_str,
    ops_to_genotype,
    ops_to_str,
    str_to_genotype,
    str_to_ops,
)

EXAMPLE = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+"
           "|skip_connect~0|nor_conv_3x3~1|skip_connect~2|")


def tiny_nb201(**kw):
    return create_space({"name": "nb201", "C": 4, "N": 1, **kw}, TINY_SHAPE)


def test_example_string_parses_to_the_right_edges():
    g = str_to_genotype(EXAMPLE)
    edges = {(e.src, e.dst): e.op for e in g.cell("cell").edges}
    assert edges == {(0, 1): "nor_conv_3x3", (0, 2): "nor_conv_3x3", (1, 2): "avg_pool_3x3",
                     (0, 3): "skip_connect", (1, 3): "nor_conv_3x3", (2, 3): "skip_connect"}
    assert g.cell("cell").concat == (3,)
    assert genotype_to_str(g) == EXAMPLE


def test_every_cell_round_trips_string_genotype_code():
    cells = all_cells()
    assert len(set(cells)) == NUM_CELLS == 5**6
    for code, ops in enumerate(cells):
        s = ops_to_str(ops)
        g = str_to_genotype(s)
        assert genotype_to_ops(g) == ops
        assert genotype_to_str(Genotype.from_json(g.to_json())) == s
        assert cell_code(str_to_ops(s)) == code
        assert code_to_cell(code) == ops


@pytest.mark.parametrize("bad", [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|",  # two nodes
    "|nor_conv_3x3~1|+|nor_conv_3x3~0|avg_pool_3x3~1|+|none~0|none~1|none~2|",  # wrong src
    "|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # unknown op
    "|none~0|+|none~0|+|none~0|none~1|none~2|",  # node 2 lacks an input
])
def test_malformed_strings_are_rejected(bad):
    with pytest.raises(GenotypeError):
        str_to_ops(bad)


def test_validate_rejects_what_does_not_fit():
    space = tiny_nb201()
    good = str_to_genotype(EXAMPLE)
    space.validate(good)
    cell = good.cell("cell")
    with pytest.raises(GenotypeError, match="exactly once"):
        space.validate(Genotype("nb201", (CellGenotype("cell", cell.edges[:-1], (3,)),)))
    with pytest.raises(GenotypeError, match="unknown op"):
        bad = (Edge("sep_conv_3x3", 0, 1),) + cell.edges[1:]
        space.validate(Genotype("nb201", (CellGenotype("cell", bad, (3,)),)))
    with pytest.raises(GenotypeError, match="node 3"):
        space.validate(Genotype("nb201", (CellGenotype("cell", cell.edges, (2, 3)),)))
    with pytest.raises(GenotypeError, match="space"):
        space.validate(Genotype("darts_cnn", good.cells))


def test_edges_and_alpha_shape():
    space = tiny_nb201()
    assert [(e.src, e.dst) for e in space.edges()] == list(NB201_EDGES)
    assert [e.label for e in space.edges()][:3] == ["cell/n1/e0", "cell/n2/e0", "cell/n2/e1"]
    arch = ArchParams(space)
    assert arch.groups() == ["cell"] and tuple(arch["cell"].shape) == (6, 5)


def test_argmax_discretizer_keeps_none():
    space = tiny_nb201()
    want = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3", "none")
    logits = torch.zeros(6, 5)
    for k, op in enumerate(want):
        logits[k, NB201_OPS.index(op)] = 1.0
    g = discretize({"cell": logits}, space)
    space.validate(g)
    assert genotype_to_ops(g) == want
    with pytest.raises(ValueError, match="argmax"):
        discretize({"cell": logits}, space, "darts")


# --- parameter counts by hand ---------------------------------------------------------------
def _bn(c):
    return 2 * c


def _edge_params(op, c):
    return {"nor_conv_3x3": 9 * c * c + _bn(c), "nor_conv_1x1": c * c + _bn(c)}.get(op, 0)


def _resblock(ci, co):
    # ReLU-Conv3x3(s2)-BN, ReLU-Conv3x3-BN, shortcut AvgPool + Conv1x1 (no bias anywhere)
    return 9 * ci * co + _bn(co) + 9 * co * co + _bn(co) + ci * co


def expected_params(ops, C, N, in_ch, classes):
    cell = lambda c: sum(_edge_params(op, c) for op in ops)  # noqa: E731
    total = 9 * in_ch * C + _bn(C)  # stem conv + BN
    total += N * (cell(C) + cell(2 * C) + cell(4 * C))
    total += _resblock(C, 2 * C) + _resblock(2 * C, 4 * C)
    total += _bn(4 * C) + 4 * C * classes + classes  # last BN, classifier
    return total


@pytest.mark.parametrize("op", ["skip_connect", "nor_conv_3x3"])
@pytest.mark.parametrize("C,N,shape", [(16, 5, DataShape(3, 32, 10)), (4, 2, TINY_SHAPE)])
def test_fixed_network_parameter_count(op, C, N, shape):
    space = create_space({"name": "nb201", "C": C, "N": N}, shape)
    net = space.build_network(ops_to_genotype((op,) * 6))
    assert count_parameters(net) == expected_params(
        (op,) * 6, C, N, shape.in_channels, shape.num_classes)


def test_benchmark_sizes():
    """The benchmark's reported sizes (CIFAR-10 networks, C=16, N=5): 0.073306 MB for the
    all-skip cell and 1.531546 MB for the all-conv3x3 cell (the largest)."""
    assert expected_params(("skip_connect",) * 6, 16, 5, 3, 10) == 73_306
    assert expected_params(("nor_conv_3x3",) * 6, 16, 5, 3, 10) == 1_531_546


def test_mixed_cell_parameter_count_and_overrides():
    ops = str_to_ops(EXAMPLE)
    space = tiny_nb201()
    net = space.build_network(ops_to_genotype(ops), C=8, N=2)
    assert count_parameters(net) == expected_params(ops, 8, 2, 1, 3)
    with pytest.raises(ValueError, match="auxiliary"):
        space.build_network(ops_to_genotype(ops), auxiliary=True)


# --- the supernet ----------------------------------------------------------------------------
def _one_hot_weights(ops):
    w = torch.zeros(6, 5, dtype=torch.float64)
    for k, op in enumerate(ops):
        w[k, NB201_OPS.index(op)] = 1.0
    return w


def test_supernet_with_one_hot_weights_equals_the_fixed_network():
    """Same weights, train-mode BN (batch statistics, fresh affine = identity): the
    supernet restricted to a cell computes exactly that cell's fixed network."""
    torch.manual_seed(0)
    space = tiny_nb201(C=4, N=2)
    ops = str_to_ops(EXAMPLE)
    sup = space.build_supernet().double().train()
    net = space.build_network(ops_to_genotype(ops)).double().train()
    missing, _ = net.load_state_dict(sup.state_dict(), strict=False)
    assert all(".ops." in k for k in missing)  # everything outside cell ops is shared
    for layer_s, layer_n in zip(sup.cells, net.cells, strict=True):
        if not hasattr(layer_s, "edges"):
            continue
        for k, op in enumerate(ops):
            src = layer_s.edges[k].ops[NB201_OPS.index(op)].state_dict()
            layer_n.ops[k].load_state_dict(src, strict=False)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    got = sup(x, ArchWeights({"cell": _one_hot_weights(ops)}))
    torch.testing.assert_close(got, net(x), rtol=1e-9, atol=1e-9)


def test_supernet_pools_have_no_bn_and_ops_are_affine_free():
    sup = tiny_nb201().build_supernet()
    cell = sup.cells[0]
    pool = cell.edges[0].ops[NB201_OPS.index("avg_pool_3x3")]
    assert isinstance(pool, torch.nn.AvgPool2d)
    bns = [m for m in cell.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.affine and not m.track_running_stats for m in bns)


def test_active_ops_equal_masked_weights():
    """With ``active`` set only the sampled op runs per edge, scaled by its weight: the same
    as full mixing with every other weight zeroed."""
    torch.manual_seed(1)
    space = tiny_nb201()
    sup = space.build_supernet().double()
    w = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    active = torch.tensor([3, 0, 1, 4, 2, 3])
    masked = torch.zeros_like(w)
    masked[torch.arange(6), active] = w[torch.arange(6), active]
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    a = sup(x, ArchWeights({"cell": w}, {"cell": active}))
    b = sup(x, ArchWeights({"cell": masked}))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_supernet_gradients_reach_every_live_alpha():
    space = tiny_nb201()
    sup = space.build_supernet()
    arch = ArchParams(space)
    w = torch.softmax(arch["cell"], -1)
    out = sup(torch.randn(4, 1, 8, 8), ArchWeights({"cell": w}))
    out.square().mean().backward()
    g = arch["cell"].grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.abs() > 0).all()  # softmax couples every logit of an edge, none included


@pytest.mark.parametrize("resolution", [7, 15])
def test_odd_resolutions_build_and_run(resolution):
    """The reduction block's shortcut pool halves odd sides rounding up, as its stride-2
    conv does; a floor made the residual sum fail at 7, 14, 15, 30."""
    from diffnas.supernet.nb201 import ResNetBasicBlock

    torch.manual_seed(0)
    shape = DataShape(1, resolution, 3)
    space = create_space({"name": "nb201", "C": 4, "N": 1}, shape)
    x = torch.randn(2, 1, resolution, resolution)
    arch = ArchParams(space)
    w = ArchWeights({"cell": torch.softmax(arch["cell"], -1)})
    assert space.build_supernet()(x, w).shape == (2, 3)
    assert space.build_network(str_to_genotype(EXAMPLE)).train()(x).shape == (2, 3)
    block = ResNetBasicBlock(4, 8)
    half = (resolution + 1) // 2
    assert block(torch.randn(2, 4, resolution, resolution)).shape == (2, 8, half, half)
    # on even sides the shortcut is still the benchmark's plain AvgPool2d(2)
    even = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(block.downsample[0](even), torch.nn.functional.avg_pool2d(even, 2))
