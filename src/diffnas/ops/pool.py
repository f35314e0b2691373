"""Pooling ops. DARTS pools carry no BN in fixed networks; the search supernet appends an
affine-free BN to them (see ``diffnas.supernet.mixed``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.ops.registry import register_op


class AvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that runs NCHW on padded CUDA channels-last inputs (and answers in
    channels-last): torch's NHWC CUDA average-pool backward omits the padding offset and
    returns silently wrong input gradients when padding > 0 (pytorch/pytorch#188344; seen
    with torch 2.11 on an H100: relative error ~1, float32 and float64 alike, while the
    NCHW result matches the CPU). The CPU kernels are not affected."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = self.padding not in (0, (0, 0))
        if not (padded and x.is_cuda and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        y = F.avg_pool2d(x.contiguous(), self.kernel_size, self.stride, self.padding,
                         self.ceil_mode, self.count_include_pad, self.divisor_override)
        return y.contiguous(memory_format=torch.channels_last)


@register_op("max_pool_3x3")
def _max3(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.MaxPool2d(3, stride=stride, padding=1)


@register_op("avg_pool_3x3")
def _avg3(C: int, stride: int, affine: bool) -> nn.Module:
    return AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
