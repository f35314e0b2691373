"""Rules of the run pictures (report/plots.py) and the cost counts (report/cost.py) that a
second mutation audit found unchecked. The tests read the DATA of a figure, not its
pixels: the x/y data of each curve (epochs on x as each row names them, missing values as
gaps), which keys feed which series (search end-of-epoch validation, retraining's test
split, language models' valid_loss / valid_ppl), the alpha heatmap's separators, tick
positions and labels, colour range and colour-bar label, the rows alpha_matrix refuses
and the row it names, the cell drawing (arrows into the output, labels on the middle of
their arcs, the zigzag of node columns, DOT quoting, Graphviz's resolution and errors,
the auto backend), which genotype a run directory shows, what plot_run and
plots_after_run pass on, and MACs / FLOPs counted for float64 models, with extra forward
arguments and with a forward that fails."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import matplotlib
import numpy as np
import pytest
from test_report_callbacks_rules import _genotype
from torch import nn

from diffnas.config import load_config, save_config
from diffnas.engine.engines import PERPLEXITY
from diffnas.genotype import CellGenotype, Edge, published_genotype
from diffnas.report import plots
from diffnas.report.cost import count_flops, count_macs, flops_by_module

matplotlib.use("Agg")
HAS_DOT = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


def _series(fig) -> dict[tuple[str, str], tuple[list, list]]:
    """(axes title, line label) -> (x data, y data) of every curve of a figure."""
    return {(ax.get_title(), ln.get_label()): (list(ln.get_xdata()), list(ln.get_ydata()))
            for ax in fig.axes for ln in ax.lines}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _run_dir(tmp_path, overrides=(), search=True, folders=("search",)):
    """A run directory holding its config and the given (empty) folders."""
    run = tmp_path / "run"
    for f in folders:
        (run / f).mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    save_config(load_config(None, list(overrides), device=False, search=search),
                run / "config.yaml")
    return run


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- curves -----------------------------------------------------------------------------
def test_curves_put_each_row_s_epoch_plus_one_on_x_and_a_missing_value_as_a_gap():
    """x is the epoch each row names, counted from 1 (a gap in the file stays a gap); a
    value a row lacks is NaN at its own epoch, not a 0 and not a reason to drop the curve;
    the search's end-of-epoch validation curve reads the eval_val_* keys."""
    rows = [{"epoch": 0, "loss": 2.0, "acc": 0.1, "val_loss": 2.5, "val_acc": 0.2,
             "eval_val_loss": 2.4, "eval_val_acc": 0.25},
            {"epoch": 1, "loss": 1.5, "acc": 0.3, "eval_val_loss": 1.9, "eval_val_acc": 0.35},
            {"epoch": 4, "loss": 1.0, "acc": 0.6, "val_loss": 1.2, "val_acc": 0.5,
             "eval_val_loss": 1.1, "eval_val_acc": 0.55}]
    got = _series(plots.curves_figure(rows, []))
    want_x = [r["epoch"] + 1 for r in rows]
    for label, (lk, ak) in {"train": ("loss", "acc"),
                            "validation (alpha steps)": ("val_loss", "val_acc"),
                            "validation (end of epoch)": ("eval_val_loss",
                                                          "eval_val_acc")}.items():
        for title, key in (("search: loss", lk), ("search: accuracy", ak)):
            xs, ys = got[(title, label)]
            assert xs == want_x
            want = [r.get(key, np.nan) for r in rows]
            np.testing.assert_array_equal(np.asarray(ys, dtype=float), want)


