"""Convolutional DARTS ops (ReLU-Conv-BN ordering) and the ops shared with NAS-Bench-201."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
        slow = slow_channels_last(dw, x)
        if slow:
            # oneDNN's CPU depthwise conv with both stride and dilation is about twice as
            # slow on channels-last tensors as on NCHW ones (benchmarks/README.md): take
            # the NCHW path for this conv and return to channels-last for the rest.
            x = x.contiguous() if x_nchw is None else x_nchw
        if memory_savers_allowed():
            return DwPwConv.apply(x, dw.weight, self[2].weight, dw.stride, dw.padding,
                                  dw.dilation, dw.groups, slow)
        if slow:
            y = dense_grad(dw(x), torch.contiguous_format)
            return self[2](y.contiguous(memory_format=torch.channels_last))
        return self[2](dw(x))


def dense_grad(
    t: torch.Tensor, memory_format: torch.memory_format | None = None
) -> torch.Tensor:
    """``t``, with the gradient that reaches it made dense (in ``memory_format``, default
    ``t``'s own layout) before it flows on to ``t``'s producer.

    Gradients of a concat's inputs are channel slices of the concat's gradient, and a
    layout conversion passes its gradient through unchanged; torch's CPU batch-norm,
    convolution and ReLU backward kernels take a generic path several times slower on
    such strided or mismatched gradients (a BN backward at 16x16x32x32: 2.3 ms instead of
    0.24 ms). One copy where the gradient arrives lets every consumer take the fast path.
    """
    if not (t.requires_grad and torch.is_grad_enabled() and t.dim() == 4):
        return t
    if memory_format is None:
        memory_format = (
            torch.channels_last
            if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            else torch.contiguous_format
        )
    t.register_hook(lambda g: g.contiguous(memory_format=memory_format))
    return t


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
        x.is_contiguous()
    )


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


class BNReLUConv(torch.autograd.Function):
    """``conv2d(relu(bn(b)), w)`` for an affine-free BN on batch statistics, followed by
    the 1x1 conv ``w_pw`` when given, keeping for backward only the BN output ``y`` and
    the per-channel ``invstd`` instead of ``b``, ``relu(y)`` and the depthwise output (the
    in-place-ABN idea: an affine-free BN is invertible, and its input gradient needs only
    the normalized values). ``relu(y)`` is recomputed in backward, the depthwise output
    only when ``w_pw``'s gradient is used (see :func:`_dw_pw_backward`).

    Once differentiable: the saved ``y`` has no graph to ``b``, so a double backward
    raises; :func:`twice_differentiable` switches the supernet to plain autograd."""

    @staticmethod
    def forward(ctx, b, w, eps, stride, padding, dilation, groups, w_pw=None):  # type: ignore[override]
        y, _, invstd = torch.ops.aten.native_batch_norm(b, None, None, None, None, True, 0.0, eps)
        c = F.conv2d(torch.relu(y), w, None, stride, padding, dilation, groups)
        if w_pw is not None:
            c = _pointwise(c, w_pw)
        ctx.save_for_backward(y, invstd, w, w_pw)
        ctx.conf = (stride, padding, dilation, groups, False)
        ctx.eps = eps
        return c

    @staticmethod
    def backward(ctx, gc):  # type: ignore[override]
        _once_differentiable("BN-ReLU-conv")
        y, invstd, w, w_pw = ctx.saved_tensors
        need_b = ctx.needs_input_grad[0]
        # under autocast the forward convs ran in gc's dtype (bf16/fp16), the BN in y's
        h = torch.relu(y).to(gc.dtype)
        # the architecture step asks for no weight gradient (see _engine_will_use)
        need_w = ctx.needs_input_grad[1] and _engine_will_use(ctx, 1)
        need_pw = w_pw is not None and ctx.needs_input_grad[7] and _engine_will_use(ctx, 2)
        gh, gw, gpw = _dw_pw_backward(ctx.conf, gc, h, w, w_pw, need_b, need_w, need_pw)
        gb = None
        if need_b:
            # ReLU backward from its output (2 passes fewer than a mask of y <= 0)
            gy = torch.ops.aten.threshold_backward(gh, h, 0).to(y.dtype)
            del h, gh
            # with mean 0 and invstd 1 the BN backward sees y as its normalized input;
            # the true input gradient is that result times invstd, per channel
            gb = torch.ops.aten.native_batch_norm_backward(
                gy, y, None, None, None, torch.zeros_like(invstd), torch.ones_like(invstd),
                True, ctx.eps, [True, False, False],
            )[0]
            gb.mul_(invstd.view(1, -1, 1, 1))
        return gb, gw, None, None, None, None, None, gpw


class DwPwConv(torch.autograd.Function):
    """``conv2d(conv2d(x, w_dw, ...), w_pw)``: a depthwise conv then a 1x1 conv, keeping
    for backward only ``x`` (in the supernet the edge's shared ReLU output, kept anyway)
    and not the depthwise output, which is recomputed in backward when ``w_pw``'s gradient
    is used (weight steps; an architecture step needs no weight gradient and recomputes
    nothing). ``channels_last_out``: the depthwise output goes to channels-last before the
    1x1 conv (``x`` is an NCHW copy taken for a slow channels-last kernel). Once
    differentiable, like :class:`BNReLUConv`."""

    @staticmethod
    def forward(ctx, x, w_dw, w_pw, stride, padding, dilation, groups, channels_last_out):  # type: ignore[override]
        d = F.conv2d(x, w_dw, None, stride, padding, dilation, groups)
        if channels_last_out:
            d = d.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, w_dw, w_pw)
        ctx.conf = (stride, padding, dilation, groups, channels_last_out)
        return _pointwise(d, w_pw)

    @staticmethod
    def backward(ctx, gc):  # type: ignore[override]
        _once_differentiable("depthwise-pointwise conv")
        x, w_dw, w_pw = ctx.saved_tensors
        need_x, need_dw, need_pw = ctx.needs_input_grad[:3]
        gx, gdw, gpw = _dw_pw_backward(
            ctx.conf, gc, x.to(gc.dtype), w_dw, w_pw, need_x,
            need_dw and _engine_will_use(ctx, 1), need_pw and _engine_will_use(ctx, 2),
        )
        return gx, gdw, gpw, None, None, None, None, None


def _once_differentiable(what: str) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the search supernet's memory-saving {what} path is differentiable once; "
            "build the loss inside diffnas.ops.twice_differentiable() to take second "
            "derivatives"
        )


def _dw_pw_backward(
    conf: tuple, gc: torch.Tensor, h: torch.Tensor, w_dw: torch.Tensor,
    w_pw: torch.Tensor | None, need_h: bool, need_dw: bool, need_pw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``pw(dw(h))`` (``pw`` optional) for the custom functions above, each
    only where needed. The depthwise output is recomputed only for ``w_pw``'s gradient:
    an architecture step, which needs no weight gradient, recomputes nothing."""
    stride, padding, dilation, groups, channels_last_out = conf
    wd = w_dw.to(gc.dtype)
    gpw = None
    gd = gc
    if w_pw is not None:
        d = None
        if need_pw:
            d = F.conv2d(h, wd, None, stride, padding, dilation, groups)
            if channels_last_out:
                d = d.contiguous(memory_format=torch.channels_last)
        shape = (gc.shape[0], w_dw.shape[0], *gc.shape[2:])
        gd, gpw = _pointwise_backward(gc, d, shape, w_pw.to(gc.dtype),
                                      need_h or need_dw, need_pw)
        del d
        if gd is not None and channels_last_out:
            gd = gd.contiguous()  # the depthwise conv ran on NCHW tensors
    gh = gdw = None
    if need_h or need_dw:
        gh, gdw, _ = torch.ops.aten.convolution_backward(
            gd, h, wd, None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_h, need_dw, False],
        )
    return gh, gdw, gpw


def _pointwise(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv ``conv2d(d, w)``; on a channels-last ``d`` as one matrix product
    (N*H*W, C_in) @ (C_in, C_out), which on CPU takes a third to a half of oneDNN's 1x1
    convolution time at the supernet's few channels (benchmarks/README.md)."""
    if not _is_channels_last(d):
        return F.conv2d(d, w)
    n, c, hh, ww = d.shape
    out = d.permute(0, 2, 3, 1).reshape(-1, c) @ w.view(w.shape[0], c).t()
    return out.view(n, hh, ww, w.shape[0]).permute(0, 3, 1, 2)


def _pointwise_backward(
    g: torch.Tensor, d: torch.Tensor | None, d_shape: tuple[int, ...], w: torch.Tensor,
    need_d: bool, need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`_pointwise` w.r.t. its input (of shape ``d_shape``) and its
    weight; ``d`` (the input) is needed only for the weight's."""
    if _is_channels_last(g) and (d is None or _is_channels_last(d)):
        n, c_out, hh, ww = g.shape
        g2 = g.permute(0, 2, 3, 1).reshape(-1, c_out)
        w2 = w.view(c_out, -1)
        gd = gw = None
        if need_d:
            gd = (g2 @ w2).view(n, hh, ww, -1).permute(0, 3, 1, 2)
        if need_w:
            gw = (g2.t() @ d.permute(0, 2, 3, 1).reshape(-1, w2.shape[1])).view_as(w)
        return gd, gw
    if d is None:  # only its shape and layout are read: allocated, never written
        fmt = torch.channels_last if _is_channels_last(g) else torch.contiguous_format
        d = torch.empty(d_shape, dtype=g.dtype, device=g.device, memory_format=fmt)
    gd, gw, _ = torch.ops.aten.convolution_backward(
        g, d, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_d, need_w, False]
    )
    return gd, gw


def _engine_will_use(ctx: Any, i: int) -> bool:
    """Whether the running backward pass uses the gradient of the ``i``-th *tensor*
    input of a custom function (``ctx`` is its graph node); True when torch cannot tell.
    A custom function's ``needs_input_grad`` is fixed at forward time, so without this an
    architecture step would compute every weight gradient (built-in ops skip them)."""
    try:
        node = ctx.next_functions[i][0]
        return node is not None and bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError, IndexError):
        return True


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
