"""The DARTS recurrent space: supernet shapes, the fixed cell against the paper's equations,
discretization on hand-made alphas, the published genotype's size, second-order steps."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.engine.lm import HiddenState, LanguageModelObjective, LmBatch
from diffnas.genotype import CellGenotype, Edge, Genotype, from_darts_str, published_genotype
from diffnas.genotype.discretize import discretize
from diffnas.spaces import DataShape, create_space
from diffnas.strategies import create_strategy
from diffnas.strategies.hypergrad import unrolled
from diffnas.supernet.rnn import LmInput

V = 11  # tiny vocabulary
F64 = torch.float64


def rnn_space(**kw):
    section = {"name": "darts_rnn", "ninp": 6, "nhid": 6, "nodes": 3, "dropout": 0.2,
               "dropouth": 0.2, "dropoutx": 0.2, "dropouti": 0.2, "dropoute": 0.1}
    section.update(kw)
    return create_space(section, DataShape(num_classes=V))


def lm_batch(net, T=4, B=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (T + 1, B), generator=g)
    h = 0.1 * torch.randn(B, net.nhid, generator=g, dtype=dtype)
    return LmBatch(x[:-1], x[1:], HiddenState(h), seed=100 + seed)


@pytest.mark.parametrize("backbone, ops", [
    ("single", None), ("two_input", ["none", "tanh", "relu", "sigmoid", "identity", "hadamard"]),
])
def test_supernet_forward_backward_shapes(backbone, ops):
    space = rnn_space(backbone=backbone, **({"ops": ops} if ops else {}))
    torch.manual_seed(0)
    net, arch = space.build_supernet(), ArchParams(space)
    k = 1 if backbone == "single" else 2
    assert arch["recurrent"].shape == (sum(k + i for i in range(3)), len(space.config.ops))
    batch = lm_batch(net)
    out = net(LanguageModelObjective().inputs(batch), ArchWeights(
        {"recurrent": torch.softmax(arch["recurrent"], -1)}))
    assert out.logits.shape == (4, 3, V) and out.hidden.shape == (3, 6)
    assert out.raw.shape == (4, 3, 6) and torch.equal(out.hidden, out.raw[-1])
    loss, stats = LanguageModelObjective()(out, batch)
    loss.backward()
    assert batch.state.pending is not None and stats["loss"] > 0
    for name, p in list(net.named_parameters()) + [("alpha", arch["recurrent"])]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the two parameter sets are disjoint
    assert not {id(p) for p in net.parameters()} & {id(p) for p in arch.parameters()}


def _reference_darts_cell(x, h, W0, Ws, edges, concat, acts):
    """The paper's cell, written out (eval mode, no dropout)."""
    nhid = h.shape[-1]
    c0, h0 = torch.split(torch.cat([x, h], -1) @ W0, nhid, -1)
    states = [h + c0.sigmoid() * (h0.tanh() - h)]
    for i, (op, src) in enumerate(edges):
        c, hh = torch.split(states[src] @ Ws[i], nhid, -1)
        states.append(states[src] + c.sigmoid() * (acts[op](hh) - states[src]))
    return torch.stack([states[i] for i in concat], -1).mean(-1)


def test_fixed_cell_matches_the_paper_equations():
    g = published_genotype("DARTS_RNN_V2")
    net = rnn_space(nodes=8).build_network(g).eval()
    acts = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
            "identity": lambda t: t}
    edges = [(e.op, e.src) for e in sorted(g.cell("recurrent").edges, key=lambda e: e.dst)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, generator=gen)
    h = torch.randn(2, 6, generator=gen)
    out, last = net.cell(x, h)
    ref = h
    for t in range(5):
        ref = _reference_darts_cell(x[t], ref, net.cell.W0, net.cell.Ws, edges, range(1, 9), acts)
        assert torch.allclose(out[t], ref, atol=1e-6)
    assert torch.equal(last, out[-1])


