"""Rules of the supernet's edge modifiers, mixed edges, cells and networks, and of the
latency penalty and cost helpers, that a mutation audit found unchecked: the accepted
``k`` of partial channels, its default and the gradient its bypass gives the edge weight,
the channel counts the op contract check builds, an edge without a real op, a stateful BN
swapped into an edge, drop path at zero, the auxiliary head's input and pooling, each
cell type's sampled ops, the clamped ``recompute``, the stem's default width, and the
argument checks of the penalty, the MnasNet reward, ``cell_latency_fn`` and the cost
split. Each test replays the rule
by hand on a tiny float64 module or compares with an independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cost_predictor
from torch import nn

from diffnas.genotype import CellGenotype, Edge, Genotype, published_genotype
from diffnas.supernet.cell import drop_path
from diffnas.supernet.mixed import MixedOp
from diffnas.supernet.modifiers import (
    PartialChannelMixedOp,
    create_mixed_op_factory,
    op_channels,
)
from diffnas.supernet.network import AuxiliaryHead, DartsNetwork, DartsSuperNet

F64 = torch.float64
OPS = ["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3"]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _unshuffle(y, k):
    """The inverse of ``channel_shuffle(., k)``, written independently."""
    b, c, h, w = y.shape
    return y.view(b, c // k, k, h, w).transpose(1, 2).reshape(b, c, h, w)


# --- partial channels ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [True, 2.0, "2", 0, -2, 3])
def test_partial_channel_k_must_be_a_whole_number_that_divides_the_channels(k):
    """``k: true`` (a YAML slip, == 1) and ``k: 2.0`` are not accepted as 1 and 2."""
    with pytest.raises(ValueError, match=f"partial_channel k={k} must be >= 1 and divide"):
        create_mixed_op_factory({"name": "partial_channel", "k": k})(8, 1, OPS)


def test_partial_channel_defaults_to_a_quarter_of_the_channels():
    """PC-DARTS's K = 4 when the spec names no ``k``."""
    op = create_mixed_op_factory({"name": "partial_channel"})(16, 1, OPS)
    assert op.k == 4
    seen = []
    op.mixed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    op(torch.randn(2, 16, 4, 4), torch.softmax(torch.randn(len(OPS)), 0))
    assert seen == [4]
    assert op_channels({"name": "partial_channel"}, 16) == (4, 8, 16)


def test_the_default_modifier_is_the_space_own_mixed_op():
    def inner(C, stride, candidates):
        return nn.Identity()

    assert create_mixed_op_factory({"name": "default"}, inner=inner) is inner


@pytest.mark.parametrize(("spec", "C", "want"), [
    ({}, 4, (4, 8, 16)),  # the three stages: C, 2C, 4C
    ({"name": "default"}, 6, (6, 12, 24)),
    ({"name": "partial_channel", "k": 2}, 8, (4, 8, 16)),  # a k-th of each
    ({"name": "partial_channel", "k": 4}, 4, (1, 2, 4)),
])
def test_op_channels_are_the_stage_widths_the_search_builds_ops_with(spec, C, want):
    assert op_channels(spec, C) == want


