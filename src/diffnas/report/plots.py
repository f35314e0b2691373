"""Pictures of a run: cell diagrams, the alpha heatmap over epochs, loss/accuracy curves.

Cells are drawn with Graphviz's ``dot`` when that program is installed (the clearest
layout) and with matplotlib otherwise, so a plain ``pip install`` still gets diagrams.
Every figure is written as PNG and SVG; SVG keeps text as ``<text>`` elements
(``svg.fonttype = none``), so labels can be searched and read back.
"""

from __future__ import annotations

import io
import logging
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from diffnas.engine.callbacks import read_json, read_jsonl
from diffnas.engine.engines import ACCURACY, PERPLEXITY, Metric, engine_of
from diffnas.genotype import CellGenotype, Genotype, cell_title

FORMATS = ("png", "svg")
BACKENDS = ("auto", "graphviz", "matplotlib")
# a fixed salt for the SVG's marker and clip-path ids (random per render otherwise): the
# same run's figures are byte-identical when drawn again
_RC = {"svg.fonttype": "none", "font.size": 10, "svg.hashsalt": "diffnas"}

INPUT_COLOR = "#cfe8cf"
NODE_COLOR = "#dde6f5"
OUTPUT_COLOR = "#f5e6c4"


class PlotError(RuntimeError):
    """A plot cannot be made (missing program, malformed run directory, ...)."""


# --- run directory contents ----------------------------------------------------------
@dataclass
class RunData:
    """What the plots and the report read from a run directory."""

    path: Path
    config: Any  # RunConfig
    genotype: Genotype | None
    search_metrics: list[dict[str, Any]]
    alphas: list[dict[str, Any]]
    retrain_metrics: list[dict[str, Any]]
    result: dict[str, Any] | None
    kind: str | None = None  # the command that made the run (rundir.run_kind)
    #: for an unfinished search: the (0-based) epoch after which its latest genotype, the
    #: one shown, was logged; None when the genotype is the search's final one
    provisional_epoch: int | None = None

    def genotype_note(self) -> str | None:
        """What to say of a genotype that is not the search's final one, else None."""
        if self.provisional_epoch is None:
            return None
        epochs = self.config.search.epochs
        if self.provisional_epoch + 1 >= epochs:  # every epoch ran; search/genotype.json not
            return (f"the genotype logged after the last epoch ({epochs}); the search stopped "
                    "before writing search/genotype.json (--resume finishes it)")
        return (f"latest genotype, after epoch {self.provisional_epoch + 1} of {epochs}; the "
                "search has not finished, so it may still change")

    def edge_groups(self) -> dict[str, tuple[list[str], tuple[str, ...]]]:
        """Per cell type: the edge labels (alpha-row order) and the candidate ops."""
        from diffnas.spaces import DataShape, create_space

        space = create_space(self.config.search.space, DataShape())
        return {g: ([e.label for e in es], es[0].candidates)
                for g, es in space.edge_groups().items()}


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> RunData:
    """Read a run directory (``diffnas search`` or ``diffnas train`` output); a clear
    error when it is not one. ``overrides``: those a resume takes (``plugins=[...]`` for
    plugins that moved since the run)."""
    from diffnas.engine.rundir import load_run_config, run_kind, seeds_parent_message
    from diffnas.export import RETRAIN_FIX

    path = Path(run_dir)
    why = seeds_parent_message(path, "report or plot")
    if why:
        raise PlotError(why)
    # a report reads, it does not run: a train run's config is checked as train checked it
    kind = run_kind(path)
    cfg = load_run_config(path, list(overrides), device=False, search=kind != "train")
    gpath = path / "search" / "genotype.json"
    genotype = Genotype.load(gpath) if gpath.is_file() else None
    provisional = None
    if genotype is None:
        # An unfinished search: use the latest genotype it logged, if any (said so).
        rows = read_jsonl(path / "search" / "genotypes.jsonl")
        if rows:
            genotype = Genotype.from_dict({k: v for k, v in rows[-1].items() if k != "epoch"})
            epoch = rows[-1].get("epoch")
            provisional = epoch if isinstance(epoch, int) else len(rows) - 1
    rpath = path / "retrain" / "result.json"
    result = read_json(rpath, RETRAIN_FIX) if rpath.is_file() else None
    if genotype is None and result is not None and result.get("genotype"):
        genotype = Genotype.from_dict(result["genotype"])
    pinned = path / "retrain" / "genotype.json"  # what a retraining trains, from its start
    if genotype is None and pinned.is_file():
        genotype = Genotype.load(pinned)
    return RunData(path, cfg, genotype, _epoch_rows(path / "search" / "metrics.jsonl"),
                   _epoch_rows(path / "search" / "alphas.jsonl"),
                   _epoch_rows(path / "retrain" / "metrics.jsonl"), result, kind, provisional)


