"""iDARTS: the implicit (IFT + Neumann) hypergradient against the closed form of a
quadratic bilevel problem."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, tiny_batch, tiny_strategy

from diffnas.strategies.hypergrad import first_order
from diffnas.strategies.implicit import ImplicitConfig, implicit, implicit_hypergrad

F64 = torch.float64


def _toy(seed=0, n_w=6, n_a=4):
    """L_train = 1/2 w'Aw - w'B a (so w* = A^-1 B a), L_val = 1/2 |w - t|^2 + c/2 |a|^2."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_w, n_w, generator=g, dtype=F64))
    eig = torch.linspace(0.5, 1.5, n_w, dtype=F64)
    A = q @ torch.diag(eig) @ q.T
    B = torch.randn(n_w, n_a, generator=g, dtype=F64)
    t = torch.randn(n_w, generator=g, dtype=F64)
    a = torch.randn(n_a, generator=g, dtype=F64, requires_grad=True)
    c = 0.1
    w_star = torch.linalg.solve(A, B @ a.detach())
    exact = c * a.detach() + B.T @ torch.linalg.solve(A, w_star - t)
    return A, B, t, a, c, w_star, exact


def _ift(K, eta=1.0):
    A, B, t, a, c, w_star, exact = _toy()
    w = w_star.clone().requires_grad_(True)
    train = 0.5 * w @ A @ w - w @ B @ a
    val = 0.5 * ((w - t) ** 2).sum() + 0.5 * c * (a * a).sum()
    (got,) = implicit_hypergrad(train, val, [w], [a], K, eta)
    return float((got - exact).norm() / exact.norm())


def test_error_falls_with_K_and_is_small_at_default_K():
    errors = [_ift(K) for K in range(1, 11)]
    assert all(x > y for x, y in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.2  # one term is a poor inverse: the test can tell
    assert _ift(ImplicitConfig().K) < 0.05
    assert _ift(40) < 1e-8


def test_weight_decay_enters_the_hessian():
    A, B, t, a, c, w_star, _ = _toy()
    lam = 0.3  # inner problem with decay: w* = (A + lam I)^-1 B a
    Al = A + lam * torch.eye(A.shape[0], dtype=F64)
    w_star = torch.linalg.solve(Al, B @ a.detach())
    exact = c * a.detach() + B.T @ torch.linalg.solve(Al, w_star - t)
    w = w_star.clone().requires_grad_(True)
    train = 0.5 * w @ A @ w - w @ B @ a
    val = 0.5 * ((w - t) ** 2).sum() + 0.5 * c * (a * a).sum()
    (got,) = implicit_hypergrad(train, val, [w], [a], 60, 0.8, weight_decay=lam)
    assert torch.allclose(got, exact, atol=1e-8)


def test_rule_on_the_supernet_differs_from_first_order_by_the_ift_term():
    s = tiny_strategy({"name": "implicit"}, dtype=F64)
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    fo, _ = first_order(s, train, val)
    got, _ = implicit(s, train, val, K=3, eta=0.05)
    diff = sum(float((a - b).norm()) for a, b in zip(got, fo, strict=True))
    assert diff > 1e-6 and all(torch.isfinite(g).all() for g in got)


def test_bad_K_is_an_error():
    with pytest.raises(ValueError, match="K"):
        ImplicitConfig(K=0)


def test_a_step_uses_the_configured_K_eta_and_weight_decay_on_the_right_batches():
    """``step(train, val)``: the alphas move along the IFT hypergradient with the Hessian
    of the training loss (weight decay included) and the gradient of the validation loss,
    with the configured K and eta (not the weight learning rate); then a weight step on
    the training batch. Replayed by hand on a twin strategy."""
    from diffnas.ops import twice_differentiable

    section = {"name": "implicit", "K": 3, "eta": 0.05,
               "w_optim": {"weight_decay": 0.1}}
    s, ref = (tiny_strategy(section, dtype=F64) for _ in range(2))
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    assert ref.lr != 0.05 and ref.config.w_optim.weight_decay == 0.1
    s.step(train, val)
    val_loss, _ = ref.loss(val, ref.arch_weights())
    with twice_differentiable():
        train_loss, _ = ref.loss(train, ref.arch_weights())
    grads = implicit_hypergrad(train_loss, val_loss, list(ref.supernet.parameters()),
                               ref.alphas(), K=3, eta=0.05, weight_decay=0.1)
    ref.set_alpha_grads(grads)
    ref.a_optimizer.step()
    ref.weight_step(train, ref.arch_weights())
    assert_same_state(s, ref)


def test_a_non_positive_eta_is_an_error():
    for eta in (0.0, -0.1):
        with pytest.raises(ValueError, match="eta must be positive"):
            ImplicitConfig(eta=eta)
