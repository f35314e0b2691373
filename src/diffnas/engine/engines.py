"""Engines: the code that searches and retrains the spaces that name it.

A space declares its engine by name (``SearchSpace.engine``). ``diffnas search`` and
``train``, ``--seeds``, ``export``, the latency tools and the config checks look the engine
up here instead of testing for particular spaces, so a new kind of task (another domain)
is one module that defines an :class:`Engine` and registers it with
:func:`register_engine` (a plugin, like any component), plus spaces that name it.

Built in: ``image`` (engine/image.py, on engine/search.py and retrain.py),
``language_model`` (engine/lm.py) and ``graph`` (engine/graph.py). This module imports
no torch; the built-in engines are imported when one is first looked up.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffnas.registry import Registry

if TYPE_CHECKING:
    from diffnas.config import RunConfig
    from diffnas.genotype import Genotype

@dataclass(frozen=True)
class Metric:
    """The retrained figure an engine's runs are judged by: the headline of a multi-seed
    summary (``--seeds``) and of ``diffnas report``. ``key``: its key in the retraining's
    ``result.json``; ``name``: how text names it ("accuracy": "Retrained test accuracy",
    "Search validation accuracy"); ``short``: its table column ("acc": "test acc");
    ``format``: a format spec of one value (``".2%"``, ``".4f"``); ``search_key``: the key
    of the search's validation figure in its ``metrics.jsonl`` rows (None: none);
    ``title``: the summary's headline where "Retrained test <name>" would not fit (a
    figure not measured on a test split); ``search_title``: how text names the search's
    figure where "search validation <name>" would not fit (no validation data);
    ``lower_is_better``: the figure falls as runs improve (perplexity, an error), which
    ``diffnas compare`` says with each clear difference (better or worse)."""

    key: str
    name: str
    short: str
    format: str = ".4f"
    search_key: str | None = None
    title: str | None = None
    search_title: str | None = None
    lower_is_better: bool = False

    @property
    def headline(self) -> str:
        """What a multi-seed summary calls the figure."""
        return self.title or f"Retrained test {self.name}"

    @property
    def search_name(self) -> str:
        """What a summary and a report call the search's figure (``search_key``)."""
        return self.search_title or f"search validation {self.name}"

    @property
    def column(self) -> str:
        """A table's column of the figure ("test acc"; a figure with a ``title`` of its own
        is not measured on a test split: its ``short`` alone)."""
        return self.short if self.title else f"test {self.short}"

    @property
    def search_column(self) -> str:
        """A table's column of the search's figure ("search val acc", or "search <short>"
        where the search has no validation data)."""
        return f"search {self.short}" if self.search_title else f"search val {self.short}"

    def __post_init__(self) -> None:
        for field in ("key", "name", "short"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"Metric.{field} must be a non-empty string, got "
                                 f"{getattr(self, field)!r}")
        try:
            format(0.5, self.format)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Metric {self.key!r}: format {self.format!r} does not format a "
                             f"number ({exc}); e.g. '.2%' or '.4f'") from None

    def text(self, value: Any) -> str:
        """``value`` formatted, or "-" where there is none (None, NaN, not a number)."""
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        return format(value, self.format) if ok else "-"


#: image and graph classification: the share of test examples classified right
ACCURACY = Metric("test_acc", "accuracy", "acc", ".2%", "val_acc")
#: a language model: exp of the mean test cross-entropy per token (lower is better)
PERPLEXITY = Metric("test_ppl", "perplexity", "ppl", ".2f", "valid_ppl", lower_is_better=True)


def _nothing(*_: Any) -> None:
    return None


def _network(cfg: RunConfig) -> dict[str, Any]:
    return dict(cfg.retrain.network)


