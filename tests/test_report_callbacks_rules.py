"""Rules of the per-epoch callbacks and the report that a mutation audit could break: the
metrics JSON-lines files (strict JSON, torn lines, resume trimming, ``seconds``), phase
times, checkpoint temporaries, the collapse diagnostics (which cell, which epoch, the
eigenvalue's start vector), the logger set-up, TensorBoard scalars (entropy of the alpha
weights, purge on resume), the pictures (cell node names, alpha matrices and their
snapshot colours, curve series) and the HTML report's summary rows and escaping, and
where outputs may be written. Each test replays a rule by hand on a tiny example or
compares with an independent computation, not with numbers the code once printed."""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import zlib

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import StatelessTask, jsonl, tiny_batch, tiny_space, tiny_strategy

from diffnas.engine import callbacks as cb
from diffnas.engine import diagnostics as dg
from diffnas.engine.loop import Callback, Loop
from diffnas.genotype import CellGenotype, Edge, Genotype

matplotlib.use("Agg")
F64 = torch.float64


class _Records(logging.Handler):
    """The messages logged to the ``diffnas`` logger while attached (propagation off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffnas_log():
    logger = logging.getLogger("diffnas")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class _LossTask(StatelessTask):
    """Two steps an epoch, the loss of each the epoch number."""

    n = 2

    def step(self, batch):
        return {"loss": 1.0}


def _genotype(cells=("normal", "reduce")) -> Genotype:
    """Normal cell: 3 skip_connect edges of 4; reduce cell: 1 of 2."""
    normal = (Edge("skip_connect", 0, 2), Edge("sep_conv_3x3", 1, 2),
              Edge("skip_connect", 1, 3), Edge("skip_connect", 2, 3))
    reduce = (Edge("skip_connect", 0, 2), Edge("max_pool_3x3", 1, 2))
    made = {"normal": CellGenotype("normal", normal, (2, 3)),
            "reduce": CellGenotype("reduce", reduce, (2,))}
    return Genotype("darts_cnn", tuple(made[c] for c in cells))


# --- metrics JSON lines ----------------------------------------------------------------
@pytest.mark.parametrize("row, want", [
    ({"eval_val_acc": 0.6, "val_acc": 0.4}, (0.6, "eval_val_acc")),  # the whole split first
    ({"eval_val_acc": float("nan"), "val_acc": 0.4}, (0.4, "val_acc")),
    ({"eval_val_acc": True, "val_acc": 0.4}, (0.4, "val_acc")),  # a bool is no accuracy
    ({"eval_val_acc": "0.9", "val_acc": float("inf")}, (None, None)),
    ({}, (None, None)),
])
def test_the_search_accuracy_is_the_end_of_epoch_pass_else_the_alpha_steps_mean(row, want):
    assert cb.search_val_acc(row) == want


def test_a_json_line_is_strict_json_with_non_finite_numbers_as_null_at_any_depth():
    row = {"epoch": 1, "loss": float("nan"), "hist": [1.0, float("inf"), [float("-inf")]],
           "pair": (2.0, float("nan")), "n": {"deep": [float("nan")]}}
    line = cb.json_line(row)
    assert line.endswith("\n") and line.count("\n") == 1

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    back = json.loads(line, parse_constant=refuse)
    assert back == {"epoch": 1, "loss": None, "hist": [1.0, None, [None]], "pair": [2.0, None],
                    "n": {"deep": [None]}}


def test_only_a_torn_last_line_is_dropped_and_a_bad_line_elsewhere_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "lo')
    assert cb.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_text('{"epoch": 0}\n{"epoch": 1, "lo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: not a JSON object"):
        cb.read_jsonl(path)
    path.write_text('{"epoch": 0}\n[1, 2]\n{"epoch": 2}\n')  # valid JSON, not an object
    with pytest.raises(ValueError, match=r"line 2: not a JSON object \(a list"):
        cb.read_jsonl(path)
    assert cb.read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_json_file_holding_another_kind_of_value_is_named_damaged(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("[0.5]")
    with pytest.raises(ValueError, match=r"result\.json: damaged, holds a JSON list.*rerun it"):
        cb.read_json(path, "rerun it")
    path.write_text('{"test_acc": 0.5}')
    assert cb.read_json(path, "rerun it") == {"test_acc": 0.5}


@pytest.mark.parametrize("epoch", [0, 1, 2, 3])
def test_a_resume_keeps_exactly_the_rows_before_its_epoch_and_rows_without_one(tmp_path, epoch):
    path = tmp_path / "m.jsonl"
    rows = [{"epoch": 0}, {"note": "no epoch"}, {"epoch": 1}, {"epoch": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cb.drop_epochs_from(path, epoch)
    assert jsonl(path) == [r for r in rows if r.get("epoch", -1) < epoch]


@pytest.mark.parametrize("have, missing", [([0, 1], "2"), ([1, 2], "0"), ([0, 2], "1")])
def test_a_resume_refuses_a_metrics_file_missing_an_epoch_its_checkpoint_counts(
        tmp_path, have, missing):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"epoch": e}) + "\n" for e in have)
    path.write_text(text)
    loop = Loop(_LossTask(), 5)
    loop.epoch = 3  # the checkpoint counts epochs 0, 1, 2 done
    with pytest.raises(ValueError, match=rf"lacks the rows of 1 of the 3 epochs.*\"epoch\": "
                                         rf"{missing}\)"):
        cb.JsonLines(path).on_run_start(loop)
    assert path.read_text() == text  # a refused resume leaves the file as it was
    path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(4)))
    cb.JsonLines(path).on_run_start(loop)  # whole: only the rows past the checkpoint go
    assert [r["epoch"] for r in jsonl(path)] == [0, 1, 2]


def test_metrics_lines_hold_each_epoch_its_metrics_and_its_own_seconds(tmp_path):
    seen = []

    class Seconds(Callback):
        def on_epoch_end(self, loop, epoch, metrics):
            seen.append(loop.seconds)

    path = tmp_path / "metrics.jsonl"
    Loop(_LossTask(), 3, [cb.MetricsLines(path), Seconds()]).run()
    rows = jsonl(path)
    assert [set(r) for r in rows] == [{"epoch", "loss", "seconds"}] * 3
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [r["seconds"] for r in rows] == seen and all(s >= 0 for s in seen)
    assert cb.total_seconds(rows) == pytest.approx(sum(seen))


@pytest.mark.parametrize("rows, want", [
    ([], None),  # no epochs: no time, not 0 s
    ([{"seconds": 1.5}, {"seconds": 2}], 3.5),
    ([{"seconds": 1.5}, {}], None),  # a run made before times were recorded
    ([{"seconds": 1.5}, {"seconds": True}], None),
    ([{"seconds": 1.5}, {"seconds": float("nan")}], None),
])
def test_a_phase_time_is_the_sum_of_its_epochs_seconds_or_none(rows, want):
    assert cb.total_seconds(rows) == want


@pytest.mark.parametrize("seconds, want", [
    (None, "-"), (0.354, "0.35 s"), (9.994, "9.99 s"), (10.0, "10.0 s"), (59.94, "59.9 s"),
    (60.0, "1 min 0 s"), (119.6, "2 min 0 s"), (185.0, "3 min 5 s"), (3599.4, "59 min 59 s"),
    (3600.0, "1 h 0 min"), (7440.0, "2 h 4 min"),
    # the unit is chosen on the printed value: no "10.00 s", "60.0 s" or "60 min 0 s"
    (9.996, "10.0 s"), (59.96, "1 min 0 s"), (3599.7, "1 h 0 min"), (7169.0, "1 h 59 min"),
    (7170.0, "2 h 0 min"),
])
def test_a_duration_switches_units_at_10_s_a_minute_and_an_hour_and_rounds(seconds, want):
    assert cb.duration(seconds) == want


def test_a_checkpoint_clears_only_the_temporaries_of_a_cut_write(tmp_path):
    ck = tmp_path / "checkpoint.pt"
    torn = tmp_path / ".checkpoint.pt.x1y2.pt"
    keep = [tmp_path / "checkpoint.pt", tmp_path / ".other.pt.x1.pt", tmp_path / "metrics.jsonl"]
    for p in (torn, *keep):
        p.write_bytes(b"x")
    cb.Checkpoint(ck).on_run_start(Loop(_LossTask(), 1))
    assert not torn.exists() and all(p.exists() for p in keep)


def test_the_progress_log_numbers_epochs_from_one_of_the_total(diffnas_log):
    Loop(_LossTask(), 2, [cb.ProgressBar("search", enabled=False)]).run()
    lines = [m for m in diffnas_log.messages if m.startswith("search epoch")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"]
    assert all("loss=1" in ln for ln in lines)


# --- collapse diagnostics --------------------------------------------------------------
@pytest.mark.parametrize("cells, cell, want", [
    (("reduce", "normal"), None, 3),  # normal by default, wherever it is
    (("reduce",), None, 1),  # else the first cell
    (("normal", "reduce"), "reduce", 1),
])
def test_skip_count_counts_the_normal_cell_unless_told(cells, cell, want):
    assert dg.skip_count(_genotype(cells), cell) == want


class _DiagTask(StatelessTask):
    def __init__(self, genotype, strategy=None):
        self.g, self.strategy = genotype, strategy

    def step(self, batch):
        return {"loss": 1.0}

    def genotype(self):
        return self.g


@pytest.mark.parametrize("cell, want", [(None, ("normal", 3)), ("reduce", ("reduce", 1))])
def test_collapse_rows_name_their_epoch_and_the_cell_asked_for(tmp_path, cell, want):
    path = tmp_path / "collapse.jsonl"
    Loop(_DiagTask(_genotype(("reduce", "normal"))), 2,
         [dg.CollapseDiagnostics(path, cell=cell)]).run()
    rows = jsonl(path)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all((r["cell"], r["skip_connect"]) == want and "hessian_eig" not in r for r in rows)


def test_collapse_diagnostics_drop_the_rows_a_resume_runs_again(tmp_path):
    path = tmp_path / "collapse.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "skip_connect": 0}) + "\n" for e in range(3)))
    loop = Loop(_DiagTask(_genotype()), 3, [dg.CollapseDiagnostics(path)])
    loop.epoch = 1
    loop.run()
    assert [(r["epoch"], r["skip_connect"]) for r in jsonl(path)] == [(0, 0), (1, 3), (2, 3)]


def test_the_eigenvalue_uses_the_iterations_asked_for(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dg, "alpha_hessian_eigenvalue",
                        lambda s, b, iters: calls.append((s, b, iters)) or 2.5)
    path = tmp_path / "collapse.jsonl"
    Loop(_DiagTask(_genotype(), strategy="S"), 1,
         [dg.CollapseDiagnostics(path, hessian_batch="B", hessian_iters=7)]).run()
    assert calls == [("S", "B", 7)] and jsonl(path)[0]["hessian_eig"] == 2.5


@pytest.mark.parametrize("seed", [0, 3])
def test_one_lanczos_step_is_the_rayleigh_quotient_of_the_seeded_start_vector(seed):
    """With one Hessian-vector product the estimate is v'Hv for the unit start vector v
    drawn by a private generator seeded with ``seed`` (one per parameter, in order)."""
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    H = q @ torch.diag(torch.tensor([-2.0, 0.1, 0.7, 1.3, 3.0], dtype=F64)) @ q.T
    x = torch.randn(5, generator=g, dtype=F64, requires_grad=True)
    a, b = x[:2], x[2:]  # two parameters (views of one leaf): the start vector spans both
    pa = a.detach().clone().requires_grad_(True)
    pb = b.detach().clone().requires_grad_(True)
    xx = torch.cat([pa, pb])
    rng = torch.Generator().manual_seed(seed)
    v = torch.cat([torch.randn(2, generator=rng, dtype=F64), torch.randn(3, generator=rng,
                                                                          dtype=F64)])
    v = v / v.norm()
    want = float(v @ H @ v)
    got = dg.largest_eigenvalue(0.5 * xx @ H @ xx, [pa, pb], iters=1, seed=seed)
    assert got == pytest.approx(want, rel=1e-10)
    got = dg.dominant_eigenvalue(0.5 * xx @ H @ xx, [pa, pb], iters=1, seed=seed)
    assert got == pytest.approx(want, rel=1e-10)


def test_the_eigenvalue_of_a_gumbel_search_is_that_of_its_softmax_and_deterministic():
    """A stochastic relaxation is measured through the softmax, so two draws agree and equal
    the value of the same strategy with the softmax relaxation."""
    from diffnas.arch.relax import SoftmaxRelaxation

    s = tiny_strategy({"name": "gdas"}, dtype=F64)
    batch = tiny_batch(4, 2, F64)
    assert s.relaxation.stochastic
    torch.manual_seed(1)
    a = dg.alpha_hessian_eigenvalue(s, batch, iters=4)
    torch.manual_seed(2)
    b = dg.alpha_hessian_eigenvalue(s, batch, iters=4)
    s.relaxation = SoftmaxRelaxation()
    c = dg.alpha_hessian_eigenvalue(s, batch, iters=4)
    assert a == b == pytest.approx(c, rel=1e-12, abs=1e-15)


# --- the logger ------------------------------------------------------------------------
def test_setup_logging_writes_log_txt_without_console_when_quiet_and_does_not_propagate(
        tmp_path):
    from diffnas.engine.logs import logging_scope, setup_logging

    logger = logging.getLogger("diffnas")
    with logging_scope():
        setup_logging(tmp_path, verbose=False)
        handlers = list(logger.handlers)
        assert [type(h) for h in handlers] == [logging.FileHandler]
        assert logger.propagate is False and logger.level == logging.INFO
        logger.info("hello %d", 7)
    assert "hello 7" in (tmp_path / "log.txt").read_text()
    assert all(h not in logger.handlers for h in handlers)


def test_an_interrupt_is_recorded_in_log_txt_and_the_level_comes_back(tmp_path):
    from diffnas.engine.logs import logging_scope, setup_logging

    logger = logging.getLogger("diffnas")
    before = (logger.level, logger.propagate)
    logger.setLevel(logging.ERROR)
    try:
        with pytest.raises(KeyboardInterrupt), logging_scope():
            setup_logging(tmp_path, verbose=False)
            raise KeyboardInterrupt("SIGTERM")
        assert (logger.level, logger.propagate) == (logging.ERROR, before[1])
    finally:
        logger.setLevel(before[0])
    assert "interrupted by SIGTERM" in (tmp_path / "log.txt").read_text()


# --- TensorBoard ---------------------------------------------------------------------
class _Writer:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars, self.images, self.events = {}, {}, []
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))
        self.events.append("scalar")

    def add_image(self, tag, image, step, dataformats):
        self.images.setdefault(tag, []).append((step, image))
        self.events.append("image")

    def flush(self):
        self.events.append("flush")

    def close(self):
        self.events.append("close")


@pytest.fixture
def fake_writer(monkeypatch):
    import diffnas.engine.tensorboard as tb

    _Writer.made = []
    monkeypatch.setattr(tb, "summary_writer_class", lambda: _Writer)
    return tb


def test_tensorboard_scalars_skip_the_epoch_purge_on_resume_and_flush_each_epoch(
        tmp_path, fake_writer):
    logger = fake_writer.TensorBoardLogger(tmp_path / "tb", "search")
    loop = Loop(_LossTask(), 3, [logger])
    loop.epoch = 1  # a resume from the checkpoint after epoch 0
    loop.run()
    (w,) = _Writer.made
    assert w.purge_step == 1
    assert sorted(w.scalars) == ["search/loss", "search/seconds"]  # no "search/epoch"
    assert [s for s, _ in w.scalars["search/loss"]] == [1, 2]
    assert w.events == ["scalar", "scalar", "flush"] * 2 + ["close"]


def test_tensorboard_alpha_entropy_is_the_mean_over_edges_of_each_edge_entropy(
        tmp_path, fake_writer):
    from diffnas.arch import ArchParams

    arch = ArchParams(tiny_space())
    with torch.no_grad():
        for p in arch.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 2)
    logger = fake_writer.TensorBoardLogger(tmp_path / "tb", "search", arch)
    Loop(_LossTask(), 1, [logger]).run()
    (w,) = _Writer.made
    for group, logits in arch.as_dict().items():
        p = torch.softmax(logits.detach().double(), -1)
        want = float((-(p * p.log()).sum(-1)).mean())
        ((step, got),) = w.scalars[f"alphas/{group}_entropy"]
        assert step == 0 and got == pytest.approx(want, rel=1e-5)
        assert got <= math.log(p.shape[-1]) + 1e-6


def test_an_unknown_logger_is_refused_by_name(tmp_path):
    from diffnas.config import ConfigError, load_config
    from diffnas.engine.tensorboard import logger_callbacks

    cfg = load_config(None, [])
    assert logger_callbacks(cfg, tmp_path / "search") == []
    cfg.logger = "wandb"
    with pytest.raises(ConfigError, match=r"config\.logger: 'wandb' is not one of jsonl, "
                                          r"tensorboard"):
        logger_callbacks(cfg, tmp_path / "search")


# --- pictures --------------------------------------------------------------------------
def test_cell_inputs_include_unused_ones_and_keep_darts_order():
    from diffnas.report.plots import CONV, cell_layout, node_names, output_name

    cell = CellGenotype("normal", (Edge("sep_conv_3x3", 1, 2), Edge("skip_connect", 1, 3)), (2, 3))
    assert cell_layout(cell) == ([0, 1], [2, 3])  # input 0 feeds nothing, still an input
    assert node_names(cell, CONV) == {0: "c_{k-2}", 1: "c_{k-1}", 2: "0", 3: "1"}
    assert output_name(cell, CONV) == "c_{k}"
    one = CellGenotype("cell", (Edge("conv_3x3", 0, 1), Edge("skip_connect", 1, 2)), (2,))
    assert output_name(one, CONV) == "out"  # NB-201's one-input cell


def test_two_input_recurrent_cells_name_x_t_then_h_t_minus_1():
    from diffnas.report.plots import RECURRENT, node_names

    cell = CellGenotype("recurrent", (Edge("tanh", 0, 2), Edge("relu", 1, 2)), (2,))
    assert node_names(cell, RECURRENT) == {0: "x_{t} (0)", 1: "h_{t-1} (1)", 2: "2"}


def test_alpha_matrix_orders_epochs_and_names_a_row_of_the_wrong_shape(tmp_path):
    from diffnas.report.plots import PlotError, alpha_matrix

    m = [[[0.1 * e + 0.01 * i + 0.001 * j for j in range(3)] for i in range(2)]
         for e in range(3)]
    records = [{"epoch": 2, "normal": m[2]}, {"epoch": 0, "normal": m[0]},
               {"epoch": 1, "normal": m[1]}]
    got = alpha_matrix(records, "normal", shape=(2, 3))
    assert got.shape == (2, 3, 3)
    for e in range(3):
        np.testing.assert_array_equal(got[:, :, e], np.asarray(m[e]))
    bad = [{"epoch": 0, "normal": m[0]}, {"epoch": 1, "normal": [[1, 2], [3, 4]]}]
    with pytest.raises(PlotError, match=r"a\.jsonl: row 2 \(\"epoch\": 1\).*a 2 x 3"):
        alpha_matrix(bad, "normal", tmp_path / "a.jsonl", shape=(2, 3))
    with pytest.raises(PlotError, match=r"a\.jsonl: row 1 \(\"epoch\": 0\).*a 2 x 4"):
        alpha_matrix(bad[:1], "normal", tmp_path / "a.jsonl", shape=(2, 4))


@pytest.mark.parametrize("label, want", [("normal/n3/e1", "1 \u2192 n3"),
                                         ("normal/n12/e10", "10 \u2192 n12"),
                                         ("cell/x", "cell/x")])
def test_an_edge_tick_reads_source_to_node(label, want):
    from diffnas.report.plots import _edge_tick

    assert _edge_tick(label) == want


def test_the_heatmap_axis_names_epochs_from_one():
    from diffnas.report.plots import alpha_heatmap_figure

    fig = alpha_heatmap_figure(np.full((2, 3, 4), 1 / 3), ["a", "b"], ["x", "y", "z"])
    assert "epochs 1 to 4" in fig.axes[0].get_xlabel()
    fig = alpha_heatmap_figure(np.full((2, 3, 2), 1 / 3), ["a", "b"], ["x", "y", "z"],
                               epochs=[4, 5])
    assert "epochs 5 to 6" in fig.axes[0].get_xlabel()


def test_an_alpha_snapshot_colours_each_square_by_its_value_over_the_maximum():
    from diffnas.report.plots import alpha_snapshot_image

    probs = np.array([[0.1, 0.2, 0.3], [0.05, 0.15, 0.1]])
    img = alpha_snapshot_image(probs, scale=3)
    assert img.shape == (6, 9, 3) and img.dtype == np.uint8
    cmap = matplotlib.colormaps["viridis"]
    for i in range(2):
        for j in range(3):
            want = np.round(np.asarray(cmap(probs[i, j] / 0.3)[:3]) * 255)
            block = img[3 * i: 3 * i + 3, 3 * j: 3 * j + 3]
            assert (block == want).all(), (i, j)


def test_a_nan_edge_does_not_black_out_the_other_squares_of_a_snapshot():
    """The colour scale is the finite entries' maximum (a NaN maximum made every square
    viridis's 'bad' colour)."""
    from diffnas.report.plots import alpha_snapshot_image

    probs = np.array([[0.2, 0.8], [np.nan, np.nan]])
    img = alpha_snapshot_image(probs, scale=1)
    cmap = matplotlib.colormaps["viridis"]
    for j, p in enumerate((0.2, 0.8)):
        assert (img[0, j] == np.round(np.asarray(cmap(p / 0.8)[:3]) * 255)).all()


