"""Run configuration: dataclasses per component, YAML load/save, dotted overrides.

Unknown keys are an error everywhere, with the dotted path of the offending key. The
``space`` and ``strategy`` sections are validated against the config class that the named
space or strategy registers, so each component owns its own settings.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from diffnas.engine.engines import Engine

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def read_utf8(path: str | Path, what: str) -> str:
    """The text of ``path``; a file that is not UTF-8 (saved as Latin-1 by an editor, or
    not text at all) is a :class:`ConfigError` naming the file, line and byte, not
    Python's bare codec message."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: this {what} file is not UTF-8 text (byte "
                          f"0x{raw[exc.start]:02x} on line {line}); save it as UTF-8") \
            from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the
    last: a second ``search:`` section would silently drop the first one's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # (an unhashable key: the base class says what is wrong)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` with keys given twice refused; malformed YAML is a
    :class:`ConfigError` naming ``where`` (a file or an override) and the line and column
    of the problem."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{at}") from None


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise :class:`ConfigError` ``"<key> must be <rule>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def require_sizes(obj: Any, keys: tuple[str, ...], where: str) -> None:
    """Each ``obj.<key>`` (a dataclass field) is an int >= 1 (a width, a depth, a count),
    or ``None`` where the field's type allows it (the message offers null only there)."""
    nullable = {f.name for f in dataclasses.fields(obj) if "None" in str(f.type)}
    for key in keys:
        value = getattr(obj, key)
        require((value is None and key in nullable) or (value is not None and value >= 1),
                f"{where}.{key}", ">= 1 (or null)" if key in nullable else ">= 1", value)


#: the most mixed edges a searched cell may have. A cell of n nodes has about n^2 / 2 edges,
#: each holding every candidate op: darts_cnn at 61 nodes (1,952 edges) is a supernet of about
#: 250M weights at C=16, built in about a minute; a typo such as nodes=100000 would fill the
#: memory while its edges are listed, before any message
MAX_CELL_EDGES = 2000


def require_cell_edges(nodes: int, edges: Callable[[int], int], formula: str,
                       key: str = "search.space.nodes") -> None:
    """Refuse a cell of ``nodes`` nodes with more than :data:`MAX_CELL_EDGES` mixed edges
    (``edges(n)``: a space's edge count, ``formula`` its text), naming the largest count."""
    if nodes < 1 or edges(nodes) <= MAX_CELL_EDGES:
        return
    most = 1
    while edges(most + 1) <= MAX_CELL_EDGES:
        most += 1
    require(False, key, f"at most {most} (a cell of n nodes has {formula} mixed edges, each "
            f"computing every candidate op; {nodes:,} nodes would make {edges(nodes):,} "
            f"edges per cell; diffnas.config.MAX_CELL_EDGES allows {MAX_CELL_EDGES:,}, past "
            "which the supernet outgrows the memory)", nodes)


def require_float32(obj: Any, keys: tuple[str, ...], where: str) -> None:
    """Each ``obj.<key>`` is finite and at most float32's largest value: torch's optimizers
    hand learning rates, momenta and weight decays to float32 kernels and refuse a larger
    number ("cannot be converted to type float without overflow") only when they step."""
    import torch

    big = torch.finfo(torch.float32).max
    for key in keys:
        value = getattr(obj, key)
        require(math.isfinite(value) and abs(value) <= big, f"{where}.{key}",
                f"finite and at most {big:.4g} (float32's largest)", value)


def check_call(fn: Callable[..., Any], settings: dict, where: str) -> None:
    """Refuse ``settings`` that ``fn(**settings)`` would not accept (unknown or missing
    keyword arguments), naming the keys under ``where`` and the accepted ones; builds
    nothing, so a setting that names a file is not read here."""
    params = inspect.signature(fn).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepted = ", ".join(["name", *named])
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = sorted(set(settings) - set(named))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}"
                              f"; valid keys of {where}: {accepted}")
    missing = [p.name for p in params if p.name in named and p.default is p.empty
               and p.name not in settings]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}; "
                          f"valid keys: {accepted}")


