"""A worked engine (docs/extending.md, "An engine"): tabular classification, a kind of
task diffnas does not ship, added by this one file.

It registers three things: the tables it reads (scikit-learn's ``breast_cancer`` and
``wine``, which ship in its wheel), a space ``mlp_cell`` (a DARTS cell over feature
vectors: node 0 is the projected input row, each intermediate node reads its strongest
predecessor through one of ``none``, ``skip_connect``, ``linear``, ``linear_relu``,
``linear_tanh``) and the engine ``tabular`` that searches and retrains it, built from
diffnas's own parts: the strategies (any bilevel or single-level one), ``StrategyTask``,
the ``Loop`` with ``search_callbacks`` (progress bar, metrics, genotypes, alphas,
loggers, atomic checkpoints), ``run_search_loop`` (resume, genotype.json, DONE), for the
retraining ``run_retrain_loop`` (the same around its loop), and the commands' ``search``
and ``train`` made from the two halves and ``report``. Full batch on a fixed split
(60/20/20 % of the rows, standardised by the training rows): weights learn on the
training rows, alphas on the validation rows; the retraining keeps the weights of its
best validation epoch (``engine/best.FullBatchTrainTask``, as the graph engine's).

    diffnas search "plugins=[docs/examples/plugins/my_engine.py]" \\
        search.space.name=mlp_cell data.name=breast_cancer search.epochs=20 \\
        retrain.epochs=100 retrain.lr=0.01
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, RunConfig, require, require_sizes
from diffnas.engine.best import FullBatchTrainTask
from diffnas.engine.callbacks import counted
from diffnas.engine.checkpoint import seed_everything
from diffnas.engine.engines import Engine, refuse_image_search_settings, register_engine
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import retrain_dir, run_retrain_loop, save_retrain_result
from diffnas.engine.rundir import check_same_data, resolve_device
from diffnas.engine.search import (
    StrategyTask,
    run_search_loop,
    search_callbacks,
)
from diffnas.genotype import CellGenotype, Genotype
from diffnas.spaces import DataShape, EdgeSpec, SearchSpace, create_space, register_space
from diffnas.strategies import create_strategy
from diffnas.strategies.objective import ClassificationObjective

CELL = "cell"


# --- data -----------------------------------------------------------------------------------
@dataclass
class Table:
    """A table split into train / val / test rows (features standardised by train). A
    dataclass of tensors, so ``check_same_data`` fingerprints it (a resume on other data
    is refused)."""

    name: str
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")


def _sklearn(name: str) -> Any:
    import sklearn.datasets

    return getattr(sklearn.datasets, f"load_{name}")()


TABLES = ("breast_cancer", "wine")


def load_table(name: str, device: torch.device | str = "cpu") -> Table:
    if name not in TABLES:
        raise ConfigError(f"data.name: {name!r} is not a table; one of {', '.join(TABLES)}")
    d = _sklearn(name)
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    mean, std = x[parts["train"]].mean(0), x[parts["train"]].std(0).clamp_min(1e-6)
    rows = {}
    for split, i in parts.items():
        rows[f"x_{split}"], rows[f"y_{split}"] = ((x[i] - mean) / std).to(device), y[i].to(device)
    return Table(name, int(y.max()) + 1, **rows)


# --- the space ------------------------------------------------------------------------------
def _op(name: str, width: int) -> nn.Module:
    if name == "none":
        return _Zero()
    if name == "skip_connect":
        return nn.Identity()
    act = {"linear": nn.Identity(), "linear_relu": nn.ReLU(), "linear_tanh": nn.Tanh()}[name]
    return nn.Sequential(nn.Linear(width, width), act)


class _Zero(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * 0.0


VECTOR_OPS = ("none", "skip_connect", "linear", "linear_relu", "linear_tanh")


@dataclass
class MlpCellConfig:
    hidden: int = 32
    nodes: int = 3
    ops: list[str] = field(default_factory=lambda: list(VECTOR_OPS))

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in VECTOR_OPS]
        if unknown:
            raise ValueError(f"unknown vector op(s) {unknown}; known: {', '.join(VECTOR_OPS)}")
        if all(o == "none" for o in self.ops):
            raise ValueError("the mlp_cell space needs an op besides 'none'")
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        for key in ("hidden", "nodes"):
            require(getattr(self, key) >= 1, f"search.space.{key}", ">= 1", getattr(self, key))


@dataclass
class MlpCellNetworkConfig:
    """The retraining network (``retrain.network``); None = the search value."""

    hidden: int | None = None

    def __post_init__(self) -> None:  # a width >= 1, or None: refused before the search
        require_sizes(self, ("hidden",), "retrain.network")


class _SuperNet(nn.Module):
    """Stem, one search cell (every op on every edge, weighted), classifier."""

    def __init__(self, features: int, classes: int, config: MlpCellConfig) -> None:
        super().__init__()
        self.nodes, self.ops = config.nodes, config.ops
        self.stem = nn.Linear(features, config.hidden)
        self.edges = nn.ModuleList(
            nn.ModuleList(_op(o, config.hidden) for o in config.ops)
            for dst in range(1, config.nodes + 1) for _ in range(dst))
        self.classifier = nn.Linear(config.hidden, classes)

    def forward(self, x: torch.Tensor, arch_weights: Any) -> torch.Tensor:
        weights, states, e = arch_weights[CELL], [torch.relu(self.stem(x))], 0
        for _dst in range(1, self.nodes + 1):
            total = 0
            for src, h in enumerate(states):  # the mixed edge src -> dst: weighted op sum
                mixed = zip(weights[e + src], self.edges[e + src], strict=True)
                total = total + sum(w * op(h) for w, op in mixed)
            e += len(states)
            states.append(torch.relu(total))
        return self.classifier(torch.stack(states[1:]).mean(0))


class _Network(nn.Module):
    """Stem, the genotype's cell (one op per kept edge), classifier."""

    def __init__(self, features: int, classes: int, hidden: int, cell: CellGenotype) -> None:
        super().__init__()
        self.cell = cell
        self.stem = nn.Linear(features, hidden)
        self.edges = nn.ModuleList(_op(e.op, hidden) for e in cell.edges)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = {0: torch.relu(self.stem(x))}
        for dst in sorted({e.dst for e in self.cell.edges}):
            states[dst] = torch.relu(sum(op(states[e.src]) for e, op in
                                         zip(self.cell.edges, self.edges, strict=True)
                                         if e.dst == dst))
        return self.classifier(torch.stack([states[n] for n in self.cell.concat]).mean(0))


