"""Rules of the HTML report page and of where report outputs may go, second audit.

``report/html.py``: which summary rows a search-only, retrained, language-model or plugin
engine run shows (dataset resolution, default strategy, epochs done, a zero accuracy or
MAC count still shown, the parameter label per engine), the genotype text of a plugin
space, which figure lands in which section with which caption, the metrics tables, the
configuration section, the page title of ``.`` and the default-path error of
``write_report``. ``report/outputs.py``: which paths belong to a run (every top-level run
file, a ``--seeds`` parent and its seed folders, symlinks into a run), the messages of a
refused or failed write, and the markers of reports and pictures. Runs are built by hand
(a RunData or a few files); figures are stubbed where only the page layout is checked.
The first audit of this area is tests/test_report_callbacks_rules.py.
"""

from __future__ import annotations

import base64
import errno
import html
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from diffnas.genotype import CellGenotype, Edge, Genotype

ROOT = Path(__file__).parents[1]


def _run(tmp_path, result=None, search=(), retrain=(), genotype=None, kind="search",
         overrides=(), config=None, name="run", provisional=None):
    """A RunData over an (empty) folder: config with 4 search and 3 retrain epochs."""
    from diffnas.config import load_config
    from diffnas.report.plots import RunData

    cfg = load_config(config, ["search.epochs=4", "retrain.epochs=3", *overrides])
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return RunData(path, cfg, genotype, list(search), [], list(retrain), result, kind,
                   provisional)


def _rows(run) -> dict[str, str]:
    from diffnas.report.html import _summary_rows

    return dict(_summary_rows(run))


def _genotype(space="darts_cnn") -> Genotype:
    normal = CellGenotype("normal", (Edge("skip_connect", 0, 2), Edge("sep_conv_3x3", 1, 2),
                                     Edge("max_pool_3x3", 0, 3), Edge("skip_connect", 2, 3)),
                          (2, 3))
    reduce = CellGenotype("reduce", (Edge("max_pool_3x3", 0, 2), Edge("skip_connect", 1, 2)),
                          (2,))
    return Genotype(space, (normal, reduce))


# --- the summary ------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [None, 16])
def test_the_dataset_row_names_a_resolution_only_when_one_is_set(tmp_path, resolution):
    over = [] if resolution is None else [f"data.resolution={resolution}"]
    run = _run(tmp_path, overrides=over)
    want = run.config.data.name + ("" if resolution is None else f" at {resolution}px")
    assert _rows(run)["dataset"] == want


def test_a_strategy_section_without_a_name_is_darts(tmp_path):
    run = _run(tmp_path)
    run.config.search.strategy = {"lr": 0.1}
    space = run.config.search.space["name"]
    assert _rows(run)["space / strategy"] == f"{space} / darts"


def test_a_retraining_run_has_no_search_rows(tmp_path):
    rows = _rows(_run(tmp_path, kind="train"))
    assert rows["run"].startswith("retraining of a given genotype")
    assert "space / strategy" not in rows and "search epochs" not in rows


def test_an_accuracy_and_a_mac_count_of_zero_are_shown_not_dropped(tmp_path):
    result = {"test_acc": 0.5, "last_test_acc": 0.0, "best_epoch": 0, "epochs_done": 2,
              "params": 7, "macs": 0}
    rows = _rows(_run(tmp_path, result))
    assert rows["test accuracy, last epoch"] == "0.00%"
    assert rows["MACs per image"] == "0.00 M" and rows["FLOPs per image (2 x MACs)"] == "0.00 M"


def test_the_retrain_epochs_row_is_the_epochs_done_of_the_configured_ones(tmp_path):
    result = {"test_acc": 0.5, "epochs_done": 2, "params": 7}
    run = _run(tmp_path, result)
    assert _rows(run)["retrain epochs"] == f"2 of {run.config.retrain.epochs}" == "2 of 3"


def test_a_search_without_retraining_says_so_and_times_only_its_search(tmp_path):
    search = [{"epoch": e, "val_acc": 0.5, "seconds": 5.0} for e in range(2)]
    rows = _rows(_run(tmp_path, None, search))
    assert rows["retraining"] == "not run (or not finished)"
    assert [k for k in rows if " time " in k] == ["search time (wall clock, 2 epochs)"]


