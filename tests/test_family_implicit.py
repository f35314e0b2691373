"""iDARTS: the implicit (IFT + Neumann) hypergradient against the closed form of a
quadratic bilevel problem."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_strategy

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