@dataclass(frozen=True)
class Engine:
    """What runs the searches and retrainings of the spaces whose ``engine`` is ``name``.

    The commands call ``search`` (``diffnas search`` once its run directory is open: the
    search, then the retraining when ``retrain.enabled``, then the result printed by the
    main process; returns the exit status), ``train`` (``diffnas train``: retrain a
    genotype and print the result), ``run_search`` / ``run_retrain`` (the two halves, for
    ``--seeds``; ``run_search`` returns an object with ``.genotype``) and ``summary``
    (``train --dry-run``: a JSON-able dict about the network, training nothing). Without
    ``search`` / ``train``, they are made from the two halves and ``report(genotype,
    result or None)``, which prints the outcome (``search.search_then_retrain``). The
    config checks call ``check_config`` (every run, before its run directory exists),
    ``check_search`` (searches; ``device``: the device may be judged too),
    ``check_retrain`` (runs that retrain) and ``retrain_network`` (``retrain.network`` as
    the retraining passes it to the space's ``build_network``)."""

    name: str
    #: how messages name the engine ("language-model (engine/lm.py)")
    label: str
    #: how messages name one of its runs ("a language-model run")
    a_run: str
    #: the kind of data it reads ("image", "text", "graph")
    data_kind: str
    #: the names of the datasets it reads (a registry or any collection of names)
    datasets: Callable[[], Collection[str]]
    run_search: Callable[..., Any]
    run_retrain: Callable[..., Any]
    summary: Callable[[RunConfig, Genotype], dict[str, Any]]
    search: Callable[[RunConfig, Path, bool], int] | None = None
    train: Callable[[RunConfig, Genotype, Path, bool], None] | None = None
    #: prints a finished run's genotype and retraining result (None: retraining disabled)
    #: for the ``search`` and ``train`` made when those are not given
    report: Callable[[Genotype, dict[str, Any] | None], None] | None = None
    check_config: Callable[[RunConfig], None] = _nothing
    check_search: Callable[[RunConfig, bool], None] = _nothing
    check_retrain: Callable[[RunConfig], None] = _nothing
    retrain_network: Callable[[RunConfig], dict[str, Any]] = _network
    #: the retrained figure its runs are judged by (multi-seed summary, report)
    metric: Metric = ACCURACY
    #: ``data`` settings it never reads: refused when changed from their defaults
    unused_data: tuple[str, ...] = ()
    #: ``retrain`` settings it never reads: refused when changed from their defaults
    unread_retrain: tuple[str, ...] = ()
    #: config sections read by this engine alone (``lm``): refused on other engines' runs
    sections: tuple[str, ...] = ()
    #: a dataclass of its own settings, the keys of the config's ``engine`` section (a
    #: plugin engine's constants made settings: :func:`engine_settings`); None: it takes
    #: none, and an ``engine`` section on its runs is refused
    settings: type | None = None
    #: ``diffnas export`` writes its retrained networks (image classifiers)
    exportable: bool = False
    #: the latency tools time its networks
    timed: bool = False
    #: its runs take torchrun's ranks (each a slice of every batch, engine/distributed.py);
    #: an engine without it is refused under torchrun, where every rank would repeat its run
    data_parallel: bool = False

    def __post_init__(self) -> None:
        # the module that defines the engine (its run_search's), so that a plugin's
        # failed import unregisters it (registry.registrations_undone_on_error)
        object.__setattr__(self, "__module__", getattr(self.run_search, "__module__", None))
        if (self.search is None or self.train is None) and self.report is None:
            raise ValueError(f"engine {self.name!r}: give search and train, or report (which "
                             "prints a run's genotype and result) to make them")
        if self.settings is not None and not (isinstance(self.settings, type)
                                              and is_dataclass(self.settings)):
            raise ValueError(f"engine {self.name!r}: settings must be a dataclass (its fields "
                             f"are the config's engine section), got {self.settings!r}")
        if self.search is None:
            object.__setattr__(self, "search", self._search)
        if self.train is None:
            object.__setattr__(self, "train", self._train)

    def _search(self, cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
        """``diffnas search`` from the two halves: search (unless done), retrain when
        enabled, report on the main process."""
        from diffnas.engine.search import search_then_retrain

        return search_then_retrain(
            cfg, run_dir, lambda: self.run_search(cfg, run_dir, resume).genotype,
            lambda g: self.run_retrain(cfg, g, run_dir, resume), self.report)

    def _train(self, cfg: RunConfig, genotype: Genotype, run_dir: Path,
               resume: bool = False) -> None:
        """``diffnas train`` from ``run_retrain``: retrain ``genotype``, report."""
        self.report(genotype, self.run_retrain(cfg, genotype, run_dir, resume))


ENGINES: Registry[Engine] = Registry("engine")


def engine_settings(cfg: RunConfig) -> Any:
    """The ``engine`` section of ``cfg`` as its engine's :attr:`Engine.settings` dataclass
    (its defaults where keys are left out; unknown keys and bad values are a
    ``ConfigError`` naming them), or None for an engine without settings, whose runs
    refuse a non-empty section."""
    from diffnas.config import ConfigError, from_dict

    engine, section = engine_of(cfg), cfg.engine  # (a mapping: the config loader's check)
    if engine.settings is None:
        if section:
            raise ConfigError(f"config.engine: the {engine.label} engine takes no settings "
                              f"of its own ({', '.join(f'engine.{k}' for k in section)}): "
                              "remove them")
        return None
    return from_dict(engine.settings, section, "engine")


def register_engine(engine: Engine) -> Engine:
    """Register ``engine`` under its name (a duplicate name is an error); returns it."""
    if not isinstance(engine.metric, Metric):
        raise ValueError(f"engine {engine.name!r}: metric {engine.metric!r} is not a Metric "
                         "(diffnas.engine.engines.Metric, e.g. ACCURACY, PERPLEXITY or "
                         "Metric('test_rmse', 'RMSE', 'rmse', '.4f', 'val_rmse'))")
    return ENGINES.register(engine.name)(engine)


def _import_builtins() -> None:
    from diffnas.engine import graph, image, lm  # noqa: F401  (registration)


def get_engine(name: str) -> Engine:
    """The engine registered as ``name`` (an unknown name lists the known ones)."""
    _import_builtins()
    return ENGINES.get(name)


def list_engines() -> list[str]:
    """The registered engines' names, sorted (the built-in ones imported first)."""
    _import_builtins()
    return ENGINES.names()


def all_engines() -> list[Engine]:
    """Every registered engine, in name order."""
    return [get_engine(name) for name in list_engines()]


def refuse_image_search_settings(cfg: RunConfig, device: bool = True) -> None:
    """The image engine's search settings (bf16 autocast, torch.compile, CUDA graphs, cuDNN
    autotuning, collapse diagnostics, ``evaluate=false``) on a run of another engine, which
    would not read them: a ConfigError naming the setting and the engine, not silence. For
    the config checks of engines other than ``image``, built-in and plugin alike (it has
    the signature of ``Engine.check_search``; ``device`` is not used)."""
    from diffnas.config import ConfigError

    s = cfg.search
    for name, on in (("amp", s.amp is not None), ("compile", s.compile is not None),
                     ("cuda_graph", s.cuda_graph), ("cudnn_benchmark", s.cudnn_benchmark),
                     ("diagnostics.enabled", s.diagnostics.enabled)):
        if on:
            raise ConfigError(f"search.{name} is for image searches; the "
                              f"{engine_of(cfg).label} search does not take it: switch it off")
    if not s.evaluate:
        raise ConfigError(f"search.evaluate=false is for image searches; the "
                          f"{engine_of(cfg).label} search evaluates the supernet after every "
                          "epoch whatever it says: leave it true")


def refuse_torchrun(engine: Engine) -> None:
    """torchrun (more than one process) for an engine that is not data parallel: a
    ConfigError, since every rank would repeat its whole run. The config checks call it
    for every run; an engine's own entry points may too."""
    from diffnas.config import ConfigError
    from diffnas.engine.distributed import planned_world_size

    if not engine.data_parallel and planned_world_size() > 1:
        raise ConfigError(f"torchrun: the {engine.label} engine runs in one process (its "
                          "Engine is not data_parallel: every rank would repeat the whole "
                          "run); run it without torchrun")


def engine_of(cfg: RunConfig) -> Engine:
    """The engine of the space ``cfg.search.space`` names (``spaces.space_engine``)."""
    from diffnas.spaces import space_engine

    return get_engine(space_engine(cfg.search.space))
