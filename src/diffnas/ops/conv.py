"""Convolutional DARTS ops (ReLU-Conv-BN ordering) and the ops shared with NAS-Bench-201."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.ops.registry import register_op
from diffnas.ops.savers import (
    BNReLUConv,
    DwPwConv,
    dense_grad,
    is_channels_last,
    memory_savers_allowed,
)


def batch_norm(C: int, affine: bool) -> nn.BatchNorm2d:
    """BatchNorm used inside ops. Search-time networks (affine=False) also drop running
    statistics: they always normalise by the batch, so the ops carry no state besides
    their weights and unrolled/perturbed passes change nothing in them. (The supernets'
    stem, and NB-201's residual blocks, keep ordinary BatchNorms, whose statistics the
    search never reads.)"""
    return nn.BatchNorm2d(C, affine=affine, track_running_stats=affine)


def stateless_bn(m: nn.Module) -> bool:
    """An affine-free BN without running statistics: a pure function of its input, so it
    can be recomputed in backward and ``w * bn(h)`` equals a batch norm with weight ``w``."""
    return isinstance(m, nn.BatchNorm2d) and not m.affine and not m.track_running_stats


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv -> BN, the building block of every DARTS conv op."""

    def __init__(
        self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool,
        dilation: int = 1,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride, padding, dilation=dilation, bias=False),
            batch_norm(C_out, affine),
        )

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """The output before the final BN, for an input already passed through ReLU (the
        search supernet shares that ReLU between the ops of an edge and fuses the BN with
        the op's mixing weight)."""
        return self[1](x)


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN."""

    def __init__(
        self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int,
        affine: bool,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel, stride, padding, dilation=dilation, groups=C_in,
                      bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            batch_norm(C_out, affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU -> conv -> 1x1 -> BN, as a retrain network runs it. A conv with stride d
        at dilation d reads only ``x[..., ::d, ::d]`` and runs as the plain conv of that
        phase (see :func:`phase_only`); on CPU a stride-1 dilated conv runs through
        :class:`DwPwConv` (input gradient as a forward conv, weight gradient on the
        image's phases). Same numbers, far faster CPU backward kernels."""
        dw = self[1]
        d = phase_only(dw)
        if d:
            h = F.conv2d(self[0](phase_subsample(x, d)), dw.weight, None, 1,
                         _phase_padding(dw), 1, dw.groups)
            return self[3](self[2](h))
        if (x.device.type == "cpu" and dw.stride == (1, 1) and dw.dilation != (1, 1)
                and memory_savers_allowed()):  # measured on CPU only
            h = DwPwConv.apply(self[0](x), dw.weight, self[2].weight, dw.stride,
                               dw.padding, dw.dilation, dw.groups, False)
            return self[3](h)
        return super().forward(x)

    def forward_preact(
        self, x: torch.Tensor, x_nchw: torch.Tensor | None = None,
        x_phase: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN).
        ``x_nchw``: ``x`` as an NCHW-contiguous copy, if the caller already made one;
        ``x_phase``: ``phase_subsample(x, d)`` for a conv that reads only that phase
        (:func:`phase_only`), if the caller already made it."""
        dw = self[1]
        stride, padding, dilation = dw.stride, dw.padding, dw.dilation
        d = phase_only(dw)
        if d:
            # stride d at dilation d reads only x[..., ::d, ::d]: the plain conv of that
            # phase at stride 1 (the same numbers; oneDNN's CPU backward kernels for
            # stride and dilation together are 3-40x slower, benchmarks/README.md)
            x = phase_subsample(x, d) if x_phase is None else x_phase
            stride, padding, dilation = (1, 1), _phase_padding(dw), (1, 1)
        slow = not d and slow_channels_last(dw, x)
        if slow:
            # oneDNN's CPU depthwise conv with both stride and dilation is about twice as
            # slow on channels-last tensors as on NCHW ones (benchmarks/README.md): take
            # the NCHW path for this conv and return to channels-last for the rest.
            x = x.contiguous() if x_nchw is None else x_nchw
        if memory_savers_allowed():
            return DwPwConv.apply(x, dw.weight, self[2].weight, stride, padding, dilation,
                                  dw.groups, slow)
        y = F.conv2d(x, dw.weight, None, stride, padding, dilation, dw.groups)
        if slow:
            y = dense_grad(y, torch.contiguous_format)
            return self[2](y.contiguous(memory_format=torch.channels_last))
        return self[2](y)


def phase_only(conv: nn.Conv2d) -> int:
    """``d`` for a conv with stride d, dilation d > 1 and padding d*(k-1)/2 (the DARTS
    dilated convs of a reduction cell): each output pixel then reads only input pixels
    whose coordinates are multiples of d, so the conv equals the plain k x k conv (stride
    1, padding (k-1)/2) of ``x[..., ::d, ::d]``, output size included. 0 otherwise."""
    s, dil, p, k = conv.stride, conv.dilation, conv.padding, conv.kernel_size
    if s[0] != s[1] or s != dil or s[0] < 2 or isinstance(p, str):
        return 0
    if any(kk % 2 == 0 or pp != s[0] * (kk - 1) // 2 for kk, pp in zip(k, p, strict=True)):
        return 0
    return s[0]


def _phase_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The padding of the plain conv that replaces a :func:`phase_only` one."""
    return tuple((k - 1) // 2 for k in conv.kernel_size)


def phase_subsample(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x[..., ::d, ::d]`` as a dense tensor in ``x``'s layout (channels-last stays)."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return x[:, :, ::d, ::d].contiguous(memory_format=fmt)


def slow_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A strided, dilated conv on a channels-last CPU tensor (slow in oneDNN)."""
    return (
        x.device.type == "cpu" and conv.stride != (1, 1) and conv.dilation != (1, 1)
        and is_channels_last(x)
    )


class SepConv(nn.Sequential):
    """The DARTS separable convolution: a DilConv block (dilation 1) applied twice,
    the first carrying the stride."""

    def __init__(
        self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool
    ) -> None:
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN).

        With autograd recording (and outside :func:`twice_differentiable`), each half
        keeps only its input: the first (depthwise -> 1x1, :class:`DwPwConv`) the shared
        ReLU output, the second (BN -> ReLU -> depthwise -> 1x1, :class:`BNReLUConv`) the
        BN's output; the depthwise outputs are recomputed in backward when a weight
        gradient needs them. Four activations fewer per op than plain autograd. The
        weights go in as inputs, so under ``torch.func.functional_call`` the substituted
        weights are the ones used."""
        first, second = self[0], self[1]
        if not (memory_savers_allowed() and stateless_bn(first[3])):
            h = first[3](first.forward_preact(x))
            return second.forward_preact(torch.relu(h))
        dw = second[1]
        return BNReLUConv.apply(
            first.forward_preact(x), dw.weight, first[3].eps, dw.stride, dw.padding,
            dw.dilation, dw.groups, second[2].weight,
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The ``none`` op: zeros of the output shape (spatially strided)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve resolution with two offset stride-2 1x1 convs, concatenated on channels."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even C_out, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = batch_norm(C_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.forward_preact(self.relu(x)))

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN)."""
        # The second path sees the input shifted by one pixel; pad so odd sizes work.
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return torch.cat(
            [dense_grad(self.conv_1(x)), dense_grad(self.conv_2(shifted))], dim=1
        )


@register_op("none")
def _none(C: int, stride: int, affine: bool) -> nn.Module:
    return Zero(stride)


@register_op("skip_connect")
def _skip(C: int, stride: int, affine: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(C, C, affine)


@register_op("sep_conv_3x3")
def _sep3(C: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C, C, 3, stride, 1, affine)


@register_op("sep_conv_5x5")
def _sep5(C: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C, C, 5, stride, 2, affine)


@register_op("sep_conv_7x7")
def _sep7(C: int, stride: int, affine: bool) -> nn.Module:
    return SepConv(C, C, 7, stride, 3, affine)


@register_op("dil_conv_3x3")
def _dil3(C: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C, C, 3, stride, 2, 2, affine)


@register_op("dil_conv_5x5")
def _dil5(C: int, stride: int, affine: bool) -> nn.Module:
    return DilConv(C, C, 5, stride, 4, 2, affine)


class Conv7x1(nn.Sequential):
    """ReLU -> 1x7 conv -> 7x1 conv -> BN."""

    def __init__(self, C: int, stride: int, affine: bool) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            batch_norm(C, affine),
        )

    def forward_preact(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN)."""
        return self[2](self[1](x))


@register_op("conv_7x1_1x7")
def _conv7x1(C: int, stride: int, affine: bool) -> nn.Module:
    return Conv7x1(C, stride, affine)


# NAS-Bench-201's convolutions: plain ReLU-Conv-BN.
@register_op("nor_conv_1x1")
def _nor1(C: int, stride: int, affine: bool) -> nn.Module:
    return ReLUConvBN(C, C, 1, stride, 0, affine)


@register_op("nor_conv_3x3")
def _nor3(C: int, stride: int, affine: bool) -> nn.Module:
    return ReLUConvBN(C, C, 3, stride, 1, affine)
