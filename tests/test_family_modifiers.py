"""Edge modifiers: partial channel connections (PC-DARTS) and edge normalization."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy

from diffnas.genotype.discretize import discretize
from diffnas.supernet.modifiers import (
    PartialChannelMixedOp,
    channel_shuffle,
    create_mixed_op_factory,
)

OPS = ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"]


def _unshuffle(y, k):
    b, c, h, w = y.shape
    return y.view(b, c // k, k, h, w).transpose(1, 2).reshape(b, c, h, w)


def test_channel_shuffle_known_answer():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert torch.equal(_unshuffle(channel_shuffle(x, 3), 3), x)


def test_channel_shuffle_keeps_the_channels_last_layout():
    from diffnas.ops.savers import is_channels_last

    x = torch.randn(2, 12, 5, 5)
    nhwc = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 4)
    assert torch.equal(nhwc, channel_shuffle(x, 4)) and is_channels_last(nhwc)
    # so a partial-channel supernet stays channels-last from cell to cell
    space = tiny_space(C=4, mixed_op={"name": "partial_channel", "k": 2})
    s = tiny_strategy({"name": "darts"}, space=space)
    seen: list[bool] = []
    for cell in s.supernet.cells:
        cell.register_forward_pre_hook(lambda m, a: seen.append(is_channels_last(a[1])))
    s.supernet(tiny_batch(4, 1)[0], s.arch_weights())
    assert seen and all(seen)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [2, 4])
def test_only_one_kth_of_channels_pass_through_the_ops(k, stride):
    torch.manual_seed(0)
    C = 8
    op = PartialChannelMixedOp(C, stride, OPS, k)
    seen = []  # channels entering the mixed op (all candidate ops read this input)
    op.mixed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, C, 6, 6)
    w = torch.softmax(torch.randn(len(OPS)), 0)
    y = op(x, w)
    assert y.shape == (2, C, 6 // stride, 6 // stride)
    assert seen and set(seen) == {C // k}
    y = _unshuffle(y, k)
    c = C // k
    bypass = x[:, c:] if stride == 1 else torch.nn.functional.max_pool2d(x[:, c:], 2, 2)
    assert torch.allclose(y[:, c:], bypass, atol=1e-6)  # untouched by the ops
    # the ops see only the first C/k channels: changing the others' values changes only
    # the bypassed part of the output
    x2 = x.clone()
    x2[:, c:] += 1.0
    y3 = _unshuffle(op(x2, w), k)
    assert torch.equal(y3[:, :c], y[:, :c])
    # a row scaled by an edge weight (edge normalization) scales the whole edge output,
    # bypass included, as PC-DARTS's beta_j * edge_j(h) does
    y2 = _unshuffle(op(x, 0.3 * w), k)
    assert torch.allclose(y2, 0.3 * y, atol=1e-6)
    # with `active` (hard sampling) only one op runs, on C/k channels
    seen.clear()
    op(x, w, 2)
    assert seen == [C // k]


def test_partial_channel_supernet_shapes_and_step():
    space = tiny_space(C=4, mixed_op={"name": "partial_channel", "k": 2})
    s = tiny_strategy({"name": "darts"}, space=space)
    x, _ = tiny_batch(4, 1)
    assert s.supernet(x, s.arch_weights()).shape == (4, 3)
    full = tiny_strategy({"name": "darts"})
    n_pc = sum(p.numel() for p in s.supernet.parameters())
    n_full = sum(p.numel() for p in full.supernet.parameters())
    assert n_pc < n_full  # the ops are built for C/k channels
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))


def test_partial_channel_on_nb201_wraps_its_own_mixed_op():
    from conftest import TINY_SHAPE

    from diffnas.spaces import create_space
    from diffnas.supernet.nb201 import Nb201MixedOp

    space = create_space(
        {"name": "nb201", "C": 4, "N": 1, "mixed_op": {"name": "partial_channel", "k": 2}},
        TINY_SHAPE,
    )
    s = tiny_strategy({"name": "darts"}, space=space)
    edges = [m for m in s.supernet.modules() if isinstance(m, PartialChannelMixedOp)]
    assert edges and all(isinstance(e.mixed, Nb201MixedOp) for e in edges)
    seen = []
    for e in edges:
        e.mixed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x, _ = tiny_batch(4, 1)
    assert s.supernet(x, s.arch_weights()).shape == (4, 3)
    assert sorted(set(seen)) == [2, 4, 8]  # C/k of the three stages' 4, 8, 16 channels
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))


def test_partial_channel_k1_is_plain_darts_on_reduction_edges_too():
    """k=1 sends every channel through the ops: the edge equals the plain mixed op (it
    used to max-pool an empty bypass on stride-2 edges and fail)."""
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(len(OPS)), 0)
    for stride in (1, 2):
        op = PartialChannelMixedOp(4, stride, OPS, 1)
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(op(x, w), op.mixed(x, w))
    space = tiny_space(C=4, mixed_op={"name": "partial_channel", "k": 1})
    s = tiny_strategy({"name": "darts"}, space=space)
    assert s.supernet(tiny_batch(4, 1)[0], s.arch_weights()).shape == (4, 3)


@pytest.mark.parametrize("space, mixed_op, match", [
    ("darts_cnn", {"name": "partial_channel", "k": 3}, "k=3 must be >= 1 and divide .*C=16"),
    ("nb201", {"name": "partial_channel", "k": 5}, "k=5 must be >= 1 and divide .*C=16"),
    ("darts_cnn", {"name": "partial_channel", "k": 0}, "k=0 must be >= 1"),
    ("darts_cnn", {"name": "partial_channel", "q": 2}, r"unknown setting\(s\) \['q'\]"),
    ("nb201", {"name": "pc"}, "unknown mixed_op 'pc'"),
])
def test_bad_mixed_op_is_refused_when_the_config_is_read(space, mixed_op, match):
    """Not when the supernet is built, after the run directory and the data."""
    from diffnas.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"search.space.mixed_op: .*{match}"):
        load_config(None, [f"search.space={{name: {space}, mixed_op: {mixed_op}}}"])


def test_checking_a_mixed_op_draws_no_random_numbers():
    """The config check builds an edge (on the meta device): it must not move the seeded
    initialisation of the supernet built after it."""
    from diffnas.spaces import create_space

    for section in ({"name": "darts_cnn", "mixed_op": {"name": "partial_channel", "k": 4}},
                    {"name": "nb201", "mixed_op": {"name": "partial_channel", "k": 2}}):
        torch.manual_seed(0)
        create_space(section)
        drawn = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(3))


def test_bad_modifier_specs():
    with pytest.raises(ValueError, match="unknown mixed_op"):
        create_mixed_op_factory({"name": "nope"})
    with pytest.raises(ValueError, match="strategy"):
        create_mixed_op_factory({"name": "partial_channel", "edge_norm": True})
    with pytest.raises(ValueError, match="divide"):
        create_mixed_op_factory({"name": "partial_channel", "k": 3})(8, 1, OPS)
    with pytest.raises(ValueError, match="unknown setting"):
        create_mixed_op_factory({"name": "partial_channel", "q": 3})


def test_edge_normalization_betas():
    s = tiny_strategy({"name": "darts", "edge_norm": True})
    arch = s.arch_params
    assert set(arch.betas) == {"normal", "reduce"}
    beta_ids = {id(p) for p in arch.betas.parameters()}
    assert beta_ids <= {id(p) for p in s.alphas()}
    assert not beta_ids & {id(p) for p in s.supernet.parameters()}
    edges = arch.edges["normal"]
    with torch.no_grad():
        arch.betas["normal"].copy_(torch.arange(len(edges), dtype=torch.float32))
    scale = arch.edge_weights()["normal"]
    for node in {e.dst for e in edges}:
        rows = [i for i, e in enumerate(edges) if e.dst == node]
        b = torch.arange(len(edges), dtype=torch.float32)[rows]
        assert torch.allclose(scale[rows], torch.softmax(b, 0))
    aw = s.arch_weights()
    plain = torch.softmax(arch["normal"], -1)
    assert torch.allclose(aw["normal"], plain * scale[:, None])
    b0 = arch.betas["normal"].detach().clone()
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    assert not torch.equal(arch.betas["normal"].detach(), b0)  # betas are trained


def test_discretizer_ranks_edges_by_beta_times_weight():
    space = tiny_space(nodes=3)
    s = tiny_strategy({"name": "darts", "edge_norm": True}, space=space)
    arch = s.arch_params
    edges = arch.edges["normal"]
    ops = arch.candidates("normal")
    node3 = [i for i, e in enumerate(edges) if e.dst == 3]  # inputs 0, 1, 2
    with torch.no_grad():
        for p in arch.parameters():
            p.zero_()
        arch["normal"][node3[0], ops.index("sep_conv_3x3")] = 5.0  # strongest op weight ...
        arch["normal"][node3[1], ops.index("skip_connect")] = 3.0
        arch["normal"][node3[2], ops.index("max_pool_3x3")] = 2.0
        arch.betas["normal"][node3[0]] = -5.0  # ... but a tiny edge weight
    srcs = lambda g: sorted(e.src for e in g.cell("normal").inputs_of(3))  # noqa: E731
    no_beta = discretize(arch.as_dict(), space)
    with_beta = discretize(arch.as_dict(), space, None, arch.edge_weights())
    assert srcs(no_beta) == [0, 1]  # the unchanged DARTS rule
    assert srcs(with_beta) == [1, 2]


def test_edge_norm_is_not_offered_a_cuda_graph():
    """Edge normalization reads per-node index lists on the host: not capturable."""
    assert tiny_strategy({"name": "darts"}).graph_safe
    assert not tiny_strategy({"name": "darts", "edge_norm": True}).graph_safe


@pytest.mark.parametrize("side", [7, 9])
def test_partial_channel_reduction_edge_rounds_odd_sides_up(side):
    """The bypass must halve an odd side as the stride-2 ops do (rounding up), or the
    concatenation of ops and bypass fails."""
    torch.manual_seed(0)
    op = PartialChannelMixedOp(8, 2, OPS, 2)
    x = torch.randn(2, 8, side, side)
    y = op(x, torch.softmax(torch.randn(len(OPS)), 0))
    half = (side + 1) // 2
    assert y.shape == (2, 8, half, half)
    bypass = torch.nn.functional.max_pool2d(x[:, 4:], 2, 2, ceil_mode=True)
    assert torch.allclose(_unshuffle(y, 2)[:, 4:], bypass, atol=1e-6)  # last row/col alone


@pytest.mark.parametrize("resolution", [7, 15])
def test_partial_channel_supernet_at_odd_resolutions(resolution):
    from diffnas.arch import ArchParams
    from diffnas.arch.relax import ArchWeights
    from diffnas.spaces import DataShape, create_space

    torch.manual_seed(0)
    space = create_space({"name": "darts_cnn", "C": 4, "layers": 5, "nodes": 2,
                          "mixed_op": {"name": "partial_channel", "k": 2}},
                         DataShape(1, resolution, 3))
    arch = ArchParams(space)
    w = ArchWeights({g: torch.softmax(arch[g], -1) for g in arch.groups()})
    out = space.build_supernet()(torch.randn(2, 1, resolution, resolution), w)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
