"""Rules of genotypes, discretizers and relaxations that a mutation audit could break
unnoticed: the published DARTS cells as the DARTS code lists them, strict parsing of
genotype files and text (no code run, no field or list shape guessed, no order lost),
the DARTS and argmax rules on hand-made alphas (edge-weight scaling, ties), validation
of genotypes against a space, and the Gumbel relaxations (noise replayed from the RNG,
held noise in ``fixed_noise``, temperature bounds and schedules, the papers' defaults).
Each test replays a rule by hand on a tiny example instead of comparing with numbers
the code once printed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_space

from diffnas.arch.relax import (
    RELAXATIONS,
    ArchWeights,
    Relaxation,
    check_relaxation_output,
    create_relaxation,
)
from diffnas.genotype import (
    CellGenotype,
    Edge,
    Genotype,
    GenotypeError,
    from_darts_str,
    published_genotype,
    to_darts_str,
)
from diffnas.genotype.discretize import DISCRETIZERS, discretize, takes_edge_weights
from diffnas.spaces import DataShape, create_space

CIFAR = DataShape(3, 32, 10)
OPS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
       "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


# --- published genotypes: the DARTS code's own lists -----------------------------------
# Typed from quark0/darts cnn/genotypes.py and rnn/genotypes.py: (op, input) pairs, two
# per CNN node (nodes 2..5), one per recurrent node (nodes 1..8).
DARTS_CODE = {
    "DARTS_V1": {
        "normal": [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0),
                   ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
                   ("sep_conv_3x3", 0), ("skip_connect", 2)],
        "reduce": [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
                   ("max_pool_3x3", 0), ("max_pool_3x3", 0), ("skip_connect", 2),
                   ("skip_connect", 2), ("avg_pool_3x3", 0)],
    },
    "DARTS_V2": {
        "normal": [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
                   ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
                   ("skip_connect", 0), ("dil_conv_3x3", 2)],
        "reduce": [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
                   ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2),
                   ("skip_connect", 2), ("max_pool_3x3", 1)],
    },
    "DARTS_RNN_V1": {
        "recurrent": [("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3), ("relu", 4),
                      ("identity", 1), ("relu", 5), ("relu", 1)],
    },
    "DARTS_RNN_V2": {
        "recurrent": [("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1),
                      ("tanh", 2), ("sigmoid", 5), ("tanh", 3), ("relu", 5)],
    },
}
NODES = {"normal": [2, 2, 3, 3, 4, 4, 5, 5], "reduce": [2, 2, 3, 3, 4, 4, 5, 5],
         "recurrent": [1, 2, 3, 4, 5, 6, 7, 8]}
CONCAT = {"normal": (2, 3, 4, 5), "reduce": (2, 3, 4, 5), "recurrent": (1, 2, 3, 4, 5, 6, 7, 8)}


@pytest.mark.parametrize("name", sorted(DARTS_CODE))
def test_published_genotypes_are_the_darts_code_s_cells(name):
    g = published_genotype(name)
    assert g.space == ("darts_rnn" if "RNN" in name else "darts_cnn")
    assert [c.name for c in g.cells] == list(DARTS_CODE[name])
    for cell, pairs in DARTS_CODE[name].items():
        want = tuple(Edge(op, src, dst) for (op, src), dst in zip(pairs, NODES[cell],
                                                                   strict=True))
        assert g.cell(cell).edges == want
        assert g.cell(cell).concat == CONCAT[cell]
    space = create_space({"name": g.space}, CIFAR if g.space == "darts_cnn"
                         else DataShape(num_classes=10))
    space.validate(g)


# --- parsing genotype files and text ------------------------------------------------------
def _v2_dict() -> dict:
    return json.loads(published_genotype("DARTS_V2").to_json())


@pytest.mark.parametrize("field, value", [
    ("edges", "sep_conv_3x3"), ("edges", {"sep_conv_3x3": [0, 2]}), ("concat", "2345"),
    ("concat", {"2": 1}),
])
def test_edges_and_concat_must_be_lists_not_strings_or_objects(field, value):
    """A string would otherwise be iterated character by character (concat "2345")."""
    d = _v2_dict()
    d["cells"]["normal"][field] = value
    with pytest.raises(GenotypeError, match=rf"cell 'normal' {field} must be a list, got"):
        Genotype.from_dict(d)


@pytest.mark.parametrize("content", ["", "  \n\t\n", "\ufeff"])
def test_an_empty_genotype_file_is_named_as_empty(tmp_path, content):
    p = tmp_path / "g.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(GenotypeError, match=rf"^{p} is empty, not a genotype file$"):
        Genotype.load(p)


def test_a_missing_genotype_file_is_named(tmp_path):
    p = tmp_path / "nowhere.json"
    with pytest.raises(GenotypeError, match=rf"^genotype file not found: {p}$"):
        Genotype.load(p)


@pytest.mark.parametrize("text", [
    '{"space": 3, "cells": {}}',
    "Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2])",
])
def test_an_error_inside_a_genotype_file_starts_with_the_file_s_path(tmp_path, text):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(GenotypeError) as info:
        Genotype.load(p)
    assert str(info.value).startswith(f"{p}: ")


def _v2_text(**replace: str) -> str:
    text = to_darts_str(published_genotype("DARTS_V2"))
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def test_a_concat_range_of_exactly_max_range_nodes_is_read_and_one_more_is_refused():
    from diffnas.genotype.genotype import MAX_RANGE

    longest = _v2_text(**{"normal_concat=[2, 3, 4, 5]":
                          f"normal_concat=range(2, {2 + MAX_RANGE})"})
    assert from_darts_str(longest).cell("normal").concat == tuple(range(2, 2 + MAX_RANGE))
    too_long = _v2_text(**{"normal_concat=[2, 3, 4, 5]":
                           f"normal_concat=range(2, {3 + MAX_RANGE})"})
    with pytest.raises(GenotypeError, match=rf"range of {MAX_RANGE + 1} nodes"):
        from_darts_str(too_long)


@pytest.mark.parametrize("text", [
    "Genotype('darts_cnn', normal=[], normal_concat=[], reduce=[], reduce_concat=[])",
    "Genotype(**{'normal': [], 'normal_concat': [], 'reduce': [], 'reduce_concat': []})",
])
def test_darts_text_takes_named_fields_only(text):
    with pytest.raises(GenotypeError, match=r"expected named fields only"):
        from_darts_str(text)


def test_darts_text_with_an_extra_field_is_refused_and_names_the_fields():
    text = _v2_text(**{"reduce_concat=[2, 3, 4, 5])":
                       "reduce_concat=[2, 3, 4, 5], notes='best run')"})
    with pytest.raises(GenotypeError, match=r"needs fields \['normal', 'normal_concat', "
                                            r"'reduce', 'reduce_concat'\], got .*'notes'"):
        from_darts_str(text)


@pytest.mark.parametrize("expr", [
    "[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4",
    "list(reversed([('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4))",
])
def test_darts_text_is_data_not_code(expr):
    """Genotype text is read as literals: an expression that Python would evaluate to a
    valid cell is still refused (a file must not run code)."""
    normal = to_darts_str(published_genotype("DARTS_V2")).split("normal=")[1].split(
        ", normal_concat")[0]
    with pytest.raises(GenotypeError, match="malformed DARTS genotype text"):
        from_darts_str(_v2_text(**{f"normal={normal}": f"normal={expr}"}))


def test_genotype_cell_lookup_names_the_cells_it_has():
    g = published_genotype("DARTS_V2")
    with pytest.raises(GenotypeError, match=r"genotype has no cell 'recurrent'; it has "
                                            r"\['normal', 'reduce'\]"):
        g.cell("recurrent")


def test_concat_order_survives_json_and_text_round_trips(tmp_path):
    """The concat order is the order of the cell output's channel blocks: a genotype
    saved and read back must keep it."""
    g = published_genotype("DARTS_V2")
    shuffled = Genotype(g.space, tuple(CellGenotype(c.name, c.edges, (5, 2, 4, 3))
                                       for c in g.cells))
    assert Genotype.from_json(shuffled.to_json()) == shuffled
    assert from_darts_str(str(shuffled)) == shuffled
    shuffled.save(tmp_path / "g.json")
    assert Genotype.load(tmp_path / "g.json").cell("reduce").concat == (5, 2, 4, 3)


# --- discretization -------------------------------------------------------------------------
def _alphas(rows: dict[tuple[int, int], dict[str, float]], nodes: int = 2) -> torch.Tensor:
    """float64 logits for edges (src, dst) of a DARTS cell; unspecified entries are 0."""
    edges = [(j, 2 + i) for i in range(nodes) for j in range(2 + i)]
    a = torch.zeros(len(edges), len(OPS), dtype=torch.float64)
    for (src, dst), ops in rows.items():
        for op, v in ops.items():
            a[edges.index((src, dst)), OPS.index(op)] = v
    return a


def test_edge_weights_scale_each_edge_s_strongest_op_weight():
    """With edge weights b, edge e's strength is b_e * max_{op != none} softmax(alpha_e):
    replayed by hand on node 3, where the product picks other inputs than either factor
    alone."""
    space = tiny_space()
    normal = _alphas({(0, 3): {"sep_conv_3x3": 5.0}, (1, 3): {"skip_connect": 3.0},
                      (2, 3): {"max_pool_3x3": 2.0}})
    beta = torch.tensor([1.0, 1.0, 0.1, 0.5, 0.4], dtype=torch.float64)
    logits = {"normal": normal, "reduce": _alphas({})}
    weights = {"normal": beta, "reduce": torch.ones(5, dtype=torch.float64)}

    soft = torch.softmax(normal, -1)
    strength = {src: float(beta[row] * soft[row, 1:].max())
                for row, src in ((2, 0), (3, 1), (4, 2))}
    assert sorted(strength, key=lambda s: -strength[s])[:2] == [1, 2]
    g = discretize(logits, space, edge_weights=weights)
    assert g.cell("normal").inputs_of(3) == (Edge("skip_connect", 1, 3),
                                            Edge("max_pool_3x3", 2, 3))
    assert [e.src for e in discretize(logits, space).cell("normal").inputs_of(3)] == [0, 1]
    # beta is used as given: node 2's betas do not touch node 3 (a softmax over the whole
    # group would rescale node 3's by them and pick inputs 1 and 0)
    flat = dict(weights, normal=torch.tensor([5.0, 5.0, 0.1, 0.5, 0.4], dtype=torch.float64))
    assert discretize(logits, space, edge_weights=flat).cell("normal").inputs_of(3) == \
        g.cell("normal").inputs_of(3)


def test_argmax_rule_ignores_edge_weights_and_breaks_ties_by_the_first_op():
    space = tiny_space()
    normal = _alphas({(0, 2): {"sep_conv_3x3": 1.0, "dil_conv_5x5": 1.0},
                      (1, 2): {"none": 2.0, "skip_connect": 2.0}})
    logits = {"normal": normal, "reduce": _alphas({})}
    g = discretize(logits, space, rule="argmax")
    assert g.cell("normal").edges[:2] == (Edge("sep_conv_3x3", 0, 2), Edge("none", 1, 2))
    # an all-equal row keeps the first candidate
    assert all(e.op == OPS[0] for e in g.cell("reduce").edges)
    beta = {k: torch.arange(5, dtype=torch.float64) for k in logits}
    assert discretize(logits, space, rule="argmax", edge_weights=beta) == g


def test_k_inputs_per_node_is_the_space_s_k():
    """The darts rule keeps inputs_per_node() inputs per node: one in a recurrent cell."""
    space = create_space({"name": "darts_rnn", "nodes": 3, "ninp": 4, "nhid": 4},
                         DataShape(num_classes=5))
    assert space.inputs_per_node() == 1
    a = torch.randn(len(space.edges()), 5, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    g = discretize({"recurrent": a}, space)
    for n in g.cell("recurrent").nodes:
        assert len(g.cell("recurrent").inputs_of(n)) == 1
    space.validate(g)


@pytest.mark.parametrize("sig, takes", [
    ("(logits, space)", False),
    ("(logits, space, edge_weights=None)", True),
    ("(logits, space, *, edge_weights)", True),
    ("(logits, space, **kwargs)", True),
    ("(logits, space, *edge_weights)", False),
])
def test_takes_edge_weights_reads_the_signature(sig, takes):
    scope: dict = {}
    exec(f"def rule{sig}:\n    pass", scope)
    assert takes_edge_weights(scope["rule"]) is takes


def test_a_registered_rule_taking_kwargs_is_given_the_edge_weights(monkeypatch):
    space = tiny_space()
    seen = {}

    def rule(logits, space, **kwargs):
        seen.update(kwargs)
        return DISCRETIZERS.get("darts")(logits, space, **kwargs)

    monkeypatch.setitem(DISCRETIZERS._items, "audit_kwargs_rule", rule)
    logits = {"normal": _alphas({}), "reduce": _alphas({})}
    beta = {k: torch.ones(5, dtype=torch.float64) for k in logits}
    discretize(logits, space, rule="audit_kwargs_rule", edge_weights=beta)
    assert set(seen) == {"edge_weights"} and seen["edge_weights"] is beta


# --- validation against a space ------------------------------------------------------------
def test_a_genotype_missing_a_cell_type_is_refused():
    g = published_genotype("DARTS_V2")
    normal_only = Genotype(g.space, (g.cell("normal"),))
    with pytest.raises(GenotypeError, match=r"genotype cells \['normal'\] != space cells "
                                            r"\['normal', 'reduce'\]"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(normal_only)


def test_a_node_with_more_than_k_inputs_is_refused():
    space = tiny_space()  # node 3 may take inputs 0, 1, 2
    g = discretize({"normal": _alphas({}), "reduce": _alphas({})}, space)
    n = g.cell("normal")
    three = CellGenotype("normal", (*n.edges, Edge("skip_connect", 2, 3)), n.concat)
    with pytest.raises(GenotypeError, match="cell 'normal': node 3 has 3 inputs, expected 2"):
        space.validate(Genotype(g.space, (three, g.cell("reduce"))))


# --- relaxations ---------------------------------------------------------------------------
def _gumbel(shape, dtype=torch.float64):
    """Gumbel(0, 1) noise drawn as -log(E), E ~ Exp(1), from the global RNG."""
    return -torch.empty(shape, dtype=dtype).exponential_().log()


def test_gumbel_softmax_is_softmax_of_logits_plus_replayed_gumbel_noise_over_tau():
    a = {"normal": torch.randn(3, 4, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(1)),
         "reduce": torch.zeros(2, 4, dtype=torch.float64)}
    relax = create_relaxation("gumbel", tau=0.7)
    torch.manual_seed(5)
    got = relax(a)
    torch.manual_seed(5)
    for g in ("normal", "reduce"):  # one draw per group, in the logits' order
        want = torch.softmax((a[g] + _gumbel(a[g].shape)) / 0.7, dim=-1)
        torch.testing.assert_close(got[g], want, rtol=1e-12, atol=1e-12)


def test_fixed_noise_holds_one_draw_per_group_through_nested_blocks_then_draws_anew():
    relax = create_relaxation("gumbel", tau=1.0)
    a = {"normal": torch.zeros(3, 4, dtype=torch.float64),
         "reduce": torch.zeros(3, 4, dtype=torch.float64)}
    torch.manual_seed(0)
    with relax.fixed_noise():
        first = relax(a)
        with relax.fixed_noise():  # a strategy's step inside another's block
            inner = relax(a)
        after_inner = relax(a)
    outside, again = relax(a), relax(a)
    for w in (inner, after_inner):
        for g in a:
            assert torch.equal(w[g], first[g])
    assert not torch.equal(first["normal"], first["reduce"])  # each group its own draw
    assert not torch.equal(outside["normal"], first["normal"])  # released after the block
    assert not torch.equal(outside["normal"], again["normal"])


@pytest.mark.parametrize("kw, match", [
    ({"tau": 0.0}, r"temperatures must be positive, got tau=0.0,"),
    ({"tau": 1.0, "tau_min": 0.0}, r"temperatures must be positive, got tau=1.0, tau_min=0.0"),
    ({"tau": float("inf")}, r"temperatures must be finite, got tau=inf"),
    ({"tau": 1.0, "tau_min": float("nan")}, r"temperatures must be finite, .*tau_min=nan"),
    ({"tau": 1.0, "tau_min": 0.5, "anneal": "cosine"},
     r"anneal must be 'linear' or 'exp', got 'cosine'"),
])
@pytest.mark.parametrize("name", ["gumbel", "hard_gumbel"])
def test_bad_temperatures_are_refused(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_relaxation(name, **kw)


def test_an_unknown_relaxation_setting_is_a_value_error_naming_the_relaxation():
    with pytest.raises(ValueError, match=r"relaxation 'gumbel': bad settings \{'taus': 1\}"):
        create_relaxation("gumbel", taus=1)


def test_tau_min_equal_to_tau_is_a_constant_temperature():
    relax = create_relaxation("gumbel", tau=2.0, tau_min=2.0)
    relax.set_epochs(4)
    for _ in range(4):
        assert relax.tau == pytest.approx(2.0)
        relax.end_epoch()


@pytest.mark.parametrize("anneal", ["linear", "exp"])
def test_the_temperature_stays_at_tau_min_after_the_planned_epochs(anneal):
    """A run extended past the epochs the schedule was told keeps tau_min (a linear ramp
    continued would reach zero and then negative temperatures)."""
    relax = create_relaxation("gumbel", tau=4.0, tau_min=0.5, anneal=anneal)
    relax.set_epochs(3)
    want = [4.0, 2.25, 0.5] if anneal == "linear" else [4.0, math.sqrt(4.0 * 0.5), 0.5]
    for tau in want:
        assert relax.tau == pytest.approx(tau)
        relax.end_epoch()
    for _ in range(4):
        assert relax.tau == pytest.approx(0.5)
        relax.end_epoch()


def test_default_temperatures_are_the_papers():
    """GDAS: tau from 10 to 0.1, linearly; SNAS (gumbel): a constant 1 unless tau_min."""
    gdas = create_relaxation("hard_gumbel")
    gdas.set_epochs(3)
    taus = []
    for _ in range(3):
        taus.append(gdas.tau)
        gdas.end_epoch()
    assert taus == pytest.approx([10.0, (10.0 + 0.1) / 2, 0.1])
    snas = create_relaxation("gumbel")
    snas.set_epochs(3)
    for _ in range(3):
        assert snas.tau == 1.0
        snas.end_epoch()


@pytest.mark.parametrize("name, stochastic, hard", [
    ("softmax", False, False), ("gumbel", True, False), ("hard_gumbel", True, True),
])
def test_relaxation_flags(name, stochastic, hard):
    """``stochastic``: it samples (diagnostics average several draws); ``hard``: one op per
    edge in ``active`` (no compiled mixed ops)."""
    relax = create_relaxation(name)
    assert relax.stochastic is stochastic and relax.hard is hard
    aw = relax({"g": torch.zeros(2, 3)})
    assert (aw.active is not None) is hard


def test_detached_arch_weights_keep_the_sampled_ops():
    a = torch.randn(4, 3, requires_grad=True)
    aw = create_relaxation("hard_gumbel", tau=1.0, tau_min=None)({"g": a})
    d = aw.detach()
    assert not d["g"].requires_grad and torch.equal(d["g"], aw["g"].detach())
    assert d.active is not None and torch.equal(d.active["g"], aw.active["g"])
    assert isinstance(d, ArchWeights)


def test_published_names_are_matched_exactly():
    """``darts_v2`` is not ``DARTS_V2``: a relative file of that name must not be
    shadowed by a published cell, so a near miss is refused with the list of names."""
    from diffnas.genotype import resolve_genotype

    with pytest.raises(GenotypeError, match=r"not found: darts_v2, and not a published "
                                            r"genotype name either; published: DARTS_RNN_V1"):
        resolve_genotype("darts_v2")


class _FloatActive(Relaxation):
    """A plugin's hard relaxation that gives its sampled ops as floats."""

    hard = True

    def __call__(self, logits):
        return ArchWeights({g: torch.softmax(a, -1) for g, a in logits.items()},
                           {g: torch.zeros(a.shape[0]) for g, a in logits.items()})


