"""Third audit of the hypergradient rules (strategies/hypergrad.py, implicit.py,
single_level.py): what the first two audits' mutants left unchecked. Second-order DARTS's
forward-difference mode takes its virtual step exactly as the (clipped) weight step would:
the clip factor comes from the weight gradient alone, although the same backward pass also
yields grad_alpha L_train. Single-DARTS steps an architecture tensor that its one loss did
not reach with a zero gradient instead of failing. A weight the user froze is a constant
of every bilevel hypergradient (second order in each Hessian mode, iDARTS, unrolled ZARTS),
as it is of the weight optimizer. Checked against autograd and by hand in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_strategy
from test_hypergrad import _reference_unrolled_grad, _rel_err, _setup

from diffnas.strategies.hypergrad import clip_factor, grads, unrolled

F64 = torch.float64


# --- DARTS second order, hessian: fd_forward ----------------------------------------------
def test_the_forward_difference_virtual_step_is_the_clipped_weight_step():
    """``fd_forward`` reuses the virtual step's backward pass for grad_alpha L_train, but
    w' is still ``w - xi (m buf + c grad_w L_train + wd w)`` with ``c`` the weight step's
    clip factor, ``min(1, grad_clip / ||grad_w||)``: the alphas' gradient does not enter
    that norm. The validation loss is evaluated at the weights a real (clipped) weight step
    reaches, and the hypergradient matches autograd through that step."""
    s, train, val = _setup({"name": "darts", "order": 2, "w_optim": {"grad_clip": 0.1}})
    params = list(s.supernet.parameters())
    g_w = grads(s.loss(train, s.arch_weights().detach())[0], params)
    assert clip_factor(g_w, 0.1) < 0.5  # the clip bites
    ref = _reference_unrolled_grad(s, train, val)
    seen = []
    loss = s.loss

    def recorded(batch, *args, **kwargs):
        if batch is val:
            seen.append({n: p.detach().clone() for n, p in kwargs["params"].items()})
        return loss(batch, *args, **kwargs)

    s.loss = recorded
    got, _ = unrolled(s, train, val, hessian="fd_forward", fd_radius=1e-6)
    del s.loss
    assert _rel_err(got, ref) < 1e-6
    (w_prime,) = seen
    s.weight_step(train, s.arch_weights())  # the real step: momentum, decay, clipped
    for n, p in s.supernet.named_parameters():
        torch.testing.assert_close(w_prime[n], p.detach(), rtol=0, atol=1e-12)


# --- single level: an alpha the loss does not reach ------------------------------------------
def test_single_level_steps_an_alpha_the_loss_did_not_reach_with_a_zero_gradient():
    """An architecture tensor the one loss does not depend on (here the reduction cell's,
    held at a fixed uniform mix, as with a cell that is not searched) has no gradient after
    backward: it is stepped with a zero gradient (Adam without decay leaves it where it is)
    while the searched cell's alphas move along the loss's gradient."""
    s = tiny_strategy({"name": "single_level", "a_optim": {"lr": 0.01, "weight_decay": 0.0}},
                      dtype=F64)
    relaxed = s.arch_weights

    def reduce_held():
        aw = relaxed()
        aw.weights["reduce"] = torch.full_like(aw.weights["reduce"].detach(),
                                               1.0 / aw.weights["reduce"].shape[1])
        return aw

    s.arch_weights = reduce_held
    batch = tiny_batch(4, 1, F64)
    names = list(s.arch_params.as_dict())
    normal, reduce = (s.alphas()[names.index(g)] for g in ("normal", "reduce"))
    want = grads(s.loss(batch, s.arch_weights())[0], [normal])[0]
    n0, r0 = normal.detach().clone(), reduce.detach().clone()
    s.step(batch, None)
    assert torch.equal(reduce.grad, torch.zeros_like(reduce)) and torch.equal(reduce, r0)
    torch.testing.assert_close(normal.grad, want, rtol=1e-10, atol=1e-12)
    # Adam's first step: lr * g / (|g| + eps)
    torch.testing.assert_close(normal.detach(), n0 - 0.01 * want / (want.abs() + 1e-8),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("section", [
    {"name": "darts", "order": 2, "hessian": "fd"},
    {"name": "darts", "order": 2, "hessian": "fd_forward"},
    {"name": "darts", "order": 2, "hessian": "exact"},
    {"name": "implicit", "K": 3},
    {"name": "zero_order", "estimator": "rs", "unroll": True},
], ids=["fd", "fd_forward", "exact", "implicit", "zero_order_unroll"])
def test_a_frozen_weight_is_a_constant_of_every_hypergradient(section):
    """A weight the user froze (requires_grad False) is not trained by the weight optimizer,
    so the hypergradient treats it as a constant: every bilevel rule steps (it used to fail
    with 'One of the differentiated Tensors does not require grad'), the weight does not
    move and stays frozen, the other weights move."""
    s = tiny_strategy(section, dtype=torch.float64)
    frozen = next(s.supernet.parameters())
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    others = [p.detach().clone() for p in list(s.supernet.parameters())[1:]]
    alphas = [a.detach().clone() for a in s.alphas()]
    stats = s.step(tiny_batch(6, 1, torch.float64), tiny_batch(6, 2, torch.float64))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert frozen.requires_grad is False and torch.equal(frozen.detach(), before)
    assert any(not torch.equal(p.detach(), o)
               for p, o in zip(list(s.supernet.parameters())[1:], others, strict=True))
    assert any(not torch.equal(a.detach(), a0) for a, a0 in zip(s.alphas(), alphas, strict=True))


def test_the_unrolled_hypergradient_with_a_frozen_weight_matches_autograd():
    """DARTS second order with a frozen weight, against autograd through the virtual step
    w'(alpha) of the trainable weights only (the frozen one held at its value), float64."""
    s = tiny_strategy({"name": "darts", "order": 2}, dtype=torch.float64)
    train, val = tiny_batch(6, 1, torch.float64), tiny_batch(6, 2, torch.float64)
    s.weight_step(train, s.arch_weights())  # a momentum buffer to unroll with
    s.w_optimizer.param_groups[0]["lr"] = 0.1
    next(s.supernet.parameters()).requires_grad_(False)
    ref = _reference_unrolled_grad(s, train, val)
    got, _ = unrolled(s, train, val, hessian="exact")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
