"""Architecture search: data split, supernet, strategy and the loop, wired from a config."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, RunConfig
from diffnas.data import BatchLoader, ImageData, load_dataset, split_train_val
from diffnas.engine import distributed as dp
from diffnas.engine.callbacks import Checkpoint, JsonLines, MetricsLines, ProgressBar
from diffnas.engine.checkpoint import atomic_write_text, seed_everything
from diffnas.engine.cuda_graph import GraphedStep
from diffnas.engine.loop import Callback, Loop, checked_metrics, resumed_text
from diffnas.engine.retrain import check_retrain_batch
from diffnas.engine.rundir import (
    check_same_data,
    recorded_genotype,
    resolve_device,
    retrain_command,
)
from diffnas.engine.tensorboard import logger_callbacks
from diffnas.genotype import Genotype, GenotypeError
from diffnas.genotype.discretize import discretize
from diffnas.ops import twice_differentiable
from diffnas.spaces import DataShape, SearchSpace, create_space
from diffnas.strategies import (
    ClassificationObjective,
    SearchStrategy,
    create_strategy,
    require_data_parallel,
    strategy_class,
    strategy_config,
)
from diffnas.supernet.compile import check_compile_settings, compile_mixed_ops

log = logging.getLogger("diffnas")


class StrategyTask:
    """What every search task shares (images, graphs, language models): the genotype its
    strategy's alphas discretize to, and the strategy's state for checkpoints. Subclasses
    set ``strategy``, ``space`` and ``rule`` and count their batches."""

    strategy: SearchStrategy
    space: SearchSpace
    rule: str | None

    def num_batches(self) -> int:
        """Training batches per epoch (the loop's task protocol)."""
        raise NotImplementedError

    def genotype(self) -> Genotype:
        """The genotype the alphas discretize to, checked against the space: a plugin's
        discretizer that goes wrong on trained alphas stops the run as the epoch ends,
        naming the rule, rather than writing a genotype the retraining refuses."""
        arch = self.strategy.arch_params
        genotype = discretize(arch.as_dict(), self.space, self.rule, arch.edge_weights())
        try:
            self.space.validate(genotype)
        except GenotypeError as exc:
            rule = self.rule or self.space.default_discretizer
            raise GenotypeError(f"discretizer {rule!r} returned a genotype that space "
                                f"{self.space.name!r} refuses: {exc}") from None
        return genotype

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)

    def measured_arch_weights(self) -> Any:
        """The relaxed architecture weights an end-of-epoch evaluation uses, drawn (for a
        random relaxation) from a forked generator: measuring changes nothing the search
        does next, so a run finds the same alphas whatever it measures."""
        cuda = [p.device for p in self.strategy.alphas() if p.is_cuda][:1]
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            return self.strategy.arch_weights()

    def end_strategy_epoch(self) -> tuple[float, Any]:
        """End the strategy's epoch (its lr and temperature schedules, a few-shot split or
        an RLNAS export) and return the epoch's lr and the relaxed weights its evaluation
        uses: the alphas as the epoch left them, drawn at the epoch's own temperature, as
        GDAS and SNAS measure (the schedule has already moved to the next epoch's)."""
        lr, relaxation = self.strategy.lr, self.strategy.relaxation
        trained_at = copy.deepcopy(relaxation.state_dict())
        self.strategy.end_epoch()
        next_epoch = copy.deepcopy(relaxation.state_dict())
        relaxation.load_state_dict(trained_at)
        try:
            return lr, self.measured_arch_weights()
        finally:
            relaxation.load_state_dict(next_epoch)


def search_then_retrain(
    cfg: RunConfig, run_dir: str | Path, search: Callable[[], Genotype],
    retrain: Callable[[Genotype], dict[str, Any]],
    report: Callable[[Genotype, dict[str, Any] | None], None],
) -> int:
    """``diffnas search`` for an engine: the finished search's genotype (read by rank 0,
    shared with every rank) or ``search()``, then ``retrain`` when enabled, then ``report``
    on rank 0 alone."""
    done = Path(run_dir) / "search"
    genotype = dp.main_process_result(lambda: recorded_genotype(done / "genotype.json")
                                      if (done / "DONE").exists() else None)
    if genotype is None:
        genotype = search()
    result = retrain(genotype) if cfg.retrain.enabled else None
    if dp.is_main_process():
        report(genotype, result)
        command = retrain_command(run_dir) if result is None else None
        if command:
            print(f"no retraining (retrain.enabled=false); to retrain this genotype as a "
                  f"new run: {command}")
    return 0


