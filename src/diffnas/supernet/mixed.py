"""Mixed edges: every candidate op on one edge, combined with relaxed weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.ops import create_op
from diffnas.ops.conv import FactorizedReduce, Identity, batch_norm

MixedOpFactory = Callable[[int, int, Sequence[str]], nn.Module]


def search_op(name: str, C: int, stride: int) -> nn.Module:
    """An op as the DARTS supernet uses it: affine-free BN, and pools followed by BN so
    their output scale is comparable with the convolutions'."""
    op = create_op(name, C, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, batch_norm(C, affine=False))
    return op


def _plain_bn(m: nn.Module) -> bool:
    """An affine-free BN without running statistics: ``w * bn(h)`` equals a batch norm
    with constant weight ``w``, so the mixing weight can be fused into it."""
    return (
        isinstance(m, nn.BatchNorm2d) and not m.affine and not m.track_running_stats
    )


def _final_bn(op: nn.Module) -> nn.Module | None:
    if isinstance(op, FactorizedReduce):
        return op.bn
    if isinstance(op, nn.Sequential) and len(op):
        return _final_bn(op[-1])
    return op if isinstance(op, nn.modules.batchnorm._BatchNorm) else None


class MixedOp(nn.Module):
    """sum_k w_k * op_k(x). The ``none`` op contributes exactly zero, so it is skipped; with
    ``active`` set (hard sampling, e.g. GDAS) only that one op is computed.

    The fast path gives the same result as that sum (up to float rounding) with less work
    and memory: the ReLU that starts every convolution op is computed once per edge, and
    ``w_k * BN(h)`` (affine-free BN) is computed as one batch norm with weight ``w_k``, so
    neither the separate ReLU outputs nor the unweighted BN outputs are kept for backward.
    """

    def __init__(self, C: int, stride: int, candidates: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        if all(c == "none" for c in self.candidates):
            raise ValueError("an edge needs at least one op besides 'none'")
        self.ops = nn.ModuleList(search_op(name, C, stride) for name in self.candidates)
        self.stride = stride
        self._live = [i for i, n in enumerate(self.candidates) if n != "none"]
        # Plan of the fused forward: which ops share the ReLU, which end in a fusable BN.
        self._preact: list[int] = []  # ReLU -> body -> plain BN
        self._prenorm: list[int] = []  # body -> plain BN (the search pools)
        self._identity: list[int] = []
        self._other: list[int] = []
        for i in self._live:
            op = self.ops[i]
            bn = _final_bn(op)
            if hasattr(op, "forward_preact") and bn is not None and _plain_bn(bn):
                self._preact.append(i)
            elif isinstance(op, nn.Sequential) and len(op) == 2 and _plain_bn(op[1]):
                self._prenorm.append(i)
            elif isinstance(op, Identity):
                self._identity.append(i)
            else:
                self._other.append(i)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: int | None = None
    ) -> torch.Tensor:
        if active is not None:
            return weights[active] * self.ops[active](x)
        out: torch.Tensor | None = None
        terms: list[torch.Tensor] = []
        if self._preact:
            r = torch.relu(x)
            for i in self._preact:
                op = self.ops[i]
                terms.append(_weighted_bn(op.forward_preact(r), _final_bn(op), weights[i]))
        for i in self._prenorm:
            op = self.ops[i]
            terms.append(_weighted_bn(op[0](x), op[1], weights[i]))
        for i in self._identity:
            terms.append(weights[i] * x)
        for i in self._other:
            terms.append(weights[i] * self.ops[i](x))
        for t in terms:
            out = t if out is None else out + t
        return out


def _weighted_bn(h: torch.Tensor, bn: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w * bn(h)`` for an affine-free, stat-free BN, as one batch-norm call."""
    if not _plain_bn(bn):  # swapped after construction (e.g. SyncBatchNorm): call it
        return w * bn(h)
    # contiguous(): torch's CPU batch-norm backward on channels-last inputs computes a
    # wrong input gradient for a stride-0 (expanded) weight (seen with torch 2.13).
    weight = w.expand(h.shape[1]).contiguous()
    return F.batch_norm(h, None, None, weight, None, True, 0.0, bn.eps)


def default_mixed_op(C: int, stride: int, candidates: Sequence[str]) -> nn.Module:
    return MixedOp(C, stride, candidates)
