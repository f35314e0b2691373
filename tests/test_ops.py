"""Every registered CNN op: shapes at stride 1 and 2, backward, finite values."""

from __future__ import annotations

import pytest
import torch

from diffnas.ops import OPS, create_op
from diffnas.registry import UnknownNameError


@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_op_shape_backward_finite(name, stride, affine):
    torch.manual_seed(0)
    C = 4
    op = create_op(name, C, stride, affine)
    x = torch.randn(3, C, 9, 9, requires_grad=True)  # odd size: checks padding at stride 2
    y = op(x)
    assert y.shape == (3, C, 5 if stride == 2 else 9, 5 if stride == 2 else 9)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    if name != "none":
        assert x.grad.abs().sum() > 0  # the op actually depends on its input
    for p in op.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_none_is_zero_and_skip_is_identity():
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(create_op("none", 4, 1)(x), torch.zeros_like(x))
    assert torch.equal(create_op("skip_connect", 4, 1)(x), x)


def test_avg_pool_excludes_padding():
    x = torch.ones(1, 1, 4, 4)
    assert torch.allclose(create_op("avg_pool_3x3", 1, 1)(x), x)  # borders stay 1, not 4/9


def test_sep_conv_applies_separable_block_twice():
    op = create_op("sep_conv_3x3", 4, 1, True)
    depthwise = [m for m in op.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 4]
    assert len(depthwise) == 2


def test_dil_conv_has_dilation_two():
    op = create_op("dil_conv_5x5", 4, 1, True)
    convs = [m for m in op.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 4]
    assert [c.dilation for c in convs] == [(2, 2)]


@pytest.mark.parametrize("stride", [0, 3])
def test_a_stride_the_ops_do_not_keep_to_is_refused(stride):
    # skip_connect would have reduced by 2 while sep_conv_3x3 reduced by 3
    with pytest.raises(ValueError, match=f"stride {stride} is not supported"):
        create_op("skip_connect", 4, stride)


def test_unknown_op_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown op 'conv_9x9'.*sep_conv_3x3"):
        create_op("conv_9x9", 4, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_gradient_on_cuda_channels_last_matches_cpu(stride):
    # torch's NHWC CUDA avg-pool backward ignores the padding (pytorch/pytorch#188344);
    # diffnas's avg_pool_3x3 takes the NCHW kernel there and must match the CPU gradient.
    pool = create_op("avg_pool_3x3", 8, stride)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, 8, generator=g, dtype=torch.float64)
    grads = []
    for device, fmt in (("cpu", torch.contiguous_format), ("cuda", torch.channels_last)):
        xd = x.to(device).contiguous(memory_format=fmt).requires_grad_()
        y = pool(xd)
        assert y.is_contiguous(memory_format=fmt)
        go = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(device)
        grads.append(torch.autograd.grad(y, xd, go)[0].cpu())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("name", ["skip_connect"])  # FactorizedReduce: its dense_grad
def test_stride_two_ops_pass_gradcheck_with_undefined_gradients(name):
    """gradcheck's default also feeds undefined (None) output gradients; the dense-gradient
    hooks of the memory-saving ops must pass them on, not fail on them."""
    torch.manual_seed(0)
    op = create_op(name, 2, 2, affine=True).double()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 2, 6, 6, dtype=torch.float64).to(memory_format=layout)
        assert torch.autograd.gradcheck(op, (x.requires_grad_(),))
