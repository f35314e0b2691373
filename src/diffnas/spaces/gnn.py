"""A DARTS-style GNN cell space for node classification (docs/graph.md).

One cell type, ``cell``: node 0 is the cell input (the projected node features, or the
previous cell's output), ``nodes`` intermediate nodes, and a mixed edge from every
earlier node to every intermediate node over graph ops (``none``, ``skip_connect``,
``linear``, ``gcn``, ``sage``, ``gat``, ``gin``; :mod:`diffnas.ops.graph`). Intermediate
node ``j`` is ``relu(sum of its edges)``; the cell output is the mean of its concat nodes.

Discretization keeps, per intermediate node, its single strongest non-``none``
(predecessor, op) pair (``inputs_per_node() == 1``, the rule of the DARTS recurrent
cell): with one input node, node 1 has a single predecessor, so the CNN cell's top-2
rule cannot apply to every node; one input per node still lets the cell pick its depth
and branching (node 3 may read node 0, 1 or 2), and a 2-layer GCN is the genotype
``1 <- gcn(0), 2 <- gcn(1)``, concat ``(2,)``. ``DataShape.in_channels`` is the number of
node features, ``num_classes`` the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from diffnas.config import from_dict, require, require_cell_edges, require_sizes
from diffnas.genotype import CellGenotype, Edge, Genotype
from diffnas.ops.graph import GNN_OPS, GRAPH_OPS
from diffnas.spaces.base import DataShape, EdgeSpec, SearchSpace
from diffnas.spaces.registry import register_space
from diffnas.supernet.gnn import CELL, GnnNetwork, GnnSuperNet

if TYPE_CHECKING:
    from diffnas.strategies.objective import Objective


def _check_dropout(name: str, p: float | None) -> None:
    if p is not None and not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


@dataclass
class GnnConfig:
    hidden: int = 64  # node state width C (gat splits it into 4 heads)
    nodes: int = 3  # intermediate nodes per cell
    cells: int = 1  # cells in sequence (one alpha group shared by all)
    ops: list[str] = field(default_factory=lambda: list(GNN_OPS))
    dropout: float = 0.5  # on node states read by ops with weights, and before the classifier
    in_dropout: float = 0.5  # on the input features

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in GRAPH_OPS]
        if unknown:
            raise ValueError(f"unknown graph op(s) {unknown}; known: {GRAPH_OPS.names()}")
        if all(o == "none" for o in self.ops):
            raise ValueError("the gnn space needs an op besides 'none'")
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        for key in ("hidden", "nodes", "cells"):
            require(getattr(self, key) >= 1, f"search.space.{key}", ">= 1", getattr(self, key))
        require_cell_edges(self.nodes, lambda n: n * (n + 1) // 2, "n(n+1)/2")
        if "gat" in self.ops and self.hidden % 4:
            raise ValueError(f"hidden={self.hidden} must divide by 4 for gat's 4 heads")
        _check_dropout("dropout", self.dropout)
        _check_dropout("in_dropout", self.in_dropout)


@dataclass
class GnnNetworkConfig:
    """The retraining network (``retrain.network``); None = the search value."""

    hidden: int | None = None
    cells: int | None = None
    dropout: float | None = None
    in_dropout: float | None = None

    def __post_init__(self) -> None:
        require_sizes(self, ("hidden", "cells"), "retrain.network")
        _check_dropout("retrain.network.dropout", self.dropout)
        _check_dropout("retrain.network.in_dropout", self.in_dropout)


@register_space("gnn")
class GnnSpace(SearchSpace):
    engine = "graph"
    Config = GnnConfig
    NetworkConfig = GnnNetworkConfig

    def __init__(self, config: GnnConfig, shape: DataShape) -> None:
        super().__init__(config, shape)

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)
        return [EdgeSpec(f"{CELL}/n{dst}/e{src}", CELL, src, dst, ops)
                for dst in range(1, self.config.nodes + 1) for src in range(dst)]

    def inputs_per_node(self) -> int:
        return 1

    def objective(self) -> Objective:
        from diffnas.engine.graph import NodeClassificationObjective

        return NodeClassificationObjective()

    def build_supernet(self) -> nn.Module:
        c = self.config
        return GnnSuperNet(self.shape.in_channels, c.hidden, self.shape.num_classes, c.nodes,
                           c.ops, c.cells, c.dropout, c.in_dropout)

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = from_dict(GnnNetworkConfig, overrides, "retrain.network")
        c = self.config

        def pick(name: str) -> Any:
            v = getattr(n, name)
            return getattr(c, name) if v is None else v

        hidden = pick("hidden")
        if hidden % 4 and any(e.op == "gat" for e in genotype.cell(CELL).edges):
            raise ValueError(f"retrain.network.hidden={hidden} must divide by 4 for gat")
        return GnnNetwork(self.shape.in_channels, hidden, self.shape.num_classes,
                          genotype.cell(CELL), pick("cells"), pick("dropout"),
                          pick("in_dropout"))


def chain_genotype(ops: list[str], nodes: int | None = None) -> Genotype:
    """A hand-made chain cell: node ``i`` = ``ops[i-1]`` of node ``i-1``, output the last
    node. ``chain_genotype(["gcn", "gcn"])`` is a 2-layer GCN (a space with ``nodes=2``);
    with ``nodes`` > ``len(ops)`` the other nodes read node 0 through ``skip_connect``
    and are left out of the output."""
    nodes = len(ops) if nodes is None else nodes
    if nodes < len(ops):
        raise ValueError(f"{len(ops)} ops need at least {len(ops)} nodes, got {nodes}")
    edges = [Edge(op, i, i + 1) for i, op in enumerate(ops)]
    edges += [Edge("skip_connect", 0, j) for j in range(len(ops) + 1, nodes + 1)]
    return Genotype("gnn", (CellGenotype(CELL, tuple(edges), (len(ops),)),))