def test_retraining_curves_label_the_test_split_test_and_draw_only_that_phase():
    rows = [{"epoch": e, "loss": 1.0 - 0.1 * e, "acc": 0.5, "test_loss": 1.3 - 0.1 * e,
             "test_acc": 0.4 + 0.1 * e} for e in range(3)]
    fig = plots.curves_figure([], rows)
    assert [ax.get_title() for ax in fig.axes] == ["retrain: loss", "retrain: accuracy"]
    got = _series(fig)
    assert got[("retrain: loss", "test")][1] == pytest.approx([r["test_loss"] for r in rows])
    assert got[("retrain: accuracy", "test")][1] == pytest.approx([r["test_acc"] for r in rows])
    with pytest.raises(plots.PlotError, match=r"no metrics to plot"):
        plots.curves_figure([], [])


@pytest.mark.parametrize("metric", [None, PERPLEXITY])
def test_language_model_curves_pair_valid_loss_with_valid_ppl(metric):
    """A language model logs loss/ppl and valid_loss/valid_ppl: the validation curves
    read valid_*, the right-hand plots are perplexity, whether the rows (only valid_ppl
    here) or the engine's metric (PERPLEXITY, a built-in one) say so."""
    rows = [{"epoch": e, "loss": 5.0 - e, "val_loss": 99.0, "valid_loss": 5.5 - e,
             "valid_ppl": 250.0 - 10 * e} for e in range(3)]
    args = () if metric is None else (metric,)
    fig = plots.curves_figure(rows, [], *args)
    assert [ax.get_title() for ax in fig.axes] == ["search: loss", "search: perplexity"]
    got = _series(fig)
    assert set(got) == {("search: loss", "train"), ("search: loss", "validation"),
                        ("search: perplexity", "validation")}
    assert got[("search: loss", "validation")][1] == pytest.approx([5.5, 4.5, 3.5])
    assert got[("search: perplexity", "validation")][1] == pytest.approx([250.0, 240.0, 230.0])


def test_curve_axes_are_labelled_epoch_with_integer_ticks_and_a_legend_of_the_curves():
    rows = [{"epoch": e, "loss": 1.0 / (e + 1), "acc": 0.5, "val_loss": 1.2, "val_acc": 0.4}
            for e in range(3)]
    fig = plots.curves_figure(rows, [])
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch"
        ticks = ax.get_xticks()
        assert len(ticks) and np.all(ticks == np.round(ticks)), ticks
        assert [t.get_text() for t in ax.get_legend().get_texts()] == \
            [ln.get_label() for ln in ax.lines]


# --- the alpha heatmap --------------------------------------------------------------------
def _heatmap(n_edges=3, n_ops=4, n_epochs=5, title="", seed=0):
    rng = np.random.default_rng(seed)
    mat = rng.random((n_edges, n_ops, n_epochs))
    labels = [f"normal/n{2 + i}/e{i}" for i in range(n_edges)]
    ops = [f"op{k}" for k in range(n_ops)]
    return mat, labels, ops, plots.alpha_heatmap_figure(mat, labels, ops, title)


def test_the_heatmap_separates_op_blocks_and_names_edges_and_ops_at_their_positions():
    """A white line between neighbouring op blocks (n_ops - 1 of them, on the column
    boundaries), edge row i labelled by edge i (edge order, top to bottom), each op's name
    under the centre of its block of epochs."""
    n_edges, n_ops, n_epochs = 3, 4, 5
    _, labels, ops, fig = _heatmap(n_edges, n_ops, n_epochs)
    ax = fig.axes[0]
    xs = sorted(float(ln.get_xdata()[0]) for ln in ax.lines)
    assert xs == [k * n_epochs - 0.5 for k in range(1, n_ops)]
    assert list(ax.get_yticks()) == list(range(n_edges))
    assert [t.get_text() for t in ax.get_yticklabels()] == [plots._edge_tick(lb) for lb in labels]
    # imshow puts row i at y = i and column j at x = j: a block spans [k n, (k+1) n - 1]
    assert list(ax.get_xticks()) == pytest.approx([k * n_epochs + (n_epochs - 1) / 2
                                                   for k in range(n_ops)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ops


def test_the_heatmap_has_its_title_and_a_softmax_colour_bar():
    *_, fig = _heatmap(title="normal cell: softmax(alpha)")
    assert fig.axes[0].get_title() == "normal cell: softmax(alpha)"
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "softmax(alpha)"


def test_an_all_nan_heatmap_spans_zero_to_one():
    mat = np.full((2, 3, 2), np.nan)
    im = plots.alpha_heatmap_figure(mat, ["a", "b"], ["x", "y", "z"]).axes[0].images[0]
    assert im.get_clim() == (0.0, 1.0)


def test_a_run_of_exactly_the_epoch_cap_shows_every_epoch_without_a_sampling_note():
    n = plots.HEATMAP_EPOCHS
    mat = np.random.default_rng(0).random((2, 2, n))
    fig = plots.alpha_heatmap_figure(mat, ["a", "b"], ["x", "y"])
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), mat.reshape(2, 2 * n))
    assert fig.axes[0].get_xlabel().endswith(f"epochs 1 to {n}, left to right)")