def _epoch_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a per-epoch JSON-lines file; a row without an integer ``epoch`` (an
    edited or foreign file) is an error naming the file and row, not a KeyError later."""
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise PlotError(f"{path}: row {i + 1} has no integer 'epoch' ({str(row)[:80]}); "
                            "restore the file from the run or remove that row")
    return rows


# --- cell diagrams -------------------------------------------------------------------
@dataclass(frozen=True)
class CellKind:
    """What diagrams and reports say of one kind of cell: ``name`` (``conv``,
    ``recurrent``, ``graph`` or ``other``) and how the cell output combines the
    genotype's concat nodes (``combine``: ``concatenation``, ``mean``, or None where the
    report cannot know: a plugin engine's cells)."""

    name: str
    combine: str | None


#: image networks (DARTS CNN, NB-201): the output concatenates the concat nodes
CONV = CellKind("conv", "concatenation")
#: language models (supernet/rnn.py, FixedCell.step): the new hidden state h_t is the
#: mean of the concat nodes; x_t and h_{t-1} are gated into input node 0, or are the
#: input nodes 0 and 1 (``backbone: two_input``)
RECURRENT = CellKind("recurrent", "mean")
#: graph networks (supernet/gnn.py, FixedCell.forward): node 0 is the cell input, the
#: output the mean of the concat nodes
GRAPH = CellKind("graph", "mean")
OTHER = CellKind("other", None)
#: the cells of each built-in engine's networks (a space declares its engine)
ENGINE_CELLS = {"image": CONV, "language_model": RECURRENT, "graph": GRAPH}
#: what the gated input node of a one-input recurrent cell is made of
RNN_SOURCES = ("x_{t}", "h_{t-1}")


def cell_kind(space: str) -> CellKind:
    """The kind of the cells of the space named ``space``, from the engine it declares
    (a subclass of darts_rnn's or gnn's space inherits theirs); ``OTHER`` for a plugin
    engine's space or one that is not registered."""
    from diffnas.spaces import SPACES

    if space not in SPACES:
        return OTHER
    return ENGINE_CELLS.get(SPACES.get(space).engine, OTHER)


def cell_layout(cell: CellGenotype) -> tuple[list[int], list[int]]:
    """(input nodes, intermediate nodes) of a cell: inputs are sources that no edge
    computes (two for DARTS CNN cells and ``two_input`` recurrent ones, one for NB-201,
    graph and other recurrent cells)."""
    dsts = sorted({e.dst for e in cell.edges})
    inputs = sorted({e.src for e in cell.edges} - set(dsts))
    first = min(dsts) if dsts else 0
    inputs = sorted(set(inputs) | set(range(first)))  # unused inputs are still inputs
    return inputs, dsts


def node_names(cell: CellGenotype, kind: CellKind = CONV) -> dict[int, str]:
    """Display names of a cell's nodes. Two-input convolutional cells as DARTS draws them:
    ``c_{k-2}``, ``c_{k-1}``, intermediate nodes numbered from 0. Other cells (NB-201's
    one-input cell too) keep the genotype's numbers, inputs with their role:
    ``x_{t} (0)``, ``h_{t-1} (1)`` (two-input recurrent), ``0`` (the node a one-input
    recurrent cell gates x_t and h_{t-1} into), ``in (0)`` (graph and plugin cells)."""
    inputs, inner = cell_layout(cell)
    if kind.name == "conv" and len(inputs) == 2:
        return _conv_names(inputs, inner)
    names = dict(zip(inputs, _input_labels(inputs, kind), strict=True))
    names.update({n: str(n) for n in inner})
    return names


def _conv_names(inputs: list[int], inner: list[int]) -> dict[int, str]:
    """DARTS's names for its two-input cells: ``c_{k-2}``, ``c_{k-1}``, nodes from 0."""
    names = {inputs[0]: "c_{k-2}", inputs[1]: "c_{k-1}"}
    names.update({n: str(i) for i, n in enumerate(inner)})
    return names


