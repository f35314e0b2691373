"""Rules of the sampling strategies (GDAS, SNAS, ZARTS, MS-DARTS, few-shot NAS, RLNAS) and
the strategy registry that a second mutation audit found unguarded (after
test_strategy_rules.py, the test_family_* files and test_few_shot_rlnas_rules.py).

GDAS takes only its hard Gumbel relaxation and SNAS only a Gumbel one, each refusal
naming the relaxation given; SNAS's cost table of parameter-free ops is zeros (not 0/0),
and its resource term passes ``cost_weight * cost`` to the relaxed weights as their
gradient; every default in the docs/strategies.md table is the config's; every strategy
of these modules runs data parallel (docs/distributed.md); a zero-order step reports the
Euclidean norm of its alpha move and its objective adds the architecture penalties;
MS-DARTS at bandwidth 0 with one sample is accepted and is DARTS first order, while one
sample at a positive bandwidth or no sample at all is refused; few-shot refuses a one-epoch
run naming the epochs and records each turn's validation loss; RLNAS's angle of
anti-parallel vectors whose rounded cosine falls below -1 is pi. Values are replayed by
hand (float64 where numbers matter)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_state, tiny_batch, tiny_space, tiny_strategy

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.strategies import ClassificationObjective, create_strategy, strategy_config

F64 = torch.float64


# --- GDAS, SNAS: the relaxation each one samples --------------------------------------------
@pytest.mark.parametrize("relaxation", ["gumbel", "softmax"])
def test_gdas_refuses_any_relaxation_but_hard_gumbel_naming_it(relaxation):
    """GDAS samples one op per edge: a soft Gumbel sample (every op computed, weighted)
    is SNAS's relaxation, not GDAS's, and is refused like the softmax."""
    with pytest.raises(ValueError, match=rf"must be 'hard_gumbel', got '{relaxation}'"):
        strategy_config({"name": "gdas", "relaxation": {"name": relaxation}})
    assert strategy_config({"name": "gdas"}).relaxation["name"] == "hard_gumbel"


@pytest.mark.parametrize("relaxation", ["softmax", "sparsemax_like_typo"])
def test_snas_refuses_a_relaxation_that_is_not_gumbel_naming_it(relaxation):
    with pytest.raises(ValueError, match=rf"snas needs a Gumbel relaxation, got '{relaxation}'"):
        strategy_config({"name": "snas", "relaxation": {"name": relaxation}})


def test_the_cost_table_of_parameter_free_ops_is_zeros_not_nan():
    """Divided by the largest count, unless every count is 0 (skip, pooling, none at
    stride 1 have no parameters): then the costs are 0, not 0/0."""
    from diffnas.spaces.base import EdgeSpec
    from diffnas.strategies.snas import op_costs

    ops = ("none", "skip_connect", "max_pool_3x3", "avg_pool_3x3")
    edges = [EdgeSpec(f"normal/n{d}/e0", "normal", 0, d, ops, 1) for d in (2, 3)]
    costs = op_costs(edges, 8)
    assert torch.equal(costs, torch.zeros(2, 4))
    # with one weighted op the table is each count over the largest: 0 and 1
    edge = EdgeSpec("normal/n2/e0", "normal", 0, 2, ("skip_connect", "sep_conv_3x3"), 1)
    assert torch.equal(op_costs([edge], 8), torch.tensor([[0.0, 1.0]]))


def test_the_snas_resource_term_gives_each_relaxed_weight_its_cost_as_gradient():
    """cost_weight * sum_edges sum_k w_k cost_k is linear in the weights: its gradient
    with respect to w_k is cost_weight * cost_k (the term steers the sampled ops)."""
    s = tiny_strategy({"name": "snas", "cost_weight": 0.25, "cost_channels": 8}, dtype=F64)
    leaves = {g: w.detach().clone().requires_grad_(True)
              for g, w in s.arch_weights().weights.items()}
    term, stats = s.extra_loss(ArchWeights(leaves, None))
    term.backward()
    assert set(leaves) == set(s.costs)
    for g, w in leaves.items():
        torch.testing.assert_close(w.grad, 0.25 * s.costs[g].to(F64), rtol=1e-12, atol=1e-12)
    assert stats["tau"] == s.relaxation.tau


def test_snas_reports_its_temperature_without_a_resource_term():
    s = tiny_strategy({"name": "snas", "relaxation": {"name": "gumbel", "tau": 3.0}})
    term, stats = s.extra_loss(s.arch_weights())
    assert term is None and stats == {"tau": 3.0}
    assert s.step(tiny_batch(4, 1), None)["tau"] == 3.0


# --- the documented defaults and data parallelism -------------------------------------------
DOCUMENTED = {  # docs/strategies.md, the table of strategies and their settings
    "zero_order": {"estimator": "mgs", "samples": 4, "mu": 0.1, "unroll": False},
    "mean_shift": {"bandwidth": 0.1, "samples": 4, "temperature": 1.0},
    "snas": {"relaxation": {"name": "gumbel", "tau": 1.0, "tau_min": 0.1, "anneal": "exp"},
             "cost_weight": 0.0, "cost_channels": 16},
    "gdas": {"relaxation": {"name": "hard_gumbel", "tau": 10.0, "tau_min": 0.1,
                            "anneal": "linear"}},
    "few_shot": {"split_edges": [], "split_epoch": None, "max_subnets": 64},
    "random_labels": {"label_seed": 0, "exclude_ops": ["none"], "population": 20,
                      "iterations": 10, "parents": 5, "mutate_prob": 0.2},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_default_is_the_documented_one(name):
    config = strategy_config({"name": name})
    got = {key: getattr(config, key) for key in DOCUMENTED[name]}
    assert got == DOCUMENTED[name]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_every_sampling_strategy_runs_data_parallel(name):
    """docs/distributed.md: every built-in strategy runs data parallel, each saying what
    it averages over ranks; none is refused for two processes."""
    from diffnas.strategies.registry import require_data_parallel, strategy_class

    assert strategy_class({"name": name}).data_parallel is True
    require_data_parallel({"name": name}, 2)


# --- ZARTS ----------------------------------------------------------------------------------
def test_a_zero_order_step_reports_the_euclidean_norm_of_its_alpha_move():
    s = tiny_strategy({"name": "zero_order", "estimator": "mgs", "mu": 0.5}, dtype=F64)
    x0 = s._flat()
    torch.manual_seed(3)
    stats = s.step(tiny_batch(4, 1, F64), tiny_batch(4, 2, F64))
    move = s._flat() - x0
    assert int((move != 0).sum()) > 1  # several coordinates moved: the norms differ
    want = math.sqrt(sum(float(v) ** 2 for v in move))
    assert stats["alpha_move"] == pytest.approx(want, rel=1e-12)


def test_the_zero_order_objective_adds_the_architecture_penalties():
    """f(alpha) = L_val + the configured penalties at the candidate alpha (docstring of
    objective_at; docs/strategies.md: added to each loss evaluation)."""
    from test_hypergrad import _linear_penalty

    s = tiny_strategy({"name": "zero_order", "penalties": [_linear_penalty()]}, dtype=F64)
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    cand = s._flat() + 0.3 * torch.randn(s._flat().shape, dtype=F64,
                                         generator=torch.Generator().manual_seed(1))
    got = s.objective_at(train, val)(cand)
    s._assign(cand)
    with torch.no_grad():
        aw = s.arch_weights()
        plain = float(s.loss(val, aw)[0])
        g = torch.Generator().manual_seed(5)  # the t_linear penalty, by hand
        penalty = 3.0 * sum(float((w * torch.randn(w.shape, generator=g, dtype=F64)).sum())
                            for w in aw.weights.values())
    assert abs(penalty) > 1e-3
    assert got == pytest.approx(plain + penalty, rel=1e-12)


# --- MS-DARTS -------------------------------------------------------------------------------
def test_mean_shift_at_zero_bandwidth_with_one_sample_is_darts_first_order():
    """The module docstring: bandwidth 0 is DARTS first order; it is accepted with a
    single sample (every sample is alpha itself), and the step matches DARTS's."""
    section = {"name": "mean_shift", "bandwidth": 0.0, "samples": 1}
    s = tiny_strategy(section, dtype=F64)
    ref = tiny_strategy({"name": "darts", "order": 1}, dtype=F64)
    train, val = tiny_batch(4, 1, F64), tiny_batch(4, 2, F64)
    a0 = [a.detach().clone() for a in s.alphas()]
    stats = s.step(train, val)
    ref.step(train, val)
    assert stats["shift"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(s.alphas(), a0, strict=True))
    assert_same_state(s, ref)


