"""Once-differentiable memory savers of the search supernet, and the switch that turns
them off where second derivatives are taken.

The DARTS supernet keeps, for backward, the activations of every candidate op on every
edge. The autograd functions here keep less (an op's input instead of its intermediate
outputs, narrow max-pool indices) and recompute the rest in backward, only where a gradient
needs it. Their backwards are not themselves differentiable: code that differentiates
twice (exact Hessian products, iDARTS, Hessian eigenvalues) builds its loss inside
:func:`twice_differentiable`, where the supernet takes plain autograd. The channels-last
layout helpers they rely on (``is_channels_last``, ``stem_channels_last``) live here too.
Measurements: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    if _HOOKS_UNTRACED and torch.compiler.is_compiling():  # skip_hooks_when_compiling
        return t
    if memory_format is None:
        memory_format = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    # autograd may hand a hook an undefined gradient (None), e.g. from a custom Function
    t.register_hook(lambda g: None if g is None else g.contiguous(memory_format=memory_format))
    return t


_HOOKS_UNTRACED = False  # set by skip_hooks_when_compiling


def skip_hooks_when_compiling() -> bool:
    """Whether this torch's ``torch.compile`` breaks the graph at a hook on an intermediate
    tensor ('Compilation of intermediate hooks requires compiled autograd': torch 2.3 to 2.6
    at least; 2.13 traces it). There, a compiled backward fed the hook's re-laid-out
    gradient computes wrong weight gradients (measured: the compiled search's second step
    off by 5e-4 to 3e-3 in the loss), so :func:`dense_grad` adds no hook inside a compiled
    trace (it only speeds up eager CPU kernels). Probed once, before ``search.compile``
    compiles; returns whether the hooks are skipped."""
    global _HOOKS_UNTRACED
    from torch._dynamo.utils import counters

    def probe(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        y.register_hook(lambda g: g.contiguous())
        return y.sum()

    before = {k: dict(v) for k, v in counters.items()}  # the probe leaves no count behind
    try:
        _HOOKS_UNTRACED = torch._dynamo.explain(probe)(
            torch.ones(2, requires_grad=True)).graph_break_count > 0
    finally:
        counters.clear()
        for k, v in before.items():
            counters[k].update(v)
    return _HOOKS_UNTRACED


def is_channels_last(x: torch.Tensor) -> bool:
    """A dense channels-last 4-d tensor that is not also NCHW-contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
        x.is_contiguous()
    )


