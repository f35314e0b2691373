"""diffnas: differentiable architecture search, retraining, reports and export.

Command line: ``diffnas search | train | list ...``. argparse stops here: everything
below receives a validated :class:`~diffnas.config.RunConfig`.

Other modules add commands with :func:`register_command`; they are imported lazily in
:data:`COMMAND_MODULES` so ``diffnas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffnas.config import RunConfig
    from diffnas.genotype import Genotype

CommandSetup = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]
_COMMANDS: dict[str, tuple[str, CommandSetup]] = {}

# Modules that register further commands (plots, benchmarks, export, ...).
COMMAND_MODULES: list[str] = [
    "diffnas.hardware.cli",
    "diffnas.report.cli",
    "diffnas.nasbench.cli",
]


def register_command(name: str, help: str) -> Callable[[CommandSetup], CommandSetup]:
    """Register ``setup(parser) -> handler(args) -> exit code`` as ``diffnas NAME``."""

    def deco(setup: CommandSetup) -> CommandSetup:
        _COMMANDS[name] = (help, setup)
        return setup

    return deco


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (examples: configs/ in the diffnas "
                   "repository); without it the built-in "
                   "defaults: the DARTS paper's settings on all of Fashion-MNIST (hours on "
                   "a CPU), changed by the overrides")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.epochs=3")


@register_command("search", "search an architecture, then retrain it (retrain.enabled)")
def _search(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 0,1,2,3: one run each "
        "(in parallel where cores allow), then a summary",
    )
    p.add_argument("--workers", type=int, help="parallel processes for --seeds")

    def run(args: argparse.Namespace) -> int:
        from diffnas.config import ConfigError

        if args.seeds:
            from diffnas.engine.distributed import planned_world_size
            from diffnas.engine.multiseed import seeds_command

            if planned_world_size() > 1:  # each process would run every seed on its own
                raise ConfigError(f"--seeds runs its seeds as separate processes itself; "
                                  f"launch it with python -m diffnas, not under torchrun "
                                  f"with {planned_world_size()} processes")

            return seeds_command(args)
        if args.workers is not None:
            raise ConfigError("--workers sets the parallel processes of --seeds; give --seeds "
                              "too or drop it")
        from diffnas.config import check_run_files, load_config
        from diffnas.engine import distributed as dp
        from diffnas.engine.engines import engine_of
        from diffnas.engine.rundir import new_run_dir
        from diffnas.engine.runlock import acquire_run_lock

        def open_run():  # rank 0 alone touches the run directory; the others get the result
            if args.resume:
                run_dir = Path(args.resume)
                cfg = _resume_config(args)
            else:
                cfg = load_config(args.config, args.overrides)
                check_run_files(cfg)  # before the run directory exists
                run_dir = new_run_dir(cfg, Path(args.config).stem if args.config else "run")
            acquire_run_lock(run_dir)  # freed when the command returns (main)
            return cfg, run_dir

        cfg, run_dir, main = _join_run(args, open_run)
        if main:
            print(f"run directory: {run_dir}")
            if not args.config and not args.resume:
                print("no --config: the built-in defaults with your overrides (see "
                      f"{run_dir / 'config.yaml'}); configs/ in the diffnas repository holds "
                      "examples")
        # the space's engine (engine/engines.py) searches, retrains and prints the result
        rc = engine_of(cfg).search(cfg, run_dir, bool(args.resume))
        dp.shutdown(together=True)
        if main and rc == 0:
            from diffnas.report.plots import plots_after_run

            plots_after_run(run_dir, cfg, args.overrides if args.resume else ())
        return rc

    return run


@register_command("train", "retrain a genotype (a file or a published name) from scratch")
def _train(p: argparse.ArgumentParser):
    _config_args(p)
    p.add_argument("--genotype", help="genotype JSON/DARTS-text file or a name (with --resume: "
                   "defaults to the one the run recorded)")
    p.add_argument("--dry-run", action="store_true", help="build, print params and MACs, exit")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted retraining")

    def run(args: argparse.Namespace) -> int:
        from diffnas.config import ConfigError, check_data_files, load_config
        from diffnas.engine.engines import engine_of
        from diffnas.engine.rundir import new_run_dir, pin_genotype
        from diffnas.engine.runlock import acquire_run_lock
        from diffnas.genotype import resolve_genotype

        if args.genotype is None:  # a resumed run knows its genotype
            recorded = Path(args.resume or "") / "retrain" / "genotype.json"
            if args.resume and not args.dry_run and not recorded.is_file():
                _resume_config(args, search=False)  # a search run: says what to do
            if not args.resume or args.dry_run or not recorded.is_file():
                raise ConfigError("--genotype is required" + (
                    f" ({recorded} does not exist: the run stopped before retraining "
                    "began)" if args.resume and not args.dry_run else ""))
            args.genotype = str(recorded)
        genotype = resolve_genotype(args.genotype)
        if args.dry_run:
            cfg = load_config(args.config, args.overrides, search=False)
            summary = engine_of(cfg).summary(cfg, genotype)  # builds it; trains nothing
            print(genotype)
            print(json.dumps(summary, indent=1))
            return 0
        from diffnas.engine import distributed as dp

        def open_run():  # rank 0 alone touches the run directory
            if args.resume:
                cfg, run_dir = _resume_config(args, search=False), Path(args.resume)
                acquire_run_lock(run_dir)  # freed when the command returns (main)
                return cfg, run_dir
            cfg = load_config(args.config, args.overrides, search=False)
            _check_genotype(cfg, genotype)  # before the run directory exists
            check_data_files(cfg, search=False)
            run_dir = new_run_dir(cfg, "train", command="train")
            acquire_run_lock(run_dir)
            # recorded now, so `train --resume RUN` knows it even if the data was missing
            (run_dir / "retrain").mkdir(parents=True, exist_ok=True)
            pin_genotype(run_dir / "retrain", genotype, resume=False)
            return cfg, run_dir

        cfg, run_dir, main = _join_run(args, open_run)
        engine_of(cfg).train(cfg, genotype, run_dir, bool(args.resume))  # prints (main)
        dp.shutdown(together=True)
        if main:
            from diffnas.report.plots import plots_after_run

            plots_after_run(run_dir, cfg, args.overrides if args.resume else ())
        return 0

    return run


def _join_run(args: argparse.Namespace, open_run: Callable[[], tuple[RunConfig, Path]]
              ) -> tuple[RunConfig, Path, bool]:
    """Start a search or retraining run on every process: join torchrun's group (if any),
    let rank 0 alone ``open_run`` (read the config, make or lock the run directory) and
    share its result, import the run's plugins everywhere, log (rank 0 to the run's
    log.txt) and check a resume's thread count. Returns ``(cfg, run_dir, is_main)``."""
    from diffnas.engine import distributed as dp
    from diffnas.engine.logs import setup_logging
    from diffnas.engine.rundir import check_resume_threads, warn_changed_plugins
    from diffnas.plugins import import_plugins

    main = dp.init_distributed().is_main  # under torchrun: join the process group
    cfg, run_dir = dp.main_process_result(open_run)
    args._run_dir = run_dir  # for the resume hint of an interrupted run (main)
    import_plugins(cfg.plugins)  # rank 0 read the config; the other ranks import here
    setup_logging(run_dir if main else None, verbose=main)
    if main:
        check_resume_threads(run_dir, bool(args.resume), cfg.device)
        if args.resume:  # (into log.txt too: the run's record of going on with edited code)
            warn_changed_plugins(run_dir, cfg)
    return cfg, run_dir, main


