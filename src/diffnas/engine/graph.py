"""Node classification: search of a GNN cell (space ``gnn``) and retraining of its
genotype, full batch, on the shared :class:`~diffnas.engine.loop.Loop` (docs/graph.md).

What differs from image search is only the data flow. A graph is one example: every
step runs the network over all nodes and takes the loss on a set of labelled nodes. A
*batch* is therefore (features, graph, labels, which nodes count, a dropout seed), and an
epoch is one step:

- search: the weights learn on the **train** nodes, the architecture on the **val**
  nodes (bilevel strategies: darts first/second order, implicit, zero_order, gdas as
  configured); single-level strategies (``uses_validation = False``) learn both on the
  train nodes. Each epoch reports the supernet's loss and accuracy on the val nodes
  (eval mode, current relaxed weights). The test nodes are never read.
- retrain: the genotype's network from scratch, Adam (``retrain.lr``,
  ``retrain.weight_decay``; ``momentum`` is not used), ``retrain.epochs`` full-batch steps
  on the train nodes with ``retrain.grad_clip``; the weights of the epoch with the best
  val accuracy (ties: lower val loss) are kept and give the test accuracy (model
  selection on val, the Planetoid protocol); the last epoch's test accuracy is reported
  too.

Dropout masks are seeded per (run seed, epoch, stream), so the passes of one strategy
step share them and a resumed run redraws exactly the same ones. Resume restarts at an
epoch boundary from ``checkpoint.pt`` (the loop state, RNG included): bitwise equal to an
uninterrupted run. One process only (no torchrun); image-only settings (``search.amp``,
``search.compile``, ``search.cuda_graph``, ``search.cudnn_benchmark``,
``search.diagnostics``) are refused.
``logger: tensorboard`` writes ``RUN_DIR/tensorboard/{search,retrain}`` as for images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.arch import ArchParams
from diffnas.config import RunConfig
from diffnas.data.graph import GRAPH_DATASETS, GraphData, load_graph
from diffnas.engine.best import FullBatchTrainTask
from diffnas.engine.callbacks import counted
from diffnas.engine.checkpoint import seed_everything
from diffnas.engine.engines import (
    Engine,
    refuse_image_search_settings,
    refuse_torchrun,
    register_engine,
)
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import retrain_dir, run_retrain_loop, save_retrain_result
from diffnas.engine.rundir import check_same_data, resolve_device
from diffnas.engine.search import (
    StrategyTask,
    run_search_loop,
    search_callbacks,
    search_then_retrain,
)
from diffnas.genotype import Genotype
from diffnas.ops.graph import Graph
from diffnas.spaces import DataShape, SearchSpace, create_space
from diffnas.strategies import SearchStrategy, create_strategy
from diffnas.strategies.objective import check_finite_loss
from diffnas.supernet.gnn import GraphInput

log = logging.getLogger("diffnas")


# --- batches and the objective ------------------------------------------------------------
@dataclass
class GraphBatch:
    """The whole graph, with the nodes whose labels the loss reads (``idx``)."""

    x: torch.Tensor
    graph: Graph
    y: torch.Tensor  # labels of every node
    idx: torch.Tensor  # the labelled nodes this batch trains or evaluates on
    seed: int | None = None  # dropout masks of this step
    x_support: torch.Tensor | None = None  # flat indices of the non-zero features


class NodeClassificationObjective:
    """Cross-entropy over the batch's nodes; reports accuracy there."""

    def inputs(self, batch: GraphBatch) -> GraphInput:
        return GraphInput(batch.x, batch.graph, batch.seed, batch.x_support)

    def __call__(self, output: torch.Tensor, batch: GraphBatch
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        logits, y = output.index_select(0, batch.idx), batch.y.index_select(0, batch.idx)
        loss = F.cross_entropy(logits, y)
        check_finite_loss(loss.item())
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**62)
    return s


@torch.no_grad()
def evaluate_nodes(model: nn.Module, batch: GraphBatch, arch_weights: Any = None
                   ) -> dict[str, float]:
    """Loss and accuracy on ``batch.idx`` in eval mode (``arch_weights`` for a supernet)."""
    was_training = model.training
    model.eval()
    inp = GraphInput(batch.x, batch.graph, x_support=batch.x_support)
    with torch.no_grad():
        out = model(inp) if arch_weights is None else model(inp, arch_weights)
    model.train(was_training)
    _, stats = NodeClassificationObjective()(out, batch)
    return stats


