"""ZARTS: alpha moves from loss evaluations only, and the estimators point downhill on a
smooth toy loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_strategy

from diffnas.strategies.zero_order import gld_step, mgs_estimate, rs_step


class AlphaGradFormed(AssertionError):
    pass


def _forbid_alpha_grads(s):
    def hook(grad):
        raise AlphaGradFormed("an autograd gradient w.r.t. alpha was computed")
    return [p.register_hook(hook) for p in s.alphas()]


@pytest.mark.parametrize("estimator", ["rs", "mgs", "gld"])
@pytest.mark.parametrize("unroll", [False, True])
def test_no_autograd_gradient_of_alpha(estimator, unroll):
    s = tiny_strategy({"name": "zero_order", "estimator": estimator, "unroll": unroll,
                       "mu": 0.5, "samples": 4})
    a0 = [p.detach().clone() for p in s.alphas()]
    _forbid_alpha_grads(s)
    torch.manual_seed(0)
    for i in range(3):
        s.step(tiny_batch(4, i), tiny_batch(4, 10 + i))
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(s.alphas(), a0, strict=True))
    assert moved > 0


def test_the_hook_does_catch_a_gradient_strategy():
    """The detector works: DARTS's alpha step trips it."""
    s = tiny_strategy({"name": "darts"})
    _forbid_alpha_grads(s)
    with pytest.raises(AlphaGradFormed):
        s.step(tiny_batch(4, 1), tiny_batch(4, 2))


T = torch.linspace(-1, 1, 10, dtype=torch.float64)


def f_toy(x: torch.Tensor) -> float:
    return float(torch.log(torch.cosh(3 * (x - T))).sum() + 0.1 * (x * x).sum())


def grad_toy(x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (torch.log(torch.cosh(3 * (x - T))).sum() + 0.1 * (x * x).sum()).backward()
    return x.grad


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_mgs_estimate_correlates_with_the_gradient():
    torch.manual_seed(0)
    cos = []
    for _ in range(20):
        x = torch.randn(10, dtype=torch.float64)
        cos.append(_cos(mgs_estimate(f_toy, x, 1e-3, 8), grad_toy(x)))
    assert sum(cos) / len(cos) > 0.4 and min(cos) > 0


@pytest.mark.parametrize("step", [rs_step, gld_step])
def test_search_steps_move_downhill(step):
    torch.manual_seed(0)
    x = torch.full((10,), 2.0, dtype=torch.float64)
    f0 = f_toy(x)
    cos = []
    for _ in range(60):
        new = step(f_toy, x, 0.3, 6)
        if not torch.equal(new, x):
            cos.append(_cos(x - new, grad_toy(x)))
        x = new
    assert len(cos) > 10 and sum(cos) / len(cos) > 0.2
    assert f_toy(x) < 0.5 * f0


def test_mgs_descent_lowers_the_loss():
    torch.manual_seed(1)
    x = torch.full((10,), 2.0, dtype=torch.float64)
    f0 = f_toy(x)
    for _ in range(100):
        x = x - 0.05 * mgs_estimate(f_toy, x, 1e-2, 4)
    assert f_toy(x) < 0.5 * f0


def test_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        tiny_strategy({"name": "zero_order", "estimator": "spsa"})