def convert_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (a dataclass, a union, a list, a number...) as config
    sections are read (YAML gives ``1e-6`` as a string); one that does not fit is a
    :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(a, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # X | None: X's own message says more than "does not fit"
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        out = [convert_value(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if math.isnan(number):  # every comparison with NaN is false: no range check holds
            raise ConfigError(f"{where}: expected a number, got NaN")
        if math.isinf(number):  # passes every lower bound, then overflows or poisons a step
            raise ConfigError(f"{where}: expected a finite number, got {number}")
        return number
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError`, and
    so does a ``cls`` (a plugin's ``Config``) that is not itself a dataclass. A
    ``ValueError`` or ``TypeError`` from its ``__post_init__`` becomes a
    :class:`ConfigError` prefixed with ``where`` (the section it came from)."""
    if not (isinstance(cls, type) and "__dataclass_fields__" in vars(cls)):
        # (a subclass of a dataclass without @dataclass: its own settings are no fields)
        raise ConfigError(f"{where}: {getattr(cls, '__qualname__', cls)!r}, the class its "
                          "settings are read into, is not a dataclass: declare it with "
                          "@dataclass (dataclasses.dataclass)")
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys of {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {k: convert_value(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # (a plugin's own check: named like ours)
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list structure suitable for YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --- the run configuration ------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None  # directory of the dataset files; None = the dataset's default
    download: bool = False  # only CIFAR-10 (via torchvision) and only when asked
    resolution: int | None = None  # resize images to this side; None keeps the native size
    train_subset: int | None = None  # use N training images (a seeded random subset)
    test_subset: int | None = None
    search_split: float = 0.5  # fraction of training images that train weights in search
    # (an epoch is one pass over them; the architecture's part cycles: engine/search.py)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.search_split < 1.0:
            raise ConfigError(f"data.search_split must be in (0, 1), got {self.search_split}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        require_sizes(self, ("resolution", "train_subset", "test_subset"), "data")
        if isinstance(self.root, str):  # ~/data for every dataset (its loader need not)
            self.root = os.path.expanduser(self.root)
            # a relative path that names local files (or where to download them) is kept
            # absolute, as plugins are: the saved config, its resume and the printed
            # follow-up commands work from any directory (other text, e.g. a URL a plugin
            # loader reads, is left as given)
            if not os.path.isabs(self.root) and (os.path.exists(self.root) or self.download):
                self.root = os.path.abspath(self.root)


@dataclass
class DiagnosticsConfig:
    """Collapse diagnostics per search epoch (engine/diagnostics.py), written to
    ``search/diagnostics.jsonl``: the skip_connect count of the derived cell and, with
    ``hessian``, the largest eigenvalue of the alpha Hessian on a fixed validation batch."""

    enabled: bool = False
    hessian: bool = False  # one power iteration costs two backward passes
    iters: int = 20  # power iterations per epoch
    cell: str | None = None  # None: the normal cell (the only cell on nb201)

    def __post_init__(self) -> None:
        require(self.iters >= 1, "search.diagnostics.iters", ">= 1", self.iters)


@dataclass
class SearchConfig:
    epochs: int = 50
    space: dict = field(default_factory=lambda: {"name": "darts_cnn"})
    strategy: dict = field(default_factory=lambda: {"name": "darts"})
    discretizer: str | None = None  # None = the space's default rule
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # after every epoch: the supernet's loss and accuracy on the whole validation split, in
    # order and in eval mode, as DARTS's infer() (eval_val_loss / eval_val_acc in
    # metrics.jsonl; bilevel strategies, which have a validation split); one forward pass
    # per validation image
    evaluate: bool = True
    # GPU only: capture each search step once as a CUDA graph and replay it (first-order
    # DARTS; engine/cuda_graph.py, benchmarks/README.md "GPU figures")
    cuda_graph: bool = False
    # "bf16": forward passes under bf16 autocast (GPU: half the activation memory, so twice
    # the batch; first-order strategies only); null: float32
    amp: str | None = None
    # {backend: inductor, mode: null}: torch.compile each mixed op (supernet/compile.py; on
    # an H100 1.7x faster per image than eager; the first steps compile for minutes)
    compile: dict | None = None
    # GPU: cuDNN times its convolution algorithms on the first batches and keeps the
    # fastest (the H100 figures use it); off by default, since the choice can differ
    # between processes and a resumed run then differs in the last bits
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"search.epochs must be >= 1, got {self.epochs}")


@dataclass
class RetrainConfig:
    enabled: bool = True
    epochs: int = 600
    batch_size: int = 96
    lr: float = 0.025
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    auxiliary_weight: float = 0.4  # 0 disables the auxiliary head
    drop_path: float = 0.2  # final drop-path probability (linear schedule from 0)
    cutout: int = 16  # cutout side in pixels, 0 = off
    crop_padding: int = 4  # random-crop padding, 0 = off
    flip: bool = True
    train_subset: int | None = None  # None = every training image
    network: dict = field(default_factory=lambda: {"C": 36, "layers": 20})

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):  # (named alone: a graph run reads no batch)
            require(getattr(self, key) >= 1, f"retrain.{key}",
                    ">= 1 (retrain.enabled=false skips retraining)", getattr(self, key))
        self._check_ranges()

    def image_network(self) -> dict:
        """``network`` as the image retraining passes it to the space's ``build_network``:
        with the auxiliary head when ``auxiliary_weight > 0``."""
        network = dict(self.network)
        if self.auxiliary_weight > 0:
            network.setdefault("auxiliary", True)
        return network

    def _check_ranges(self) -> None:
        """Optimizer and augmentation settings torch would refuse (or silently misuse)
        only once retraining starts, after the whole search."""
        for key in ("lr", "lr_min", "momentum", "weight_decay", "auxiliary_weight",
                    "cutout", "crop_padding"):
            value = getattr(self, key)
            require(value >= 0, f"retrain.{key}", ">= 0", value)
        require_float32(self, ("lr", "lr_min", "momentum", "weight_decay", "auxiliary_weight"),
                        "retrain")
        require(self.grad_clip > 0, "retrain.grad_clip", "> 0", self.grad_clip)
        if self.lr_min > self.lr:  # the cosine "decay" would raise the learning rate
            raise ConfigError(f"retrain.lr_min={self.lr_min} > lr={self.lr}: the cosine "
                              "schedule would raise the learning rate; give lr_min <= lr")
        require(0 <= self.drop_path < 1, "retrain.drop_path", "in [0, 1)", self.drop_path)
        require_sizes(self, ("train_subset",), "retrain")


@dataclass
class DistributedConfig:
    """Data parallelism under torchrun (ignored in a single process); docs/distributed.md."""

    sync_bn: bool = False  # BatchNorm over the global batch instead of each rank's slice


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    out_dir: str = "runs"
    name: str | None = None  # run directory name; None = config name + time
    progress: bool = True
    # RUN/plots (cell diagrams, alpha heatmaps, curves) drawn when a search or retraining
    # ends (report/plots.py, plots_after_run); `diffnas plot RUN` draws them any time
    plots: bool = True
    logger: str = "jsonl"  # "jsonl", or "tensorboard" (TensorBoard next to JSON lines)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    lm: dict = field(default_factory=dict)  # language models: engine/lm.py LmConfig
    # the settings of the run's engine that has its own (``Engine.settings``, a plugin
    # engine's: e.g. the rl example's rollout and PPO constants); the engine itself follows
    # from search.space.name
    engine: dict = field(default_factory=dict)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # modules or .py files that register your own datasets, ops, spaces or strategies;
    # imported whenever this config is read (diffnas/plugins.py)
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed",
                "an integer in [0, 2**32) (numpy's seed range)", self.seed)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value read as YAML)``."""
    if "=" not in text:
        config = " (a config file is given as --config PATH)" if \
            text.lower().endswith((".yaml", ".yml")) else ""
        raise ConfigError(f"override {text!r} must look like key.sub=value{config}")
    key, value = text.split("=", 1)
    return key.strip().split("."), _load_yaml(value, f"override {text!r}")


def apply_overrides(data: dict, overrides: list[str], defaults: dict | None = None) -> dict:
    """Set each ``a.b.c=value`` in ``data``. A section missing from ``data`` starts as its
    value in ``defaults`` (so ``retrain.network.C=16`` keeps the default network's other
    keys instead of replacing the whole mapping)."""
    for ov in overrides:
        path, value = parse_override(ov)
        node, default = data, defaults or {}
        for k in path[:-1]:
            default = default.get(k, {}) if isinstance(default, dict) else {}
            if k not in node:
                node[k] = copy.deepcopy(default) if isinstance(default, dict) else {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k!r} is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                device: bool = True, search: bool = True, saved: bool = False) -> RunConfig:
    """Read YAML (or start from defaults), apply ``a.b=value`` overrides, validate
    (``device=False``: not whether this machine has the configured device, for reading
    a run made elsewhere; ``search=False``: not what only a search reads, for
    ``diffnas train``; ``saved``: a run's own config.yaml, whose data settings the run
    never read are let through, as they were when it started: a run saved before
    :func:`_check_unused_data` refused them can still be resumed, reported, exported)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _load_yaml(read_utf8(p, "config"), str(p)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    defaults = to_dict(RunConfig())
    trial = apply_overrides(copy.deepcopy(data), overrides or [], defaults)
    section = trial.get("search")
    space = section.get("space") if isinstance(section, dict) else None
    name = space.get("name", "darts_cnn") if isinstance(space, dict) else "darts_cnn"
    if name != "darts_cnn":  # retrain.network.X=... must not start from darts_cnn's C, layers
        defaults["retrain"]["network"] = {}
    data = apply_overrides(data, overrides or [], defaults)
    if name != "darts_cnn" and isinstance(data, dict):
        # nor may a config that sets no retrain.network at all (RetrainConfig's default is
        # the DARTS CIFAR network): the other spaces retrain at their search settings
        retrain = data.setdefault("retrain", {})
        if isinstance(retrain, dict):
            retrain.setdefault("network", {})
    cfg = from_dict(RunConfig, data, "config")
    from diffnas.plugins import absolute_plugins, import_plugins

    cfg = dataclasses.replace(cfg, plugins=absolute_plugins(cfg.plugins))
    import_plugins(cfg.plugins)  # before validation: they may register the names it checks
    validate_components(cfg, device, search, unused_data=not saved)
    return cfg


def validate_components(cfg: RunConfig, device: bool = True, search: bool = True,
                        unused_data: bool = True) -> None:
    """Check what the config names against the classes that use it, before a run directory
    is written: the space and strategy sections (relaxation and penalties included), the
    discretizer, dataset, ``lm`` section, retrain network, diagnostics cell, with
    ``search`` the strategy against the space and epochs and what the space's search
    engine refuses, (``device``) the device, and (``unused_data``) data settings the run
    would never read."""
    from diffnas.spaces import space_config
    from diffnas.strategies.registry import check_strategy

    if cfg.logger not in ("jsonl", "tensorboard"):
        raise ConfigError(f"config.logger: {cfg.logger!r} is not one of jsonl, tensorboard")
    if device:  # (this machine's: a report of the run elsewhere needs neither)
        check_device(cfg.device)
        if cfg.logger == "tensorboard" and not _importable("tensorboard"):
            raise ConfigError(TENSORBOARD_MISSING)
    space_config(cfg.search.space)
    check_strategy(cfg.search.strategy)
    if cfg.search.discretizer is not None:
        from diffnas.genotype.discretize import DISCRETIZERS

        DISCRETIZERS.get(cfg.search.discretizer)  # an unknown name lists the known ones
    _check_data(cfg, unused_data)
    _check_sections(cfg)
    _check_diagnostics(cfg)
    if search:  # (the search's refusals first: its engine's may name the retraining's too)
        _check_strategy_setup(cfg)
        _check_engine(cfg, device)
    _check_retrain(cfg, always=not search)
    _check_unread_retrain(cfg, always=not search)


def _check_strategy_setup(cfg: RunConfig) -> None:
    """The strategy's settings that only the space's edges or ``search.epochs`` can judge
    (few_shot's split, snas's cost term, random_labels' excluded ops), against the alphas
    of the configured space; a plugin's relaxation, called once on them; and the
    discretizer against the space."""
    import torch

    from diffnas.arch import check_relaxation_output
    from diffnas.genotype.discretize import discretize
    from diffnas.strategies.registry import strategy_class, strategy_config

    section = cfg.search.strategy
    cls = strategy_class(section)
    space, arch = _space_and_alphas(cfg)
    rule = cfg.search.discretizer or getattr(space, "default_discretizer", "darts")
    try:
        config = strategy_config(section)
        check_relaxation_output(config.relaxation, arch.as_dict())
        with torch.random.fork_rng(devices=[]):  # a check that builds ops leaves the run's
            cls.check_setup(config, arch, cfg.search.epochs)  # RNG alone
        if "arch_params" in inspect.signature(cls.check_discretizer).parameters:
            cls.check_discretizer(config, rule, arch_params=arch)
        else:  # a plugin's override of the two-argument hook
            cls.check_discretizer(config, rule)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"search.strategy: {exc}") from None
    # the discretizer gives genotypes the space takes (argmax keeps every edge: not a cell
    # whose nodes take fewer inputs than they have predecessors)
    try:
        space.validate(discretize(arch.as_dict(), space, cfg.search.discretizer,
                                  arch.edge_weights()))
    except ValueError as exc:
        raise ConfigError(f"search.discretizer: {rule!r} derives genotypes that space "
                          f"{_space_name(cfg)!r} does not take ({exc})") from None


def _space_and_alphas(cfg: RunConfig) -> tuple[Any, Any]:
    """The configured space and fresh architecture parameters for it, for checks; their
    draw leaves the run's RNG alone."""
    import torch

    from diffnas.arch import ArchParams
    from diffnas.spaces import create_space

    space = create_space(cfg.search.space)
    with torch.random.fork_rng(devices=[]):
        return space, ArchParams(space)


def _space_name(cfg: RunConfig) -> str:
    return cfg.search.space.get("name", "darts_cnn")


def _engine(cfg: RunConfig) -> Engine:
    """The engine of the configured space (``engine/engines.engine_of``): what decides
    which data, sections and settings the run reads."""
    from diffnas.engine.engines import engine_of

    return engine_of(cfg)


def _check_data(cfg: RunConfig, unused: bool = True) -> None:
    """``data.name`` is a dataset of the kind the space's engine reads (images, text,
    graphs; another kind's dataset is named as such), and (``unused``) no data setting is
    one it never reads."""
    from diffnas.engine.engines import all_engines
    from diffnas.registry import Registry

    engine, name = _engine(cfg), cfg.data.name
    own = engine.datasets()
    if name not in own:
        other = next((e for e in all_engines() if e is not engine and name in e.datasets()),
                     None)
        if other is None and isinstance(own, Registry):
            own.get(name)  # the registry's error: the known names, plugins mentioned
        elsewhere = "" if other is None else (
            f" (it is {_a(other.data_kind)} dataset: search it with a space of the "
            f"{other.name} engine, e.g. search.space.name={_example_space(other.name)})")
        raise ConfigError(f"config.data.name: {name!r} is not {_a(engine.data_kind)} dataset"
                          f"{elsewhere}; the {_space_name(cfg)} space reads one of "
                          f"{sorted(own)}")
    if unused:
        _check_unused_data(cfg)


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _example_space(engine: str) -> str:
    """A space whose engine is ``engine`` (built-in first), for messages."""
    from diffnas.registry import builtin
    from diffnas.spaces import SPACES

    names = [n for n in SPACES.names() if getattr(SPACES.get(n), "engine", "image") == engine]
    names.sort(key=lambda n: not builtin(SPACES.get(n).__module__))  # stable: built-in first
    return names[0] if names else "..."


#: built-in datasets read from local files alone (a plugin's loader may download)
NO_DOWNLOAD = ("fashion_mnist", "digits", "npz", "folder")


#: built-in datasets shipped inside a package, read from no files: ``data.root`` is unused
NO_FILES = ("digits", "karate")


def _check_unused_data(cfg: RunConfig) -> None:
    """``data`` settings the run never reads are refused rather than silently ignored:
    those its engine never reads (``Engine.unused_data``: the image settings for text and
    graph runs, and for graph runs, full batch on a fixed split, the batch size, subsets
    and split too), ``download`` for a dataset read from local files alone and ``root``
    for one read from no files (:data:`NO_FILES`)."""
    d, default, engine = cfg.data, DataConfig(), _engine(cfg)
    if d.root is not None and d.name in NO_FILES:
        raise ConfigError(f"config.data: data.root is not used by data.name={d.name}, which "
                          "ships inside a package and reads no files: remove it (to read "
                          "your own data, docs/data.md)")
    unused = [k for k in engine.unused_data if getattr(d, k) != getattr(default, k)]
    local = d.download and d.name in NO_DOWNLOAD and "download" not in unused
    if unused or local:
        unused += ["download"] if local else []
        what = engine.a_run if unused != ["download"] or not local else \
            f"data.name={d.name}, read from local files alone"
        raise ConfigError(f"config.data: {', '.join('data.' + k for k in unused)} "
                          f"{'is' if len(unused) == 1 else 'are'} not used by {what}: remove "
                          f"{'it' if len(unused) == 1 else 'them'}")


#: datasets read only from the local files ``data.root`` names (cifar10 also downloads
#: there), and the page that says what those files hold
ROOT_REQUIRED = {"cifar10": "README.md (CIFAR-10)", "npz": "docs/data.md",
                 "folder": "docs/data.md", "cora": "docs/graph.md"}


def check_data_files(cfg: RunConfig, search: bool = True) -> None:
    """The dataset's files, checked before a run directory exists (not by
    ``load_config``: a dry run needs no data): a dataset read only from the files
    ``data.root`` names, with ``data.root`` unset, is refused, and so are files absent
    from where the dataset looks (``data/registry.check_dataset_files``: presence only).
    The user's own data (``npz``, ``folder``) is also read as far as it is without loading
    the images (``data/custom.peek_shape``: npz shapes and labels, class folders and one
    image), and its image count against the batch sizes (``search``: the search's too).
    What shows only in the images is found when the run reads them, and the run directory
    then resumes with ``data.root=``."""
    d = cfg.data
    if d.root is None and d.name in ROOT_REQUIRED:
        extra = (" (with data.download=true: the directory to download into)"
                 if d.name == "cifar10" else "")
        raise ConfigError(f"data.root is not set, and data.name={d.name} is read from local "
                          f"files: give data.root=PATH{extra}; {ROOT_REQUIRED[d.name]} says "
                          "what it holds")
    from diffnas.data import check_dataset_files

    check_dataset_files(d.name, d.root, d.download)
    from diffnas.data.custom import peek_count
    from diffnas.data.images import known_image_shape
    from diffnas.engine.retrain import check_augment_fits, check_retrain_batch

    shape = known_image_shape(d.name, d.root, d.resolution)
    check_augment_fits(cfg, shape and shape[1], always=not search)
    count = peek_count(d.name, d.root)
    if count is not None:  # own image data: the batches it holds, before anything runs
        from diffnas.engine.search import check_full_batch

        if search:
            check_full_batch(cfg, count)
        check_retrain_batch(cfg, count, always=not search)


def check_penalties_setup(cfg: RunConfig) -> None:
    """Build the search's architecture penalties and bind them to the space's alphas, so a
    missing latency predictor, a bad ``lam``/``input`` or a predictor fitted on other ops
    is refused before a run directory exists (a resume may not change ``penalties``, so a
    run refused later could never continue). Not in ``load_config``: a penalty may read
    files (the predictor) that a dry run or a report does not need."""
    specs = cfg.search.strategy.get("penalties") or []
    if not specs:
        return
    from diffnas.strategies.base import create_penalty

    _, arch = _space_and_alphas(cfg)
    for i, spec in enumerate(specs):
        where = f"search.strategy.penalties[{i}]"
        try:
            penalty = create_penalty(spec, where)
            bind = getattr(penalty, "bind", None)
            if bind is not None:
                bind(arch)
        except ConfigError:
            raise
        except (ValueError, TypeError, OSError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def check_run_files(cfg: RunConfig) -> None:
    """What a search needs beyond its config, checked before its run directory exists:
    the dataset's files (:func:`check_data_files`) and the penalties' files and settings
    (:func:`check_penalties_setup`)."""
    check_data_files(cfg)
    check_penalties_setup(cfg)


def _check_sections(cfg: RunConfig) -> None:
    """The ``engine`` section against the engine's settings class (``Engine.settings``),
    the engine's own checks of every run (``Engine.check_config``: for language models
    the ``lm`` section); a section that another engine alone reads (``lm``), given for
    this run, is refused rather than silently ignored; torchrun, for an engine that is not
    data parallel."""
    from diffnas.engine.engines import all_engines, engine_settings, refuse_torchrun

    engine = _engine(cfg)
    engine_settings(cfg)
    engine.check_config(cfg)
    refuse_torchrun(engine)
    for other in all_engines():
        for section in other.sections:
            given = getattr(cfg, section, None)
            if other is not engine and section not in engine.sections and given:
                keys = ", ".join(f"{section}.{k}" for k in given)
                raise ConfigError(
                    f"config.{section}: the {section} section ({keys}) is read by "
                    f"{other.label} runs alone (e.g. search.space.name="
                    f"{_example_space(other.name)}), not by space {_space_name(cfg)!r}: "
                    "remove it")


def _check_retrain(cfg: RunConfig, always: bool = False) -> None:
    """With ``retrain.enabled`` (or ``always``: ``diffnas train`` retrains whatever that
    flag says): ``retrain.network`` against the network settings of the space (as its
    engine passes them: ``Engine.retrain_network``) and the engine's own retraining checks
    (``Engine.check_retrain``: an image batch against the processes and
    ``retrain.train_subset``, a language model's tokens per column), so that a mistake
    shows before the search rather than after it."""
    r = cfg.retrain
    if not (r.enabled or always):
        return
    from diffnas.spaces.registry import network_config

    engine = _engine(cfg)
    network = engine.retrain_network(cfg)
    try:
        network_config(cfg.search.space, network)
    except ValueError as exc:  # ConfigError, or a space's own check (nb201: no auxiliary)
        if r.network == RetrainConfig().network and _space_name(cfg) != "darts_cnn":
            # the user wrote none of it, and it was made for darts_cnn
            raise ConfigError(f"{exc}. retrain.network defaults to the DARTS CIFAR network "
                              f"{r.network}, made for space darts_cnn: give space "
                              f"{_space_name(cfg)!r} its own retrain.network, or set "
                              "retrain.enabled=false") from None
        if "auxiliary" in network and "auxiliary" not in r.network and \
                r.auxiliary_weight > 0 and _fits_without_auxiliary(cfg, network):
            # (the key added from auxiliary_weight's default is what the network refuses)
            raise ConfigError(
                f"{exc}. retrain.auxiliary_weight={r.auxiliary_weight:g} asks the "
                f"{_space_name(cfg)!r} network for an auxiliary head (network key "
                "'auxiliary'): set retrain.auxiliary_weight=0 for a network without one"
            ) from None
        raise
    engine.check_retrain(cfg)


def _fits_without_auxiliary(cfg: RunConfig, network: dict[str, Any]) -> bool:
    """Whether the space takes ``network`` once its ``auxiliary`` key is left out: the
    auxiliary head, not another key, is what it refused."""
    from diffnas.spaces.registry import network_config

    try:
        network_config(cfg.search.space, {k: v for k, v in network.items()
                                           if k != "auxiliary"})
    except ValueError:
        return False
    return True


#: retrain settings a space's networks never read, beyond its engine's (``unread_retrain``)
UNREAD_BY_SPACE = {
    "nb201": ("drop_path",),  # its networks have no drop-path, as NAS-Bench-201 trains them
}
#: unread settings whose 0 says "off", which is what these engines do: 0 is accepted
OFF_WHEN_ZERO = ("drop_path", "cutout", "auxiliary_weight")


def _check_unread_retrain(cfg: RunConfig, always: bool = False) -> None:
    """A retrain setting the space's engine never reads, changed from its default, is an
    error rather than silently ignored (e.g. ``lr_min`` expecting a cosine decay); with
    retraining off (and not ``always``, ``diffnas train``) nothing is read anyway."""
    if not (cfg.retrain.enabled or always):
        return
    engine, space = _engine(cfg), _space_name(cfg)
    keys = engine.unread_retrain + UNREAD_BY_SPACE.get(space, ())
    default = RetrainConfig()
    changed = [k for k in keys if getattr(cfg.retrain, k) != getattr(default, k)
               and not (k in OFF_WHEN_ZERO and getattr(cfg.retrain, k) == 0)]
    if changed:
        whose = engine.label if any(k in engine.unread_retrain for k in changed) else \
            f"{space} network's"
        raise ConfigError(f"{', '.join('retrain.' + k for k in changed)}: the {whose} "
                          "retraining does not read this; remove it")


def _check_diagnostics(cfg: RunConfig) -> None:
    """``search.diagnostics.cell`` names a cell type of the space."""
    cell = cfg.search.diagnostics.cell
    if cell is None:
        return
    from diffnas.spaces import create_space

    cells = sorted(create_space(cfg.search.space).edge_groups())
    if cell not in cells:
        raise ConfigError(f"search.diagnostics.cell: {cell!r} is not a cell of space "
                          f"{_space_name(cfg)!r}; its cells: {', '.join(cells)}")


def _check_engine(cfg: RunConfig, device: bool) -> None:
    """The refusals of the engine that will search the space, made from the config alone
    (``Engine.check_search``): the language-model and graph engines' (image-search
    settings, growth epochs), or the image search's (GPU settings against the strategy
    and, with ``device``, the device; diagnostics; a full batch from
    ``data.train_subset``); under torchrun a strategy that does not run data parallel."""
    from diffnas.engine.distributed import planned_world_size
    from diffnas.strategies.registry import require_data_parallel

    try:
        require_data_parallel(cfg.search.strategy, planned_world_size())
    except ValueError as exc:
        raise ConfigError(f"search.strategy: {exc}") from None
    _engine(cfg).check_search(cfg, device)


def check_device(device: str) -> None:
    """``device`` names a device torch knows and this machine has (``auto`` always does),
    checked before a run directory is written."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"config.device: {device!r} is not a device ({exc}); use cpu, "
                          "cuda, cuda:N or auto") from None
    from diffnas.engine.distributed import nccl_for_cuda, planned_world_size

    world_size = planned_world_size()
    if dev.type == "cuda" and dev.index is not None and world_size > 1 and nccl_for_cuda():
        raise ConfigError(f"config.device: {device!r} would put all {world_size} processes "
                          "on one GPU; use device=cuda (each process takes cuda:LOCAL_RANK)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise ConfigError(f"config.device: {device!r} but this machine has {n} CUDA "
                              "device(s); use device=cpu or device=auto")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():  # (Linux, or a Mac without Metal)
            raise ConfigError(f"config.device: {device!r} but this machine has no MPS "
                              "device; use device=cpu or device=auto")
    elif dev.type != "cpu":
        raise ConfigError(f"config.device: {device!r} is not supported; use cpu, cuda, "
                          "cuda:N or auto")


#: the first line of a saved config: the sha256 of the lines below it (:func:`saved_config_edit`)
DIGEST_PREFIX = "# diffnas sha256:"


def _body_digest(body: str) -> str:
    import hashlib

    return hashlib.sha256(body.replace("\r\n", "\n").encode()).hexdigest()


#: ``logger: tensorboard`` without its package (refused by the config checks)
TENSORBOARD_MISSING = ("config.logger: tensorboard needs the tensorboard package: pip install "
                       "'diffnas[tensorboard]'")


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # (a parent package that fails, a module set to None)
        return False


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (a crash leaves no torn config.yaml for
    ``--resume`` to read), after a first line holding the sha256 of the YAML, so that a
    file cut short or edited since is found (:func:`saved_config_edit`)."""
    # imported here: the checkpoint module imports torch, which reading a config does not need
    from diffnas.engine.checkpoint import atomic_write_text

    body = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(f"{DIGEST_PREFIX}{_body_digest(body)} (of the lines below; "
                      "diffnas checks it)\n" + body, path)


def saved_config_edit(text: str) -> bool:
    """Whether a saved config's text differs from what :func:`save_config` wrote: its
    first line's digest does not match the rest. A file without that line (written by
    hand, or by a version before it was written) is not judged."""
    first, _, body = text.partition("\n")
    if not first.startswith(DIGEST_PREFIX):
        return False
    return first[len(DIGEST_PREFIX):].split(" ", 1)[0].strip() != _body_digest(body)