def test_building_a_factory_leaves_the_config_spec_untouched():
    """The spec is the config's own dict: popping its name would make the next build
    (the supernet after the config check) fail or fall back."""
    spec = {"name": "partial_channel", "k": 2}
    create_mixed_op_factory(spec)
    assert spec == {"name": "partial_channel", "k": 2}
    assert create_mixed_op_factory(spec)(4, 1, OPS).k == 2


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_bypass_passes_its_gradient_to_every_op_weight(stride):
    """out = shuffle(cat(mixed(x[:C/k], w), bypass(x[C/k:]) * sum(w))): dL/dw_j is the
    mixed part's plus <dL/d bypass, bypass(x)> for every j (edge normalization trains
    its betas through the bypass too), float64."""
    torch.manual_seed(0)
    k, C = 2, 8
    op = PartialChannelMixedOp(C, stride, OPS, k).double()
    x, g = _randn(2, C, 6, 6, seed=1), _randn(2, C, 6 // stride, 6 // stride, seed=2)
    w = (0.7 * torch.softmax(_randn(len(OPS), seed=3), 0)).requires_grad_()
    (op(x, w) * g).sum().backward()
    c, gu = C // k, _unshuffle(g, k)
    w2 = w.detach().clone().requires_grad_()
    (op.mixed(x[:, :c], w2) * gu[:, :c]).sum().backward()
    bypass = x[:, c:] if stride == 1 else F.max_pool2d(x[:, c:], 2, 2, ceil_mode=True)
    through_bypass = (gu[:, c:] * bypass).sum()
    assert through_bypass.abs() > 1e-3
    torch.testing.assert_close(w.grad, w2.grad + through_bypass, rtol=1e-10, atol=1e-12)


# --- mixed edges --------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: MixedOp(4, 1, ["none"]),
    lambda: MixedOp(4, 2, ["none", "none"]),
    lambda: PartialChannelMixedOp(4, 1, ["none"], 2),
])
def test_an_edge_with_only_the_none_op_is_refused(build):
    """Its mixture would be no term at all (forward returns None), not zeros."""
    with pytest.raises(ValueError, match="at least one op besides 'none'"):
        build()


def test_a_stateful_bn_swapped_into_an_edge_keeps_its_running_statistics():
    """A BN with running statistics put in after construction (e.g. SyncBatchNorm) is
    called as itself, not fused: evaluation uses its running mean and variance, training
    updates them (the other test of this fallback runs in training mode only)."""
    torch.manual_seed(0)
    ops = ["skip_connect", "max_pool_3x3", "avg_pool_3x3"]
    m = MixedOp(3, 1, ops).double()
    bns = []
    for k in (1, 2):
        bn = nn.BatchNorm2d(3, affine=False).double()
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        m.ops[k][1] = bn
        bns.append(bn)
    x = _randn(2, 3, 5, 5, seed=1)
    w = torch.softmax(_randn(len(ops), seed=2), 0)

    def by_hand(pool, bn):
        return (pool(x) - bn.running_mean[:, None, None]) / torch.sqrt(
            bn.running_var[:, None, None] + bn.eps)

    want = (w[0] * x + w[1] * by_hand(m.ops[1][0], bns[0])
            + w[2] * by_hand(m.ops[2][0], bns[1]))
    torch.testing.assert_close(m.eval()(x, w), want, rtol=1e-10, atol=1e-10)
    m.train()(x, w)
    pooled = m.ops[1][0](x).mean((0, 2, 3))
    torch.testing.assert_close(bns[0].running_mean,
                               0.9 * torch.tensor([0.5, -1.0, 2.0], dtype=F64) + 0.1 * pooled)


# --- cells and networks -------------------------------------------------------------------
def test_drop_path_at_zero_returns_its_input_and_draws_no_random_numbers():
    """Off at probability 0 (the schedule's first epoch): no mask drawn, so the RNG
    stream of the rest of the step is as without drop path."""
    x = _randn(3, 2, 2, 2)
    torch.manual_seed(5)
    assert drop_path(x, 0.0) is x
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))


