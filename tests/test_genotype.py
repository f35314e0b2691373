"""Genotypes: JSON round trip, the DARTS text form, published cells, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_space

from diffnas.genotype import (
    CellGenotype,
    Edge,
    Genotype,
    GenotypeError,
    from_darts_str,
    published_genotype,
    resolve_genotype,
    to_darts_str,
)
from diffnas.genotype.discretize import discretize
from diffnas.report import count_parameters
from diffnas.spaces import DataShape, SearchSpace, create_space

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
    with pytest.raises(GenotypeError, match=r"edges end at 4 intermediate node\(s\), the space "
                                            r"has 2 \(no node 5\).*search\.space\.nodes=4\)"):
        space.validate(published_genotype("DARTS_V2"))
    g = published_genotype("DARTS_V2")
    skipping = Genotype(g.space, (CellGenotype("normal", tuple(  # an edge no space has
        Edge(e.op, 3 if i == 0 else e.src, e.dst) for i, e in enumerate(g.cell("normal").edges)),
        (2, 3, 4, 5)), g.cell("reduce")))
    with pytest.raises(GenotypeError, match="no edge from node 3 to node 2"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(skipping)
    g = published_genotype("DARTS_V2")
    one_input = Genotype(g.space, (CellGenotype("normal", g.cell("normal").edges[1:], (2, 3, 4, 5)),
                                   g.cell("reduce")))
    with pytest.raises(GenotypeError, match="node 2 has 1 inputs, expected 2"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(one_input)
    with pytest.raises(GenotypeError, match=r"edges end at 4 intermediate node\(s\), the space "
                                            r"has 5 .*search\.space\.nodes=4\)"):
        create_space({"name": "darts_cnn", "nodes": 5}, CIFAR).validate(g)
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
    ("[1, 2]", "expected an object with exactly the keys"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal=[('max_pool_3x3', 0),"
     " ('skip_connect', 1)], normal_concat=[2], reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)],"
     " reduce_concat=[2])", r"field\(s\) given twice: \['normal'\]"),
    ('{"space": "darts_cnn", "cells": {"normal": {"edges": [], "concat": []}, "normal": {"edges":'
     ' [], "concat": []}}}', r"key\(s\) 'normal' given twice in one object"),
    ('{"space": "darts_cnn", "cells": {}, "notes": 1}', "exactly the keys 'space' and 'cells'"),
    ('{"space": 3, "cells": {}}', "'space' must be a string"),
    ('{"space": "darts_cnn", "cells": []}', "'cells' an object"),
    ('{"space": "darts_cnn", "cells": {"normal": {"edges": [], "concat": [], "x": 1}}}',
     "needs exactly the keys 'edges' and 'concat'"),
    ('{"space": "darts_cnn", "cells": {"normal": {"edges": [["sep_conv_3x3", 0, 2, 1]], '
     '"concat": [2]}}}', r"must be \[op, src, dst\]"),
    ('{"space": "darts_cnn", "cells": {"normal": {"edges": [[7, 0, 2]], "concat": [2]}}}',
     "the op must be a name"),
    ("Genotype(normal=[(3, 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])",
     r"expected \(op, input\) pairs"),
    ("Genotype(normal=[('sep_conv_3x3', 0, 9), ('sep_conv_3x3', 1)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])",
     r"expected \(op, input\) pairs"),
])
def test_malformed_genotype_files(tmp_path, text, match):
    p = tmp_path / "g.txt"
    p.write_text(text)
    with pytest.raises(GenotypeError, match=match):
        Genotype.load(p)


def test_a_json_file_with_a_byte_order_mark_loads(tmp_path):
    g = published_genotype("DARTS_V2")
    p = tmp_path / "g.json"
    p.write_bytes(b"\xef\xbb\xbf" + g.to_json().encode())  # as some Windows editors save
    assert Genotype.load(p) == g


def test_a_huge_range_in_genotype_text_is_refused_before_it_is_expanded():
    text = to_darts_str(published_genotype("DARTS_V2")).replace(
        "normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 1000000000000)")
    with pytest.raises(GenotypeError, match=r"range of 999999999998 nodes .*at most 1000"):
        from_darts_str(text)
    with pytest.raises(GenotypeError, match="malformed DARTS genotype text"):  # overflow
        from_darts_str(text.replace("range(2, 1000000000000)", "range(10**100)".replace(
            "10**100", "1" + "0" * 100)))


def test_a_recurrent_genotype_with_a_none_edge_is_refused_by_validation():
    """Before a run directory (a fixed recurrent cell cannot build it)."""
    space = create_space({"name": "darts_rnn"}, DataShape(num_classes=10))
    g = published_genotype("DARTS_RNN_V2")
    cell = g.cell("recurrent")
    e = cell.edges[2]
    edges = (*cell.edges[:2], Edge("none", e.src, e.dst), *cell.edges[3:])
    dead = Genotype(g.space, (CellGenotype("recurrent", edges, cell.concat),))
    space.validate(g)
    with pytest.raises(GenotypeError, match=r"edge\(s\) 1->3 use op 'none'"):
        space.validate(dead)


def test_resolve_genotype_by_name_or_file(tmp_path):
    g = published_genotype("DARTS_V1")
    p = tmp_path / "g.json"
    g.save(p)
    assert resolve_genotype(str(p)) == g == resolve_genotype("DARTS_V1")
    assert json.loads(p.read_text())["space"] == "darts_cnn"
    with pytest.raises(GenotypeError, match="not found"):
        resolve_genotype(str(tmp_path / "missing.json"))
    # a run directory, or DARTS text given in place of a file, says what to give instead
    (tmp_path / "run" / "search").mkdir(parents=True)
    with pytest.raises(GenotypeError, match=r"run is a folder: give a genotype file or a pub"):
        resolve_genotype(str(tmp_path / "run"))
    g.save(tmp_path / "run" / "search" / "genotype.json")
    with pytest.raises(GenotypeError, match=r"\(this run's: .*run/search/genotype.json\)"):
        resolve_genotype(str(tmp_path / "run"))
    with pytest.raises(GenotypeError, match=r"DARTS Genotype\(...\) text, not a file name"):
        resolve_genotype(str(g))
    # a search's per-epoch genotypes.jsonl names the final genotype's file; its advice works
    per_epoch = tmp_path / "run" / "search" / "genotypes.jsonl"
    per_epoch.write_text(json.dumps({"epoch": 0, **g.to_dict()}) + "\n")
    with pytest.raises(GenotypeError, match=r"one genotype per line .*\(the search's final "
                       r"one: .*run/search/genotype\.json\).* without its 'epoch' key"):
        resolve_genotype(str(per_epoch))
    line = json.loads(per_epoch.read_text())
    del line["epoch"]
    (tmp_path / "e0.json").write_text(json.dumps(line))
    assert resolve_genotype(str(tmp_path / "e0.json")) == g


def _v2_dict() -> dict:
    return json.loads(published_genotype("DARTS_V2").to_json())


@pytest.mark.parametrize("src", [0.9, 1.7, "1", True])
def test_node_numbers_must_be_ints(src):
    d = _v2_dict()
    d["cells"]["normal"]["edges"][0][1] = src
    with pytest.raises(GenotypeError, match=rf"node {src!r} in .* is not an integer"):
        Genotype.from_dict(d)
    d = _v2_dict()
    d["cells"]["reduce"]["concat"][0] = src
    with pytest.raises(GenotypeError, match="cell 'reduce': node .* in 'concat'"):
        Genotype.from_dict(d)


def test_unknown_cell_keys_and_repeated_edges_are_rejected():
    d = _v2_dict()
    d["cells"]["normal"]["bogus"] = 1
    with pytest.raises(GenotypeError, match="cell 'normal' needs exactly the keys"):
        Genotype.from_dict(d)
    d = _v2_dict()
    e = d["cells"]["normal"]["edges"]
    e[1] = ["skip_connect", e[0][1], e[0][2]]  # node 2 takes node 0 twice
    with pytest.raises(GenotypeError, match="edge 0->2 is listed twice"):
        Genotype.from_dict(d)
    g = published_genotype("DARTS_V2")  # built in code: validate catches it
    n = g.cell("normal")
    twice = CellGenotype("normal", (n.edges[0], Edge("skip_connect", 0, 2)) + n.edges[2:],
                         n.concat)
    with pytest.raises(GenotypeError, match="edge 0->2 is listed twice"):
        create_space({"name": "darts_cnn"}, CIFAR).validate(
            Genotype(g.space, (twice, g.cell("reduce"))))


@pytest.mark.parametrize("normal, concat, match", [
    ("('sep_conv_3x3', 0.7)", "[2, 3, 4, 5]", r"node 0.7 in \('sep_conv_3x3', 0.7\)"),
    ("('sep_conv_3x3', 0)", "[True, 3, 4, 5]", "node True in 'normal_concat'"),
    ("('sep_conv_3x3', 1)", "[2, 3, 4, 5]", "edge 1->2 is listed twice"),
])
def test_darts_text_is_parsed_strictly(normal, concat, match):
    rest = ("('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), "
            "('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)")
    reduce = "[" + ", ".join(["('max_pool_3x3', 0)", "('max_pool_3x3', 1)"] * 4) + "]"
    text = (f"Genotype(normal=[{normal}, {rest}], normal_concat={concat}, "
            f"reduce={reduce}, reduce_concat=[2, 3, 4, 5])")
    with pytest.raises(GenotypeError, match=match):
        from_darts_str(text)


def _with_concat(g: Genotype, cell: str, concat: tuple[int, ...]) -> Genotype:
    return Genotype(g.space, tuple(CellGenotype(c.name, c.edges, concat) if c.name == cell
                                   else c for c in g.cells))


@pytest.mark.parametrize("cell, concat, match", [
    ("normal", (), "concat is empty"),
    ("normal", (2, 2, 3, 4, 5), r"concat lists node\(s\) \[2\] more than once"),
    ("reduce", (1, 2, 3, 4, 5), r"cell 'reduce': concat refers to node\(s\) \[1\]"),
    ("normal", (2, 3, 4, 5, 6), r"concat refers to node\(s\) \[6\]"),
])
def test_concat_is_validated(cell, concat, match):
    space = create_space({"name": "darts_cnn", "C": 4, "layers": 5}, CIFAR)
    with pytest.raises(GenotypeError, match=match):
        space.build_network(_with_concat(published_genotype("DARTS_V2"), cell, concat))


def test_normal_cells_may_concatenate_an_input_node():
    """Inputs of a normal cell have its channels and resolution, so concatenating one works
    (unlike in a reduction cell, whose inputs are not downsampled)."""
    space = create_space({"name": "darts_cnn", "C": 4, "layers": 5}, DataShape(3, 16, 10))
    g = _with_concat(published_genotype("DARTS_V2"), "normal", (1, 2, 3, 4, 5))
    net = space.build_network(g).eval()
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_text_round_trips_where_the_darts_form_cannot_say_the_genotype(tmp_path):
    """A two_input recurrent cell numbers its nodes from 2; the DARTS form would shift them
    to 1. str() then writes the generic form, which reads back exactly."""
    space = create_space({"name": "darts_rnn", "backbone": "two_input", "nodes": 3,
                          "ninp": 6, "nhid": 6}, DataShape(num_classes=11))
    torch.manual_seed(0)
    g = discretize({"recurrent": torch.randn(len(space.edges()), 5)}, space)
    assert g.cell("recurrent").nodes == (2, 3, 4)
    text = str(g)
    assert text.startswith("Genotype(space='darts_rnn', cells=")
    p = tmp_path / "g.txt"
    p.write_text(text)
    assert Genotype.load(p) == g
    space.validate(Genotype.load(p))
    nb = create_space({"name": "nb201"}, CIFAR)  # no DARTS form at all: generic too
    g = discretize({"cell": torch.randn(6, 5)}, nb)
    assert from_darts_str(str(g)) == g
    for name in ("DARTS_V2", "DARTS_RNN_V1"):  # the paper's form where it fits
        assert str(published_genotype(name)).startswith("Genotype(normal=" if name == "DARTS_V2"
                                                        else "Genotype(recurrent=")


def test_a_recurrent_genotype_of_the_other_backbone_names_the_setting():
    """A two_input genotype retrained with the default (single) backbone was told "edges
    end at 8 intermediate node(s), the space has 8 (no node 9): ... nodes=8", which the
    space already had; each direction now names search.space.backbone."""
    def rnn(backbone: str) -> SearchSpace:
        return create_space({"name": "darts_rnn", "backbone": backbone, "ninp": 6, "nhid": 6},
                            DataShape(num_classes=11))

    torch.manual_seed(0)
    two = discretize({"recurrent": torch.randn(len(rnn("two_input").edges()), 5)},
                     rnn("two_input"))
    with pytest.raises(GenotypeError, match=r"has 2 input node\(s\) \(backbone two_input\), the "
                                            r"space's backbone='single' has 1: build the space "
                                            r"with search\.space\.backbone=two_input"):
        rnn("single").validate(two)
    with pytest.raises(GenotypeError, match=r"search\.space\.backbone=single"):
        rnn("two_input").validate(published_genotype("DARTS_RNN_V2"))
    rnn("single").validate(published_genotype("DARTS_RNN_V2"))
    rnn("two_input").validate(two)


def test_unknown_genotype_name_lists_the_published_ones():
    with pytest.raises(GenotypeError, match="not a published genotype name.*DARTS_V2"):
        resolve_genotype("DARTS")


def test_auxiliary_head_pools_8x8_maps_like_the_paper():
    """On CIFAR the head sees 8x8 maps: the paper's AvgPool2d(5, stride=3, padding=0,
    count_include_pad=False); other sizes pool adaptively to 2x2 with the same weights."""
    from diffnas.supernet.network import AuxiliaryHead

    torch.manual_seed(0)
    head = AuxiliaryHead(6, 10).eval()
    paper = torch.nn.Sequential(*head.features).eval()
    paper[1] = torch.nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(head(x), head.classifier(paper(x).flatten(1)))
    assert head(torch.randn(2, 6, 5, 5)).shape == (2, 10)
    space = create_space({"name": "darts_cnn"}, CIFAR)
    net = space.build_network(published_genotype("DARTS_V2"), C=36, layers=20, auxiliary=True)
    assert count_parameters(net.auxiliary_head, exclude=()) == 476_426  # as before the change


def test_a_cell_type_called_cell_is_not_titled_twice():
    from diffnas.genotype import cell_title

    assert [cell_title(n) for n in ("normal", "reduce", "recurrent", "cell")] == [
        "normal cell", "reduce cell", "recurrent cell", "cell"]