# --- alpha_matrix refusals ----------------------------------------------------------------
GOOD = [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]


@pytest.mark.parametrize("bad", [[[0.2, 0.3, 0.5], [0.1, 0.9]],  # ragged
                                 [0.2, 0.3, 0.5],  # a vector, not a matrix
                                 None,  # null
                                 [[0.5, 0.5], [0.5, 0.5]]])  # a second shape
def test_alpha_matrix_names_the_row_of_a_record_that_is_not_a_matrix_like_the_first(bad,
                                                                                     tmp_path):
    """Without a shape given, every row must be a 2-D matrix of numbers of the first row's
    shape; the row named is the line of the file (rows of other cell types count)."""
    records = [{"epoch": 0, "normal": GOOD}, {"epoch": 0, "reduce": GOOD},
               {"epoch": 1, "normal": bad}]
    with pytest.raises(plots.PlotError, match=r"a\.jsonl: row 3 \(\"epoch\": 1\): its 'normal' "
                                              r"entry is not an \(edges x ops\) matrix"):
        plots.alpha_matrix(records, "normal", tmp_path / "a.jsonl")


@pytest.mark.parametrize("first", [[0.2, 0.3, 0.5], [[[0.2, 0.8]]], 0.5])
def test_alpha_matrix_refuses_a_first_row_that_is_not_two_dimensional(first):
    with pytest.raises(plots.PlotError, match=r"row 1 \(\"epoch\": 0\): its 'normal' entry is "
                                              r"not an \(edges x ops\) matrix of numbers \("):
        plots.alpha_matrix([{"epoch": 0, "normal": first}], "normal")


def test_alpha_matrix_names_a_second_shape_by_the_first_row_s():
    records = [{"epoch": 0, "normal": GOOD}, {"epoch": 1, "normal": [[0.5, 0.5]]}]
    with pytest.raises(plots.PlotError, match=r"row 2 .* of shape \(2, 3\)"):
        plots.alpha_matrix(records, "normal")


# --- cell diagrams ------------------------------------------------------------------------
def _annotations(fig):
    return [a for a in fig.axes[0].texts if isinstance(a, matplotlib.text.Annotation)]


def test_the_matplotlib_cell_has_a_dashed_arrow_from_each_concat_node_into_the_output():
    cell = _genotype().cell("normal")
    d = plots.cell_drawing(cell)
    fig = plots.cell_figure(cell, "normal cell")
    out_x = plots.X_STEP * (len(d.nodes) + 1)
    pos = plots._box_positions(d)
    dashed = [a for a in _annotations(fig) if a.arrow_patch.get_linestyle() == "--"]
    assert sorted(a.xyann for a in dashed) == sorted(pos[b] for b in d.concat)
    assert all(a.xy == (out_x, 0.0) for a in dashed)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "normal cell"