def search_callbacks(task: StrategyTask, out: Path, cfg: RunConfig,
                     extra: Iterable[Callback] = (), first: Iterable[Callback] = ()
                     ) -> list[Callback]:
    """The callbacks of every search loop (images, language models, graphs, plugin
    engines), in their checkpointed order: ``first``, :func:`search_writers` (rank 0 alone
    under torchrun), ``extra``, the loggers ``cfg.logger`` asks for (TensorBoard) and an
    atomic ``out/checkpoint.pt`` per epoch (rank 0). Every rank runs every callback, so
    their states stay aligned in the checkpoint."""
    return [*first, *dp.main_process_only(search_writers(task, out, cfg.progress)), *extra,
            *logger_callbacks(cfg, out, task.strategy.arch_params),
            dp.MainProcessOnly(Checkpoint(out / "checkpoint.pt"))]


def search_writers(task: StrategyTask, out: Path, progress: bool) -> list[Callback]:
    """What every search writes as its epochs end, in ``out`` (a run's ``search/``): the
    progress bar, ``metrics.jsonl``, ``genotypes.jsonl`` (the genotype each epoch's alphas
    give) and ``alphas.jsonl``; checkpoints and loggers are the caller's. Under torchrun
    the caller keeps them on rank 0 (``distributed.main_process_only``)."""
    return [ProgressBar("search", progress),
            MetricsLines(out / "metrics.jsonl"),
            JsonLines(out / "genotypes.jsonl", lambda loop, e, m: task.genotype().to_dict()),
            JsonLines(out / "alphas.jsonl", alpha_record(task.strategy))]


def alpha_record(strategy: SearchStrategy) -> Callable[[Loop, int, dict], dict]:
    """The row ``alphas.jsonl`` gets each epoch: softmax(alpha) per edge group."""
    def record(loop: Loop, epoch: int, metrics: dict) -> dict:
        return {g: torch.softmax(a.detach().float(), -1).cpu().tolist()
                for g, a in strategy.arch_params.as_dict().items()}
    return record


class SearchTask(StrategyTask):
    """What the loop drives during search: zipped (train, val) batches -> strategy.step."""

    batch_setting = "data.batch_size"  # named when the data holds no full batch

    def __init__(
        self, strategy: SearchStrategy, space: SearchSpace, train: BatchLoader,
        val: BatchLoader | None, rule: str | None = None, eval_val: Iterable | None = None,
    ) -> None:
        self.strategy, self.space = strategy, space
        self.train, self.val = train, val
        self.rule = rule
        self._step: Callable[[Any, Any], dict[str, float]] = strategy.step
        self.eval_val = eval_val  # ``search.evaluate``: batches measured after each epoch
        self._eval_context: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def configure_step(
        self, device: torch.device, amp: str | None = None, cuda_graph: bool = False,
        world_size: int = 1, compile: dict | None = None,
    ) -> None:
        """Drive the strategy through :func:`configured_step`."""
        self._step = configured_step(self.strategy, device, amp, cuda_graph, world_size,
                                     compile)
        if compile is not None:  # compiled mixed ops take plain autograd (as the step)
            self._eval_context = twice_differentiable

    def batches(self, epoch: int) -> Iterable[Any]:
        """Every training batch once, each with the next validation batch: the validation
        loader starts over (reshuffled) when it runs out, as DARTS draws a validation
        batch per training batch, so ``data.search_split`` != 0.5 shortens no epoch."""
        self.train.set_epoch(epoch)
        if self.val is None:
            return ((b, None) for b in self.train)
        return zip(self.train, self._val_passes(epoch))

    def _val_passes(self, epoch: int) -> Iterator[Any]:
        """The validation batches of ``epoch``, pass after pass; pass ``k`` is ordered by
        epoch index ``epoch + k * VAL_PASS_STRIDE`` (pass 0: the epoch itself), so each
        order depends on (seed, epoch, pass) alone and resume stays exact."""
        for k in itertools.count():
            self.val.set_epoch(epoch + k * VAL_PASS_STRIDE)
            yield from self.val

    def num_batches(self) -> int:
        return batches_per_epoch(self.train, self.val)

    def step(self, batch: tuple[Any, Any]) -> dict[str, float]:
        return dp.all_reduce_metrics(checked_metrics(self._step(*batch), self))  # rank mean

    def end_epoch(self, epoch: int) -> dict[str, float]:
        dp.assert_replicated({"architecture parameters": self.strategy.alphas(),
                              "supernet weights": self.strategy.supernet.parameters()})
        if self.eval_val is None:
            lr = self.strategy.lr
            self.strategy.end_epoch()
            return {"lr": lr}
        lr, aw = self.end_strategy_epoch()
        # on every rank, the whole split each: with distributed.sync_bn the ops' BatchNorms
        # (batch statistics in every mode) average over ranks, which then see the same
        # batches as one process would
        with self._eval_context():
            v = evaluate_supernet(self.strategy, self.eval_val, aw)
        return {"lr": lr, "eval_val_loss": v["loss"], "eval_val_acc": v["acc"]}