def _input_labels(inputs: list[int], kind: CellKind) -> list[str]:
    """Labels of the input nodes of a cell that keeps the genotype's numbers."""
    if kind.name == "recurrent" and len(inputs) == 1:
        return [str(inputs[0])]
    if kind.name == "recurrent" and len(inputs) == 2:
        roles = ["x_{t}", "h_{t-1}"]
    else:
        roles = ["in"] if len(inputs) == 1 else [f"in{i}" for i in range(len(inputs))]
    return [f"{role} ({n})" for role, n in zip(roles, inputs, strict=True)]


def output_name(cell: CellGenotype, kind: CellKind = CONV) -> str:
    """The label of the cell output: ``c_{k}`` (two-input convolutional cells),
    ``h_{t} (mean)`` (recurrent), ``out (mean)`` (graph), ``out`` (others)."""
    if kind.name == "conv":
        return "c_{k}" if len(cell_layout(cell)[0]) == 2 else "out"
    name = "h_{t}" if kind.name == "recurrent" else "out"
    return f"{name} ({kind.combine})" if kind.combine else name


@dataclass(frozen=True)
class CellDrawing:
    """What a cell diagram shows, by box label: the input column, one column per node,
    the output; op-labelled arrows (the genotype's edges), dashed arrows into the output,
    plain arrows ``feeds`` into a node column's input box (``gated``: a one-input
    recurrent cell's node 0, made of x_t and h_{t-1})."""

    inputs: tuple[str, ...]
    nodes: tuple[str, ...]
    output: str
    edges: tuple[tuple[str, str, str], ...]  # (from, to, op)
    concat: tuple[str, ...]
    feeds: tuple[tuple[str, str], ...] = ()
    gated: tuple[str, ...] = ()

    def color(self, box: str) -> str:
        """The fill colour of an input or node box."""
        return INPUT_COLOR if box in self.inputs or box in self.gated else NODE_COLOR


def cell_drawing(cell: CellGenotype, kind: CellKind = CONV) -> CellDrawing:
    """The boxes and arrows of a cell's diagram (:class:`CellDrawing`)."""
    names = node_names(cell, kind)
    inputs, inner = cell_layout(cell)
    boxes, nodes = tuple(names[n] for n in inputs), tuple(names[n] for n in inner)
    feeds: tuple[tuple[str, str], ...] = ()
    gated: tuple[str, ...] = ()
    if kind.name == "recurrent" and len(inputs) == 1:  # x_t, h_{t-1} -> node 0
        gated, nodes = boxes, boxes + nodes
        feeds, boxes = tuple((s, gated[0]) for s in RNN_SOURCES), RNN_SOURCES
    edges = tuple((names[e.src], names[e.dst], e.op) for e in cell.edges)
    concat = tuple(names[n] for n in cell.concat if n in names)
    return CellDrawing(boxes, nodes, output_name(cell, kind), edges, concat, feeds, gated)