def test_every_op_label_sits_on_the_middle_of_its_arc():
    """arc3's curve is the quadratic Bezier through the control point mid + rad (dy, -dx)
    (equal aspect, so data units are display units up to scale); its middle (t = 1/2) is
    where the op's label is written."""
    cell = _genotype().cell("normal")
    fig = plots.cell_figure(cell)
    ops = {t.get_text(): t for t in fig.axes[0].texts
           if not isinstance(t, matplotlib.text.Annotation)}
    arrows = [a for a in _annotations(fig) if a.arrow_patch.get_linestyle() != "--"]
    assert len(arrows) == len(cell.edges)
    labels = [t for t in fig.axes[0].texts if not isinstance(t, matplotlib.text.Annotation)
              and t.get_text() in {e.op for e in cell.edges}]
    assert ops and len(labels) == len(cell.edges)
    for a in arrows:
        (x0, y0), (x2, y2) = a.xyann, a.xy
        rad = a.arrow_patch.get_connectionstyle().rad
        cx, cy = (x0 + x2) / 2 + rad * (y2 - y0), (y0 + y2) / 2 - rad * (x2 - x0)
        mid = (0.25 * x0 + 0.5 * cx + 0.25 * x2, 0.25 * y0 + 0.5 * cy + 0.25 * y2)
        assert any(np.allclose(t.get_position(), mid) for t in labels), (a.xyann, a.xy)


def test_node_columns_step_right_and_zigzag_from_top_to_bottom():
    """Inputs stacked in the first column; node i in column i + 1, its height falling
    evenly from 2 (the first node) to -2 (the last), so arrows between nodes do not run
    along one line through the boxes between them."""
    d = plots.cell_drawing(published_genotype("DARTS_V2").cell("normal"))
    pos = plots._box_positions(d)
    assert [pos[b] for b in d.inputs] == [(0.0, 1.3), (0.0, -1.3)]
    n = len(d.nodes)
    assert n == 4
    got = np.array([pos[b] for b in d.nodes])
    np.testing.assert_allclose(got[:, 0], [plots.X_STEP * (i + 1) for i in range(n)])
    np.testing.assert_allclose(got[:, 1], np.linspace(2.0, -2.0, n))


def test_a_concat_node_no_edge_computes_is_left_out_of_the_drawing():
    cell = CellGenotype("normal", (Edge("skip_connect", 0, 2), Edge("sep_conv_3x3", 1, 2)), (2, 5))
    d = plots.cell_drawing(cell)
    assert d.concat == ("0",)
    assert plots.cell_dot(cell).count("style=dashed") == 1


def test_dot_source_escapes_quotes_in_names():
    cell = CellGenotype('my "cell"', (Edge('say "hi"', 0, 1),), (1,))
    dot = plots.cell_dot(cell, plots.OTHER)
    assert 'digraph "my \\"cell\\"" {' in dot
    assert '[label="say \\"hi\\""]' in dot


@HAS_DOT
def test_graphviz_renders_a_quoted_op_name_and_png_at_110_dpi_svg_at_its_default():
    """The DOT source goes to ``dot -Tpng -Gdpi=110`` and ``dot -Tsvg`` as they are run
    here by hand."""
    cell = CellGenotype("cell", (Edge('say "hi"', 0, 1), Edge("conv", 1, 2)), (2,))
    src = plots.cell_dot(cell, plots.OTHER).encode()

    def dot(*args):
        return subprocess.run([shutil.which("dot"), *args], input=src, capture_output=True,
                              check=True, timeout=60).stdout

    png = plots.render_cell(cell, "png", "graphviz", plots.OTHER)
    assert _png_size(png) == _png_size(dot("-Tpng", "-Gdpi=110"))
    assert _png_size(png) != _png_size(dot("-Tpng"))
    svg = plots.render_cell(cell, "svg", "graphviz", plots.OTHER)
    assert svg == dot("-Tsvg") and b"say &quot;hi&quot;" in svg


