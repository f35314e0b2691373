"""NAS-Bench-201 networks (Dong & Yang, 2020): the search supernet and the fixed network.

The cell has 4 nodes; node ``j`` sums one op applied to every node ``i < j`` and the
cell output is node 3. The macro skeleton: a 3x3 conv stem (+BN), three stages of ``N``
cells with ``C``, ``2C``, ``4C`` channels, a residual reduction block between stages, and
BN-ReLU, global pooling and a linear classifier at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffnas.genotype import CellGenotype
from diffnas.ops import create_op
from diffnas.ops.conv import ReLUConvBN
from diffnas.ops.savers import stem_channels_last
from diffnas.supernet.mixed import MixedOpFactory, sampled_op_output

if TYPE_CHECKING:  # a runtime import would cycle: arch -> spaces -> supernet
    from diffnas.arch.relax import ArchWeights

NB201_NODES = 4


def nb201_edges(nodes: int = NB201_NODES) -> list[tuple[int, int]]:
    """``(src, dst)`` of every edge, in the official string order (and alpha-row order):
    (0,1), (0,2), (1,2), (0,3), (1,3), (2,3)."""
    return [(src, dst) for dst in range(1, nodes) for src in range(dst)]


class ResNetBasicBlock(nn.Module):
    """The benchmark's reduction block between stages: ReLU-Conv3x3(stride 2)-BN,
    ReLU-Conv3x3-BN, plus a shortcut AvgPool2d(2) + Conv1x1. Always affine BN with running
    statistics, in the supernet too (as in the benchmark code)."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2) -> None:
        super().__init__()
        if stride != 2:
            raise ValueError(f"the NAS-Bench-201 reduction block has stride 2, got {stride}")
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1, affine=True)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1, affine=True)
        self.downsample = nn.Sequential(
            # ceil_mode: odd sides halve rounding up, as conv_a does (the benchmark only
            # sees even sides, where this is its plain AvgPool2d(2))
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0, ceil_mode=True),
            nn.Conv2d(C_in, C_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


def stage_channels(C: int, N: int) -> list[tuple[int, bool]]:
    """``(channels, is_reduction)`` of every layer: N cells, a block, N cells, a block,
    N cells."""
    out: list[tuple[int, bool]] = []
    for stage in range(3):
        if stage:
            out.append((C * 2**stage, True))
        out += [(C * 2**stage, False)] * N
    return out


class Nb201MixedOp(nn.Module):
    """sum_k w_k * op_k(x) over the candidates of one edge, ops with affine-free BN and no
    running statistics. Unlike the DARTS supernet, pools get no extra BN (NAS-Bench-201's
    search cell uses the bare ops). ``none`` contributes exactly zero, so it is skipped."""

    def __init__(self, C: int, stride: int, candidates: Sequence[str]) -> None:
        super().__init__()
        if stride != 1:
            raise ValueError("nb201 cells only have stride-1 edges")
        self.candidates = tuple(candidates)
        self.ops = nn.ModuleList(create_op(name, C, 1, affine=False) for name in self.candidates)
        self._live = [i for i, n in enumerate(self.candidates) if n != "none"]

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: int | None = None
    ) -> torch.Tensor:
        if active is not None:
            return sampled_op_output(self.ops, x, weights, active)
        if not self._live:
            return x.mul(0.0) * weights.sum()
        out = weights[self._live[0]] * self.ops[self._live[0]](x)
        for i in self._live[1:]:
            out = out + weights[i] * self.ops[i](x)
        return out


class Nb201SearchCell(nn.Module):
    """Every edge is a mixed op; ``weights`` has one row per edge (``nb201_edges`` order)."""

    def __init__(
        self, C: int, candidates: Sequence[str], nodes: int = NB201_NODES,
        mixed_op: MixedOpFactory | None = None,
    ) -> None:
        super().__init__()
        self.spec = nb201_edges(nodes)
        self.nodes = nodes
        make = mixed_op or Nb201MixedOp
        self.edges = nn.ModuleList(make(C, 1, candidates) for _ in self.spec)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: Sequence[int] | None = None
    ) -> torch.Tensor:
        states = [x]
        for k, (src, dst) in enumerate(self.spec):
            out = self.edges[k](states[src], weights[k], None if active is None else active[k])
            if dst == len(states):
                states.append(out)
            else:
                states[dst] = states[dst] + out
        return states[-1]


class Nb201FixedCell(nn.Module):
    """The cell of a genotype: one op per edge (affine BN with running statistics)."""

    def __init__(self, genotype: CellGenotype, C: int) -> None:
        super().__init__()
        edges = sorted(genotype.edges, key=lambda e: (e.dst, e.src))
        self.spec = [(e.src, e.dst) for e in edges]
        self.ops = nn.ModuleList(create_op(e.op, C, 1, affine=True) for e in edges)
        self.output = max(genotype.concat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states: dict[int, torch.Tensor] = {0: x}
        for op, (src, dst) in zip(self.ops, self.spec, strict=True):
            h = op(states[src])
            states[dst] = h if dst not in states else states[dst] + h
        return states[self.output]


def _stem(in_channels: int, C: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))


def _head(C: int, num_classes: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    return (nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(inplace=False)), nn.AdaptiveAvgPool2d(1),
            nn.Linear(C, num_classes))


class Nb201SuperNet(nn.Module):
    """The search network: every cell shares the ``cell`` group of the arch weights.
    Holds no architecture parameters."""

    def __init__(
        self, C: int, N: int, candidates: Sequence[str], num_classes: int, in_channels: int = 3,
        group: str = "cell", mixed_op: MixedOpFactory | None = None, channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.group = group
        self.channels_last = channels_last
        self.stem = _stem(in_channels, C)
        layers: list[nn.Module] = []
        C_prev = C
        for C_curr, reduction in stage_channels(C, N):
            layers.append(
                ResNetBasicBlock(C_prev, C_curr) if reduction
                else Nb201SearchCell(C_curr, candidates, mixed_op=mixed_op)
            )
            C_prev = C_curr
        self.cells = nn.ModuleList(layers)
        self.lastact, self.pool, self.classifier = _head(C_prev, num_classes)

    def forward(self, x: torch.Tensor, arch_weights: ArchWeights) -> torch.Tensor:
        weights = arch_weights[self.group]
        active = None
        if arch_weights.active is not None:
            active = [int(a) for a in arch_weights.active[self.group].tolist()]
        h = stem_channels_last(self.stem, x) if self.channels_last else self.stem(x)
        for layer in self.cells:
            h = layer(h, weights, active) if isinstance(layer, Nb201SearchCell) else layer(h)
        return self.classifier(self.pool(self.lastact(h)).flatten(1))


class Nb201Network(nn.Module):
    """A fixed network: the genotype's cell in every position of the skeleton."""

    def __init__(
        self, genotype: CellGenotype, C: int, N: int, num_classes: int, in_channels: int = 3,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.stem = _stem(in_channels, C)
        layers: list[nn.Module] = []
        C_prev = C
        for C_curr, reduction in stage_channels(C, N):
            layers.append(
                ResNetBasicBlock(C_prev, C_curr) if reduction else Nb201FixedCell(genotype, C_curr)
            )
            C_prev = C_curr
        self.cells = nn.ModuleList(layers)
        self.lastact, self.pool, self.classifier = _head(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = stem_channels_last(self.stem, x) if self.channels_last else self.stem(x)
        for layer in self.cells:
            h = layer(h)
        return self.classifier(self.pool(self.lastact(h)).flatten(1))
