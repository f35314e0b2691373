"""Rules of the candidate operations that a mutation audit could break, second pass: every
CNN op's output shape at stride 1 and 2 on odd, even and non-square inputs (the side
halves rounding up), the pre-BN path the search supernet runs (``forward_preact`` then the
op's last BN equals the op, with and without the memory savers), FactorizedReduce's
refusal of an odd width, ``create_op``'s defaults and the order of its refusals,
``check_op_contract`` on plugin ops (RNG left alone, the module and tensor checks), the
recurrent ops' activations and which of them read ``s_prev``, and the graph ops' input
checks, initial values, dtype handling and dropped-input flags. Numbers are replayed by
hand in float64 rather than compared with values the code once printed."""

from __future__ import annotations

import re
import uuid

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffnas.ops import OPS, check_op_contract, create_op, list_ops, twice_differentiable
from diffnas.ops.conv import DilConv, FactorizedReduce
from diffnas.ops.graph import GAT_HEADS, GRAPH_OPS, Graph, create_graph_op
from diffnas.ops.rnn import RNN_OPS, create_rnn_op
from diffnas.registry import UnknownNameError

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- CNN ops: shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(6, 6), (7, 7), (8, 8), (7, 10)])
def test_every_op_keeps_channels_and_divides_the_side_by_the_stride_rounding_up(
        name, stride, hw):
    """An op maps (N, C, H, W) to (N, C, ceil(H/s), ceil(W/s)) for odd, even and
    non-square inputs (a pool in ceil mode, or a stride-2 path without padding, breaks
    one of the parities)."""
    torch.manual_seed(0)
    op = create_op(name, 4, stride, affine=True)
    h, w = hw
    y = op(_randn(2, 4, h, w, dtype=torch.float32))
    assert tuple(y.shape) == (2, 4, -(-h // stride), -(-w // stride))


# --- CNN ops: the pre-BN path of the search supernet -------------------------------------
PREACT = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
          "nor_conv_1x1", "nor_conv_3x3"]


def _last_bn(op: nn.Module) -> nn.BatchNorm2d:
    return [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)][-1]


@pytest.mark.parametrize("name, stride", [
    *((n, s) for n in PREACT for s in (1, 2)), ("skip_connect", 2)])  # 2: FactorizedReduce
@pytest.mark.parametrize("twice", [False, True], ids=["savers", "twice_differentiable"])
def test_forward_preact_then_the_last_bn_is_the_op(name, stride, twice):
    """The supernet computes ``relu(x)`` once per edge, runs ``forward_preact`` on it and
    applies the op's last (affine-free) BN itself: that must equal the op, value and input
    gradient, whether the memory-saving autograd functions run or not."""
    torch.manual_seed(0)
    op = create_op(name, 4, stride, affine=False).double()
    x = _randn(2, 4, 9, 9).requires_grad_()
    gout = _randn(*op(x).shape, seed=1)
    want = op(x)
    want_g = torch.autograd.grad(want, x, gout)[0]
    if twice:
        with twice_differentiable():
            got = _last_bn(op)(op.forward_preact(torch.relu(x)))
    else:
        got = _last_bn(op)(op.forward_preact(torch.relu(x)))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x, gout)[0], want_g)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 3, 3, 3), (5, 3, 6, 3), (2, 2, 1, 2), (4, 2, 3, 2), (3, 2, 2, 2)])
@pytest.mark.parametrize("side", [8, 9])
def test_dil_conv_is_its_module_chain_beyond_the_darts_settings(kernel, stride, padding,
                                                                dilation, side):
    """The one-phase shortcut (stride d at dilation d reads ``x[..., ::d, ::d]``) holds for
    any d and only for odd kernels: at d = 3, or an even kernel, DilConv must still compute
    ReLU -> depthwise -> 1x1 -> BN as declared, pre-BN path included."""
    torch.manual_seed(0)
    op = DilConv(3, 4, kernel, stride, padding, dilation, affine=False).double()
    x = _randn(2, 3, side, side).requires_grad_()
    pre = op[2](F.conv2d(torch.relu(x), op[1].weight, None, stride, padding, dilation, 3))
    torch.testing.assert_close(op(x), op[3](pre))
    torch.testing.assert_close(op.forward_preact(torch.relu(x)), pre)