def test_a_failing_dot_is_an_error_with_its_message_and_a_missing_one_names_the_fix(
        tmp_path, monkeypatch):
    fake = tmp_path / "dot"
    fake.write_text("#!/bin/sh\necho 'syntax error in line 3' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(plots.shutil, "which", lambda name: str(fake))
    cell = _genotype().cell("normal")
    with pytest.raises(plots.PlotError, match=r"dot failed: syntax error in line 3"):
        plots.render_cell(cell, "svg", "graphviz")
    monkeypatch.setattr(plots.shutil, "which", lambda name: None)
    with pytest.raises(plots.PlotError, match=r"'dot' program is not installed.*"
                                              r"backend='matplotlib'"):
        plots.render_cell(cell, "svg", "graphviz")


@pytest.mark.parametrize("found, want", [("/usr/bin/dot", "graphviz"), (None, "matplotlib")])
def test_the_auto_backend_is_graphviz_only_where_dot_is_installed(found, want, monkeypatch):
    monkeypatch.setattr(plots.shutil, "which", lambda name: found if name == "dot" else None)
    assert plots.resolve_backend("auto") == want
    assert plots.resolve_backend("matplotlib") == "matplotlib"


def test_figure_bytes_refuses_an_unknown_format_and_draws_png_at_the_dpi_asked():
    fig = plots.cell_figure(_genotype().cell("reduce"))
    with pytest.raises(plots.PlotError, match=r"unknown image format 'jpg'"):
        plots.figure_bytes(fig, "jpg")
    w1, h1 = _png_size(plots.figure_bytes(fig, "png", dpi=40))
    w2, h2 = _png_size(plots.figure_bytes(fig, "png", dpi=120))
    assert abs(w2 / w1 - 3) < 0.1 and abs(h2 / h1 - 3) < 0.1


# --- the run directory ----------------------------------------------------------------
def test_a_train_run_is_read_without_the_search_s_checks(tmp_path):
    """A ``diffnas train`` run never searched: its config is read as train read it, so a
    search setting a search would refuse (a few_shot split after the last epoch) does not
    keep its report or plots from being made."""
    overrides = ["search.strategy={name: few_shot, split_epoch: 99}"]
    with pytest.raises(Exception, match="split_epoch"):
        load_config(None, overrides, device=False, search=True)
    run = _run_dir(tmp_path, overrides, search=False, folders=("retrain",))
    data = plots.load_run(run)
    assert data.kind == "train" and data.genotype is None


def test_the_provisional_epoch_of_rows_without_one_is_the_last_row_s_index(tmp_path):
    run = _run_dir(tmp_path, ["search.epochs=6"])
    g = _genotype()
    _write_jsonl(run / "search" / "genotypes.jsonl", [g.to_dict()] * 3)
    data = plots.load_run(run)
    assert data.genotype == g and data.provisional_epoch == 2
    assert "after epoch 3 of 6" in data.genotype_note()


def test_the_search_s_genotype_comes_before_the_result_s_and_then_the_pinned_one(tmp_path):
    """search/genotype.json first; else retrain/result.json's genotype; else the genotype
    a retraining pinned at its start (retrain/genotype.json)."""
    run = _run_dir(tmp_path, folders=("search", "retrain"))
    searched, retrained, pinned = _genotype(), _genotype(("reduce", "normal")), \
        _genotype(("normal",))
    pinned.save(run / "retrain" / "genotype.json")
    assert plots.load_run(run).genotype == pinned
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"genotype": retrained.to_dict(), "test_acc": 0.5}))
    assert plots.load_run(run).genotype == retrained
    searched.save(run / "search" / "genotype.json")
    data = plots.load_run(run)
    assert data.genotype == searched and data.provisional_epoch is None