def evaluate_supernet(strategy: SearchStrategy, loader: Iterable, arch_weights: Any
                      ) -> dict[str, float]:
    """The supernet's mean loss and accuracy over ``loader`` (weighted by batch size) in
    eval mode, changing nothing, as DARTS's ``infer()`` measures the search's validation
    accuracy. Eval mode reaches only the stem's BatchNorm (running statistics): the ops'
    affine-free BatchNorms normalise by the batch in every mode (``ops.conv.batch_norm``),
    so the figure depends on the batches, which are fixed (the split in order, in
    ``data.batch_size``). The supernet goes back to train mode after."""
    net = strategy.supernet
    net.eval()
    try:
        total, loss_sum, acc_sum = 0, 0.0, 0.0
        with torch.no_grad():
            for batch in loader:
                _, stats = strategy.loss(batch, arch_weights)
                n = len(batch[1])
                loss_sum, acc_sum, total = loss_sum + stats["loss"] * n, \
                    acc_sum + stats.get("acc", math.nan) * n, total + n  # (a plugin
                # space's objective may report no accuracy: its eval_val_acc is NaN, null)
    finally:
        net.train()
    return {"loss": loss_sum / max(total, 1), "acc": acc_sum / max(total, 1)}


def diagnostics_callbacks(cfg: RunConfig, task: SearchTask, out: Path,
                          world_size: int) -> list[Callback]:
    """``search.diagnostics``: a :class:`CollapseDiagnostics` writing
    ``out/diagnostics.jsonl`` (rank 0), its Hessian batch the first validation batch (the
    first training batch for strategies without one)."""
    d = cfg.search.diagnostics
    if not d.enabled:
        return []
    from diffnas.engine.diagnostics import CollapseDiagnostics

    check_diagnostics_settings(cfg, world_size)
    batch = None
    if d.hessian:
        batch = next(iter(task.val if task.val is not None else task.train))
    return dp.main_process_only([CollapseDiagnostics(out / "diagnostics.jsonl", d.cell, batch,
                                                     d.iters)])


@dataclass
class SearchResult:
    genotype: Genotype
    history: list[dict[str, float]]
    task: SearchTask


def data_shape(data: ImageData) -> DataShape:
    return DataShape(data.in_channels, data.resolution, data.num_classes)


def load_search_data(cfg: RunConfig) -> ImageData:
    d = cfg.data
    return load_dataset(d.name, d.root, d.download, d.resolution, d.train_subset, d.test_subset,
                        cfg.seed)


def build_search(cfg: RunConfig, data: ImageData, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1) -> SearchTask:
    """Space, supernet, architecture parameters, strategy and loaders for ``cfg``."""
    seed_everything(cfg.seed)
    space = create_space(cfg.search.space, data_shape(data))
    supernet = space.build_supernet().to(device)
    if cfg.distributed.sync_bn:
        supernet = dp.convert_sync_batchnorm(supernet)
    arch = ArchParams(space).to(device)
    dp.broadcast_([*supernet.state_dict().values(), *arch.parameters()])  # replicas of rank 0
    objective = getattr(space, "objective", lambda: ClassificationObjective())()
    strategy = create_strategy(cfg.search.strategy, supernet, arch, objective, cfg.search.epochs)
    require_data_parallel(cfg.search.strategy, world_size)
    cls = strategy_class(cfg.search.strategy)
    data_y = strategy.relabel(data.train_y)  # identity, except e.g. RLNAS's random labels
    train, val = search_loaders(cfg, data.train_x, data_y, cls.uses_validation, device, rank,
                                world_size)
    # search.evaluate: the whole validation split, in order, after each epoch
    eval_val = BatchLoader(val.x, val.y, val.batch_size, shuffle=False, device=device) \
        if val is not None and cfg.search.evaluate else None
    task = SearchTask(strategy, space, train, val, cfg.search.discretizer, eval_val)
    task.configure_step(torch.device(device), cfg.search.amp, cfg.search.cuda_graph, world_size,
                        cfg.search.compile)
    return task


