"""Plots and the HTML report: op labels read back from SVG, one heatmap row per edge, a
report that references nothing outside itself and opens cleanly in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from diffnas.cli import main
from diffnas.genotype import published_genotype
from diffnas.report import plots
from diffnas.report.html import browser_check, find_browser, render_report, write_report

TINY_RUN = [
    "data.name=digits", "data.train_subset=64", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=3",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=64",
    "retrain.network={C: 4, layers: 3}", "retrain.auxiliary_weight=0", "retrain.cutout=0",
    "progress=false",
]
BACKENDS = ["matplotlib",
            pytest.param("graphviz", marks=pytest.mark.skipif(
                shutil.which("dot") is None, reason="Graphviz's dot is not installed"))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["search", f"out_dir={out}", "name=tiny", *TINY_RUN]) == 0
    return out / "tiny"


def svg_texts(data: bytes) -> list[str]:
    """Every text string of an SVG (each <text>, with its <tspan>s joined)."""
    root = ET.fromstring(data)
    return ["".join(el.itertext()).strip() for el in root.iter()
            if el.tag.rsplit("}", 1)[-1] == "text"]


# --- cell diagrams ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell_name", ["normal", "reduce"])
def test_cell_svg_labels_every_edge_with_its_op(backend, cell_name):
    cell = published_genotype("DARTS_V2").cell(cell_name)
    texts = Counter(svg_texts(plots.render_cell(cell, "svg", backend)))
    expected = Counter(e.op for e in cell.edges)
    for op, n in expected.items():
        assert texts[op] == n, f"{op}: {texts[op]} labels in the SVG, {n} edges in the cell"
    names = plots.node_names(cell)
    assert all(texts[names[n]] == 1 for n in cell.nodes)  # every intermediate node drawn once
    assert texts["c_{k-2}"] == texts["c_{k-1}"] == texts["c_{k}"] == 1


def test_cell_dot_has_one_labelled_edge_per_genotype_edge():
    cell = published_genotype("DARTS_V1").cell("reduce")
    dot = plots.cell_dot(cell)
    labelled = re.findall(r'"([^"]+)" -> "([^"]+)" \[label="([^"]+)"\]', dot)
    names = plots.node_names(cell)
    assert sorted(labelled) == sorted((names[e.src], names[e.dst], e.op) for e in cell.edges)
    assert dot.count("style=dashed") == len(cell.concat)


def test_png_output_is_a_png():
    cell = published_genotype("DARTS_V2").cell("normal")
    assert plots.render_cell(cell, "png", "matplotlib")[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_backend_and_format_are_errors():
    cell = published_genotype("DARTS_V2").cell("normal")
    with pytest.raises(plots.PlotError, match="backend"):
        plots.render_cell(cell, "svg", "tikz")
    with pytest.raises(plots.PlotError, match="format"):
        plots.render_cell(cell, "jpg")


# --- alpha heatmap ---------------------------------------------------------------
def _records(epochs: int, edges: int, ops: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for e in range(epochs):
        logits = rng.normal(size=(edges, ops))
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        recs.append({"epoch": e, "normal": p.tolist()})
    return recs[::-1]  # out of order on purpose: the matrix sorts by epoch


def test_alpha_matrix_matches_the_records():
    recs = _records(epochs=4, edges=5, ops=3)
    mat = plots.alpha_matrix(recs, "normal")
    assert mat.shape == (5, 3, 4)
    by_epoch = {r["epoch"]: np.asarray(r["normal"]) for r in recs}
    for e in range(4):
        np.testing.assert_array_equal(mat[:, :, e], by_epoch[e])


def test_heatmap_has_one_row_per_edge():
    edges, ops, epochs = 5, 3, 4
    labels = [f"normal/n{2 + i // 2}/e{i % 2}" for i in range(edges)]
    mat = plots.alpha_matrix(_records(epochs, edges, ops), "normal")
    fig = plots.alpha_heatmap_figure(mat, labels, ["a_op", "b_op", "c_op"])
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (edges, ops * epochs)
    # column op * epochs + epoch holds that op's weight at that epoch
    np.testing.assert_array_equal(image[:, 1 * epochs + 2], mat[:, 1, 2])
    texts = Counter(svg_texts(plots.figure_bytes(fig, "svg")))
    ticks = [plots._edge_tick(lb) for lb in labels]
    assert all(texts[t] == 1 for t in ticks)
    assert all(texts[o] == 1 for o in ("a_op", "b_op", "c_op"))


def test_a_long_run_s_heatmap_shows_evenly_spaced_epochs_first_and_last_included():
    """One column per op per epoch had no cap: 2,000 epochs of a graph search drew a
    69,000-pixel-wide PNG and took 1.2 GB to plot."""
    epochs = 1000
    mat = np.random.default_rng(0).random((2, 3, epochs))
    fig = plots.alpha_heatmap_figure(mat, ["normal/n2/e0", "normal/n2/e1"], ["a", "b", "c"])
    image = fig.axes[0].images[0].get_array()
    n = plots.HEATMAP_EPOCHS
    assert image.shape == (2, 3 * n) and fig.get_figwidth() < 60
    keep = np.linspace(0, epochs - 1, n).round().astype(int)
    np.testing.assert_array_equal(image[:, n:2 * n], mat[:, 1, keep])  # op b, its epochs
    assert keep[0] == 0 and keep[-1] == epochs - 1
    assert fig.axes[0].get_xlabel().endswith(f"epochs 1 to {epochs}, left to right; "
                                             f"{n} of {epochs} evenly spaced)")


def test_a_diverged_epoch_does_not_take_the_heatmap_scale_with_it():
    mat = plots.alpha_matrix(_records(3, 4, 3), "normal")
    finite = mat.copy()
    mat[:, :, -1] = np.nan  # the last epoch diverged
    im = plots.alpha_heatmap_figure(mat, [f"normal/n2/e{i}" for i in range(4)],
                                    ["a", "b", "c"]).axes[0].images[0]
    lo, hi = im.get_clim()
    assert (lo, hi) == (float(finite[:, :, :-1].min()), float(finite[:, :, :-1].max()))


def test_retrain_curves_show_a_validation_series_when_logged():
    rows = [{"epoch": e, "loss": 1.0 / (e + 1), "acc": 0.5, "val_loss": 1.2, "val_acc": 0.4}
            for e in range(3)]  # as the graph engine's retraining logs them
    fig = plots.curves_figure([], rows)
    assert [ln.get_label() for ln in fig.axes[1].lines] == ["train", "validation"]


def test_curves_of_a_plugin_engine_plot_its_own_metric_by_split():
    """An engine judged by RMSE logs rmse / val_rmse / test_rmse beside their losses: the
    right-hand plots show those, titled by the metric (not an empty accuracy plot)."""
    from diffnas.engine.engines import Metric

    rmse = Metric("test_rmse", "RMSE", "rmse", ".3f", "val_rmse")
    rows = [{"epoch": e, "loss": 1.0 / (e + 1), "rmse": 0.9 - 0.1 * e, "val_loss": 1.2,
             "val_rmse": 1.0, "test_rmse": 1.1, "lr": 0.1} for e in range(3)]
    fig = plots.curves_figure(rows, rows, rmse)
    assert [ax.get_title() for ax in fig.axes] == ["search: loss", "search: RMSE",
                                                   "retrain: loss", "retrain: RMSE"]
    assert [ln.get_label() for ln in fig.axes[1].lines] == ["train", "test", "val"]
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["train", "val"]
    assert list(fig.axes[1].lines[0].get_ydata()) == pytest.approx([0.9, 0.8, 0.7])


def test_heatmap_rejects_mismatched_labels():
    mat = plots.alpha_matrix(_records(2, 3, 2), "normal")
    with pytest.raises(plots.PlotError, match="do not match"):
        plots.alpha_heatmap_figure(mat, ["only", "two"], ["x", "y"])


# --- a whole run -----------------------------------------------------------------
def test_plot_command_writes_png_and_svg(run_dir, tmp_path):
    assert main(["plot", str(run_dir), "--out", str(tmp_path), "--backend", "matplotlib"]) == 0
    names = {"cell_normal", "cell_reduce", "alphas_normal", "alphas_reduce", "curves"}
    assert {p.name for p in tmp_path.iterdir()} == {f"{n}.{f}" for n in names
                                                     for f in ("png", "svg")}
    run = plots.load_run(run_dir)
    n_edges = len(run.edge_groups()["normal"][0])  # 2 nodes: 2 + 3 edges
    assert n_edges == 5
    rows = [json.loads(ln) for ln in (run_dir / "search/alphas.jsonl").read_text().splitlines()]
    texts = Counter(svg_texts((tmp_path / "alphas_normal.svg").read_bytes()))
    assert sum(texts[plots._edge_tick(lb)] for lb in run.edge_groups()["normal"][0]) == n_edges
    assert len(rows) == 3 and plots.alpha_matrix(rows, "normal").shape == (5, 8, 3)
    genotype_ops = Counter(e.op for e in run.genotype.cell("normal").edges)
    texts = Counter(svg_texts((tmp_path / "cell_normal.svg").read_bytes()))
    assert all(texts[op] == n for op, n in genotype_ops.items())


class _Refs(HTMLParser):
    """Collects what a page would fetch: URL-valued attributes, tags that embed, CSS urls."""

    URL_ATTRS = {"src", "href", "srcset", "data", "poster", "action", "xlink:href"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        for k, v in attrs:
            if k in self.URL_ATTRS and v is not None:
                self.urls.append(v)
            if k == "style" and v and "url(" in v:
                self.urls.append(v)


def external_refs(page: str) -> list[str]:
    """Everything in ``page`` that would be loaded from outside the file."""
    p = _Refs()
    p.feed(page)
    bad = [u for u in p.urls if not u.startswith("data:")]
    bad += [f"<{t}>" for t in ("script", "link", "iframe", "object", "embed") if p.tags[t]]
    stripped = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", page)
    bad += re.findall(r"(?:https?:|ftp:|url\(|@import)\S*", stripped)
    return bad


def test_reference_checker_catches_external_resources():
    page = ('<html><head><link rel="stylesheet" href="x.css"></head><body>'
            '<img src="https://example.org/a.png"><img src="data:image/png;base64,AAAA">'
            '<div style="background: url(b.png)"></div></body></html>')
    found = external_refs(page)
    assert "x.css" in found and "https://example.org/a.png" in found
    assert "<link>" in found and any("url(" in f for f in found)
    assert not any(f.startswith("data:") for f in found)


def test_report_is_one_file_with_no_external_resources(run_dir, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert external_refs(page) == []
    assert list(tmp_path.iterdir()) == [out]  # nothing written beside it
    # the embedded images decode, and the cell diagrams carry the genotype's ops
    uris = re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)
    svgs = [base64.b64decode(u) for u in uris]
    assert len(svgs) == 5  # 2 cells, 2 heatmaps, curves
    run = plots.load_run(run_dir)
    for i, cell in enumerate(run.genotype.cells):
        texts = Counter(svg_texts(svgs[i]))
        assert all(texts[e.op] >= 1 for e in cell.edges)
    result = json.loads((run_dir / "retrain/result.json").read_text())
    assert f"{100 * result['test_acc']:.2f}%" in page
    assert f"{result['params']:,}" in page and str(run.genotype).replace("'", "&#x27;") in page


def test_report_and_export_of_a_train_run(run_dir, tmp_path, monkeypatch, capsys):
    """A diffnas train run is read as train read its config (no search-only checks: here
    data.batch_size gives no search batch from data.train_subset), shows its pinned
    genotype while unfinished, and every metrics key of any row gets a column."""
    from diffnas.export import export_run

    out = tmp_path / "runs"
    argv = ["train", "--genotype", str(run_dir / "search/genotype.json"), f"out_dir={out}",
            "name=t", *TINY_RUN, "data.batch_size=64"]
    assert main(argv) == 0, capsys.readouterr().err
    run = plots.load_run(out / "t")
    assert run.genotype is not None and run.result is not None
    assert export_run(out / "t", "torchscript", check=False).max_abs_diff is None
    (out / "t/retrain/result.json").unlink()  # unfinished: the pinned genotype shows
    assert plots.load_run(out / "t").genotype == run.genotype
    with (out / "t/retrain/metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 1, "loss": 1.0, "late_key": 0.5}) + "\n")
    monkeypatch.chdir(out / "t")
    page = render_report(plots.load_run("."), backend="matplotlib")
    assert "<title>diffnas run t</title>" in page and "<th>late_key</th>" in page
    # it ran no search: no search rows (they showed the config's unread defaults)
    assert "retraining of a given genotype (diffnas train)" in page
    assert "space / strategy" not in page and "search epochs" not in page


def test_report_out_a_folder_and_damaged_result_files(run_dir, tmp_path, capsys):
    """--out naming an existing folder writes report.html in it (it was a traceback); a
    result.json without params shows '-' (KeyError); a metrics row without an epoch is an
    error naming the file and row (KeyError)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    folder = tmp_path / "pages"
    folder.mkdir()
    assert main(["report", str(run), "--out", str(folder)]) == 0
    assert (folder / "report.html").is_file()
    assert main(["report", str(run), "--out", f"{tmp_path / 'new'}/"]) == 0  # made
    assert (tmp_path / "new/report.html").is_file()
    result = json.loads((run / "retrain/result.json").read_text())
    del result["params"]
    (run / "retrain/result.json").write_text(json.dumps(result))
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "<tr><th>parameters (without auxiliary head)</th><td>-</td></tr>" in page
    with (run / "search/metrics.jsonl").open("a") as f:
        f.write('{"loss": 1.0}\n')
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'search/metrics.jsonl'}: row 4 has no integer 'epoch'" in err


