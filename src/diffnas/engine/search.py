"""Architecture search: data split, supernet, strategy and the loop, wired from a config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffnas.arch import ArchParams
from diffnas.config import RunConfig
from diffnas.data import BatchLoader, ImageData, load_dataset, split_train_val
from diffnas.engine import distributed as dp
from diffnas.engine.callbacks import Checkpoint, JsonLines, ProgressBar
from diffnas.engine.checkpoint import atomic_write_text, load_checkpoint, seed_everything
from diffnas.engine.cuda_graph import GraphedStep
from diffnas.engine.loop import Callback, Loop
from diffnas.engine.rundir import resolve_device
from diffnas.engine.tensorboard import logger_callbacks
from diffnas.genotype import Genotype
from diffnas.genotype.discretize import discretize
from diffnas.ops import twice_differentiable
from diffnas.spaces import DataShape, SearchSpace, create_space
from diffnas.strategies import (
    STRATEGIES,
    ClassificationObjective,
    SearchStrategy,
    create_strategy,
    require_data_parallel,
)
from diffnas.supernet.compile import compile_mixed_ops

log = logging.getLogger("diffnas")


class StrategyTask:
    """What every search task shares (images, graphs): the genotype its strategy's
    alphas discretize to, and the strategy's state for checkpoints. Subclasses set
    ``strategy``, ``space`` and ``rule``."""

    strategy: SearchStrategy
    space: SearchSpace
    rule: str | None

    def genotype(self) -> Genotype:
        arch = self.strategy.arch_params
        return discretize(arch.as_dict(), self.space, self.rule, arch.edge_weights())

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)


def search_then_retrain(
    cfg: RunConfig, run_dir: str | Path, search: Callable[[], Genotype],
    retrain: Callable[[Genotype], dict[str, Any]],
    report: Callable[[Genotype, dict[str, Any] | None], None],
) -> int:
    """``diffnas search`` for an engine: the finished search's genotype (read by rank 0,
    shared with every rank) or ``search()``, then ``retrain`` when enabled, then ``report``
    on rank 0 alone."""
    done = Path(run_dir) / "search"
    genotype = dp.main_process_result(lambda: Genotype.load(done / "genotype.json")
                                      if (done / "DONE").exists() else None)
    if genotype is None:
        genotype = search()
    result = retrain(genotype) if cfg.retrain.enabled else None
    if dp.is_main_process():
        report(genotype, result)
    return 0


def alpha_record(strategy: SearchStrategy) -> Callable[[Loop, int, dict], dict]:
    """The row ``alphas.jsonl`` gets each epoch: softmax(alpha) per edge group."""
    def record(loop: Loop, epoch: int, metrics: dict) -> dict:
        return {g: torch.softmax(a.detach().float(), -1).cpu().tolist()
                for g, a in strategy.arch_params.as_dict().items()}
    return record


class SearchTask(StrategyTask):
    """What the loop drives during search: zipped (train, val) batches -> strategy.step."""

    def __init__(
        self, strategy: SearchStrategy, space: SearchSpace, train: BatchLoader,
        val: BatchLoader | None, rule: str | None = None,
    ) -> None:
        self.strategy, self.space = strategy, space
        self.train, self.val = train, val
        self.rule = rule
        self._step: Callable[[Any, Any], dict[str, float]] = strategy.step

    def configure_step(
        self, device: torch.device, amp: str | None = None, cuda_graph: bool = False,
        world_size: int = 1, compile: dict | None = None,
    ) -> None:
        """Drive the strategy through :func:`configured_step`."""
        self._step = configured_step(self.strategy, device, amp, cuda_graph, world_size,
                                     compile)

    def batches(self, epoch: int) -> Iterable[Any]:
        self.train.set_epoch(epoch)
        if self.val is None:
            return ((b, None) for b in self.train)
        self.val.set_epoch(epoch)
        return zip(self.train, self.val)

    def num_batches(self) -> int:
        return len(self.train) if self.val is None else min(len(self.train), len(self.val))

    def step(self, batch: tuple[Any, Any]) -> dict[str, float]:
        return dp.all_reduce_metrics(self._step(*batch))  # mean over ranks

    def end_epoch(self, epoch: int) -> dict[str, float]:
        dp.assert_replicated({"architecture parameters": self.strategy.alphas(),
                              "supernet weights": self.strategy.supernet.parameters()})
        lr = self.strategy.lr
        self.strategy.end_epoch()
        return {"lr": lr}


def diagnostics_callbacks(cfg: RunConfig, task: SearchTask, out: Path,
                          world_size: int) -> list[Callback]:
    """``search.diagnostics``: a :class:`CollapseDiagnostics` writing
    ``out/diagnostics.jsonl`` (rank 0), its Hessian batch the first validation batch (the
    first training batch for strategies without one)."""
    d = cfg.search.diagnostics
    if not d.enabled:
        return []
    from diffnas.engine.diagnostics import CollapseDiagnostics

    batch = None
    if d.hessian:
        if world_size > 1:
            raise ValueError("search.diagnostics.hessian runs on one process; switch it off "
                             "under torchrun")
        if cfg.search.compile is not None:
            raise ValueError("search.diagnostics.hessian differentiates twice, which compiled "
                             "mixed ops cannot: switch off search.compile or the Hessian")
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
    cls = STRATEGIES.get(cfg.search.strategy.get("name", "darts"))
    data_y = strategy.relabel(data.train_y)  # identity, except e.g. RLNAS's random labels
    bs, seed = cfg.data.batch_size, cfg.seed
    common = {"batch_size": bs, "seed": seed, "device": device, "rank": rank,
              "world_size": world_size, "drop_last": True}
    if cls.uses_validation:
        (tx, ty), (vx, vy) = split_train_val(data.train_x, data_y, cfg.data.search_split, seed)
        train = BatchLoader(tx, ty, **common)
        val = BatchLoader(vx, vy, **{**common, "seed": seed + 1})
    else:
        train, val = BatchLoader(data.train_x, data_y, **common), None
    task = SearchTask(strategy, space, train, val, cfg.search.discretizer)
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
    if compile is not None:
        if not s.first_order:
            raise ValueError(f"strategy {s.name!r} (as configured) is not declared "
                             "first-order (docs/strategies.md): run it without search.compile")
        if not isinstance(compile, dict):
            raise ValueError("search.compile must be null or a mapping such as "
                             f"{{backend: inductor}}, got {compile!r}")
        if getattr(s.relaxation, "hard", False):
            raise ValueError(f"strategy {s.name!r} samples one op per edge each step: "
                             "compiled mixed ops would recompile for every sample; run it "
                             "without search.compile")
    if amp is not None:
        if amp != "bf16":
            raise ValueError(f"search.amp must be null or 'bf16', got {amp!r}")
        if not s.first_order:
            raise ValueError(f"strategy {s.name!r} (as configured) is not declared "
                             "first-order (docs/strategies.md): run it without search.amp")
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"search.cuda_graph needs a CUDA device, the run is on {device}")
        if world_size > 1:
            raise ValueError("search.cuda_graph does not run data parallel: run one process")
        if not s.graph_safe:
            raise ValueError(f"strategy {s.name!r} (as configured) cannot be captured as "
                             "a CUDA graph: search.cuda_graph is for first-order darts "
                             "with the softmax relaxation and no penalties")
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
    task = build_search(cfg, data, device, rank.rank, rank.world_size)
    # Under torchrun every rank runs every callback in the same order (their states stay
    # aligned in the checkpoint), but the writers act on rank 0 only.
    callbacks: list[Callback] = [
        *dp.main_process_only([
            ProgressBar("search", cfg.progress),
            JsonLines(out / "metrics.jsonl"),
            JsonLines(out / "genotypes.jsonl", lambda loop, e, m: task.genotype().to_dict()),
            JsonLines(out / "alphas.jsonl", alpha_record(task.strategy)),
        ]),
        *(extra_callbacks or []),
        *logger_callbacks(cfg, out, task.strategy.arch_params),
        dp.MainProcessOnly(Checkpoint(out / "checkpoint.pt")),
    ]
    callbacks[-1:-1] = diagnostics_callbacks(cfg, task, out, rank.world_size)
    loop = Loop(task, cfg.search.epochs, callbacks)
    ckpt = out / "checkpoint.pt"
    # rank 0 reads the checkpoint and hands it to all ranks (no shared disk needed)
    state = dp.main_process_result(lambda: load_checkpoint(ckpt)
                                   if resume and ckpt.exists() else None)
    if state is not None:
        loop.load_state_dict(state)
        log.info("resumed search at epoch %d from %s", loop.epoch, ckpt)
    dp.sync_rng()  # the same Gumbel samples on every rank
    n_w = sum(p.numel() for p in task.strategy.supernet.parameters())
    log.info("search: space=%s strategy=%s supernet weights=%d alphas=%d, %d batches/epoch",
             task.space.name, task.strategy.name, n_w,
             sum(p.numel() for p in task.strategy.alphas()), task.num_batches())
    history = loop.run(stop_after=stop_after)
    genotype = task.genotype()
    if rank.is_main:
        atomic_write_text(genotype.to_json() + "\n", out / "genotype.json")
        if loop.epoch >= loop.epochs:
            (out / "DONE").touch()
    dp.barrier()  # every rank returns once the results are on disk
    return SearchResult(genotype, history, task)