def test_a_language_model_summary_shows_its_last_search_perplexity(tmp_path):
    from diffnas.engine.engines import engine_of

    run = _run(tmp_path, config=ROOT / "configs/darts_rnn_ptb.yaml",
               search=[{"epoch": 0, "valid_ppl": 500.0}, {"epoch": 1, "valid_ppl": 321.5}])
    name = engine_of(run.config).metric.search_name
    assert "perplexity" in name
    assert _rows(run)[f"{name} (last epoch)"] == "321.50"


def test_a_graph_run_counts_parameters_without_naming_an_auxiliary_head(tmp_path):
    run = _run(tmp_path, {"test_acc": 0.5, "epochs_done": 3, "params": 1234},
               config=ROOT / "configs/gnn_cora.yaml")
    rows = _rows(run)
    assert rows["parameters"] == "1,234"
    assert not any("auxiliary" in k for k in rows)


@pytest.mark.parametrize("title, best, want", [
    ("Lowest energy", 4, "Lowest energy, best epoch (5)"),
    (None, 4, "test RMSE, best validation epoch (5)"),
    (None, None, "test RMSE, final"),
])
def test_a_plugin_engine_s_figure_is_named_by_its_title_and_best_epoch(tmp_path, monkeypatch,
                                                                      title, best, want):
    import diffnas.report.html as h
    from diffnas.engine.engines import Metric

    metric = Metric("rmse", "RMSE", "rmse", ".3f", None, title=title)
    monkeypatch.setattr(h, "engine_of", lambda cfg: SimpleNamespace(name="mine", metric=metric))
    result = {"rmse": 0.25, "epochs_done": 3, "params": 99}
    if best is not None:
        result["best_epoch"] = best
    rows = _rows(_run(tmp_path, result))
    assert rows[want] == "0.250" and rows["parameters"] == "99"


# --- the genotype and metrics tables ----------------------------------------------------
def test_a_plugin_space_s_cell_output_names_only_its_nodes(tmp_path):
    from diffnas.report.html import _genotype_table

    text = _genotype_table(_run(tmp_path, genotype=_genotype("no_such_space_xyz")))
    assert "<p>output: from nodes [2, 3]</p>" in text and "None" not in text


def test_a_run_without_a_genotype_says_so(tmp_path):
    from diffnas.report.html import render_report

    page = render_report(_run(tmp_path), "matplotlib")
    genotype = page.split("<h2>Genotype</h2>")[1].split("<h2>")[0]
    assert "no genotype yet" in genotype and "<h2>Cells</h2>" not in page


def test_a_provisional_genotype_is_said_so_above_its_text(tmp_path):
    from diffnas.report.html import _genotype_table

    run = _run(tmp_path, genotype=_genotype(), provisional=1)
    note = run.genotype_note()
    assert note is not None
    text = _genotype_table(run)
    assert text.startswith(f"<p><strong>{html.escape(note[0].upper() + note[1:])}.</strong></p>")


def test_the_metrics_table_has_one_epoch_column_and_four_significant_digits():
    from diffnas.report.html import _metrics_table

    table = _metrics_table([{"epoch": 0, "loss": 0.123456, "note": "x"}])
    assert re.findall(r"<th>(\w+)</th>", table) == ["epoch", "loss", "note"]
    assert f'<td class="num">{0.123456:.4g}</td>' in table and "0.1235" in table
    assert table.endswith("<td>-</td></tr></table>")


# --- the page ---------------------------------------------------------------------------
def _figures() -> dict[str, bytes]:
    return {k: f"<svg>{k}</svg>".encode() for k in
            ("cell_normal", "cell_reduce", "alphas_normal", "alphas_reduce", "curves")}


def _sections(page: str) -> dict[str, str]:
    parts = page.split("<h2>")[1:]
    return {p.split("</h2>")[0]: p.split("</h2>", 1)[1] for p in parts}