def test_mean_shift_refuses_one_sample_at_a_positive_bandwidth_and_no_sample_at_all():
    from diffnas.strategies.mean_shift import MeanShiftConfig

    with pytest.raises(ValueError, match="needs samples >= 2 when bandwidth > 0"):
        MeanShiftConfig(bandwidth=0.1, samples=1)
    with pytest.raises(ValueError, match="samples >= 1"):
        MeanShiftConfig(bandwidth=0.0, samples=0)
    assert MeanShiftConfig(bandwidth=0.0, samples=1).samples == 1


# --- few-shot -------------------------------------------------------------------------------
def test_few_shot_refuses_a_one_epoch_run_naming_the_epochs():
    """split_epoch defaults to epochs // 2: a one-epoch run has no epoch for one of the two
    phases, and the refusal says so (not a split_epoch the user never set)."""
    space = tiny_space()
    with pytest.raises(ValueError, match=r"few_shot needs search\.epochs >= 2 .* got 1"):
        create_strategy({"name": "few_shot"}, space.build_supernet(), ArchParams(space),
                        ClassificationObjective(), epochs=1)


def test_a_sub_supernet_s_turn_records_its_validation_loss():
    """Without held batches (a stream's) the winner is chosen on each one's own turns'
    validation losses, not the training losses."""
    s = tiny_strategy({"name": "few_shot", "split_edges": ["normal/n3/e1"], "split_epoch": 1},
                      dtype=F64)
    s.step(tiny_batch(4, 1, F64), tiny_batch(4, 2, F64))
    s.end_epoch()
    stats = s.step(tiny_batch(4, 3, F64), tiny_batch(4, 4, F64))
    assert stats["val_loss"] != stats["loss"]
    assert s.val_loss[0] == [stats["val_loss"]]
    assert all(v == [] for v in s.val_loss[1:])


# --- RLNAS ----------------------------------------------------------------------------------
def test_the_angle_of_anti_parallel_vectors_is_pi_despite_rounding():
    """Sums accumulated in floating point can put the cosine a rounding below -1: the angle
    is then pi (opposite directions), not a math domain error."""
    from diffnas.strategies.random_labels import angle_from_sums

    assert angle_from_sums(-2.0000000000000004, 2.0, 2.0) == math.pi
    assert angle_from_sums(-2.0, 2.0, 2.0) == math.pi
