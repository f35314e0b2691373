"""Weights and architecture parameters are disjoint; each optimizer moves only its own."""

from __future__ import annotations

import torch
from conftest import tiny_batch, tiny_strategy


def test_parameter_sets_are_disjoint():
    s = tiny_strategy({"name": "darts"})
    w = {id(p) for p in s.supernet.parameters()}
    a = {id(p) for p in s.alphas()}
    assert w and a and not (w & a)
    opt_w = {id(p) for g in s.w_optimizer.param_groups for p in g["params"]}
    opt_a = {id(p) for g in s.a_optimizer.param_groups for p in g["params"]}
    assert opt_w == w and opt_a == a


def test_a_supernet_that_holds_the_alphas_is_refused():
    """A supernet keeping ArchParams as a submodule would hand the alphas to the weight
    optimizer too (two optimizers moving one parameter), silently."""
    import pytest
    from conftest import tiny_space

    from diffnas.arch import ArchParams
    from diffnas.strategies import create_strategy
    from diffnas.strategies.objective import ClassificationObjective

    space = tiny_space()
    supernet, arch = space.build_supernet(), ArchParams(space)
    supernet.arch = arch
    with pytest.raises(ValueError, match="architecture parameter.* also among the supernet"):
        create_strategy({"name": "darts"}, supernet, arch, ClassificationObjective(), epochs=1)


def test_supernet_output_is_driven_by_the_weights_it_is_given():
    """The supernet keeps no alphas: its output follows the arch weights passed in."""
    s = tiny_strategy({"name": "darts"})
    x, _ = tiny_batch(4, 1)
    aw = s.arch_weights()
    out1 = s.supernet(x, aw)
    with torch.no_grad():
        for p in s.alphas():
            p.add_(torch.randn_like(p))
    out2 = s.supernet(x, s.arch_weights())
    assert not torch.allclose(out1, out2)
    assert torch.equal(s.supernet(x, aw), out1)  # same weights in, same output out
    assert not any("alpha" in n or "arch" in n for n, _ in s.supernet.named_parameters())


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_each_step_moves_only_its_own_parameters():
    s = tiny_strategy({"name": "darts", "order": 1})
    train, val = tiny_batch(4, 1), tiny_batch(4, 2)
    w0, a0 = _snapshot(s.supernet.parameters()), _snapshot(s.alphas())
    s.weight_step(train, s.arch_weights())
    assert all(torch.equal(x, p) for x, p in zip(a0, s.alphas()))
    assert any(not torch.equal(x, p) for x, p in zip(w0, s.supernet.parameters()))

    w1 = _snapshot(s.supernet.parameters())
    from diffnas.strategies.hypergrad import first_order

    s.a_optimizer.zero_grad()
    grads, _ = first_order(s, train, val)
    s.set_alpha_grads(grads)
    s.a_optimizer.step()
    assert all(torch.equal(x, p) for x, p in zip(w1, s.supernet.parameters()))
    assert any(not torch.equal(x, p) for x, p in zip(a0, s.alphas()))


def test_second_order_step_leaves_weights_as_a_plain_weight_step_would():
    """The unrolled alpha computation must not change w (virtual steps are virtual)."""
    torch.manual_seed(0)
    s = tiny_strategy({"name": "darts", "order": 2})
    train, val = tiny_batch(4, 1), tiny_batch(4, 2)
    w0 = _snapshot(s.supernet.parameters())
    from diffnas.strategies.hypergrad import unrolled

    unrolled(s, train, val)
    assert all(torch.equal(x, p) for x, p in zip(w0, s.supernet.parameters()))
