"""Gumbel relaxations (SNAS, GDAS): sampling, straight-through gradients, temperature
schedules, and GDAS computing exactly one op per edge."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batch, tiny_space, tiny_strategy
from test_family_smoke import nb201_space

from diffnas.arch.relax import create_relaxation
from diffnas.ops import create_op


def test_hard_gumbel_is_one_hot_with_soft_gradient():
    torch.manual_seed(0)
    a = torch.randn(5, 4, requires_grad=True)
    relax = create_relaxation("hard_gumbel", tau=2.0, tau_min=None)
    c = torch.randn(5, 4)
    torch.manual_seed(1)
    aw = relax({"g": a})
    w = aw["g"]
    assert torch.equal(w.detach(), torch.nn.functional.one_hot(aw.active["g"], 4).float())
    (ga,) = torch.autograd.grad((w * c).sum(), a)
    # the same noise through the plain Gumbel-softmax gives the same gradient
    torch.manual_seed(1)
    soft = create_relaxation("gumbel", tau=2.0)({"g": a})["g"]
    (gs,) = torch.autograd.grad((soft * c).sum(), a)
    assert torch.allclose(ga, gs)
    assert torch.equal(aw.active["g"], soft.detach().argmax(-1))


def test_gumbel_draws_from_global_rng():
    a = {"g": torch.zeros(3, 5)}
    relax = create_relaxation("gumbel")
    torch.manual_seed(7)
    x = relax(a)["g"]
    torch.manual_seed(7)
    y = relax(a)["g"]
    z = relax(a)["g"]
    assert torch.equal(x, y) and not torch.equal(y, z)


def test_gumbel_sample_frequencies_follow_softmax():
    torch.manual_seed(0)
    a = torch.tensor([[1.0, 0.0, -1.0]])
    relax = create_relaxation("hard_gumbel", tau=1.0, tau_min=None)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[relax({"g": a}).active["g"][0]] += 1
    assert torch.allclose(counts / 4000, torch.softmax(a[0], 0), atol=0.03)


@pytest.mark.parametrize("anneal", ["linear", "exp"])
def test_temperature_schedule_and_state(anneal):
    relax = create_relaxation("gumbel", tau=10.0, tau_min=0.1, anneal=anneal)
    relax.set_epochs(5)
    taus = []
    for _ in range(5):
        taus.append(relax.tau)
        relax.end_epoch()
    assert taus[0] == 10.0 and math.isclose(taus[-1], 0.1)
    assert all(x > y for x, y in zip(taus, taus[1:], strict=False))
    if anneal == "linear":
        assert math.isclose(taus[2], (10.0 + 0.1) / 2)
    else:
        assert math.isclose(taus[2], 1.0)
    fresh = create_relaxation("gumbel", tau=10.0, tau_min=0.1, anneal=anneal)
    fresh.load_state_dict(relax.state_dict())
    assert fresh.tau == relax.tau
    halfway = create_relaxation("gumbel", tau=10.0, tau_min=0.1, anneal=anneal)
    halfway.set_epochs(5)
    for _ in range(2):
        halfway.end_epoch()
    fresh.load_state_dict(halfway.state_dict())  # a resume mid-run
    assert fresh.tau == halfway.tau == taus[2]


def test_a_one_epoch_run_keeps_the_starting_temperature():
    relax = create_relaxation("gumbel", tau=10.0, tau_min=0.1)
    relax.set_epochs(1)
    assert relax.tau == 10.0


def test_the_temperature_divides_the_noisy_logits():
    """softmax((a + g) / tau): at tau = 0.5 the weights are those of tau = 1 squared and
    renormalised (the same noise), sharper towards one op; at tau = 2 flatter."""
    a = {"g": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}
    sampled = {}
    for tau in (1.0, 0.5, 2.0):
        torch.manual_seed(3)
        sampled[tau] = create_relaxation("gumbel", tau=tau)(a)["g"]
    one = sampled[1.0]
    torch.testing.assert_close(sampled[0.5], one ** 2 / (one ** 2).sum(-1, keepdim=True))
    torch.testing.assert_close(sampled[2.0], one.sqrt() / one.sqrt().sum(-1, keepdim=True))
    assert (sampled[0.5].max(-1).values > one.max(-1).values).all()


def test_softmax_weights_each_edge_over_its_ops():
    """DARTS's relaxation: each edge's row (not each op's column) is a softmax."""
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    w = create_relaxation("softmax")({"g": a})["g"]
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    torch.testing.assert_close(w, torch.exp(a) / torch.exp(a).sum(-1, keepdim=True))


def test_an_anneal_without_its_end_or_a_rising_temperature_is_refused():
    """anneal without tau_min used to run at a constant tau, silently (SNAS's defining
    annealing switched off); each relaxation anneals its own way when tau_min alone is
    given, and tau_min=None alone keeps tau constant."""
    from diffnas.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="anneal='linear' needs tau_min"):
        load_config(None, ["search.strategy={name: snas, relaxation: "
                           "{name: gumbel, tau: 1, anneal: linear}}"])
    with pytest.raises(ValueError, match="tau_min=5.0 > tau=1.0: the temperature would rise"):
        create_relaxation("hard_gumbel", tau=1.0, tau_min=5.0)
    for name, default in (("gumbel", "exp"), ("hard_gumbel", "linear")):
        assert create_relaxation(name, tau=2.0, tau_min=0.5).schedule.anneal == default
    constant = create_relaxation("hard_gumbel", tau=5.0, tau_min=None)
    constant.set_epochs(3)
    constant.end_epoch()
    assert constant.tau == 5.0


