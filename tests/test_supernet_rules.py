"""The supernet modules against their documented formulas, computed by hand on tiny
float64 modules: recurrent cells with their dropout masks, the search cell's mixture,
language-model dropouts, drop path, the stateful-BN fallback of a mixed edge and the
NAS-Bench-201 skeleton's reduction block and head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.genotype import CellGenotype, Edge, Genotype, published_genotype
from diffnas.ops.conv import Identity
from diffnas.supernet.cell import FixedCell as ConvFixedCell
from diffnas.supernet.cell import drop_path
from diffnas.supernet.mixed import MixedOp
from diffnas.supernet.nb201 import Nb201Network, ResNetBasicBlock
from diffnas.supernet.network import DartsNetwork
from diffnas.supernet.rnn import (
    Dropouts,
    FixedCell,
    LmInput,
    Masks,
    RnnNetwork,
    SearchCell,
)

F64 = torch.float64
RNN_OPS = {"tanh": lambda h, s: torch.tanh(h), "relu": lambda h, s: torch.relu(h),
           "sigmoid": lambda h, s: torch.sigmoid(h), "identity": lambda h, s: h,
           "hadamard": lambda h, s: h * s}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class KeyedMasks(Masks):
    """Active masks chosen by (shape, p): a fixed pattern of 0 and 1/keep per key, so a
    reference computation fetches the very mask the cell ought to use."""

    def __init__(self) -> None:
        super().__init__(True)

    def __call__(self, shape, p, like, batch_dim=None):
        if p <= 0:
            return None
        seed = (hash((tuple(shape), p)) & 0x7FFFFFFF)
        g = torch.Generator().manual_seed(seed)
        return torch.empty(tuple(shape), dtype=F64).bernoulli_(1 - p, generator=g) / (1 - p)

    def get(self, shape, p):
        m = self(shape, p, None)
        assert (m == 0).any() and (m > 0).any()  # the check below is not vacuous
        return m


def _split(t, nhid):
    return t[..., :nhid], t[..., nhid:]


def _bn(s):
    """Affine-free batch normalisation by batch statistics (biased variance, eps 1e-5)."""
    return (s - s.mean(0)) / torch.sqrt(s.var(0, unbiased=False) + 1e-5)


def _inputs(cell, x, h, mx, mh):
    """Input node states and the mask each one gets before its node matrices."""
    if cell.backbone == "single":
        c0, h0 = _split(torch.cat([x * mx, h * mh], -1) @ cell.W0, cell.nhid)
        return [h + torch.sigmoid(c0) * (torch.tanh(h0) - h)], [mh]
    if cell.ninp != cell.nhid:
        return [(x * mx) @ cell.Wx, h], [torch.ones_like(mh), mh]
    return [x, h], [mx, mh]


# --- recurrent cells ---------------------------------------------------------------------
CELLS = {  # backbone, ninp, nhid, edges (op, src, dst), concat
    "single": ("single", 3, 4, [("tanh", 0, 1), ("hadamard", 1, 2), ("identity", 0, 3),
                                ("sigmoid", 2, 4)], (2, 4)),
    "two_input": ("two_input", 4, 4, [("tanh", 0, 2), ("sigmoid", 1, 3), ("hadamard", 0, 4),
                                      ("identity", 2, 5)], (3, 4, 5)),
    "two_input_wx": ("two_input", 3, 4, [("identity", 0, 2), ("tanh", 1, 3),
                                         ("hadamard", 0, 4)], (2, 3, 4)),
}


def _fixed_cell(name, dropouts, concat=None):
    backbone, ninp, nhid, edges, concat = CELLS[name][:4] + (concat or CELLS[name][4],)
    g = Genotype("darts_rnn", (CellGenotype(
        "recurrent", tuple(Edge(op, s, d) for op, s, d in edges), concat),))
    torch.manual_seed(0)
    return FixedCell(g, ninp, nhid, dropouts, backbone).double(), edges, concat


def test_fixed_recurrent_cell_applies_the_x_and_h_masks_as_the_formula_says():
    """Training masks: x_t's mask on x_t, h_{t-1}'s on h_{t-1} and on every state before
    a node matrix; node = s + sigmoid(c) (op(h, s) - s) of its genotype input; output =
    mean of the concat nodes only; the masks are the same at every time step."""
    d = Dropouts(x=0.5, h=0.25)
    for name in CELLS:
        cell, edges, concat = _fixed_cell(name, d)
        masks = KeyedMasks()
        T, B = 3, 3
        x, h = _randn(T, B, cell.ninp, seed=1), _randn(B, cell.nhid, seed=2)
        mx, mh = masks.get((B, cell.ninp), d.x), masks.get((B, cell.nhid), d.h)
        out, last = cell(x, h, masks)
        ref = h
        for t in range(T):
            states, smasks = _inputs(cell, x[t], ref, mx, mh)
            for i, (op, src, _) in enumerate(edges):
                s = states[src]
                c, hh = _split((s * smasks[src]) @ cell.Ws[i], cell.nhid)
                states.append(s + torch.sigmoid(c) * (RNN_OPS[op](hh, s) - s))
                smasks.append(mh)
            ref = torch.stack([states[n] for n in concat]).mean(0)
            torch.testing.assert_close(out[t], ref, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(last, out[-1])


def _search_reference(cell, x, h, mx, mh, w):
    """The DARTS search cell written out: BN on s0 (single backbone); node i =
    BN(sum over predecessors j and non-none ops k of w[row, k] (S_j + c_j (op_k - S_j)))
    with rows ordered by node then predecessor; output = maturity-weighted mean."""
    states, smasks = _inputs(cell, x, h, mx, mh)
    if cell.backbone == "single":
        states[0] = _bn(states[0])
    nodes, row = [], 0
    for i in range(int(cell.active_nodes)):
        total = torch.zeros_like(h)
        for j, s in enumerate(list(states)):
            c, hh = _split((s * smasks[j]) @ cell.Ws[i], cell.nhid)
            for k, op in enumerate(cell.candidates):
                if op != "none":
                    total = total + w[row, k] * (s + torch.sigmoid(c) * (RNN_OPS[op](hh, s) - s))
            row += 1
        states.append(_bn(total))
        smasks.append(mh)
        nodes.append(states[-1])
    m = cell.maturity[: len(nodes)].to(F64)
    return sum(mi * n for mi, n in zip(m, nodes, strict=True)) / m.sum()


def test_search_recurrent_cell_is_the_normalised_mixture_of_its_formula():
    """Dense mixture with softmax weights (``none`` holding weight, so the live weights sum
    below 1), training masks, both backbones, and a grown node faded in part way."""
    d = Dropouts(x=0.5, h=0.25)
    ops = ("none", "tanh", "relu", "identity", "hadamard")
    for backbone, ninp in (("single", 3), ("two_input", 4), ("two_input", 3)):
        torch.manual_seed(0)
        cell = SearchCell(ninp, 4, 3, ops, d, backbone, init_nodes=2).double()
        cell.grow()
        cell.fade_in(0.25)
        E = cell.num_edges()
        assert E == sum(cell.num_inputs + i for i in range(3))
        w = torch.softmax(_randn(E, len(ops), seed=3), -1)
        masks = KeyedMasks()
        T, B = 2, 4
        x, h = _randn(T, B, ninp, seed=1), _randn(B, 4, seed=2)
        mx, mh = masks.get((B, ninp), d.x), masks.get((B, 4), d.h)
        out, _ = cell(x, h, masks, (w, None))
        ref = h
        for t in range(T):
            ref = _search_reference(cell, x[t], ref, mx, mh, w)
            torch.testing.assert_close(out[t], ref, rtol=1e-10, atol=1e-10,
                                       msg=f"{backbone} ninp={ninp}")


def test_a_sampled_recurrent_op_gets_the_gradient_of_the_dense_one_hot_mixture():
    """Hard sampling computes w[a] (S + c (op_a - S)): at a one-hot point the sampled op's
    weight gets the same gradient as in the dense mixture (its own weight scales it)."""
    ops = ("none", "tanh", "identity", "hadamard")
    torch.manual_seed(0)
    cell = SearchCell(4, 4, 3, ops, Dropouts(), "two_input").double()
    E = cell.num_edges()
    active = torch.tensor([1 + e % 3 for e in range(E)])
    x, h, g = _randn(3, 4, 4, seed=1), _randn(4, 4, seed=2), _randn(3, 4, 4, seed=4)
    grads = []
    for act in (active, None):
        w = F.one_hot(active, len(ops)).to(F64).requires_grad_()
        (cell(x, h, None, (w, act))[0] * g).sum().backward()
        grads.append(w.grad[torch.arange(E), active])
    assert grads[1].abs().min() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_weight_drop_zeroes_recurrent_weights_only():
    """DropConnect on the recurrent matrices: some entries of every node matrix and of the
    h_{t-1} rows of W0 get exactly zero gradient (dropped); the x_t rows of W0 never."""
    cell, _, _ = _fixed_cell("single", Dropouts(weight=0.5), concat=(1, 2, 3, 4))
    x, h = _randn(3, 3, cell.ninp, seed=1), _randn(3, cell.nhid, seed=2)
    (cell(x, h, Masks(True, seed=7))[0] * _randn(3, 3, cell.nhid, seed=3)).sum().backward()
    assert (cell.W0.grad[: cell.ninp] != 0).all()
    assert (cell.W0.grad[cell.ninp :] == 0).any()
    for W in cell.Ws:
        assert (W.grad == 0).any() and (W.grad != 0).any()


def test_the_x_mask_is_locked_over_time():
    """Variational dropout on x_t: one mask per window, so the inputs whose gradient is
    exactly zero (dropped) are the same features of the same sequences at every step."""
    cell, _, _ = _fixed_cell("single", Dropouts(x=0.5))
    x = _randn(4, 3, cell.ninp, seed=1).requires_grad_()
    h = _randn(3, cell.nhid, seed=2)
    (cell(x, h, Masks(True, seed=7))[0] * _randn(4, 3, cell.nhid, seed=3)).sum().backward()
    dropped = x.grad == 0
    assert dropped[0].any() and not dropped[0].all()
    assert all(torch.equal(dropped[t], dropped[0]) for t in range(4))


# --- the language model's dropouts ------------------------------------------------------
def _lm(**drop):
    d = Dropouts(**drop)
    g = Genotype("darts_rnn", (CellGenotype(
        "recurrent", (Edge("tanh", 0, 1), Edge("identity", 1, 2)), (1, 2)),))
    torch.manual_seed(0)
    net = RnnNetwork(FixedCell(g, 6, 6, d), 11, d).double().train()
    seen = []
    net.cell.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    tokens = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(1))
    out = net(LmInput(tokens, net.init_hidden(4), seed=3))
    ratio = seen[0] / net.encoder.weight[tokens]  # the cell's input over the plain embedding
    return net, out, tokens, ratio


def test_embedding_dropout_drops_whole_words_the_same_everywhere():
    """dropoute: one keep/drop per vocabulary word, applied to the whole embedding vector
    at every position the word occurs, kept words scaled by 1/keep."""
    _, _, tokens, ratio = _lm(embedding=0.5)
    per_pos = ratio[..., 0]
    assert torch.allclose(ratio, per_pos[..., None].expand_as(ratio), atol=1e-12)
    assert set(per_pos.unique().tolist()) == {0.0, 2.0}
    for v in tokens.unique():
        assert per_pos[tokens == v].unique().numel() == 1


def test_input_dropout_is_locked_over_time():
    """dropouti: a (sequence, feature) mask of 0 and 1/keep shared by every time step."""
    _, _, _, ratio = _lm(input=0.5)
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-12)
    assert set(ratio.round(decimals=9).unique().tolist()) == {0.0, 2.0}


def test_output_dropout_is_locked_over_time_and_feeds_the_decoder():
    """dropout: the decoder reads the cell outputs times one (sequence, feature) mask
    shared by every time step; the other dropouts leave the outputs alone."""
    net, out, _, _ = _lm(output=0.5)
    ratio = out.dropped / out.raw
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-12)
    assert set(ratio.round(decimals=9).unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(out.logits, net.decoder(out.dropped), rtol=0, atol=0)
    _, out, _, _ = _lm(input=0.5, embedding=0.3, x=0.2, h=0.2, weight=0.2)
    assert torch.equal(out.dropped, out.raw)


# --- DARTS CNN cells: drop path, the stateful-BN fallback ----------------------------------
def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    """Each sample is either all zero or x / keep; about drop_prob of them are zero."""
    torch.manual_seed(0)
    x = 1.0 + torch.rand(2000, 2, 2, 2, dtype=F64)
    y = drop_path(x, 0.3)
    dropped = (y == 0).flatten(1).all(1)
    kept = ~dropped
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    torch.testing.assert_close(y[kept], x[kept] / 0.7, rtol=1e-12, atol=0)
    assert 0.25 < dropped.double().mean().item() < 0.35


def _conv_cell(edges):
    g = CellGenotype("normal", tuple(Edge(op, s, d) for op, s, d in edges), (2, 3))
    torch.manual_seed(0)
    return ConvFixedCell(g, 4, 4, 4, False, False).double()


def test_drop_path_spares_identity_edges_and_is_off_in_eval():
    """DARTS drops the outputs of an edge's op, not of skip connections; evaluation
    never drops."""
    s0, s1 = _randn(6, 4, 5, 5, seed=1), _randn(6, 4, 5, 5, seed=2)
    skips = _conv_cell([("skip_connect", 0, 2), ("skip_connect", 1, 2),
                        ("skip_connect", 0, 3), ("skip_connect", 2, 3)]).train()
    assert all(isinstance(op, Identity) for op in skips.ops)
    torch.testing.assert_close(skips(s0, s1, 0.9), skips(s0, s1, 0.0), rtol=0, atol=0)
    convs = _conv_cell([("sep_conv_3x3", 0, 2), ("max_pool_3x3", 1, 2),
                        ("dil_conv_3x3", 0, 3), ("sep_conv_3x3", 2, 3)])
    torch.manual_seed(1)
    assert not torch.allclose(convs.train()(s0, s1, 0.5), convs(s0, s1, 0.0))
    convs.eval()
    torch.testing.assert_close(convs(s0, s1, 0.9), convs(s0, s1, 0.0), rtol=0, atol=0)


def test_the_network_hands_its_drop_path_probability_to_the_cells():
    """``drop_path_prob`` changes a training-mode forward, not an evaluation one, and the
    auxiliary logits come only in training."""
    torch.manual_seed(0)
    net = DartsNetwork(published_genotype("DARTS_V2"), 4, 3, 3, True, in_channels=1).double()
    x = _randn(4, 1, 8, 8, seed=1)
    evals, trains = [], []
    for p in (0.0, 0.5):  # (evaluation first: a training forward moves the BN statistics)
        net.drop_path_prob = p
        evals.append(net.eval()(x))
    for p in (0.0, 0.5):
        net.drop_path_prob = p
        torch.manual_seed(2)
        logits, aux = net.train()(x)
        assert aux.shape == logits.shape == (4, 3)
        trains.append(logits)
    assert evals[0].shape == (4, 3)
    torch.testing.assert_close(evals[0], evals[1], rtol=0, atol=0)
    assert not torch.allclose(trains[0], trains[1])


def test_mixed_edge_weights_every_op_off_the_fused_paths(monkeypatch):
    """A plugin op (no conv-BN, pool or identity shape) and BNs with running statistics
    swapped in after construction (e.g. SyncBatchNorm) skip the fused paths; the edge is
    still sum_k w_k op_k(x) over the non-none ops."""
    import diffnas.supernet.mixed as mixed

    class Plugin(nn.Module):
        def forward(self, x):
            return torch.tanh(2.0 * x) + 0.5

    real = mixed.create_op
    monkeypatch.setattr(mixed, "create_op", lambda name, C, stride, affine=False: (
        Plugin() if name == "plugin" else real(name, C, stride, affine=affine)))
    ops = ["none", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3", "plugin"]
    torch.manual_seed(0)
    m = MixedOp(4, 1, ops).double()
    for k in (2, 3):
        m.ops[k][1] = nn.BatchNorm2d(4, affine=False).double()  # running stats: not fused
    m.ops[4][1][3] = nn.BatchNorm2d(4, affine=False).double()
    x = _randn(3, 4, 5, 5, seed=1)
    w = torch.softmax(_randn(len(ops), seed=2), 0)
    want = sum(w[k] * m.ops[k](x) for k in range(1, len(ops)))
    torch.testing.assert_close(m(x, w), want, rtol=1e-10, atol=1e-10)


def test_darts_network_classifies_the_last_cell_with_affine_bns():
    """logits = linear(mean over pixels of the last cell's output); the retrain network's
    BNs (preprocessing included) are affine with running statistics."""
    torch.manual_seed(0)
    net = DartsNetwork(published_genotype("DARTS_V2"), 4, 3, 4, False, in_channels=1).double()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.affine and m.track_running_stats for m in bns)
    seen = []
    for cell in net.cells[-2:]:
        cell.register_forward_hook(lambda m, args, out: seen.append(out))
    logits = net.train()(_randn(4, 1, 8, 8, seed=1))
    assert seen[0].shape == seen[1].shape  # the last two cells' outputs could be mixed up
    torch.testing.assert_close(logits, F.linear(seen[1].mean((2, 3)), net.classifier.weight,
                                                net.classifier.bias), rtol=1e-10, atol=1e-10)


# --- NAS-Bench-201 skeleton ----------------------------------------------------------------
def _train_bn(h):
    return F.batch_norm(h, None, None, training=True, eps=1e-5)


def test_nb201_reduction_block_is_the_residual_basic_block():
    """out = Conv1x1(AvgPool2(x)) + BN(Conv3x3(ReLU(BN(Conv3x3_s2(ReLU(x)))))), training
    mode (fresh affine BN = identity)."""
    torch.manual_seed(0)
    block = ResNetBasicBlock(3, 6).double().train()
    x = _randn(4, 3, 6, 6, seed=1)
    a = _train_bn(F.conv2d(torch.relu(x), block.conv_a[1].weight, stride=2, padding=1))
    b = _train_bn(F.conv2d(torch.relu(a), block.conv_b[1].weight, padding=1))
    short = F.conv2d(F.avg_pool2d(x, 2), block.downsample[1].weight)
    torch.testing.assert_close(block(x), short + b, rtol=1e-10, atol=1e-10)


def test_nb201_head_is_bn_relu_pool_linear():
    """The logits are linear(mean over pixels of ReLU(BN(last cell's output)))."""
    g = CellGenotype("cell", (Edge("nor_conv_3x3", 0, 1), Edge("skip_connect", 0, 2),
                              Edge("avg_pool_3x3", 1, 2), Edge("nor_conv_1x1", 0, 3),
                              Edge("none", 1, 3), Edge("skip_connect", 2, 3)), (3,))
    torch.manual_seed(0)
    net = Nb201Network(g, 4, 1, 3, in_channels=1).double().train()
    seen = []
    net.lastact.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    logits = net(_randn(4, 1, 8, 8, seed=1))
    feats = torch.relu(_train_bn(seen[0])).mean((2, 3))
    torch.testing.assert_close(logits, F.linear(feats, net.classifier.weight,
                                                net.classifier.bias), rtol=1e-10, atol=1e-10)
