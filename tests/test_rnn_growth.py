"""Growing recurrent cells (function-preserving), the hadamard op, and the growth schedule."""

from __future__ import annotations

import logging

import pytest
import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.engine.lm import GrowthSchedule
from diffnas.ops.rnn import create_rnn_op, list_rnn_ops
from diffnas.spaces import DataShape, create_space
from diffnas.supernet.rnn import LmInput

F64 = torch.float64


def growing(**kw):
    section = {"name": "darts_rnn", "ninp": 5, "nhid": 5, "nodes": 4,
               "ops": ["none", "tanh", "relu", "sigmoid", "identity", "hadamard"],
               "growth": {"mode": "grow_prune", "init_nodes": 2, "grow_epochs": [1, 2],
                          "fade_steps": 4}}
    section.update(kw)
    return create_space(section, DataShape(num_classes=7))


def _setup(train: bool, dtype=torch.float32, **kw):
    space = growing(**kw)
    torch.manual_seed(0)
    net, arch = space.build_supernet().to(dtype), ArchParams(space).to(dtype)
    with torch.no_grad():
        arch["recurrent"].normal_(0, 1.0)
    aw = ArchWeights({"recurrent": torch.softmax(arch["recurrent"], -1).detach()})
    g = torch.Generator().manual_seed(1)
    inp = LmInput(torch.randint(0, 7, (6, 3), generator=g),
                  torch.randn(3, 5, generator=g, dtype=dtype), seed=5)
    return net.train(train), aw, inp


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("backbone", ["single", "two_input"])
def test_growth_preserves_the_function(train, backbone):
    net, aw, inp = _setup(train, backbone=backbone)
    before = net(inp, aw)
    assert net.grow() == 3
    after = net(inp, aw)
    assert (after.logits - before.logits).abs().max().item() < 1e-6
    assert (after.hidden - before.hidden).abs().max().item() < 1e-6
    # the new node is real: once it fades in, the function changes
    net.cell.fade_in(0.5)
    assert (net(inp, aw).logits - before.logits).abs().max().item() > 1e-4


def test_growth_gives_the_new_node_gradients_once_fading_starts():
    net, aw, inp = _setup(True)
    net.grow()
    net(inp, aw).logits.sum().backward()
    assert net.cell.Ws[2].grad.abs().sum() == 0  # output weight 0: no influence yet
    net.zero_grad()
    net.cell.fade_in(0.25)
    net(inp, aw).logits.sum().backward()
    assert net.cell.Ws[2].grad.abs().sum() > 0
    assert net.cell.Ws[3].grad is None or net.cell.Ws[3].grad.abs().sum() == 0  # not grown


def test_growth_schedule_grows_at_the_configured_epochs_and_fades_in():
    space = growing()
    net = space.build_supernet()
    cb = GrowthSchedule(net, space)
    seen = []
    for epoch in range(4):
        cb.on_epoch_start(None, epoch)
        seen.append(int(net.cell.active_nodes))
        cb.on_step_end(None, 0, {})
    assert seen == [2, 3, 4, 4]
    assert net.cell.maturity.tolist() == [1.0, 1.0, 0.75, 0.5]  # 3 and 2 steps of 1/4
    cb.on_epoch_start(None, 2)  # resumed: nothing grows twice
    assert int(net.cell.active_nodes) == 4
    with pytest.raises(ValueError, match="already has all 4 nodes"):
        net.grow()


def test_few_shot_sub_supernets_grow_and_fade_in_with_the_supernet(caplog):
    """After a few-shot split, training runs in the sub-supernets: they grow and fade in
    too, so exporting the best one into the supernet keeps the growth. The log numbers the
    epoch as the epoch lines do (it said "epoch 1" at the start of "search epoch 2/4")."""
    from diffnas.engine.lm import LanguageModelObjective
    from diffnas.strategies import create_strategy

    space = growing()
    s = create_strategy({"name": "few_shot", "split_epoch": 1}, space.build_supernet(),
                        ArchParams(space), LanguageModelObjective(), epochs=4)
    cb = GrowthSchedule(s.supernets, space)
    cb.on_epoch_start(None, 0)
    s.split()
    assert len(s.supernets()) == 1 + len(s.subnets) > 2
    with caplog.at_level(logging.INFO, logger="diffnas"):
        cb.on_epoch_start(None, 1)
    assert "growth: search epoch 2 (grow_epochs counts it as 1) starts with a new node, 3 " \
           "in all" in caplog.text
    cb.on_step_end(None, 0, {})
    for net in s.supernets():
        assert int(net.cell.active_nodes) == 3
        assert net.cell.maturity.tolist() == [1.0, 1.0, 0.25, 0.0]
    s.export(1)
    assert int(s.supernet.cell.active_nodes) == 3  # the export keeps the growth
    cb.on_epoch_start(None, 2)  # no node grows twice
    assert [int(n.cell.active_nodes) for n in s.supernets()] == [4] * len(s.supernets())


def test_growth_config_errors():
    with pytest.raises(ValueError, match="grow_epochs must list 2 epochs"):
        growing(growth={"mode": "grow_prune", "init_nodes": 2, "grow_epochs": [1]})
    with pytest.raises(ValueError, match="unknown growth mode"):
        growing(growth={"mode": "shrink"})
    # growth settings without mode: grow_prune searched every node from the start, silently
    with pytest.raises(ValueError, match=r"growth.init_nodes=3, growth.grow_epochs=\[1\] set "
                                         r"with growth.mode='prune', which grows nothing"):
        growing(growth={"init_nodes": 3, "grow_epochs": [1]})
    with pytest.raises(ValueError, match=r"growth.fade_steps=5 set with growth.mode='prune'"):
        growing(growth={"mode": "prune", "fade_steps": 5})


def test_hadamard_is_the_elementwise_product_and_passes_gradcheck():
    op = create_rnn_op("hadamard")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    s = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.equal(op(h, s), h * s)
    assert torch.autograd.gradcheck(op, (h, s))
    assert "hadamard" in list_rnn_ops()


def test_search_cell_with_hadamard_passes_gradcheck():
    """The whole mixed cell (every op, hadamard included), float64, w.r.t. inputs and alphas."""
    net, _, _ = _setup(False, F64)
    cell = net.cell
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=g, dtype=F64, requires_grad=True)
    h = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    a = torch.randn(cell.num_edges(), len(cell.candidates), generator=g, dtype=F64,
                    requires_grad=True)

    def f(x, h, a):
        return cell(x, h, None, (torch.softmax(a, -1), None))[0]

    assert torch.autograd.gradcheck(f, (x, h, a))
