"""``diffnas latency measure | fit | report | sweep``: build a latency dataset on this
device, fit the predictor, report costs of a genotype, and run a lambda sweep."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffnas.cli import register_command


def _space_from_config(config: str | None, overrides: list[str], timing: bool = False):
    """(run config, space, input shape (C, H, W), retrain network settings); with
    ``timing`` (measure, report: they time networks on this machine's CPU) a config whose
    ``device`` is not the CPU is refused rather than silently timed on the CPU."""
    from diffnas.config import ConfigError, load_config
    from diffnas.engine.engines import engine_of
    from diffnas.engine.image import dry_run_shape
    from diffnas.spaces import DataShape, create_space

    cfg = load_config(config, overrides)
    if not engine_of(cfg).timed:
        raise ConfigError(f"search.space.name={cfg.search.space['name']}: the latency tools "
                          "time image networks (darts_cnn, nb201 and image plugin spaces)")
    if timing and cfg.device not in ("cpu", "auto"):
        raise ConfigError(f"device={cfg.device}: latency measure and report time networks on "
                          "the CPU; set device=cpu (GPU timing is not supported yet)")
    c, side, k = dry_run_shape(cfg.data.name, cfg.data.resolution, cfg.data.root)
    space = create_space(cfg.search.space, DataShape(c, side, k))
    network = {key: v for key, v in cfg.retrain.network.items() if key != "auxiliary"}
    return cfg, space, (c, side, side), network


def _settings(args: argparse.Namespace):
    from diffnas.hardware.latency import LatencySettings

    return LatencySettings(batch_size=args.batch_size, warmup=args.warmup,
                           repeats=args.repeats, threads=args.threads, clock=args.clock)


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15, help="timed samples (median is kept)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (fixed; 0: as the environment sets them, e.g. "
                   "OMP_NUM_THREADS, and recorded as the count in use)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time, or CPU time of the (single) inference thread: the "
                        "latency on an unloaded core, robust on a shared machine")


@register_command("latency", "latency datasets, predictor and sweeps (hardware-aware search)")
def _latency(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="latency_command", required=True)

    m = sub.add_parser("measure", help="sample, build and time architectures; append records")
    m.add_argument("--config", help="YAML run config: space, data shape, retrain network")
    m.add_argument("--out", required=True, help="JSON Lines dataset (appended to)")
    m.add_argument("-n", "--count", type=int, default=300, help="new architectures")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--chunk", type=int, default=25, help="models timed interleaved together")
    _latency_args(m)
    m.add_argument("overrides", nargs="*", help="dotted config overrides")

    f = sub.add_parser("fit", help="train the MLP latency predictor on a dataset")
    f.add_argument("--data", required=True, help="latency dataset (JSON Lines)")
    f.add_argument("--out", required=True, help="predictor file to write (.pt)")
    f.add_argument("--config", help="YAML run config naming the space")
    f.add_argument("--holdout", type=float, default=0.2, help="held-out fraction")
    f.add_argument("--epochs", type=int, default=600)
    f.add_argument("--hidden", type=int, default=32, help="MLP width")
    f.add_argument("--mlp-decay", type=float, default=1e-2, help="weight decay of the MLP")
    f.add_argument("--edge-decay", type=float, default=1.0,
                   help="weight decay of the per-edge corrections")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--target", choices=["anchored", "raw"], default="anchored",
                   help="load-corrected (anchored) or raw median latencies")
    f.add_argument("--fingerprint", help="use only records of this device id")
    f.add_argument("overrides", nargs="*")

    r = sub.add_parser("report", help="params, FLOPs per op, measured and predicted latency")
    r.add_argument("--config", help="YAML run config")
    r.add_argument("--genotype", required=True, help="genotype file or published name")
    r.add_argument("--predictor", help="fitted predictor (.pt) for the predicted latency")
    _latency_args(r)
    r.add_argument("overrides", nargs="*")

    s = sub.add_parser("sweep", help="search at several lambdas; plot accuracy vs latency")
    s.add_argument("--config", required=True, help="YAML run config of the searches")
    s.add_argument("--predictor", required=True)
    s.add_argument("--lambdas", default="0,0.1,0.3,1", help="comma-separated")
    s.add_argument("--out", required=True, help="directory for runs, table and plot")
    _latency_args(s)
    s.add_argument("overrides", nargs="*")

    def run(args: argparse.Namespace) -> int:
        return {"measure": _measure, "fit": _fit, "report": _report,
                "sweep": _sweep}[args.latency_command](args)

    return run


def measure_hint(out: str, done: int, count: int) -> str:
    """What a Ctrl-C of ``latency measure`` says: the chunks measured so far are kept in
    ``out``, and running the command again appends architectures it does not hold yet
    (``-n`` counts new ones, so the rest is ``-n count - done``; none when all are in)."""
    if not done:
        return (f"nothing was appended to {out}; run the same command again to measure "
                "(architectures the file already holds are skipped)")
    if done >= count:  # stopped after the last chunk: nothing left (and -n 0 is refused)
        return f"all {count} new records were appended to {out} and are kept"
    return (f"{done} of {count} new records were appended to {out} and are kept; run the "
            f"same command again with -n {count - done} to measure the rest (it appends "
            "architectures the file does not hold yet)")


#: what a Ctrl-C of ``latency sweep`` says (cli.main)
SWEEP_HINT = ("run the same command again to continue the sweep: finished lambdas are "
              "reused, a stopped search or retraining continues from its checkpoint")


def _measure(args: argparse.Namespace) -> int:
    from diffnas.hardware.dataset import build_dataset

    for flag, value in (("--count", args.count), ("--chunk", args.chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    cfg, space, shape, network = _space_from_config(args.config, args.overrides, timing=True)
    print(f"measuring {args.count} {space.name} architectures, input {shape}, network "
          f"{network}, {_settings(args)}", flush=True)
    args._interrupt_hint = measure_hint(args.out, 0, args.count)  # said on Ctrl-C (cli.main)

    def progress(done: int, count: int) -> None:
        print(f"  {done}/{count}", flush=True)
        args._interrupt_hint = measure_hint(args.out, done, count)

    new = build_dataset(space, args.out, args.count, shape, network, _settings(args),
                        args.seed, args.chunk, progress=progress,
                        space_section=dict(cfg.search.space))
    print(f"appended {len(new)} records to {args.out}")
    return 0


#: keys of the report ``latency fit`` writes beside the predictor (``X.json`` for ``X.pt``)
FIT_REPORT_KEYS = frozenset({"records", "heldout_mre", "target"})


def _is_predictor(path: str | Path) -> bool:
    """Whether ``path`` holds a latency predictor (a refit may replace it)."""
    from diffnas.hardware.predictor import LatencyPredictor

    try:
        LatencyPredictor.load(path)
    except Exception:  # noqa: BLE001 - whatever it is, it is not a predictor to replace
        return False
    return True


def _fit(args: argparse.Namespace) -> int:
    from diffnas.engine.checkpoint import atomic_write_text, written_by_diffnas
    from diffnas.hardware.dataset import load_records
    from diffnas.hardware.predictor import fit_predictor

    if Path(args.out).suffix.lower() == ".json":  # the report goes to OUT with the suffix .json
        raise ValueError(f"--out {args.out}: the predictor's report is written beside it as "
                         "a .json file; name the predictor .pt")
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: the predictor needs at least 1 epoch")
    if Path(args.out).resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {args.out} is the --data file: the predictor would replace "
                         "the measured records; name the predictor otherwise")
    if Path(args.out).exists() and not _is_predictor(args.out):
        raise ValueError(f"--out {args.out}: that path holds something other than a latency "
                         "predictor diffnas wrote, which would be replaced; move it or name "
                         "the predictor otherwise")
    described = Path(args.out).with_suffix(".json")
    if not written_by_diffnas(described, FIT_REPORT_KEYS):  # a user's own file of that name
        raise ValueError(f"--out {args.out}: the fit's report would replace {described}, "
                         "which is not a report diffnas wrote; move it or name the "
                         "predictor otherwise")
    _, space, _, _ = _space_from_config(args.config, args.overrides)
    records = load_records(args.data, args.fingerprint)
    predictor, report = fit_predictor(records, space, holdout=args.holdout,
                                      epochs=args.epochs, seed=args.seed, target=args.target,
                                      hidden=args.hidden, mlp_decay=args.mlp_decay,
                                      edge_decay=args.edge_decay)
    predictor.save(args.out)
    print(json.dumps(report, indent=1))
    atomic_write_text(json.dumps(report, indent=1) + "\n", Path(args.out).with_suffix(".json"))
    return 0


def _report(args: argparse.Namespace) -> int:
    from diffnas.genotype import resolve_genotype
    from diffnas.hardware.costs import genotype_costs

    _, space, shape, network = _space_from_config(args.config, args.overrides, timing=True)
    genotype = resolve_genotype(args.genotype)
    out = genotype_costs(space, genotype, shape, network, _settings(args), args.predictor)
    print(genotype)
    print(json.dumps(out, indent=1))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from diffnas.hardware.sweep import run_sweep

    items = args.lambdas.split(",")
    if any(not x.strip() for x in items):  # "0,,1": a value left out, not a separator
        raise ValueError(f"--lambdas {args.lambdas!r}: an empty item; give numbers "
                         "separated by single commas, e.g. 0,0.5,2")
    try:
        lambdas = [float(x) for x in items]
    except ValueError:
        raise ValueError(f"--lambdas {args.lambdas!r}: give numbers separated by commas, "
                         "e.g. 0,0.5,2") from None
    args._interrupt_hint = SWEEP_HINT  # said on Ctrl-C (cli.main)
    run_sweep(args.config, args.overrides, args.predictor, lambdas, Path(args.out),
              _settings(args))
    return 0