class GraphSplits:
    """The graph on a device and a batch per node split."""

    def __init__(self, data: GraphData, device: torch.device | str = "cpu",
                 train_y: torch.Tensor | None = None) -> None:
        self.data = data.to(device)
        self.graph = Graph(self.data.edge_index, data.num_nodes).to(device)
        self.train_y = self.data.y if train_y is None else train_y.to(device)
        self.x_support = torch.nonzero(self.data.x.flatten()).squeeze(1)

    def batch(self, split: str, seed: int | None = None) -> GraphBatch:
        d = self.data
        y = self.train_y if split == "train" else d.y
        return GraphBatch(d.x, self.graph, y, getattr(d, f"{split}_idx"), seed, self.x_support)


def graph_space(cfg: RunConfig, data: GraphData) -> SearchSpace:
    return create_space(cfg.search.space, DataShape(in_channels=data.num_features,
                                                    resolution=1,
                                                    num_classes=data.num_classes))


def refuse_image_settings(cfg: RunConfig) -> None:
    """The image-search settings (and torchrun) this engine does not take: an error, not
    silence (also at config loading, before a run directory exists)."""
    refuse_image_search_settings(cfg)
    refuse_torchrun(ENGINE)


# --- search -------------------------------------------------------------------------------
class GraphSearchTask(StrategyTask):
    """One full-batch strategy step per epoch: weights on the train nodes, alphas on the
    val nodes (bilevel strategies)."""

    def __init__(self, strategy: SearchStrategy, space: SearchSpace, splits: GraphSplits,
                 seed: int, rule: str | None = None) -> None:
        self.strategy, self.space, self.splits = strategy, space, splits
        self.seed, self.rule = seed, rule

    @property
    def supernet(self) -> nn.Module:
        return self.strategy.supernet

    def batches(self, epoch: int) -> Iterable[Any]:
        self.supernet.train()
        train = self.splits.batch("train", _seed(self.seed, epoch, 0))
        val = self.splits.batch("val", _seed(self.seed, epoch, 1))
        yield (train, val if self.strategy.uses_validation else None)

    def num_batches(self) -> int:
        return 1

    def step(self, batch: tuple[GraphBatch, GraphBatch | None]) -> dict[str, float]:
        return self.strategy.step(*batch)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        lr, aw = self.end_strategy_epoch()
        v = evaluate_nodes(self.supernet, self.splits.batch("val"), aw)
        return {"lr": lr, "eval_val_loss": v["loss"], "eval_val_acc": v["acc"]}

def build_graph_search(cfg: RunConfig, data: GraphData,
                       device: torch.device | str = "cpu") -> GraphSearchTask:
    """Space, supernet, architecture parameters and strategy for ``cfg`` on ``data``."""
    refuse_image_settings(cfg)
    seed_everything(cfg.seed)
    space = graph_space(cfg, data)
    supernet = space.build_supernet().to(device)
    arch = ArchParams(space).to(device)
    strategy = create_strategy(cfg.search.strategy, supernet, arch, space.objective(),
                               cfg.search.epochs)
    y = data.y.clone()  # relabel (RLNAS) among the training nodes only: the others'
    y[data.train_idx] = strategy.relabel(data.y[data.train_idx])  # labels stay unread
    splits = GraphSplits(data, device, y)
    return GraphSearchTask(strategy, space, splits, cfg.seed, cfg.search.discretizer)


@dataclass
class GraphSearchResult:
    genotype: Genotype
    history: list[dict[str, float]]
    task: GraphSearchTask


def run_graph_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                     stop_after: int | None = None, data: GraphData | None = None
                     ) -> GraphSearchResult:
    """Search a GNN cell as configured; writes ``run_dir/search`` like ``run_search``
    (metrics, genotypes and alphas per epoch, checkpoint, genotype.json, DONE)."""
    refuse_image_settings(cfg)  # before the run directory is touched
    out = Path(run_dir) / "search"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    data = data or load_graph(cfg.data.name, cfg.data.root)
    check_same_data(out, data, resume)  # a resume on other data
    task = build_graph_search(cfg, data, device)
    loop = Loop(task, cfg.search.epochs, search_callbacks(task, out, cfg))
    what = (f"graph search: {data.name} ({data.num_nodes} nodes, {data.edge_index.shape[1]} "
            f"edges), supernet weights={sum(p.numel() for p in task.supernet.parameters())}")
    history, genotype = run_search_loop(loop, task, out, resume, stop_after, what, "steps")
    return GraphSearchResult(genotype, history, task)


