"""Hypergradients against exact autograd on a tiny float64 supernet."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, tiny_batch, tiny_strategy
from torch.func import functional_call

from diffnas.ops import twice_differentiable
from diffnas.strategies.hypergrad import first_order, mixed_hvp_exact, mixed_hvp_fd, unrolled

F64 = torch.float64


def _prime_momentum(s, batch):
    """One real weight step so the optimizer has a momentum buffer to unroll with."""
    s.weight_step(batch, s.arch_weights())


def _reference_unrolled_grad(s, train, val):
    """Autograd through w'(alpha) = w - xi (m buf + c grad_w L_train(w, alpha) + wd w), with
    c = min(1, clip / ||grad||) held constant (the weight step's gradient clipping); a
    frozen weight (requires_grad False) stays at its value."""
    named = {n: p for n, p in s.supernet.named_parameters() if p.requires_grad}
    cfg = s.config.w_optim
    aw = s.arch_weights()
    x, _ = train
    with twice_differentiable():  # the reference differentiates through a gradient
        loss = s.objective(functional_call(s.supernet, named, (x, aw)), train)[0]
    grads = torch.autograd.grad(loss, list(named.values()), create_graph=True, allow_unused=True,
                                materialize_grads=True)  # GDAS leaves unsampled ops unused
    norm = torch.sqrt(sum((g.detach() ** 2).sum() for g in grads))
    c = min(1.0, float(cfg.grad_clip / (norm + 1e-6)))
    w_prime = {}
    for (n, p), g in zip(named.items(), grads):
        buf = s.w_optimizer.state.get(p, {}).get("momentum_buffer")  # (None: torch 2.3)
        buf = torch.zeros_like(p) if buf is None else buf
        w_prime[n] = p.detach() - s.lr * (cfg.momentum * buf + c * g
                                          + cfg.weight_decay * p.detach())
    xv, _ = val
    val_loss = s.objective(functional_call(s.supernet, w_prime, (xv, s.arch_weights())), val)[0]
    return torch.autograd.grad(val_loss, s.alphas())


def _rel_err(a, b):
    a = torch.cat([t.flatten() for t in a])
    b = torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def _setup(section=None):
    s = tiny_strategy(section or {"name": "darts", "order": 2}, dtype=F64)
    train, val = tiny_batch(6, 1, F64), tiny_batch(6, 2, F64)
    _prime_momentum(s, train)
    s.w_optimizer.param_groups[0]["lr"] = 0.1  # a large xi makes the second-order term visible
    return s, train, val


def test_unrolled_fd_matches_autograd_through_virtual_step():
    # A radius inside the region where the tiny ReLU net is smooth (see unrolled's docs:
    # the paper's 0.01 straddles activation kinks on a network this small).
    s, train, val = _setup()
    ref = _reference_unrolled_grad(s, train, val)
    got, _ = unrolled(s, train, val, hessian="fd", fd_radius=1e-6)
    fo, _ = first_order(s, train, val)
    assert _rel_err(got, ref) < 1e-3
    # the second-order term matters here: the first-order gradient is clearly different
    assert _rel_err(fo, ref) > 1e-2


def test_unrolled_forward_difference_matches_autograd_with_one_pass_fewer():
    s, train, val = _setup()
    ref = _reference_unrolled_grad(s, train, val)
    passes = {"train": 0, "val": 0}
    loss = s.loss

    def counted(batch, *args, **kwargs):
        passes["train" if batch is train else "val"] += 1
        return loss(batch, *args, **kwargs)

    s.loss = counted
    got, _ = unrolled(s, train, val, hessian="fd_forward", fd_radius=1e-6)
    assert passes == {"train": 2, "val": 1}  # virtual step (reused) + one perturbed point
    assert _rel_err(got, ref) < 1e-3
    passes.update(train=0, val=0)
    unrolled(s, train, val, hessian="fd", fd_radius=1e-6)
    assert passes == {"train": 3, "val": 1}


def test_unrolled_rejects_an_unknown_hessian_mode():
    s, train, val = _setup()
    with pytest.raises(ValueError, match="unknown hessian mode 'central'"):
        unrolled(s, train, val, hessian="central")
    with pytest.raises(ValueError, match="only applies to order=2"):
        tiny_strategy({"name": "darts", "order": 1, "hessian": "fd_forward"}, dtype=F64)
    # a finite-difference radius where no finite difference is taken was silently ignored
    for section in ({"order": 1, "fd_radius": 0.5}, {"order": 2, "hessian": "exact",
                                                    "fd_radius": 0.5}):
        with pytest.raises(ValueError, match="fd_radius=0.5 only applies to a finite-diff"):
            tiny_strategy({"name": "darts", **section}, dtype=F64)


def test_unrolled_exact_matches_tightly():
    s, train, val = _setup()
    ref = _reference_unrolled_grad(s, train, val)
    got, _ = unrolled(s, train, val, hessian="exact")
    assert _rel_err(got, ref) < 1e-9


def test_fd_hvp_matches_double_backward():
    s, train, _ = _setup()
    g = torch.Generator().manual_seed(3)
    vec = {
        n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in s.supernet.named_parameters()
    }
    fd = mixed_hvp_fd(s, train, vec, r=1e-6)
    ex = mixed_hvp_exact(s, train, vec)
    assert _rel_err(fd, ex) < 1e-4


def test_fd_hvp_moves_the_weights_by_the_radius_whatever_the_vector_s_norm():
    """eps = r / ||v||: the perturbed weights w +- eps v lie at distance r from w (the
    paper's rule), for a vector of any norm."""
    s, train, _ = _setup()
    g = torch.Generator().manual_seed(3)
    vec = {n: 37.0 * torch.randn(p.shape, generator=g, dtype=F64)
           for n, p in s.supernet.named_parameters()}
    w = {n: p.detach().clone() for n, p in s.supernet.named_parameters()}
    moved = []
    loss = s.loss

    def recorded(batch, arch_weights, params=None, **kw):
        if params is not None:
            moved.append(torch.sqrt(sum(((params[n] - w[n]) ** 2).sum() for n in w)).item())
        return loss(batch, arch_weights, params=params, **kw)

    s.loss = recorded
    mixed_hvp_fd(s, train, vec, r=1e-3)
    assert len(moved) == 2 and all(abs(d - 1e-3) < 1e-12 for d in moved), moved


def test_fd_hvp_with_a_zero_vector_is_zero_like_double_backward():
    """eps = r / ||v|| is undefined for v = 0; the product is then exactly zero."""
    s, train, _ = _setup()
    vec = {n: torch.zeros_like(p) for n, p in s.supernet.named_parameters()}
    for hvp in (mixed_hvp_fd(s, train, vec), mixed_hvp_exact(s, train, vec)):
        assert all(torch.equal(h, torch.zeros_like(a)) for h, a in zip(hvp, s.alphas()))


def test_first_order_is_val_gradient_at_fixed_weights():
    s, train, val = _setup()
    s.w_optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in s.supernet.parameters()]
    got, _ = first_order(s, train, val)
    for a, g in zip(s.alphas(), got):
        for idx in [(0, 0), (1, 3), (2, 7)]:
            with torch.no_grad():
                a[idx] += 1e-6
                lp = s.loss(val, s.arch_weights())[0]
                a[idx] -= 2e-6
                lm = s.loss(val, s.arch_weights())[0]
                a[idx] += 1e-6
            numeric = ((lp - lm) / 2e-6).item()
            assert abs(g[idx].item() - numeric) < 1e-6 * max(1.0, abs(numeric))
    # computing it leaves the weights and their gradients alone
    assert all(torch.equal(b, p) for b, p in zip(before, s.supernet.parameters()))
    assert all(p.grad is None for p in s.supernet.parameters())


def test_darts_uses_configured_radius(monkeypatch):
    import diffnas.strategies.hypergrad as H

    seen = {}
    real = H.mixed_hvp_fd

    def spy(s, batch, vector, r=1e-2, at_w=None):
        seen["r"] = r
        return real(s, batch, vector, r, at_w)

    monkeypatch.setattr(H, "mixed_hvp_fd", spy)
    s = tiny_strategy({"name": "darts", "order": 2, "fd_radius": 0.005}, dtype=F64)
    s.step(tiny_batch(4, 1, F64), tiny_batch(4, 2, F64))
    assert seen["r"] == 0.005


def test_first_order_alpha_pass_freezes_the_weights_and_thaws_them():
    # The alpha pass records no path to the weights (no weight-gradient work, what a
    # compiled backward needs); afterwards every weight takes gradients again.
    s = tiny_strategy({"name": "darts", "order": 1})
    seen = []
    hook = s.supernet.register_forward_pre_hook(
        lambda m, a: seen.append(any(p.requires_grad for p in m.parameters())))
    grads, _ = first_order(s, tiny_batch(4, 1), tiny_batch(4, 2))
    hook.remove()
    assert seen == [False]
    assert all(p.requires_grad for p in s.supernet.parameters())
    assert all(g.abs().sum() > 0 for g in grads)


SAMPLED = {"gumbel": {"name": "darts", "order": 2, "relaxation": {"name": "gumbel"}},
           "gdas": {"name": "gdas", "order": 2}}


@pytest.mark.parametrize("key", sorted(SAMPLED))
def test_unrolled_on_one_sampled_architecture_matches_autograd(key):
    """Gumbel relaxations: with the noise held (as a strategy's alpha step holds it), the
    finite differences and the double backward differentiate one sampled architecture;
    GDAS's unsampled ops leave weights out of the graph, which must not crash."""
    s, train, val = _setup(SAMPLED[key])
    with s.relaxation.fixed_noise():
        ref = _reference_unrolled_grad(s, train, val)
        fd, _ = unrolled(s, train, val, hessian="fd", fd_radius=1e-6)
        ex, _ = unrolled(s, train, val, hessian="exact")
    assert _rel_err(fd, ref) < 1e-3
    assert _rel_err(ex, ref) < 1e-9


ONE_SAMPLE = {**SAMPLED, "implicit_gumbel": {"name": "implicit", "relaxation": {"name": "gumbel"}}}


@pytest.mark.parametrize("key", sorted(ONE_SAMPLE))
def test_an_alpha_step_evaluates_one_sample_and_the_weight_step_draws_anew(key):
    s, train, val = _setup(ONE_SAMPLE[key])
    seen = []
    arch_weights = s.arch_weights

    def recorded():
        aw = arch_weights()
        seen.append(torch.cat([w.detach().flatten() for w in aw.weights.values()]))
        return aw

    s.arch_weights = recorded
    s.step(train, val)
    alpha_step, weight_step = seen[:-1], seen[-1]
    # darts: virtual step, w' pass, perturbed passes; implicit: validation, training loss
    assert len(alpha_step) >= (2 if key.startswith("implicit") else 3)
    for w in alpha_step[1:]:
        assert torch.equal(w, alpha_step[0])
    assert not torch.equal(weight_step, alpha_step[0])


def test_the_virtual_step_clips_like_the_weight_step():
    """With a clip that bites, w' moves as far as the real (clipped) weight step would, and
    the second-order term is scaled by the same factor (autograd agrees)."""
    from diffnas.strategies.hypergrad import virtual_step

    s, train, val = _setup({"name": "darts", "order": 2, "w_optim": {"grad_clip": 0.01,
                                                                     "momentum": 0.0,
                                                                     "weight_decay": 0.0}})
    w0 = {n: p.detach().clone() for n, p in s.supernet.named_parameters()}
    w_prime = virtual_step(s, train)
    s.weight_step(train, s.arch_weights())  # the real step, clipped to norm 0.01
    for n, p in s.supernet.named_parameters():
        assert torch.allclose(w_prime[n], p.detach(), atol=1e-12), n
    moved = torch.sqrt(sum(((w_prime[n] - w0[n]) ** 2).sum() for n in w0))
    assert abs(moved.item() - s.lr * 0.01) < 1e-9
    ref = _reference_unrolled_grad(s, train, val)
    got, _ = unrolled(s, train, val, hessian="exact")
    assert _rel_err(got, ref) < 1e-9


@pytest.mark.parametrize("section", [
    {"name": "darts", "order": 1},
    {"name": "darts", "order": 2, "hessian": "fd", "fd_radius": 1e-4},
    {"name": "darts", "order": 2, "hessian": "exact"},
], ids=["first_order", "second_order_fd", "second_order_exact"])
def test_a_darts_step_moves_alphas_on_validation_and_weights_on_training(section):
    """One ``step(train, val)``: the alphas take an optimizer step along the configured
    rule's hypergradient of the validation loss (first order, or unrolled through a
    virtual step on the training batch, with the configured Hessian product), then the
    weights a step on the training batch at the new alphas. Replayed by hand on a twin
    strategy; swapping the batches in either part, or another Hessian mode, moves them
    elsewhere."""
    twins = []
    for _ in range(2):
        s = tiny_strategy(section, dtype=F64)
        train, val = tiny_batch(6, 1, F64), tiny_batch(6, 2, F64)
        _prime_momentum(s, train)
        twins.append(s)
    s, ref = twins
    s.step(train, val)
    if section["order"] == 1:
        grads, _ = first_order(ref, train, val)
    else:
        grads, _ = unrolled(ref, train, val, hessian=section["hessian"],
                            fd_radius=section.get("fd_radius", 1e-2))
    ref.set_alpha_grads(grads)
    ref.a_optimizer.step()
    ref.weight_step(train, ref.arch_weights())
    assert_same_state(s, ref)
    assert not torch.equal(s.alphas()[0], tiny_strategy(section, dtype=F64).alphas()[0])


def _linear_penalty():
    """A penalty sum(c * softmax weights) with a fixed c, registered once per session."""
    from diffnas.strategies.base import PENALTIES, register_penalty

    if "t_linear" not in PENALTIES.names():
        @register_penalty("t_linear")
        def linear(scale: float = 1.0):
            def penalty(arch_weights, logits):
                g = torch.Generator().manual_seed(5)
                return scale * sum((w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
                                   for w in arch_weights.weights.values())
            return penalty
    return {"name": "t_linear", "scale": 3.0}


@pytest.mark.parametrize("rule", ["first_order", "fd", "exact", "implicit"])
def test_every_hypergradient_rule_adds_the_penalty_s_gradient(rule):
    """A penalty of alpha alone (latency) adds its own gradient to the hypergradient of
    every rule, whatever the weights do."""
    from diffnas.strategies.implicit import implicit

    compute = {"first_order": first_order, "implicit": implicit,
               "fd": lambda s, t, v: unrolled(s, t, v, hessian="fd", fd_radius=1e-6),
               "exact": lambda s, t, v: unrolled(s, t, v, hessian="exact")}[rule]
    section = {"name": "darts", "order": 2}
    plain, _, _ = _setup(section)
    penalized, train, val = _setup({**section, "penalties": [_linear_penalty()]})
    got, stats = compute(penalized, train, val)
    base, _ = compute(plain, train, val)
    value = penalized.penalties[0][1](penalized.arch_weights(), None)
    assert stats["penalty_t_linear"] == pytest.approx(value.item())
    want = torch.autograd.grad(value, penalized.alphas())
    for g, b, w in zip(got, base, want, strict=True):
        torch.testing.assert_close(g - b, w, rtol=1e-6, atol=1e-9)