def test_discretization_keeps_the_strongest_non_none_pair_per_node():
    space = rnn_space()  # ops: none, tanh, relu, sigmoid, identity; nodes 1..3
    rows = {  # edge label -> logits
        "recurrent/n1/e0": [9.0, 0.0, 2.0, 0.0, 0.0],  # none dominates; relu is kept anyway
        "recurrent/n2/e0": [0.0, 2.0, 0.0, 0.0, 0.0],  # tanh 2
        "recurrent/n2/e1": [0.0, 0.0, 0.0, 2.5, 0.0],  # sigmoid 2.5 wins node 2
        "recurrent/n3/e0": [0.0, 0.0, 0.0, 0.0, 1.0],  # identity, tied with e2 -> lower src
        "recurrent/n3/e1": [5.0, 0.0, 0.0, 0.0, 1.5],  # identity 1.5 but none eats its weight
        "recurrent/n3/e2": [0.0, 0.0, 0.0, 0.0, 1.0],
    }
    arch = ArchParams(space)
    assert [e.label for e in arch.edges["recurrent"]] == list(rows)
    logits = {"recurrent": torch.tensor(list(rows.values()))}
    g = discretize(logits, space)
    assert g.cell("recurrent").edges == (
        Edge("relu", 0, 1), Edge("sigmoid", 1, 2), Edge("identity", 0, 3))
    assert g.cell("recurrent").concat == (1, 2, 3)
    space.validate(g)
    assert from_darts_str(str(g)) == g  # the paper's text form round-trips


def test_validation_rejects_bad_genotypes():
    space = rnn_space()
    bad = Genotype("darts_rnn", (CellGenotype("recurrent", (
        Edge("relu", 0, 1), Edge("relu", 0, 2), Edge("relu", 1, 2), Edge("tanh", 2, 3)),
        (1, 2, 3)),))
    with pytest.raises(ValueError, match="node 2 has 2 inputs"):
        space.validate(bad)
    with pytest.raises(ValueError, match="unknown recurrent op"):
        rnn_space(ops=["none", "tanh", "gelu"])


def test_published_genotype_builds_at_paper_size():
    g = published_genotype("DARTS_RNN_V2")
    space = create_space({"name": "darts_rnn"}, DataShape(num_classes=10000))
    net = space.build_network(g, ninp=850, nhid=850)
    n = sum(p.numel() for p in net.parameters())
    H, Vp = 850, 10000
    # tied embedding/decoder + decoder bias + W0 + 8 node matrices
    assert n == Vp * H + Vp + (2 * H) * (2 * H) + 8 * H * (2 * H) == 22_960_000
    assert abs(n - 23e6) / 23e6 < 0.01
    assert net.decoder.weight is net.encoder.weight


def _strategy(order=2, **kw):
    space = rnn_space(**kw)
    torch.manual_seed(0)
    net, arch = space.build_supernet().to(F64), ArchParams(space).to(F64)
    with torch.no_grad():
        arch["recurrent"].normal_(0, 0.5)
    return create_strategy({"name": "darts", "order": order,
                            "w_optim": {"lr": 0.5, "momentum": 0.9, "grad_clip": 1e9}},
                           net, arch, LanguageModelObjective(), epochs=2)


def _reference_unrolled(s, train, val):
    """Autograd through w' = w - xi (m buf + grad_w L_train + wd w), dropout included
    (the masks are fixed by each batch's seed); plain cross-entropy in every pass, as in
    DARTS (AR/TAR regularize the real weight step only)."""
    named = dict(s.supernet.named_parameters())
    cfg = s.config.w_optim
    obj = s.objective
    loss = obj(functional_call(s.supernet, named, (obj.inputs(train), s.arch_weights())), train,
               regularize=False)[0]
    grads = torch.autograd.grad(loss, list(named.values()), create_graph=True)
    w_prime = {}
    for (n, p), g in zip(named.items(), grads, strict=True):
        buf = s.w_optimizer.state[p]["momentum_buffer"]
        w_prime[n] = p.detach() - s.lr * (cfg.momentum * buf + g + cfg.weight_decay * p.detach())
    out = functional_call(s.supernet, w_prime, (obj.inputs(val), s.arch_weights()))
    return torch.autograd.grad(obj(out, val, regularize=False)[0], s.alphas())