def configured_step(
    s: SearchStrategy, device: torch.device, amp: str | None = None, cuda_graph: bool = False,
    world_size: int = 1, compile: dict | None = None, graph_warmup: int = 2,
    step: Callable[[Any, Any], dict[str, float]] | None = None,
) -> Callable[[Any, Any], dict[str, float]]:
    """``step`` (default ``s.step``) as configured: the mixed ops compiled
    (``search.compile``, supernet/compile.py), under bf16 autocast (``search.amp``) and/or
    replayed as a CUDA graph (``search.cuda_graph``, engine/cuda_graph.py); refuses what a
    strategy cannot do, naming why. ``benchmarks/search_epoch.py`` times this same function."""
    step = step or s.step
    # every refusal first, so that a refused configuration has compiled nothing
    check_step_settings(StepTraits.of(s), amp, cuda_graph, compile, device.type, world_size)
    if compile is not None:
        compile_mixed_ops(s.supernet, compile)
        # compiled graphs do not take the memory savers' custom autograd functions
        step = _inside(step, twice_differentiable)
    if amp is not None:
        # no weight-cast cache inside a CUDA graph (torch's notes: it must not outlive a
        # capture)
        step = _inside(step, lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                                    cache_enabled=not cuda_graph))
    if cuda_graph:
        step = GraphedStep(step, [s.w_optimizer, s.a_optimizer], warmup=graph_warmup)
    return step


@dataclass(frozen=True)
class StepTraits:
    """What a strategy declares about its step, which decides the GPU settings it takes
    (docs/strategies.md): ``first_order`` (``search.amp``, ``search.compile``),
    ``graph_safe`` (``search.cuda_graph``) and ``hard`` (its relaxation samples one op per
    edge, so compiled edges would recompile every step)."""

    name: str
    first_order: bool
    graph_safe: bool
    hard: bool

    @classmethod
    def of(cls, s: SearchStrategy) -> StepTraits:
        """The traits of a built strategy."""
        return cls(s.name, s.first_order, s.graph_safe, bool(getattr(s.relaxation, "hard", False)))

    @classmethod
    def from_config(cls, section: dict) -> StepTraits:
        """The traits a strategy built from ``section`` will have, read without building
        it (``SearchStrategy.declared``; tests/test_config_checks.py holds the two to
        agree)."""
        from diffnas.arch.relax import RELAXATIONS

        strategy = strategy_class(section)
        c = strategy_config(section)
        relax = getattr(c, "relaxation", {"name": "softmax"})
        first, safe = strategy.declared(c)
        return cls(strategy.name, first, safe, RELAXATIONS.get(relax["name"]).hard)


def check_step_settings(
    t: StepTraits, amp: str | None = None, cuda_graph: bool = False,
    compile: dict | None = None, device: str | None = None, world_size: int = 1,
) -> None:
    """Refuse the ``search.compile`` / ``search.amp`` / ``search.cuda_graph`` settings a
    strategy with traits ``t`` cannot take, naming why; ``device`` (a torch device type,
    ``None``: not checked) and ``world_size`` are where the step runs. Reads settings alone:
    :func:`configured_step` calls it, and config loading (:func:`check_search_config`)
    before a run directory exists."""
    if compile is not None:
        if not t.first_order:
            raise ConfigError(f"strategy {t.name!r} (as configured) is not declared "
                              "first-order (docs/strategies.md): run it without search.compile")
        if not isinstance(compile, dict):
            raise ConfigError("search.compile must be null or a mapping such as "
                              f"{{backend: inductor}}, got {compile!r}")
        check_compile_settings(compile)
        if t.hard:
            raise ConfigError(f"strategy {t.name!r} samples one op per edge each step: "
                              "compiled mixed ops would recompile for every sample; run it "
                              "without search.compile")
    if amp is not None:
        if amp != "bf16":
            raise ConfigError(f"search.amp must be null or 'bf16', got {amp!r}")
        if not t.first_order:
            raise ConfigError(f"strategy {t.name!r} (as configured) is not declared "
                              "first-order (docs/strategies.md): run it without search.amp")
    if cuda_graph:
        if device is not None and device != "cuda":
            raise ConfigError(f"search.cuda_graph needs a CUDA device, the run is on {device}")
        if world_size > 1:
            raise ConfigError("search.cuda_graph does not run data parallel: run one process")
        if not t.graph_safe:
            raise ConfigError(f"strategy {t.name!r} (as configured) cannot be captured as "
                              "a CUDA graph: search.cuda_graph is for first-order darts "
                              "with the softmax relaxation and no penalties")