class _Sampling(Relaxation):
    """A plugin's sampling relaxation: draws from torch's global RNG."""

    stochastic = True

    def __call__(self, logits):
        return ArchWeights({g: torch.softmax(a + torch.rand_like(a), -1)
                            for g, a in logits.items()})


def test_a_plugin_relaxation_s_active_must_hold_integer_op_indices(monkeypatch):
    monkeypatch.setitem(RELAXATIONS._items, "audit_float_active", _FloatActive)
    with pytest.raises(ValueError, match=r"relaxation 'audit_float_active' .* gave group "
                                         r"'normal' active tensor\(\[0\., 0\., 0\.\]\), "
                                         r"expected one op index in \[0, 4\)"):
        check_relaxation_output({"name": "audit_float_active"},
                                {"normal": torch.zeros(3, 4)})


def test_checking_a_plugin_relaxation_leaves_the_global_rng_as_it_was(monkeypatch):
    """The check runs before the search: its samples must not shift the run's noise."""
    monkeypatch.setitem(RELAXATIONS._items, "audit_sampling", _Sampling)
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    check_relaxation_output({"name": "audit_sampling"}, {"normal": torch.zeros(3, 4)})
    assert torch.equal(torch.rand(4), want)


def test_a_genotype_whose_nodes_start_later_names_its_number_of_cell_inputs():
    """Node numbers shifted by one (a cell with 3 inputs) are named as such, not as a cell
    of another node count."""
    g = published_genotype("DARTS_V2")
    shifted = Genotype(g.space, tuple(
        CellGenotype(c.name, tuple(Edge(e.op, e.src, e.dst + 1) for e in c.edges),
                     tuple(n + 1 for n in c.concat)) for c in g.cells))
    with pytest.raises(GenotypeError, match=r"cell 'normal': the genotype's intermediate "
                                            r"nodes start at node 3 \(3 cell input\(s\)\), "
                                            r"the space's at node 2"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(shifted)


def _narrow_op(C, stride, affine):
    """A plugin op that works up to 40 channels only."""
    if C > 40:
        raise ValueError("too wide")
    return torch.nn.AvgPool2d(3, stride, 1, count_include_pad=False)


def test_network_ops_are_checked_at_each_stage_s_channels(monkeypatch):
    """A retrained cell network has stages of C, 2C and 4C channels: an op that breaks
    only at 4C is refused before the search, naming the width."""
    from diffnas.config import ConfigError
    from diffnas.ops.registry import OPS
    from diffnas.spaces.base import check_network_ops

    monkeypatch.setitem(OPS._items, "audit_narrow", _narrow_op)
    check_network_ops(["audit_narrow"], 10)  # 10, 20, 40: fine
    with pytest.raises(ConfigError, match=r"retrain\.network \(C=16, .*built for C=64"):
        check_network_ops(["audit_narrow"], 16)
