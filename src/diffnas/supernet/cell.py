"""DARTS convolutional cells: the searchable cell and the fixed cell of a genotype."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffnas.genotype import CellGenotype
from diffnas.ops import create_op
from diffnas.ops.conv import FactorizedReduce, Identity, ReLUConvBN
from diffnas.ops.savers import dense_grad
from diffnas.supernet.mixed import MixedOp, MixedOpFactory, default_mixed_op


def cell_edges(nodes: int) -> list[tuple[int, int]]:
    """``(src, dst)`` of every edge of a DARTS cell, in alpha-row order (nodes 0,1 are
    the cell inputs; node ``2+i`` takes every earlier node)."""
    return [(j, 2 + i) for i in range(nodes) for j in range(2 + i)]


def edge_stride(reduction: bool, src: int) -> int:
    """A DARTS cell's edge downsamples when the cell is a reduction cell and the edge
    reads one of the cell's two inputs."""
    return 2 if reduction and src < 2 else 1


def preprocess(C_pp: int, C_p: int, C: int, reduction_prev: bool, affine: bool
               ) -> tuple[nn.Module, nn.Module]:
    """The two 1x1 preprocessing ops of a cell's inputs (the first one halves the side
    when the previous cell reduced)."""
    p0 = (
        FactorizedReduce(C_pp, C, affine)
        if reduction_prev
        else ReLUConvBN(C_pp, C, 1, 1, 0, affine)
    )
    return p0, ReLUConvBN(C_p, C, 1, 1, 0, affine)


class SearchCell(nn.Module):
    def __init__(
        self,
        nodes: int,
        C_pp: int,
        C_p: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        candidates: Sequence[str],
        mixed_op: MixedOpFactory = default_mixed_op,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preprocess0, self.preprocess1 = preprocess(C_pp, C_p, C, reduction_prev, False)
        self.edges = nn.ModuleList(
            mixed_op(C, edge_stride(reduction, src), candidates)
            for src, _ in cell_edges(nodes)
        )

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        act = None if active is None else active.tolist()
        shared: list[dict[str, torch.Tensor]] = [{}, {}]  # per node, see MixedOp.forward
        offset = 0
        for _ in range(self.nodes):
            s = None
            for j, h in enumerate(states):
                k = offset + j
                edge = self.edges[k]
                a = None if act is None else act[k]
                if isinstance(edge, MixedOp):
                    out = edge(h, weights[k], a, shared=shared[j])
                else:
                    out = edge(h, weights[k], a)
                s = out if s is None else s + out
            offset += len(states)
            states.append(dense_grad(s))
            shared.append({})
        return torch.cat(states[-self.nodes :], dim=1)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, rescaling the kept ones."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class FixedCell(nn.Module):
    """A cell whose edges are the genotype's (op, src, dst) list."""

    def __init__(
        self,
        genotype: CellGenotype,
        C_pp: int,
        C_p: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0, self.preprocess1 = preprocess(C_pp, C_p, C, reduction_prev, True)
        self.spec = [(e.src, e.dst) for e in genotype.edges]
        self.nodes = genotype.nodes
        self.concat = list(genotype.concat)
        self.multiplier = len(self.concat)
        self.ops = nn.ModuleList(
            create_op(e.op, C, 2 if reduction and e.src < 2 else 1, True) for e in genotype.edges
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states: dict[int, torch.Tensor] = {0: self.preprocess0(s0), 1: self.preprocess1(s1)}
        for node in self.nodes:
            total = None
            for op, (src, dst) in zip(self.ops, self.spec):
                if dst != node:
                    continue
                h = op(states[src])
                if self.training and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states[node] = total
        return torch.cat([states[i] for i in self.concat], dim=1)