def _rel(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def test_second_order_hypergradient_on_the_rnn_space():
    s = _strategy()
    train, val = lm_batch(s.supernet, seed=1, dtype=F64), lm_batch(s.supernet, seed=2, dtype=F64)
    s.weight_step(train, s.arch_weights())  # a momentum buffer to unroll with
    ref = _reference_unrolled(s, train, val)
    exact, _ = unrolled(s, train, val, hessian="exact")
    fd, _ = unrolled(s, train, val, hessian="fd", fd_radius=1e-5)
    assert _rel(exact, ref) < 1e-8
    assert _rel(fd, ref) < 1e-3  # only holds because the dropout masks repeat within a step


def test_second_order_darts_step_updates_alphas_and_weights():
    s = _strategy()
    a0 = s.arch_params["recurrent"].detach().clone()
    w0 = [p.detach().clone() for p in s.supernet.parameters()]
    train, val = lm_batch(s.supernet, seed=1, dtype=F64), lm_batch(s.supernet, seed=2, dtype=F64)
    stats = s.step(train, val)
    assert {"loss", "val_loss"} <= set(stats)
    assert not torch.equal(a0, s.arch_params["recurrent"])
    assert all(not torch.equal(a, b) for a, b in zip(w0, s.supernet.parameters(), strict=True))
    # the objective left each stream's next hidden state, computed from its own batch
    assert train.state.pending.shape == val.state.pending.shape == (3, 6)


def test_dropout_masks_follow_the_batch_seed_and_vanish_in_eval():
    g = published_genotype("DARTS_RNN_V1")
    net = rnn_space(nodes=8, weight_drop=0.3).build_network(g)
    plain = rnn_space(nodes=8, dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0,
                      dropoute=0.0).build_network(g)
    plain.load_state_dict(net.state_dict())
    x = torch.randint(0, V, (5, 3), generator=torch.Generator().manual_seed(0))
    h = net.init_hidden(3)
    a, b = net(LmInput(x, h, 7)).logits, net(LmInput(x, h, 7)).logits
    assert torch.equal(a, b)  # one seed, one set of masks (virtual steps rely on it)
    assert not torch.allclose(a, net(LmInput(x, h, 8)).logits)
    net.eval()
    assert torch.equal(net(LmInput(x, h, 7)).logits, plain(LmInput(x, h, 7)).logits)
    # weight drop alone changes the training-mode output
    only_wd = rnn_space(nodes=8, dropout=0.0, dropouth=0.0, dropoutx=0.0, dropouti=0.0,
                        dropoute=0.0, weight_drop=0.3).build_network(g)
    only_wd.load_state_dict(net.state_dict())
    dropped = only_wd(LmInput(x, h, 7)).logits
    assert not torch.allclose(dropped, plain.eval()(LmInput(x, h, 7)).logits)


def test_search_cell_names_a_batch_of_one():
    """Nodes are normalised by batch statistics in eval mode too: a batch of one sequence
    cannot be, and the error says which setting to raise instead of torch's BN message."""
    space = rnn_space()
    torch.manual_seed(0)
    net, arch = space.build_supernet().eval(), ArchParams(space)
    w = ArchWeights({"recurrent": torch.softmax(arch["recurrent"], -1)})
    batch = lm_batch(net, B=2)
    assert net(LanguageModelObjective().inputs(batch), w).logits.shape == (4, 2, V)
    batch = lm_batch(net, B=1)
    with pytest.raises(ValueError, match=r"got eval batch size 1 \(lm.eval_batch_size"):
        net(LanguageModelObjective().inputs(batch), w)
    with pytest.raises(ValueError, match="got batch size 1$"):
        net.train()(LanguageModelObjective().inputs(batch), w)


def test_recurrent_concat_is_validated():
    space = rnn_space()
    edges = (Edge("relu", 0, 1), Edge("tanh", 1, 2), Edge("sigmoid", 2, 3))
    for concat, match in [((), "concat is empty"), ((1, 1, 2, 3), "more than once"),
                          ((1, 2, 4), r"node\(s\) \[4\]")]:
        with pytest.raises(ValueError, match=match):
            space.validate(Genotype("darts_rnn", (CellGenotype("recurrent", edges, concat),)))


def test_the_architecture_passes_use_the_plain_cross_entropy():
    """AR/TAR regularize the weights: in the weight step, not in the alpha gradient."""
    from diffnas.strategies.hypergrad import first_order

    grads = []
    for alpha, beta in ((0.0, 0.0), (2.0, 1e-3)):
        s = _strategy(order=1)
        s.objective = LanguageModelObjective(alpha, beta)
        val = lm_batch(s.supernet, seed=2, dtype=F64)
        grads.append(first_order(s, val, val)[0][0])
    assert torch.equal(grads[0], grads[1])
    s = _strategy(order=1)
    s.objective = LanguageModelObjective(2.0, 1e-3)
    train = lm_batch(s.supernet, seed=1, dtype=F64)
    reg = s.loss(train, s.arch_weights(), regularize=True)[0]
    plain = s.loss(train, s.arch_weights())[0]
    assert reg.item() > plain.item()  # the weight step's loss carries them


def test_a_single_level_step_carries_the_weight_regularizers():
    """Single-level strategies' one loss is also the weight step's: AR/TAR are in it."""
    moved = []
    for alpha, beta in ((0.0, 0.0), (2.0, 1e-3)):
        space = rnn_space()
        torch.manual_seed(0)
        net, arch = space.build_supernet().to(F64), ArchParams(space).to(F64)
        s = create_strategy({"name": "single_level"}, net, arch,
                            LanguageModelObjective(alpha, beta), epochs=2)
        s.step(lm_batch(s.supernet, seed=1, dtype=F64), None)
        moved.append([p.detach().clone() for p in s.supernet.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(*moved, strict=True))


def test_a_sampled_recurrent_cell_gives_unsampled_ops_the_same_gradient_as_other_spaces():
    """GDAS on the recurrent cell: only the sampled op of each edge runs and the output is
    that of the hard one-hot mixture, yet every unsampled op's weight gets the gradient
    sum(dL/d node) (mixed.unsampled_weights), one value per edge, as on darts_cnn; an edge
    whose sample is ``none`` passes gradient to its other ops too."""
    space = rnn_space(backbone="two_input", ops=["none", "tanh", "relu", "identity"])
    torch.manual_seed(0)
    net = space.build_supernet().double().eval()
    E, K = ArchParams(space)["recurrent"].shape
    active = torch.tensor([(e % (K - 1)) + 1 for e in range(E)])
    active[1] = 0  # one edge samples `none`
    w = torch.nn.functional.one_hot(active, K).to(F64).requires_grad_()
    batch = lm_batch(net, dtype=F64)
    inp = LanguageModelObjective().inputs(batch)
    out = net(inp, ArchWeights({"recurrent": w}, {"recurrent": active}))
    dense = net(inp, ArchWeights({"recurrent": w.detach()}))  # every op, weights one-hot
    assert torch.allclose(out.logits, dense.logits, atol=1e-12)
    out.logits.square().sum().backward()
    for e in range(E):
        others = [k for k in range(K) if k != int(active[e])]
        g = w.grad[e, others]
        assert g.abs().min() > 0, e
        assert torch.allclose(g, g[:1].expand_as(g)), e
