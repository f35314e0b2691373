"""Mixed edges: every candidate op on one edge, combined with relaxed weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffnas.ops import create_op
from diffnas.ops.conv import batch_norm

MixedOpFactory = Callable[[int, int, Sequence[str]], nn.Module]


def search_op(name: str, C: int, stride: int) -> nn.Module:
    """An op as the DARTS supernet uses it: affine-free BN, and pools followed by BN so
    their output scale is comparable with the convolutions'."""
    op = create_op(name, C, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, batch_norm(C, affine=False))
    return op


class MixedOp(nn.Module):
    """sum_k w_k * op_k(x). The ``none`` op contributes exactly zero, so it is skipped; with
    ``active`` set (hard sampling, e.g. GDAS) only that one op is computed."""

    def __init__(self, C: int, stride: int, candidates: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        if all(c == "none" for c in self.candidates):
            raise ValueError("an edge needs at least one op besides 'none'")
        self.ops = nn.ModuleList(search_op(name, C, stride) for name in self.candidates)
        self.stride = stride
        self._live = [i for i, n in enumerate(self.candidates) if n != "none"]

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: int | None = None
    ) -> torch.Tensor:
        if active is not None:
            return weights[active] * self.ops[active](x)
        out = weights[self._live[0]] * self.ops[self._live[0]](x)
        for i in self._live[1:]:
            out = out + weights[i] * self.ops[i](x)
        return out


def default_mixed_op(C: int, stride: int, candidates: Sequence[str]) -> nn.Module:
    return MixedOp(C, stride, candidates)