def _images(section: str) -> list[tuple[str, str]]:
    """(decoded SVG, caption) of each figure of a section."""
    found = re.findall(r'<img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)">'
                       r"<figcaption>([^<]*)</figcaption>", section)
    return [(base64.b64decode(d).decode(), html.unescape(c)) for d, c in found]


def test_each_figure_lands_in_its_section_with_its_cell_named(tmp_path, monkeypatch):
    import diffnas.report.html as h
    from diffnas.genotype import cell_title

    monkeypatch.setattr(h, "run_figures", lambda run, backend, fmt: _figures())
    run = _run(tmp_path, genotype=_genotype(), provisional=1)
    note = run.genotype_note()
    s = _sections(h.render_report(run, "matplotlib"))
    assert _images(s["Cells"]) == [
        ("<svg>cell_normal</svg>", f"{cell_title('normal')} ({note})"),
        ("<svg>cell_reduce</svg>", f"{cell_title('reduce')} ({note})")]
    assert _images(s["Architecture weights over the search"]) == [
        ("<svg>alphas_normal</svg>", f"{cell_title('normal')}: softmax(alpha) per edge and epoch"),
        ("<svg>alphas_reduce</svg>", f"{cell_title('reduce')}: softmax(alpha) per edge and epoch")]
    assert _images(s["Curves"]) == [("<svg>curves</svg>", "loss and accuracy per epoch")]


def test_the_metrics_section_tables_each_phase_s_own_rows(tmp_path, monkeypatch):
    import diffnas.report.html as h

    monkeypatch.setattr(h, "run_figures", lambda run, backend, fmt: {})
    search = [{"epoch": e, "search_only": 0.5} for e in range(2)]
    retrain = [{"epoch": e, "retrain_only": 0.25} for e in range(3)]
    metrics = _sections(h.render_report(_run(tmp_path, None, search, retrain), "x"))["Metrics"]
    s_part, r_part = metrics.split("<h3>retraining</h3>")
    assert s_part.strip().startswith("<h3>search</h3>")
    assert "search_only" in s_part and "retrain_only" not in s_part
    assert "retrain_only" in r_part and "search_only" not in r_part
    assert r_part.count("<tr>") == 1 + len(retrain)


def test_the_configuration_section_is_the_run_s_config(tmp_path, monkeypatch):
    import diffnas.report.html as h
    from diffnas.config import to_dict

    monkeypatch.setattr(h, "run_figures", lambda run, backend, fmt: {})
    run = _run(tmp_path, overrides=["data.batch_size=17"])
    pre = _sections(h.render_report(run, "x"))["Configuration"]
    text = html.unescape(pre.split("<pre>")[1].split("</pre>")[0])
    assert yaml.safe_load(text) == to_dict(run.config)
    assert yaml.safe_load(text)["data"]["batch_size"] == 17


def test_the_page_names_a_run_given_as_dot_and_its_full_path(tmp_path, monkeypatch):
    import diffnas.report.html as h

    monkeypatch.setattr(h, "run_figures", lambda run, backend, fmt: {})
    run = _run(tmp_path, name="my_run")
    monkeypatch.chdir(run.path)
    run.path = Path(".")
    page = h.render_report(run, "x")
    assert "<title>diffnas run my_run</title>" in page
    assert _rows(run)["run directory"] == str(tmp_path.resolve() / "my_run")


def test_a_user_file_at_the_default_report_path_suggests_out(tmp_path, monkeypatch):
    import diffnas.report.html as h
    from diffnas.report.outputs import OutputRefused

    run = _run(tmp_path)
    monkeypatch.setattr(h, "load_run", lambda run_dir, overrides=(): run)
    (run.path / "report.html").write_text("my notes")
    with pytest.raises(OutputRefused) as err:
        h.write_report(run.path)
    msg = str(err.value)
    assert msg.startswith(f"{run.path / 'report.html'}: that file is not a report")
    assert "pass --out to write elsewhere" in msg and "--out " not in msg.split(":")[0]
    assert (run.path / "report.html").read_text() == "my notes"