def stem_channels_last(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stem(x)`` run on and returned in channels-last layout (4-d tensors), so that the
    network after it runs NHWC. The layout is set on the output too: a 1-channel image
    (Fashion-MNIST) is NCHW- and channels-last-contiguous at once, and the stem conv then
    answers in NCHW."""
    def nhwc(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t

    return nhwc(stem(nhwc(x)))


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
    flip_pad = _flipped_padding(wd, h, stride, padding, dilation, groups)
    if need_h and flip_pad is not None:
        # a stride-1 depthwise conv's input gradient is the same conv of the output
        # gradient with the kernel flipped: oneDNN runs that forward kernel 1.3-1.7x faster
        # than its backward-data kernel, 4-8x for dilated kernels (benchmarks/README.md)
        gh = F.conv2d(gd, wd.flip(2, 3), None, 1, flip_pad, dilation, groups)
        need_h = False
    if need_dw and _polyphase_factor(wd, h, stride, padding, dilation, groups):
        # a dilated depthwise kernel's weight gradient as the plain kernel's on the d*d
        # phases of the image: 3-5x faster in oneDNN on CPU (benchmarks/README.md)
        gdw = _polyphase_weight_grad(gd, h, wd, dilation[0], groups)
        need_dw = False
    if need_dw and _slow_weight_grad_channels_last(wd, h, dilation):
        # oneDNN's channels-last weight gradient of a dilated depthwise kernel wider than
        # the image is 2-3x slower than the NCHW one, copies included (benchmarks/README.md)
        gdw = torch.ops.aten.convolution_backward(
            gd.contiguous(), h.contiguous(), wd, None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [False, True, False],
        )[1]
        need_dw = False
    if need_h or need_dw:
        gh2, gdw2, _ = torch.ops.aten.convolution_backward(
            gd, h, wd, None, list(stride), list(padding), list(dilation), False,
            [0, 0], groups, [need_h, need_dw, False],
        )
        gh = gh if gh2 is None else gh2
        gdw = gdw if gdw2 is None else gdw2
    return gh, gdw, gpw


def _polyphase_factor(
    w: torch.Tensor, h: torch.Tensor, stride: Any, padding: Any, dilation: Any, groups: int
) -> int:
    """The dilation ``d`` where a depthwise conv's weight gradient can be taken on the
    image's d*d phases, else 0. A stride-1 conv at dilation d with "same" padding
    d*(k-1)/2 only ever combines pixels whose coordinates agree modulo d: on each phase
    (``h[..., a::d, b::d]``) it is the plain k x k conv with padding (k-1)/2. Used on
    channels-last CPU tensors whose phases are at least as large as the kernel (oneDNN's
    plain kernels are fast there; smaller phases keep the NCHW detour)."""
    d = tuple(dilation)
    if (h.device.type != "cpu" or not is_channels_last(h) or tuple(stride) != (1, 1)
            or d[0] != d[1] or d[0] < 2 or w.shape[1] != 1 or groups != h.shape[1]):
        return 0
    for k, p, n in zip(w.shape[2:], padding, h.shape[2:], strict=True):
        if k % 2 == 0 or p != d[0] * (k - 1) // 2 or n % d[0] or n // d[0] < k:
            return 0
    return d[0]


def _phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor as its d*d phases stacked on the batch axis:
    (d*d*N, C, H/d, W/d), channels-last; phase (a, b) holds ``t[..., a::d, b::d]``."""
    n, c, hh, ww = t.shape
    u = t.permute(0, 2, 3, 1).reshape(n, hh // d, d, ww // d, d, c)
    u = u.permute(2, 4, 0, 1, 3, 5).reshape(d * d * n, hh // d, ww // d, c)
    return u.permute(0, 3, 1, 2)


def _polyphase_weight_grad(
    gd: torch.Tensor, h: torch.Tensor, w: torch.Tensor, d: int, groups: int
) -> torch.Tensor:
    """The weight gradient of ``conv2d(h, w, padding=d*(k-1)/2, dilation=d,
    groups=groups)`` with output gradient ``gd``, from the plain kernel's on the phases
    (see :func:`_polyphase_factor`)."""
    pad = [(k - 1) // 2 for k in w.shape[2:]]
    gp = _phases(gd.contiguous(memory_format=torch.channels_last), d)
    return torch.ops.aten.convolution_backward(
        gp, _phases(h, d), w, None, [1, 1], pad, [1, 1], False, [0, 0], groups,
        [False, True, False],
    )[1]


def _slow_weight_grad_channels_last(w: torch.Tensor, h: torch.Tensor, dilation: Any) -> bool:
    """A dilated kernel whose dilated extent exceeds the channels-last CPU input it
    convolves (a 5x5 kernel at dilation 2 on 8x8 maps)."""
    if h.device.type != "cpu" or tuple(dilation) == (1, 1) or not is_channels_last(h):
        return False
    extent = [d * (k - 1) + 1 for k, d in zip(w.shape[2:], dilation, strict=True)]
    return any(e > n for e, n in zip(extent, h.shape[2:], strict=True))


def _flipped_padding(
    w: torch.Tensor, h: torch.Tensor, stride: Any, padding: Any, dilation: Any, groups: int
) -> list[int] | None:
    """The padding under which ``conv2d(g, w.flip(2, 3))`` is the input gradient of the
    depthwise conv ``conv2d(h, w, stride, padding, dilation, groups)``; None where that
    identity does not hold (strided or non-depthwise convs, padding wider than the kernel)."""
    depthwise = w.shape[1] == 1 and groups == h.shape[1] and groups == w.shape[0]
    if tuple(stride) != (1, 1) or not depthwise:
        return None
    pads = [d * (k - 1) - p for k, p, d in zip(w.shape[2:], padding, dilation, strict=True)]
    return pads if min(pads) >= 0 else None


def _pointwise(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv ``conv2d(d, w)``; on a channels-last ``d`` as one matrix product
    (N*H*W, C_in) @ (C_in, C_out), which on CPU takes a third to a half of oneDNN's 1x1
    convolution time at the supernet's few channels (benchmarks/README.md)."""
    if not is_channels_last(d):
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
    if is_channels_last(g) and (d is None or is_channels_last(d)):
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
        fmt = torch.channels_last if is_channels_last(g) else torch.contiguous_format
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
        _once_differentiable("compact max-pool")
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
