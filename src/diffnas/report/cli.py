"""Commands ``diffnas plot | report | export RUN_DIR`` (registered on the main CLI)."""

from __future__ import annotations

import argparse
import json

from diffnas.cli import register_command


@register_command("plot", "cell diagrams, alpha heatmaps and curves of a run (PNG + SVG)")
def _plot(p: argparse.ArgumentParser):
    p.add_argument("run_dir", help="a run directory (diffnas search output)")
    p.add_argument("overrides", nargs="*", metavar="plugins=[...]",
                   help="where the run's plugins are now, if they moved (as --resume takes it)")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    p.add_argument("--format", choices=["png", "svg", "both"], default="both")
    p.add_argument("--backend", choices=["auto", "graphviz", "matplotlib"], default="auto",
                   help="cell diagrams: Graphviz's dot when installed (auto) or matplotlib")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at --out that diffnas did not write as a picture "
                        "(a run's own files are never replaced)")

    def run(args: argparse.Namespace) -> int:
        from diffnas.report.plots import PlotError, plot_run

        formats = ("png", "svg") if args.format == "both" else (args.format,)
        try:
            paths = plot_run(args.run_dir, args.out, formats, args.backend, args.force,
                             args.overrides)
        except PlotError as exc:
            raise ValueError(str(exc)) from exc
        print("\n".join(str(p) for p in paths))
        return 0

    return run


@register_command("report", "one self-contained HTML page about a run")
def _report(p: argparse.ArgumentParser):
    p.add_argument("run_dir", help="a run directory (diffnas search output)")
    p.add_argument("overrides", nargs="*", metavar="plugins=[...]",
                   help="where the run's plugins are now, if they moved (as --resume takes it)")
    p.add_argument("--out", help="output file, or a folder to write report.html in "
                   "(default RUN_DIR/report.html)")
    p.add_argument("--backend", choices=["auto", "graphviz", "matplotlib"], default="auto")
    p.add_argument("--check-browser", action="store_true",
                   help="open the page in headless Chromium: fail on console messages or "
                        "images that do not load")
    p.add_argument("--screenshot", metavar="PNG", help="with --check-browser: save a screenshot")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at --out that diffnas did not write as a report "
                        "(a run's own files are never replaced)")

    def run(args: argparse.Namespace) -> int:
        from diffnas.report.html import browser_check, write_report
        from diffnas.report.plots import PlotError

        try:
            path = write_report(args.run_dir, args.out, args.backend, args.force, args.overrides)
        except PlotError as exc:
            raise ValueError(str(exc)) from exc
        print(path)
        if args.check_browser or args.screenshot:
            res = browser_check(path, args.screenshot)
            bad = [i for i, w in enumerate(res["image_widths"]) if w <= 0]
            print(f"{res['browser']}: {len(res['image_widths'])} images, "
                  f"{len(bad)} not loaded, {len(res['console'])} console messages")
            for msg in res["console"]:
                print(f"  console: {msg}")
            if args.screenshot:
                print(f"screenshot: {args.screenshot}")
            if bad or res["console"]:
                return 1
        return 0

    return run


@register_command("compare", "runs (or --seeds parents) side by side: figures, differences "
                  "with intervals and p-values, times, and what else differs")
def _compare(p: argparse.ArgumentParser):
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories or --seeds parents (the first is the baseline); "
                        "plugins=[...] says where the runs' plugins are now, if they moved")
    p.add_argument("--out", help="a folder to write compare.md, compare.json and a strip plot "
                                 "(compare.png, compare.svg) in (default: print only)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at --out that diffnas did not write as a "
                        "comparison (a run's own files are never replaced)")

    def run(args: argparse.Namespace) -> int:
        from diffnas.report.compare import compare_markdown, compare_runs, write_compare

        overrides = [r for r in args.runs if r.startswith("plugins=")]
        runs = [r for r in args.runs if not r.startswith("plugins=")]
        if not runs:
            raise ValueError("compare: name at least one run directory")
        summary = compare_runs(runs, overrides)
        print(compare_markdown(summary), end="")
        if args.out:
            for path in write_compare(summary, args.out, args.force):
                print(f"wrote {path}")
        return 0

    return run


@register_command("export", "export the retrained network to ONNX or TorchScript, checked")
def _export(p: argparse.ArgumentParser):
    p.add_argument("run_dir", help="a run directory with retrain/model.pt")
    p.add_argument("overrides", nargs="*", metavar="plugins=[...]",
                   help="where the run's plugins are now, if they moved (as --resume takes it)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", help="output file (default RUN_DIR/export/model.onnx|.pt)")
    p.add_argument("--atol", type=float, default=1e-5,
                   help="largest allowed output difference from PyTorch (default 1e-5)")
    p.add_argument("--resolution", type=int, help="input side when the config has none")
    p.add_argument("--no-check", action="store_true", help="skip the output comparison")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at --out that diffnas did not write as an export "
                        "(a run's own files are never replaced)")

    def run(args: argparse.Namespace) -> int:
        from diffnas.export import ExportError, export_run

        try:
            res = export_run(args.run_dir, args.format, args.out, args.atol, args.resolution,
                             check=not args.no_check, force=args.force,
                             overrides=args.overrides)
        except ExportError as exc:
            raise ValueError(str(exc)) from exc
        print(json.dumps(res.to_dict(), indent=1))
        return 0

    return run
