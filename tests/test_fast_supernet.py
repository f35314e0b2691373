"""The optimized DARTS supernet against the plain reference supernet of the benchmarks
(every op computed, ``none`` included, ``w * op(x)`` summed): same weights, same alphas,
same outputs and gradients, for weights and alphas alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.ops.savers import is_channels_last
from diffnas.spaces import DataShape, create_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_supernet import ReferenceSuperNet  # noqa: E402

SHAPE = DataShape(in_channels=2, resolution=8, num_classes=5)
# the guard runs on a GPU too where one is present (CI has none: those cases skip)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def _exact_cuda_math(device: str):
    """No TF32 in CUDA convs and matmuls (it would dominate the float32 tolerance)."""
    import contextlib

    if device != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", before)
    return stack


def _pair(
    channels_last: bool, dtype: torch.dtype, layers: int = 3, nodes: int = 2,
    recompute: bool = False,
):
    space = create_space(
        {"name": "darts_cnn", "C": 4, "layers": layers, "nodes": nodes, "recompute": recompute},
        SHAPE,
    )
    torch.manual_seed(0)
    fast = space.build_supernet().to(dtype)
    fast.channels_last = channels_last
    ref = ReferenceSuperNet(4, 5, layers, nodes, in_channels=2).to(dtype)
    ref.load_state_dict(fast.state_dict())
    arch = ArchParams(space).to(dtype)
    with torch.no_grad():
        for p in arch.parameters():
            p.normal_(0, 1.0)
    return fast, ref, arch


def _grads(net, arch, x, y, via_arch_weights: bool):
    net.zero_grad(set_to_none=True)
    arch.zero_grad(set_to_none=True)
    w = {g: torch.softmax(a, -1) for g, a in arch.as_dict().items()}
    out = net(x, ArchWeights(w) if via_arch_weights else w)
    loss = torch.nn.functional.cross_entropy(out, y) + (out**2).mean()
    loss.backward()
    weight_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    alpha_grads = {g: a.grad.clone() for g, a in arch.as_dict().items()}
    return out.detach(), weight_grads, alpha_grads


@pytest.mark.parametrize(
    "channels_last,dtype,tol,recompute",
    [
        (False, torch.float64, 1e-10, False),
        (True, torch.float64, 1e-10, False),
        (True, torch.float32, 2e-4, False),
        (False, torch.float64, 1e-10, True),
        (True, torch.float64, 1e-10, True),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_fast_supernet_matches_reference(channels_last, dtype, tol, recompute, device):
    fast, ref, arch = _pair(channels_last, dtype, recompute=recompute)
    fast, ref, arch = fast.to(device), ref.to(device), arch.to(device)
    assert all(m.recompute == recompute for m in fast.modules() if hasattr(m, "_prenorm"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 8, 8, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 5, (6,), generator=g).to(device)
    with _exact_cuda_math(device):
        out_f, wg_f, ag_f = _grads(fast, arch, x, y, True)
        out_r, wg_r, ag_r = _grads(ref, arch, x, y, False)

    def close(a, b):
        return (a - b).norm().item() <= tol * max(b.norm().item(), 1e-12)

    assert close(out_f, out_r)
    assert wg_f.keys() == wg_r.keys()
    bad = [n for n in wg_r if not close(wg_f[n], wg_r[n])]
    rel = {n: f"{((wg_f[n] - wg_r[n]).norm() / wg_r[n].norm().clamp_min(1e-12)).item():.2e}"
           for n in bad}
    assert not bad, f"{len(bad)}/{len(wg_r)} weight gradients differ (relative error): " + \
        ", ".join(f"{n} {e}" for n, e in list(rel.items())[:8])
    for group in ag_r:
        assert ag_r[group].abs().sum() > 0  # the comparison is not vacuous
        assert close(ag_f[group], ag_r[group]), group


def test_guard_detects_a_wrong_weight():
    # The comparison above can fail: perturb one op's weight and the outputs part.
    fast, ref, arch = _pair(True, torch.float64)
    with torch.no_grad():
        fast.cells[0].edges[0].ops[4][0][1].weight.add_(0.1)  # sep_conv_3x3's depthwise
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    out_f, _, _ = _grads(fast, arch, x, y, True)
    out_r, _, _ = _grads(ref, arch, x, y, False)
    assert (out_f - out_r).abs().max() > 1e-6


@pytest.mark.parametrize("in_channels", [1, 2])
def test_channels_last_is_used_and_output_layout_free(in_channels):
    # A 1-channel NCHW image is also channels-last-contiguous, and the stem conv then
    # answers in NCHW: the cells must still run channels-last (strictly: not NCHW too).
    space = create_space({"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2},
                         DataShape(in_channels, 8, 5))
    fast, arch = space.build_supernet(), ArchParams(space)
    seen = []
    hook = fast.cells[0].edges[0].register_forward_hook(
        lambda m, i, o: seen.append((is_channels_last(i[0]), is_channels_last(o)))
    )
    w = ArchWeights({g: torch.softmax(a, -1) for g, a in arch.as_dict().items()})
    out = fast(torch.randn(2, in_channels, 8, 8), w)
    hook.remove()
    assert seen == [(True, True)] and out.shape == (2, 5)


@pytest.mark.parametrize("space_name", ["darts_cnn", "nb201"])
def test_channels_last_is_a_space_setting(space_name):
    from diffnas.genotype.published import published_genotype
    from diffnas.spaces.nb201 import ops_to_genotype

    small = {"darts_cnn": {"C": 4, "layers": 3, "nodes": 4}, "nb201": {"C": 4, "N": 1}}
    genotype = (published_genotype("DARTS_V2") if space_name == "darts_cnn"
                else ops_to_genotype(["nor_conv_3x3"] * 6))
    for space_value, net_value, expect_super, expect_net in [
        (None, None, True, True), (False, None, False, False), (False, True, False, True),
        (True, False, True, False),
    ]:
        section = {"name": space_name, **small[space_name]}
        if space_value is not None:
            section["channels_last"] = space_value
        space = create_space(section, DataShape(1, 8, 5))
        overrides = {} if net_value is None else {"channels_last": net_value}
        nets = {"super": space.build_supernet(),
                "net": space.build_network(genotype, **overrides)}
        assert nets["super"].channels_last is expect_super
        assert nets["net"].channels_last is expect_net
        seen: list[bool] = []
        nets["net"].cells[0].register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(is_channels_last(args[0])))
        nets["net"](torch.randn(2, 1, 8, 8))
        assert seen == [expect_net]


def test_paper_supernet_parameter_count():
    space = create_space({"name": "darts_cnn"}, DataShape(3, 32, 10))
    assert sum(p.numel() for p in space.build_supernet().parameters()) == 1_930_618
    ref = ReferenceSuperNet(16, 10, 8)
    assert sum(p.numel() for p in ref.parameters()) == 1_930_618


def _saved_bytes(net, arch, x) -> int:
    """Bytes autograd keeps for backward after one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    w = ArchWeights({g: torch.softmax(a, -1) for g, a in arch.as_dict().items()})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, w).sum()
    return sum(seen.values())