def test_the_auxiliary_head_reads_the_cell_at_two_thirds_depth_only():
    """5 layers: reductions at 1 and 3, the head on cell 3 (2 * 5 // 3); cell 4 has the
    same shape, so a head fed by a later cell would not fail, only be wrong."""
    torch.manual_seed(0)
    net = DartsNetwork(published_genotype("DARTS_V2"), 2, 3, 5, True, in_channels=1,
                       stem_multiplier=1).double().train()
    assert net.aux_position == 3
    seen = []
    for cell in net.cells:
        cell.register_forward_hook(lambda m, a, out: seen.append(out))
    _, aux = net(_randn(4, 1, 8, 8, seed=1))
    assert seen[3].shape == seen[4].shape
    torch.testing.assert_close(aux, net.auxiliary_head(seen[3]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(aux, net.auxiliary_head(seen[4]))


def test_the_auxiliary_head_averages_other_map_sizes_down_to_2x2():
    """Off the paper's 8x8 maps, the pool is an adaptive *average* to 2x2: 6x6 maps
    give the means of their four 3x3 quarters."""
    torch.manual_seed(0)
    head = AuxiliaryHead(3, 5).double().eval()
    x = _randn(2, 3, 6, 6, seed=1)
    rest = nn.Sequential(*list(head.features)[2:])
    want = head.classifier(rest(F.avg_pool2d(torch.relu(x), 3)).flatten(1))
    torch.testing.assert_close(head(x), want, rtol=1e-10, atol=1e-10)


def test_recompute_beyond_the_number_of_cells_means_all_of_them():
    net = DartsSuperNet(4, 3, 3, 2, OPS, in_channels=1, recompute=10)
    assert net.recompute == 3
    flags = {m.recompute for m in net.modules() if isinstance(m, MixedOp)}
    assert flags == {True}


def test_a_sampled_supernet_runs_each_cell_type_on_its_own_sampled_ops():
    """Hard sampling: with one-hot weights, computing only the ``active`` op of each edge
    gives the dense mixture's value, provided each cell reads the sampled ops of its own
    type (normal and reduce samples differ here), float64."""
    from diffnas.arch.relax import ArchWeights

    torch.manual_seed(0)
    net = DartsSuperNet(2, 3, 3, 2, OPS, in_channels=1, stem_multiplier=1).double()
    active = {"normal": torch.tensor([2, 1, 3, 2, 1]), "reduce": torch.tensor([3, 2, 1, 1, 3])}
    w = {g: F.one_hot(a, len(OPS)).to(F64) for g, a in active.items()}
    x = _randn(2, 1, 8, 8, seed=1)
    dense = net(x, ArchWeights(w))
    torch.testing.assert_close(net(x, ArchWeights(w, active)), dense, rtol=1e-9, atol=1e-9)


def test_the_stem_is_three_times_c_wide_by_default_and_bias_free():
    """DARTS: stem_multiplier 3 in both the supernet and the retrained network; the stem
    convolution has no bias (its BN follows)."""
    g = published_genotype("DARTS_V2")
    for net in (DartsSuperNet(4, 3, 3, 2, OPS, in_channels=1),
                DartsNetwork(g, 4, 3, 3, False, in_channels=1)):
        conv, bn = net.stem
        assert (conv.in_channels, conv.out_channels, conv.bias) == (1, 12, None)
        assert bn.num_features == 12


# --- the latency penalty and the MnasNet reward -------------------------------------------
def _penalty(**kw):
    from diffnas.hardware.penalty import LatencyPenalty

    return LatencyPenalty(cost_predictor(["a", "b"], {"a": 1.0, "b": 3.0}), **kw)


def test_a_zero_lambda_is_accepted_and_gives_no_penalty_nor_gradient():
    """lam = 0 switches the term off (a sweep's first point) rather than being refused."""
    pen = _penalty(lam=0, normalize=False)
    alpha = torch.randn(6, 2, requires_grad=True)
    value = pen({"cell": torch.softmax(alpha, -1)}, {"cell": alpha})
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.equal(alpha.grad, torch.zeros_like(alpha))


def test_normalizing_by_a_mean_latency_that_is_not_positive_is_refused():
    """normalize=true divides by the predictor's mean training latency: a hand-built
    predictor with mean 0 (or NaN) is refused by name, not a ZeroDivisionError."""
    from diffnas.hardware.penalty import LatencyPenalty

    for mean in (0.0, -1.0, float("nan")):
        predictor = cost_predictor(["a", "b"], {"a": 1.0})
        predictor.mean_ms.fill_(mean)
        with pytest.raises(ValueError, match=r"normalize=true divides by the predictor's mean "
                           r"training latency, which is (0|-1|nan) ms"):
            LatencyPenalty(predictor)
    predictor = cost_predictor(["a", "b"], {"a": 1.0})
    predictor.mean_ms.fill_(4.0)
    assert LatencyPenalty(predictor, lam=1.0).scale == 0.25


@pytest.mark.parametrize(("latency", "target"), [(5.0, 0.0), (5.0, -2.0), (-1.0, 5.0)])
def test_mnasnet_reward_refuses_a_non_positive_latency_or_target(latency, target):
    from diffnas.hardware.penalty import mnasnet_reward

    with pytest.raises(ValueError, match="latency and target must be positive"):
        mnasnet_reward(0.8, latency, target)


def test_mnasnet_reward_takes_its_weight_pair_as_a_yaml_list():
    """(alpha, beta) read from YAML arrives as a list: alpha under the target, beta
    above, as for a tuple."""
    from diffnas.hardware.penalty import mnasnet_reward

    for lat, want in ((5.0, 0.8), (20.0, 0.8 * (20.0 / 10.0) ** -1.0)):
        assert mnasnet_reward(0.8, lat, 10.0, [0.0, -1.0]) == pytest.approx(want)
        assert mnasnet_reward(0.8, lat, 10.0, (0.0, -1.0)) == pytest.approx(want)


def test_cell_latency_fn_refuses_a_predictor_of_several_cell_types():
    from diffnas.hardware.penalty import cell_latency_fn
    from diffnas.hardware.predictor import LatencyPredictor

    p = LatencyPredictor({"normal": (5, 3), "reduce": (5, 3)}, hidden=4,
                         ops={"normal": ["a", "b", "c"], "reduce": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="one-cell-type predictor"):
        cell_latency_fn(p)


@pytest.mark.parametrize("cell", [(0, 0, 0, 0, 0), (0,) * 7, (0, 0, -1, 0, 0, 0)])
def test_cell_latency_fn_refuses_a_cell_of_the_wrong_length_or_a_negative_index(cell):
    """A negative index would silently read the last op of the list."""
    from diffnas.hardware.penalty import cell_latency_fn

    ops = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    lat = cell_latency_fn(cost_predictor(ops, {"avg_pool_3x3": 1.0}), ops=ops)
    with pytest.raises(ValueError, match=r"does not fit: the predictor has 6 edges"):
        lat(cell)


# --- costs --------------------------------------------------------------------------------
def test_flops_by_op_cannot_guess_the_cell_of_a_module_among_several():
    """A fixed cell without ``reduction`` in a genotype of two cell types is an error
    naming the cells, not the first cell's ops."""
    from diffnas.hardware.costs import _cell_of

    cell = CellGenotype("a", (Edge("skip_connect", 0, 1),), (1,))
    two = Genotype("x", (cell, CellGenotype("b", cell.edges, cell.concat)))
    with pytest.raises(ValueError, match=r"cannot tell which of the genotype's cells \['a', "
                                         r"'b'\] the module Identity"):
        _cell_of(nn.Identity(), two)
    assert _cell_of(nn.Identity(), Genotype("x", (cell,))) is cell


def test_predictor_mismatch_is_silent_about_what_the_predictor_does_not_record():
    """A predictor without a recorded device, or without recorded settings, is not
    reported as fitted elsewhere; what it does record is still compared."""
    from diffnas.hardware.costs import predictor_mismatch
    from diffnas.spaces import create_space

    section = {"name": "darts_cnn", "C": 4, "layers": 3}
    here = {"batch_size": 1, "network": create_space(section).network_settings({"C": 8})}
    fitted = {"batch_size": 1, "network": {"C": 8}, "space": section}
    device = {"id": "cpu-x"}
    assert predictor_mismatch({"settings": fitted}, device, here) == ""
    assert predictor_mismatch({"device": {"id": "elsewhere"}}, device, here) == ""
    assert predictor_mismatch({"settings": fitted, "device": {"id": "elsewhere"}}, device,
                              here) == "device: 'elsewhere' vs 'cpu-x'"
