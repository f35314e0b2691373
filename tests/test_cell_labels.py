"""Cell diagrams and the report's cell text follow each kind of cell: convolutional cells
as DARTS draws them, recurrent (darts_rnn, both backbones) and graph (gnn) cells with the
genotype's node numbers, their own inputs and their output, the mean of the concat nodes
(supernet/rnn.py and supernet/gnn.py), not a concatenation."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from diffnas.config import load_config, save_config
from diffnas.genotype import CellGenotype, Edge, Genotype, published_genotype
from diffnas.report import plots
from diffnas.report.html import render_report

CONFIGS = Path(__file__).parents[1] / "configs"
BACKENDS = ["matplotlib",
            pytest.param("graphviz", marks=pytest.mark.skipif(
                shutil.which("dot") is None, reason="Graphviz's dot is not installed"))]

#: the Cora genotype of the report: 1 <- gcn(0), 2 <- gat(0), 3 <- gat(2)
GRAPH = Genotype("gnn", (CellGenotype("cell", (Edge("gcn", 0, 1), Edge("gat", 0, 2),
                                               Edge("gat", 2, 3)), (1, 2, 3)),))
#: a two_input recurrent cell: x_t and h_{t-1} are nodes 0 and 1, nodes 2..5 intermediate
TWO_INPUT = Genotype("darts_rnn", (CellGenotype(
    "recurrent", (Edge("identity", 1, 2), Edge("tanh", 0, 3), Edge("relu", 2, 4),
                  Edge("sigmoid", 3, 5)), (2, 3, 4, 5)),))


def svg_texts(data: bytes) -> Counter:
    """How often each text string appears in an SVG."""
    root = ET.fromstring(data)
    return Counter("".join(el.itertext()).strip() for el in root.iter()
                   if el.tag.rsplit("}", 1)[-1] == "text")


def dot_edges(dot: str) -> list[tuple[str, str, str]]:
    """(from, to, op) of every op-labelled arrow of DOT source."""
    return sorted(re.findall(r'"([^"]+)" -> "([^"]+)" \[label="([^"]+)"\]', dot))


# --- the kind of cell, from the space's engine ---------------------------------------
def test_the_kind_of_cell_comes_from_the_engine_its_space_declares():
    assert plots.cell_kind("darts_cnn") is plots.CONV
    assert plots.cell_kind("nb201") is plots.CONV
    assert plots.cell_kind("darts_rnn") is plots.RECURRENT
    assert plots.cell_kind("gnn") is plots.GRAPH
    assert plots.cell_kind("no_such_space") is plots.OTHER
    assert (plots.CONV.combine, plots.RECURRENT.combine, plots.GRAPH.combine,
            plots.OTHER.combine) == ("concatenation", "mean", "mean", None)


# --- what each kind's diagram shows --------------------------------------------------
def test_a_conv_cell_is_drawn_as_darts_draws_it():
    cell = published_genotype("DARTS_V2").cell("normal")
    d = plots.cell_drawing(cell, plots.CONV)
    assert d.inputs == ("c_{k-2}", "c_{k-1}") and d.nodes == ("0", "1", "2", "3")
    assert d.output == "c_{k}" and d.feeds == ()
    assert d.edges[:2] == (("c_{k-2}", "0", "sep_conv_3x3"), ("c_{k-1}", "0", "sep_conv_3x3"))
    assert d.concat == ("0", "1", "2", "3")
    assert plots.cell_dot(cell) == plots.cell_dot(cell, plots.CONV)  # the default kind


def test_an_nb201_cell_keeps_the_genotype_s_node_numbers():
    """NB-201's one input was drawn as ``in`` with nodes from 0, one lower than its
    genotype, the report's edge table and the heatmap rows (DARTS's numbering is for its
    two-input cells)."""
    cell = CellGenotype("cell", (Edge("nor_conv_3x3", 0, 1), Edge("skip_connect", 0, 2),
                                 Edge("avg_pool_3x3", 1, 2), Edge("none", 0, 3),
                                 Edge("nor_conv_1x1", 1, 3), Edge("skip_connect", 2, 3)), (3,))
    d = plots.cell_drawing(cell, plots.cell_kind("nb201"))
    assert d.inputs == ("in (0)",) and d.nodes == ("1", "2", "3")
    assert ("1", "3", "nor_conv_1x1") in d.edges and d.concat == ("3",)
    assert d.output == "out"


def test_a_graph_cell_keeps_the_genotype_s_node_numbers():
    d = plots.cell_drawing(GRAPH.cell("cell"), plots.GRAPH)
    assert d.inputs == ("in (0)",) and d.nodes == ("1", "2", "3")
    assert d.edges == (("in (0)", "1", "gcn"), ("in (0)", "2", "gat"), ("2", "3", "gat"))
    assert d.output == "out (mean)" and d.concat == ("1", "2", "3") and d.feeds == ()


def test_a_one_input_recurrent_cell_shows_x_t_and_h_t_1_gated_into_node_0():
    cell = published_genotype("DARTS_RNN_V2").cell("recurrent")
    d = plots.cell_drawing(cell, plots.RECURRENT)
    assert d.inputs == ("x_{t}", "h_{t-1}")
    assert d.nodes == tuple(str(n) for n in range(9))  # 0 (gated input), 1..8
    assert d.feeds == (("x_{t}", "0"), ("h_{t-1}", "0")) and d.gated == ("0",)
    assert d.color("0") == plots.INPUT_COLOR and d.color("1") == plots.NODE_COLOR
    assert d.edges == tuple((str(e.src), str(e.dst), e.op) for e in cell.edges)
    assert d.edges[0] == ("0", "1", "sigmoid")
    assert d.output == "h_{t} (mean)" and d.concat == tuple(str(n) for n in range(1, 9))


def test_a_two_input_recurrent_cell_names_x_t_and_h_t_1_and_numbers_nodes_from_2():
    d = plots.cell_drawing(TWO_INPUT.cell("recurrent"), plots.RECURRENT)
    assert d.inputs == ("x_{t} (0)", "h_{t-1} (1)") and d.nodes == ("2", "3", "4", "5")
    assert d.edges == (("h_{t-1} (1)", "2", "identity"), ("x_{t} (0)", "3", "tanh"),
                       ("2", "4", "relu"), ("3", "5", "sigmoid"))
    assert d.output == "h_{t} (mean)" and d.feeds == () and d.gated == ()


def test_a_plugin_engine_s_cell_keeps_the_numbers_and_claims_no_combination():
    d = plots.cell_drawing(GRAPH.cell("cell"), plots.OTHER)
    assert d.inputs == ("in (0)",) and d.nodes == ("1", "2", "3") and d.output == "out"


CASES = {  # kind, genotype cell -> (boxes drawn, output, op-labelled arrows)
    "conv": (plots.CONV, published_genotype("DARTS_V1").cell("reduce")),
    "recurrent": (plots.RECURRENT, published_genotype("DARTS_RNN_V1").cell("recurrent")),
    "two_input": (plots.RECURRENT, TWO_INPUT.cell("recurrent")),
    "graph": (plots.GRAPH, GRAPH.cell("cell")),
}


@pytest.mark.parametrize("case", CASES)
def test_dot_source_draws_every_box_and_labelled_edge_of_the_drawing(case):
    kind, cell = CASES[case]
    d = plots.cell_drawing(cell, kind)
    dot = plots.cell_dot(cell, kind)
    assert dot_edges(dot) == sorted(d.edges)
    for box in (*d.inputs, *d.nodes, d.output):
        assert dot.count(f'  "{box}" [fillcolor=') == 1
    assert dot.count("style=dashed") == len(cell.concat)
    assert len(re.findall(r'\[color="#999999"\]', dot)) == len(d.feeds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_the_rendered_svg_shows_each_box_once_and_every_op(case, backend):
    kind, cell = CASES[case]
    d = plots.cell_drawing(cell, kind)
    texts = svg_texts(plots.render_cell(cell, "svg", backend, kind))
    assert all(texts[box] == 1 for box in (*d.inputs, *d.nodes, d.output)), texts
    assert all(texts[op] == n for op, n in Counter(e.op for e in cell.edges).items())
    if kind is not plots.CONV:  # no convolutional names on other cells
        assert not {"c_{k-2}", "c_{k-1}", "c_{k}"} & set(texts)


# --- runs: the plots and the report of each kind -------------------------------------
def _run(tmp_path: Path, config: str, overrides: list[str], genotype: Genotype,
         result: dict) -> Path:
    """A finished run directory as the report reads it: config, genotype, result."""
    run = tmp_path / genotype.space
    (run / "search").mkdir(parents=True)
    (run / "retrain").mkdir()
    save_config(load_config(CONFIGS / config, overrides, device=False), run / "config.yaml")
    genotype.save(run / "search" / "genotype.json")
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"epochs_done": 1, "params": 1234, "genotype": genotype.to_dict(), **result}))
    return run


RUNS = {  # config, overrides, genotype, result -> the output sentence and parameter label
    "conv": ("darts_fashion_mnist.yaml", [], published_genotype("DARTS_V2"),
             {"test_acc": 0.5}, "output: concatenation of nodes [2, 3, 4, 5]",
             "parameters (without auxiliary head)"),
    "recurrent": ("darts_rnn_ptb.yaml", [], published_genotype("DARTS_RNN_V2"),
                  {"valid_ppl": 300.0, "test_ppl": 290.0},
                  "output: mean of nodes [1, 2, 3, 4, 5, 6, 7, 8]", "parameters"),
    "two_input": ("darts_rnn_ptb.yaml", ["search.space.backbone=two_input",
                                         "search.space.nodes=4"], TWO_INPUT,
                  {"valid_ppl": 300.0, "test_ppl": 290.0}, "output: mean of nodes [2, 3, 4, 5]",
                  "parameters"),
    "graph": ("gnn_cora.yaml", ["data.name=karate"], GRAPH, {"test_acc": 0.5},
              "output: mean of nodes [1, 2, 3]", "parameters"),
}


@pytest.mark.parametrize("case", RUNS)
def test_the_report_says_how_each_kind_combines_its_output_and_counts_parameters(
        case, tmp_path):
    config, overrides, genotype, result, output, params = RUNS[case]
    run = _run(tmp_path, config, overrides, genotype, result)
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert page.count(output) == len(genotype.cells)  # DARTS_V2: both cells concat 2..5
    assert f"<tr><th>{params}</th><td>1,234</td></tr>" in page
    if case != "conv":
        assert "concatenation of" not in page and "without auxiliary head" not in page


@pytest.mark.parametrize("case", ["recurrent", "two_input", "graph"])
def test_a_run_s_cell_pictures_are_drawn_for_its_kind(case, tmp_path):
    config, overrides, genotype, result, *_ = RUNS[case]
    run = plots.load_run(_run(tmp_path, config, overrides, genotype, result))
    figs = plots.run_figures(run, backend="matplotlib", fmt="svg")
    cell = genotype.cells[0]
    texts = svg_texts(figs[f"cell_{cell.name}"])
    kind = plots.cell_kind(genotype.space)
    assert kind is not plots.CONV
    d = plots.cell_drawing(cell, kind)
    assert all(texts[box] == 1 for box in (*d.inputs, *d.nodes, d.output))
    assert all(texts[str(n)] == 1 for n in cell.nodes)  # the genotype's numbers


def test_a_plugin_engine_s_output_names_its_nodes_without_claiming_how_they_combine():
    from diffnas.report.html import _output_text

    cell = GRAPH.cell("cell")
    assert _output_text(cell, plots.OTHER) == "output: from nodes [1, 2, 3]"
    assert _output_text(cell, plots.GRAPH) == "output: mean of nodes [1, 2, 3]"
    assert _output_text(cell, plots.CONV) == "output: concatenation of nodes [1, 2, 3]"