# --- FactorizedReduce and the registry's defaults -----------------------------------------
@pytest.mark.parametrize("c_out", [1, 5])
def test_factorized_reduce_refuses_an_odd_width_naming_it(c_out):
    """Two halves of C_out // 2 channels would silently lose a channel."""
    with pytest.raises(ValueError, match=f"even C_out, got {c_out}"):
        FactorizedReduce(4, c_out)
    with pytest.raises(ValueError, match=f"even C_out, got {c_out}"):
        create_op("skip_connect", c_out, 2)


def test_factorized_reduce_keeps_an_even_width():
    op = FactorizedReduce(3, 6, affine=False)
    assert op.conv_1.out_channels == op.conv_2.out_channels == 3
    assert op(_randn(2, 3, 5, 5, dtype=torch.float32)).shape == (2, 6, 3, 3)


def test_create_op_builds_a_retrain_op_by_default():
    """``affine`` defaults to True: a fixed network's BNs have weights and statistics."""
    for name in ("sep_conv_3x3", "dil_conv_3x3", "nor_conv_3x3", "skip_connect"):
        bns = [m for m in create_op(name, 4, 2).modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(b.affine and b.track_running_stats for b in bns), name


def test_an_unknown_op_is_named_before_its_stride_is_judged():
    """A misspelt name at a bad stride: the name is the problem to report, with the list."""
    with pytest.raises(UnknownNameError, match="unknown op 'sep_conv_9x9'.*skip_connect"):
        create_op("sep_conv_9x9", 4, 3)


def test_list_ops_is_sorted_and_holds_every_registered_op():
    assert list_ops() == sorted(OPS._items)


# --- check_op_contract on plugin ops ------------------------------------------------------
@pytest.fixture
def plugin_op(monkeypatch):
    """Registers a factory under a fresh name for the test only (its module is this test
    file, not diffnas, so the contract is checked)."""

    def register(factory):
        name = f"t_{uuid.uuid4().hex[:8]}"
        monkeypatch.setitem(OPS._items, name, factory)
        return name

    return register


def _conv_op(C, stride, affine):
    return nn.Sequential(nn.Conv2d(C, C, 3, stride, 1), nn.BatchNorm2d(C, affine=affine))


def test_check_op_contract_leaves_the_global_rng_alone(plugin_op):
    """Building the op draws initial weights and the check draws inputs: neither may move
    the caller's random stream (a seeded run would differ with and without a plugin)."""
    name = plugin_op(_conv_op)
    torch.manual_seed(7)
    want = torch.rand(5)
    torch.manual_seed(7)
    check_op_contract(name)
    assert torch.equal(torch.rand(5), want)


def test_check_op_contract_builds_the_search_op_by_default(plugin_op):
    """The default is ``affine=False`` (as the supernet builds it), at stride 1 and 2."""
    seen = []

    def factory(C, stride, affine):
        seen.append((C, stride, affine))
        return _conv_op(C, stride, affine)

    check_op_contract(plugin_op(factory), channels=(4, 6))
    assert set(seen) == {(C, s, False) for C in (4, 6) for s in (1, 2)}


def test_check_op_contract_refuses_a_factory_that_returns_no_module(plugin_op):
    """A plain function would run, but has no parameters to train or move to a device."""
    name = plugin_op(lambda C, stride, affine: (lambda x: x[:, :, ::stride, ::stride]))
    with pytest.raises(ValueError, match=rf"op '{name}' .*returned function, not an "
                                         "nn.Module"):
        check_op_contract(name)


class _Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_check_op_contract_refuses_an_op_that_answers_no_tensor(plugin_op):
    name = plugin_op(lambda C, stride, affine: _Pair())
    with pytest.raises(ValueError, match=rf"op '{name}' .*to tuple, expected \(2, 4, 7, 7\)"):
        check_op_contract(name)


def test_check_op_contract_names_the_file_that_registered_the_op(plugin_op):
    name = plugin_op(lambda C, stride, affine: _Pair())
    with pytest.raises(ValueError, match=r"registered in \S*test_ops_shapes_rules\.py"):
        check_op_contract(name)


# --- recurrent ops ------------------------------------------------------------------------
ACTIVATIONS = {"tanh": torch.tanh, "relu": lambda h: h.clamp(min=0),
               "sigmoid": lambda h: 1 / (1 + torch.exp(-h)), "identity": lambda h: h}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_recurrent_activations_are_the_named_functions(name):
    h = torch.linspace(-4, 4, 17, dtype=F64).view(1, 17)
    s = _randn(1, 17)
    torch.testing.assert_close(create_rnn_op(name)(h, s), ACTIVATIONS[name](h))


@pytest.mark.parametrize("name", RNN_OPS.names())
def test_binary_says_whether_the_op_reads_s_prev(name):
    """``binary`` is True exactly for the ops whose output changes with ``s_prev``."""
    op = create_rnn_op(name)
    h = _randn(3, 5)
    reads = not torch.equal(op(h, _randn(3, 5, seed=1)), op(h, _randn(3, 5, seed=2)))
    assert op.binary == reads
    assert op.binary == (name == "hadamard")


def test_recurrent_none_is_exactly_zero_even_for_infinite_inputs():
    h = torch.tensor([[1.0, -float("inf"), float("inf"), float("nan")]], dtype=F64)
    out = create_rnn_op("none")(h, h)
    assert torch.equal(out, torch.zeros_like(h))


# --- graph ops ----------------------------------------------------------------------------
def _triangle():
    """The 3-node graph 0 - 1, 1 - 2 (both directions) with a self loop per node."""
    e = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 0), (1, 1), (2, 2)]
    return Graph(torch.tensor(e).t(), 3)