def _resume_config(args: argparse.Namespace, search: bool = True):
    """The saved config of ``--resume RUN_DIR``; ``--config`` is refused and overrides are
    limited to where the run executes (``engine/rundir.RESUME_OVERRIDES``). A multi-seed
    parent is refused: its seeds are continued with ``search --seeds ... --resume``.
    ``search=False``: a retraining, which reads no search settings."""
    from diffnas.config import ConfigError
    from diffnas.engine.rundir import SEEDS_FILE, load_run_config, run_kind

    if (Path(args.resume) / SEEDS_FILE).is_file():
        raise ConfigError(f"{args.resume} is a multi-seed run: continue it with "
                          f"diffnas search --seeds ... --resume {args.resume}")
    if args.config:
        raise ConfigError(f"--resume {args.resume} continues with the run's own config.yaml; "
                          "drop --config")
    run = Path(args.resume)
    kind = run_kind(run)
    if search and kind == "train":
        pinned = run / "retrain" / "genotype.json"
        raise ConfigError(
            f"{run} is a retraining made by diffnas train: continue it with diffnas train "
            f"--resume {run} --genotype {pinned if pinned.is_file() else 'GENOTYPE'}")
    if not search and kind == "search":
        from diffnas.engine.rundir import unretrained_search_message

        unretrained = unretrained_search_message(run, load_run_config(run, device=False))
        raise ConfigError(unretrained or f"{run} is a search run made by diffnas search: "
                          f"continue it with diffnas search --resume {run}")
    return load_run_config(run, args.overrides, search=search, warn_plugins=False)


