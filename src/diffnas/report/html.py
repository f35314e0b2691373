"""``diffnas report RUN_DIR``: one self-contained HTML page about a run.

Everything is inside the file: images are base64 ``data:`` URIs, the style sheet is
inline, there is no script and no link to anything outside, so the page can be mailed,
archived or opened offline and shows the same thing years later.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from diffnas.config import to_dict
from diffnas.engine.callbacks import (
    SEARCH_VAL_MEASURES,
    duration,
    search_val_acc,
    total_seconds,
)
from diffnas.engine.engines import engine_of
from diffnas.genotype import CellGenotype, cell_title
from diffnas.report.outputs import (
    REPORT_MARK,
    check_output,
    check_writable,
    is_report,
    write_outputs,
)
from diffnas.report.plots import (
    CellKind,
    RunData,
    cell_kind,
    load_run,
    resolve_backend,
    run_figures,
)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd;
       padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em;
      white-space: pre-wrap; word-break: break-word; }
figure { margin: 1em 0; } figcaption { color: #666; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.muted { color: #777; }
"""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "-"


def _img(data: bytes, caption: str) -> str:
    return (f'<figure><img alt="{_esc(caption)}" src="{data_uri(data, "image/svg+xml")}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _summary_rows(run: RunData) -> list[tuple[str, str]]:
    cfg, res = run.config, run.result
    rows = [("run directory", str(run.path.resolve())),
            ("dataset", f"{cfg.data.name}" + (f" at {cfg.data.resolution}px"
                                             if cfg.data.resolution else ""))]
    if run.kind == "train":  # no search: its config's search settings were never read
        rows.append(("run", "retraining of a given genotype (diffnas train)"))
    else:
        rows += [("space / strategy", f"{cfg.search.space.get('name')} / "
                                      f"{cfg.search.strategy.get('name', 'darts')}"),
                 ("search epochs", f"{len(run.search_metrics)} of {cfg.search.epochs}")]
    metric = engine_of(cfg).metric  # the figure its engine's runs are judged by
    if run.search_metrics:
        acc, key = search_val_acc(run.search_metrics[-1])
        if key is not None:
            rows.append((f"search validation accuracy (last epoch; {SEARCH_VAL_MEASURES[key]})",
                         _pct(acc)))
        if metric.search_key not in (None, "val_acc"):  # e.g. a language model's valid_ppl
            rows.append((f"{metric.search_name} (last epoch)",
                         metric.text(run.search_metrics[-1].get(metric.search_key))))
    # graph and language-model retrainings report the weights of the best validation
    # epoch (``best_epoch``, 0-based), as the command line says; image ones the last epoch;
    # an engine whose figure has a title of its own (no test split) its own best epoch
    # (a VQE's lowest energy)
    best = res.get("best_epoch") if res is not None else None
    which = ("final" if best is None else f"best epoch ({best + 1})" if metric.title
             else f"best validation epoch ({best + 1})")
    if res is not None and "test_ppl" in res:  # a language model (engine/lm.py)
        rows += [
            (f"validation / test perplexity, {which}",
             f"{res['valid_ppl']:.2f} / {res['test_ppl']:.2f}"),
            ("retrain epochs", f"{res.get('epochs_done')} of {cfg.retrain.epochs}"),
            ("parameters", _count(res.get("params"))),
        ]
    elif res is not None and metric.key != "test_acc":  # a plugin engine's own figure
        rows += [(f"{metric.title or 'test ' + metric.name}, {which}",
                  metric.text(res.get(metric.key))),
                 ("retrain epochs", f"{res.get('epochs_done')} of {cfg.retrain.epochs}"),
                 ("parameters", _count(res.get("params")))]
    elif res is not None:
        rows.append((f"test accuracy, {which}", _pct(res.get("test_acc"))))
        if res.get("last_test_acc") is not None:
            rows.append(("test accuracy, last epoch", _pct(res["last_test_acc"])))
        rows += [
            ("retrain epochs", f"{res.get('epochs_done')} of {cfg.retrain.epochs}"),
            (_params_label(cfg), _count(res.get("params"))),
        ]
        if res.get("macs") is not None:
            rows += [("MACs per image", f"{res['macs'] / 1e6:.2f} M"),
                     ("FLOPs per image (2 x MACs)", f"{2 * res['macs'] / 1e6:.2f} M")]
    else:
        rows.append(("retraining", "not run (or not finished)"))
    for phase, metrics in (("search", run.search_metrics), ("retraining", run.retrain_metrics)):
        seconds = total_seconds(metrics)
        if seconds is not None:
            rows.append((f"{phase} time (wall clock, {len(metrics)} epochs)", duration(seconds)))
    return rows


def _params_label(cfg: Any) -> str:
    """How the summary names the retrained parameter count: the image engine counts it
    without the auxiliary head (engine/retrain.py); other engines' networks have none."""
    return ("parameters (without auxiliary head)" if engine_of(cfg).name == "image"
            else "parameters")


def _output_text(cell: CellGenotype, kind: CellKind) -> str:
    """What a cell's output is made of: a concatenation (image cells) or the mean
    (recurrent and graph cells) of its concat nodes; for a plugin engine's cells only
    which nodes, as the report cannot know how its network combines them."""
    nodes = list(cell.concat)
    if kind.combine is None:
        return f"output: from nodes {nodes}"
    return f"output: {kind.combine} of nodes {nodes}"


def _genotype_table(run: RunData) -> str:
    g = run.genotype
    if g is None:
        return '<p class="muted">no genotype yet</p>'
    note = run.genotype_note()
    parts = [f"<p><strong>{_esc(note[0].upper() + note[1:])}.</strong></p>"] if note else []
    parts.append(f"<pre>{_esc(str(g))}</pre>")
    kind = cell_kind(g.space)
    for cell in g.cells:
        rows = "".join(f"<tr><td>{e.src} &rarr; {e.dst}</td><td>{_esc(e.op)}</td></tr>"
                       for e in sorted(cell.edges, key=lambda e: (e.dst, e.src)))
        parts.append(f"<h3>{_esc(cell_title(cell.name))}</h3><table><tr><th>edge (node &rarr; node)"
                     f"</th><th>op</th></tr>{rows}</table><p>{_esc(_output_text(cell, kind))}</p>")
    return "\n".join(parts)


def _metrics_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "epoch"]  # all rows
    head = "".join(f"<th>{_esc(k)}</th>" for k in ["epoch", *keys])
    body = "".join(
        "<tr>" + f'<td class="num">{r["epoch"] + 1}</td>' + "".join(
            f'<td class="num">{r[k]:.4g}</td>' if isinstance(r.get(k), (int, float))
            else "<td>-</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(run: RunData, backend: str = "auto") -> str:
    """The HTML text of a run's report."""
    figs = run_figures(run, backend, "svg")
    title = f"diffnas run {run.path.resolve().name}"  # (the name of '.' too)
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', REPORT_MARK,
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        '<p class="muted">Generated by <code>diffnas report</code>; self-contained (no external '
        "resources).</p>",
        "<h2>Summary</h2><table>",
        *(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _summary_rows(run)),
        "</table>",
        "<h2>Genotype</h2>", _genotype_table(run),
    ]
    cells = [k for k in figs if k.startswith("cell_")]
    if cells:
        out.append(f"<h2>Cells</h2><p class=\"muted\">drawn with {resolve_backend(backend)}"
                   "</p>")
        note = run.genotype_note()
        out += [_img(figs[k], cell_title(k[5:]) + (f" ({note})" if note else "")) for k in cells]
    alphas = [k for k in figs if k.startswith("alphas_")]
    if alphas:
        out.append("<h2>Architecture weights over the search</h2><p>softmax(alpha) of every "
                   "edge (rows); for each op a block of columns, one per epoch.</p>")
        out += [_img(figs[k], f"{cell_title(k[7:])}: softmax(alpha) per edge and epoch")
                for k in alphas]
    if "curves" in figs:
        out += ["<h2>Curves</h2>", _img(figs["curves"], "loss and accuracy per epoch")]
    out += ["<h2>Metrics</h2>"]
    if run.search_metrics:
        out += ["<h3>search</h3>", _metrics_table(run.search_metrics)]
    if run.retrain_metrics:
        out += ["<h3>retraining</h3>", _metrics_table(run.retrain_metrics)]
    cfg_text = yaml.safe_dump(to_dict(run.config), sort_keys=False)
    out += ["<h2>Configuration</h2>", f"<pre>{_esc(cfg_text)}</pre>"]
    if run.result is not None:
        brief = {k: v for k, v in run.result.items() if k not in ("history", "genotype")}
        out += ["<h2>Result file</h2>", f"<pre>{_esc(json.dumps(brief, indent=1))}</pre>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 backend: str = "auto", force: bool = False,
                 overrides: Sequence[str] = ()) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``: a file, or a directory to write
    ``report.html`` in) and return its path. An existing file there is replaced only when
    it is an earlier diffnas report (or, with ``force``, a file of the user's), never when
    it is a file a run needs (:func:`diffnas.report.outputs.check_output`)."""
    run = load_run(run_dir, overrides)
    path = Path(out) if out is not None else run.path / "report.html"
    if path.is_dir() or str(out).endswith(("/", os.sep)):  # a folder, or one to make
        path = path / "report.html"
    flag = "--out" if out is not None else None
    check_output(path, is_report, "a report", flag, force)  # before the rendering's work
    check_writable(path.parent, path, flag)
    page = render_report(run, backend)
    return write_outputs([(path, page.encode("utf-8"), is_report)], path.parent, "a report",
                         "report", flag, force)[0]


# --- checking a report in a real browser ---------------------------------------------
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
_PROBE = ("<script>window.addEventListener('load', () => document.querySelectorAll('img')"
          ".forEach((im, i) => console.log('diffnas-probe img ' + i + ' ' + im.naturalWidth)))"
          ";</script>")
_CONSOLE = re.compile(r':CONSOLE[^\]]*\] "(.*)", source: (.*)$')


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH (Debian: ``apt-get install chromium``)."""
    for name in BROWSERS:
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def _chromium(exe: str, url: str, *flags: str, timeout: float = 120) -> str:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--enable-logging=stderr", "--v=0", *flags, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{exe} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stderr


def browser_check(report: str | Path, screenshot: str | Path | None = None,
                  browser: str | None = None, width: int = 1200, height: int = 3200
                  ) -> dict[str, Any]:
    """Open ``report`` in headless Chromium. Returns the page's console messages (the
    report has no script, so any message, e.g. an uncaught error, is a problem) and the
    decoded width of every image (0 = the image did not load). With ``screenshot``, also
    saves a PNG of the page. Raises when no Chromium is installed."""
    exe = browser or find_browser()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    report = Path(report).resolve()
    text = report.read_text(encoding="utf-8")
    probe = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / report.name
        probed.write_text(probe, encoding="utf-8")
        log = _chromium(exe, probed.as_uri(), "--dump-dom")
    messages, widths = [], {}
    for line in log.splitlines():
        m = _CONSOLE.search(line)
        if not m:
            continue
        msg = m.group(1)
        if msg.startswith("diffnas-probe img "):
            i, w = msg.split()[-2:]
            widths[int(i)] = int(w)
        else:
            messages.append(f"{msg} ({m.group(2)})")
    if screenshot is not None:
        from diffnas.engine.checkpoint import staged_path

        shot = Path(screenshot).resolve()
        with staged_path(shot) as staged:  # shot appears only when Chromium wrote it
            _chromium(exe, report.as_uri(), f"--screenshot={staged}", "--hide-scrollbars",
                      f"--window-size={width},{height}")
            if staged.stat().st_size == 0:
                raise OSError(errno.EIO, "Chromium wrote no screenshot", str(shot))
    return {"console": messages, "image_widths": [widths[i] for i in sorted(widths)],
            "browser": exe}