@pytest.mark.parametrize("shape", [(3, 7), (1, 7), (7,), (2, 3, 7)])
def test_graph_refuses_an_edge_index_not_of_shape_two_by_e(shape):
    e = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError,
                       match=r"must have shape \(2, E\), got " + re.escape(str(shape))):
        Graph(e, 3)


@pytest.mark.parametrize("C", [6, 10])
def test_gat_refuses_a_width_the_heads_do_not_divide(C):
    with pytest.raises(ValueError, match=f"width {C} does not divide into {GAT_HEADS} heads"):
        create_graph_op("gat", C)


def test_gat_has_four_heads_each_a_quarter_wide_and_starts_without_bias():
    op = create_graph_op("gat", 8)
    assert GAT_HEADS == 4 and (op.heads, op.head_dim) == (4, 2)
    assert op.att_src.shape == op.att_dst.shape == (4, 2)
    assert torch.equal(op.bias.detach(), torch.zeros(8))


def test_gin_starts_at_eps_zero_a_plain_neighbourhood_sum():
    """GIN-0 at initialisation: mlp(x_i + sum of the neighbours), self not counted twice."""
    torch.manual_seed(0)
    op = create_graph_op("gin", 4).double()
    assert op.eps.item() == 0.0
    x = _randn(3, 4)
    agg = torch.stack([x[0] + x[1], x[1] + x[0] + x[2], x[2] + x[1]])
    with torch.no_grad():
        torch.testing.assert_close(op(x, _triangle()), op.mlp(agg))


@pytest.mark.parametrize("name", GRAPH_OPS.names())
def test_dropped_input_is_for_the_ops_with_weights(name):
    """The cell feeds the dropped-out state to every op with weights, the raw state to the
    identity and ``none`` (dropout there would only add noise to a skip)."""
    op = create_graph_op(name, 8)
    assert op.dropped_input == any(True for _ in op.parameters())
    assert op.dropped_input == (name not in ("none", "skip_connect"))


@pytest.mark.parametrize("name", ["gcn", "sage", "gin", "gat", "linear"])
def test_graph_ops_answer_in_the_dtype_of_their_input(name):
    """The graph's normalisation weights are kept in the default dtype; an op in bfloat16
    must cast them rather than promote its messages."""
    torch.manual_seed(0)
    op = create_graph_op(name, 4).to(torch.bfloat16)
    y = op(_randn(3, 4, dtype=torch.bfloat16), _triangle())
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4)
