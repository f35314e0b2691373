"""Graph networks of the ``gnn`` space: the search supernet and the fixed network.

Both are ``stem -> cells -> classifier`` over all nodes of one graph at once:

- stem: dropout (``in_dropout``) on the node features, then a linear map to ``C``;
- a cell: node 0 is its input (the stem's output, or the previous cell's); intermediate
  node ``j`` is ``relu(sum over its incoming edges (i -> j) of op(h_i))``; the cell's
  output is the mean of its ``concat`` nodes (every intermediate node in search). Ops
  with weights see ``h_i`` after dropout (``dropout``; one mask per node, shared by the
  edges that read it), the identity sees ``h_i`` itself;
- classifier: dropout, then a linear map to the classes (logits of every node).

Dropout masks come from ``GraphInput.seed`` when it is set, so every pass of one strategy
step (virtual step, finite differences) sees the same masks, as the LM engine does.
The supernet holds no architecture parameters: ``forward(inp, arch_weights)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffnas.genotype import CellGenotype
from diffnas.ops.graph import Graph, create_graph_op
from diffnas.supernet.mixed import sampled_op_output

CELL = "cell"  # the space's one cell type (alpha group)


@dataclass
class GraphInput:
    """What a graph network is called with: node features, the graph, a dropout seed."""

    x: torch.Tensor
    graph: Graph
    seed: int | None = None
    #: flat indices of the non-zero features (optional): the stem then multiplies and
    #: drops out those alone (Cora's bag-of-words features are ~1% non-zero); the same
    #: function as the dense path, about 30x less work
    x_support: torch.Tensor | None = None


class Dropout:
    """Inverted dropout drawing from one generator per forward pass (seeded), or from the
    global RNG (``seed=None``); identity outside training or at ``p = 0``."""

    def __init__(self, training: bool, seed: int | None, device: torch.device) -> None:
        self.training = training
        self.gen = None
        if training and seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=self.gen)
        return x * keep / (1.0 - p)


class GnnMixedOp(nn.Module):
    """``sum_k w_k op_k`` over one edge's candidates (``none`` skipped); with ``active``
    (hard sampling, GDAS) only that op is computed."""

    def __init__(self, C: int, candidates: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        if all(c == "none" for c in self.candidates):
            raise ValueError("an edge needs at least one op besides 'none'")
        self.ops = nn.ModuleList(create_graph_op(n, C) for n in self.candidates)
        self._live = [i for i, n in enumerate(self.candidates) if n != "none"]

    def forward(self, x: torch.Tensor, dropped: torch.Tensor, graph: Graph,
                weights: torch.Tensor, active: int | None = None) -> torch.Tensor:
        def run(i: int) -> torch.Tensor:
            op = self.ops[i]
            return op(dropped if op.dropped_input else x, graph)

        if active is not None:
            return sampled_op_output(_Indexed(run), x, weights, active)
        out = None
        for i in self._live:
            term = weights[i] * run(i)
            out = term if out is None else out + term
        return out


class _Indexed:
    """``ops[i](x)`` -> ``run(i)``: lets :func:`sampled_op_output` call one op."""

    def __init__(self, run) -> None:
        self.run = run

    def __getitem__(self, i: int):
        return lambda x: self.run(i)


class SearchCell(nn.Module):
    """Every edge ``i -> j`` (``i < j``) carries a mixed op; edges in alpha-row order."""

    def __init__(self, C: int, nodes: int, ops: Sequence[str]) -> None:
        super().__init__()
        self.nodes = nodes
        self.pairs = [(src, dst) for dst in range(1, nodes + 1) for src in range(dst)]
        self.edges = nn.ModuleList(GnnMixedOp(C, ops) for _ in self.pairs)

    def forward(self, h: torch.Tensor, graph: Graph, weights: torch.Tensor,
                active: torch.Tensor | None, drop: Dropout, p: float) -> torch.Tensor:
        states, dropped = [h], [drop(h, p)]
        k = 0
        for dst in range(1, self.nodes + 1):
            s = None
            for src in range(dst):
                a = None if active is None else int(active[k])
                t = self.edges[k](states[src], dropped[src], graph, weights[k], a)
                s = t if s is None else s + t
                k += 1
            states.append(torch.relu(s))
            dropped.append(drop(states[-1], p))
        return torch.stack(states[1:]).mean(0)


class FixedCell(nn.Module):
    """The cell of a genotype: each kept edge's op; output the mean of ``concat``."""

    def __init__(self, C: int, cell: CellGenotype) -> None:
        super().__init__()
        self.edges = [(e.src, e.dst) for e in cell.edges]
        self.ops = nn.ModuleList(create_graph_op(e.op, C) for e in cell.edges)
        self.node_ids = cell.nodes
        self.concat = cell.concat

    def forward(self, h: torch.Tensor, graph: Graph, drop: Dropout, p: float) -> torch.Tensor:
        states, dropped = {0: h}, {0: drop(h, p)}
        for dst in self.node_ids:
            s = None
            for (src, d), op in zip(self.edges, self.ops):
                if d == dst:
                    t = op(dropped[src] if op.dropped_input else states[src], graph)
                    s = t if s is None else s + t
            states[dst] = torch.relu(s)
            dropped[dst] = drop(states[dst], p)
        return torch.stack([states[i] for i in self.concat]).mean(0)