# --- where outputs go -------------------------------------------------------------------
def _run_dir(path: Path, *marks: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text("{}")
    for m in marks:
        (path / m).mkdir() if "." not in m else (path / m).write_text("{}")
    return path


@pytest.mark.parametrize("name", ["config.yaml", "made_by.txt", "log.txt", "worker.log",
                                  ".lock", "seeds.json", "summary.json", "summary.md"])
def test_every_top_level_run_file_belongs_to_the_run(tmp_path, name):
    from diffnas.report.outputs import run_file_owner

    run = _run_dir(tmp_path / "run", "search")
    assert run_file_owner(run / name) == run
    assert run_file_owner(run / "plots" / name) is None  # deeper down: not a run file


def test_a_seeds_parent_owns_its_files_and_seed_folders_until_they_are_runs(tmp_path):
    from diffnas.report.outputs import run_file_owner

    parent = _run_dir(tmp_path / "p", "seeds.json")  # no made_by.txt, search or retrain
    assert run_file_owner(parent / "summary.md") == parent
    assert run_file_owner(parent / "seed_0" / "plots" / "a.png") == parent
    seed = _run_dir(parent / "seed_1", "search")
    assert run_file_owner(seed / "plots" / "a.png") is None
    assert run_file_owner(seed / "search" / "x") == seed
    assert run_file_owner(parent / "other" / "a.png") is None


def test_a_symlink_into_a_run_is_the_run_s_file_and_the_message_names_it(tmp_path):
    from diffnas.report.outputs import OutputRefused, check_output, run_file_owner

    run = _run_dir(tmp_path / "run", "search")
    link = tmp_path / "link.json"
    link.symlink_to(run / "search" / "genotype.json")
    assert run_file_owner(link) == run.resolve()
    with pytest.raises(OutputRefused) as err:
        check_output(run / "search" / "genotype.json", lambda p: True, "a report",
                     "--out", force=True)
    assert f"the run {run}'s own ({Path('search/genotype.json')})" in str(err.value)
    assert "choose another --out" in str(err.value)


def test_a_folder_passes_the_check_and_force_replaces_a_user_s_file(tmp_path):
    from diffnas.report.outputs import OutputRefused, check_output

    (tmp_path / "d").mkdir()
    assert check_output(tmp_path / "d", lambda p: False, "a report") is None
    mine = tmp_path / "mine.html"
    mine.write_text("mine")
    assert check_output(mine, lambda p: False, "a report", force=True) is None
    dangling = tmp_path / "dangling.html"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputRefused, match=r"--plots-dir .*dangling\.html: that file is not "
                                            r"a report .*choose another --plots-dir"):
        check_output(dangling, lambda p: False, "a report", "--plots-dir")


def test_a_denied_write_names_the_file_to_write_not_a_temporary(tmp_path, monkeypatch):
    import tempfile

    import diffnas.engine.checkpoint as ck
    from diffnas.report.outputs import OutputRefused, check_writable, write_outputs

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/tmp/.x")

    target = tmp_path / "out" / "report.html"
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", denied)
        with pytest.raises(OutputRefused, match=rf"^cannot write {re.escape(str(target))} "
                                                r"\(Permission denied"):
            check_writable(target.parent, target)
    monkeypatch.setattr(ck, "atomic_write_bytes", denied)
    with pytest.raises(OutputRefused, match=rf"^cannot write {re.escape(str(target))} "):
        write_outputs([(target, b"x", lambda p: True)], target.parent, "a report", "report")


def test_report_markers_old_and_new_within_the_head_only(tmp_path):
    from diffnas.report.outputs import LEGACY_REPORT_MARK, REPORT_MARK, is_plot, is_report

    old = tmp_path / "old.html"
    old.write_text("<html><body><p>" + LEGACY_REPORT_MARK + "</p></body></html>")
    assert is_report(old)
    late = tmp_path / "late.html"
    late.write_text("<!-- " + "x" * 1000 + " -->" + REPORT_MARK)
    assert is_report(late)
    too_late = tmp_path / "too_late.html"
    too_late.write_text("x" * 5000 + REPORT_MARK)
    assert not is_report(too_late)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    assert not is_plot(text, legacy=True) and not is_report(tmp_path / "missing.html")
    assert os.path.exists(text)
