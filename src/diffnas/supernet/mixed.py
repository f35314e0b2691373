"""Mixed edges: every candidate op on one edge, combined with relaxed weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffnas.ops import create_op
from diffnas.ops.conv import (
    DilConv,
    FactorizedReduce,
    Identity,
    batch_norm,
    phase_only,
    phase_subsample,
    slow_channels_last,
    stateless_bn,
)
from diffnas.ops.savers import dense_grad, max_pool_compact, memory_savers_allowed

MixedOpFactory = Callable[[int, int, Sequence[str]], nn.Module]


def search_op(name: str, C: int, stride: int) -> nn.Module:
    """An op as the DARTS supernet uses it: affine-free BN, and pools followed by BN so
    their output scale is comparable with the convolutions'."""
    op = create_op(name, C, stride, affine=False)
    if "pool" in name:
        op = nn.Sequential(op, batch_norm(C, affine=False))
    return op


def unsampled_weights(weights: torch.Tensor, active: int) -> torch.Tensor:
    """The ops' weights but the sampled one's, as a term exactly zero in value: added to an
    edge's output it gives each unsampled op the gradient ``sum(dL/d out)`` rather than
    none (the GDAS authors' NAS-Bench-201 cell; their DARTS-space cell gives none)."""
    rest = weights.sum() - weights[active]
    return rest - rest.detach()


def sampled_op_output(ops: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor,
                      active: int) -> torch.Tensor:
    """GDAS's edge: only the sampled op is computed, ``w[a] * op_a(x)``, plus
    :func:`unsampled_weights` (zero in value under the straight-through one-hot)."""
    return weights[active] * ops[active](x) + unsampled_weights(weights, active)


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
    and memory: the ReLU that starts every convolution op is computed once per edge input
    (shared by all edges reading the same node, see ``forward``), and ``w_k * BN(h)``
    (affine-free BN) is computed as one batch norm with weight ``w_k``, so neither the
    separate ReLU outputs nor the unweighted BN outputs are kept for backward. Outside
    ``twice_differentiable()`` the conv ops keep only their inputs and BN outputs (their
    depthwise outputs are recomputed when a weight gradient needs them, see
    ``SepConv.forward_preact``) and the max-pool keeps int16 indices.

    ``recompute`` (set by the supernet) trades time for memory: the pool -> BN branches
    keep nothing for backward (their output and the max-pool's indices are recomputed from
    the edge input, which is kept anyway). They have no parameters, so the result and the
    gradients are unchanged.
    """

    recompute: bool = False

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
            if hasattr(op, "forward_preact") and bn is not None and stateless_bn(bn):
                self._preact.append(i)
            elif isinstance(op, nn.Sequential) and len(op) == 2 and stateless_bn(op[1]):
                self._prenorm.append(i)
            elif isinstance(op, Identity):
                self._identity.append(i)
            else:
                self._other.append(i)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: int | None = None,
        shared: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``shared``: a dict the caller passes to every edge that reads this same ``x`` in
        one forward pass (the cell does, one per node). ``relu(x)`` and its NCHW copy are
        computed once, kept there and reused, instead of once per edge."""
        if active is not None:
            return sampled_op_output(self.ops, x, weights, active)
        out: torch.Tensor | None = None
        terms: list[torch.Tensor] = []
        savers = memory_savers_allowed()
        recompute = self.recompute and savers
        shared = {} if shared is None else shared
        if self._preact:
            if "relu" not in shared:
                shared["relu"] = torch.relu(x)
            r = shared["relu"]
            for i in self._preact:
                op = self.ops[i]
                d = phase_only(op[1]) if isinstance(op, DilConv) else 0
                if d:
                    key = f"relu_phase{d}"
                    if key not in shared:  # one subsampled copy for the dilated convs
                        shared[key] = phase_subsample(r, d)
                        dense_grad(r)  # the slice's gradient back to r's layout
                    h = op.forward_preact(r, x_phase=shared[key])
                elif isinstance(op, DilConv) and slow_channels_last(op[1], r):
                    if "relu_nchw" not in shared:  # one NCHW copy for the dilated convs
                        shared["relu_nchw"] = r.contiguous()
                        dense_grad(r)  # its NCHW gradient back to r's layout
                    h = op.forward_preact(r, shared["relu_nchw"])
                else:
                    h = op.forward_preact(r)
                terms.append(_weighted_bn(h, _final_bn(op), weights[i]))
        for i in self._prenorm:
            op = self.ops[i]
            if recompute and stateless_bn(op[1]) and not any(True for _ in op.parameters()):
                # no randomness inside: no RNG state to stash (a CUDA-graph capture
                # refuses reading it)
                terms.append(checkpoint(_pool_bn, x, weights[i], op, use_reentrant=False,
                                        preserve_rng_state=False))
            else:
                terms.append(_pool_bn(x, weights[i], op, compact=savers))
        for i in self._identity:
            terms.append(weights[i] * x)
        for i in self._other:
            terms.append(weights[i] * self.ops[i](x))
        for t in terms:
            out = t if out is None else out + t
        return out


def _pool_bn(
    x: torch.Tensor, w: torch.Tensor, op: nn.Sequential, compact: bool = False
) -> torch.Tensor:
    """``w * bn(pool(x))`` of a search pool (``op`` = pool, plain BN); ``compact``: a
    max-pool keeps narrow indices (``max_pool_compact``)."""
    pool = op[0]
    h = max_pool_compact(pool, x) if compact and isinstance(pool, nn.MaxPool2d) else pool(x)
    return _weighted_bn(h, op[1], w)


def _weighted_bn(h: torch.Tensor, bn: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w * bn(h)`` for an affine-free, stat-free BN, as one batch-norm call."""
    if not stateless_bn(bn):  # swapped after construction (e.g. SyncBatchNorm): call it
        return w * bn(h)
    # contiguous(): torch's CPU batch-norm backward on channels-last inputs computes a
    # wrong input gradient for a stride-0 (expanded) weight (seen with torch 2.13).
    if w.dtype != h.dtype and h.dtype not in (torch.bfloat16, torch.float16):
        # ``w * bn(h)`` takes h's dtype (a 0-d weight does not promote); the batch-norm
        # kernel refuses a float32 weight on float64 input (and the reverse) instead.
        # Reduced-precision input (autocast) keeps its float32 weight, which it accepts.
        w = w.to(h.dtype)
    weight = w.expand(h.shape[1]).contiguous()
    return F.batch_norm(h, None, None, weight, None, True, 0.0, bn.eps)


def default_mixed_op(C: int, stride: int, candidates: Sequence[str]) -> nn.Module:
    return MixedOp(C, stride, candidates)