def _check_genotype(cfg: RunConfig, genotype: Genotype) -> None:
    """Refuse a genotype that does not fit the configured space (another space, other
    nodes, cells or ops), as the space's ``build_network`` would once training starts."""
    from diffnas.spaces import create_space

    create_space(cfg.search.space).validate(genotype)


@register_command("list", "list registered ops, spaces, strategies, datasets, genotypes, "
                          "relaxations, discretizers, penalties, engines (with plugins=[...] or "
                          "--config: your plugins' too)")
def _list(p: argparse.ArgumentParser):
    kinds = ["ops", "spaces", "strategies", "datasets", "genotypes", "relaxations",
             "discretizers", "penalties", "engines"]
    p.add_argument("kind", choices=kinds)
    p.add_argument("--config", help="YAML config whose plugins are imported first (only "
                   "its plugins are read), so their components are listed too")
    p.add_argument("overrides", nargs="*", help="plugins=[my_ops.py, mylab.spaces]: import "
                   "these plugins first (other dotted keys are accepted, not used)")

    def plugins_of(args: argparse.Namespace) -> list[str]:
        """The plugins named by ``--config`` and the overrides; the rest of the config is
        not checked (listing needs no valid run: a device or data.root set elsewhere)."""
        from diffnas.config import ConfigError, apply_overrides, parse_override

        entries: list = []
        if args.config is not None:
            from diffnas.config import _load_yaml, read_utf8

            path = Path(args.config)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            data = _load_yaml(read_utf8(path, "config"), str(path)) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping")
            entries = data.get("plugins") or []
        for ov in args.overrides:
            if parse_override(ov)[0] == ["plugins"]:
                entries = apply_overrides({}, [ov])["plugins"] or []
        if not isinstance(entries, list):
            raise ConfigError(f"config.plugins: expected a list of modules or .py files, got "
                              f"{entries!r}")
        return entries

    def run(args: argparse.Namespace) -> int:
        import diffnas.arch as arch
        import diffnas.data as data
        import diffnas.genotype as genotype
        import diffnas.ops as ops
        import diffnas.spaces as spaces
        import diffnas.strategies as strategies
        from diffnas.engine.engines import ENGINES, all_engines
        from diffnas.ops.graph import list_graph_ops
        from diffnas.ops.rnn import RNN_OPS
        from diffnas.plugins import absolute_plugins, import_plugins
        from diffnas.registry import Registry, builtin
        from diffnas.strategies.base import PENALTIES, _import_penalty_modules

        import_plugins(absolute_plugins(plugins_of(args)))
        _import_penalty_modules()

        def engine_of_space(name: str) -> str:
            return getattr(spaces.SPACES.get(name), "engine", "image")

        def spaces_of(engine: str) -> list[str]:
            return [n for n in spaces.SPACES.names() if engine_of_space(n) == engine] or ["no"]

        def marked(registry: Registry) -> list[str]:
            """Its names, a plugin's marked with the file that registered it."""
            out = []
            for n in registry.names():
                module = getattr(registry.get(n), "__module__", None) or ""
                if builtin(module):
                    out.append(n)
                    continue
                file = getattr(sys.modules.get(module), "__file__", None) or module
                out.append(f"{n} (plugin: {file})")
            return out

        names = {
            "ops": lambda: marked(ops.OPS) + [
                f"{n} (recurrent, for the darts_rnn space)" for n in RNN_OPS.names()] + [
                f"{n} (graph, for the gnn space)" for n in list_graph_ops()],
            "spaces": lambda: [  # with the engine that runs each (image unless said)
                shown if engine_of_space(n) == "image" else f"{shown} ({engine_of_space(n)} "
                "engine)" for n, shown in zip(spaces.SPACES.names(), marked(spaces.SPACES),
                                              strict=True)],
            "strategies": lambda: marked(strategies.STRATEGIES),
            "datasets": lambda: marked(data.DATASETS) + [  # the other engines' data
                f"{n} ({e.data_kind}, for the {', '.join(spaces_of(e.name))} space)"
                for e in all_engines() if e.name != "image" for n in sorted(e.datasets())],
            "genotypes": lambda: sorted(genotype.PUBLISHED),
            "relaxations": lambda: marked(arch.RELAXATIONS),
            "discretizers": lambda: marked(genotype.DISCRETIZERS),
            "penalties": lambda: marked(PENALTIES),
            "engines": lambda: [f"{n}: {e.label}, spaces {', '.join(spaces_of(e.name))}; "
                                f"judged by {e.metric.headline.lower()}"
                                + ("; data parallel under torchrun" if e.data_parallel else "")
                                + (f"; settings (engine section): {_settings_text(e.settings)}"
                                   if e.settings is not None else "")
                                for e, n in zip(all_engines(), marked(ENGINES), strict=True)],
        }[args.kind]()
        print("\n".join(names))
        return 0

    return run