def check_diagnostics_settings(cfg: RunConfig, world_size: int = 1) -> None:
    """Refuse a ``search.diagnostics.hessian`` that cannot run: under torchrun, or with
    compiled mixed ops (the Hessian differentiates twice)."""
    d = cfg.search.diagnostics
    if not (d.enabled and d.hessian):
        return
    if world_size > 1:
        raise ConfigError("search.diagnostics.hessian runs on one process; switch it off "
                          "under torchrun")
    if cfg.search.compile is not None:
        raise ConfigError("search.diagnostics.hessian differentiates twice, which compiled "
                          "mixed ops cannot: switch off search.compile or the Hessian")


def search_loaders(
    cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, uses_validation: bool,
    device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
) -> tuple[BatchLoader, BatchLoader | None]:
    """The search's loaders over the training set ``(x, y)``: search-train and search-val
    (``data.search_split``) for bilevel strategies, one loader for single-level ones;
    incomplete batches are dropped."""
    bs, seed = cfg.data.batch_size, cfg.seed
    common = {"batch_size": bs, "seed": seed, "device": device, "rank": rank,
              "world_size": world_size, "drop_last": True}
    if not uses_validation:
        return BatchLoader(x, y, **common), None
    (tx, ty), (vx, vy) = split_train_val(x, y, cfg.data.search_split, seed)
    return BatchLoader(tx, ty, **common), BatchLoader(vx, vy, **{**common, "seed": seed + 1})


#: epoch-index offset of each further pass over the validation batches in one epoch
VAL_PASS_STRIDE = 1_000_000


def batches_per_epoch(train: BatchLoader, val: BatchLoader | None) -> int:
    """Search steps per epoch: one per training batch (the validation batches cycle),
    none when the validation part holds no full batch."""
    return 0 if val is not None and len(val) == 0 else len(train)


def check_full_batch(cfg: RunConfig, n_images: int | None = None) -> None:
    """At least one full search batch per epoch from the training images, counted by
    :func:`search_loaders` itself (over empty rows): ``data.train_subset`` of them, or
    ``n_images`` (the dataset's, where known) when fewer; nothing to check when neither
    is known."""
    d = cfg.data
    known = [v for v in (d.train_subset, n_images) if v is not None]
    if not known:
        return
    n = min(known)
    if min(d.search_split, 1 - d.search_split) * n >= d.batch_size + 1:
        return  # either part of the split holds a full batch, whatever the rounding
    rows = torch.empty(n, 0)
    uses_val = strategy_class(cfg.search.strategy).uses_validation
    train, val = search_loaders(cfg, rows, rows, uses_val)
    if batches_per_epoch(train, val) == 0:
        parts = (f"its split (data.search_split={d.search_split}) leaves {len(train.x)} "
                 f"images to train the weights and {len(val.x)} the architecture"
                 if val is not None else "")
        source = f"data.train_subset={n}" if n == d.train_subset else \
            f"the dataset's {n} training images"
        fix = "raise data.train_subset" if n == d.train_subset else "add images"
        raise ConfigError(f"data.batch_size={d.batch_size} gives no full batch per epoch "
                          f"from {source}{': ' if parts else ''}{parts} "
                          f"(incomplete batches are dropped); lower data.batch_size or {fix}")


def check_search_config(cfg: RunConfig, device: bool = True) -> None:
    """What an image search would refuse that its config alone shows, for config loading
    (before a run directory exists): the GPU settings against the strategy (the device
    too, with ``device``), the diagnostics, a full batch from ``data.train_subset`` and a
    batch every process gets an equal share of."""
    s, world_size = cfg.search, dp.planned_world_size()
    if cfg.data.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not divide by the "
                          f"{world_size} processes (each takes an equal slice of a batch)")
    where = resolve_device(cfg.device).type if device else None
    check_step_settings(StepTraits.from_config(s.strategy), s.amp, s.cuda_graph, s.compile,
                        where, world_size)
    check_diagnostics_settings(cfg, world_size)
    check_full_batch(cfg)
    optimizer = (s.strategy.get("w_optim") or {}).get("name", "sgd")
    if s.cuda_graph and optimizer != "sgd":
        raise ConfigError(f"search.cuda_graph replays SGD weight steps; w_optim.name="
                          f"{optimizer} is not captured: switch one off")


