"""ZARTS: alpha moves from loss evaluations only, and the estimators point downhill on a
smooth toy loss."""

from __future__ import annotations

import pytest
import torch
from conftest import noise_of_a_step, tiny_batch, tiny_strategy

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


def test_mgs_is_the_mean_of_forward_differences_along_gaussian_directions():
    x = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    got = mgs_estimate(f_toy, x, 0.05, 5)
    torch.manual_seed(3)
    us = [torch.randn_like(x) for _ in range(5)]
    want = sum((f_toy(x + 0.05 * u) - f_toy(x)) / 0.05 * u for u in us) / 5
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("step", [rs_step, gld_step])
def test_rs_and_gld_take_the_best_candidate_at_their_radii(step):
    """rs: candidates x + mu u (u standard normal); gld: x + mu/2^i u/|u|, i = 0, 1, ...;
    the step returns the candidate with the lowest f when it is below f(x)."""
    x = torch.zeros(10, dtype=torch.float64)
    seen = []

    def f(y):
        seen.append(y.clone())
        return f_toy(y)

    for seed in range(20):
        seen.clear()
        torch.manual_seed(seed)
        new = step(f, x, 0.8, 6)
        candidates = seen[1:]  # (the first call is f(x))
        torch.manual_seed(seed)
        us = [torch.randn_like(x) for _ in range(6)]
        for i, (c, u) in enumerate(zip(candidates, us, strict=True)):
            want = x + (0.8 * u if step is rs_step else 0.8 / 2 ** i * u / u.norm())
            torch.testing.assert_close(c, want)
        best = min(candidates, key=f_toy)
        assert torch.equal(new, best if f_toy(best) < f_toy(x) else x)


@pytest.mark.parametrize("unroll", [False, True])
def test_the_objective_is_the_validation_loss_at_the_candidate_alphas(unroll):
    """f(alpha): L_val at alpha with the current weights, or (unroll) at the weights after
    one virtual SGD step on the training batch; the strategy's alphas are left as they
    were."""
    from diffnas.strategies.hypergrad import grads

    s = tiny_strategy({"name": "zero_order", "unroll": unroll}, dtype=torch.float64)
    train, val = tiny_batch(4, 1, torch.float64), tiny_batch(4, 2, torch.float64)
    before = s._flat()
    cand = before + 0.3 * torch.randn_like(before)
    got = s.objective_at(train, val)(cand)
    assert torch.equal(s._flat(), before)
    s._assign(cand)
    aw = s.arch_weights()
    params = None
    if unroll:
        named = dict(s.supernet.named_parameters())
        g = grads(s.loss(train, aw)[0], list(named.values()))
        params = {n: (p - s.lr * gi).detach() for (n, p), gi in zip(named.items(), g)}
    with torch.no_grad():
        want = float(s.loss(val, aw, params=params)[0])
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("estimator", ["rs", "mgs", "gld"])
def test_a_step_moves_alpha_by_its_estimator_then_the_weights_on_training(estimator):
    """One step replayed by hand on a twin strategy: the configured estimator on f, then
    a weight step on the training batch at the new alphas."""
    section = {"name": "zero_order", "estimator": estimator, "mu": 0.5, "samples": 3}
    s, ref = (tiny_strategy(section, dtype=torch.float64) for _ in range(2))
    train, val = tiny_batch(4, 1, torch.float64), tiny_batch(4, 2, torch.float64)
    torch.manual_seed(7)
    s.step(train, val)
    torch.manual_seed(7)
    f, x = ref.objective_at(train, val), ref._flat()
    if estimator == "mgs":
        g = mgs_estimate(f, x, 0.5, 3)
        parts = torch.split(g, [p.numel() for p in ref.alphas()])
        ref.set_alpha_grads([t.view_as(p) for t, p in zip(parts, ref.alphas())])
        ref.a_optimizer.step()
    else:
        ref._assign((rs_step if estimator == "rs" else gld_step)(f, x, 0.5, 3))
    ref.weight_step(train, ref.arch_weights())
    assert not torch.equal(s._flat(), x)
    torch.testing.assert_close(s._flat(), ref._flat(), rtol=1e-12, atol=1e-12)
    for a, b in zip(s.supernet.parameters(), ref.supernet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_candidate_of_a_step_is_judged_on_one_gumbel_sample():
    s = tiny_strategy({"name": "zero_order", "estimator": "rs", "samples": 4,
                       "relaxation": {"name": "gumbel"}})
    alpha_step, weight_step = noise_of_a_step(s, tiny_batch(4, 1), tiny_batch(4, 2))
    assert len(alpha_step) == 5  # f(alpha) and 4 candidates
    assert all(torch.equal(d, alpha_step[0]) for d in alpha_step)
    assert not torch.equal(weight_step, alpha_step[0])


def test_bad_samples_or_mu_are_refused():
    from diffnas.strategies.zero_order import ZeroOrderConfig

    for kw in ({"samples": 0}, {"mu": 0.0}, {"mu": -1.0}):
        with pytest.raises(ValueError, match="samples >= 1 and mu > 0"):
            ZeroOrderConfig(**kw)
