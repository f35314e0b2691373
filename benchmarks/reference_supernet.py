"""A plain DARTS CNN search supernet, written the way the original code writes it: every
candidate op (``none`` included) is computed on every edge and the outputs are summed with
their weights. No shared work, no fusion, no skipping.

It is the benchmark's baseline and the correctness guard's reference: its module names
match diffnas's ``DartsSuperNet`` (``stem``, ``cells.i.preprocess0``,
``cells.i.edges.k.ops.j``, ``classifier``), so one ``state_dict`` loads into both.
"""

from __future__ import annotations

import torch
from torch import nn

OPS = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)


def bn(C: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(C, affine=False, track_running_stats=False)


def relu_conv_bn(C_in: int, C_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(C_in, C_out, 1, bias=False), bn(C_out))


def dil_conv(C: int, k: int, stride: int, pad: int, dil: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(C, C, k, stride, pad, dilation=dil, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False), bn(C),
    )


def sep_conv(C: int, k: int, stride: int, pad: int) -> nn.Sequential:
    return nn.Sequential(dil_conv(C, k, stride, pad, 1), dil_conv(C, k, 1, pad, 1))


class Zero(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FactorizedReduce(nn.Module):
    def __init__(self, C_in: int, C_out: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = bn(C_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def make_op(name: str, C: int, stride: int) -> nn.Module:
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride, 1), bn(C))
    if name == "avg_pool_3x3":
        return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False), bn(C))
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C)
    if name.startswith("sep_conv_"):
        k = int(name[-1])
        return sep_conv(C, k, stride, k // 2)
    if name.startswith("dil_conv_"):
        k = int(name[-1])
        return dil_conv(C, k, stride, k - 1, 2)
    raise ValueError(f"reference supernet has no op {name!r}")


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList(make_op(n, C, stride) for n in OPS)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(wi * op(x) for wi, op in zip(w, self.ops, strict=True))


class Cell(nn.Module):
    def __init__(self, nodes: int, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else relu_conv_bn(C_pp, C)
        self.preprocess1 = relu_conv_bn(C_p, C)
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1)
            for i in range(nodes) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            s = sum(self.edges[offset + j](h, w[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.nodes:], dim=1)


class ReferenceSuperNet(nn.Module):
    """``forward(x, weights)`` with ``weights = {"normal": (E, 8), "reduce": (E, 8)}``."""

    def __init__(self, C: int, num_classes: int, layers: int, nodes: int = 4,
                 in_channels: int = 3, stem_multiplier: int = 3) -> None:
        super().__init__()
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(nodes, C_pp, C_p, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_pp, C_p = C_p, nodes * C_curr
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: torch.Tensor, weights) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights["reduce" if cell.reduction else "normal"])
        return self.classifier(self.pool(s1).flatten(1))