def test_each_cell_type_s_heatmap_names_the_epochs_of_its_own_rows(tmp_path):
    cfg = load_config(None, ["search.epochs=5"], device=False)
    mat = np.full((14, 8), 1 / 8).tolist()
    alphas = [{"epoch": 0, "normal": mat}, {"epoch": 1, "normal": mat},
              {"epoch": 2, "normal": mat, "reduce": mat}]
    run = plots.RunData(tmp_path, cfg, None, [], alphas, [], None, "search")
    figs = plots.run_figures(run, "matplotlib", "svg")
    assert b"epochs 1 to 3" in figs["alphas_normal"]
    assert b"epochs 3 to 3" in figs["alphas_reduce"]


def test_a_run_s_curves_use_its_engine_s_metric(tmp_path, monkeypatch):
    """The right-hand curves of a run are its engine's metric (a plugin engine judged by
    RMSE: its rmse keys and title), not accuracy."""
    from types import SimpleNamespace

    from diffnas.engine.engines import Metric

    rmse = Metric("test_rmse", "RMSE", "rmse", ".3f", "val_rmse")
    monkeypatch.setattr(plots, "engine_of", lambda cfg: SimpleNamespace(metric=rmse))
    cfg = load_config(None, [], device=False)
    rows = [{"epoch": e, "loss": 1.0, "rmse": 0.5 - 0.1 * e} for e in range(2)]
    run = plots.RunData(tmp_path, cfg, None, rows, [], [], None, "search")
    svg = plots.run_figures(run, "matplotlib", "svg")["curves"]
    assert b"search: RMSE" in svg and b"search: accuracy" not in svg


def test_plot_run_draws_cells_with_the_backend_asked_and_refuses_an_empty_run(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(plots.PlotError, match=r"nothing to plot yet \(no genotype, alphas or "
                                              r"metrics\)"):
        plots.plot_run(run, tmp_path / "out", ("svg",), "matplotlib")
    _genotype().save(run / "search" / "genotype.json")
    paths = plots.plot_run(run, tmp_path / "out", ("svg",), "matplotlib")
    assert sorted(p.name for p in paths) == ["cell_normal.svg", "cell_reduce.svg"]
    svg = paths[0].read_bytes()
    assert b"Graphviz" not in svg and b"Matplotlib" in svg


def test_plots_after_a_run_pass_its_overrides_on(tmp_path, monkeypatch):
    from conftest import _REAL_PLOTS_AFTER_RUN

    seen = []
    monkeypatch.setattr(plots, "plot_run", lambda run_dir, overrides=(): seen.append(
        (run_dir, list(overrides))) or [])
    cfg = load_config(None, ["plots=true"], device=False)
    assert _REAL_PLOTS_AFTER_RUN(tmp_path, cfg, ["plugins=[x]"]) == []
    assert seen == [(tmp_path, ["plugins=[x]"])]


# --- cost ---------------------------------------------------------------------------------
class _Scaled(nn.Module):
    """A linear layer whose output is scaled by a second forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x, scale):
        return self.fc(x) * scale


def test_costs_of_a_float64_model_with_a_forward_argument_match_the_hand_count():
    model = _Scaled().double()
    assert count_macs(model, (5,), 2.0) == 5 * 3
    assert count_flops(model, (5,), 2.0) == 2 * 5 * 3
    assert flops_by_module(model, (5,), 2.0) == {"": 2 * 5 * 3, "fc": 2 * 5 * 3}


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        raise RuntimeError("bad input")


@pytest.mark.parametrize("count", [count_macs, flops_by_module])
def test_a_failing_forward_leaves_the_model_in_training_mode(count):
    model = _Fails().train()
    with pytest.raises(RuntimeError, match="bad input"):
        count(model, (2,))
    assert model.training


def test_flops_by_module_keys_are_submodule_names_and_the_empty_name_for_the_whole():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert flops_by_module(model, (4,)) == {"": 2 * (4 * 3 + 3 * 2), "0": 2 * 4 * 3,
                                            "2": 2 * 3 * 2}