def _settings_text(cls: type) -> str:
    """An engine's settings with their defaults ("envs=8, steps=64, seed_file (required)")."""
    import dataclasses

    def shown(f: dataclasses.Field) -> str:
        if f.default is not dataclasses.MISSING:
            return f"{f.name}={f.default}"
        if f.default_factory is not dataclasses.MISSING:
            return f"{f.name}={f.default_factory()}"
        return f"{f.name} (required)"

    return ", ".join(shown(f) for f in dataclasses.fields(cls))


def _resume_hint(args: argparse.Namespace) -> str | None:
    """The command that continues the interrupted ``search``/``train`` of ``args``, or None
    when no run directory was made yet (or its name is not known here)."""
    import shlex

    if args.command not in ("search", "train") or getattr(args, "dry_run", False):
        return None
    run_dir = getattr(args, "_run_dir", None) or args.resume
    if run_dir is None:
        return None
    # a resume's overrides (data.root=, device=, ...) are not saved: the hint repeats them
    extra = "".join(f" {shlex.quote(o)}" for o in args.overrides) if args.resume else ""
    if args.command == "train":
        return (f"diffnas train --resume {shlex.quote(str(run_dir))} "
                f"--genotype {shlex.quote(args.genotype)}{extra}")
    if args.seeds:
        from diffnas.engine.rundir import SEEDS_FILE

        if not (Path(run_dir) / SEEDS_FILE).is_file():  # a parent --resume would refuse
            return None
    seeds = f" --seeds {shlex.quote(args.seeds)}" if args.seeds else ""
    return f"diffnas search{seeds} --resume {shlex.quote(str(run_dir))}{extra}"


def _way_on(args: argparse.Namespace, exc: Exception) -> str:
    """What to do after a full disk (free space, resume: the checkpoint before it is kept),
    data found missing or damaged on reading (fix it, resume: the run directory is kept)
    or a diverged run (a resume keeps the settings that diverged: a new run, from the
    finished search's genotype when there is one); empty for other errors."""
    import errno

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        hint = _resume_hint(args)
        return f"; free some space, then resume with: {hint}" if hint else ""
    from diffnas.data import DataFormatError, DatasetNotFoundError

    if isinstance(exc, (DataFormatError, DatasetNotFoundError)):
        # found on reading, after the run directory was made (absent files are refused
        # before): the run is kept, and continues once the data is fixed
        # (a data.root= the failed command gave is left out: it may be the wrong one)
        kept = [o for o in getattr(args, "overrides", []) if not o.startswith("data.root=")]
        hint = _resume_hint(argparse.Namespace(**{**vars(args), "overrides": kept}))
        if not hint:
            return ""
        setting = getattr(exc, "setting", None)
        if setting:  # a resumed run keeps its settings: the setting needs a new run
            run_dir = getattr(args, "_run_dir", None) or args.resume
            return (f" ({setting} is a setting the run keeps: to use it, start a new run "
                    f"(delete {run_dir} or give another name=); with the files fixed "
                    f"instead, continue it with: {hint})")
        return (f" (the run directory is kept: with the data fixed, continue it with: {hint}; "
                "add data.root=DIR if the data is elsewhere now)")
    if not isinstance(exc, FloatingPointError) or args.command not in ("search", "train"):
        return ""
    run_dir = getattr(args, "_run_dir", None) or getattr(args, "resume", None)
    if run_dir is None:
        return ""
    from diffnas.engine.rundir import retrain_command

    if args.command == "search" and not (Path(run_dir) / "search" / "DONE").exists():
        return (" (a --resume keeps the run's settings: start a new run with a lower "
                "search.strategy.w_optim.lr or a_optim.lr)")
    command = retrain_command(run_dir, args.genotype if args.command == "train" else None)
    if command is None:
        return ""
    return (" (a --resume keeps the run's settings; retrain the genotype in a new run with "
            f"a lower retrain.lr: {command} retrain.lr=...)")


