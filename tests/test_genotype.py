"""Genotypes: JSON round trip, the DARTS text form, published cells, clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_space

from diffnas.genotype import (
    CellGenotype,
    Edge,
    Genotype,
    GenotypeError,
    from_darts_str,
    published_genotype,
    resolve_genotype,
)
from diffnas.report import count_parameters
from diffnas.spaces import DataShape, create_space

CIFAR = DataShape(3, 32, 10)


def test_json_round_trip_and_frozen():
    g = published_genotype("DARTS_V1")
    assert Genotype.from_json(g.to_json()) == g
    with pytest.raises(AttributeError):
        g.space = "x"  # frozen


def test_darts_text_round_trip():
    g = published_genotype("DARTS_V2")
    assert from_darts_str(str(g)) == g
    assert g.cell("normal").inputs_of(5) == (Edge("skip_connect", 0, 5), Edge("dil_conv_3x3", 2, 5))
    assert g.count_op("skip_connect", "normal") == 2


def test_recurrent_text_form_parses():
    g = published_genotype("DARTS_RNN_V2")
    assert g.space == "darts_rnn"
    assert g.cell("recurrent").edges[0] == Edge("sigmoid", 0, 1)
    assert g.cell("recurrent").concat == tuple(range(1, 9))


def test_darts_v2_builds_3_3m_network():
    space = create_space({"name": "darts_cnn"}, CIFAR)
    net = space.build_network(published_genotype("DARTS_V2"), C=36, layers=20, auxiliary=True)
    n = count_parameters(net)
    assert abs(n - 3.3e6) <= 0.1e6, n
    assert net.auxiliary_head is not None
    assert count_parameters(net, exclude=()) > n  # the head exists but is not counted


def test_supernet_size_matches_original_darts():
    space = create_space({"name": "darts_cnn"}, CIFAR)
    from diffnas.arch import ArchParams

    assert sum(p.numel() for p in space.build_supernet().parameters()) == 1_930_618
    assert sum(p.numel() for p in ArchParams(space).parameters()) == 2 * 14 * 8


def test_unknown_op_in_genotype_is_named():
    bad = Genotype("darts_cnn", tuple(
        CellGenotype(c.name, tuple(Edge("conv_9x9" if i == 0 else e.op, e.src, e.dst)
                                   for i, e in enumerate(c.edges)), c.concat)
        for c in published_genotype("DARTS_V2").cells))
    space = create_space({"name": "darts_cnn"}, CIFAR)
    with pytest.raises(GenotypeError, match="unknown op 'conv_9x9'"):
        space.build_network(bad)


def test_genotype_structure_is_validated():
    space = tiny_space()  # 2 nodes: a 4-node genotype does not fit
    with pytest.raises(GenotypeError, match="no edge from node"):
        space.validate(published_genotype("DARTS_V2"))
    g = published_genotype("DARTS_V2")
    one_input = Genotype(g.space, (CellGenotype("normal", g.cell("normal").edges[1:], (2, 3, 4, 5)),
                                   g.cell("reduce")))
    with pytest.raises(GenotypeError, match="node 2 has 1 inputs, expected 2"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(one_input)
    with pytest.raises(GenotypeError, match="space 'darts_rnn'"):
        space.validate(published_genotype("DARTS_RNN_V1"))


@pytest.mark.parametrize("text, match", [
    ("{not json", "malformed genotype JSON"),
    ('{"space": "darts_cnn"}', "exactly the keys"),
    ('{"space": "darts_cnn", "cells": {"normal": {"edges": [["sep_conv_3x3", 0]], "concat": []}}}',
     "malformed genotype"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2])", "needs fields"),
    ("Genotype(normal=[('sep_conv_3x3', 0)", "malformed DARTS genotype text"),
    ("print('hi')", "expected a call 'Genotype"),
])
def test_malformed_genotype_files(tmp_path, text, match):
    p = tmp_path / "g.txt"
    p.write_text(text)
    with pytest.raises(GenotypeError, match=match):
        Genotype.load(p)


def test_resolve_genotype_by_name_or_file(tmp_path):
    g = published_genotype("DARTS_V1")
    p = tmp_path / "g.json"
    g.save(p)
    assert resolve_genotype(str(p)) == g == resolve_genotype("DARTS_V1")
    assert json.loads(p.read_text())["space"] == "darts_cnn"
    with pytest.raises(GenotypeError, match="not found"):
        resolve_genotype(str(tmp_path / "missing.json"))