def _lines(fig):
    return {(ax.get_title(), ln.get_label()): list(ln.get_ydata()) for ax in fig.axes
            for ln in ax.lines}


def test_curves_draw_only_logged_series_labelled_by_split():
    from diffnas.engine.engines import Metric
    from diffnas.report.plots import curves_figure

    rows = [{"epoch": e, "loss": 1.0, "acc": 0.5, "val_loss": None} for e in range(2)]
    lines = _lines(curves_figure(rows, []))
    assert set(lines) == {("search: loss", "train"), ("search: accuracy", "train")}
    metric = Metric(key="test_rmse", name="RMSE", short="rmse")
    rows = [{"epoch": 0, "loss": 2.0, "rmse": 1.0, "val_loss": 3.0, "val_rmse": 1.5}]
    lines = _lines(curves_figure([], rows, metric))
    assert lines[("retrain: loss", "val")] == [3.0] and lines[("retrain: RMSE", "train")] == [1.0]


def test_curves_of_a_language_model_show_perplexity_even_if_a_row_lacks_it():
    from diffnas.report.plots import curves_figure

    rows = [{"epoch": 0, "loss": 5.0}, {"epoch": 1, "loss": 4.0, "ppl": 60.0}]
    lines = _lines(curves_figure(rows, []))
    assert ("search: perplexity", "train") in lines