# no step was taken, so torch warns that the schedulers stepped before the optimizers
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_strategy_anneals_the_temperature():
    s = tiny_strategy({"name": "gdas"})  # epochs=2: 10 -> 0.1
    assert s.relaxation.tau == 10.0
    s.end_epoch()
    assert math.isclose(s.relaxation.tau, 0.1)


@pytest.mark.parametrize("name, middle", [("snas", math.sqrt(0.1)), ("gdas", 5.05)])
def test_snas_anneals_exponentially_and_gdas_linearly_by_default(name, middle):
    """The papers' schedules: SNAS tau 1 -> 0.1 exponentially, GDAS 10 -> 0.1 linearly;
    halfway through a 3-epoch run the geometric and the arithmetic mean."""
    from diffnas.arch import ArchParams
    from diffnas.strategies import create_strategy
    from diffnas.strategies.objective import ClassificationObjective

    space = tiny_space()
    s = create_strategy({"name": name}, space.build_supernet(), ArchParams(space),
                        ClassificationObjective(), epochs=3)
    s.relaxation.end_epoch()
    assert math.isclose(s.relaxation.tau, middle)


def test_snas_resource_term_is_its_weight_times_the_sampled_ops_cost():
    s = tiny_strategy({"name": "snas", "cost_weight": 0.25, "cost_channels": 8})
    aw = s.arch_weights().detach()
    term, stats = s.extra_loss(aw)
    cost = sum((aw[g] * c).sum() for g, c in s.costs.items())
    assert stats["cost"] == pytest.approx(float(cost))
    assert float(term) == pytest.approx(0.25 * float(cost)) and float(cost) > 0


def _count_op_calls(supernet):
    """Forward hooks on every candidate op of every mixed op: calls per (edge module)."""
    calls = {}
    handles = []
    for name, m in supernet.named_modules():
        if hasattr(m, "candidates") and isinstance(getattr(m, "ops", None), torch.nn.ModuleList):
            calls[name] = 0
            for op in m.ops:
                def hook(mod, inp, out, name=name):
                    calls[name] += 1
                handles.append(op.register_forward_hook(hook))
    return calls, handles


def _pc_space(k):
    return lambda: tiny_space(mixed_op={"name": "partial_channel", "k": k})


@pytest.mark.parametrize("make_space", [tiny_space, nb201_space, _pc_space(1), _pc_space(2)],
                         ids=["darts_cnn", "nb201", "partial_channel_k1", "partial_channel_k2"])
