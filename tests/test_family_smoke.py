"""Every DARTS-family strategy runs a couple of steps on tiny darts_cnn and nb201 spaces,
changes what it should change, and resumes exactly from its state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_SHAPE, tiny_batch, tiny_space, tiny_strategy

from diffnas.spaces import create_space

SECTIONS = {
    "darts": {"name": "darts"},
    "darts_order2": {"name": "darts", "order": 2},
    "single_level": {"name": "single_level"},
    "snas": {"name": "snas", "cost_weight": 0.1},
    "gdas": {"name": "gdas"},
    "implicit": {"name": "implicit", "K": 3},
    "zero_order_rs": {"name": "zero_order", "estimator": "rs", "samples": 2},
    "zero_order_mgs": {"name": "zero_order", "estimator": "mgs", "samples": 2, "unroll": True},
    "zero_order_gld": {"name": "zero_order", "estimator": "gld", "samples": 2},
    "mean_shift": {"name": "mean_shift", "samples": 2},
    "few_shot": {"name": "few_shot", "split_epoch": 1},
    "random_labels": {"name": "random_labels", "population": 4, "iterations": 2, "parents": 2},
    "darts_edge_norm": {"name": "darts", "edge_norm": True},
}


def nb201_space():
    return create_space({"name": "nb201", "C": 4, "N": 1}, TINY_SHAPE)


SPACES = {"darts_cnn": tiny_space, "nb201": nb201_space}


def _run(s, epochs=2, steps=2):
    val = tiny_batch(4, 2) if type(s).uses_validation else None
    stats = None
    for _ in range(epochs):
        for i in range(steps):
            stats = s.step(tiny_batch(4, 10 + i), val)
        s.end_epoch()
    return stats


@pytest.mark.parametrize("space_name", sorted(SPACES))
@pytest.mark.parametrize("key", sorted(SECTIONS))
def test_strategy_runs_and_moves_weights(key, space_name):
    s = tiny_strategy(SECTIONS[key], space=SPACES[space_name]())
    w0 = [p.detach().clone() for p in s.supernet.parameters()]
    stats = _run(s)
    assert stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    moved = sum(float((p.detach() - q).abs().sum()) for p, q in zip(s.supernet.parameters(), w0,
                                                                   strict=True))
    assert moved > 0
    # the genotype of the run is valid in its space
    from diffnas.genotype.discretize import discretize

    g = discretize(s.arch_params.as_dict(), s_space := SPACES[space_name](), None,
                   s.arch_params.edge_weights())
    s_space.validate(g)


@pytest.mark.parametrize("key", ["snas", "gdas", "zero_order_rs", "mean_shift", "few_shot",
                                 "random_labels"])
def test_resume_is_exact(key):
    """Run 2 epochs straight vs. 1 epoch, state_dict -> fresh strategy, 1 more epoch."""
    torch.manual_seed(5)
    a = tiny_strategy(SECTIONS[key])
    _run(a, epochs=1)
    state = copy.deepcopy(a.state_dict())
    rng = torch.get_rng_state()
    _run(a, epochs=1)
    b = tiny_strategy(SECTIONS[key], seed=1)  # different init, overwritten by the state
    b.load_state_dict(state)
    torch.set_rng_state(rng)
    _run(b, epochs=1)
    for p, q in zip(a.alphas(), b.alphas(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.supernet.state_dict(), b.supernet.state_dict()  # BN running stats included
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


PENALIZED = {"darts": {"name": "darts"}, "darts_order2": {"name": "darts", "order": 2},
             "gdas": {"name": "gdas"}, "single_level": {"name": "single_level"},
             "snas": {"name": "snas"}, "implicit": SECTIONS["implicit"],
             "zero_order_mgs": {"name": "zero_order", "estimator": "mgs", "samples": 2},
             "zero_order_rs": {"name": "zero_order", "estimator": "rs", "samples": 8},
             "mean_shift": SECTIONS["mean_shift"], "few_shot": SECTIONS["few_shot"]}


@pytest.fixture(scope="module")
def l2_penalty():
    from diffnas.strategies.base import PENALTIES, register_penalty

    if "test_l2" not in PENALTIES.names():
        @register_penalty("test_l2")
        def make(lam: float = 1.0):
            return lambda arch_weights, logits: lam * sum((a * a).sum() for a in logits.values())
    return {"name": "test_l2", "lam": 100.0}


@pytest.mark.parametrize("key", sorted(PENALIZED))
def test_every_strategy_with_an_alpha_update_applies_its_penalties(key, l2_penalty):
    """A strong L2 penalty on the logits must shrink them, in every strategy that takes
    ``penalties`` (few_shot: in its one-shot phase and in its sub-supernets)."""
    norms = []
    for penalties in ([], [l2_penalty]):
        s = tiny_strategy({**PENALIZED[key], "penalties": penalties})
        torch.manual_seed(1)
        val = tiny_batch(4, 2) if type(s).uses_validation else None
        for epoch in range(2):
            for i in range(2):
                s.step(tiny_batch(4, 10 + i), val)
            if epoch == 0:
                s.end_epoch()  # few_shot splits here
        norms.append(sum(float(a.detach().norm()) for a in s.alphas()))
    assert norms[1] < norms[0] - 1e-4, norms


def test_random_labels_refuses_penalties(l2_penalty):
    with pytest.raises(ValueError, match="random_labels .* cannot use search.strategy.penalties"):
        tiny_strategy({**SECTIONS["random_labels"], "penalties": [l2_penalty]})


def test_a_relaxation_without_a_name_sets_the_strategys_own():
    """No name: the settings are the strategy's default relaxation's (gdas: hard Gumbel at
    the given temperature); darts' softmax has no temperature, a clear error."""
    from diffnas.arch.relax import HardGumbelRelaxation

    gdas = tiny_strategy({"name": "gdas", "relaxation": {"tau": 2.0}})
    assert isinstance(gdas.relaxation, HardGumbelRelaxation) and gdas.relaxation.tau == 2.0
    with pytest.raises(ValueError, match=r"relaxation\.tau; valid keys of .*relaxation: name"):
        tiny_strategy({"name": "darts", "relaxation": {"tau": 2.0}})