@register_space("mlp_cell")
class MlpCellSpace(SearchSpace):
    engine = "tabular"
    Config = MlpCellConfig
    NetworkConfig = MlpCellNetworkConfig

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)
        return [EdgeSpec(f"{CELL}/n{dst}/e{src}", CELL, src, dst, ops)
                for dst in range(1, self.config.nodes + 1) for src in range(dst)]

    def inputs_per_node(self) -> int:
        return 1  # node 1 has a single predecessor, so one input per node (as gnn)

    def concat_candidates(self, group: str) -> tuple[int, ...]:
        return self.concat(group)  # the output averages intermediate nodes only

    def objective(self) -> ClassificationObjective:
        return ClassificationObjective()  # (x, y) batches: cross-entropy, accuracy

    def build_supernet(self) -> nn.Module:
        return _SuperNet(self.shape.in_channels, self.shape.num_classes, self.config)

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = self.network_settings(overrides)  # None: the search's value
        return _Network(self.shape.in_channels, self.shape.num_classes,
                        n["hidden"], genotype.cell(CELL))


def _space(cfg: RunConfig, table: Table) -> SearchSpace:
    return create_space(cfg.search.space, DataShape(in_channels=table.num_features,
                                                    resolution=1,
                                                    num_classes=table.num_classes))


@torch.no_grad()
def _evaluate(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
              arch_weights: Any = None) -> dict[str, float]:
    model.eval()
    out = model(batch[0]) if arch_weights is None else model(batch[0], arch_weights)
    model.train()
    _, stats = ClassificationObjective()(out, batch)
    return stats


