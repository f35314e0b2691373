"""An op plugin (docs/extending.md, "An op"): a 5x5 depthwise-separable conv."""

from torch import nn

from diffnas.ops import register_op
from diffnas.ops.conv import batch_norm


@register_op("dw_conv_5x5")
def dw_conv_5x5(C: int, stride: int, affine: bool) -> nn.Module:
    # C channels in, C out; stride 2 halves the side, rounding up (padding = kernel // 2)
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(C, C, 5, stride, 2, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False),
        batch_norm(C, affine),  # affine=False in the search supernet, True when retraining
    )