def _inside(step: Callable, context: Callable[[], AbstractContextManager]) -> Callable:
    """``step`` run inside a fresh ``context()`` on every call."""
    def run(train: Any, val: Any) -> dict[str, float]:
        with context():
            return step(train, val)
    return run


def run_search(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, stop_after: int | None = None,
    extra_callbacks: list[Callback] | None = None, data: ImageData | None = None,
) -> SearchResult:
    """Search as configured, writing ``run_dir/search``. With ``resume`` it continues from
    ``search/checkpoint.pt``; ``stop_after`` ends after that many epochs (as a kill would)."""
    out = Path(run_dir) / "search"
    rank = dp.env()
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
    device = dp.rank_device(resolve_device(cfg.device))
    if cfg.search.cudnn_benchmark:  # fixed batch shapes: let cuDNN time its algorithms
        if device.type != "cuda":
            log.warning("search.cudnn_benchmark does nothing on %s (cuDNN is CUDA's)", device)
        torch.backends.cudnn.benchmark = True
    data = data or load_search_data(cfg)
    dp.main_process_result(check_same_data, out, data, resume)  # a resume on other data
    # before the first epoch (--seeds and latency sweep start every run as a resume); once
    # an epoch is done retrain.* is fixed, and the search's genotype is still worth having
    if not (out / "checkpoint.pt").exists():
        n = len(data.train_x)  # the whole training set, unless data.train_subset took less
        try:
            check_full_batch(cfg, n)
            check_retrain_batch(cfg, n if cfg.data.train_subset is None
                                or n < cfg.data.train_subset else None)
        except ConfigError as exc:  # found once the data was read: the run exists already
            raise ConfigError(f"{exc}. The run {run_dir} keeps the settings it started with "
                              "(a --resume cannot change them): start a new run with the "
                              "new batch size") from None
    task = build_search(cfg, data, device, rank.rank, rank.world_size)
    callbacks = search_callbacks(task, out, cfg, extra_callbacks or [])
    callbacks[-1:-1] = diagnostics_callbacks(cfg, task, out, rank.world_size)
    loop = Loop(task, cfg.search.epochs, callbacks)
    n_w = sum(p.numel() for p in task.strategy.supernet.parameters())
    history, genotype = run_search_loop(loop, task, out, resume, stop_after,
                                        f"search: supernet weights={n_w}", "batches")
    return SearchResult(genotype, history, task)


def run_search_loop(
    loop: Loop, task: StrategyTask, out: Path, resume: bool, stop_after: int | None, what: str,
    unit: str,
) -> tuple[list[dict[str, float]], Genotype]:
    """What every search run does around its loop (images, language models): resume from
    ``out/checkpoint.pt`` when asked (rank 0 reads it, every rank loads it), align the
    ranks' random generators (the same relaxation samples everywhere), run, and write
    ``genotype.json`` (and ``DONE`` once every epoch ran) on rank 0 before any rank
    returns. ``what`` and ``unit`` word the log line."""
    ckpt = out / "checkpoint.pt"
    if dp.resume_loop(loop, ckpt, resume):
        log.info("%s (%s)", resumed_text("search", loop), ckpt)
    dp.sync_rng()
    count = getattr(task, "epoch_batches", None)  # (where it varies: LM BPTT windows)
    n = count(loop.epoch) if count else task.num_batches()
    per_epoch = (f"{n} {unit}/epoch" if n == task.num_batches() else
                 f"{n} {unit} in epoch {loop.epoch + 1} (their lengths vary, so their number "
                 "does)")
    log.info("%s space=%s strategy=%s alphas=%d, %s", what, task.space.name,
             task.strategy.name, sum(p.numel() for p in task.strategy.alphas()), per_epoch)
    history = loop.run(stop_after=stop_after)
    genotype = task.genotype()
    if dp.env().is_main:
        atomic_write_text(genotype.to_json() + "\n", out / "genotype.json")
        if loop.epoch >= loop.epochs:
            (out / "DONE").touch()
    dp.barrier()  # every rank returns once the results are on disk
    return history, genotype
