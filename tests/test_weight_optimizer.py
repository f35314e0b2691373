"""The weights' optimizer of a search strategy (``search.strategy.w_optim``): SGD with
momentum by default, Adam on request, each built from its own settings and refused where
a strategy's rule models SGD's step."""

from __future__ import annotations

import io
import re

import pytest
import torch
from conftest import tiny_batch, tiny_strategy

from diffnas.config import ConfigError, load_config


def _step(section: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One weight step of a tiny DARTS strategy: the weights before, after, and the
    (clipped) gradients the step used."""
    s = tiny_strategy(section)
    before = [p.detach().clone() for p in s.supernet.parameters()]
    s.weight_step(tiny_batch(), s.arch_weights())
    after = [p.detach().clone() for p in s.supernet.parameters()]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for p in s.supernet.parameters()]
    return before, after, grads


def test_adam_s_first_step_moves_every_weight_by_the_learning_rate():
    """Adam's first (bias-corrected) step is lr * g / |g| per element: every weight with a
    clear gradient moves by the learning rate against it, however small or large the
    gradient; SGD's first step is lr * g instead (with this config's momentum and L2)."""
    lr = 0.01
    before, after, grads = _step({"name": "darts", "w_optim": {
        "name": "adam", "lr": lr, "weight_decay": 0.0, "grad_clip": 1e9}})
    g = torch.cat([x.flatten() for x in grads])
    delta = torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])
    clear = g.abs() > 1e-4
    assert clear.sum() > 100
    assert torch.allclose(delta[clear], -lr * g[clear].sign(), rtol=1e-3, atol=0)
    assert g[clear].abs().max() / g[clear].abs().min() > 10  # unlike SGD's lr * g
    before, after, grads = _step({"name": "darts", "w_optim": {
        "lr": lr, "weight_decay": 0.0, "grad_clip": 1e9}})
    for b, a, gr in zip(before, after, grads, strict=True):
        assert torch.allclose(a, b - lr * gr, atol=1e-7)


def test_an_adam_strategy_resumed_from_its_state_steps_as_the_original():
    """Adam's moments travel in the strategy's checkpoint state: a strategy loaded from
    it (through torch.save, as a checkpoint) takes the same next step as the original."""
    section = {"name": "darts", "w_optim": {"name": "adam", "lr": 0.01, "betas": [0.8, 0.99]}}
    a = tiny_strategy(section)
    for seed in range(2):
        a.step(tiny_batch(seed=seed), tiny_batch(seed=seed + 10))
    assert isinstance(a.w_optimizer, torch.optim.Adam)
    assert a.w_optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    buffer = io.BytesIO()  # as a checkpoint file holds it
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = tiny_strategy(section, seed=1)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for s in (a, b):
        s.step(tiny_batch(seed=5), tiny_batch(seed=6))
    for pa, pb in zip(a.supernet.parameters(), b.supernet.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("strategy, words", [
    ("{name: darts, w_optim: {name: rmsprop}}",
     "search.strategy.w_optim.name must be one of sgd, adam, got 'rmsprop'"),
    ("{name: darts, w_optim: {name: adam, momentum: 0.5}}",
     "search.strategy.w_optim.momentum is not used by w_optim.name=adam"),
    ("{name: darts, w_optim: {betas: [0.5, 0.9]}}",
     "search.strategy.w_optim.betas is not used by w_optim.name=sgd"),
    ("{name: darts, w_optim: {name: adam, betas: [0.9, 1.0]}}",
     "search.strategy.w_optim.betas must be two numbers in [0, 1)"),
    ("{name: darts, order: 2, w_optim: {name: adam}}",
     "order=2 unrolls the weights' SGD step"),
])
def test_weight_optimizer_settings_that_cannot_hold_are_refused(strategy, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        load_config(None, ["data.name=digits", f"search.strategy={strategy}"])


def test_a_cuda_graph_is_not_captured_around_adam():
    from diffnas.engine.search import check_search_config

    cfg = load_config(None, ["data.name=digits",
                             "search.strategy={name: darts, w_optim: {name: adam}}"])
    cfg.search.cuda_graph = True
    with pytest.raises(ConfigError, match="search.cuda_graph replays SGD weight steps; "
                                          "w_optim.name=adam is not captured"):
        check_search_config(cfg, device=False)
    for name in ("implicit", "single_level", "gdas"):  # their rules take any optimizer
        load_config(None, ["data.name=digits",
                           f"search.strategy={{name: {name}, w_optim: {{name: adam}}}}"])