def cell_dot(cell: CellGenotype, kind: CellKind = CONV) -> str:
    """The cell as Graphviz DOT source (left to right, op names on the edges)."""
    d = cell_drawing(cell, kind)

    def q(s: str) -> str:
        return '"' + s.replace('"', r"\"") + '"'

    lines = [
        f"digraph {q(cell.name)} {{",
        "  rankdir=LR; bgcolor=white;",
        '  node [style="rounded,filled", shape=box, fontname="Helvetica", fontsize=14, '
        'penwidth=1.5, height=0.45];',
        '  edge [fontname="Helvetica", fontsize=12, color="#555555"];',
    ]
    lines += [f"  {q(b)} [fillcolor={q(d.color(b))}];" for b in (*d.inputs, *d.nodes)]
    lines.append(f"  {q(d.output)} [fillcolor={q(OUTPUT_COLOR)}];")
    lines += [f"  {q(a)} -> {q(b)} [color=\"#999999\"];" for a, b in d.feeds]
    lines += [f"  {q(a)} -> {q(b)} [label={q(op)}];" for a, b, op in d.edges]
    lines += [f"  {q(b)} -> {q(d.output)} [style=dashed, color=\"#999999\"];"
              for b in d.concat]
    lines.append("}")
    return "\n".join(lines) + "\n"


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def _graphviz_render(cell: CellGenotype, fmt: str, kind: CellKind = CONV) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise PlotError("Graphviz's 'dot' program is not installed (apt-get install graphviz); "
                        "use backend='matplotlib'")
    proc = subprocess.run([exe, f"-T{fmt}", *(["-Gdpi=110"] if fmt == "png" else [])],
                          input=cell_dot(cell, kind).encode(), capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise PlotError(f"dot failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


X_STEP = 2.2  # horizontal distance between node columns in the matplotlib drawing


def _box_positions(d: CellDrawing) -> dict[str, tuple[float, float]]:
    """Inputs stacked in the first column, one column per node zigzagging downwards."""
    pos: dict[str, tuple[float, float]] = {}
    n_in = len(d.inputs)
    for i, b in enumerate(d.inputs):
        pos[b] = (0.0, 1.3 - 2.6 * i / (n_in - 1)) if n_in > 1 else (0.0, 0.0)
    for i, b in enumerate(d.nodes):
        pos[b] = (X_STEP * (i + 1), 2.0 - 4.0 * i / max(len(d.nodes) - 1, 1))
    return pos


def _arrow(ax: Any, p: tuple[float, float], q: tuple[float, float], rad: float,
           **kw: Any) -> None:
    ax.annotate("", xy=q, xytext=p, zorder=1, arrowprops={
        "arrowstyle": "-|>", "connectionstyle": f"arc3,rad={rad}", "shrinkA": 14,
        "shrinkB": 14, "mutation_scale": 12, **kw})


def _op_arrow(ax: Any, p: tuple[float, float], q: tuple[float, float], op: str) -> None:
    """An edge's arrow with its op written on the middle of the arc."""
    rad = 0.12 if p[1] >= q[1] else -0.12
    _arrow(ax, p, q, rad, color="#555555", lw=1.1)
    # arc3's quadratic Bezier passes at t=0.5 through mid + rad/2 * (dy, -dx).
    dx, dy = q[0] - p[0], q[1] - p[1]
    lx, ly = (p[0] + q[0]) / 2 + rad * dy / 2, (p[1] + q[1]) / 2 - rad * dx / 2
    ax.text(lx, ly, op, ha="center", va="center", fontsize=8, zorder=3,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def cell_figure(cell: CellGenotype, title: str | None = None,
                kind: CellKind = CONV) -> Figure:
    """The cell drawn with matplotlib alone: boxes for nodes, curved arrows labelled with
    their op, dashed arrows into the cell output."""
    d = cell_drawing(cell, kind)
    pos = _box_positions(d)
    x_out = X_STEP * (len(d.nodes) + 1)
    fig = Figure(figsize=(1.2 + 1.6 * (len(d.nodes) + 1), 4.4))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.9 if title else 0.98))
    ax.set_axis_off()
    box = {"boxstyle": "round,pad=0.35", "lw": 1.2, "ec": "#333333"}
    for a, b in d.feeds:
        _arrow(ax, pos[a], pos[b], 0.12 if pos[a][1] >= pos[b][1] else -0.12,
               color="#999999", lw=1.0)
    for a, b, op in d.edges:
        _op_arrow(ax, pos[a], pos[b], op)
    for b in d.concat:
        _arrow(ax, pos[b], (x_out, 0.0), 0.1, color="#999999", lw=1.0, linestyle="--")
    for b in (*d.inputs, *d.nodes):
        ax.text(*pos[b], b, ha="center", va="center", zorder=4, bbox={**box, "fc": d.color(b)})
    ax.text(x_out, 0.0, d.output, ha="center", va="center", zorder=4,
            bbox={**box, "fc": OUTPUT_COLOR})
    ax.set_xlim(-0.8, x_out + 0.8)
    ax.set_ylim(-2.5, 2.5)
    ax.set_aspect("equal")  # arc3 bends in display space: equal aspect keeps labels on arcs
    if title:
        fig.suptitle(title)
    return fig


def figure_bytes(fig: Figure, fmt: str, dpi: int = 110) -> bytes:
    """Render a figure to PNG or SVG bytes (SVG text stays text)."""
    if fmt not in FORMATS:
        raise PlotError(f"unknown image format {fmt!r}; choose from {FORMATS}")
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict[str, Any]:
    # No creation date (and _RC's fixed hash salt), so the same run gives byte-identical SVG files.
    return {"Date": None} if fmt == "svg" else {}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise PlotError(f"unknown cell-diagram backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "graphviz" if graphviz_available() else "matplotlib"
    return backend


def render_cell(cell: CellGenotype, fmt: str = "svg", backend: str = "auto",
                kind: CellKind = CONV) -> bytes:
    """A cell diagram as PNG or SVG bytes, with Graphviz or matplotlib; ``kind``: the
    kind of cell (:func:`cell_kind` of its genotype's space)."""
    if fmt not in FORMATS:
        raise PlotError(f"unknown image format {fmt!r}; choose from {FORMATS}")
    if resolve_backend(backend) == "graphviz":
        return _graphviz_render(cell, fmt, kind)
    return figure_bytes(cell_figure(cell, cell_title(cell.name), kind), fmt)


# --- alpha heatmap -------------------------------------------------------------------
def alpha_matrix(records: Sequence[dict[str, Any]], group: str,
                 source: str | Path = "search/alphas.jsonl",
                 shape: tuple[int, int] | None = None) -> np.ndarray:
    """softmax(alpha) of ``group`` over epochs as ``(edges, ops, epochs)``, from the rows of
    ``search/alphas.jsonl`` (sorted by epoch). A row that is not an (edges x ops) matrix of
    numbers, of ``shape`` when given and of one shape in every row, is a
    :class:`PlotError` naming ``source`` (the file) and the row."""
    rows = sorted((r for r in records if group in r), key=lambda r: r["epoch"])
    if not rows:
        raise PlotError(f"no alpha records for cell type {group!r}")
    fix = "restore the file from the run or remove that row"
    mats = []
    for r in rows:
        try:
            mat = np.asarray(r[group], dtype=float)
        except (ValueError, TypeError):
            mat = None
        if mat is None or mat.ndim != 2 or (shape is not None and mat.shape != shape) \
                or (mats and mat.shape != mats[0].shape):
            want = (f"a {shape[0]} x {shape[1]} (edges x ops) matrix" if shape is not None
                    else "an (edges x ops) matrix of numbers"
                    + (f" of shape {mats[0].shape}" if mats else ""))
            row = next(i for i, x in enumerate(records) if x is r) + 1
            raise PlotError(f"{source}: row {row} (\"epoch\": {r['epoch']}): its {group!r} "
                            f"entry is not {want} ({str(r[group])[:80]}); {fix}")
        mats.append(mat)
    return np.stack(mats).transpose(1, 2, 0)  # (epochs, edges, ops) -> (edges, ops, epochs)


def _edge_tick(label: str) -> str:
    """``normal/n2/e0`` -> ``0 -> n2`` (source node -> target node)."""
    parts = label.split("/")
    if len(parts) == 3 and parts[1].startswith("n") and parts[2].startswith("e"):
        return f"{parts[2][1:]} \u2192 {parts[1]}"
    return label


#: the most epochs an alpha heatmap shows per op (longer runs: evenly spaced ones, the
#: first and last included); 2,000 epochs of a graph search drew a 69,000-pixel-wide PNG
HEATMAP_EPOCHS = 120


def alpha_heatmap_figure(
    alphas: np.ndarray, edge_labels: Sequence[str], ops: Sequence[str],
    title: str = "", epochs: Sequence[int] | None = None,
) -> Figure:
    """One row per edge; for every op a block of columns, one per epoch (at most
    :data:`HEATMAP_EPOCHS`, evenly spaced), so each row shows how that edge's
    softmax(alpha) moved from epoch to epoch."""
    n_edges, n_ops, n_epochs = alphas.shape
    if n_edges != len(edge_labels) or n_ops != len(ops):
        raise PlotError(f"alphas {alphas.shape} do not match {len(edge_labels)} edges x "
                        f"{len(ops)} ops")
    epochs = list(epochs) if epochs else list(range(n_epochs))
    shown = ""
    if n_epochs > HEATMAP_EPOCHS:
        keep = np.unique(np.linspace(0, n_epochs - 1, HEATMAP_EPOCHS).round().astype(int))
        alphas, epochs = alphas[:, :, keep], [epochs[i] for i in keep]
        shown = f"; {len(keep)} of {n_epochs} evenly spaced"
        n_epochs = len(keep)
    image = alphas.reshape(n_edges, n_ops * n_epochs)  # column = op * epochs + epoch
    cell_w = max(0.06, min(0.35, 9.0 / (n_ops * n_epochs)))
    fig = Figure(figsize=(2.2 + cell_w * n_ops * n_epochs + 1.2, 1.3 + 0.26 * n_edges))
    ax = fig.add_subplot()
    # The colour range spans the data: early in a search all weights sit near 1/ops.
    # (nan-aware: a diverged epoch's NaN rows must not take the scale with them)
    finite = image[np.isfinite(image)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(image, aspect="auto", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-9),
                   interpolation="nearest")
    for k in range(1, n_ops):
        ax.axvline(k * n_epochs - 0.5, color="white", lw=2)
    ax.set_yticks(range(n_edges), [_edge_tick(lb) for lb in edge_labels], fontsize=8)
    ax.set_xticks([k * n_epochs + (n_epochs - 1) / 2 for k in range(n_ops)], list(ops),
                  rotation=35, ha="right", fontsize=8)
    ax.tick_params(length=0)
    ax.set_xlabel(f"op (each block: epochs {epochs[0] + 1} to {epochs[-1] + 1}, left to "
                  f"right{shown})")
    ax.set_ylabel("edge (source \u2192 node)")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="softmax(alpha)")
    return fig


def alpha_snapshot_image(probs: np.ndarray, scale: int = 12) -> np.ndarray:
    """An (edges x ops) probability matrix as an RGB uint8 image (for TensorBoard), each
    entry a ``scale`` x ``scale`` square, colour = viridis of the value / the matrix maximum."""
    p = np.asarray(probs, dtype=float)
    top = max(p[np.isfinite(p)].max(initial=0.0), 1e-12)  # a NaN entry greys only itself
    rgb = matplotlib.colormaps["viridis"](p / top)[..., :3]
    img = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return (img * 255).round().astype(np.uint8)


# --- curves --------------------------------------------------------------------------
_SERIES = {  # (loss key, accuracy key, label) per phase
    "search": (("loss", "acc", "train"), ("val_loss", "val_acc", "validation (alpha steps)"),
               ("eval_val_loss", "eval_val_acc", "validation (end of epoch)")),
    "retrain": (("loss", "acc", "train"), ("val_loss", "val_acc", "validation"),  # graph
                ("test_loss", "test_acc", "test")),
}
#: language models (engine/lm.py) log perplexity instead of accuracy, in both phases
_LM_SERIES = (("loss", "ppl", "train"), ("valid_loss", "valid_ppl", "validation"))


def _own_series(rows: Sequence[dict], short: str) -> tuple[tuple[str, str, str], ...]:
    """A plugin engine's curves: every ``loss`` / ``<split>_loss`` key beside the
    ``<short>`` / ``<split>_<short>`` key of its metric (``rmse``, ``val_rmse``), paired by
    split and labelled by it."""
    keys = {k for r in rows for k in r}
    splits = sorted({k[: -len(short)] for k in keys if k == short or k.endswith("_" + short)} |
                    {k[:-4] for k in keys if k == "loss" or k.endswith("_loss")})
    return tuple((f"{p}loss", f"{p}{short}", p.rstrip("_") or "train") for p in splits)


def curves_figure(search: Sequence[dict], retrain: Sequence[dict],
                  metric: Metric = ACCURACY) -> Figure:
    """Loss and accuracy (perplexity for language models; a plugin engine's ``metric``, by
    its keys) per epoch: a row for the search, a row for retraining."""
    phases = [(name, rows) for name, rows in (("search", search), ("retrain", retrain)) if rows]
    if not phases:
        raise PlotError("no metrics to plot (search/metrics.jsonl and retrain/metrics.jsonl "
                        "are missing or empty)")
    own = metric.key not in (ACCURACY.key, PERPLEXITY.key)
    fig = Figure(figsize=(9, 3.0 * len(phases)))
    axes = fig.subplots(len(phases), 2, squeeze=False)
    for row, (name, rows) in enumerate(phases):
        epochs = [r["epoch"] + 1 for r in rows]
        lm = not own and any("valid_ppl" in r or "ppl" in r for r in rows)
        series = _own_series(rows, metric.short) if own else \
            _LM_SERIES if lm else _SERIES[name]
        for loss_key, acc_key, label in series:
            for col, key in ((0, loss_key), (1, acc_key)):
                ys = [r.get(key) for r in rows]
                if all(y is None for y in ys):
                    continue
                ys = [np.nan if y is None else y for y in ys]
                axes[row][col].plot(epochs, ys, marker="o", ms=3, label=label)
        figure = metric.name if own else "perplexity" if lm else "accuracy"
        for col, what in ((0, "loss"), (1, figure)):
            ax = axes[row][col]
            ax.set_title(f"{name}: {what}")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- everything for a run --------------------------------------------------------------
def run_figures(run: RunData, backend: str = "auto", fmt: str = "svg") -> dict[str, bytes]:
    """All pictures of a run, rendered in ``fmt``: ``cell_<name>``, ``alphas_<group>``,
    ``curves``."""
    out: dict[str, bytes] = {}
    if run.genotype is not None:
        kind = cell_kind(run.genotype.space)
        for cell in run.genotype.cells:
            out[f"cell_{cell.name}"] = render_cell(cell, fmt, backend, kind)
    if run.alphas:
        for group, (labels, ops) in run.edge_groups().items():
            if not any(group in r for r in run.alphas):
                continue
            mat = alpha_matrix(run.alphas, group, run.path / "search" / "alphas.jsonl",
                               (len(labels), len(ops)))
            epochs = sorted(r["epoch"] for r in run.alphas if group in r)
            fig = alpha_heatmap_figure(mat, labels, ops, f"{cell_title(group)}: softmax(alpha) per "
                                       "edge over epochs", epochs)
            out[f"alphas_{group}"] = figure_bytes(fig, fmt)
    if run.search_metrics or run.retrain_metrics:
        metric = engine_of(run.config).metric
        out["curves"] = figure_bytes(
            curves_figure(run.search_metrics, run.retrain_metrics, metric), fmt)
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             formats: Sequence[str] = FORMATS, backend: str = "auto",
             force: bool = False, overrides: Sequence[str] = ()) -> list[Path]:
    """Write every picture of a run (default: ``RUN_DIR/plots``) in each format. A file of
    that name in the folder is replaced only when ``diffnas plot`` wrote it (or, with
    ``force``, when it is the user's), never when a run needs it; every name is checked
    before any picture is written."""
    from diffnas.report.outputs import is_plot, mark_picture, write_outputs

    run = load_run(run_dir, overrides)
    out = Path(out_dir) if out_dir is not None else run.path / "plots"
    flag = "--out" if out_dir is not None else None
    figures = {fmt: run_figures(run, backend, fmt) for fmt in formats}
    paths = [(out / f"{name}.{fmt}", fmt, data) for fmt, figs in figures.items()
             for name, data in figs.items()]
    if not paths:
        raise PlotError(f"{run_dir}: nothing to plot yet (no genotype, alphas or metrics)")
    legacy = out_dir is None  # the run's own plots/ folder: pictures from before the marker
    return write_outputs([(path, mark_picture(data, fmt), lambda p: is_plot(p, legacy))
                          for path, fmt, data in paths], out, "a picture", "plot", flag, force)


def plots_after_run(run_dir: str | Path, cfg: Any, overrides: Sequence[str] = ()
                    ) -> list[Path]:
    """Redraw ``RUN_DIR/plots`` as a search or retraining ends, when ``cfg.plots`` (a
    RunConfig) is on: the run directory then holds its pictures without a second
    command. ``overrides``: a resume's (``plugins=[...]`` for plugins that moved since
    the run started). Nothing is raised: the run's results are written already, so a
    picture that cannot be drawn or written (a file of the user's in ``plots/``, a
    read-only folder) is a warning naming it and ``diffnas plot``, not a failed run."""
    if not cfg.plots:
        return []
    log = logging.getLogger("diffnas")
    try:
        paths = plot_run(run_dir, overrides=overrides)
    except Exception as exc:  # any failure: the run itself is complete
        log.warning("plots not drawn (%s: %s); the run is complete: %s draws them",
                    type(exc).__name__, exc, shlex.join(["diffnas", "plot", str(run_dir),
                                                         *overrides]))
        return []
    log.info("plots: %s (%d pictures; plots=false skips them)", Path(run_dir) / "plots",
             len(paths))
    return paths
