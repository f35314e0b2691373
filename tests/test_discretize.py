"""The DARTS discretization rule on hand-made alphas."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_space

from diffnas.genotype import Edge
from diffnas.genotype.discretize import discretize

OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
       "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


def _alphas(rows: dict[tuple[int, int], dict[str, float]], nodes: int = 2) -> torch.Tensor:
    """Logits for edges (src, dst) of a cell; unspecified entries are 0."""
    edges = [(j, 2 + i) for i in range(nodes) for j in range(2 + i)]
    a = torch.zeros(len(edges), len(OPS))
    for (src, dst), ops in rows.items():
        for op, v in ops.items():
            a[edges.index((src, dst)), OPS.index(op)] = v
    return a


def test_top2_inputs_by_strongest_non_none_op():
    space = tiny_space()  # 2 intermediate nodes: node 2 <- {0,1}, node 3 <- {0,1,2}
    normal = _alphas({
        (0, 2): {"sep_conv_3x3": 2.0}, (1, 2): {"max_pool_3x3": 1.0},
        # none is the largest on edge 0->3 but must be ignored; 1->3 wins with skip
        (0, 3): {"none": 9.0, "dil_conv_3x3": 0.5}, (1, 3): {"skip_connect": 3.0},
        (2, 3): {"sep_conv_5x5": 1.5},
    })
    reduce = _alphas({(0, 2): {"avg_pool_3x3": 1.0}, (1, 2): {"dil_conv_5x5": 1.0},
                      (0, 3): {"max_pool_3x3": 2.0}, (1, 3): {}, (2, 3): {"skip_connect": 2.5}})
    g = discretize({"normal": normal, "reduce": reduce}, space)
    assert g.cell("normal").edges == (
        Edge("sep_conv_3x3", 0, 2), Edge("max_pool_3x3", 1, 2),
        Edge("skip_connect", 1, 3), Edge("sep_conv_5x5", 2, 3),
    )
    # a node's inputs are listed strongest first, as DARTS's genotype() lists them
    assert g.cell("reduce").edges == (
        Edge("avg_pool_3x3", 0, 2), Edge("dil_conv_5x5", 1, 2),
        Edge("skip_connect", 2, 3), Edge("max_pool_3x3", 0, 3),
    )
    assert g.cell("normal").concat == (2, 3)
    space.validate(g)


def test_none_dominated_edge_is_scored_by_its_best_real_op():
    # Edge 0->3 has none at 9 (so its real ops' softmax weights are tiny); it must lose.
    space = tiny_space()
    normal = _alphas({(0, 3): {"none": 9.0, "sep_conv_3x3": 1.0},
                      (1, 3): {"sep_conv_3x3": 0.1}, (2, 3): {"sep_conv_3x3": 0.1}})
    g = discretize({"normal": normal, "reduce": _alphas({})}, space)
    assert [e.src for e in g.cell("normal").inputs_of(3)] == [1, 2]


def test_ties_are_broken_deterministically():
    space = tiny_space()
    zeros = _alphas({})  # every weight equal: lower sources and first-listed ops win
    g = discretize({"normal": zeros, "reduce": zeros}, space)
    for cell in g.cells:
        assert cell.inputs_of(2) == (Edge("max_pool_3x3", 0, 2), Edge("max_pool_3x3", 1, 2))
        assert cell.inputs_of(3) == (Edge("max_pool_3x3", 0, 3), Edge("max_pool_3x3", 1, 3))
    assert discretize({"normal": zeros, "reduce": zeros}, space) == g


def test_argmax_rule_keeps_none():
    space = tiny_space()
    normal = _alphas({(0, 2): {"none": 1.0}})
    g = discretize({"normal": normal, "reduce": _alphas({})}, space, rule="argmax")
    assert g.cell("normal").edges[0] == Edge("none", 0, 2)
    assert len(g.cell("normal").edges) == 5


def test_non_finite_logits_are_an_error_naming_the_group():
    """A diverged search (NaN alphas) must not come back as a valid-looking genotype."""
    space = tiny_space()
    good = _alphas({(0, 2): {"sep_conv_3x3": 1.0}})
    for bad_value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[3, 2] = bad_value
        for rule in ("darts", "argmax"):
            with pytest.raises(ValueError, match="group 'reduce' are not finite"):
                discretize({"normal": good, "reduce": bad}, space, rule)
    beta = {"normal": torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]),
            "reduce": torch.zeros(5)}
    with pytest.raises(ValueError, match="edge weights of group 'normal' are not finite"):
        discretize({"normal": good, "reduce": good}, space, edge_weights=beta)


def test_an_edge_whose_only_candidate_is_none_is_named():
    """A plugin space may give an edge no op but 'none': the rule has nothing to keep
    there, and says which edge (it used to fail with an IndexError)."""
    space = tiny_space()

    class NoneOnly(type(space)):
        def edges(self):
            es = super().edges()
            first = es[0]
            return [type(first)(first.label, first.cell, first.src, first.dst, ("none",),
                                first.stride), *es[1:]]

    odd = NoneOnly(space.config, space.shape)
    with pytest.raises(ValueError, match=r"edge normal/n2/e0: every candidate op is 'none'"):
        discretize({"normal": _alphas({}), "reduce": _alphas({})}, odd)