def test_report_of_a_search_without_retraining(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("retrain"))
    page = render_report(plots.load_run(partial), backend="matplotlib")
    assert "not run (or not finished)" in page and external_refs(page) == []


needs_chromium = pytest.mark.skipif(find_browser() is None,
                                    reason="no Chromium (apt-get install chromium)")


@needs_chromium
def test_browser_check_detects_console_errors_and_broken_images(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>console.error("boom")'
                   "</script></body></html>")
    res = browser_check(bad)
    assert any("boom" in m for m in res["console"])
    assert res["image_widths"] == [0]


@needs_chromium
def test_report_opens_in_headless_chromium_without_console_errors(run_dir, tmp_path):
    path = write_report(run_dir, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    res = browser_check(path, screenshot=shot)
    assert res["console"] == []
    assert len(res["image_widths"]) == 5 and all(w > 0 for w in res["image_widths"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_language_model_run_shows_perplexities(tmp_path):
    """LM runs (engine/lm.py) log perplexity and report no MACs: the page and the curves
    show the perplexities instead of failing on the missing accuracy keys."""
    from diffnas.config import load_config, save_config

    run = tmp_path / "lm"
    (run / "search").mkdir(parents=True)
    (run / "retrain").mkdir()
    save_config(load_config(Path(__file__).parents[1] / "configs/darts_rnn_ptb.yaml"),
                run / "config.yaml")
    published_genotype("DARTS_RNN_V2").save(run / "search" / "genotype.json")
    rows = [{"epoch": e, "loss": 6.0 - e, "ppl": 400.0 - 50 * e, "valid_loss": 6.1 - e,
             "valid_ppl": 450.0 - 60 * e, "lr": 20.0} for e in range(3)]
    for phase in ("search", "retrain"):
        (run / phase / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "retrain" / "result.json").write_text(json.dumps(
        {"params": 23_456_789, "epochs_done": 3, "valid_ppl": 312.25, "test_ppl": 298.5,
         "test_loss": 5.7, "genotype": published_genotype("DARTS_RNN_V2").to_dict()}))
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "312.25 / 298.50" in page and "23,456,789" in page
    assert "perplexity, final" in page  # no best_epoch: the last (averaged) weights
    # a retraining that kept the best validation epoch's weights says so, not "final"
    result = json.loads((run / "retrain" / "result.json").read_text())
    (run / "retrain" / "result.json").write_text(json.dumps({**result, "best_epoch": 1}))
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "perplexity, best validation epoch (2)" in page and "final" not in page
    curves = plots.curves_figure(rows, rows)
    titles = [ax.get_title() for ax in curves.axes]
    assert titles == ["search: loss", "search: perplexity", "retrain: loss",
                      "retrain: perplexity"]
    assert all(len(ax.lines) == 2 for ax in curves.axes)  # train and validation


def test_report_of_a_graph_run_names_the_best_epoch_and_the_last(tmp_path, run_dir):
    """Graph retrainings report the test accuracy of the best validation epoch's weights
    (and the last epoch's beside it); the page called the first "final"."""
    import shutil

    run = tmp_path / "g"
    shutil.copytree(run_dir, run)
    result = json.loads((run / "retrain" / "result.json").read_text())
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "test accuracy, final" in page and "test accuracy, last epoch" not in page
    (run / "retrain" / "result.json").write_text(json.dumps(
        {**result, "test_acc": 0.5, "best_epoch": 31, "last_test_acc": 0.7222}))
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "test accuracy, best validation epoch (32)</th><td>50.00%" in page
    assert "test accuracy, last epoch</th><td>72.22%" in page


def test_a_screenshot_chromium_did_not_write_is_an_error(tmp_path, monkeypatch):
    """--screenshot used to print its path even when the browser wrote nothing there; now
    the PNG appears only when written, and an older file of that name stays."""
    from diffnas.report import html as report_html

    page = tmp_path / "report.html"
    page.write_text("<html><body>hi</body></html>")
    shot = tmp_path / "shot.png"
    shot.write_bytes(b"old png")
    monkeypatch.setattr(report_html, "_chromium", lambda *a, **k: "")
    with pytest.raises(OSError, match="Chromium wrote no screenshot"):
        browser_check(page, screenshot=shot, browser="chromium")
    assert shot.read_bytes() == b"old png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "shot.png"]


# --- outputs that would lose work (audit F2, F5), damaged alphas (F4), provisional (F7)
def test_report_and_plot_never_replace_a_run_file_and_a_users_only_with_force(run_dir,
                                                                              tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    kept = {p: p.read_bytes() for p in (run / "retrain/result.json", run / "config.yaml")}
    for target in kept:
        for force in ([], ["--force"]):  # a run's own file: not even with --force
            assert main(["report", str(run), "--out", str(target), *force]) == 2
            err = capsys.readouterr().err
            assert f"--out {target}: that path is the run {run}'s own" in err
    assert main(["plot", str(run), "--out", str(run / "search")]) == 2
    assert "that path is the run" in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert not list((run / "search").glob("*.svg"))
    # a user's file: refused, kept, replaced with --force
    mine = tmp_path / "report.html"
    mine.write_text("precious report")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    assert "not a report diffnas wrote" in capsys.readouterr().err
    assert mine.read_text() == "precious report"
    assert main(["report", str(run), "--out", str(mine), "--force"]) == 0
    assert main(["report", str(run), "--out", str(mine)]) == 0  # its own report: replaced
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "curves.svg").write_text("mine")
    assert main(["plot", str(run), "--out", str(pics), "--format", "svg"]) == 2
    assert f"--out {pics / 'curves.svg'}: that file is not a picture" in capsys.readouterr().err
    assert [p.name for p in pics.iterdir()] == ["curves.svg"]  # nothing written
    assert main(["plot", str(run), "--out", str(pics), "--format", "svg", "--force"]) == 0
    assert main(["plot", str(run), "--out", str(pics)]) == 0  # its own pictures (PNG too)
    assert main(["plot", str(run), "--out", str(pics)]) == 0
    from diffnas.report.outputs import is_plot

    assert all(is_plot(p) for p in pics.iterdir())


def test_pictures_and_reports_carry_their_marker(run_dir, tmp_path):
    from diffnas.report.outputs import is_plot, is_report

    paths = plots.plot_run(run_dir, tmp_path / "p", backend="matplotlib")
    assert paths and all(is_plot(p) for p in paths)
    from PIL import Image  # the PNG chunk added keeps the file a valid PNG

    png = next(p for p in paths if p.suffix == ".png")
    Image.open(png).load()
    assert all(ET.fromstring(p.read_bytes()) is not None for p in paths if p.suffix == ".svg")
    page = write_report(run_dir, tmp_path / "r.html", backend="matplotlib")
    assert is_report(page) and not is_report(png)
    assert not is_plot(page)


def test_pictures_from_before_the_marker_in_the_runs_plots_are_replaced(run_dir, tmp_path,
                                                                      capsys):
    """Graphviz's PNGs name no tool, so a run plotted before the marker could not be
    plotted again at its default folder. There, a PNG or SVG of plot's names is plot's;
    elsewhere (--out) a picture without the marker is still the user's."""
    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "plots").mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(run / "plots" / "curves.png")  # no tool named inside
    assert main(["plot", str(run), "--format", "png"]) == 0, capsys.readouterr().err
    assert b"diffnas plot" in (run / "plots" / "curves.png").read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.new("RGB", (4, 4)).save(mine / "curves.png")
    assert main(["plot", str(run), "--out", str(mine), "--format", "png"]) == 2
    assert "not a picture diffnas wrote" in capsys.readouterr().err


def test_an_unwritable_run_folder_names_the_target_and_suggests_out(run_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """A read-only run directory (simulated: root ignores permissions): the error names
    the file to write, not a temporary one, and says to pass --out."""
    def denied(*args, dir=None, **kw):
        raise PermissionError(13, "Permission denied", f"{dir}/.tmp123")

    monkeypatch.setattr("diffnas.report.outputs.tempfile.mkstemp", denied)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run_dir / 'report.html'} (Permission denied" in err
    assert "pass --out to write elsewhere" in err and ".tmp" not in err
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'p'} (Permission denied" in err
    assert "choose another --out" in err


def test_a_malformed_alpha_row_names_the_file_and_row(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with (run / "search/alphas.jsonl").open("a") as f:
        f.write('{"epoch": 3, "normal": [[1, 2], [3]]}\n')
    for cmd in ("report", "plot"):
        assert main([cmd, str(run), "--out", str(tmp_path / cmd)]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'search/alphas.jsonl'}: row 4 (\"epoch\": 3): its 'normal'" in err
        assert "inhomogeneous" not in err
    with pytest.raises(plots.PlotError, match="row 2 .* of shape"):
        plots.alpha_matrix([{"epoch": 0, "n": [[1, 2]]}, {"epoch": 1, "n": [[1, 2, 3]]}], "n")


def test_the_report_of_an_unfinished_search_says_its_genotype_is_provisional(run_dir,
                                                                            tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("retrain"))
    (run / "search/genotype.json").unlink()
    (run / "search/DONE").unlink()
    page = render_report(plots.load_run(run), backend="matplotlib")
    # every epoch logged, only genotype.json missing: not "may still change"
    assert "genotype logged after the last epoch (3); the search stopped before writing" \
        in page and "may still change" not in page
    rows = (run / "search/genotypes.jsonl").read_text().splitlines()
    (run / "search/genotypes.jsonl").write_text("\n".join(rows[:2]) + "\n")  # 2 epochs ran
    page = render_report(plots.load_run(run), backend="matplotlib")
    assert "Latest genotype, after epoch 2 of 3; the search has not finished" in page
    assert "normal cell (latest genotype, after epoch 2 of 3" in page
    final = render_report(plots.load_run(run_dir), backend="matplotlib")
    assert "the search has not finished" not in final


# --- pictures drawn as a run ends --------------------------------------------------------
PICTURES = sorted(f"{name}.{fmt}" for fmt in ("png", "svg") for name in (
    "cell_normal", "cell_reduce", "alphas_normal", "alphas_reduce", "curves"))


@pytest.mark.run_plots
def test_search_train_and_seeds_end_with_their_plots_drawn(tmp_path, capsys):
    """A search run's plots/ holds both cells, both alpha heatmaps and the curves once it
    ends, as `diffnas plot` draws them; a train run its cells and curves; a --seeds run's
    seeds each their own."""
    out = tmp_path / "runs"
    assert main(["search", f"out_dir={out}", "name=s", *TINY_RUN]) == 0
    assert sorted(p.name for p in (out / "s/plots").iterdir()) == PICTURES
    assert f"plots: {out / 's/plots'} (10 pictures; plots=false skips them)" in (
        out / "s/log.txt").read_text()
    curves = svg_texts((out / "s/plots/curves.svg").read_bytes())
    assert "retrain: accuracy" in curves  # drawn after the retraining ended
    assert main(["train", "--genotype", str(out / "s/search/genotype.json"), f"out_dir={out}",
                 "name=t", *TINY_RUN]) == 0
    assert sorted(p.name for p in (out / "t/plots").iterdir()) == [
        p for p in PICTURES if not p.startswith("alphas")]
    assert main(["search", "--seeds", "0", "--workers", "1", f"out_dir={out}", "name=m",
                 *TINY_RUN, "search.epochs=1"]) == 0
    assert sorted(p.name for p in (out / "m/seed_0/plots").iterdir()) == PICTURES
    assert not (out / "m/plots").exists()  # the parent is no run: no pictures of its own


@pytest.mark.run_plots
def test_plots_after_a_run_skip_when_off_and_never_fail_it(run_dir, tmp_path, caplog):
    """plots=false draws nothing; a picture that cannot be written (a file of the user's
    in plots/) is a warning naming it and `diffnas plot`, the file kept, nothing raised."""
    import dataclasses

    from diffnas.engine.rundir import load_run_config

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "plots", ignore_errors=True)
    cfg = load_run_config(run)
    assert plots.plots_after_run(run, dataclasses.replace(cfg, plots=False)) == []
    assert not (run / "plots").exists()
    (run / "plots").mkdir()
    (run / "plots/curves.svg").write_text("mine")
    with caplog.at_level("WARNING", logger="diffnas"):
        assert plots.plots_after_run(run, cfg) == []
    assert "plots not drawn (OutputRefused:" in caplog.text and "curves.svg" in caplog.text
    assert f"diffnas plot {run} draws them" in caplog.text
    assert [p.name for p in (run / "plots").iterdir()] == ["curves.svg"]
    assert (run / "plots/curves.svg").read_text() == "mine"
    (run / "plots/curves.svg").unlink()
    assert len(plots.plots_after_run(run, cfg)) == 10