def test_gdas_computes_exactly_one_op_per_edge(make_space):
    s = tiny_strategy({"name": "gdas"}, space=make_space())
    calls, handles = _count_op_calls(s.supernet)
    forwards = []
    s.supernet.register_forward_pre_hook(lambda m, a: forwards.append(1))
    s.step(tiny_batch(4, 1), tiny_batch(4, 2))
    assert len(forwards) == 2  # one alpha forward, one weight forward
    assert calls and all(n == len(forwards) for n in calls.values()), calls
    for h in handles:
        h.remove()
    # and only the sampled op of an edge gets weight gradients (the weight step's sample);
    # under the softmax relaxation (DARTS) every op with weights gets one: the check can tell
    assert max(_ops_with_grad(s.supernet)) == 1
    d = tiny_strategy({"name": "darts"}, space=make_space())
    d.step(tiny_batch(4, 1), tiny_batch(4, 2))
    assert max(_ops_with_grad(d.supernet)) > 1


def _ops_with_grad(supernet):
    """Per mixed op: how many of its candidate ops have a parameter with a gradient."""
    out = []
    for m in supernet.modules():
        if hasattr(m, "candidates") and isinstance(getattr(m, "ops", None), torch.nn.ModuleList):
            out.append(sum(any(p.grad is not None for p in op.parameters()) for op in m.ops))
    return out


def test_gdas_rejects_soft_relaxation():
    with pytest.raises(ValueError, match="hard_gumbel"):
        tiny_strategy({"name": "gdas", "relaxation": {"name": "softmax"}})


def test_a_sampled_edge_gives_unsampled_ops_the_gdas_authors_gradient():
    """Only the sampled op runs; as in GDAS's code, every other op's weight (zero in value)
    is added to the output, so its gradient is sum(dL/d out) instead of nothing."""
    from diffnas.supernet.mixed import MixedOp

    torch.manual_seed(0)
    ops = ["none", "skip_connect", "max_pool_3x3", "sep_conv_3x3"]
    m = MixedOp(4, 1, ops)
    x = torch.randn(2, 4, 6, 6)
    w = torch.tensor([0.0, 0.0, 0.0, 1.0], requires_grad=True)
    g = torch.randn(2, 4, 6, 6)
    out = m(x, w, 3)
    assert torch.equal(out, w[3].detach() * m.ops[3](x))  # the added term is exactly zero
    (out * g).sum().backward()
    assert torch.allclose(w.grad[:3], g.sum().expand(3))
    assert torch.allclose(w.grad[3], (m.ops[3](x) * g).sum())


@pytest.mark.parametrize("cost_weight", [0.0, 0.1])
def test_building_snas_draws_nothing_from_the_rng(cost_weight):
    """The cost table is counted on the meta device: building snas leaves torch's RNG
    alone, so cost_channels (ignored without a resource term) cannot change a run's
    draws. (Its conv initialisations drew from it: cost_channels 16 vs 8 gave other
    alphas after one step with cost_weight 0.)"""
    from diffnas.arch import ArchParams
    from diffnas.strategies import create_strategy
    from diffnas.strategies.objective import ClassificationObjective
    from diffnas.strategies.snas import op_costs

    space = tiny_space()
    supernet, arch = space.build_supernet(), ArchParams(space)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    strategy = create_strategy({"name": "snas", "cost_weight": cost_weight, "cost_channels": 8},
                               supernet, arch, ClassificationObjective(), epochs=2)
    assert torch.equal(before, torch.get_rng_state())
    if cost_weight:  # the meta-device count is the real one
        real = {}
        for g in arch.groups():
            with torch.device("cpu"):
                counts = [[sum(p.numel() for p in create_op(n, 8, e.stride, affine=False)
                               .parameters()) for n in e.candidates] for e in arch.edges[g]]
            real[g] = torch.tensor(counts, dtype=torch.float) / max(map(max, counts))
            assert torch.equal(strategy.costs[g], real[g])
            assert torch.equal(op_costs(arch.edges[g], 8), real[g])
    for bad in (0, -4):  # (refused only when the strategy was built, after the run dir)
        with pytest.raises(ValueError, match=f"snas cost_channels must be >= 1, got {bad}"):
            create_strategy({"name": "snas", "cost_channels": bad}, supernet, arch,
                            ClassificationObjective(), epochs=2)
