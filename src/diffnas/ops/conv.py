"""Convolutional DARTS ops (ReLU-Conv-BN ordering) and the ops shared with NAS-Bench-201."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffnas.ops.registry import register_op


def batch_norm(C: int, affine: bool) -> nn.BatchNorm2d:
    """BatchNorm used inside ops. Search-time networks (affine=False) also drop running
    statistics: they always normalise by the batch, so the supernet carries no state
    besides its weights, unrolled/perturbed passes have no side effects, and results are
    reproducible on resume."""
    return nn.BatchNorm2d(C, affine=affine, track_running_stats=affine)


_STATE = threading.local()


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Forward passes inside take plain autograd paths only, so their graphs can be
    differentiated twice (double backward: exact Hessian products, iDARTS, Hessian
    eigenvalues). Outside, the search supernet may use once-differentiable memory savers."""
    before = getattr(_STATE, "twice", False)
    _STATE.twice = True
    try:
        yield
    finally:
        _STATE.twice = before


def memory_savers_allowed() -> bool:
    """Autograd is recording and no caller asked for a twice-differentiable graph."""
    return torch.is_grad_enabled() and not getattr(_STATE, "twice", False)


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

    def forward_preact(
        self, x: torch.Tensor, x_nchw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN).
        ``x_nchw``: ``x`` as an NCHW-contiguous copy, if the caller already made one."""
        dw = self[1]
        if slow_channels_last(dw, x):
            # oneDNN's CPU depthwise conv with both stride and dilation is about twice as
            # slow on channels-last tensors as on NCHW ones (benchmarks/README.md): take
            # the NCHW path for this conv and return to channels-last for the rest.
            x = x.contiguous() if x_nchw is None else x_nchw
            return self[2](dw(x).contiguous(memory_format=torch.channels_last))
        return self[2](dw(x))


def slow_channels_last(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A strided, dilated conv on a channels-last CPU tensor (slow in oneDNN)."""
    return (
        x.device.type == "cpu" and conv.stride != (1, 1) and conv.dilation != (1, 1)
        and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
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

    def forward_preact(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """Pre-BN output for an input already passed through ReLU (see ReLUConvBN).

        With autograd recording (and outside :func:`twice_differentiable`), the middle
        BN -> ReLU -> depthwise runs as one autograd function that keeps the BN's output
        instead of its input and the ReLU's output (:class:`BNReLUConv`): two activations
        fewer per op, no extra work. ``recompute`` keeps only the first depthwise output
        and recomputes the rest up to the final BN in backward: three fewer, for a
        recomputation. The weights go into both as inputs, so under
        ``torch.func.functional_call`` the substituted weights are the ones used."""
        first, second = self[0], self[1]
        if not (memory_savers_allowed() and stateless_bn(first[3])):
            h = first[3](first.forward_preact(x))
            return second.forward_preact(torch.relu(h))
        if recompute:
            a = first[1](x)
            return checkpoint(
                _sep_tail, a, first[2].weight, second[1].weight, second[2].weight, first[3],
                second[1], use_reentrant=False,
            )
        dw = second[1]
        c = BNReLUConv.apply(
            first.forward_preact(x), dw.weight, first[3].eps, dw.stride, dw.padding,
            dw.dilation, dw.groups,
        )
        return second[2](c)


class BNReLUConv(torch.autograd.Function):
    """``conv2d(relu(bn(b)), w)`` for an affine-free BN on batch statistics, keeping for
    backward the BN output ``y`` and the per-channel ``invstd`` instead of ``b`` and
    ``relu(y)`` (the in-place-ABN idea: an affine-free BN is invertible, and its input
    gradient needs only the normalized values). ``relu(y)`` is recomputed in backward.

    Once differentiable: the saved ``y`` has no graph to ``b``, so a double backward
    raises; :func:`twice_differentiable` switches the supernet to plain autograd."""

    @staticmethod
    def forward(ctx, b, w, eps, stride, padding, dilation, groups):  # type: ignore[override]
        y, _, invstd = torch.ops.aten.native_batch_norm(b, None, None, None, None, True, 0.0, eps)
        c = F.conv2d(torch.relu(y), w, None, stride, padding, dilation, groups)
        ctx.save_for_backward(y, invstd, w)
        ctx.conf = (stride, padding, dilation, groups, eps)
        return c

    @staticmethod
    def backward(ctx, gc):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the search supernet's memory-saving BN-ReLU-conv path is differentiable "
                "once; build the loss inside diffnas.ops.twice_differentiable() to take "
                "second derivatives"
            )
        y, invstd, w = ctx.saved_tensors
        stride, padding, dilation, groups, eps = ctx.conf
        need_b, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The architecture step asks only for alpha gradients: skip the conv weight
        # gradient when this backward will not use it (built-in ops do the same).
        need_w = need_w and _engine_will_use(ctx, 1)
        # under autocast the forward conv ran in gc's dtype (bf16/fp16), the BN in y's
        h, wc = torch.relu(y).to(gc.dtype), w.to(gc.dtype)
        gh, gw, _ = torch.ops.aten.convolution_backward(
            gc, h, wc, None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_b, need_w, False],
        )
        del h
        gb = None
        if need_b:
            gy = gh.to(y.dtype).masked_fill_(y <= 0, 0.0)
            # with mean 0 and invstd 1 the BN backward sees y as its normalized input;
            # the true input gradient is that result times invstd, per channel
            gb = torch.ops.aten.native_batch_norm_backward(
                gy, y, None, None, None, torch.zeros_like(invstd), torch.ones_like(invstd),
                True, eps, [True, False, False],
            )[0]
            gb.mul_(invstd.view(1, -1, 1, 1))
        return gb, gw, None, None, None, None, None


def _engine_will_use(ctx: Any, i: int) -> bool:
    """Whether the running backward pass uses the gradient of input ``i`` of a custom
    function (``ctx`` is its graph node); True when torch cannot tell."""
    try:
        node = ctx.next_functions[i][0]
        return node is not None and bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError, IndexError):
        return True


def _sep_tail(
    a: torch.Tensor, w_pw1: torch.Tensor, w_dw: torch.Tensor, w_pw2: torch.Tensor,
    bn: nn.Module, dw: nn.Conv2d,
) -> torch.Tensor:
    """SepConv after its first depthwise conv, up to the final BN (weights explicit)."""
    h = torch.relu(bn(F.conv2d(a, w_pw1)))
    h = F.conv2d(h, w_dw, None, dw.stride, dw.padding, dw.dilation, dw.groups)
    return F.conv2d(h, w_pw2)


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
        return torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1)


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