class _GnnBase(nn.Module):
    def __init__(self, in_features: int, C: int, num_classes: int, dropout: float,
                 in_dropout: float) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, C)
        self.classifier = nn.Linear(C, num_classes)
        self.dropout, self.in_dropout = dropout, in_dropout

    def _dropout(self, inp: GraphInput) -> Dropout:
        return Dropout(self.training, inp.seed, inp.x.device)

    def _stem(self, inp: GraphInput, drop: Dropout) -> torch.Tensor:
        """``stem(dropout(x))`` standardised per channel over the nodes."""
        h = self._project(inp, drop)
        # Row-normalised bag-of-words features give stem outputs of ~1e-2; through the
        # cell's linear maps the signal then fades and plain SGD (the strategies' weight
        # optimizer) barely moves. Standardising over all nodes (always the whole graph,
        # no state) gives the cell unit-scale inputs. In training the statistics are those
        # of the dropped-out projection (std about 1.4x the eval one on Cora at
        # in_dropout 0.5), so eval inputs are somewhat larger than training ones.
        return (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()

    def _project(self, inp: GraphInput, drop: Dropout) -> torch.Tensor:
        """``stem(dropout(x))``; with ``x_support`` over the non-zero features only."""
        x, support = inp.x, inp.x_support
        if support is None:
            return self.stem(drop(x, self.in_dropout))
        F = x.shape[1]
        rows, cols = support // F, support % F
        vals = drop(x.flatten().index_select(0, support), self.in_dropout)
        msg = self.stem.weight.t().index_select(0, cols) * vals.unsqueeze(-1)
        out = msg.new_zeros(x.shape[0], msg.shape[1]).index_add_(0, rows, msg)
        return out + self.stem.bias


class GnnSuperNet(_GnnBase):
    """Stem, ``cells`` search cells (one shared alpha group), classifier."""

    def __init__(self, in_features: int, C: int, num_classes: int, nodes: int,
                 ops: Sequence[str], cells: int = 1, dropout: float = 0.5,
                 in_dropout: float = 0.5) -> None:
        super().__init__(in_features, C, num_classes, dropout, in_dropout)
        self.cells = nn.ModuleList(SearchCell(C, nodes, ops) for _ in range(cells))

    def forward(self, inp: GraphInput, arch_weights) -> torch.Tensor:
        drop = self._dropout(inp)
        weights = arch_weights[CELL]
        active = None if arch_weights.active is None else arch_weights.active.get(CELL)
        h = self._stem(inp, drop)
        for cell in self.cells:
            h = cell(h, inp.graph, weights, active, drop, self.dropout)
        return self.classifier(drop(h, self.dropout))


class GnnNetwork(_GnnBase):
    """Stem, ``cells`` copies of the genotype's cell (own weights each), classifier."""

    def __init__(self, in_features: int, C: int, num_classes: int, cell: CellGenotype,
                 cells: int = 1, dropout: float = 0.5, in_dropout: float = 0.5) -> None:
        super().__init__(in_features, C, num_classes, dropout, in_dropout)
        self.cells = nn.ModuleList(FixedCell(C, cell) for _ in range(cells))

    def forward(self, inp: GraphInput) -> torch.Tensor:
        drop = self._dropout(inp)
        h = self._stem(inp, drop)
        for cell in self.cells:
            h = cell(h, inp.graph, drop, self.dropout)
        return self.classifier(drop(h, self.dropout))