def _interrupted(args: argparse.Namespace, process_entry: bool) -> None:
    """Report Ctrl-C in one line (rank 0 alone under torchrun), not a traceback. When
    ``main`` is the process's entry (``process_entry``: it read ``sys.argv``), a second
    SIGINT (``timeout -s INT`` signals the process and then its group; an impatient user)
    then ends the process at once instead of raising a traceback from exit handlers; an
    in-process caller (``main([...])``, a notebook) keeps its own handler. The ``--seeds``
    workers and torchrun ranks receive the terminal's SIGINT themselves."""
    import os
    import signal
    import threading

    if process_entry and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.environ.get("RANK", "0") != "0":
        return
    # a command that continues where it stopped when run again sets ``args._interrupt_hint``
    # (what to say, e.g. "run the same command again to continue")
    own = getattr(args, "_interrupt_hint", None)
    hint = _resume_hint(args)
    print("diffnas: interrupted" + (f"; {own}" if own else f"; resume with: {hint}" if hint
                                    else ""), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    parser = argparse.ArgumentParser(prog="diffnas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for name, (help_text, setup) in _COMMANDS.items():
        handlers[name] = setup(sub.add_parser(name, help=help_text))
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffnas.config import ConfigError
    from diffnas.data import DatasetNotFoundError
    from diffnas.engine.distributed import launched_by_torchrun, leave_group_on_error
    from diffnas.engine.logs import logging_scope
    from diffnas.engine.runlock import lock_scope
    from diffnas.engine.signals import stop_signals_interrupt
    from diffnas.genotype import GenotypeError
    from diffnas.registry import UnknownNameError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after a flag too (`--seeds 0,1 search.epochs=3`): argparse takes
    # only the first run of positionals, so the later ones arrive here
    if extra and hasattr(args, "overrides") and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # a process of its own stops on SIGTERM/SIGHUP as on Ctrl-C (a scheduler's stop ends a
    # run resumable, with its locks freed); torchrun's ranks keep the default (it stops
    # the others with SIGTERM when one fails)
    stops = (stop_signals_interrupt() if argv is None and not launched_by_torchrun()
             else contextlib.nullcontext())
    try:
        # the run directories a command locked are freed, its log handlers closed, as it
        # returns (also when called in-process); torchrun's group is left on an error
        with stops, lock_scope(), logging_scope(), leave_group_on_error():
            rc = args._handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return rc
    except KeyboardInterrupt as exc:  # Ctrl-C; SIGTERM/SIGHUP (signals.Terminated)
        _interrupted(args, process_entry=argv is None)
        return 128 + getattr(exc, "signum", 2)
    except BrokenPipeError:  # the reader of the output went away (`| head`): no error
        _silence_stdout()
        return 141  # as a shell reports a process ended by SIGPIPE
    except (
        ConfigError,
        GenotypeError,
        DatasetNotFoundError,
        UnknownNameError,
        OSError,  # a missing input, an output under a file, a folder given for a file
        FloatingPointError,
        ValueError,
    ) as exc:
        message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        message += _way_on(args, exc)
        rank = os.environ["RANK"] if launched_by_torchrun() else "0"
        if rank != "0" and isinstance(exc, (ConfigError, UnknownNameError)):
            return 2  # the same on every rank, and rank 0 says it: once, not once per rank
        who = "diffnas" if rank == "0" else f"diffnas (rank {rank})"
        print(f"{who}: error: {message}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point the standard output at ``os.devnull``, so the flush at exit does not fail
    again on the closed pipe (as the Python documentation advises for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
        pass


def os_error_message(exc: OSError) -> str:
    """``PATH: reason`` for an OSError the filesystem raised (the path first, so the user
    sees which of the command's files is at fault); diffnas's own messages unchanged."""
    if exc.filename is None:
        return str(exc)
    if isinstance(exc, FileExistsError) and os.path.isfile(exc.filename):
        return f"{exc.filename} is a file, not a folder: choose another path"
    paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{paths}: {exc.strerror or type(exc).__name__}"


if __name__ == "__main__":
    raise SystemExit(main())
