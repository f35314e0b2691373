"""Pooling ops. DARTS pools carry no BN in fixed networks; the search supernet appends an
affine-free BN to them (see ``diffnas.supernet.mixed``)."""

from __future__ import annotations

from torch import nn

from diffnas.ops.registry import register_op


@register_op("max_pool_3x3")
def _max3(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


@register_op("avg_pool_3x3")
def _avg3(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