def test_recompute_keeps_less_for_backward():
    # The point of the option: the pool branches keep nothing for backward (their BN
    # inputs and max-pool indices, about a fifth of what the edges keep). Measured on the
    # same net with the switch flipped.
    fast, _, arch = _pair(True, torch.float32, nodes=4)
    x = torch.randn(8, 2, 8, 8)
    plain = _saved_bytes(fast, arch, x)
    fast.recompute = True
    less = _saved_bytes(fast, arch, x)
    assert less < 0.9 * plain, (less, plain)


def test_recompute_uses_functional_call_weights():
    # Second-order DARTS evaluates the supernet at substituted weights via functional_call;
    # with the pool branches recomputed, the gradients at those weights must not change.
    from torch.func import functional_call

    fast, _, arch = _pair(True, torch.float64, recompute=True)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    w = ArchWeights({g: torch.softmax(a, -1) for g, a in arch.as_dict().items()})
    params = {n: (p + 0.05 * torch.randn_like(p)).detach().requires_grad_()
              for n, p in fast.named_parameters()}
    grads = []
    for flag in (True, False):
        fast.recompute = flag
        out = functional_call(fast, params, (x, w))
        grads.append(torch.autograd.grad((out**2).sum(), list(params.values())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_recompute_counts_leading_cells_and_rejects_bad_values():
    fast, _, _ = _pair(True, torch.float32, layers=3, recompute=2)
    flags = [[m.recompute for m in cell.modules() if hasattr(m, "_prenorm")]
             for cell in fast.cells]
    assert [set(f) for f in flags] == [{True}, {True}, {False}]
    fast.recompute = True
    assert fast.recompute == 3
    for bad in (-1, 1.5, "yes"):
        with pytest.raises(ValueError, match="recompute"):
            fast.recompute = bad


def test_bn_relu_conv_matches_plain_autograd_and_refuses_double_backward():
    # SepConv's middle keeps the BN output instead of its input and the ReLU output;
    # its gradients must be those of the plain composition, in both layouts.
    import torch.nn.functional as F

    from diffnas.ops import twice_differentiable
    from diffnas.ops.savers import BNReLUConv

    def plain(b, w):
        y = F.batch_norm(b, None, None, None, None, True, 0.0, 1e-5)
        return F.conv2d(torch.relu(y), w, None, 2, 1, 1, 6)

    def saver(b, w):
        return BNReLUConv.apply(b, w, 1e-5, (2, 2), (1, 1), (1, 1), 6)

    g = torch.Generator().manual_seed(3)
    for layout in (torch.contiguous_format, torch.channels_last):
        b = torch.randn(4, 6, 9, 9, generator=g, dtype=torch.float64)
        b = b.contiguous(memory_format=layout).requires_grad_()
        w = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        gout = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.float64)
        got = torch.autograd.grad(saver(b, w), [b, w], gout)
        want = torch.autograd.grad(plain(b, w), [b, w], gout)
        for x, y in zip(got, want):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(saver, (b, w))
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        gb = torch.autograd.grad(saver(b, w).sum(), b, create_graph=True)[0]
        torch.autograd.grad(gb.sum(), w)
    # inside twice_differentiable() the supernet takes plain autograd and double backward works
    fast, _, arch = _pair(True, torch.float64)
    w_arch = ArchWeights({k: torch.softmax(a, -1) for k, a in arch.as_dict().items()})
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    params = list(fast.parameters())
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        gw = torch.autograd.grad((fast(x, w_arch) ** 2).sum(), params, create_graph=True)
        torch.autograd.grad(sum((t**2).sum() for t in gw), list(arch.parameters()))
    with twice_differentiable():
        out = fast(x, w_arch)
    gw = torch.autograd.grad((out**2).sum(), params, create_graph=True)
    hv = torch.autograd.grad(sum((t**2).sum() for t in gw), list(arch.parameters()))
    assert all(torch.isfinite(h).all() for h in hv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bn_relu_conv_under_bf16_autocast(layout, device):
    # GPU searches run under autocast: the conv inside the function runs in bf16 while the
    # saved weight is float32; backward must follow the forward's dtypes.
    import torch.nn.functional as F

    from diffnas.ops.savers import BNReLUConv, DwPwConv

    g = torch.Generator().manual_seed(4)
    b = torch.randn(4, 6, 9, 9, generator=g).to(device, torch.bfloat16)
    b = b.contiguous(memory_format=layout).requires_grad_()  # channels-last: 1x1 as matmul
    w = torch.randn(6, 1, 3, 3, generator=g).to(device).requires_grad_()
    w_pw = torch.randn(5, 6, 1, 1, generator=g).to(device).requires_grad_()

    def bn_relu(b):
        return torch.relu(F.batch_norm(b, None, None, None, None, True, 0.0, 1e-5))

    pairs = [  # (memory saver, plain autograd)
        (lambda: BNReLUConv.apply(b, w, 1e-5, (1, 1), (1, 1), (1, 1), 6),
         lambda: F.conv2d(bn_relu(b), w, None, 1, 1, 1, 6)),
        (lambda: BNReLUConv.apply(b, w, 1e-5, (1, 1), (1, 1), (1, 1), 6, w_pw),
         lambda: F.conv2d(F.conv2d(bn_relu(b), w, None, 1, 1, 1, 6), w_pw)),
        (lambda: DwPwConv.apply(b, w, w_pw, (2, 2), (1, 1), (1, 1), 6, False),
         lambda: F.conv2d(F.conv2d(b, w, None, 2, 1, 1, 6), w_pw)),
    ]
    for saver, plain in pairs:
        grads = []
        for fn in (saver, plain):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = fn()
            grads.append(torch.autograd.grad(out.float().square().sum(), [b, w, w_pw],
                                             allow_unused=True))
        for got, want in zip(*grads):
            if want is None:
                assert got is None or not got.abs().sum()
                continue
            assert got.dtype == want.dtype
            assert torch.allclose(got.float(), want.float(), rtol=0.05,
                                  atol=0.05 * want.abs().max())


def _dw_pw_plain(x, w_dw, w_pw, stride, padding, dilation, cl_out):
    import torch.nn.functional as F

    d = F.conv2d(x, w_dw, None, stride, padding, dilation, x.shape[1])
    if cl_out:
        d = d.contiguous(memory_format=torch.channels_last)
    return F.conv2d(d, w_pw)


@pytest.mark.parametrize(
    "layout,cl_out,stride,dilation",
    [
        (torch.contiguous_format, False, 1, 1),
        (torch.channels_last, False, 2, 1),
        (torch.channels_last, False, 1, 2),
        (torch.contiguous_format, True, 2, 2),  # the NCHW detour of strided dilated convs
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_dw_pw_conv_matches_plain_autograd(layout, cl_out, stride, dilation, device):
    # Depthwise -> 1x1 keeps only its input and recomputes the depthwise output in
    # backward: gradients must be those of the plain composition.
    from diffnas.ops.savers import DwPwConv

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64).to(device)
    x = x.contiguous(memory_format=layout).requires_grad_()
    w_dw = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w_pw = torch.randn(5, 4, 1, 1, generator=g, dtype=torch.float64).to(device).requires_grad_()
    pad = dilation

    def saver(x, w_dw, w_pw):
        return DwPwConv.apply(x, w_dw, w_pw, (stride, stride), (pad, pad),
                              (dilation, dilation), 4, cl_out)

    out = saver(x, w_dw, w_pw)
    want_out = _dw_pw_plain(x, w_dw, w_pw, stride, pad, dilation, cl_out)
    assert torch.allclose(out, want_out, rtol=1e-12, atol=1e-12)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, [x, w_dw, w_pw], gout)
    want = torch.autograd.grad(want_out, [x, w_dw, w_pw], gout)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(saver, (x, w_dw, w_pw))
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        gx = torch.autograd.grad(saver(x, w_dw, w_pw).sum(), x, create_graph=True)[0]
        torch.autograd.grad(gx.sum(), w_pw)


@pytest.mark.parametrize(
    "hw,kernel,dilation",
    [((8, 8), 3, 2), ((12, 16), 5, 2), ((9, 12), 3, 3), ((10, 10), 5, 2),
     ((8, 8), 5, 2), ((9, 8), 3, 2)],  # the last two: phases smaller than 5x5, odd size
)
def test_dilated_weight_gradient_on_phases_matches_plain_autograd(hw, kernel, dilation,
                                                                  monkeypatch):
    # A stride-1 dilated depthwise conv's weight gradient, taken as the plain kernel's on
    # the d*d phases of a channels-last CPU image, equals autograd's; the phase path is
    # the one taken (it is where the phases are at least as large as the kernel).
    from diffnas.ops import savers
    from diffnas.ops.savers import DwPwConv

    taken = []
    real = savers._polyphase_weight_grad
    monkeypatch.setattr(savers, "_polyphase_weight_grad",
                        lambda *a: taken.append(1) or real(*a))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w_dw = torch.randn(3, 1, kernel, kernel, generator=g, dtype=torch.float64,
                       requires_grad=True)
    w_pw = torch.randn(4, 3, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    pad = dilation * (kernel - 1) // 2
    out = DwPwConv.apply(x, w_dw, w_pw, (1, 1), (pad, pad), (dilation, dilation), 3, False)
    want_out = _dw_pw_plain(x, w_dw, w_pw, 1, pad, dilation, False)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [x, w_dw, w_pw], gout)
    want = torch.autograd.grad(want_out, [x, w_dw, w_pw], gout)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    phases_fit = all(n % dilation == 0 and n // dilation >= kernel for n in hw)
    assert bool(taken) == phases_fit


def test_phase_path_is_refused_where_it_does_not_hold():
    from diffnas.ops.savers import _polyphase_factor

    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 1, 3, 3)
    assert _polyphase_factor(w, x, (1, 1), (2, 2), (2, 2), 3) == 2
    assert _polyphase_factor(w, x.contiguous(), (1, 1), (2, 2), (2, 2), 3) == 0  # NCHW
    assert _polyphase_factor(w, x, (2, 2), (2, 2), (2, 2), 3) == 0  # strided
    assert _polyphase_factor(w, x, (1, 1), (1, 1), (2, 2), 3) == 0  # not "same" padding
    assert _polyphase_factor(w, x, (1, 1), (1, 1), (1, 1), 3) == 0  # not dilated
    assert _polyphase_factor(w, x[:, :, :7, :7].contiguous(
        memory_format=torch.channels_last), (1, 1), (2, 2), (2, 2), 3) == 0  # odd size
    w5 = torch.randn(3, 1, 5, 5)
    assert _polyphase_factor(w5, x, (1, 1), (4, 4), (2, 2), 3) == 0  # 4x4 phases, 5x5 kernel
    assert _polyphase_factor(torch.randn(3, 3, 3, 3), x, (1, 1), (2, 2), (2, 2), 1) == 0


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_strided_dilated_conv_reads_one_phase(size, kernel, layout):
    # A DilConv with stride 2 at dilation 2 (a DARTS reduction edge) computes the plain
    # conv of x[..., ::2, ::2]: the same output and gradients as the conv it replaces,
    # in the supernet (with the memory savers and without) and in a retrain network, on
    # odd and even image sizes.
    import torch.nn.functional as F

    from diffnas.ops import twice_differentiable
    from diffnas.ops.conv import DilConv, phase_only

    torch.manual_seed(3)
    op = DilConv(3, 4, kernel, 2, kernel - 1, 2, affine=False).double()
    assert phase_only(op[1]) == 2
    assert phase_only(DilConv(3, 4, kernel, 1, kernel - 1, 2, affine=False)[1]) == 0
    assert phase_only(DilConv(3, 4, kernel, 2, kernel // 2, 1, affine=False)[1]) == 0
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    x = x.contiguous(memory_format=layout).requires_grad_()
    want = op[2](F.conv2d(x, op[1].weight, None, 2, kernel - 1, 2, 3))
    gout = torch.randn(want.shape, dtype=torch.float64)
    params = [x, op[1].weight, op[2].weight]
    want_g = torch.autograd.grad(want, params, gout)
    for twice in (False, True):
        if twice:
            with twice_differentiable():
                got = op.forward_preact(x)
        else:
            got = op.forward_preact(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, params, gout), want_g, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # the whole op as a retrain network runs it (ReLU -> conv -> 1x1 -> BN)
    want = op[3](op[2](op[1](op[0](x))))
    got = op(x)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    params = [x, op[1].weight, op[2].weight]
    for a, b in zip(torch.autograd.grad(got, params, gout),
                    torch.autograd.grad(want, params, gout), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_retrain_dilated_conv_runs_through_the_savers(kernel, layout, monkeypatch):
    # A stride-1 DilConv in a retrain network runs through DwPwConv (fast CPU backward)
    # with the gradients of the plain module; inside twice_differentiable() it takes
    # plain autograd, so a double backward still works there.
    from diffnas.ops import savers, twice_differentiable
    from diffnas.ops.conv import DilConv

    calls = []
    real = savers.DwPwConv.apply
    monkeypatch.setattr(savers.DwPwConv, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(4)
    op = DilConv(3, 4, kernel, 1, kernel - 1, 2, affine=True).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    x = x.contiguous(memory_format=layout).requires_grad_()
    params = [x, *op.parameters()]
    want = op[3](op[2](op[1](op[0](x))))
    got = op(x)
    assert calls, "the savers' path was not taken"
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    gout = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, params, gout),
                    torch.autograd.grad(want, params, gout), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    calls.clear()
    with twice_differentiable():
        gx = torch.autograd.grad((op(x) * gout).sum(), x, create_graph=True)[0]
        assert torch.autograd.grad(gx.pow(2).sum(), op[1].weight)[0].abs().sum() > 0
    assert not calls


def test_conv_savers_recompute_only_for_weight_gradients(monkeypatch):
    # An architecture step asks for no weight gradient: its backward must recompute no
    # depthwise output. A weight step needs the 1x1 weight gradients, so it recomputes.
    import torch.nn.functional as F

    from diffnas.ops.savers import BNReLUConv, DwPwConv

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    w_dw = torch.randn(4, 1, 3, 3, generator=g, requires_grad=True)
    w_pw = torch.randn(4, 4, 1, 1, generator=g, requires_grad=True)
    calls = []  # convolutions with the depthwise weight itself: forward or its recompute
    conv2d = F.conv2d

    def counting_conv2d(*a, **k):
        if a[1] is w_dw:
            calls.append(1)
        return conv2d(*a, **k)

    monkeypatch.setattr(F, "conv2d", counting_conv2d)
    for fn in (
        lambda: DwPwConv.apply(x, w_dw, w_pw, (1, 1), (1, 1), (1, 1), 4, False),
        lambda: BNReLUConv.apply(x, w_dw, 1e-5, (1, 1), (1, 1), (1, 1), 4, w_pw),
    ):
        out = fn()
        calls.clear()
        torch.autograd.grad(out.square().sum(), [x])
        assert calls == []
        out = fn()
        calls.clear()
        gx, gpw = torch.autograd.grad(out.square().sum(), [x, w_pw])
        assert len(calls) == 1
        assert gpw.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_conv_with_pointwise_matches_plain_autograd(device):
    import torch.nn.functional as F

    from diffnas.ops.savers import BNReLUConv

    def plain(b, w, w_pw):
        y = F.batch_norm(b, None, None, None, None, True, 0.0, 1e-5)
        return F.conv2d(F.conv2d(torch.relu(y), w, None, 1, 2, 1, 4), w_pw)

    def saver(b, w, w_pw):
        return BNReLUConv.apply(b, w, 1e-5, (1, 1), (2, 2), (1, 1), 4, w_pw)

    g = torch.Generator().manual_seed(7)
    for layout in (torch.contiguous_format, torch.channels_last):
        b = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64).to(device)
        b = b.contiguous(memory_format=layout).requires_grad_()
        w = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64).to(device)
        w_pw = torch.randn(6, 4, 1, 1, generator=g, dtype=torch.float64).to(device)
        w, w_pw = w.requires_grad_(), w_pw.requires_grad_()
        gout = torch.randn(3, 6, 7, 7, generator=g, dtype=torch.float64).to(device)
        got = torch.autograd.grad(saver(b, w, w_pw), [b, w, w_pw], gout)
        want = torch.autograd.grad(plain(b, w, w_pw), [b, w, w_pw], gout)
        for x, y in zip(got, want):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(saver, (b, w, w_pw))


@pytest.mark.parametrize("stride,layout", [(1, torch.channels_last), (2, torch.contiguous_format)])
@pytest.mark.parametrize("device", DEVICES)
def test_compact_max_pool_matches_max_pool(stride, layout, device):
    # Narrow indices, same result: ties (integer-valued inputs) included, where the
    # gradient must go to the same element as torch's max-pool sends it to.
    from diffnas.ops.savers import _index_dtype, max_pool_compact

    pool = torch.nn.MaxPool2d(3, stride=stride, padding=1)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (2, 3, 9, 9), generator=g).double().to(device)
    x = x.contiguous(memory_format=layout).requires_grad_()
    out = max_pool_compact(pool, x)
    want = pool(x)
    assert torch.equal(out, want)
    assert out.is_contiguous(memory_format=layout)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    (got,) = torch.autograd.grad(out, x, gout)
    (ref,) = torch.autograd.grad(want, x, gout)
    assert torch.equal(got, ref)
    assert _index_dtype(9 * 9) == torch.int16
    assert _index_dtype(200 * 200) == torch.int32
    assert _index_dtype(2**31) == torch.int64
    with pytest.raises(RuntimeError, match="twice_differentiable"):
        gx = torch.autograd.grad(max_pool_compact(pool, x).sum(), x, create_graph=True)[0]
        torch.autograd.grad(gx.sum(), x)


def test_dense_grad_hands_on_a_dense_gradient():
    # A concat's inputs receive channel slices of its gradient; dense_grad makes the
    # gradient that reaches the producer dense in the tensor's own layout.
    from diffnas.ops.savers import dense_grad

    for wrap in (False, True):
        x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        t = x * 2
        if wrap:
            t = dense_grad(t)
        seen = []
        t.register_hook(lambda g, seen=seen: seen.append(
            g.is_contiguous(memory_format=torch.channels_last)))
        torch.cat([t, t * 3], dim=1).sum().backward()
        assert seen == [wrap]
        assert torch.equal(x.grad, torch.full_like(x, 8.0))


def test_search_cell_computes_one_relu_per_edge_input():
    # Every edge reading a node shares that node's relu(x): 2 cell inputs + 3 inner
    # nodes feed edges (nodes=4), plus one ReLU in each of the 2 preprocessing convs (a
    # FactorizedReduce after the reduction has one), in each of the 3 cells.
    fast, _, arch = _pair(True, torch.float32, layers=3, nodes=4)
    w = ArchWeights({g: torch.softmax(a, -1) for g, a in arch.as_dict().items()})
    out = fast(torch.randn(2, 2, 8, 8), w)
    relus, stack, seen = 0, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        relus += type(node).__name__ == "ReluBackward0"
        stack.extend(f for f, _ in node.next_functions)
    assert relus == 3 * (5 + 2)


@pytest.mark.parametrize("net, arch", [(torch.float64, torch.float32),
                                       (torch.float32, torch.float64)])
def test_mixed_op_takes_arch_weights_of_another_dtype_as_the_plain_sum_does(net, arch):
    """The fused pool/BN path passed the mixing weight to the batch-norm kernel uncast:
    a float64 supernet with float32 weights (a float64 check) failed with "mixed dtype
    (CPU)", where ``sum_i w_i * op_i(x)`` computes in the supernet's dtype."""
    from diffnas.supernet.mixed import MixedOp

    ops = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
           "dil_conv_3x3")
    torch.manual_seed(0)
    m = MixedOp(4, 1, ops).to(net)
    x = torch.randn(2, 4, 7, 7, dtype=net)
    w = torch.softmax(torch.randn(len(ops), dtype=arch), -1)
    out = m(x, w)
    plain = sum(w[i].to(net) * op(x) for i, op in enumerate(m.ops) if ops[i] != "none")
    assert out.dtype == net
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