def test_the_alpha_heatmap_of_a_run_names_the_epochs_it_logged(tmp_path):
    from diffnas.config import load_config
    from diffnas.report.plots import RunData, run_figures

    cfg = load_config(None, ["search.epochs=5"])
    mat = np.full((14, 8), 1 / 8).tolist()
    alphas = [{"epoch": 3, "normal": mat}, {"epoch": 2, "normal": mat}]
    run = RunData(tmp_path, cfg, None, [], alphas, [], None, "search")
    figs = run_figures(run, "matplotlib", "svg")
    assert list(figs) == ["alphas_normal"]  # no reduce rows: no reduce picture
    assert b"epochs 3 to 4" in figs["alphas_normal"]


def _line_svg() -> bytes:
    from matplotlib.figure import Figure

    from diffnas.report.plots import figure_bytes

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0], marker="o")
    return figure_bytes(fig, "svg")


def test_svg_pictures_carry_no_creation_date():
    svg = _line_svg()
    assert b"<svg" in svg and b"<dc:date>" not in svg


def test_the_same_figure_drawn_twice_gives_byte_identical_svg():
    """Marker and clip-path ids come from a fixed salt, not a random one per render."""
    assert _line_svg() == _line_svg()


def test_plots_after_a_run_with_plots_off_do_nothing(tmp_path, diffnas_log):
    from conftest import _REAL_PLOTS_AFTER_RUN

    from diffnas.config import load_config

    cfg = load_config(None, ["plots=false"])
    assert _REAL_PLOTS_AFTER_RUN(tmp_path / "nowhere", cfg) == []
    assert diffnas_log.messages == []


