"""Pooling ops. DARTS pools carry no BN in fixed networks; the search supernet appends an
affine-free BN to them (see ``diffnas.supernet.mixed``)."""

from __future__ import annotations

import torch
from torch import nn

from diffnas.ops.registry import register_op


@register_op("max_pool_3x3")
def _max3(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


@register_op("avg_pool_3x3")
def _avg3(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


def max_pool_compact(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``, keeping for backward the argmax positions as the narrowest integer type
    that holds them (int16 for planes up to 32,767 pixels) instead of int64.

    The search supernet runs a max-pool on every edge, and its int64 indices are twice the
    size of its float output: at the paper's search shapes they are about a tenth of the
    memory kept for backward. Once differentiable (like ``BNReLUConv``); callers check
    ``memory_savers_allowed()`` first. Other pool settings fall back to ``pool(x)``.
    """
    if pool.return_indices or pool.ceil_mode or x.dim() != 4:
        return pool(x)
    return _CompactMaxPool.apply(x, pool.kernel_size, pool.stride, pool.padding,
                                 pool.dilation)


def _index_dtype(plane: int) -> torch.dtype:
    for dtype in (torch.int16, torch.int32):
        if plane <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class _CompactMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation):  # type: ignore[override]
        out, idx = torch.ops.aten.max_pool2d_with_indices(
            x, _pair(kernel), _pair(stride), _pair(padding), _pair(dilation), False
        )
        ctx.save_for_backward(idx.to(_index_dtype(x.shape[-2] * x.shape[-1])))
        ctx.conf = (x.shape, x.stride(), x.dtype, _pair(kernel), _pair(stride),
                    _pair(padding), _pair(dilation))
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the search supernet's compact max-pool is differentiable once; build the "
                "loss inside diffnas.ops.twice_differentiable() to take second derivatives"
            )
        (idx,) = ctx.saved_tensors
        shape, stride, dtype, kernel, pstride, padding, dilation = ctx.conf
        # the backward kernel reads only the input's shape and layout, not its values
        x = torch.empty_strided(shape, stride, dtype=dtype, device=g.device)
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            g, x, kernel, pstride, padding, dilation, False, idx.long()
        )
        return gx, None, None, None, None


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]