# --- retraining ---------------------------------------------------------------------------
class GraphTrainTask(FullBatchTrainTask):
    """Full-batch Adam on the train nodes; keeps the weights of the best val epoch."""

    def __init__(self, model: nn.Module, splits: GraphSplits, cfg: RunConfig) -> None:
        super().__init__(model, cfg.retrain)
        self.splits, self.seed = splits, cfg.seed
        self.objective = NodeClassificationObjective()

    def train_batch(self, epoch: int) -> GraphBatch:
        return self.splits.batch("train", _seed(self.seed, epoch, 2))

    def loss(self, batch: GraphBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model(self.objective.inputs(batch)), batch)

    def validate(self) -> dict[str, float]:
        return evaluate_nodes(self.model, self.splits.batch("val"))


def build_graph_network(cfg: RunConfig, genotype: Genotype, data: GraphData) -> nn.Module:
    return graph_space(cfg, data).build_network(genotype, **cfg.retrain.network)


def run_graph_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                      resume: bool = False, stop_after: int | None = None,
                      data: GraphData | None = None) -> dict[str, Any]:
    """Train ``genotype``'s network from scratch; writes ``run_dir/retrain`` (metrics,
    checkpoint, genotype.json, model.pt = the best-val weights, result.json)."""
    refuse_image_settings(cfg)
    out = retrain_dir(run_dir, genotype, resume)
    device = resolve_device(cfg.device)
    data = data or load_graph(cfg.data.name, cfg.data.root)
    check_same_data(out, data, resume)  # a resume on other data
    seed_everything(cfg.seed)
    model = build_graph_network(cfg, genotype, data).to(device)
    params = sum(p.numel() for p in model.parameters())
    log.info("graph retrain: %s params", f"{params:,}")
    splits = GraphSplits(data, device)
    task = GraphTrainTask(model, splits, cfg)
    loop, history = run_retrain_loop(task, cfg, out, resume, stop_after, "graph retraining")
    last_test = evaluate_nodes(model, splits.batch("test"))
    task.best.restore(model)
    test = evaluate_nodes(model, splits.batch("test"))
    result = {"genotype": genotype.to_dict(), "params": params, "epochs_done": loop.epoch,
              "best_epoch": task.best.record["epoch"], "valid_acc": task.best.record["val_acc"],
              "test_acc": test["acc"], "test_loss": test["loss"],
              "last_test_acc": last_test["acc"], "history": history}
    save_retrain_result(out, model, result)
    return result


def run_graph(cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
    """``diffnas search`` for the gnn space: search, then retrain if enabled."""
    data = load_graph(cfg.data.name, cfg.data.root)
    return search_then_retrain(
        cfg, run_dir, lambda: run_graph_search(cfg, run_dir, resume=resume, data=data).genotype,
        lambda g: run_graph_retrain(cfg, g, run_dir, resume=resume, data=data),
        print_graph_result)


def print_graph_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    """The genotype and, after a retrain, its parameters and accuracies."""
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"params: {result['params']:,}")
        print(f"test accuracy: {100 * result['test_acc']:.2f}% (weights of the best val "
              f"epoch {result['best_epoch'] + 1}, val {100 * result['valid_acc']:.2f}%; last "
              f"epoch: {100 * result['last_test_acc']:.2f}%) after "
              f"{counted(result['epochs_done'], 'epoch')}")


def graph_network_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    """What ``diffnas train --dry-run`` reports for a graph network: its parameters and
    the graph it is built for. Reads the graph, builds the model, trains nothing."""
    data = load_graph(cfg.data.name, cfg.data.root)
    model = build_graph_network(cfg, genotype, data)
    return {"nodes": data.num_nodes, "features": data.num_features,
            "classes": data.num_classes, "params": sum(p.numel() for p in model.parameters())}


def train_graph(cfg: RunConfig, genotype: Genotype, run_dir: Path, resume: bool = False
                ) -> None:
    """``diffnas train`` for a graph network: retrain ``genotype``, print the result."""
    print_graph_result(genotype, run_graph_retrain(cfg, genotype, run_dir, resume=resume))


def check_graph_config(cfg: RunConfig, device: bool = True) -> None:
    """What the graph search refuses that its config shows (image-search settings,
    torchrun), at config loading."""
    refuse_image_settings(cfg)


ENGINE = register_engine(Engine(
    name="graph", label="graph (engine/graph.py)",
    a_run="a graph run (node classification, full batch on the dataset's own split)",
    data_kind="graph", datasets=lambda: GRAPH_DATASETS, search=run_graph, train=train_graph,
    run_search=run_graph_search, run_retrain=run_graph_retrain, summary=graph_network_summary,
    check_search=check_graph_config,
    unused_data=("download", "resolution", "train_subset", "test_subset", "search_split",
                 "batch_size"),
    unread_retrain=("batch_size", "lr_min", "momentum", "auxiliary_weight", "drop_path",
                    "cutout", "crop_padding", "flip", "train_subset")))