def test_an_unfinished_search_shows_the_genotype_of_the_epoch_its_last_row_names(tmp_path):
    """The provisional genotype is the last row of search/genotypes.jsonl, and the epoch it
    is said to come from is that row's ``epoch`` (not the row count)."""
    from diffnas.config import load_config, save_config
    from diffnas.report.plots import load_run

    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    save_config(load_config(None, ["search.epochs=6"]), run / "config.yaml")
    first, last = _genotype(), _genotype(("reduce", "normal"))
    rows = [{"epoch": 0, **first.to_dict()}, {"epoch": 3, **last.to_dict()}]
    (run / "search" / "genotypes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_run(run)
    assert data.genotype == last and data.provisional_epoch == 3
    assert "after epoch 4 of 6" in data.genotype_note()
    data.provisional_epoch = 5  # every epoch ran, genotype.json not written yet
    assert "after the last epoch (6)" in data.genotype_note()


def _mini_run(tmp_path, metrics):
    """A run directory holding only its config and search/metrics.jsonl rows."""
    from diffnas.config import load_config, save_config

    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    save_config(load_config(None, ["search.epochs=2"]), run / "config.yaml")
    (run / "search" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run


def test_a_metrics_row_without_an_integer_epoch_is_named(tmp_path):
    from diffnas.report.plots import PlotError, load_run

    run = _mini_run(tmp_path, [{"epoch": 0, "loss": 1.0}, {"epoch": "1", "loss": 0.5}])
    with pytest.raises(PlotError, match=r"metrics\.jsonl: row 2 has no integer 'epoch'"):
        load_run(run)


def test_plot_replaces_an_unmarked_picture_only_in_the_run_s_own_plots_folder(tmp_path):
    from matplotlib.figure import Figure

    from diffnas.report.outputs import OutputRefused, is_plot
    from diffnas.report.plots import figure_bytes, plot_run

    run = _mini_run(tmp_path, [{"epoch": 0, "loss": 1.0, "acc": 0.5}])
    plain = figure_bytes(Figure(figsize=(1, 1)), "png")  # a PNG without the marker
    for folder in (tmp_path / "mine", run / "plots"):
        folder.mkdir()
        (folder / "curves.png").write_bytes(plain)
    with pytest.raises(OutputRefused, match=r"curves\.png: that file is not a picture"):
        plot_run(run, tmp_path / "mine", ("png",), "matplotlib")
    assert (tmp_path / "mine" / "curves.png").read_bytes() == plain
    assert plot_run(run, None, ("png",), "matplotlib") == [run / "plots" / "curves.png"]
    assert is_plot(run / "plots" / "curves.png")


# --- the HTML report ---------------------------------------------------------------------
def _run(tmp_path, result=None, search=(), retrain=(), genotype=None, name="run"):
    from diffnas.config import load_config
    from diffnas.report.plots import RunData

    cfg = load_config(None, ["search.epochs=4", "retrain.epochs=3"])
    (tmp_path / name).mkdir(exist_ok=True)
    return RunData(tmp_path / name, cfg, genotype, list(search), [], list(retrain), result,
                   "search")


def test_the_report_escapes_a_run_name_and_a_caption(tmp_path):
    from diffnas.report.html import _img, render_report

    page = render_report(_run(tmp_path, name='a<b&"c'), "matplotlib")
    assert "<h1>diffnas run a&lt;b&amp;&quot;c</h1>" in page and "a<b" not in page
    assert 'alt="say &quot;hi&quot; &lt;x&gt;"' in _img(b"<svg/>", 'say "hi" <x>')


@pytest.mark.parametrize("x, want", [(None, "-"), (float("nan"), "-"), (0.12345, "12.35%")])
def test_a_percentage_is_a_dash_when_unknown(x, want):
    from diffnas.report.html import _pct

    assert _pct(x) == want


@pytest.mark.parametrize("n, want", [(1234567, "1,234,567"), (1.5, "-"), (None, "-")])
def test_a_count_is_an_integer_with_thousands_separators(n, want):
    from diffnas.report.html import _count

    assert _count(n) == want


def test_the_summary_rows_of_a_finished_image_run(tmp_path):
    from diffnas.report.html import _summary_rows

    result = {"test_acc": 0.5, "last_test_acc": 0.25, "best_epoch": 1, "epochs_done": 3,
              "params": 12345}
    search = [{"epoch": e, "val_acc": 0.5, "seconds": 30.0} for e in range(2)]
    retrain = [{"epoch": e, "test_acc": 0.5, "seconds": 4.0} for e in range(3)]
    rows = dict(_summary_rows(_run(tmp_path, result, search, retrain)))
    assert rows["search epochs"] == "2 of 4"
    assert rows["test accuracy, best validation epoch (2)"] == "50.00%"
    assert rows["test accuracy, last epoch"] == "25.00%"
    assert rows["parameters (without auxiliary head)"] == "12,345"
    assert rows["search time (wall clock, 2 epochs)"] == "1 min 0 s"
    assert rows["retraining time (wall clock, 3 epochs)"] == "12.0 s"


def test_the_genotype_table_lists_edges_by_target_then_source(tmp_path):
    from diffnas.report.html import _genotype_table

    cell = CellGenotype("normal", (Edge("skip_connect", 1, 3), Edge("max_pool_3x3", 0, 3),
                                   Edge("sep_conv_3x3", 1, 2), Edge("dil_conv_3x3", 0, 2)),
                        (2, 3))
    red = CellGenotype("reduce", (Edge("skip_connect", 0, 2), Edge("skip_connect", 1, 2)), (2,))
    text = _genotype_table(_run(tmp_path, genotype=Genotype("darts_cnn", (cell, red))))
    normal = text.split("<h3>")[1]
    pairs = re.findall(r"<td>(\d) &rarr; (\d)</td><td>(\w+)</td>", normal)
    assert pairs == [("0", "2", "dil_conv_3x3"), ("1", "2", "sep_conv_3x3"),
                     ("0", "3", "max_pool_3x3"), ("1", "3", "skip_connect")]
    assert "output: concatenation of nodes [2, 3]" in normal


def test_the_metrics_table_has_a_column_for_a_key_only_later_rows_have():
    from diffnas.report.html import _metrics_table

    table = _metrics_table([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5, "test_acc": 0.25}])
    assert "<th>test_acc</th>" in table
    assert '<td class="num">2</td><td class="num">0.5</td><td class="num">0.25</td>' in table
    assert '<td class="num">1</td><td class="num">1</td><td>-</td>' in table


def test_the_report_result_section_leaves_out_the_genotype_and_history(tmp_path):
    from diffnas.report.html import render_report

    result = {"test_acc": 0.5, "epochs_done": 3, "params": 10,
              "genotype": {"space": "GENOTYPE-MARK"}, "history": ["HISTORY-MARK"]}
    page = render_report(_run(tmp_path, result), "matplotlib")
    section = page.split("<h2>Result file</h2>")[1]
    assert "test_acc" in section and "GENOTYPE-MARK" not in page and "HISTORY-MARK" not in page


def test_a_report_out_ending_in_a_slash_is_a_folder_to_make(tmp_path, monkeypatch):
    import diffnas.report.html as h

    monkeypatch.setattr(h, "load_run", lambda run_dir, overrides=(): _run(tmp_path))
    monkeypatch.setattr(h, "render_report", lambda run, backend="auto": "<html></html>")
    out = tmp_path / "made" / "here"
    got = h.write_report(tmp_path / "run", str(out) + "/")
    assert got == out / "report.html" and got.read_text() == "<html></html>"


# --- where outputs go ------------------------------------------------------------------
def _ours(p):
    return p.read_bytes().startswith(b"OURS")


def test_outputs_are_all_checked_before_any_is_written(tmp_path):
    from diffnas.report.outputs import OutputRefused, write_outputs

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    b.write_bytes(b"a file of the user's")
    with pytest.raises(OutputRefused, match=r"b\.png: that file is not a picture"):
        write_outputs([(a, b"OURS new", _ours), (b, b"OURS new", _ours)], tmp_path,
                      "a picture", "plot")
    assert not a.exists() and b.read_bytes() == b"a file of the user's"
    (tmp_path / "c.png").mkdir()
    with pytest.raises(OutputRefused, match=r"c\.png is a folder where plot writes a file"):
        write_outputs([(a, b"OURS", _ours), (tmp_path / "c.png", b"OURS", _ours)], tmp_path,
                      "a picture", "plot")
    assert not a.exists()
    assert write_outputs([(a, b"OURS 1", _ours), (b, b"OURS 2", _ours)], tmp_path,
                         "a picture", "plot", force=True) == [a, b]
    assert b.read_bytes() == b"OURS 2"


def test_a_marked_png_stays_a_valid_png_and_a_plain_one_is_not_ours(tmp_path):
    from matplotlib.figure import Figure

    from diffnas.report.outputs import PLOT_MARK, is_plot, mark_picture
    from diffnas.report.plots import figure_bytes

    fig = Figure(figsize=(1, 1))
    png = figure_bytes(fig, "png")
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    plain.write_bytes(png)
    marked.write_bytes(mark_picture(png, "png"))
    assert not is_plot(plain) and is_plot(plain, legacy=True) and is_plot(marked)
    data, at, seen = marked.read_bytes(), 8, []
    while at < len(data):  # every chunk: its length field and CRC hold
        (n,) = struct.unpack(">I", data[at: at + 4])
        kind, body = data[at + 4: at + 8], data[at + 8: at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n: at + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        seen.append((kind, body))
        at += 12 + n
    assert seen[1] == (b"tEXt", b"Comment\0" + PLOT_MARK.encode())
    assert matplotlib.image.imread(marked).shape[:2] == matplotlib.image.imread(plain).shape[:2]


@pytest.mark.parametrize("inside", ["log.txt", "tensorboard/search/events.x", "search/m.jsonl"])
def test_a_run_s_files_belong_to_it(tmp_path, inside):
    from diffnas.report.outputs import run_file_owner

    run = tmp_path / "run"
    (run / "search").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    assert run_file_owner(run / inside) == run
    assert run_file_owner(run / "plots" / "a.png") is None


def test_a_nested_run_decides_for_its_own_folder(tmp_path):
    from diffnas.report.outputs import run_file_owner

    outer = tmp_path / "outer"
    inner = outer / "plots" / "inner"
    for r in (outer, inner):
        (r / "search").mkdir(parents=True)
        (r / "config.yaml").write_text("{}")
    assert run_file_owner(inner / "report.html") is None  # free in the inner run
    assert run_file_owner(inner / "search" / "x") == inner
    odd = outer / "search" / "inner"  # a run made inside another run's own folder
    (odd / "search").mkdir(parents=True)
    (odd / "config.yaml").write_text("{}")
    assert run_file_owner(odd / "report.html") is None  # the innermost run decides


# --- the commands ----------------------------------------------------------------------
def test_report_check_browser_fails_on_console_messages(tmp_path, monkeypatch, capsys):
    import diffnas.report.html as h
    from diffnas.cli import main

    monkeypatch.setattr(h, "write_report", lambda *a, **k: tmp_path / "report.html")
    monkeypatch.setattr(h, "browser_check", lambda path, shot: {
        "console": ["Uncaught x"], "image_widths": [10], "browser": "chromium"})
    assert main(["report", str(tmp_path), "--check-browser"]) == 1
    assert "console: Uncaught x" in capsys.readouterr().out


def test_plot_format_both_draws_png_and_svg(tmp_path, monkeypatch, capsys):
    import diffnas.report.plots as p
    from diffnas.cli import main

    seen = []
    monkeypatch.setattr(p, "plot_run", lambda run_dir, out, formats, *a: seen.append(formats) or [])
    assert main(["plot", str(tmp_path)]) == 0
    assert main(["plot", str(tmp_path), "--format", "svg"]) == 0
    assert seen == [("png", "svg"), ("svg",)]


def test_compare_with_only_plugin_overrides_names_the_missing_runs(capsys):
    from diffnas.cli import main

    assert main(["compare", "plugins=[x]"]) == 2
    assert "compare: name at least one run directory" in capsys.readouterr().err