# --- search ---------------------------------------------------------------------------------
class TableSearchTask(StrategyTask):
    """One full-batch strategy step per epoch: weights on the training rows, alphas on
    the validation rows."""

    def __init__(self, cfg: RunConfig, table: Table, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.space, self.table, self.rule = _space(cfg, table), table, cfg.search.discretizer
        supernet = self.space.build_supernet().to(device)
        arch = ArchParams(self.space).to(device)
        self.strategy = create_strategy(cfg.search.strategy, supernet, arch,
                                        self.space.objective(), cfg.search.epochs)
        self.train_y = self.strategy.relabel(table.y_train)  # (random_labels: RLNAS)

    def batches(self, epoch: int):
        yield ((self.table.x_train, self.train_y),
               self.table.batch("val") if self.strategy.uses_validation else None)

    def num_batches(self) -> int:
        return 1

    def step(self, batch: Any) -> dict[str, float]:
        return self.strategy.step(*batch)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.strategy.end_epoch()
        v = _evaluate(self.strategy.supernet, self.table.batch("val"),
                      self.measured_arch_weights())
        return {"eval_val_loss": v["loss"], "eval_val_acc": v["acc"]}


@dataclass
class TableSearchResult:
    genotype: Genotype
    history: list[dict[str, float]]


def run_table_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False
                     ) -> TableSearchResult:
    """Search the cell; writes ``run_dir/search`` like every diffnas search."""
    out = Path(run_dir) / "search"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    table = load_table(cfg.data.name, device)
    check_same_data(out, table, resume)
    task = TableSearchTask(cfg, table, device)
    loop = Loop(task, cfg.search.epochs, search_callbacks(task, out, cfg))
    history, genotype = run_search_loop(loop, task, out, resume, None,
                                        f"table search: {table.name}", "steps")
    return TableSearchResult(genotype, history)


# --- retraining -----------------------------------------------------------------------------
class TableTrainTask(FullBatchTrainTask):
    """Full-batch Adam on the training rows; keeps the best validation epoch's weights."""

    def __init__(self, model: nn.Module, table: Table, cfg: RunConfig) -> None:
        super().__init__(model, cfg.retrain)
        self.table = table

    def train_batch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.batch("train")

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        return ClassificationObjective()(self.model(batch[0]), batch)

    def validate(self) -> dict[str, float]:
        return _evaluate(self.model, self.table.batch("val"))


def run_table_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                      resume: bool = False) -> dict[str, Any]:
    """Train ``genotype``'s network from scratch; writes ``run_dir/retrain`` (metrics,
    checkpoint, genotype.json, model.pt, result.json with ``test_acc``)."""
    out = retrain_dir(run_dir, genotype, resume)
    device = resolve_device(cfg.device)
    table = load_table(cfg.data.name, device)
    check_same_data(out, table, resume)
    seed_everything(cfg.seed)
    model = _space(cfg, table).build_network(genotype, **cfg.retrain.network).to(device)
    task = TableTrainTask(model, table, cfg)
    loop, history = run_retrain_loop(task, cfg, out, resume)  # bar, metrics, checkpoints
    task.best.restore(model)
    test = _evaluate(model, table.batch("test"))
    result = {"genotype": genotype.to_dict(), "epochs_done": loop.epoch,
              "params": sum(p.numel() for p in model.parameters()),
              "best_epoch": task.best.record["epoch"], "valid_acc": task.best.record["val_acc"],
              "test_acc": test["acc"], "test_loss": test["loss"], "history": history}
    save_retrain_result(out, model, result)  # model.pt, result.json
    return result


# --- the engine -----------------------------------------------------------------------------
def print_table_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"params: {result['params']:,}")
        print(f"test accuracy: {100 * result['test_acc']:.2f}% (weights of the best val epoch "
              f"{result['best_epoch'] + 1}) after {counted(result['epochs_done'], 'epoch')}")


def table_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    table = load_table(cfg.data.name)
    model = _space(cfg, table).build_network(genotype, **cfg.retrain.network)
    return {"features": table.num_features, "classes": table.num_classes,
            "params": sum(p.numel() for p in model.parameters())}


register_engine(Engine(
    name="tabular", label="tabular (my_engine.py)",
    a_run="a tabular run (full batch on a fixed split)", data_kind="tabular",
    datasets=lambda: TABLES, report=print_table_result,
    run_search=run_table_search, run_retrain=run_table_retrain, summary=table_summary,
    check_search=refuse_image_search_settings,  # (amp, compile, ...: refused, not ignored)
    unused_data=("root", "download", "resolution", "train_subset", "test_subset",
                 "search_split", "batch_size"),
    unread_retrain=("batch_size", "lr_min", "momentum", "auxiliary_weight", "drop_path",
                    "cutout", "crop_padding", "flip", "train_subset")))
